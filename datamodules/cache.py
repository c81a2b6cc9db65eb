"""The base of the datamodules that read a prepared cache (CREMA-D, Kinetics-Sounds, IEMOCAP, Food-101, MVSA)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from datamodules.base import MultimodalDataModule
from datamodules.preparation import read_cache_meta
from datamodules.splits import stratified_split

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


class PreparedCacheDataModule(MultimodalDataModule):
    """What the prepared-cache datamodules share: the split choice, the cache check, validation carved from
    training, split files, and the datasets of each split.

    A subclass sets ``title`` (for messages), ``cache_name``, ``cache_version``, ``cache_files`` (what
    ``meta.json`` must name and the root must hold), ``split_choices`` (the first is the default) and
    ``splits_help``; it implements ``_missing_error`` and ``build_datasets``.

    Args:
        root: the prepared cache (``balance-prepare <name> --raw RAW --out OUT``; ``OUT`` here).
        split: one of ``split_choices``; ``files`` is implied when ``split_files`` is given.
        split_files: ``{"train": path, "test": path}`` (optionally ``"val"``, or ``"dev"`` for it), or
            ``[train, test]`` / ``[train, val, test]``.
        val_fraction: fraction in validation.
        image_size: side of the square images or frames fed to the model.
        augment: random resized crop + horizontal flip on training images (the papers'); evaluation always uses
            resize + centre crop.
        **kwargs: the base datamodule's arguments (``batch_size``, ``num_workers``, ``seed``, ...).
    """

    title: str
    cache_name: str
    cache_version: int
    cache_files: tuple[str, ...]
    split_choices: tuple[str, ...]
    splits_help: str = ""
    item_noun = "clip"

    def __init__(
        self,
        root: str | None = None,
        split: str | None = None,
        split_files: Mapping[str, str] | Sequence[str] | None = None,
        val_fraction: float = 0.1,
        image_size: int = 224,
        augment: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if split_files is not None:
            split = "files"
        split = split or self.split_choices[0]
        if split not in self.split_choices:
            raise ValueError(f"unknown {self.title} split {split!r}: choose "
                             f"{self.splits_help or ', '.join(self.split_choices)}")
        if split == "files" and split_files is None:
            raise ValueError("split=files needs split_files: {train: path, test: path}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.root = None if root is None else Path(root).expanduser()
        self.split = split
        self.split_files = split_files
        self.val_fraction = val_fraction
        self.image_size = image_size
        self.augment = augment

    # -- the cache -------------------------------------------------------------------------------------------------

    def _missing_error(self, problem: str) -> FileNotFoundError:
        """The error for a root that is unset, missing or not a (complete) cache: what to run to make one."""
        raise NotImplementedError

    def _check_root(self) -> dict:
        """The cache's ``meta.json``, after checking the root holds a cache of this data set and version."""
        return read_cache_meta(self.root, self.cache_files, self.cache_name, self.cache_version, self.title,
                               self._missing_error)

    def prepare_data(self) -> None:
        self._check_root()

    # -- splits ----------------------------------------------------------------------------------------------------

    def carve_val(self, train: np.ndarray, labels: np.ndarray,
                  groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Moves ``val_fraction`` of ``train`` (indices) to validation, stratified by class and seeded; with
        ``groups`` (every item's group), whole groups."""
        parts = stratified_split(labels[train], {"train": 1 - self.val_fraction, "val": self.val_fraction},
                                 self.seed, groups=None if groups is None else groups[train])
        return {"train": train[parts["train"]], "val": train[parts["val"]]}

    def file_split(
        self,
        position: Mapping[str, int],
        labels: np.ndarray,
        read: Callable[[str | Path], list[tuple[str, str | None]]],
        check_labels: Callable[[str | Path, list[tuple[str, str, int]]], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """The split given by ``split_files``; validation is carved from training when no file gives it.

        Args:
            position: an item's key in the split files -> its index in the cache.
            labels: the cache's class index per item (for carving validation).
            read: reads one split file into ``[(key, label or None), ...]``.
            check_labels: called per file with ``(path, [(key, label, index), ...])`` for the labelled listed
                items the cache holds; raises or warns on labels that differ from the cache's.

        Listed items the cache lacks are skipped with a warning; an item in two files is an error.
        """
        files = self.split_files
        if not isinstance(files, Mapping):
            files = dict(zip(("train", "test") if len(files) == 2 else SPLIT_NAMES, files))
        files = {("val" if name == "dev" else name): path for name, path in files.items()}
        if set(files) - set(SPLIT_NAMES) or not {"train", "test"} <= set(files):
            raise ValueError(f"split_files needs train and test (and optionally val or dev), got {sorted(files)}")
        parts, seen = {}, set()
        for name, path in files.items():
            listed = read(path)
            absent = [key for key, _ in listed if key not in position]
            if absent:
                log.warning("%s: %d %ss of %s are not in the cache %s (e.g. %s): skipped", self.title, len(absent),
                            self.item_noun, path, self.root, absent[:3])
            if check_labels is not None:
                check_labels(path, [(key, label, position[key]) for key, label in listed
                                    if key in position and label is not None])
            indices = np.array(sorted({position[key] for key, _ in listed if key in position}), dtype=np.int64)
            overlap = seen & set(indices.tolist())
            if overlap:
                raise ValueError(f"split file {path} repeats {len(overlap)} {self.item_noun}s of another split file")
            seen |= set(indices.tolist())
            parts[name] = indices
        if len(seen) < len(position):
            log.info("%s: %d cached %ss are in no split file: left out", self.title, len(position) - len(seen),
                     self.item_noun)
        if "val" not in parts:
            parts.update(self.carve_val(parts["train"], labels))
        return parts

    # -- datasets --------------------------------------------------------------------------------------------------

    def split_datasets(self, parts: Mapping[str, np.ndarray],
                       dataset: Callable[[np.ndarray, bool], Dataset]) -> dict[str, Dataset]:
        """``{"train", "val", "test"}`` datasets from ``dataset(indices, train)``, augmenting training only, plus
        ``train_eval`` (the training items without augmentation) when training is augmented."""
        datasets = {name: dataset(parts[name], name == "train" and self.augment) for name in SPLIT_NAMES}
        if self.augment:
            datasets["train_eval"] = dataset(parts["train"], False)
        return datasets
