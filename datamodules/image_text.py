"""What the image + text data sets (UPMC Food-101, MVSA-Single) share: their cache, its preparation, the dataset
and the datamodule base.

The cache (``cache_layout``) holds every usable image re-encoded as a JPEG with a short side of 256 and every text
cleaned, tokenised (``datamodules.text.tokenize``) and stored as ids into ``words.json``, the table of every word
of the cached texts. These ids only encode the text: the model's vocabulary is built by the datamodule from the
words of its training split alone (those seen ``min_count`` times or more), as a remapping of the stored ids, so
it is training-only for every split and seed, and changing ``min_count`` needs no new preparation.

Items are named by their image's file stem (``apple_pie_0``, ``4869``): ``images/<item>.jpg`` and the ``item``
column of ``items.csv``, whose row ``i`` is row ``i`` of ``tokens.npy``.
"""

from __future__ import annotations

import csv
import functools
import html
import json
import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.cache import PreparedCacheDataModule
from datamodules.media import MediaError, check_file, resized_size
from datamodules.preparation import (
    prepare_parser,
    run_prepare_command,
    missing_cache_error,
    PrepareReport,
    atomic_output,
    atomic_write_text,
    check_params,
    finish,
    remove_stale_temporaries,
    run_items,
)
from datamodules.text import PAD_ID, UNK_ID, Vocabulary, tokenize
from datamodules.transforms import frame_transform

log = logging.getLogger(__name__)

CACHE_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
CACHE_FILES = ("meta.json", "items.csv", "words.json", "tokens.npy", "lengths.npy", "images")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)


@dataclass(frozen=True)
class ImageTextSource:
    """How one image + text data set is named, obtained and laid out (for its command and its error messages).

    Args:
        name: the module and ``balance-prepare`` name, also ``meta.json``'s ``dataset``.
        title: the data set's name in messages.
        source: where the data set is obtained.
        raw_layout: the raw download's layout, as shown to users.
        raw_marker: a path that only the raw download has (to tell a user who points ``data.root`` at it).
        columns: the ``items.csv`` columns besides ``item``, ``label`` and ``text``.
    """

    name: str
    title: str
    source: str
    raw_layout: str
    raw_marker: str
    columns: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        return f"balance-prepare {self.name} --raw RAW --out OUT"

    @property
    def cache_layout(self) -> str:
        columns = ",".join(("item", "label", *self.columns, "text"))
        return f"""\
OUT/
  meta.json            parameters, classes and counts (written last: marks a complete cache)
  items.csv            {columns}: one row per usable pair (text: the cleaned text)
  images/<item>.jpg    the image, short side 256 (--short-side), JPEG quality 95
  words.json           every word of the cached texts (alphabetical): the ids of tokens.npy
  tokens.npy           int32 [N, 128 (--max-length)]: row i = the first tokens of row i's text, 0-padded
  lengths.npy          int32 [N]: the token count of every text before truncation
  prepare_report.txt   what the last preparation did, every failed item with its reason
  prepare_params.json  the parameters, checked when resuming"""

    def raw_error(self, problem: str) -> FileNotFoundError:
        """The error for an unusable raw download: the problem, the expected layout and the source."""
        return FileNotFoundError(f"{self.title} raw download: {problem}. Expected layout:\n{self.raw_layout}\n"
                                 f"Obtain the data set from {self.source}; nothing is downloaded automatically.")


# ---------------------------------------------------------------------------------------------------------------
# Text


def decode_text(data: bytes) -> str:
    """Decodes text of unknown encoding: UTF-8 (a BOM dropped), else Windows-1252, else Latin-1 (never fails).

    Tweets and scraped pages come in all three; Windows-1252 before Latin-1 reads curly quotes and dashes right.
    """
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def clean_text(text: str) -> str:
    """HTML entities decoded, URLs dropped, Unicode compatibility-normalised (NFKC), whitespace collapsed."""
    text = unicodedata.normalize("NFKC", html.unescape(text))
    return " ".join(_URL.sub(" ", text).split())


