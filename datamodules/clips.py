"""The clip cache the audio-visual data sets share (``audio/<clip>.npy``, ``visual/<clip>/*.jpg``): writing one
clip into it, and reading items from it or from its packs (:mod:`datamodules.clip_packs`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.media import MediaError
from datamodules.preparation import atomic_output
from datamodules.transforms import frame_transform

if TYPE_CHECKING:
    from datamodules.clip_packs import ClipPacks


class ClipError(MediaError):
    """One clip's audio and/or video could not be prepared (reported with its message only)."""


def clip_cached(clip: str, out: Path) -> bool:
    """Whether the cache ``out`` holds both the audio and the frames of ``clip``."""
    return (out / "audio" / f"{clip}.npy").is_file() and (out / "visual" / clip).is_dir()


def write_clip(clip: str, out: Path, audio: Path, video: Path, sample_rate: int,
               features: Callable[[np.ndarray], np.ndarray], fps: float, short_side: int, quality: int,
               reason: Callable[[Exception], str] = str, span: tuple[float, float] | None = None) -> None:
    """Writes ``audio/<clip>.npy`` (``features`` of the mono wave at ``sample_rate``, as float16) and
    ``visual/<clip>/`` (``fps`` frames a second, JPEG), whichever the cache lacks.

    Args:
        reason: shortens an error's message for the report (e.g. drops the raw root from paths).
        span: ``(start, end)`` seconds: only this part of the clip (the wave from ``start`` to ``end``, the frames
            of the seconds ``start`` to ``end``, both included, as AVE's event segments are read).

    Raises:
        ClipError: naming each part that failed, after writing the other.
    """
    from datamodules.media import extract_frames, read_audio, save_frames

    problems = []
    audio_out = out / "audio" / f"{clip}.npy"
    if not audio_out.exists():
        try:
            wave, _ = read_audio(audio, sample_rate)
            if span is not None:
                wave = wave[int(span[0] * sample_rate):int(span[1] * sample_rate)]
                if not len(wave):
                    raise ValueError(f"no audio from second {span[0]:g} to {span[1]:g}")
            array = features(wave).astype(np.float16)
            with atomic_output(audio_out) as temp:
                np.save(temp, array)
        except (MediaError, ValueError) as error:
            problems.append(f"audio: {reason(error)}")
    frames_out = out / "visual" / clip
    if not frames_out.is_dir():
        try:
            images = extract_frames(video, fps=fps, short_side=short_side)
            if span is not None:
                images = [image for k, image in enumerate(images) if span[0] <= k / fps <= span[1]]
                if not images:
                    raise MediaError(f"no frame from second {span[0]:g} to {span[1]:g}")
            with atomic_output(frames_out, directory=True) as temp:
                save_frames(images, temp, quality=quality)
        except MediaError as error:
            problems.append(f"video: {reason(error)}")
    if problems:
        raise ClipError("; ".join(problems))


def read_frame(root: Path, clip: str, k: int) -> torch.Tensor:
    """Frame ``k`` of ``clip`` in the cache ``root`` (``visual/<clip>/0000k.jpg``), decoded: ``uint8 [3, H, W]``."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    return decode_jpeg(read_file(str(root / "visual" / clip / f"{k:05d}.jpg")), mode=ImageReadMode.RGB)


def clips_csv(clips: Sequence[Any], out: Path) -> str:
    """``clips.csv`` of labelled clips (each with ``clip``, ``label`` and ``split``): ``clip,label,split,frames``, the
    frames counted in the cache ``out``."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["clip", "label", "split", "frames"])
    for c in clips:
        writer.writerow([c.clip, c.label, c.split, len(list((out / "visual" / c.clip).glob("*.jpg")))])
    return text.getvalue()


class ClipDataset(Dataset):
    """Items ``{"inputs": {"audio": [1, F, T_audio], "visual": [T, 3, S, S]}, "label": int}`` from a clip cache.

    The cache layout the audio-visual preparations share: ``audio/<clip>.npy`` (a 2-D spectrogram or filter
    bank) and ``visual/<clip>/00000.jpg, 00001.jpg, ...`` (frames in temporal order), or the same frames decoded
    in packs with the audio arrays (:func:`~datamodules.clip_packs.clip_packs`).

    Training picks ``T`` of a clip's frames at random (in temporal order); evaluation takes the centres of ``T``
    equal segments (the middle frame for ``T = 1``). A clip with fewer than ``T`` frames repeats frames.

    Args:
        packs: the clips' packed frames and audio (None: read the cache's files per item).
    """

    def __init__(self, root: Path, clips: Sequence[str], labels: Sequence[int], frames: Sequence[int],
                 num_frames: int, image_size: int, train: bool, packs: ClipPacks | None = None) -> None:
        self.root = Path(root)
        self.packs = packs
        self.clips = list(clips)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.frames = np.asarray(frames)
        self.num_frames = num_frames
        self.train = train
        self.transform = frame_transform(image_size, train)

    def __len__(self) -> int:
        return len(self.clips)

    def _frame_indices(self, available: int) -> list[int]:
        t = self.num_frames
        if self.train and available >= t:
            return sorted(torch.randperm(available)[:t].tolist())
        if self.train:
            return sorted(torch.randint(available, (t,)).tolist())
        return [min(available - 1, int((k + 0.5) * available / t)) for k in range(t)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = self.clips[index]
        indices = self._frame_indices(int(self.frames[index]))
        if self.packs is not None:
            audio = torch.from_numpy(self.packs.audio[clip]).float().unsqueeze(0)
            # A copy of just these frames, [T, 3, H, W] in channels-last memory (index_select: indexing with a list
            # costs ten times as much).
            stored = torch.from_numpy(self.packs.frames[clip])
            frames = stored.index_select(0, torch.as_tensor(indices)).permute(0, 3, 1, 2)
        else:
            audio = torch.from_numpy(np.load(self.root / "audio" / f"{clip}.npy")).float().unsqueeze(0)
            frames = torch.stack([read_frame(self.root, clip, k) for k in indices])
        return {"inputs": {"audio": self._audio(audio), "visual": self.transform(frames)},
                "label": int(self.labels[index])}

    def _audio(self, audio: torch.Tensor) -> torch.Tensor:
        """The item's audio from the cached array ``[1, ...]`` (a subclass may cut a window)."""
        return audio
