"""The VGGSound preparation, ``balance-prepare vggsound --raw RAW --out OUT``: OGM-GE's audio input for every clip
(:func:`log_spectrogram`: the first 10 s of its 16 kHz mono wave, tiled if shorter, as a log-magnitude STFT, from
which training cuts OGM-GE's random 5 s window) and its frames at 1 fps, with the report, ``clips.csv`` (the
clips the raw download holds), ``missing_clips.txt`` (the listed ones it lacks) and ``meta.json`` (with the
list's classes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from datamodules.listed_prepare import ListedDataSet, prepare_listed
from datamodules.media import tiled_log_stft
from datamodules.preparation import prepare_parser, run_prepare_command
from datamodules.vggsound_raw import LIST_FILE, RAW_LAYOUT, SOURCE, raw_error, scan_raw

CACHE_VERSION = 1
PROG = "balance-prepare vggsound"
COMMAND = f"{PROG} --raw RAW --out OUT"
SAMPLE_RATE = 16000
SECONDS = 10  # OGM-GE tiles every clip to at least 10 s and draws its 5 s window within them
WINDOW_SECONDS = 5
N_FFT = 256
HOP_LENGTH = 128
AUDIO_SHAPE = (N_FFT // 2 + 1, 1 + SAMPLE_RATE * SECONDS // HOP_LENGTH)  # (129, 1251)
WINDOW = 1 + SAMPLE_RATE * WINDOW_SECONDS // HOP_LENGTH  # 626 STFT columns: OGM-GE's 5 s input
CACHE_LAYOUT = """\
OUT/
  meta.json                 preparation parameters, the list's classes and counts (written last: a complete cache)
  clips.csv                 clip,label,split,frames: one row per usable clip (clip: <youtube id>_<start>)
  missing_clips.txt         the clips vggsound.csv lists that the raw download lacks, one a line
  audio/<clip>.npy          float16 [129, 1251] log |STFT| of the first 10 s (n_fft 256, hop 128)
  visual/<clip>/00000.jpg   frames at 1 fps (00000.jpg = second 0, 00001.jpg = second 1, ...)
  prepare_report.txt        what the last preparation did, every failed clip with its reason
  prepare_params.json       the parameters, checked when resuming"""


def log_spectrogram(wave: np.ndarray) -> np.ndarray:
    """OGM-GE's VGGSound audio before its window: ``float32 [129, 1251]`` from a 16 kHz mono wave.

    OGM-GE tiles a clip shorter than 10 s (doubling it), draws a start within the first 5 s, cuts 5 s from there,
    clips to [-1, 1] and takes ``log(|STFT| + 1e-7)`` with n_fft 256 and hop 128. Every 5 s window lies within the
    first 10 s, so their STFT is stored once, and a window is its 626 columns from a start column (a start that
    is a multiple of the hop; the window's first and last column see their true neighbours instead of the
    reflected padding a separate STFT would add).
    """
    return tiled_log_stft(wave, SAMPLE_RATE * SECONDS, N_FFT, HOP_LENGTH)


VGGSOUND = ListedDataSet(
    name="vggsound", title="VGGSound", list_file=LIST_FILE, sample_rate=SAMPLE_RATE, features=log_spectrogram,
    params={"resampling": "kaiser_best", "channels": "mean", "seconds": SECONDS, "n_fft": N_FFT,
            "hop_length": HOP_LENGTH, "window": "hann", "stft_pad_mode": "reflect"},
    audio_shape=AUDIO_SHAPE, version=CACHE_VERSION, scan_raw=scan_raw, raw_error=raw_error)


def main(argv: Sequence[str] | None = None) -> None:
    """``balance-prepare vggsound --raw RAW --out OUT [--workers N] [--fps 1] [--short-side 224]``."""
    parser = prepare_parser("vggsound", "Prepare VGGSound (vggsound.csv and the clips it lists) into spectrograms "
                            "and 1 fps frames.", RAW_LAYOUT, CACHE_LAYOUT, SOURCE, short_side=224, fps=1.0)
    args = parser.parse_args(argv)
    run_prepare_command(parser, "vggsound", args.out, lambda: prepare_listed(
        VGGSOUND, args.raw, args.out, args.workers, args.fps, args.short_side, args.jpeg_quality))
