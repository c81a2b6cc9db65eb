"""Reading audio and video for the preparation commands of the audio-visual data sets.

- :func:`read_audio`: a waveform from a sound file (soundfile) or from the audio stream of a video container
  (PyAV), mixed to mono and optionally resampled (torchaudio).
- :func:`extract_frames`: frames at a fixed rate (the first frame at or after each ``k / fps`` seconds), resized so
  that the short side has a given length; :func:`save_frames` writes them as ``00000.jpg``, ``00001.jpg``, ...

Every reader raises :class:`MediaError` naming the file and the cause when a file is missing, empty, corrupt, a Git
LFS pointer instead of the media, or has no stream of the requested kind, so that preparation commands can report
it and go on.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Containers whose audio soundfile (libsndfile) reads; anything else goes through PyAV (video containers, m4a, ...).
SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au", ".snd", ".w64", ".caf"}
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"

# Parameters under which torchaudio's sinc resampler matches resampy's ``kaiser_best`` (librosa < 0.10's default
# ``res_type``, used by the reference loaders when they call ``librosa.load(path, sr=22050)``); from the torchaudio
# resampling tutorial.
KAISER_BEST = {
    "lowpass_filter_width": 64,
    "rolloff": 0.9475937167399596,
    "resampling_method": "sinc_interp_kaiser",
    "beta": 14.769656459379492,
}


class MediaError(RuntimeError):
    """A media file that cannot be used: missing, empty, corrupt, a Git LFS pointer, or without the stream asked for."""


def check_file(path: str | Path) -> Path:
    """Raises :class:`MediaError` if ``path`` is missing, empty or a Git LFS pointer; returns it as a ``Path``."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise MediaError(f"{path}: empty file")
    if size < 1024:
        with open(path, "rb") as f:
            if f.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX:
                raise MediaError(f"{path}: a Git LFS pointer, not the media (run `git lfs pull` in the clone)")
    return path


def _to_mono(wave: np.ndarray) -> np.ndarray:
    """``[samples]`` or ``[samples, channels]`` -> ``[samples]`` (mean over channels, as librosa's ``mono=True``)."""
    return wave.mean(axis=1) if wave.ndim == 2 else wave


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # soundfile.LibsndfileError (a RuntimeError) and friends
        raise MediaError(f"{path}: unreadable audio ({type(error).__name__}: {error})") from error
    return _to_mono(wave), int(rate)


def _read_av_audio(path: Path) -> tuple[np.ndarray, int]:
    import av

    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: no audio stream")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.rate
            # One packed float32 mono stream whatever the codec's native sample format and layout.
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except MediaError:
        raise
    except Exception as error:  # av.FFmpegError and subclasses (InvalidDataError, ...), OSError
        raise MediaError(f"{path}: unreadable audio ({type(error).__name__}: {error})") from error
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), int(rate)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int, quality: str = "kaiser_best") -> np.ndarray:
    """Resamples a mono waveform with torchaudio.

    Args:
        wave: ``float32 [samples]``.
        orig_rate: its sample rate.
        new_rate: the target sample rate.
        quality: ``"kaiser_best"`` (the parameters matching resampy's, librosa < 0.10's default) or ``"default"``
            (torchaudio's defaults: faster, slightly less steep).
    """
    if orig_rate == new_rate:
        return wave
    import torch

    with torch.no_grad():
        out = _resampler(orig_rate, new_rate, quality)(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)))
    return out.numpy()


@functools.lru_cache(maxsize=16)
def _resampler(orig_rate: int, new_rate: int, quality: str):
    """A torchaudio ``Resample`` whose filter bank is computed once per rate pair (the costly part at kaiser_best)."""
    import torchaudio

    if quality not in ("kaiser_best", "default"):
        raise ValueError(f"unknown resampling quality {quality!r}: choose kaiser_best or default")
    return torchaudio.transforms.Resample(orig_rate, new_rate, **(KAISER_BEST if quality == "kaiser_best" else {}))


def read_audio(
    path: str | Path, sample_rate: int | None = None, backend: str = "auto", quality: str = "kaiser_best"
) -> tuple[np.ndarray, int]:
    """Reads a mono ``float32`` waveform in [-1, 1] (before any resampling).

    Args:
        path: a sound file, or a video/audio container with an audio stream.
        sample_rate: resample to this rate (``None`` keeps the file's).
        backend: ``"soundfile"``, ``"av"`` (PyAV, for audio inside a video container), or ``"auto"``: soundfile for
            the suffixes in :data:`SOUNDFILE_SUFFIXES`, PyAV otherwise. A sound file that soundfile cannot read is
            reported as corrupt rather than handed to PyAV, which decodes almost anything.
        quality: see :func:`resample`.

    Returns:
        ``(wave [samples], rate)``.

    Raises:
        MediaError: missing, empty, LFS pointer, corrupt, no audio stream, or no samples.
    """
    path = check_file(path)
    if backend == "auto":
        backend = "soundfile" if path.suffix.lower() in SOUNDFILE_SUFFIXES else "av"
    if backend == "soundfile":
        wave, rate = _read_soundfile(path)
    elif backend == "av":
        wave, rate = _read_av_audio(path)
    else:
        raise ValueError(f"unknown audio backend {backend!r}: choose auto, soundfile or av")
    if len(wave) == 0:
        raise MediaError(f"{path}: no audio samples")
    if not np.isfinite(wave).all():
        raise MediaError(f"{path}: audio holds NaN or infinite samples")
    if sample_rate is not None and sample_rate != rate:
        wave, rate = resample(wave, rate, sample_rate, quality), sample_rate
    return np.ascontiguousarray(wave, dtype=np.float32), rate