# ---------------------------------------------------------------------------------------------------------------
# Preparation


@dataclass
class Pair:
    """One image + text pair to cache.

    Args:
        image: the image's path relative to the raw download; its stem names the item.
        label: the class name.
        text: the cleaned text.
        columns: values of the data set's extra ``items.csv`` columns.
    """

    image: str
    label: str
    text: str
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def item(self) -> str:
        return Path(self.image).stem


def _cached_image(out: Path, image: str) -> Path:
    return out / "images" / f"{Path(image).stem}.jpg"


def convert_image(image: str, raw: str, out: str, short_side: int, quality: int) -> None:
    """Writes ``OUT/images/<stem>.jpg``: the raw image decoded, as RGB, resized to ``short_side`` (0 keeps the
    size) and re-encoded as JPEG; raises :class:`MediaError` with the reason for a missing, empty or corrupt one."""
    from PIL import Image

    path = Path(raw) / image
    # The report names the image already: the reasons leave its path out.
    try:
        check_file(path)
        with Image.open(path) as opened:
            picture = opened.convert("RGB")  # decodes every pixel: truncated or corrupt data raises here
    except MediaError as error:
        raise MediaError(str(error).replace(f"{path}: ", "")) from None
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise MediaError(f"unreadable image ({type(error).__name__}: {error})") from None
    size = resized_size(picture.width, picture.height, short_side)
    if size != picture.size:
        picture = picture.resize(size, Image.BICUBIC)
    with atomic_output(_cached_image(Path(out), image)) as temp:
        picture.save(temp, format="JPEG", quality=quality)


def _image_done(image: str, out: Path) -> bool:
    return _cached_image(out, image).is_file()


def _length_summary(lengths: np.ndarray, max_length: int) -> str:
    if len(lengths) == 0:
        return "texts: none"
    return (f"text length in tokens: median {int(np.median(lengths))}, 95th percentile "
            f"{int(np.percentile(lengths, 95))}, max {int(lengths.max())}; {int((lengths == 0).sum())} empty; "
            f"{int((lengths > max_length).sum())} truncated to --max-length {max_length}")


def write_cache(
    source: ImageTextSource,
    raw: Path,
    out: Path,
    pairs: Sequence[Pair],
    classes: Sequence[str],
    report: PrepareReport,
    params: dict[str, Any],
    details: Sequence[str] = (),
    workers: int | None = None,
) -> PrepareReport:
    """Converts the pairs' images (resumably), tokenises their texts and writes the cache (``cache_layout``).

    Args:
        source: the data set.
        raw: the raw download.
        out: the cache directory.
        pairs: the pairs to cache, in ``items.csv`` order; their image stems must be unique.
        classes: the class names, in label-index order.
        report: failures found before (missing counterparts, malformed rows); the image conversions are added.
        params: the preparation parameters, with ``short_side``, ``jpeg_quality`` and ``max_length``; refused if
            ``out`` was prepared with others (exit 2).
        details: report lines about the raw download.
        workers: processes for the images (default: all cores).

    Returns:
        The report; exits with status 1 (after writing the report) if no pair is usable.
    """
    prog = f"balance-prepare {source.name}"
    check_params(out, params, prog)
    remove_stale_temporaries(out / "images")
    work = functools.partial(convert_image, raw=str(raw), out=str(out), short_side=params["short_side"],
                             quality=params["jpeg_quality"])
    run = run_items([p.image for p in pairs], work, is_done=functools.partial(_image_done, out=out),
                    workers=workers, desc=f"{source.title}: converting images")
    report.ok, report.done, report.failed = run.ok, run.done, report.failed + run.failed

    converted = set(run.ok) | set(run.done)
    usable = [p for p in pairs if p.image in converted]
    max_length = params["max_length"]
    token_lists = [tokenize(p.text) for p in usable]
    lengths = np.array([len(tokens) for tokens in token_lists], dtype=np.int32)
    if usable:
        # Every word gets an id; the model's vocabulary is chosen later, from the training split.
        words = Vocabulary(sorted({token for tokens in token_lists for token in tokens}))
        ids = np.zeros((len(usable), max_length), dtype=np.int32)
        for row, tokens in enumerate(token_lists):
            kept = [words.stoi[t] for t in tokens[:max_length]]
            ids[row, : len(kept)] = kept
        _write_items(out / "items.csv", usable, source.columns)
        atomic_write_text(out / "words.json", json.dumps(words.to_dict(), ensure_ascii=False))
        for name, array in (("tokens.npy", ids), ("lengths.npy", lengths)):
            with atomic_output(out / name) as temp:
                np.save(temp, array)
    counts = {name: sum(p.label == name for p in usable) for name in classes}
    details = [f"raw: {raw}", f"out: {out}", *details, f"images that could not be converted: {len(run.failed)}",
               _length_summary(lengths, max_length),
               "usable pairs per class: " + ", ".join(f"{name} {n}" for name, n in counts.items())]
    finish(report, out, prog, details, usable=len(usable))  # exits 1 if nothing is usable
    meta = {"dataset": source.name, "version": CACHE_VERSION, "params": params, "classes": list(classes),
            "num_items": len(usable), "num_failed": len(report.failed), "class_counts": counts}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return report


