"""The Kinetics-Sounds preparation, ``balance-prepare kinetics_sounds --raw RAW --out OUT``: the per-clip worker,
:func:`prepare` (work items from the raw download's scan, the report, ``clips.csv`` and ``meta.json``) and the
command line (:func:`main`, which :mod:`datamodules.kinetics_sounds` offers ``balance-prepare`` as
``prepare_main``). It reads Kinetics-400 sorted into class folders (:data:`~datamodules.kinetics_sounds_raw.RAW_LAYOUT`;
clips of other classes are skipped and counted) and writes the cache laid out as ``CACHE_LAYOUT``: for every clip
the AST-style audio input OGM-GE uses on Kinetics-Sounds (:func:`~datamodules.kinetics_sounds_media.log_mel_fbank`:
16 kHz, Kaldi fbank with 128 mel bins, 1,024 frames of 10 ms, normalised with mean -4.503877 and std 2 x 5.141276)
and its frames at 1 fps as JPEG. Training then reads a small ``.npy`` and three JPEGs per item: no audio decoding
or fbank per epoch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

from datamodules.clips import clip_cached, clips_csv, write_clip
from datamodules.kinetics_sounds_media import AUDIO_SHAPE, FBANK_PARAMS, SAMPLE_RATE, log_mel_fbank
from datamodules.kinetics_sounds_raw import CLASSES, RAW_LAYOUT, SOURCE, RawScan, raw_error, scan_raw
from datamodules.preparation import (
    atomic_write_text,
    check_params,
    finish,
    not_a_directory,
    prepare_parser,
    PrepareReport,
    remove_stale_temporaries,
    report_reason,
    run_items,
    run_prepare_command,
)

CACHE_VERSION = 1
PROG = "balance-prepare kinetics_sounds"
COMMAND = f"{PROG} --raw RAW --out OUT"
CACHE_LAYOUT = """\
OUT/
  meta.json                 preparation parameters and counts (written last: marks a complete cache)
  clips.csv                 clip,label,split,frames: one row per usable clip (split: its raw folder, or empty)
  audio/<clip>.npy          float16 [1024, 128] normalised log-mel fbank (time x mel)
  visual/<clip>/00000.jpg   frames at 1 fps (00000.jpg = second 0, 00001.jpg = second 1, ...)
  prepare_report.txt        what the last preparation did, every failed clip with its reason, skipped classes
  prepare_params.json       the parameters, checked when resuming"""


def _prepare_clip(item: str, raw: str, out: str, fps: float, short_side: int, quality: int) -> None:
    raw_path, path = Path(raw), Path(raw) / item
    write_clip(Path(item).stem, Path(out), path, path, SAMPLE_RATE, log_mel_fbank, fps, short_side, quality,
               reason=lambda error: report_reason(error, raw_path, path))


def _is_done(item: str, out: Path) -> bool:
    return clip_cached(Path(item).stem, out)


def _details(raw: Path, out: Path, scan: RawScan) -> list[str]:
    skipped = sum(scan.other_classes.values())
    lines = [f"raw: {raw} ({scan.layout}; {len(scan.clips)} clips of Kinetics-Sounds classes)", f"out: {out}",
             f"skipped, not a Kinetics-Sounds class: {skipped} clips in {len(scan.other_classes)} folders"]
    lines += [f"  {folder}: {count}" for folder, count in sorted(scan.other_classes.items())]
    return lines


def prepare(
    raw: str | Path,
    out: str | Path,
    workers: int | None = None,
    fps: float = 1.0,
    short_side: int = 224,
    quality: int = 95,
) -> PrepareReport:
    """Prepares the cache (``CACHE_LAYOUT``) from the raw download (``RAW_LAYOUT``); resumable.

    Clips whose fbank and frames both exist are skipped; every clip that fails (missing or unreadable audio or
    video, no audio stream, duplicate name, outside a class folder) is listed with its reason in
    ``OUT/prepare_report.txt``, and the clips of classes outside Kinetics-Sounds are counted there per folder.
    Exits with status 1 when no usable clip is left, 2 when ``out`` was prepared with other parameters.

    Args:
        raw: the raw download.
        out: the cache directory (``data.root``).
        workers: processes (default: all cores).
        fps: frames kept per second of video.
        short_side: frames are resized so that their short side has this many pixels (0 keeps the size).
        quality: JPEG quality.
    """
    raw, out = Path(raw).expanduser().resolve(), Path(out).expanduser().resolve()
    if (problem := not_a_directory(raw)) is not None:
        raise raw_error(problem)
    scan = scan_raw(raw)
    params = {**FBANK_PARAMS, "fps": float(fps), "short_side": int(short_side), "jpeg_quality": int(quality)}
    check_params(out, params, PROG)
    remove_stale_temporaries(out / "audio", out / "visual")
    work = functools.partial(_prepare_clip, raw=str(raw), out=str(out), fps=fps, short_side=short_side,
                             quality=quality)
    run = run_items([c.path for c in scan.clips], work, is_done=functools.partial(_is_done, out=out),
                    workers=workers, desc="Kinetics-Sounds: preparing clips")
    report = PrepareReport(ok=run.ok, done=run.done, failed=scan.failed + run.failed)

    ready = set(run.ok + run.done)
    usable = [c for c in scan.clips if c.path in ready]
    if usable:
        atomic_write_text(out / "clips.csv", clips_csv(usable, out))
    if scan.other_classes:
        print(f"{PROG}: skipped {sum(scan.other_classes.values())} clips in {len(scan.other_classes)} folders of "
              "classes outside Kinetics-Sounds (listed in the report)")
    finish(report, out, PROG, _details(raw, out, scan), usable=len(usable))  # exits 1 if nothing is usable
    per_split = {s: sum(c.split == s for c in usable) for s in sorted({c.split for c in usable}) if s}
    meta = {"dataset": "kinetics_sounds", "version": CACHE_VERSION, "params": params, "classes": list(CLASSES),
            "audio_shape": list(AUDIO_SHAPE), "layout": scan.layout, "num_clips": len(usable),
            "clips_per_split": per_split, "num_failed": len(report.failed),
            "num_other_classes": sum(scan.other_classes.values())}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """``balance-prepare kinetics_sounds --raw RAW --out OUT [--workers N] [--fps 1] [--short-side 224]``."""
    parser = prepare_parser("kinetics_sounds", "Prepare Kinetics-Sounds (Kinetics-400 class folders of .mp4) into "
                            "fbanks and 1 fps frames.", RAW_LAYOUT, CACHE_LAYOUT, SOURCE, short_side=224, fps=1.0)
    args = parser.parse_args(argv)
    run_prepare_command(parser, "kinetics_sounds", args.out, lambda: prepare(
        args.raw, args.out, args.workers, args.fps, args.short_side, args.jpeg_quality))
