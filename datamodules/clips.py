"""The clip cache the video data sets share (``audio/<clip>.npy``, ``visual/<clip>/*.jpg``, or other modalities'
folders in the same layout): writing one audio-visual clip into it, and reading items from it or from its packs
(:mod:`datamodules.clip_packs`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
    """Whether the audio-visual cache ``out`` holds both the audio and the frames of ``clip`` (the preparations'
    check of a clip done: :meth:`ClipDataset.cached`)."""
    return ClipDataset.cached(out, clip)


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


def read_frame(root: Path, clip: str, k: int, folder: str = "visual", gray: bool = False) -> torch.Tensor:
    """Frame ``k`` of ``clip`` in the cache ``root`` (``<folder>/<clip>/0000k.jpg``), decoded: ``uint8 [3, H, W]``,
    or ``[1, H, W]`` for ``gray``."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    path = root / folder / clip / f"{k:05d}.jpg"
    return decode_jpeg(read_file(str(path)), mode=ImageReadMode.GRAY if gray else ImageReadMode.RGB)


@dataclass(frozen=True)
class FrameModality:
    """A modality of frames in a clip cache: the folders (``<folder>/<clip>/00000.jpg, ...``, the same frame
    numbers in each) whose images are stacked along channels, and the transform of its items.

    Args:
        folders: the cache folders, in channel order.
        gray: the images are read as one grey channel each (e.g. the two components of optical flow), else RGB.
        transform: ``transform(image_size, train)`` builds the items' transform (a module-level function).
    """

    folders: tuple[str, ...]
    gray: bool = False
    transform: Callable[[int, bool], Callable[[torch.Tensor], torch.Tensor]] = frame_transform

    def read(self, root: Path, clip: str, k: int) -> torch.Tensor:
        """Frame ``k`` of ``clip``: ``uint8 [C, H, W]`` (3 channels per RGB folder, 1 per grey one)."""
        images = [read_frame(root, clip, k, folder, self.gray) for folder in self.folders]
        return images[0] if len(images) == 1 else torch.cat(images)

    def cached(self, root: Path, clip: str) -> bool:
        """Whether the cache ``root`` holds the clip's frames in every folder."""
        return all((root / folder / clip).is_dir() for folder in self.folders)


#: the RGB frames of the audio-visual caches (``visual/<clip>/``)
VISUAL = FrameModality(("visual",))


def clips_csv(clips: Sequence[Any], out: Path, columns: Sequence[str] = ("label", "split"),
              frame_folder: str = "visual") -> str:
    """``clips.csv`` of prepared clips: ``clip``, each of ``columns`` (attributes of every clip) and ``frames``,
    the number of frames in ``out/<frame_folder>/<clip>/``."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["clip", *columns, "frames"])
    for c in clips:
        writer.writerow([c.clip, *(getattr(c, name) for name in columns),
                         len(list((out / frame_folder / c.clip).glob("*.jpg")))])
    return text.getvalue()


class ClipDataset(Dataset):
    """Items ``{"inputs": {"audio": [1, F, T_audio], "visual": [T, 3, S, S]}, "label": int}`` from a clip cache.

    The cache layout the audio-visual preparations share: ``audio/<clip>.npy`` (a 2-D spectrogram or filter
    bank) and ``visual/<clip>/00000.jpg, 00001.jpg, ...`` (frames in temporal order), or the same frames decoded
    in packs with the audio arrays (:func:`~datamodules.clip_packs.clip_packs`). A subclass names other
    modalities (``array_modalities``: ``<name>/<clip>.npy``; ``frame_modalities``: :class:`FrameModality`), e.g.
    UCF-101's RGB and optical flow frames; every frame modality takes the same frame numbers.

    Training picks ``T`` of a clip's frames at random (in temporal order); evaluation takes the centres of ``T``
    equal segments (the middle frame for ``T = 1``). A clip with fewer than ``T`` frames repeats frames.

    Args:
        packs: the clips' packed frames and arrays (None: read the cache's files per item).
    """

    array_modalities: tuple[str, ...] = ("audio",)
    frame_modalities: Mapping[str, FrameModality] = {"visual": VISUAL}
    #: inputs a subclass adds to the items from elsewhere than the cache's folders (e.g. a transcript's tokens)
    other_modalities: tuple[str, ...] = ()

    def __init__(self, root: Path, clips: Sequence[str], labels: Sequence[int], frames: Sequence[int],
                 num_frames: int, image_size: int, train: bool, packs: ClipPacks | None = None) -> None:
        self.root = Path(root)
        self.packs = packs
        self.clips = list(clips)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.frames = np.asarray(frames)
        self.num_frames = num_frames
        self.train = train
        self.transforms = {name: spec.transform(image_size, train) for name, spec in self.frame_modalities.items()}

    @classmethod
    def modality_names(cls) -> list[str]:
        """The items' inputs, in order: the arrays, the frame modalities, then the others."""
        return [*cls.array_modalities, *cls.frame_modalities, *cls.other_modalities]

    @classmethod
    def cached(cls, root: Path, clip: str) -> bool:
        """Whether the cache ``root`` holds every modality of ``clip``."""
        return all((root / name / f"{clip}.npy").is_file() for name in cls.array_modalities) and \
            all(spec.cached(root, clip) for spec in cls.frame_modalities.values())

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
        inputs = {}
        for name in self.array_modalities:
            array = self.packs.arrays[name][clip] if self.packs is not None else \
                np.load(self.root / name / f"{clip}.npy")
            inputs[name] = self._array(name, torch.from_numpy(array).float().unsqueeze(0))
        for name, spec in self.frame_modalities.items():
            if self.packs is not None:
                # A copy of just these frames, [T, C, H, W] in channels-last memory (index_select: indexing with a
                # list costs ten times as much).
                stored = torch.from_numpy(self.packs.frames[name][clip])
                frames = stored.index_select(0, torch.as_tensor(indices)).permute(0, 3, 1, 2)
            else:
                frames = torch.stack([spec.read(self.root, clip, k) for k in indices])
            inputs[name] = self.transforms[name](frames)
        return {"inputs": inputs, "label": int(self.labels[index])}

    def _array(self, name: str, array: torch.Tensor) -> torch.Tensor:
        """The item's ``name`` input from the cached array ``[1, ...]`` (a subclass may cut a window)."""
        return array
