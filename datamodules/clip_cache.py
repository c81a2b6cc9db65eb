"""The datamodules of clip caches (CREMA-D, Kinetics-Sounds, IEMOCAP, VGGSound, MM-Debiased, AVE): the store items
are read from (:class:`ClipCacheDataModule`), and the caches whose index gives every item's class and split
(:class:`LabelledClipsDataModule`)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from datamodules.cache import PreparedCacheDataModule
from datamodules.clip_packs import ClipPacks, clip_packs
from datamodules.clips import ClipDataset
from datamodules.splits import stratified_split

#: where training reads items from: memory-mapped packs of the decoded frames and the audio arrays, or the files
STORES = ("packed", "files")


class ClipCacheDataModule(PreparedCacheDataModule):
    """A prepared cache of clips (CREMA-D, Kinetics-Sounds, IEMOCAP, ...), with the store training reads items from. Its
    ``dataset_class`` (:class:`~datamodules.clips.ClipDataset` or a subclass) names the cache's modalities.

    Args:
        store: ``packed`` (default): the frames decoded once, at the first setup, and the audio arrays copied into
            memory-mapped packs (``<pack_dir>/visual.bin``, ``audio.bin``: one per modality; their sizes are logged,
            and ``docs/datasets/`` gives them per data set), then read without opening a file or decoding an image;
            ``files``: each item read from the cache's own files (``.npy`` and JPEG; no extra disk).
        pack_dir: where the packs go (default ``<root>/packed``; another directory for a read-only cache).
        **kwargs: :class:`~datamodules.cache.PreparedCacheDataModule`'s.
    """

    dataset_class: type[ClipDataset] = ClipDataset
    modalities = ClipDataset.modality_names()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.modalities = cls.dataset_class.modality_names()  # the dataset class owns the names

    def __init__(self, *args: Any, store: str = "packed", pack_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if store not in STORES:
            raise ValueError(f"unknown store={store!r}: choose {' or '.join(STORES)}")
        self.store = store
        self.pack_dir = None if pack_dir is None else Path(pack_dir).expanduser()

    def clip_packs(self, clips: Sequence[str], counts: Sequence[int]) -> ClipPacks | None:
        """The clips' packs (``store=packed``), or None (``store=files``)."""
        if self.store == "files":
            return None
        return clip_packs(self.root, clips, counts, self.pack_dir or self.root / "packed",
                          frames=self.dataset_class.frame_modalities, arrays=self.dataset_class.array_modalities)


class LabelledClipsDataModule(ClipCacheDataModule):
    """A clip cache whose index (``index_file``: a row per item with its ``label_column``, ``split_column`` and
    ``frames``, and optionally a ``group_column``) gives every item's class and split, and whose ``meta.json``
    names the classes (VGGSound, MM-Debiased, AVE, UCF-101). A subclass sets the index's names,
    ``default_classes``, ``dataset_class`` and the cache's attributes, and implements ``_missing_error``.

    With a ``group_column`` (e.g. UCF-101's clips cut from one long video), the items of a class that share its
    value are a group, and no group is split between train, validation and test by a split this module makes.

    Args:
        root: the prepared cache (``data.root``).
        split: ``official`` (the index's splits; validation carved from train, stratified, ``val_fraction`` of it,
            where the index has none) or ``stratified`` (class-stratified train/val/test over every item,
            ``val_fraction``, ``test_fraction``, ``seed``); a subclass may add choices (:meth:`split_indices`).
        test_fraction: fraction in test (``stratified`` only).
        num_frames: frames per item (``T``).
        **kwargs: :class:`ClipCacheDataModule`'s (``store``, ``pack_dir``) and its base's (``val_fraction``,
            ``image_size``, ``augment``, ``batch_size``, ``num_workers``, ``seed``, ...).
    """

    index_file = "clips.csv"
    item_column = "clip"
    label_column = "label"
    split_column = "split"
    group_column: str | None = None
    default_classes: int  # the class count a config check sees before setup reads the cache's
    split_choices = ("official", "stratified")

    def __init__(self, root: str | None = None, split: str = "official", test_fraction: float = 0.1,
                 num_frames: int = 3, **kwargs: Any) -> None:
        super().__init__(root=root, split=split, **kwargs)
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        self.test_fraction = test_fraction
        self.num_frames = num_frames
        self.classes: list[str] = []
        self.split_items: dict[str, list[str]] = {}
        self.item_groups: np.ndarray | None = None  # per item, its group's number (with a group_column)

    @property
    def num_classes(self) -> int:
        """The classes the cache's ``meta.json`` names (read at ``setup``; ``default_classes`` before)."""
        return len(self.classes) if self.classes else self.default_classes

    def read_index(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """``(items, class indices, splits, frames)`` of the index, after checking every item is cached."""
        with open(self.root / self.index_file, newline="") as f:
            rows = list(csv.DictReader(f))
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted({r[self.label_column] for r in rows} - set(index))
        if unknown:
            raise self._missing_error(f"{self.index_file} has classes its meta.json does not list ({unknown[:3]}); "
                                      "prepare the cache again into a new directory")
        items = [r[self.item_column] for r in rows]
        labels = np.array([index[r[self.label_column]] for r in rows], dtype=np.int64)
        splits = np.array([r[self.split_column] for r in rows], dtype=object)
        frames = np.array([int(r["frames"]) for r in rows])
        if self.group_column is not None:
            # A group is a class's items of one group value (a value may recur in other classes).
            keys = [f"{r[self.label_column]}\t{r[self.group_column]}" for r in rows]
            self.item_groups = np.unique(keys, return_inverse=True)[1]
        lost = [item for item, n in zip(items, frames) if n < 1 or not self.dataset_class.cached(self.root, item)]
        if lost:
            raise self._missing_error(f"{len(lost)} {self.item_noun}s of {self.root}/{self.index_file} lack a "
                                      f"modality's files (e.g. {lost[:3]}); re-run the preparation, it resumes")
        return items, labels, splits, frames

    def split_indices(self, items: Sequence[str], labels: np.ndarray, splits: np.ndarray) -> dict[str, np.ndarray]:
        """The indices of each split (see ``split``)."""
        if self.split == "stratified":
            return stratified_split(labels, {"train": 1 - self.val_fraction - self.test_fraction,
                                             "val": self.val_fraction, "test": self.test_fraction}, self.seed,
                                    groups=self.item_groups)
        parts = {name: np.flatnonzero(splits == name) for name in ("train", "val", "test")}
        if not len(parts["train"]) or not len(parts["test"]):
            raise ValueError(f"split=official needs {self.item_noun}s of the train and test splits; {self.root} has "
                             f"{len(parts['train'])} train and {len(parts['test'])} test {self.item_noun}s: use "
                             "split=stratified")
        if not len(parts["val"]):
            parts.update(self.carve_val(parts["train"], labels, self.item_groups))
        return parts

    def build_datasets(self) -> dict[str, Dataset]:
        self.classes = list(self._check_root()["classes"])
        items, labels, splits, frames = self.read_index()
        parts = self.split_indices(items, labels, splits)
        self.split_items = {name: [items[i] for i in idx] for name, idx in parts.items()}
        packs = self.clip_packs(items, frames)
        return self.split_datasets(parts, lambda idx, train: self.dataset_class(
            self.root, [items[i] for i in idx], labels[idx], frames[idx], self.num_frames, self.image_size, train,
            packs=packs))
