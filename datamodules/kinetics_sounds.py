"""Kinetics-Sounds: the Kinetics-400 clips of 31 actions that can be heard, audio + video (Arandjelović and
Zisserman, 2017; the 31-class version that OGM-GE and later balancing papers train on). This module holds the
dataset and the datamodule (``data=kinetics_sounds``) that read the prepared cache of fbanks and frames, written by
``balance-prepare kinetics_sounds --raw RAW --out OUT`` (:mod:`datamodules.kinetics_sounds_prepare`, whose command
is ``prepare_main`` here, where ``balance-prepare`` finds it), and the choice of an item's frames.

Labels are positions in ``CLASSES``. Splits: seeded stratified train/val/test (default), the raw download's own
train/val/test folders (``official``), or user-supplied list files (OGM-GE's ``my_train.txt``/``my_test.txt`` and
other formats, see :func:`~datamodules.kinetics_sounds_raw.read_list_file`). Every item shows three frames, one per
third of the clip: at random within each third in training, each third's middle frame in evaluation
(:func:`frame_indices`).
"""

from __future__ import annotations

import csv

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.clip_cache import ClipCacheDataModule
from datamodules.clips import ClipDataset, clip_cached
from datamodules.kinetics_sounds_prepare import CACHE_LAYOUT, CACHE_VERSION, COMMAND, PROG
from datamodules.kinetics_sounds_prepare import main as prepare_main  # noqa: F401 (balance-prepare finds it here)
from datamodules.kinetics_sounds_raw import (
    CLASSES,
    RAW_LAYOUT,
    RAW_SPLITS,
    SOURCE,
    LabelCheck,
    class_of,
    clip_key,
    read_list_file,
)
from datamodules.preparation import missing_cache_error
from datamodules.splits import stratified_split

SPLITS_HELP = "stratified (default), official (the raw train/val/test folders), files (list files)"


