"""VGGSound: about 200,000 YouTube clips of 10 s in 309 sound classes, audio + video. The
datamodule reads the cache that ``balance-prepare vggsound --raw RAW --out OUT`` writes (its preparation is
``prepare_main`` here, where ``balance-prepare`` finds it; the raw list and clips: :mod:`datamodules.vggsound_raw`;
the preparation: :mod:`datamodules.vggsound_prepare`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from datamodules.clip_cache import LabelledClipsDataModule
from datamodules.clips import ClipDataset
from datamodules.kinetics_sounds_raw import read_list_file
from datamodules.preparation import missing_cache_error
from datamodules.vggsound_prepare import CACHE_LAYOUT, CACHE_VERSION, COMMAND, PROG, WINDOW
from datamodules.vggsound_prepare import main as prepare_main  # noqa: F401 (balance-prepare finds it here)
from datamodules.vggsound_raw import LIST_FILE, RAW_LAYOUT, SOURCE
from datamodules.youtube import clip_key


class VGGSoundDataset(ClipDataset):
    """Items ``{"inputs": {"audio": [1, 129, 626], "visual": [T, 3, S, S]}, "label": int}``: OGM-GE's 5 s audio
    window of the cached 10 s spectrogram, at a random start in training (as OGM-GE draws it) and in the middle in
    evaluation, and ``T`` frames (random in training, the centres of ``T`` equal parts in evaluation)."""

    def _array(self, name: str, audio: torch.Tensor) -> torch.Tensor:
        columns = audio.shape[-1]
        if columns <= WINDOW:
            return audio
        start = int(torch.randint(columns - WINDOW + 1, (1,))) if self.train else (columns - WINDOW) // 2
        return audio[..., start:start + WINDOW].contiguous()


class VGGSoundDataModule(LabelledClipsDataModule):
    """VGGSound from the prepared cache: spectrogram windows ``[1, 129, 626]`` + frames ``[T, 3, S, S]``, the
    classes of the list (309 for the published ``vggsound.csv``).

    Args:
        split: ``official`` (the list's train and test; validation carved from train, stratified, ``val_fraction``
            of it, with ``seed``), ``stratified`` (class-stratified train/val/test over all prepared clips), or
            ``files`` (``split_files``; implied when it is given).
        split_files: ``{"train": path, "test": path}`` (optionally ``"val"``), in any format
            :func:`~datamodules.kinetics_sounds_raw.read_list_file` reads (``<youtube id>_<start>`` first on a line).
        num_frames: frames per clip (``T``); OGM-GE uses 3.
        **kwargs: :class:`~datamodules.clip_cache.LabelledClipsDataModule`'s (``root``, ``val_fraction``,
            ``test_fraction``, ``store``, ``pack_dir``, ``image_size``, ``batch_size``, ...).
    """

    title = "VGGSound"
    cache_name = "vggsound"
    cache_version = CACHE_VERSION
    cache_files = ("meta.json", "clips.csv", "audio", "visual")
    split_choices = ("official", "stratified", "files")
    splits_help = "official (the list's train/test, validation carved from train; default), stratified, files"
    default_classes = 309  # the published vggsound.csv's
    dataset_class = VGGSoundDataset

    def _missing_error(self, problem: str) -> FileNotFoundError:
        return missing_cache_error(
            problem, title=self.title, root=self.root,
            looks_raw=self.root is not None and (self.root / LIST_FILE).is_file(), command=COMMAND,
            raw_layout=RAW_LAYOUT, cache_layout=CACHE_LAYOUT, obtained=f"as {SOURCE}", prepare=PROG)

    def split_indices(self, items: Sequence[str], labels: np.ndarray, splits: np.ndarray) -> dict[str, np.ndarray]:
        if self.split == "files":
            return self.file_split({clip_key(item): i for i, item in enumerate(items)}, labels, read_list_file)
        return super().split_indices(items, labels, splits)
