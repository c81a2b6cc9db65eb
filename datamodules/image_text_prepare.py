"""The preparation that the image + text data sets (UPMC Food-101, MVSA-Single) share: each data set's module reads
its raw download into :class:`Pair` s and hands them to :func:`write_cache`, which converts the images
(:func:`convert_image`, resumably, one work item per image), tokenises the texts and writes the cache;
:func:`prepare_command` is their ``balance-prepare <name>`` command line.

The cache (``cache_layout``) holds every usable image re-encoded as a JPEG with a short side of 256 and every text
cleaned, tokenised (``datamodules.text.tokenize``) and stored as ids into ``words.json``, the table of every word
of the cached texts. These ids only encode the text: the model's vocabulary is built by the datamodule
(:mod:`datamodules.image_text`) from the words of its training split alone.

Items are named by their image's file stem (``apple_pie_0``, ``4869``): ``images/<item>.jpg`` and the ``item``
column of ``items.csv``, whose row ``i`` is row ``i`` of ``tokens.npy``.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.image_text_raw import ImageTextSource
from datamodules.media import MediaError, check_file, resized_size
from datamodules.preparation import (
    prepare_parser,
    run_prepare_command,
    PrepareReport,
    atomic_output,
    atomic_write_text,
    check_params,
    finish,
    remove_stale_temporaries,
    run_items,
)
from datamodules.text import Vocabulary, tokenize

CACHE_VERSION = 1


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
