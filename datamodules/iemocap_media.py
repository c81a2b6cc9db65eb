"""The media processing of the IEMOCAP preparation: the audio input (a Kaldi log-mel filter bank of an utterance's
16 kHz wav, scaled with AST's AudioSet statistics, cut or zero-padded to a fixed number of frames), the times at
which an utterance's frames are taken (the centres of equal parts of its span), and the grabbing of the frames shown
at given times from a dialog's video, decoding it once for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from datamodules.media import MediaError, check_file, resized_size

SAMPLE_RATE = 16000
MEL_BINS = 128
AUDIO_FRAMES = 1024
# AST's AudioSet filter-bank statistics: they only set the scale (a BatchNorm follows the first convolution).
FBANK_MEAN = -4.2677393
FBANK_STD = 4.5689974
# Seeking lands on the keyframe before the target and decodes from there: worth it only for a long jump ahead.
SEEK_AHEAD_SECONDS = 2.0
# A span may end a little after the last frame (the video is slightly shorter than the audio): take the last frame.
END_TOLERANCE_SECONDS = 1.0


def frame_times(start: float, end: float, count: int) -> list[float]:
    """Where the frames of an utterance are taken: the centres of ``count`` equal parts of ``[start, end]``
    (seconds in the dialog video); for ``count = 1`` the middle of the span."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if end < start:
        raise ValueError(f"the span [{start}, {end}] ends before it starts")
    return [start + (k + 0.5) * (end - start) / count for k in range(count)]


def log_mel(wave: np.ndarray, mel_bins: int = MEL_BINS, frames: int = AUDIO_FRAMES) -> np.ndarray:
    """The audio input from a 16 kHz mono waveform: ``float32 [mel_bins, frames]``.

    A Kaldi filter bank (``torchaudio.compliance.kaldi.fbank``: 25 ms Hanning windows every 10 ms, log mel
    energies, no dither so that the cache is deterministic), scaled as ``(x - FBANK_MEAN) / (2 * FBANK_STD)``, then
    cut to its first ``frames`` frames or padded at the end with zeros (the scaled mean).
    """
    from torchaudio.compliance.kaldi import fbank

    if len(wave) < SAMPLE_RATE * 25 // 1000:
        raise ValueError(f"{len(wave)} samples: shorter than one 25 ms window")
    bank = fbank(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None], sample_frequency=SAMPLE_RATE,
                 num_mel_bins=mel_bins, frame_length=25.0, frame_shift=10.0, dither=0.0, window_type="hanning",
                 htk_compat=True, use_energy=False)
    bank = (bank[:frames] - FBANK_MEAN) / (2 * FBANK_STD)
    out = torch.zeros(frames, mel_bins)
    out[: len(bank)] = bank
    return out.T.contiguous().numpy()


def grab_frames(path: str | Path, times: Sequence[float], short_side: int | None = 224) -> list:
    """The video frames shown at ``times`` (seconds), decoding the video once for all of them.

    For each time: the first frame whose timestamp is at or after it (half a frame of tolerance, as
    :func:`datamodules.media.extract_frames`). Times are visited in increasing order, decoding forward and seeking
    (PyAV, to the keyframe before the target) only for a jump of more than ``SEEK_AHEAD_SECONDS`` ahead or back.
    A time after the last frame gets the last frame if it is at most ``END_TOLERANCE_SECONDS`` after it, else
    ``None``.

    Args:
        path: the video file.
        times: the timestamps, in any order.
        short_side: resize so that the shorter side has this many pixels (bicubic); ``None`` or 0 keeps the size.

    Returns:
        One RGB PIL image (or ``None``) per time, in the order of ``times``.

    Raises:
        MediaError: missing, empty or corrupt file, or no video stream.
    """
    import av
    from PIL import Image

    path = check_file(path)
    images: list = [None] * len(times)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            half = 0.5 / float(stream.average_rate or stream.guessed_rate or 25)
            decoded, frame, exhausted = None, None, False
            for i in sorted(range(len(times)), key=lambda k: times[k]):
                target = max(0.0, float(times[i]))
                if decoded is None or (frame is not None and not frame.time - half <= target
                                       <= frame.time + SEEK_AHEAD_SECONDS):
                    container.seek(int(target / stream.time_base), stream=stream, backward=True)
                    decoded, frame, exhausted = container.decode(stream), None, False
                while not exhausted and (frame is None or frame.time + half < target):
                    following = next(decoded, None)
                    if following is None:
                        exhausted = True
                    else:
                        frame = following
                if frame is None or frame.time + half + END_TOLERANCE_SECONDS < target:
                    continue
                image = frame.to_image()
                size = resized_size(image.width, image.height, short_side)
                images[i] = image if size == image.size else image.resize(size, Image.BICUBIC)
    except MediaError:
        raise
    except Exception as error:  # av.FFmpegError and subclasses, OSError
        raise MediaError(f"{path}: unreadable video ({type(error).__name__}: {error})") from error
    return images
