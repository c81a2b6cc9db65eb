"""A clip cache's items in memory-mapped packs (:mod:`datamodules.packed`): every clip's frames decoded once and its
audio array, written at the first setup and read without opening a file or decoding an image."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datamodules.clips import read_frame
from datamodules.packed import Pack, write_pack

log = logging.getLogger(__name__)

#: the packs' layout; a pack of another layout is written again
PACK_VERSION = 2


@dataclass
class ClipPacks:
    """A clip cache's items in packs (:mod:`datamodules.packed`): each clip's decoded frames (``uint8
    [frames, H, W, 3]``: channels last, the layout torch's uint8 resize works in, which saves it a repacking copy)
    and its audio array (as cached)."""

    frames: Pack
    audio: Pack


def _decoded_frames(root: Path, clips: Sequence[str], counts: Sequence[int]) -> Iterator[tuple[str, np.ndarray]]:
    for clip, count in zip(tqdm(clips, desc="packing decoded frames", unit="clip", dynamic_ncols=True), counts):
        images = [read_frame(root, clip, k) for k in range(int(count))]
        if len({tuple(image.shape) for image in images}) != 1:
            raise ValueError(f"the frames of {root / 'visual' / clip} differ in size; prepare the cache again, or "
                             "read the cache's files (data.store=files)")
        yield clip, torch.stack(images).permute(0, 2, 3, 1).contiguous().numpy()


def _audio_arrays(root: Path, clips: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    for clip in tqdm(clips, desc="packing audio arrays", unit="clip", dynamic_ncols=True):
        yield clip, np.load(root / "audio" / f"{clip}.npy")


def _check_space(root: Path, clips: Sequence[str], counts: Sequence[int], directory: Path, frames: bool,
                 audio: bool) -> None:
    """Refuses to start packs the disk cannot hold (the frames' size from the first clip's, the audio's from the
    ``.npy`` files), naming the size and the ways out."""
    need = 0
    if frames and clips:
        need += int(sum(int(c) for c in counts) * read_frame(root, clips[0], 0).numel())
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
            # Only the run that wrote the pack walks the JPEG files, for the comparison.
            jpeg = sum(f.stat().st_size for f in (root / "visual").glob("*/*.jpg"))
            log.info("frame pack: %.2f GB of decoded frames (their JPEG files: %.2f GB)", frames.nbytes / 1e9,
                     jpeg / 1e9)
        if audio is None:
            write_pack(_audio_arrays(root, clips), directory / "audio", source=cache)
            audio = Pack(directory / "audio")
            log.info("audio pack: %.2f GB", audio.nbytes / 1e9)
    return ClipPacks(frames, audio)


