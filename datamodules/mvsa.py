"""MVSA-Single: 4,869 tweets (text + image) with one annotator's sentiment for the text and for the image
(Niu et al., "Sentiment Analysis on Multi-view Social Data", MMM 2016).

Labels. ``labelResultAll.txt`` gives each pair a text label and an image label (positive, neutral, negative). The
usual aggregation in the literature (e.g. MultiSentiNet, Xu and Mao, CIKM 2017) gives one label per pair:

- equal labels: that label;
- one neutral: the other label;
- one positive and one negative: inconsistent, the pair is dropped (counted and listed in the preparation report).

Classes are the three sentiments in sorted order, MLA's indices: negative 0, neutral 1, positive 2.

Preparation (once): ``balance-prepare mvsa --raw RAW --out OUT`` writes the image + text cache of
:mod:`datamodules.image_text_prepare` (images re-encoded as JPEG with a short side of 256, tweets cleaned and
tokenised); the two raw labels stay in ``items.csv``. Tweets are read whatever their encoding (UTF-8, else
Windows-1252, else Latin-1); URLs are dropped and user mentions become ``@user``.

Splits: seeded stratified train/val/test (8:1:1 by default), a pooled random split, or user-supplied split files
in MMBT's jsonl or MLA's txt format (MLA's ``my_train_mvsa.txt``/``my_test_mvsa.txt``: 1,555/519 pairs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.image_text import ImageTextDataModule
from datamodules.image_text_prepare import Pair, prepare_command, write_cache
from datamodules.image_text_raw import ImageTextSource, clean_text, decode_text
from datamodules.preparation import PrepareReport, not_a_directory
from datamodules.splits import random_split, stratified_split

CLASSES = ("negative", "neutral", "positive")
LABEL_FILE = "labelResultAll.txt"
RAW_LAYOUT = """\
RAW/                   the MVSA-Single download, unpacked (MVSA_Single/)
  labelResultAll.txt   a header line, then `<id><TAB><text label>,<image label>`, e.g. `3\tpositive,neutral`
  data/<id>.jpg        e.g. data/3.jpg
  data/<id>.txt        the tweet, e.g. data/3.txt"""
SOURCE = ImageTextSource(
    name="mvsa",
    title="MVSA-Single",
    source=("the MVSA page of the MCR lab, https://mcrlab.net/research/mvsa-sentiment-analysis-on-multi-view-"
            "social-data/ (a mirror: https://www.kaggle.com/datasets/vincemarcs/mvsasingle)"),
    raw_layout=RAW_LAYOUT,
    raw_marker=LABEL_FILE,
    columns=("text_label", "image_label"),
)
_LABEL_ROW = re.compile(r"^(\S+)\s+(\w+)\s*,\s*(\w+)$")
_MENTION = re.compile(r"@\w+")


def aggregate(text_label: str, image_label: str) -> str | None:
    """The pair's label from its text and image labels: equal -> that one; one neutral -> the other; positive
    with negative -> ``None`` (inconsistent: the pair is dropped)."""
    if text_label == image_label:
        return text_label
    if "neutral" in (text_label, image_label):
        return image_label if text_label == "neutral" else text_label
    return None


def clean_tweet(text: str) -> str:
    """:func:`~datamodules.image_text_raw.clean_text` with user mentions replaced by ``@user``."""
    return _MENTION.sub("@user", clean_text(text))


def read_labels(path: Path) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str]]]:
    """Reads ``labelResultAll.txt``: ``{id: (text label, image label)}`` and problems as ``(item, reason)``.

    The first line is a header (``ID<TAB>text,image``) when its id is not a number. Malformed lines, unknown
    labels and repeated ids are problems (the first row of an id is kept).
    """
    labels: dict[str, tuple[str, str]] = {}
    problems = []
    for number, line in enumerate(decode_text(path.read_bytes()).splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        match = _LABEL_ROW.match(line)
        if number == 1 and (match is None or not match.group(1).isdigit()):
            continue
        where = f"{LABEL_FILE}:{number}"
        if match is None:
            problems.append((where, f"malformed line (expected <id><TAB><text label>,<image label>): {line!r}"))
            continue
        sample, text_label, image_label = match.group(1), match.group(2).lower(), match.group(3).lower()
        if text_label not in CLASSES or image_label not in CLASSES:
            problems.append((where, f"unknown label in {line!r} (expected {', '.join(CLASSES)})"))
        elif sample in labels:
            problems.append((where, f"a second row for id {sample} (the first is kept)"))
        else:
            labels[sample] = (text_label, image_label)
    return labels, problems


def _id_order(sample: str) -> tuple[int, int | str]:
    return (0, int(sample)) if sample.isdigit() else (1, sample)


def prepare(
    raw: str | Path,
    out: str | Path,
    workers: int | None = None,
    short_side: int = 256,
    quality: int = 95,
    max_length: int = 128,
) -> PrepareReport:
    """Prepares the cache (``SOURCE.cache_layout``) from the raw download (``RAW_LAYOUT``); resumable.

    Pairs with inconsistent labels are dropped (counted and listed in the report's details); labelled pairs
    without their image or text, unreadable images and malformed label lines are failures with their reason in
    ``OUT/prepare_report.txt``. Exits with status 1 when no usable pair is left, 2 when ``out`` was prepared with
    other parameters.

    Args:
        raw: the raw download.
        out: the cache directory (``data.root``).
        workers: processes for the images (default: all cores).
        short_side: images are resized so that their short side has this many pixels (0 keeps the size).
        quality: JPEG quality.
        max_length: tokens stored per text (the datamodule's ``max_length`` can be at most this).
    """
    raw, out = Path(raw).expanduser().resolve(), Path(out).expanduser().resolve()
    if (problem := not_a_directory(raw)) is not None:
        raise SOURCE.raw_error(problem)
    missing = [name for name in (LABEL_FILE, "data") if not (raw / name).exists()]
    if missing:
        raise SOURCE.raw_error(f"{raw} has no {', '.join(missing)}")
    labels, problems = read_labels(raw / LABEL_FILE)
    if not labels:
        raise SOURCE.raw_error(f"{raw / LABEL_FILE} has no label rows")

    report = PrepareReport(failed=problems)
    pairs, dropped = [], []
    agreeing = one_neutral = 0
    for sample in sorted(labels, key=_id_order):
        text_label, image_label = labels[sample]
        label = aggregate(text_label, image_label)
        if label is None:
            dropped.append(f"  {sample}\t{text_label},{image_label}")
            continue
        agreeing += text_label == image_label
        one_neutral += text_label != image_label
        image, text_file = raw / "data" / f"{sample}.jpg", raw / "data" / f"{sample}.txt"
        if not image.is_file() or not text_file.is_file():
            for path, what in ((image, "image"), (text_file, "text")):
                if not path.is_file():
                    report.failed.append((f"data/{path.name}", f"no {what}: no such file (pair {sample} is labelled)"))
            continue
        pairs.append(Pair(f"data/{sample}.jpg", label, clean_tweet(decode_text(text_file.read_bytes())),
                          {"text_label": text_label, "image_label": image_label}))
    unlabelled = {p.stem for p in (raw / "data").iterdir() if p.suffix in (".jpg", ".txt")} - set(labels)

    details = [
        f"{LABEL_FILE}: {len(labels)} labelled pairs: {agreeing} with equal labels, {one_neutral} with one neutral "
        f"label, {len(dropped)} dropped as inconsistent (one positive, one negative)",
        f"ids in data/ without a label row (not used): {len(unlabelled)}",
    ]
    if dropped:
        details += [f"dropped as inconsistent ({len(dropped)}): id<TAB>text,image", *dropped]
    params = {"short_side": int(short_side), "jpeg_quality": int(quality), "max_length": int(max_length)}
    return write_cache(SOURCE, raw, out, pairs, CLASSES, report, params, details, workers)


def prepare_main(argv: Sequence[str] | None = None) -> None:
    """``balance-prepare mvsa --raw RAW --out OUT [--workers N] [--short-side 256] [--max-length 128]``."""
    prepare_command(SOURCE, "Prepare MVSA-Single (labelResultAll.txt, data/<id>.jpg, data/<id>.txt) into resized JPEGs and "
                    "token ids, with one label per pair.", prepare, argv)


class MVSADataModule(ImageTextDataModule):
    """MVSA-Single from the prepared cache: image ``[3, S, S]`` + tweet token ids ``[max_length]``, 3 classes.

    The vocabulary is built from the training split's tweets only (``encoder_kwargs`` gives the text encoder its
    size).

    Args:
        root: the prepared cache (``balance-prepare mvsa --raw RAW --out OUT``; ``OUT`` here).
        split: ``stratified`` (seeded, class-stratified train/val/test), ``random`` (pooled: shuffle and cut, not
            stratified) or ``files`` (``split_files``; implied when they are given).
        test_fraction: fraction in test (unused with ``files``); ``val_fraction`` (default 0.1) is in validation.
        **kwargs: :class:`~datamodules.image_text.ImageTextDataModule`'s arguments (``split_files``,
            ``val_fraction``, ``max_length``, ``min_count``, ``image_size``, ``augment``) and the base
            datamodule's (``batch_size``, ``num_workers``, ``seed``, ...).
    """

    source = SOURCE
    num_classes = len(CLASSES)
    split_choices = ("stratified", "random", "files")

    def __init__(self, root: str | None = None, split: str | None = None, test_fraction: float = 0.1,
                 **kwargs) -> None:
        super().__init__(root=root, split=split, **kwargs)
        if not 0 < test_fraction < 1 - self.val_fraction:
            raise ValueError(f"test_fraction must be in (0, 1 - val_fraction), got {test_fraction}")
        self.test_fraction = test_fraction

    def split_indices(self, rows: list[dict[str, str]], labels: np.ndarray) -> dict[str, np.ndarray]:
        if self.split == "files":
            return self.split_by_files(rows, labels)
        fractions = {"train": 1 - self.val_fraction - self.test_fraction, "val": self.val_fraction,
                     "test": self.test_fraction}
        if self.split == "random":
            return random_split(len(rows), fractions, self.seed)
        return stratified_split(labels, fractions, self.seed)
