"""The preparation of a data set that is a published list of YouTube clips (VGGSound, MM-Debiased): every listed
clip the download holds becomes a cache item (an audio array and frames at 1 fps, :func:`~datamodules.clips.
write_clip`), with the report, ``clips.csv``, ``missing_clips.txt`` (the listed clips the download lacks) and
``meta.json`` (with the list's classes)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.clips import clip_cached, clips_csv, write_clip
from datamodules.preparation import (
    atomic_write_text,
    check_params,
    finish,
    not_a_directory,
    PrepareReport,
    remove_stale_temporaries,
    report_reason,
    run_items,
)
from datamodules.youtube import ListedClip, ListScan, clip_key


@dataclass(frozen=True)
class ListedDataSet:
    """What a list-based data set's preparation needs to know of it.

    Args:
        name: its ``dataset`` in ``meta.json`` and ``balance-prepare`` name.
        title: its name in messages.
        list_file: the list's file name, for the report.
        sample_rate: the audio's rate.
        features: the audio array of a mono wave at ``sample_rate`` (a module-level function: workers get it).
        params: the audio parameters, recorded and checked when resuming.
        audio_shape: the array's shape, recorded in ``meta.json``.
        version: the cache's version.
        scan_raw: reads the list below a raw root and finds its clips: ``(listed, scan)``.
        raw_error: the error naming the raw layout, from a one-line problem.
    """

    name: str
    title: str
    list_file: str
    sample_rate: int
    features: Callable[[np.ndarray], np.ndarray]
    params: dict[str, Any]
    audio_shape: tuple[int, ...]
    version: int
    scan_raw: Callable[[Path], tuple[list[ListedClip], ListScan]]
    raw_error: Callable[[str], Exception]

    @property
    def prog(self) -> str:
        return f"balance-prepare {self.name}"


def _prepare_clip(item: str, raw: str, out: str, sample_rate: int, features: Callable, fps: float,
                  short_side: int, quality: int) -> None:
    raw_path, path = Path(raw), Path(raw) / item
    write_clip(clip_key(path.name), Path(out), path, path, sample_rate, features, fps, short_side, quality,
               reason=lambda error: report_reason(error, raw_path, path))


def _is_done(item: str, out: Path) -> bool:
    return clip_cached(clip_key(Path(item).name), out)  # the cache name of RawClip.clip


def prepare_listed(data: ListedDataSet, raw: str | Path, out: str | Path, workers: int | None = None,
                   fps: float = 1.0, short_side: int = 224, quality: int = 95) -> PrepareReport:
    """Prepares the cache ``out`` from the list and the clips below ``raw``; resumable.

    Clips whose audio and frames both exist are skipped; every clip that fails (unreadable audio or video, no audio
    stream, found twice) is listed with its reason in ``OUT/prepare_report.txt``; the listed clips the download
    lacks are counted there and listed in ``OUT/missing_clips.txt``. Exits with status 1 when no usable clip is
    left, 2 when ``out`` was prepared with other parameters.
    """
    raw, out = Path(raw).expanduser().resolve(), Path(out).expanduser().resolve()
    if (problem := not_a_directory(raw)) is not None:
        raise data.raw_error(problem)
    listed, scan = data.scan_raw(raw)
    params = {**data.params, "sample_rate": data.sample_rate, "fps": float(fps), "short_side": int(short_side),
              "jpeg_quality": int(quality)}
    check_params(out, params, data.prog)
    remove_stale_temporaries(out / "audio", out / "visual")
    work = functools.partial(_prepare_clip, raw=str(raw), out=str(out), sample_rate=data.sample_rate,
                             features=data.features, fps=fps, short_side=short_side, quality=quality)
    run = run_items([c.path for c in scan.clips], work, is_done=functools.partial(_is_done, out=out),
                    workers=workers, desc=f"{data.title}: preparing clips")
    report = PrepareReport(ok=run.ok, done=run.done, failed=scan.failed + run.failed)
    ready = set(run.ok + run.done)
    usable = [c for c in scan.clips if c.path in ready]
    if usable:
        atomic_write_text(out / "clips.csv", clips_csv(usable, out))
    atomic_write_text(out / "missing_clips.txt", "".join(f"{key}\n" for key in scan.missing))
    details = [f"raw: {raw} ({data.list_file}: {len(listed)} clips; {len(scan.clips)} found)", f"out: {out}",
               f"listed but not in the raw download: {len(scan.missing)} clips (missing_clips.txt)",
               f"video files the list does not name: {scan.unlisted} (skipped)"]
    if scan.missing:
        print(f"{data.prog}: {len(scan.missing)} of the {len(listed)} listed clips are not in {raw} "
              f"(listed in {out / 'missing_clips.txt'})")
    finish(report, out, data.prog, details, usable=len(usable))  # exits 1 if nothing is usable
    splits = sorted({row.split for row in listed})
    meta = {"dataset": data.name, "version": data.version, "params": params,
            "classes": sorted({row.label for row in listed}), "audio_shape": list(data.audio_shape),
            "num_clips": len(usable), "num_listed": len(listed),
            "clips_per_split": {s: sum(c.split == s for c in usable) for s in splits},
            "num_missing": len(scan.missing), "num_failed": len(report.failed)}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return report
