"""The AVE preparation, ``balance-prepare ave --raw RAW --out OUT``: for every event of the official splits, PMR's
audio input from the event's seconds of its video (:func:`log_spectrogram`) and the frames of those seconds at
1 fps, with the report, ``events.csv`` and ``meta.json`` (with the 28 categories)."""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.ave_raw import ANNOTATIONS, RAW_LAYOUT, SOURCE, VIDEO_DIR, Event, raw_error, scan_raw
from datamodules.clips import clip_cached, write_clip
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
PROG = "balance-prepare ave"
COMMAND = f"{PROG} --raw RAW --out OUT"
SAMPLE_RATE = 16000
SECONDS = 10  # PMR tiles every event's audio to 10 s
NPERSEG = 512
NOVERLAP = 353
AUDIO_SHAPE = (NPERSEG // 2 + 1, (SAMPLE_RATE * SECONDS - NPERSEG) // (NPERSEG - NOVERLAP) + 1)  # (257, 1004)
CACHE_LAYOUT = """\
OUT/
  meta.json                 preparation parameters, the 28 categories and counts (written last: a complete cache)
  events.csv                event,video,category,split,start,end,frames: one row per usable event
  audio/<event>.npy         float16 [257, 1004] standardised log power spectrogram of the event's seconds
  visual/<event>/00000.jpg  the frames of the event's seconds at 1 fps, in order
  prepare_report.txt        what the last preparation did, every failed event with its reason
  prepare_params.json       the parameters, checked when resuming
<event> is <VideoID>_<start>_<end>."""


def log_spectrogram(wave: np.ndarray) -> np.ndarray:
    """PMR's AVE audio input from an event's 16 kHz mono wave: ``float32 [257, 1004]``.

    The wave repeated to 10 s and cut there, clipped to [-1, 1], scipy's power spectral density spectrogram with
    512-sample segments overlapping by 353 (its default Tukey window, constant detrending, density scaling),
    ``log(S + 1e-7)``, then standardised by the spectrogram's own mean and standard deviation.
    """
    from scipy import signal

    length = SAMPLE_RATE * SECONDS
    if len(wave) == 0:
        raise ValueError("empty waveform")
    tiled = np.clip(np.tile(wave, -(-length // len(wave)))[:length], -1.0, 1.0)
    _, _, spectrogram = signal.spectrogram(tiled, SAMPLE_RATE, nperseg=NPERSEG, noverlap=NOVERLAP)
    spectrogram = np.log(np.abs(spectrogram) + 1e-7)
    return ((spectrogram - spectrogram.mean()) / (spectrogram.std() + 1e-9)).astype(np.float32)


def parse_event(key: str) -> tuple[str, int, int]:
    """``(video, start, end)`` of an event's cache name ``<VideoID>_<start>_<end>`` (video ids hold ``_`` too)."""
    video, start, end = key.rsplit("_", 2)
    return video, int(start), int(end)


def _prepare_event(key: str, raw: str, out: str, fps: float, short_side: int, quality: int) -> None:
    video, start, end = parse_event(key)
    path = Path(raw) / VIDEO_DIR / f"{video}.mp4"
    write_clip(key, Path(out), path, path, SAMPLE_RATE, log_spectrogram, fps, short_side, quality,
               reason=lambda error: report_reason(error, Path(raw)), span=(start, end))


def _is_done(key: str, out: Path) -> bool:
    return clip_cached(key, out)


def _events_csv(events: Sequence[tuple[Event, str]], out: Path) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["event", "video", "category", "split", "start", "end", "frames"])
    for event, split in events:
        writer.writerow([event.key, event.video, event.category, split, event.start, event.end,
                         len(list((out / "visual" / event.key).glob("*.jpg")))])
    return text.getvalue()


def prepare(raw: str | Path, out: str | Path, workers: int | None = None, fps: float = 1.0, short_side: int = 224,
            quality: int = 95) -> PrepareReport:
    """Prepares the cache (``CACHE_LAYOUT``) from the download (``RAW_LAYOUT``); resumable.

    Events whose spectrogram and frames both exist are skipped; every event that fails (its video missing or
    unreadable, no audio stream, listed twice or not annotated) is listed with its reason in
    ``OUT/prepare_report.txt``. Exits with status 1 when no usable event is left, 2 when ``out`` was prepared with
    other parameters.
    """
    raw, out = Path(raw).expanduser().resolve(), Path(out).expanduser().resolve()
    if (problem := not_a_directory(raw)) is not None:
        raise raw_error(problem)
    scan = scan_raw(raw)
    params = {"sample_rate": SAMPLE_RATE, "resampling": "kaiser_best", "channels": "mean", "seconds": SECONDS,
              "spectrogram": "scipy.signal.spectrogram", "nperseg": NPERSEG, "noverlap": NOVERLAP,
              "standardise": "per spectrogram", "span": "event seconds", "fps": float(fps),
              "short_side": int(short_side), "jpeg_quality": int(quality)}
    check_params(out, params, PROG)
    remove_stale_temporaries(out / "audio", out / "visual")
    work = functools.partial(_prepare_event, raw=str(raw), out=str(out), fps=fps, short_side=short_side,
                             quality=quality)
    run = run_items([event.key for event, _ in scan.events], work, is_done=functools.partial(_is_done, out=out),
                    workers=workers, desc="AVE: preparing events")
    report = PrepareReport(ok=run.ok, done=run.done, failed=scan.failed + run.failed)
    ready = set(run.ok + run.done)
    usable = [(event, split) for event, split in scan.events if event.key in ready]
    if usable:
        atomic_write_text(out / "events.csv", _events_csv(usable, out))
    details = [f"raw: {raw} ({len(scan.events)} events of the split files with a video; {ANNOTATIONS}: "
               f"{len(scan.categories)} categories)", f"out: {out}"]
    finish(report, out, PROG, details, usable=len(usable))  # exits 1 if nothing is usable
    meta = {"dataset": "ave", "version": CACHE_VERSION, "params": params, "classes": scan.categories,
            "audio_shape": list(AUDIO_SHAPE), "num_events": len(usable),
            "events_per_split": {s: sum(split == s for _, split in usable) for s in ("train", "val", "test")},
            "num_failed": len(report.failed)}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """``balance-prepare ave --raw RAW --out OUT [--workers N] [--fps 1] [--short-side 224]``."""
    parser = prepare_parser("ave", "Prepare AVE (AVE_Dataset/: the videos, Annotations.txt and the split files) into "
                            "event spectrograms and 1 fps frames.",
                            RAW_LAYOUT, CACHE_LAYOUT, SOURCE, short_side=224, fps=1.0)
    args = parser.parse_args(argv)
    run_prepare_command(parser, "ave", args.out, lambda: prepare(
        args.raw, args.out, args.workers, args.fps, args.short_side, args.jpeg_quality))
