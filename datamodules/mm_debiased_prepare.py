"""The MM-Debiased preparation, ``balance-prepare mm_debiased --raw RAW --out OUT``: for every clip of
``MM-Debiased.json`` the download holds, the Kinetics-Sounds audio input the valuation paper's code reads for it
(:func:`~datamodules.kinetics_sounds_media.log_mel_fbank`, OGM-GE's Kinetics-Sounds preprocessing, to which its
README refers) and the frames at 1 fps (:func:`~datamodules.listed_prepare.prepare_listed`)."""

from __future__ import annotations

from collections.abc import Sequence

from datamodules.kinetics_sounds_media import AUDIO_SHAPE, FBANK_PARAMS, SAMPLE_RATE, log_mel_fbank
from datamodules.listed_prepare import ListedDataSet, prepare_listed
from datamodules.mm_debiased_raw import LIST_FILE, RAW_LAYOUT, SOURCE, raw_error, scan_raw
from datamodules.preparation import prepare_parser, run_prepare_command

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
    params=FBANK_PARAMS,
    audio_shape=AUDIO_SHAPE, version=CACHE_VERSION, scan_raw=scan_raw, raw_error=raw_error)


def main(argv: Sequence[str] | None = None) -> None:
    """``balance-prepare mm_debiased --raw RAW --out OUT [--workers N] [--fps 1] [--short-side 224]``."""
    parser = prepare_parser("mm_debiased", "Prepare MM-Debiased (MM-Debiased.json and its VGGSound and Kinetics-400 "
                            "clips) into fbanks and 1 fps frames.",
                            RAW_LAYOUT, CACHE_LAYOUT, SOURCE, short_side=224, fps=1.0)
    args = parser.parse_args(argv)
    run_prepare_command(parser, "mm_debiased", args.out, lambda: prepare_listed(
        MM_DEBIASED, args.raw, args.out, args.workers, args.fps, args.short_side, args.jpeg_quality))
