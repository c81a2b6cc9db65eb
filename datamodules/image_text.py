"""What the image + text datamodules (UPMC Food-101, MVSA-Single) share: the dataset and the datamodule base that
read the cache written by :mod:`datamodules.image_text_prepare`, and the training vocabulary. The cache's word ids
only encode the text: the model's vocabulary is built here from the words of the training split alone (those seen
``min_count`` times or more), as a remapping of the stored ids, so it is training-only for every split and seed,
and changing ``min_count`` needs no new preparation.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.cache import PreparedCacheDataModule
from datamodules.image_text_prepare import CACHE_VERSION
from datamodules.image_text_raw import ImageTextSource, read_split_file
from datamodules.preparation import missing_cache_error
from datamodules.text import PAD_ID, UNK_ID, Vocabulary
from datamodules.transforms import frame_transform

log = logging.getLogger(__name__)

CACHE_FILES = ("meta.json", "items.csv", "words.json", "tokens.npy", "lengths.npy", "images")


def training_vocabulary(words: Vocabulary, train_tokens: np.ndarray, min_count: int) -> tuple[Vocabulary, np.ndarray]:
    """The vocabulary of the training texts and the map from cache ids to its ids.

    Args:
        words: the cache's word table (``words.json``).
        train_tokens: the cache ids of the training texts (``[n, L]``, 0 = padding).
        min_count: words seen fewer times in ``train_tokens`` map to unknown.

    Returns:
        ``(vocabulary, remap)``: the vocabulary :meth:`Vocabulary.build` gives on the same token sequences
        (descending count, ties alphabetical), and ``remap[cache id] = vocabulary id`` (unknown for the others).
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts = np.bincount(train_tokens.ravel(), minlength=len(words))
    counts[[PAD_ID, UNK_ID]] = 0  # not words
    kept = sorted(np.flatnonzero(counts >= min_count).tolist(), key=lambda i: (-counts[i], words.itos[i]))
    remap = np.full(len(words), UNK_ID, dtype=np.int32)
    remap[PAD_ID] = PAD_ID
    remap[kept] = np.arange(2, 2 + len(kept), dtype=np.int32)
    return Vocabulary([words.itos[i] for i in kept]), remap


class ImageTextDataset(Dataset):
    """Items ``{"inputs": {"visual": [3, S, S], "text": LongTensor[L]}, "label": int}`` from the cache.

    Args:
        image_dir: the cache's ``images/``.
        items: the item names (``images/<item>.jpg``).
        tokens: ``int [n, L]`` token ids (the model's vocabulary, 0 = padding).
        labels: class indices.
        image_size: side of the square image.
        train: random resized crop + horizontal flip; otherwise resize + centre crop.
    """

    def __init__(self, image_dir: Path, items: Sequence[str], tokens: np.ndarray, labels: Sequence[int],
                 image_size: int, train: bool) -> None:
        self.image_dir = Path(image_dir)
        self.items = list(items)
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.transform = frame_transform(image_size, train)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        image = decode_jpeg(read_file(str(self.image_dir / f"{self.items[index]}.jpg")), mode=ImageReadMode.RGB)
        return {"inputs": {"visual": self.transform(image), "text": self.tokens[index]},
                "label": int(self.labels[index])}


