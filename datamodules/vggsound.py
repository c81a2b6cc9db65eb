"""VGGSound (``data=vggsound``): about 200,000 YouTube clips of 10 s in 309 sound classes, audio + video. The
datamodule reads the cache that ``balance-prepare vggsound --raw RAW --out OUT`` writes (its preparation is
``prepare_main`` here, where ``balance-prepare`` finds it; the raw list and clips: :mod:`datamodules.vggsound_raw`;
the preparation: :mod:`datamodules.vggsound_prepare`)."""

from __future__ import annotations

import csv

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.clips import ClipCacheDataModule, ClipDataset, clip_cached
from datamodules.kinetics_sounds_raw import read_list_file
from datamodules.preparation import missing_cache_error
from datamodules.splits import stratified_split
from datamodules.vggsound_prepare import CACHE_LAYOUT, CACHE_VERSION, COMMAND, PROG, WINDOW
from datamodules.vggsound_prepare import main as prepare_main  # noqa: F401 (balance-prepare finds it here)
from datamodules.vggsound_raw import LIST_FILE, RAW_LAYOUT, SOURCE
from datamodules.youtube import clip_key

PUBLISHED_CLASSES = 309  # the classes of the published vggsound.csv
SPLITS_HELP = "official (the list's train/test, validation carved from train; default), stratified, files"


class VGGSoundDataset(ClipDataset):
    """Items ``{"inputs": {"audio": [1, 129, 626], "visual": [T, 3, S, S]}, "label": int}``: OGM-GE's 5 s audio
    window of the cached 10 s spectrogram, at a random start in training (as OGM-GE draws it) and in the middle in
    evaluation, and ``T`` frames (random in training, the centres of ``T`` equal parts in evaluation)."""

    def _audio(self, audio: torch.Tensor) -> torch.Tensor:
        columns = audio.shape[-1]
        if columns <= WINDOW:
            return audio
        start = int(torch.randint(columns - WINDOW + 1, (1,))) if self.train else (columns - WINDOW) // 2
        return audio[..., start:start + WINDOW].contiguous()


class VGGSoundDataModule(ClipCacheDataModule):
    """VGGSound from the prepared cache: spectrogram windows ``[1, 129, 626]`` + frames ``[T, 3, S, S]``, the
    classes of the list (309 for the published ``vggsound.csv``).

    Args:
        root: the prepared cache (``balance-prepare vggsound --raw RAW --out OUT``; ``OUT`` here).
        split: ``official`` (the list's train and test; validation carved from train, stratified, ``val_fraction``
            of it, with ``seed``), ``stratified`` (class-stratified train/val/test over all prepared clips), or
            ``files`` (``split_files``; implied when it is given).
        split_files: ``{"train": path, "test": path}`` (optionally ``"val"``), in any format
            :func:`~datamodules.kinetics_sounds_raw.read_list_file` reads (``<youtube id>_<start>`` first on a line).
        val_fraction: fraction of the training clips (of all clips for ``stratified``) in validation.
        test_fraction: fraction in test (``stratified`` only).
        num_frames: frames per clip (``T``); OGM-GE uses 3.
        **kwargs: :class:`~datamodules.clips.ClipCacheDataModule`'s (``store``, ``pack_dir``) and its base's
            (``image_size``, ``augment``, ``batch_size``, ``num_workers``, ``seed``, ...).
    """

    modalities = ["audio", "visual"]
    title = "VGGSound"
    cache_name = "vggsound"
    cache_version = CACHE_VERSION
    cache_files = ("meta.json", "clips.csv", "audio", "visual")
    split_choices = ("official", "stratified", "files")
    splits_help = SPLITS_HELP

    def __init__(self, root: str | None = None, split: str = "official", test_fraction: float = 0.1,
                 num_frames: int = 3, **kwargs) -> None:
        super().__init__(root=root, split=split, **kwargs)
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        self.test_fraction = test_fraction
        self.num_frames = num_frames
        self.classes: list[str] = []
        self.split_clips: dict[str, list[str]] = {}

    @property
    def num_classes(self) -> int:
        """The classes of the list the cache was prepared from; before ``setup`` reads them, the published
        list's 309 (what a config check without the data sees)."""
        return len(self.classes) if self.classes else PUBLISHED_CLASSES

    # -- the cache -------------------------------------------------------------------------------------------------

    def _missing_error(self, problem: str) -> FileNotFoundError:
        return missing_cache_error(
            problem, title=self.title, root=self.root,
            looks_raw=self.root is not None and (self.root / LIST_FILE).is_file(), command=COMMAND,
            raw_layout=RAW_LAYOUT, cache_layout=CACHE_LAYOUT, obtained=f"as {SOURCE}", prepare=PROG)

    def _read_clips(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        with open(self.root / "clips.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted({r["label"] for r in rows} - set(index))
        if unknown:
            raise self._missing_error(f"clips.csv has labels its meta.json does not list ({unknown[:3]}); prepare "
                                      "the cache again into a new directory")
        clips = [r["clip"] for r in rows]
        labels = np.array([index[r["label"]] for r in rows], dtype=np.int64)
        splits = np.array([r["split"] for r in rows], dtype=object)
        frames = np.array([int(r["frames"]) for r in rows])
        lost = [c for c, n in zip(clips, frames) if n < 1 or not clip_cached(c, self.root)]
        if lost:
            raise self._missing_error(f"{len(lost)} clips of {self.root}/clips.csv have no spectrogram or frames "
                                      f"(e.g. {lost[:3]}); re-run the preparation, it resumes")
        return clips, labels, splits, frames

    # -- splits ----------------------------------------------------------------------------------------------------

    def _split_indices(self, labels: np.ndarray, splits: np.ndarray, clips: list[str]) -> dict[str, np.ndarray]:
        if self.split == "stratified":
            return stratified_split(labels, {"train": 1 - self.val_fraction - self.test_fraction,
                                             "val": self.val_fraction, "test": self.test_fraction}, self.seed)
        if self.split == "official":
            train, test = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
            if not len(train) or not len(test):
                raise ValueError(f"split=official needs clips of both the list's train and test splits; {self.root} "
                                 f"has {len(train)} train and {len(test)} test clips: use split=stratified")
            return {**self.carve_val(train, labels), "test": test}
        return self.file_split({clip_key(clip): i for i, clip in enumerate(clips)}, labels, read_list_file)

    # -- datasets --------------------------------------------------------------------------------------------------

    def build_datasets(self) -> dict[str, Dataset]:
        self.classes = list(self._check_root()["classes"])
        clips, labels, splits, frames = self._read_clips()
        parts = self._split_indices(labels, splits, clips)
        self.split_clips = {name: [clips[i] for i in idx] for name, idx in parts.items()}
        packs = self.clip_packs(clips, frames)
        return self.split_datasets(parts, lambda idx, train: VGGSoundDataset(
            self.root, [clips[i] for i in idx], labels[idx], frames[idx], self.num_frames, self.image_size, train,
            packs=packs))

