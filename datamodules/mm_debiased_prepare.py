"""The MM-Debiased preparation, ``balance-prepare mm_debiased --raw RAW --out OUT``: for every clip of
``MM-Debiased.json`` the download holds, the Kinetics-Sounds audio input the valuation paper's code reads for it
(:func:`~datamodules.kinetics_sounds_media.log_mel_fbank`, OGM-GE's Kinetics-Sounds preprocessing, to which its
README refers) and the frames at 1 fps (:func:`~datamodules.listed_prepare.prepare_listed`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from datamodules.kinetics_sounds_media import (
    AUDIO_SHAPE,
    FRAME_SHIFT_MS,
    NORM_MEAN,
    NORM_STD,
    NUM_MEL_BINS,
    SAMPLE_RATE,
    TARGET_FRAMES,
    log_mel_fbank,
)
from datamodules.listed_prepare import ListedDataSet, prepare_listed
from datamodules.mm_debiased_raw import LIST_FILE, RAW_LAYOUT, SOURCE, raw_error, scan_raw
from datamodules.preparation import PrepareReport, not_a_directory, prepare_parser, run_prepare_command

CACHE_VERSION = 1
PROG = "balance-prepare mm_debiased"
COMMAND = f"{PROG} --raw RAW --out OUT"
CACHE_LAYOUT = """\
OUT/
  meta.json                 preparation parameters, the list's 10 classes and counts (written last)
  clips.csv                 clip,label,split,frames: one row per usable clip (split: train, val or test)
  missing_clips.txt         the clips MM-Debiased.json lists that the raw download lacks, one a line
  audio/<clip>.npy          float16 [1024, 128] normalised log-mel fbank (time x mel), as for Kinetics-Sounds
  visual/<clip>/00000.jpg   frames at 1 fps (00000.jpg = second 0, 00001.jpg = second 1, ...)
  prepare_report.txt        what the last preparation did, every failed clip with its reason
  prepare_params.json       the parameters, checked when resuming"""
MM_DEBIASED = ListedDataSet(
    name="mm_debiased", title="MM-Debiased", list_file=LIST_FILE, sample_rate=SAMPLE_RATE, features=log_mel_fbank,
    params={"resampling": "kaiser_best", "channels": "mean", "remove_mean": True, "num_mel_bins": NUM_MEL_BINS,
            "frame_shift_ms": FRAME_SHIFT_MS, "target_frames": TARGET_FRAMES, "norm_mean": NORM_MEAN,
            "norm_std": NORM_STD},
    audio_shape=AUDIO_SHAPE)


def prepare(raw: str | Path, out: str | Path, workers: int | None = None, fps: float = 1.0, short_side: int = 224,
            quality: int = 95) -> PrepareReport:
    """Prepares the cache (``CACHE_LAYOUT``) from the list and the clips (``RAW_LAYOUT``); resumable (see
    :func:`~datamodules.listed_prepare.prepare_listed`)."""
    raw, out = Path(raw).expanduser().resolve(), Path(out).expanduser().resolve()
    if (problem := not_a_directory(raw)) is not None:
        raise raw_error(problem)
    listed, scan = scan_raw(raw)
    return prepare_listed(MM_DEBIASED, raw, out, listed, scan, CACHE_VERSION, workers, fps, short_side, quality)


def main(argv: Sequence[str] | None = None) -> None:
    """``balance-prepare mm_debiased --raw RAW --out OUT [--workers N] [--fps 1] [--short-side 224]``."""
    parser = prepare_parser("mm_debiased", "Prepare MM-Debiased (MM-Debiased.json and its VGGSound and Kinetics-400 "
                            "clips) into fbanks and 1 fps frames.", RAW_LAYOUT, CACHE_LAYOUT, SOURCE, short_side=224)
    parser.add_argument("--fps", type=float, default=1.0, help="frames kept per second of video (default 1)")
    args = parser.parse_args(argv)
    run_prepare_command(parser, "mm_debiased", args.out, lambda: prepare(
        args.raw, args.out, args.workers, args.fps, args.short_side, args.jpeg_quality))