class ImageTextDataModule(PreparedCacheDataModule):
    """Base of the image + text datamodules: reads the prepared cache, builds the training vocabulary, serves
    ``{"visual": [3, S, S], "text": LongTensor[max_length]}``.

    A subclass sets ``source`` and ``num_classes`` (the full data set's; the cache's class list replaces it in
    ``setup``) and ``split_choices``, and implements :meth:`split_indices`.

    Args:
        root: the prepared cache (``balance-prepare <name> --raw RAW --out OUT``; ``OUT`` here).
        split: one of the subclass's ``split_choices`` (default: the first); ``files`` (implied by
            ``split_files``) reads user-supplied split files.
        split_files: ``{"train": path, "test": path}`` (optionally ``"val"``, or MMBT's ``"dev"``), or a list
            ``[train, test]`` / ``[train, val, test]``; MMBT jsonl or MLA txt (see
            :func:`~datamodules.image_text_raw.read_split_file`). Without a val file, validation is carved from the
            training file (stratified, ``val_fraction``).
        val_fraction: fraction in validation.
        max_length: tokens per text (longer texts are truncated, shorter padded with 0); at most the cache's
            ``--max-length``.
        min_count: training-split word count below which a word maps to unknown.
        image_size: side of the square image fed to the model.
        augment: random resized crop + horizontal flip on training images; evaluation always uses resize + centre
            crop.
        **kwargs: the base datamodule's arguments (``batch_size``, ``num_workers``, ``seed``, ...).
    """

    modalities = ["visual", "text"]
    item_noun = "item"
    cache_version = CACHE_VERSION
    cache_files = CACHE_FILES
    source: ImageTextSource

    def __init__(self, root: str | None = None, split: str | None = None, max_length: int = 64, min_count: int = 1,
                 **kwargs) -> None:
        super().__init__(root=root, split=split, **kwargs)
        if max_length < 1 or min_count < 1:
            raise ValueError(f"max_length and min_count must be >= 1, got {max_length} and {min_count}")
        self.max_length = max_length
        self.min_count = min_count
        self.classes: list[str] = []
        self.vocab: Vocabulary | None = None
        self.split_items: dict[str, list[str]] = {}

    @property
    def title(self) -> str:
        return self.source.title

    @property
    def cache_name(self) -> str:
        return self.source.name

    @property
    def encoder_kwargs(self) -> dict[str, dict[str, int]]:
        if self.vocab is None:
            raise RuntimeError("the vocabulary is built in setup(): call it before reading encoder_kwargs")
        return {"text": {"vocab_size": len(self.vocab)}}

    # -- the cache -------------------------------------------------------------------------------------------------

    def _missing_error(self, problem: str) -> FileNotFoundError:
        source = self.source
        return missing_cache_error(
            problem, title=source.title, root=self.root,
            looks_raw=self.root is not None and (self.root / source.raw_marker).exists(), command=source.command,
            raw_layout=source.raw_layout, cache_layout=source.cache_layout, obtained=f"from {source.source}",
            prepare=f"balance-prepare {source.name}")

    def _read_cache(self) -> tuple[list[dict[str, str]], np.ndarray, np.ndarray, Vocabulary]:
        with open(self.root / "items.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        tokens = np.load(self.root / "tokens.npy")
        if len(tokens) != len(rows):
            raise self._missing_error(f"{self.root}/tokens.npy has {len(tokens)} rows for {len(rows)} items")
        if self.max_length > tokens.shape[1]:
            raise ValueError(f"data.max_length={self.max_length} exceeds the {tokens.shape[1]} tokens per text "
                             f"stored in {self.root}: lower it or prepare again with --max-length")
        lost = [r["item"] for r in rows if not (self.root / "images" / f"{r['item']}.jpg").is_file()]
        if lost:
            raise self._missing_error(f"{len(lost)} items of {self.root}/items.csv have no image (e.g. {lost[:3]}); "
                                      "re-run the preparation, it resumes")
        index = {name: i for i, name in enumerate(self.classes)}
        labels = np.array([index[r["label"]] for r in rows], dtype=np.int64)
        return rows, labels, tokens[:, : self.max_length], Vocabulary.load(self.root / "words.json")

    # -- splits ----------------------------------------------------------------------------------------------------

    def split_indices(self, rows: list[dict[str, str]], labels: np.ndarray) -> dict[str, np.ndarray]:
        """``{"train", "val", "test"}`` -> row indices of ``items.csv`` for ``self.split``."""
        raise NotImplementedError

    def split_by_files(self, rows: list[dict[str, str]], labels: np.ndarray) -> dict[str, np.ndarray]:
        """The split given by ``split_files``; labels that differ from the cache's are reported as warnings (the
        cache's are used)."""

        def check_labels(path: str, listed: list[tuple[str, str, int]]) -> None:
            differ = [item for item, label, index in listed if rows[index]["label"] != label]
            if differ:
                log.warning("%s: %d labels of %s differ from the cache's (e.g. %s); the cache's are used",
                            self.title, len(differ), path, differ[:3])

        return self.file_split({row["item"]: i for i, row in enumerate(rows)}, labels, read_split_file,
                               check_labels)

    # -- datasets --------------------------------------------------------------------------------------------------

    def build_datasets(self) -> dict[str, Dataset]:
        meta = self._check_root()
        self.classes = list(meta["classes"])
        self.num_classes = len(self.classes)
        rows, labels, tokens, words = self._read_cache()
        parts = self.split_indices(rows, labels)
        self.vocab, remap = training_vocabulary(words, tokens[parts["train"]], self.min_count)
        tokens = remap[tokens]
        self.split_items = {name: [rows[i]["item"] for i in idx] for name, idx in parts.items()}

        return self.split_datasets(parts, lambda idx, train: ImageTextDataset(
            self.root / "images", [rows[i]["item"] for i in idx], tokens[idx], labels[idx], self.image_size, train))
