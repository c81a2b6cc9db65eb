"""MM-Debiased (``data=mm_debiased``): the valuation paper's 14,025 clips of VGGSound and Kinetics-400 in 10 classes,
chosen so that neither modality dominates over the data set while single samples still lean on one; audio +
video. The datamodule reads the cache that ``balance-prepare mm_debiased --raw RAW --out OUT`` writes (its
preparation is ``prepare_main`` here, where ``balance-prepare`` finds it)."""

from __future__ import annotations

import csv

import numpy as np
from torch.utils.data import Dataset

from datamodules.clips import ClipCacheDataModule, clip_cached
from datamodules.kinetics_sounds import KineticsSoundsDataset
from datamodules.mm_debiased_prepare import CACHE_LAYOUT, CACHE_VERSION, COMMAND, PROG
from datamodules.mm_debiased_prepare import main as prepare_main  # noqa: F401 (balance-prepare finds it here)
from datamodules.mm_debiased_raw import LIST_FILE, RAW_LAYOUT, SOURCE
from datamodules.preparation import missing_cache_error
from datamodules.splits import stratified_split

CLASSES = 10  # the list's
SPLITS_HELP = "official (the list's training/validation/testing subsets, default) or stratified"


class MMDebiasedDataModule(ClipCacheDataModule):
    """MM-Debiased from the prepared cache: fbank ``[1, 1024, 128]`` + frames ``[T, 3, S, S]`` (one per ``T``-th of
    the clip, as for Kinetics-Sounds), 10 classes.

    Args:
        root: the prepared cache (``balance-prepare mm_debiased --raw RAW --out OUT``; ``OUT`` here).
        split: ``official`` (the list's own training, validation and testing subsets) or ``stratified``
            (class-stratified train/val/test over every prepared clip, ``val_fraction``, ``test_fraction``, ``seed``).
        val_fraction: fraction in validation (``stratified`` only).
        test_fraction: fraction in test (``stratified`` only).
        num_frames: frames per clip (``T``), one per ``T``-th of the clip; the valuation code uses 3.
        **kwargs: :class:`~datamodules.clips.ClipCacheDataModule`'s (``store``, ``pack_dir``) and its base's
            (``image_size``, ``augment``, ``batch_size``, ``num_workers``, ``seed``, ...).
    """

    modalities = ["audio", "visual"]
    title = "MM-Debiased"
    cache_name = "mm_debiased"
    cache_version = CACHE_VERSION
    cache_files = ("meta.json", "clips.csv", "audio", "visual")
    split_choices = ("official", "stratified")
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
        """The list's classes (10; read from the cache at ``setup``)."""
        return len(self.classes) if self.classes else CLASSES

    def _missing_error(self, problem: str) -> FileNotFoundError:
        return missing_cache_error(
            problem, title=self.title, root=self.root,
            looks_raw=self.root is not None and (self.root / LIST_FILE).is_file(), command=COMMAND,
            raw_layout=RAW_LAYOUT, cache_layout=CACHE_LAYOUT, obtained=f"as {SOURCE}", prepare=PROG)

    def build_datasets(self) -> dict[str, Dataset]:
        self.classes = list(self._check_root()["classes"])
        with open(self.root / "clips.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        index = {name: i for i, name in enumerate(self.classes)}
        clips = [r["clip"] for r in rows]
        labels = np.array([index[r["label"]] for r in rows], dtype=np.int64)
        splits = np.array([r["split"] for r in rows], dtype=object)
        frames = np.array([int(r["frames"]) for r in rows])
        lost = [c for c, n in zip(clips, frames) if n < 1 or not clip_cached(c, self.root)]
        if lost:
            raise self._missing_error(f"{len(lost)} clips of {self.root}/clips.csv have no fbank or frames "
                                      f"(e.g. {lost[:3]}); re-run the preparation, it resumes")
        if self.split == "stratified":
            parts = stratified_split(labels, {"train": 1 - self.val_fraction - self.test_fraction,
                                              "val": self.val_fraction, "test": self.test_fraction}, self.seed)
        else:
            parts = {name: np.flatnonzero(splits == name) for name in ("train", "val", "test")}
        self.split_clips = {name: [clips[i] for i in idx] for name, idx in parts.items()}
        packs = self.clip_packs(clips, frames)
        return self.split_datasets(parts, lambda idx, train: KineticsSoundsDataset(
            self.root, [clips[i] for i in idx], labels[idx], frames[idx], self.num_frames, self.image_size, train,
            packs=packs))
