"""The media processing of the Kinetics-Sounds preparation: OGM-GE's (AST's) audio input from a clip's 16 kHz mono
waveform (a Kaldi log-mel fbank, zero-padded or cut to 1,024 frames, normalised with AudioSet statistics) and its
parameters. The frames at 1 fps are extracted by :func:`datamodules.clips.write_clip`.
"""

from __future__ import annotations

import numpy as np
import torch

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
TARGET_FRAMES = 1024  # 10.24 s of 10 ms frames: every 10 s Kinetics clip, zero-padded
FRAME_SHIFT_MS = 10
NORM_MEAN = -4.503877  # AudioSet fbank statistics (AST); OGM-GE divides by twice the std
NORM_STD = 2 * 5.141276
AUDIO_SHAPE = (TARGET_FRAMES, NUM_MEL_BINS)
MIN_SAMPLES = SAMPLE_RATE * 25 // 1000  # one 25 ms fbank window
#: the fbank's parameters, as a preparation records them (and checks them when resuming)
FBANK_PARAMS = {"sample_rate": SAMPLE_RATE, "resampling": "kaiser_best", "channels": "mean", "remove_mean": True,
                "num_mel_bins": NUM_MEL_BINS, "frame_shift_ms": FRAME_SHIFT_MS, "target_frames": TARGET_FRAMES,
                "norm_mean": NORM_MEAN, "norm_std": NORM_STD}


def log_mel_fbank(wave: np.ndarray) -> np.ndarray:
    """OGM-GE's (AST's) audio input from a 16 kHz mono waveform: ``float32 [1024, 128]`` (time x mel).

    The mean is removed, then a Kaldi fbank with 128 mel bins, 25 ms Hanning windows every 10 ms, HTK-compatible
    output, no energy and no dither; zero-padded or cut to 1,024 frames; then ``(fbank + 4.503877) / (2 *
    5.141276)``. The padding comes before the normalisation, as in OGM-GE, so padded frames hold 0.438.
    """
    from torchaudio.compliance import kaldi

    if len(wave) < MIN_SAMPLES:
        raise ValueError(f"audio of {len(wave)} samples is shorter than one 25 ms window")
    waveform = torch.from_numpy(np.asarray(wave - wave.mean(), dtype=np.float32)).unsqueeze(0)
    fbank = kaldi.fbank(waveform, htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False,
                        window_type="hanning", num_mel_bins=NUM_MEL_BINS, dither=0.0, frame_shift=FRAME_SHIFT_MS)
    fbank = torch.nn.functional.pad(fbank, (0, 0, 0, max(0, TARGET_FRAMES - len(fbank))))[:TARGET_FRAMES]
    return ((fbank - NORM_MEAN) / NORM_STD).numpy()
