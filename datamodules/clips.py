"""The clip cache that CREMA-D, Kinetics-Sounds and IEMOCAP share (``audio/<clip>.npy``, ``visual/<clip>/*.jpg``):
writing one clip into it, its frames decoded once into a pack (:mod:`datamodules.packed`), and reading items."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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

#: where training reads items from: memory-mapped packs of the decoded frames and the audio arrays, or the files
STORES = ("packed", "files")
#: the packs' layout; a pack of another layout is written again
PACK_VERSION = 2


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


@dataclass
class ClipPacks:
    """A clip cache's items in packs (:mod:`datamodules.packed`): each clip's decoded frames (``uint8
    [frames, H, W, 3]``: channels last, the layout torch's uint8 resize works in, which saves it a repacking copy)
    and its audio array (as cached)."""

    frames: Pack
    audio: Pack


def _decoded_frames(root: Path, clips: Sequence[str], counts: Sequence[int]) -> Iterator[tuple[str, np.ndarray]]:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    for clip, count in zip(tqdm(clips, desc="packing decoded frames", unit="clip", dynamic_ncols=True), counts):
        directory = root / "visual" / clip
        images = [decode_jpeg(read_file(str(directory / f"{k:05d}.jpg")), mode=ImageReadMode.RGB)
                  for k in range(int(count))]
        if len({tuple(image.shape) for image in images}) != 1:
            raise ValueError(f"the frames of {directory} differ in size; prepare the cache again, or read the "
                             "cache's files (data.store=files)")
        yield clip, torch.stack(images).permute(0, 2, 3, 1).contiguous().numpy()


def _audio_arrays(root: Path, clips: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    for clip in tqdm(clips, desc="packing audio arrays", unit="clip", dynamic_ncols=True):
        yield clip, np.load(root / "audio" / f"{clip}.npy")


def _check_space(root: Path, clips: Sequence[str], counts: Sequence[int], directory: Path, frames: bool,
                 audio: bool) -> None:
    """Refuses to start packs the disk cannot hold (the frames' size from the first clip's, the audio's from the
    ``.npy`` files), naming the size and the ways out."""
    from torchvision.io import decode_jpeg, read_file

    need = 0
    if frames and clips:
        first = decode_jpeg(read_file(str(root / "visual" / clips[0] / "00000.jpg")))
        need += int(sum(int(c) for c in counts) * first.numel())
    if audio:
        need += sum((root / "audio" / f"{clip}.npy").stat().st_size for clip in clips)
    free = shutil.disk_usage(directory).free
    if need > 0.95 * free:
        raise OSError(f"the packs of {len(clips)} clips need about {need / 1e9:.1f} GB, and {directory} has "
                      f"{free / 1e9:.1f} GB free: give data.pack_dir=<a larger disk>, or read the cache's files per "
                      "item with data.store=files (no extra disk, slower)")


def clip_packs(root: Path, clips: Sequence[str], counts: Sequence[int], directory: Path) -> ClipPacks:
    """The packs of ``clips`` (``counts`` JPEG frames each in ``root/visual/<clip>/``, audio in
    ``root/audio/<clip>.npy``) in ``directory`` (``frames.bin``, ``audio.bin``), written on first use and again
    when the cache changes (another ``meta.json``) or holds clips a pack lacks. Runs packing the same cache at once
    (DDP ranks, parallel runs) wait for the first, which writes them."""
    cache = hashlib.sha256((root / "meta.json").read_bytes()).hexdigest()[:16] if (root / "meta.json").is_file() \
        else ""
    cache += f":v{PACK_VERSION}"

    def current(name: str) -> Pack | None:
        path = directory / name
        if not path.with_suffix(".json").is_file():
            return None
        pack = Pack(path)
        return pack if pack.source == cache and all(clip in pack for clip in clips) else None

    if (frames := current("frames")) is not None and (audio := current("audio")) is not None:
        return ClipPacks(frames, audio)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = (directory / ".packing.lock").open("w")
    except OSError as error:
        raise OSError(f"cannot write the packs in {directory} ({error}): give a writable data.pack_dir, or read the "
                      "cache's files per item with data.store=files") from error
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Another run may have written them while this one waited.
        frames, audio = current("frames"), current("audio")
        _check_space(root, clips, counts, directory, frames is None, audio is None)
        if frames is None:
            log.info("packing the decoded frames of %d clips into %s (once; data.store=files reads the JPEG files "
                     "instead)", len(clips), directory / "frames.bin")
            write_pack(_decoded_frames(root, clips, counts), directory / "frames", source=cache)
            frames = Pack(directory / "frames")
        if audio is None:
            write_pack(_audio_arrays(root, clips), directory / "audio", source=cache)
            audio = Pack(directory / "audio")
    jpeg = sum(f.stat().st_size for f in (root / "visual").glob("*/*.jpg"))
    log.info("packs in %s: decoded frames %.2f GB (their JPEG files: %.2f GB), audio %.2f GB", directory,
             frames.nbytes / 1e9, jpeg / 1e9, audio.nbytes / 1e9)
    return ClipPacks(frames, audio)


class ClipCacheDataModule(PreparedCacheDataModule):
    """A prepared cache of clips (CREMA-D, Kinetics-Sounds, IEMOCAP), with the store training reads items from.

    Args:
        store: ``packed`` (default): the frames decoded once, at the first setup, and the audio arrays copied into
            memory-mapped packs (``<pack_dir>/frames.bin``, ``audio.bin``; their sizes are logged, and
            ``docs/datasets/`` gives them per data set), then read without opening a file or decoding an image;
            ``files``: each item read from the cache's own files (``.npy`` and JPEG; no extra disk).
        pack_dir: where the packs go (default ``<root>/packed``; another directory for a read-only cache).
        **kwargs: :class:`~datamodules.cache.PreparedCacheDataModule`'s.
    """

    def __init__(self, *args: Any, store: str = "packed", pack_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if store not in STORES:
            raise ValueError(f"unknown store={store!r}: choose {' or '.join(STORES)}")
        self.store = store
        self.pack_dir = None if pack_dir is None else Path(pack_dir).expanduser()

    def clip_packs(self, clips: Sequence[str], counts: Sequence[int]) -> ClipPacks | None:
        """The clips' packs (``store=packed``), or None (``store=files``)."""
        if self.store == "files":
            return None
        return clip_packs(self.root, clips, counts, self.pack_dir or self.root / "packed")


class ClipDataset(Dataset):
    """Items ``{"inputs": {"audio": [1, F, T_audio], "visual": [T, 3, S, S]}, "label": int}`` from a clip cache.

    The cache layout the audio-visual preparations share: ``audio/<clip>.npy`` (a 2-D spectrogram or filter
    bank) and ``visual/<clip>/00000.jpg, 00001.jpg, ...`` (frames in temporal order), or the same frames decoded
    in packs with the audio arrays (:func:`clip_packs`).

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
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

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
            directory = self.root / "visual" / clip
            frames = torch.stack([decode_jpeg(read_file(str(directory / f"{k:05d}.jpg")), mode=ImageReadMode.RGB)
                                  for k in indices])
        return {"inputs": {"audio": self._audio(audio), "visual": self.transform(frames)},
                "label": int(self.labels[index])}

    def _audio(self, audio: torch.Tensor) -> torch.Tensor:
        """The item's audio from the cached array ``[1, ...]`` (a subclass may cut a window)."""
        return audio
