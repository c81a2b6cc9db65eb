"""UPMC Food-101: food photos paired with the title of the recipe web page they were found on, 101 classes
(Wang et al., "Recipe recognition with large multimodal food dataset", ICME workshops 2015).

Preparation (once): ``balance-prepare food101 --raw RAW --out OUT`` turns the download (``RAW_LAYOUT``) into the
image + text cache of :mod:`datamodules.image_text_prepare`: images re-encoded as JPEG with a short side of 256,
texts cleaned and tokenised, and each pair's part of the official train/test split in the ``part`` column of
``items.csv``. Images without a text row, text rows without an image, and unreadable images are counted and listed
in ``OUT/prepare_report.txt``.

Classes: the image folder names (``images/{train,test}/<class>/``), sorted: ``apple_pie`` is 0, ``waffles`` 100
(MMBT's and MLA's order). A cache made from a subset of the folders has that many classes.

Splits: the official train/test, with validation carved from train (stratified, seeded) by default; or
user-supplied split files in MMBT's jsonl or MLA's txt format (``my_train_food.txt``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.image_text import ImageTextDataModule
from datamodules.image_text_prepare import Pair, prepare_command, write_cache
from datamodules.image_text_raw import IMAGE_SUFFIXES, ImageTextSource, clean_text, decode_text
from datamodules.preparation import PrepareReport, not_a_directory

PARTS = ("train", "test")
RAW_LAYOUT = """\
RAW/                               the UPMC Food-101 download (or its Kaggle mirror), unpacked
  images/train/<class>/<file>.jpg  e.g. images/train/apple_pie/apple_pie_0.jpg
  images/test/<class>/<file>.jpg
  texts/train_titles.csv           rows `image file,text,class` without a header, e.g.
  texts/test_titles.csv              apple_pie_0.jpg,"Apple Pie Recipe - ...",apple_pie"""
SOURCE = ImageTextSource(
    name="food101",
    title="UPMC Food-101",
    source=("the UPMC Food-101 page, https://visiir.isir.upmc.fr/ (formerly http://visiir.lip6.fr/), or its "
            "Kaggle mirror https://www.kaggle.com/datasets/gianmarco96/upmcfood101"),
    raw_layout=RAW_LAYOUT,
    raw_marker="texts",
    columns=("part",),
)
# Long scraped texts exceed the csv module's default field limit (128 KiB).
CSV_FIELD_LIMIT = 1 << 30


def read_titles(path: Path, part: str) -> tuple[dict[str, tuple[str, str, int]], list[tuple[str, str]]]:
    """Reads ``texts/<part>_titles.csv``: rows ``image file,text,class`` (quoted or not, any encoding).

    A first row that does not name an image file is taken as a header. An unquoted text with commas is rejoined
    (the class is the last field).

    Returns:
        ``({image file: (text, class, line number)}, problems)``, the problems as ``(item, reason)`` for malformed
        and repeated rows (the first row of an image is kept).
    """
    csv.field_size_limit(CSV_FIELD_LIMIT)
    name = f"texts/{part}_titles.csv"
    rows: dict[str, tuple[str, str, int]] = {}
    problems = []
    reader = csv.reader(io.StringIO(decode_text(path.read_bytes()), newline=""))
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue
        image = fields[0].strip()
        if not image.lower().endswith(IMAGE_SUFFIXES) or len(fields) < 3:
            if line > 1:  # the first row may be a header
                problems.append((f"{name}:{line}", f"malformed row (expected image file,text,class): {fields[:3]}"))
            continue
        if image in rows:
            problems.append((f"{name}:{line}", f"a second row for {image} (line {rows[image][2]} is kept)"))
            continue
        rows[image] = (",".join(fields[1:-1]), fields[-1].strip(), line)
    return rows, problems


def _image_files(directory: Path) -> list[tuple[str, str]]:
    """``[(class, file name), ...]`` for ``directory/<class>/<file>``, sorted."""
    return [(class_dir.name, path.name)
            for class_dir in sorted(p for p in directory.iterdir() if p.is_dir())
            for path in sorted(class_dir.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]


def prepare(
    raw: str | Path,
    out: str | Path,
    workers: int | None = None,
    short_side: int = 256,
    quality: int = 95,
    max_length: int = 128,
) -> PrepareReport:
    """Prepares the cache (``SOURCE.cache_layout``) from the raw download (``RAW_LAYOUT``); resumable.

    Images already converted are skipped; images without a text row, text rows without an image (or with another
    class than the image's folder), and unreadable images are listed with their reason in
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
    needed = [f"images/{part}" for part in PARTS] + [f"texts/{part}_titles.csv" for part in PARTS]
    missing = [name for name in needed if not (raw / name).exists()]
    if missing:
        raise SOURCE.raw_error(f"{raw} has no {', '.join(missing)}")
    images = {part: _image_files(raw / "images" / part) for part in PARTS}
    classes = sorted({label for part in PARTS for label, _ in images[part]})
    if not classes:
        raise SOURCE.raw_error(f"no images in {raw}/images/train/<class>/ or {raw}/images/test/<class>/")

    report = PrepareReport()
    pairs, first_image = [], {}
    no_text = no_image = 0
    for part in PARTS:
        titles, problems = read_titles(raw / "texts" / f"{part}_titles.csv", part)
        report.failed += problems
        csv_name = f"texts/{part}_titles.csv"
        for label, file in images[part]:
            image = f"images/{part}/{label}/{file}"
            stem = Path(file).stem
            if file not in titles:
                no_text += 1
                report.failed.append((image, f"no text: no row for {file} in {csv_name}"))
            elif titles[file][1] != label:
                report.failed.append((image, f"class mismatch: {csv_name} line {titles[file][2]} says "
                                             f"{titles[file][1]!r}"))
            elif stem in first_image:
                report.failed.append((image, f"duplicate: {first_image[stem]} has the same name"))
            else:
                first_image[stem] = image
                pairs.append(Pair(image, label, clean_text(titles[file][0]), {"part": part}))
        for file in sorted(set(titles) - {file for _, file in images[part]}):
            _, label, line = titles[file]
            no_image += 1
            report.failed.append((f"images/{part}/{label}/{file}", f"no image: no such file (listed in {csv_name} "
                                                                    f"line {line})"))

    details = [f"images: {len(images['train'])} train, {len(images['test'])} test, {len(classes)} classes",
               f"images without text: {no_text}", f"texts without image: {no_image}"]
    params = {"short_side": int(short_side), "jpeg_quality": int(quality), "max_length": int(max_length)}
    return write_cache(SOURCE, raw, out, pairs, classes, report, params, details, workers)


def prepare_main(argv: Sequence[str] | None = None) -> None:
    """``balance-prepare food101 --raw RAW --out OUT [--workers N] [--short-side 256] [--max-length 128]``."""
    prepare_command(SOURCE, "Prepare UPMC Food-101 (images/{train,test}/<class>/, texts/{train,test}_titles.csv) into "
                    "resized JPEGs and token ids.", prepare, argv)


class Food101DataModule(ImageTextDataModule):
    """UPMC Food-101 from the prepared cache: image ``[3, S, S]`` + title token ids ``[max_length]``, 101 classes.

    The vocabulary is built from the training split's texts only (``encoder_kwargs`` gives the text encoder its
    size).

    Args:
        root: the prepared cache (``balance-prepare food101 --raw RAW --out OUT``; ``OUT`` here).
        split: ``official`` (the data set's train/test; validation is ``val_fraction`` of train, stratified and
            seeded) or ``files`` (``split_files``; implied when they are given).
        **kwargs: :class:`~datamodules.image_text.ImageTextDataModule`'s arguments (``split_files``,
            ``val_fraction``, ``max_length``, ``min_count``, ``image_size``, ``augment``) and the base
            datamodule's (``batch_size``, ``num_workers``, ``seed``, ...).
    """

    source = SOURCE
    num_classes = 101
    split_choices = ("official", "files")

    def split_indices(self, rows: list[dict[str, str]], labels: np.ndarray) -> dict[str, np.ndarray]:
        if self.split == "files":
            return self.split_by_files(rows, labels)
        part = np.array([row["part"] for row in rows])
        parts = self.carve_val(np.flatnonzero(part == "train"), labels)
        parts["test"] = np.flatnonzero(part == "test")
        return parts
