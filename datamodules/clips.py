"""The clip cache that CREMA-D, Kinetics-Sounds and IEMOCAP share (``audio/<clip>.npy``, ``visual/<clip>/*.jpg``):
writing one clip into it, its frames decoded once into a pack (:mod:`datamodules.packed`), and reading items."""

from __future__ import annotations

import fcntl
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from datamodules.cache import PreparedCacheDataModule
from datamodules.media import MediaError
from datamodules.packed import Pack, write_pack
from datamodules.preparation import atomic_output
from datamodules.transforms import frame_transform

log = logging.getLogger(__name__)

#: where training reads frames from: decoded once into a memory-mapped pack, or the cache's JPEG files per item
FRAME_STORES = ("decoded", "jpeg")


class ClipError(MediaError):
    """One clip's audio and/or video could not be prepared (reported with its message only)."""


def clip_cached(clip: str, out: Path) -> bool:
    """Whether the cache ``out`` holds both the audio and the frames of ``clip``."""
    return (out / "audio" / f"{clip}.npy").is_file() and (out / "visual" / clip).is_dir()


def write_clip(clip: str, out: Path, audio: Path, video: Path, sample_rate: int,
               features: Callable[[np.ndarray], np.ndarray], fps: float, short_side: int, quality: int,
               reason: Callable[[Exception], str] = str) -> None:
    """Writes ``audio/<clip>.npy`` (``features`` of the mono wave at ``sample_rate``, as float16) and
    ``visual/<clip>/`` (``fps`` frames a second, JPEG), whichever the cache lacks.

    Args:
        reason: shortens an error's message for the report (e.g. drops the raw root from paths).

    Raises:
        ClipError: naming each part that failed, after writing the other.
    """
    from datamodules.media import extract_frames, read_audio, save_frames

    problems = []
    audio_out = out / "audio" / f"{clip}.npy"
    if not audio_out.exists():
        try:
            wave, _ = read_audio(audio, sample_rate)
            array = features(wave).astype(np.float16)
            with atomic_output(audio_out) as temp:
                np.save(temp, array)
        except (MediaError, ValueError) as error:
            problems.append(f"audio: {reason(error)}")
    frames_out = out / "visual" / clip
    if not frames_out.is_dir():
        try:
            images = extract_frames(video, fps=fps, short_side=short_side)
            with atomic_output(frames_out, directory=True) as temp:
                save_frames(images, temp, quality=quality)
        except MediaError as error:
            problems.append(f"video: {reason(error)}")
    if problems:
        raise ClipError("; ".join(problems))


def _decoded_frames(root: Path, clips: Sequence[str], counts: Sequence[int]) -> Iterator[tuple[str, np.ndarray]]:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    for clip, count in zip(tqdm(clips, desc="decoding frames into the pack", unit="clip", dynamic_ncols=True),
                           counts):
        directory = root / "visual" / clip
        images = [decode_jpeg(read_file(str(directory / f"{k:05d}.jpg")), mode=ImageReadMode.RGB)
                  for k in range(int(count))]
        if len({tuple(image.shape) for image in images}) != 1:
            raise ValueError(f"the frames of {directory} differ in size; prepare the cache again, or read the JPEG "
                             "files (data.frames=jpeg)")
        yield clip, torch.stack(images).numpy()