def _write_items(path: Path, pairs: Sequence[Pair], columns: Sequence[str]) -> None:
    with atomic_output(path) as temp, open(temp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["item", "label", *columns, "text"])
        for p in pairs:
            writer.writerow([p.item, p.label, *(p.columns[c] for c in columns), p.text])


# ---------------------------------------------------------------------------------------------------------------
# Split files


def read_split_file(path: str | Path) -> list[tuple[str, str]]:
    """Reads a user-supplied split file; returns ``[(item, label name), ...]``.

    Two community formats, detected per line:

    - MMBT's jsonl: ``{"id": ..., "label": "positive", "text": ..., "img": "data/123.jpg"}`` per line; the item is
      the stem of ``img`` (of ``id`` without ``img``).
    - MLA's txt (``my_train_mvsa.txt``, ``my_train_food.txt``): ``123.jpg positive``, ``apple_pie_0.jpg apple_pie``.
    """
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                entry = json.loads(line)
                name, label = entry.get("img") or entry["id"], entry["label"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{path}:{number}: not an MMBT jsonl row with img/id and label ({error})") from None
        else:
            fields = line.replace(",", " ").split()
            if len(fields) < 2:
                raise ValueError(f"{path}:{number}: expected `<image> <label>` (MLA) or a jsonl row (MMBT), "
                                 f"got {line!r}")
            name, label = fields[0], fields[1]
        rows.append((Path(str(name)).stem, str(label).strip().lower()))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Dataset and datamodule


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


def prepare_command(source: ImageTextSource, description: str, prepare: Callable[..., PrepareReport],
                    argv: Sequence[str] | None = None) -> None:
    """The ``balance-prepare <name>`` command of an image + text data set: parses ``--raw --out --workers
    --short-side --jpeg-quality --max-length`` and calls ``prepare(raw, out, workers, short_side, quality,
    max_length)``."""
    parser = prepare_parser(source.name, description, source.raw_layout, source.cache_layout, source.source,
                            short_side=256)
    parser.add_argument("--max-length", type=int, default=128, help="tokens stored per text (default 128)")
    args = parser.parse_args(argv)
    run_prepare_command(parser, source.name, args.out, lambda: prepare(
        args.raw, args.out, args.workers, args.short_side, args.jpeg_quality, args.max_length))


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
            ``[train, test]`` / ``[train, val, test]``; MMBT jsonl or MLA txt (see :func:`read_split_file`).
            Without a val file, validation is carved from the training file (stratified, ``val_fraction``).
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