def resized_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """``(width, height)`` scaled so that the shorter one is ``short_side`` (unchanged if ``None`` or 0)."""
    if not short_side:
        return width, height
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def video_frames(path: str | Path, fps: float = 1.0) -> Iterator[tuple[Any, bool]]:
    """Every decoded frame of a video (a PyAV ``VideoFrame``) with whether it is one of the frames kept at ``fps``
    frames per second.

    Frame ``k`` kept is the first decoded frame whose timestamp is at or after ``k / fps`` seconds (from the
    stream's first timestamp, with half a frame of tolerance for rounded timestamps), so at 1 fps: the first frame
    of every second, the frames the reference preprocessing (OGM-GE) keeps.

    Raises:
        MediaError: missing, empty, LFS pointer, corrupt, no video stream, or no decodable frame.
    """
    import av

    path = check_file(path)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    kept = decoded = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            start = None
            for index, frame in enumerate(container.decode(stream)):
                time = frame.time if frame.time is not None else index / rate
                if start is None:
                    start = time
                decoded += 1
                # Half a frame of tolerance: rounded timestamps (FLV's milliseconds) can land just below k / fps.
                keep = time - start + 0.5 / rate >= kept / fps
                kept += keep
                yield frame, keep
    except MediaError:
        raise
    except Exception as error:  # av.FFmpegError and subclasses, OSError
        raise MediaError(f"{path}: unreadable video ({type(error).__name__}: {error})") from error
    if not decoded:
        raise MediaError(f"{path}: no decodable video frame")


def frame_image(frame: Any, short_side: int | None) -> Any:
    """A decoded PyAV frame as an RGB PIL image whose short side is ``short_side`` pixels (bicubic; ``None`` or 0
    keeps the size)."""
    from PIL import Image

    image = frame.to_image()
    size = resized_size(image.width, image.height, short_side)
    return image.resize(size, Image.BICUBIC) if size != image.size else image


def extract_frames(
    path: str | Path, fps: float = 1.0, short_side: int | None = 224, max_frames: int | None = None
) -> list:
    """Frames of a video at ``fps`` frames per second (those :func:`video_frames` keeps), as RGB PIL images.

    Args:
        path: the video file.
        fps: frames kept per second.
        short_side: resize so that the shorter side has this many pixels (bicubic); ``None`` or 0 keeps the size.
        max_frames: stop after this many frames (``None``: the whole video).

    Raises:
        MediaError: missing, empty, LFS pointer, corrupt, no video stream, or no decodable frame.
    """
    images = []
    frames = video_frames(path, fps)
    for frame, keep in frames:
        if keep:
            images.append(frame_image(frame, short_side))
            if max_frames is not None and len(images) >= max_frames:
                frames.close()
                break
    return images


def save_frames(images: list, directory: str | Path, quality: int = 95) -> list[Path]:
    """Writes ``images`` as ``directory/00000.jpg``, ``00001.jpg``, ...; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, image in enumerate(images):
        path = directory / f"{k:05d}.jpg"
        image.save(path, format="JPEG", quality=quality)
        paths.append(path)
    return paths


def tiled_log_stft(wave: np.ndarray, length: int, n_fft: int, hop_length: int) -> np.ndarray:
    """OGM-GE's audio input from a mono waveform: ``float32 [n_fft // 2 + 1, 1 + length // hop_length]``.

    The wave repeated until it has ``length`` samples and cut there (OGM-GE tiles short clips), clipped to [-1, 1],
    STFT with a periodic Hann window, centred with reflect padding (``librosa.stft``'s defaults before librosa
    0.10, OGM-GE's environment), ``log(|S| + 1e-7)``.
    """
    import torch

    if len(wave) == 0:
        raise ValueError("empty waveform")
    tiled = np.tile(wave, -(-length // len(wave)))[:length]
    tiled = np.clip(tiled, -1.0, 1.0).astype(np.float32)
    spectrum = torch.stft(torch.from_numpy(tiled), n_fft=n_fft, hop_length=hop_length, window=torch.hann_window(n_fft),
                          center=True, pad_mode="reflect", return_complex=True)
    return torch.log(spectrum.abs() + 1e-7).numpy()