def frame_pack(root: Path, clips: Sequence[str], counts: Sequence[int], directory: Path) -> Pack:
    """The frames of ``clips`` (``counts`` JPEG files each in ``root/visual/<clip>/``) decoded into the pack
    ``directory/frames`` (``uint8 [frames, 3, H, W]`` per clip), written on first use and again when the cache
    changes (another ``meta.json``) or holds clips the pack lacks. Runs packing the same cache at once (DDP ranks,
    parallel runs) wait for the first, which writes it."""
    cache = hashlib.sha256((root / "meta.json").read_bytes()).hexdigest()[:16] if (root / "meta.json").is_file() \
        else ""
    path = directory / "frames"

    def current() -> Pack | None:
        if not path.with_suffix(".json").is_file():
            return None
        pack = Pack(path)
        return pack if pack.source == cache and all(clip in pack for clip in clips) else None

    pack = current()
    if pack is not None:
        return pack
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = (directory / ".frames.lock").open("w")
    except OSError as error:
        raise OSError(f"cannot write the frame pack in {directory} ({error}): give a writable data.pack_dir, or "
                      "read the JPEG files per item with data.frames=jpeg") from error
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pack = current()  # another run may have written it while this one waited
        if pack is None:
            log.info("decoding the frames of %d clips into %s (once; data.frames=jpeg reads the JPEG files instead)",
                     len(clips), path.with_suffix(".bin"))
            write_pack(_decoded_frames(root, clips, counts), path, source=cache)
            pack = Pack(path)
            log.info("frame pack: %.2f GB for %d clips (the JPEG frames: %.2f GB)", pack.nbytes / 1e9, len(clips),
                     sum(f.stat().st_size for f in (root / "visual").glob("*/*.jpg")) / 1e9)
    return pack


class ClipCacheDataModule(PreparedCacheDataModule):
    """A prepared cache of clips (CREMA-D, Kinetics-Sounds, IEMOCAP), with the store training reads frames from.

    Args:
        frames: ``decoded`` (default): the frames decoded once, at the first setup, into a memory-mapped pack
            (``<pack_dir>/frames.bin``; its size is logged, and ``docs/datasets/`` gives it per data set), then read
            without decoding; ``jpeg``: each item's frames decoded from the cache's JPEG files (no extra disk).
        pack_dir: where the pack goes (default ``<root>/packed``; another directory for a read-only cache).
        **kwargs: :class:`~datamodules.cache.PreparedCacheDataModule`'s.
    """

    def __init__(self, *args: Any, frames: str = "decoded", pack_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if frames not in FRAME_STORES:
            raise ValueError(f"unknown frame store frames={frames!r}: choose {' or '.join(FRAME_STORES)}")
        self.frames = frames
        self.pack_dir = None if pack_dir is None else Path(pack_dir).expanduser()

    def frame_pack(self, clips: Sequence[str], counts: Sequence[int]) -> Pack | None:
        """The pack of the clips' decoded frames (``frames=decoded``), or None (``frames=jpeg``)."""
        if self.frames == "jpeg":
            return None
        return frame_pack(self.root, clips, counts, self.pack_dir or self.root / "packed")


class ClipDataset(Dataset):
    """Items ``{"inputs": {"audio": [1, F, T_audio], "visual": [T, 3, S, S]}, "label": int}`` from a clip cache.

    The cache layout the audio-visual preparations share: ``audio/<clip>.npy`` (a 2-D spectrogram or filter
    bank) and ``visual/<clip>/00000.jpg, 00001.jpg, ...`` (frames in temporal order), or the same frames decoded
    in a pack (:func:`frame_pack`).

    Training picks ``T`` of a clip's frames at random (in temporal order); evaluation takes the centres of ``T``
    equal segments (the middle frame for ``T = 1``). A clip with fewer than ``T`` frames repeats frames.

    Args:
        pack: the clips' decoded frames (None: decode the JPEG files per item).
    """

    def __init__(self, root: Path, clips: Sequence[str], labels: Sequence[int], frames: Sequence[int],
                 num_frames: int, image_size: int, train: bool, pack: Pack | None = None) -> None:
        self.root = Path(root)
        self.pack = pack
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
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        clip = self.clips[index]
        audio = torch.from_numpy(np.load(self.root / "audio" / f"{clip}.npy")).float().unsqueeze(0)
        indices = self._frame_indices(int(self.frames[index]))
        if self.pack is not None:
            frames = torch.from_numpy(self.pack[clip][indices])  # a copy of just these frames
        else:
            directory = self.root / "visual" / clip
            frames = torch.stack([decode_jpeg(read_file(str(directory / f"{k:05d}.jpg")), mode=ImageReadMode.RGB)
                                  for k in indices])
        return {"inputs": {"audio": audio, "visual": self.transform(frames)}, "label": int(self.labels[index])}
