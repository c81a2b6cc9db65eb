"""AVE: 4,143 audio-visual events of 28 categories (church bell, dog barking, playing guitar, ...) in
10 s YouTube videos, audio + video, with official train/val/test splits. The datamodule reads the cache that
``balance-prepare ave --raw RAW --out OUT`` writes (its preparation is ``prepare_main`` here, where
``balance-prepare`` finds it; the download: :mod:`datamodules.ave_raw`; the preparation:
:mod:`datamodules.ave_prepare`)."""

from __future__ import annotations

from datamodules.ave_prepare import CACHE_LAYOUT, CACHE_VERSION, COMMAND, PROG
from datamodules.ave_prepare import main as prepare_main  # noqa: F401 (balance-prepare finds it here)
from datamodules.ave_raw import ANNOTATIONS, RAW_LAYOUT, SOURCE
from datamodules.clip_cache import LabelledClipsDataModule
from datamodules.preparation import missing_cache_error


class AVEDataModule(LabelledClipsDataModule):
    """AVE from the prepared cache: spectrogram ``[1, 257, 1004]`` of the event's seconds + frames
    ``[T, 3, S, S]`` from them (random in training, the centres of ``T`` equal parts in evaluation), 28 categories.

    Args:
        split: ``official`` (AVE's own train, val and test files) or ``stratified`` (class-stratified
            train/val/test over every prepared event).
        num_frames: frames per event (``T``); PMR uses 3.
        **kwargs: :class:`~datamodules.clip_cache.LabelledClipsDataModule`'s (``root``, ``val_fraction``,
            ``test_fraction``, ``store``, ``pack_dir``, ``image_size``, ``batch_size``, ...).
    """

    title = "AVE"
    cache_name = "ave"
    cache_version = CACHE_VERSION
    cache_files = ("meta.json", "events.csv", "audio", "visual")
    splits_help = "official (AVE's trainSet/valSet/testSet, default) or stratified"
    item_noun = "event"
    index_file = "events.csv"
    item_column = "event"
    label_column = "category"
    default_classes = 28  # AVE's categories

    def _missing_error(self, problem: str) -> FileNotFoundError:
        return missing_cache_error(
            problem, title=self.title, root=self.root,
            looks_raw=self.root is not None and (self.root / ANNOTATIONS).is_file(), command=COMMAND,
            raw_layout=RAW_LAYOUT, cache_layout=CACHE_LAYOUT, obtained=f"as {SOURCE}", prepare=PROG)