def frame_indices(available: int, num: int, train: bool, generator: torch.Generator | None = None) -> list[int]:
    """Which of a clip's ``available`` frames an item shows: one from each of ``num`` equal segments (thirds).

    Segment ``k`` holds frames ``k * available // num`` to ``(k + 1) * available // num - 1``. Training draws one
    frame uniformly within each segment; evaluation takes each segment's middle frame (rounded down). A clip with
    fewer frames than segments repeats frames.

    Args:
        available: frames of the clip (at least 1).
        num: frames to pick.
        train: draw at random (``True``) or take the middles.
        generator: random generator for the training draw (default: torch's global one).
    """
    if available < 1 or num < 1:
        raise ValueError(f"need at least one frame and one pick, got available={available}, num={num}")
    picks = []
    for k in range(num):
        first = k * available // num
        last = max(first, (k + 1) * available // num - 1)
        if train:
            picks.append(int(torch.randint(first, last + 1, (1,), generator=generator)))
        else:
            picks.append((first + last) // 2)
    return picks


class KineticsSoundsDataset(ClipDataset):
    """Items ``{"inputs": {"audio": [1, 1024, 128], "visual": [T, 3, S, S]}, "label": int}`` from the cache; the
    ``T`` frames come from :func:`frame_indices` (one per ``T``-th of the clip)."""

    def _frame_indices(self, available: int) -> list[int]:
        return frame_indices(available, self.num_frames, self.train)


class KineticsSoundsDataModule(ClipCacheDataModule):
    """Kinetics-Sounds from the prepared cache: fbank ``[1, 1024, 128]`` + frames ``[T, 3, S, S]``, 31 classes.

    Args:
        root: the prepared cache (``balance-prepare kinetics_sounds --raw RAW --out OUT``; ``OUT`` here).
        split: ``stratified`` (seeded, class-stratified train/val/test over all clips), ``official`` (the raw
            download's split folders: train, and test, or val when there is no test folder, is the test set;
            validation is the val folder when train, val and test all exist, else carved from train), or
            ``files`` (``split_files``; implied when ``split_files`` is given).
        split_files: ``{"train": path, "test": path}`` (optionally ``"val"``), or ``[train, test]``, in any format
            :func:`~datamodules.kinetics_sounds_raw.read_list_file` reads. Without a val file, validation is carved
            from the training list (stratified, ``val_fraction`` of it, with ``seed``). Listed clips missing from
            the cache are skipped with a warning; cached clips in no list are left out.
        val_fraction: fraction of the clips (of the training clips for ``official`` and ``files``) in validation.
        test_fraction: fraction in test (``stratified`` only).
        num_frames: frames per clip (``T``), one per ``T``-th of the clip; OGM-GE uses 3.
        augment: training items draw their frames at random within the segments and get random resized crop +
            horizontal flip (the papers'); without it, and always in evaluation: the segments' middle frames, resize
            + centre crop.
        **kwargs: :class:`~datamodules.clip_cache.ClipCacheDataModule`'s (``store``, ``pack_dir``) and its base's
            (``image_size``) and the base datamodule's arguments (``batch_size``, ``num_workers``, ``seed``, ...).
    """

    dataset_class = KineticsSoundsDataset
    num_classes = len(CLASSES)
    title = "Kinetics-Sounds"
    cache_name = "kinetics_sounds"
    cache_version = CACHE_VERSION
    cache_files = ("meta.json", "clips.csv", "audio", "visual")
    split_choices = ("stratified", "official", "files")
    splits_help = SPLITS_HELP

    def __init__(self, root: str | None = None, split: str = "stratified", test_fraction: float = 0.1,
                 num_frames: int = 3, **kwargs) -> None:
        super().__init__(root=root, split=split, **kwargs)
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        self.test_fraction = test_fraction
        self.num_frames = num_frames
        self.split_clips: dict[str, list[str]] = {}

    # -- the cache -------------------------------------------------------------------------------------------------

    def _looks_raw(self) -> bool:
        folders = [p for p in self.root.iterdir() if p.is_dir()]
        return any(p.name in RAW_SPLITS or class_of(p.name) for p in folders)

    def _missing_error(self, problem: str) -> FileNotFoundError:
        return missing_cache_error(
            problem, title=self.title, root=self.root,
            looks_raw=self.root is not None and self.root.is_dir() and self._looks_raw(), command=COMMAND,
            raw_layout=RAW_LAYOUT, cache_layout=CACHE_LAYOUT, obtained=f"as {SOURCE}", prepare=PROG)

    def _read_clips(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        with open(self.root / "clips.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        clips = [r["clip"] for r in rows]
        labels = np.array([CLASSES.index(r["label"]) for r in rows], dtype=np.int64)
        raw_splits = np.array([r["split"] for r in rows], dtype=object)
        frames = np.array([int(r["frames"]) for r in rows])
        lost = [c for c, n in zip(clips, frames) if n < 1 or not clip_cached(c, self.root)]
        if lost:
            raise self._missing_error(f"{len(lost)} clips of {self.root}/clips.csv have no fbank or frames "
                                      f"(e.g. {lost[:3]}); re-run the preparation, it resumes")
        return clips, labels, raw_splits, frames

    # -- splits ----------------------------------------------------------------------------------------------------

    def _split_indices(self, clips: list[str], labels: np.ndarray, raw_splits: np.ndarray) -> dict[str, np.ndarray]:
        if self.split == "stratified":
            fractions = {"train": 1 - self.val_fraction - self.test_fraction, "val": self.val_fraction,
                         "test": self.test_fraction}
            return stratified_split(labels, fractions, self.seed)
        if self.split == "official":
            return self._official_split(labels, raw_splits)
        check = LabelCheck()

        def check_labels(path: str, listed: list[tuple[str, str, int]]) -> None:
            for key, label, index in listed:
                check(str(path), key, label, CLASSES[labels[index]])

        return self.file_split({clip_key(clip): i for i, clip in enumerate(clips)}, labels, read_list_file,
                               check_labels)

    def _official_split(self, labels: np.ndarray, raw_splits: np.ndarray) -> dict[str, np.ndarray]:
        present = sorted(set(raw_splits.tolist()) - {""})
        if "train" not in present or len(present) < 2:
            found = f"split folders {present}" if present else "no split folders (class folders only)"
            raise ValueError(f"split=official needs a raw download with a train folder and a val or test folder; "
                             f"{self.root} was prepared from one with {found}: use split=stratified or split_files")
        parts = {name: np.flatnonzero(raw_splits == name) for name in present}
        if "test" not in parts:
            parts["test"] = parts.pop("val")  # Kinetics' val set is the usual test set
        if "val" not in parts:
            parts.update(self.carve_val(parts["train"], labels))
        return parts

    # -- datasets --------------------------------------------------------------------------------------------------

    def build_datasets(self) -> dict[str, Dataset]:
        self._check_root()
        clips, labels, raw_splits, frames = self._read_clips()
        parts = self._split_indices(clips, labels, raw_splits)
        self.split_clips = {name: [clips[i] for i in idx] for name, idx in parts.items()}
        packs = self.clip_packs(clips, frames)
        return self.split_datasets(parts, lambda idx, train: self.dataset_class(
            self.root, [clips[i] for i in idx], labels[idx], frames[idx], self.num_frames, self.image_size, train,
            packs=packs))
