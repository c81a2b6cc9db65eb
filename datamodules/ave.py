"""AVE (``data=ave``): 4,143 audio-visual events of 28 categories (church bell, dog barking, playing guitar, ...) in
10 s YouTube videos, audio + video, with official train/val/test splits. The datamodule reads the cache that
``balance-prepare ave --raw RAW --out OUT`` writes (its preparation is ``prepare_main`` here, where
``balance-prepare`` finds it; the download: :mod:`datamodules.ave_raw`; the preparation:
:mod:`datamodules.ave_prepare`)."""

from __future__ import annotations

import csv

import numpy as np
from torch.utils.data import Dataset

from datamodules.ave_prepare import CACHE_LAYOUT, CACHE_VERSION, COMMAND, PROG
from datamodules.ave_prepare import main as prepare_main  # noqa: F401 (balance-prepare finds it here)
from datamodules.ave_raw import ANNOTATIONS, RAW_LAYOUT, SOURCE
from datamodules.clips import ClipCacheDataModule, ClipDataset, clip_cached
from datamodules.preparation import missing_cache_error
from datamodules.splits import stratified_split

CATEGORIES = 28  # AVE's
SPLITS_HELP = "official (AVE's trainSet/valSet/testSet, default) or stratified"


class AVEDataModule(ClipCacheDataModule):
    """AVE from the prepared cache: spectrogram ``[1, 257, 1004]`` of the event's seconds + frames
    ``[T, 3, S, S]`` from them, 28 categories.

    Args:
        root: the prepared cache (``balance-prepare ave --raw RAW --out OUT``; ``OUT`` here).
        split: ``official`` (AVE's own train, val and test files) or ``stratified`` (class-stratified
            train/val/test over every prepared event, ``val_fraction``, ``test_fraction``, ``seed``).
        val_fraction: fraction of the events in validation (``stratified`` only).
        test_fraction: fraction in test (``stratified`` only).
        num_frames: frames per event (``T``): random in training, the centres of ``T`` equal parts in evaluation;
            PMR uses 3.
        **kwargs: :class:`~datamodules.clips.ClipCacheDataModule`'s (``store``, ``pack_dir``) and its base's
            (``image_size``, ``augment``, ``batch_size``, ``num_workers``, ``seed``, ...).
    """

    modalities = ["audio", "visual"]
    title = "AVE"
    cache_name = "ave"
    cache_version = CACHE_VERSION
    cache_files = ("meta.json", "events.csv", "audio", "visual")
    split_choices = ("official", "stratified")
    splits_help = SPLITS_HELP
    item_noun = "event"

    def __init__(self, root: str | None = None, split: str = "official", test_fraction: float = 0.1,
                 num_frames: int = 3, **kwargs) -> None:
        super().__init__(root=root, split=split, **kwargs)
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        self.test_fraction = test_fraction
        self.num_frames = num_frames
        self.classes: list[str] = []
        self.split_events: dict[str, list[str]] = {}

    @property
    def num_classes(self) -> int:
        """The categories of the annotations (28; read from the cache at ``setup``)."""
        return len(self.classes) if self.classes else CATEGORIES

    def _missing_error(self, problem: str) -> FileNotFoundError:
        return missing_cache_error(
            problem, title=self.title, root=self.root,
            looks_raw=self.root is not None and (self.root / ANNOTATIONS).is_file(), command=COMMAND,
            raw_layout=RAW_LAYOUT, cache_layout=CACHE_LAYOUT, obtained=f"as {SOURCE}", prepare=PROG)

    def _read_events(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        with open(self.root / "events.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        index = {name: i for i, name in enumerate(self.classes)}
        events = [r["event"] for r in rows]
        labels = np.array([index[r["category"]] for r in rows], dtype=np.int64)
        splits = np.array([r["split"] for r in rows], dtype=object)
        frames = np.array([int(r["frames"]) for r in rows])
        lost = [e for e, n in zip(events, frames) if n < 1 or not clip_cached(e, self.root)]
        if lost:
            raise self._missing_error(f"{len(lost)} events of {self.root}/events.csv have no spectrogram or frames "
                                      f"(e.g. {lost[:3]}); re-run the preparation, it resumes")
        return events, labels, splits, frames

    def _split_indices(self, labels: np.ndarray, splits: np.ndarray) -> dict[str, np.ndarray]:
        if self.split == "stratified":
            return stratified_split(labels, {"train": 1 - self.val_fraction - self.test_fraction,
                                             "val": self.val_fraction, "test": self.test_fraction}, self.seed)
        return {name: np.flatnonzero(splits == name) for name in ("train", "val", "test")}

    def build_datasets(self) -> dict[str, Dataset]:
        self.classes = list(self._check_root()["classes"])
        events, labels, splits, frames = self._read_events()
        parts = self._split_indices(labels, splits)
        self.split_events = {name: [events[i] for i in idx] for name, idx in parts.items()}
        packs = self.clip_packs(events, frames)
        return self.split_datasets(parts, lambda idx, train: ClipDataset(
            self.root, [events[i] for i in idx], labels[idx], frames[idx], self.num_frames, self.image_size, train,
            packs=packs))
