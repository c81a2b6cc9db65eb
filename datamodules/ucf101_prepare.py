"""The UCF-101 preparation, ``balance-prepare ucf101 --raw RAW --out OUT``: for every listed clip its RGB frames at
1 fps and the optical flow at the same instants (computed with OpenCV, or read from precomputed TV-L1 images: see
:mod:`datamodules.optical_flow`), with the report, ``clips.csv`` (class, group and part in each official split) and
``meta.json`` (with the 101 classes in ``classInd.txt``'s order)."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

from datamodules.clips import clips_csv
from datamodules.media import MediaError, save_frames
from datamodules.optical_flow import BOUND, FARNEBACK, METHODS, flow_method, frames_and_flow, kept_frame_numbers, \
    precomputed_flow
from datamodules.preparation import (
    atomic_output,
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
from datamodules.ucf101_raw import FLOW_DIR, OFFICIAL_SPLITS, RAW_LAYOUT, SOURCE, VIDEO_DIR, RawScan, raw_error, \
    scan_raw

CACHE_VERSION = 1
PROG = "balance-prepare ucf101"
COMMAND = f"{PROG} --raw RAW --out OUT"
#: the cache's frame folders: RGB, and the two flow components
FOLDERS = ("rgb", "flow/u", "flow/v")
FLOW_CHOICES = (*METHODS, "precomputed")
CSV_COLUMNS = ("label", "group", *(f"split{s}" for s in OFFICIAL_SPLITS))
CACHE_LAYOUT = f"""\
OUT/
  meta.json                 preparation parameters, the 101 classes, the official splits found and counts (written
                            last: a complete cache)
  clips.csv                 clip,label,group,split1,split2,split3,frames: one row per usable clip, its part (train or
                            test) in each official split
  rgb/<clip>/00000.jpg      the frames at 1 fps (the first frame of every second), in order
  flow/u/<clip>/00000.jpg   the horizontal optical flow at the same frames, grey: +-{BOUND:g} pixels per frame mapped to
  flow/v/<clip>/00000.jpg   0..255 (zero motion 128); and the vertical
  prepare_report.txt        what the last preparation did, every failed clip with its reason
  prepare_params.json       the parameters, checked when resuming"""


def _is_done(video: str, out: Path) -> bool:
    return all((out / folder / Path(video).stem).is_dir() for folder in FOLDERS)


def _prepare_clip(video: str, raw: str, out: str, fps: float, short_side: int, quality: int, flow: str,
                  flow_dir: str) -> None:
    raw_path, path, clip = Path(raw), Path(raw) / VIDEO_DIR / video, Path(video).stem
    try:
        if flow == "precomputed":
            rgb, numbers = kept_frame_numbers(path, fps, short_side)
            motion = precomputed_flow(Path(flow_dir) / "u" / clip, Path(flow_dir) / "v" / clip, numbers, short_side)
        else:
            rgb, motion = frames_and_flow(path, fps, short_side, flow)
    except MediaError as error:
        raise MediaError(report_reason(error, raw_path, path).replace(f"{flow_dir}/", "")) from error
    images = {"rgb": rgb, "flow/u": [u for u, _ in motion], "flow/v": [v for _, v in motion]}
    for folder, frames in images.items():
        with atomic_output(Path(out) / folder / clip, directory=True) as temp:
            save_frames(frames, temp, quality=quality)


def _csv_rows(scan: RawScan, usable: Sequence) -> list[SimpleNamespace]:
    """The ``clips.csv`` fields of every usable clip: its class, group and part in each official split."""
    return [SimpleNamespace(clip=c.clip, label=c.label, group=c.group,
                            **{f"split{s}": scan.parts[c.clip].get(s, "") for s in OFFICIAL_SPLITS}) for c in usable]


def prepare(raw: str | Path, out: str | Path, workers: int | None = None, fps: float = 1.0, short_side: int = 224,
            quality: int = 95, flow: str = "farneback", flow_dir: str | Path | None = None) -> PrepareReport:
    """Prepares the cache (``CACHE_LAYOUT``) from the download (``RAW_LAYOUT``); resumable.

    Args:
        flow: ``farneback`` (OpenCV's, default), ``tvl1`` (OpenCV contrib's Dual TV-L1) or ``precomputed`` (the
            TV-L1 images in ``flow_dir``: ``u/<clip>/*.jpg``, ``v/<clip>/*.jpg``).
        flow_dir: where precomputed flow is (default ``RAW/tvl1_flow``).

    Clips whose frames and flow exist are skipped; every clip that fails (its video missing or unreadable, its
    precomputed flow missing, listed twice) is listed with its reason in ``OUT/prepare_report.txt``. Exits with
    status 1 when no usable clip is left, 2 when ``out`` was prepared with other parameters.
    """
    raw, out = Path(raw).expanduser().resolve(), Path(out).expanduser().resolve()
    if (problem := not_a_directory(raw)) is not None:
        raise raw_error(problem)
    if flow not in FLOW_CHOICES:
        raise ValueError(f"unknown flow {flow!r}: choose {', '.join(FLOW_CHOICES)}")
    scan = scan_raw(raw)
    flow_path = Path(flow_dir).expanduser().resolve() if flow_dir is not None else raw / FLOW_DIR
    if flow == "precomputed" and not (flow_path / "u").is_dir():
        raise raw_error(f"--flow precomputed reads {flow_path}/u/<clip>/ and {flow_path}/v/<clip>/, and there is no "
                        f"{flow_path / 'u'} (give --flow-dir DIR, or compute the flow: --flow farneback)")
    if flow != "precomputed":
        try:
            flow_method(flow)  # a missing OpenCV is one error here, not one per clip
        except ImportError as error:
            raise SystemExit(f"{PROG}: {error}") from error
    params = {"fps": float(fps), "short_side": int(short_side), "jpeg_quality": int(quality), "flow": flow,
              "flow_bound": BOUND}
    if flow == "farneback":
        params["farneback"] = list(FARNEBACK)
    check_params(out, params, PROG)
    remove_stale_temporaries(*(out / folder for folder in FOLDERS))
    work = functools.partial(_prepare_clip, raw=str(raw), out=str(out), fps=fps, short_side=short_side,
                             quality=quality, flow=flow, flow_dir=str(flow_path))
    run = run_items([c.video for c in scan.clips], work, is_done=functools.partial(_is_done, out=out),
                    workers=workers, desc="UCF-101: frames and flow")
    report = PrepareReport(ok=run.ok, done=run.done, failed=scan.failed + run.failed)
    ready = set(run.ok + run.done)
    usable = [c for c in scan.clips if c.video in ready]
    if usable:
        atomic_write_text(out / "clips.csv", clips_csv(_csv_rows(scan, usable), out, CSV_COLUMNS, frame_folder="rgb"))
    details = [f"raw: {raw} ({len(scan.clips)} listed clips with a video; official splits {scan.splits})",
               f"flow: {flow}" + (f" from {flow_path}" if flow == "precomputed" else ""), f"out: {out}"]
    finish(report, out, PROG, details, usable=len(usable))  # exits 1 if nothing is usable
    meta = {"dataset": "ucf101", "version": CACHE_VERSION, "params": params, "classes": scan.classes,
            "splits": scan.splits, "num_clips": len(usable), "num_failed": len(report.failed)}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """``balance-prepare ucf101 --raw RAW --out OUT [--workers N] [--fps 1] [--short-side 224] [--flow farneback|
    tvl1|precomputed] [--flow-dir DIR]``."""
    parser = prepare_parser("ucf101", "Prepare UCF-101 (UCF-101/ and ucfTrainTestlist/) into 1 fps RGB frames and the "
                            "optical flow at the same frames.", RAW_LAYOUT, CACHE_LAYOUT, SOURCE, short_side=224,
                            fps=1.0)
    parser.add_argument("--flow", choices=FLOW_CHOICES, default="farneback",
                        help="how the flow is made: OpenCV's Farneback (default; pip install -e \".[flow]\"), OpenCV "
                             "contrib's TV-L1 (opencv-contrib-python-headless), or read from precomputed TV-L1 images")
    parser.add_argument("--flow-dir", help=f"the precomputed flow's folder, holding u/ and v/ (default RAW/{FLOW_DIR})")
    args = parser.parse_args(argv)
    run_prepare_command(parser, "ucf101", args.out, lambda: prepare(
        args.raw, args.out, args.workers, args.fps, args.short_side, args.jpeg_quality, args.flow, args.flow_dir))
