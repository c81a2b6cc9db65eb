"""A clip cache's items in memory-mapped packs (:mod:`datamodules.packed`): every clip's frames decoded once and its
arrays (audio), written at the first setup and read without opening a file or decoding an image."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datamodules.clips import FrameModality
from datamodules.packed import Pack, write_pack

log = logging.getLogger(__name__)

#: the packs' layout; a pack of another layout is written again
PACK_VERSION = 3
#: the frame pack of layout 2 (the ``visual`` frames), removed when its successor is written
OLD_FRAME_PACK = "frames"


@dataclass
class ClipPacks:
    """A clip cache's items in packs (:mod:`datamodules.packed`), one per modality: each clip's decoded frames
    (``uint8 [frames, H, W, C]``: channels last, the layout torch's uint8 resize works in, which saves it a
    repacking copy) and its arrays (as cached)."""

    frames: dict[str, Pack]
    arrays: dict[str, Pack]


def _decoded_frames(root: Path, spec: FrameModality, name: str, clips: Sequence[str],
                    counts: Sequence[int]) -> Iterator[tuple[str, np.ndarray]]:
    bar = tqdm(clips, desc=f"packing decoded {name} frames", unit="clip", dynamic_ncols=True)
    for clip, count in zip(bar, counts):
        images = [spec.read(root, clip, k) for k in range(int(count))]
        if len({tuple(image.shape) for image in images}) != 1:
            raise ValueError(f"the {name} frames of {clip} in {root} differ in size; prepare the cache again, or "
                             "read the cache's files (data.store=files)")
        yield clip, torch.stack(images).permute(0, 2, 3, 1).contiguous().numpy()


def _arrays(root: Path, name: str, clips: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    for clip in tqdm(clips, desc=f"packing {name} arrays", unit="clip", dynamic_ncols=True):
        yield clip, np.load(root / name / f"{clip}.npy")


def _check_space(root: Path, clips: Sequence[str], counts: Sequence[int], directory: Path,
                 frames: Mapping[str, FrameModality], arrays: Sequence[str]) -> None:
    """Refuses to start packs the disk cannot hold (the frames' size from the first clip's, the arrays' from the
    ``.npy`` files), naming the size and the ways out."""
    need = 0
    if clips:
        need += sum(int(sum(int(c) for c in counts) * spec.read(root, clips[0], 0).numel()) for spec in frames.values())
    need += sum((root / name / f"{clip}.npy").stat().st_size for name in arrays for clip in clips)
    free = shutil.disk_usage(directory).free
    if need > 0.95 * free:
        raise OSError(f"the packs of {len(clips)} clips need about {need / 1e9:.1f} GB, and {directory} has "
                      f"{free / 1e9:.1f} GB free: give data.pack_dir=<a larger disk>, or read the cache's files per "
                      "item with data.store=files (no extra disk, slower)")


def clip_packs(root: Path, clips: Sequence[str], counts: Sequence[int], directory: Path,
               frames: Mapping[str, FrameModality], arrays: Sequence[str]) -> ClipPacks:
    """The packs of ``clips`` in ``directory`` (``<modality>.bin`` and ``.json``): for each of the ``frames``
    modalities its ``counts`` frames per clip decoded, for each of the ``arrays`` the clips' ``root/<name>/<clip>.npy``.

    Written on first use and again when the cache changes (another ``meta.json``) or holds clips a pack lacks.
    Runs packing the same cache at once (DDP ranks, parallel runs) wait for the first, which writes them.
    """
    cache = hashlib.sha256((root / "meta.json").read_bytes()).hexdigest()[:16] if (root / "meta.json").is_file() \
        else ""
    cache += f":v{PACK_VERSION}"
    names = [*frames, *arrays]

    def current(name: str) -> Pack | None:
        path = directory / name
        if not path.with_suffix(".json").is_file():
            return None
        pack = Pack(path)
        return pack if pack.source == cache and all(clip in pack for clip in clips) else None

    def assembled() -> ClipPacks:
        return ClipPacks({n: found[n] for n in frames}, {n: found[n] for n in arrays})

    found = {name: current(name) for name in names}
    if all(pack is not None for pack in found.values()):
        return assembled()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = (directory / ".packing.lock").open("w")
    except OSError as error:
        raise OSError(f"cannot write the packs in {directory} ({error}): give a writable data.pack_dir, or read the "
                      "cache's files per item with data.store=files") from error
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Another run may have written them while this one waited.
        found = {name: current(name) for name in names}
        _check_space(root, clips, counts, directory, {n: s for n, s in frames.items() if found[n] is None},
                     [n for n in arrays if found[n] is None])
        for name, spec in frames.items():
            if found[name] is not None:
                continue
            log.info("packing the decoded %s frames of %d clips into %s (once; data.store=files reads the JPEG "
                     "files instead)", name, len(clips), directory / f"{name}.bin")
            write_pack(_decoded_frames(root, spec, name, clips, counts), directory / name, source=cache)
            found[name] = Pack(directory / name)
            # Only the run that wrote the pack walks the JPEG files, for the comparison.
            jpeg = sum(f.stat().st_size for folder in spec.folders for f in (root / folder).glob("*/*.jpg"))
            log.info("%s frame pack: %.2f GB of decoded frames (their JPEG files: %.2f GB)", name,
                     found[name].nbytes / 1e9, jpeg / 1e9)
        for name in arrays:
            if found[name] is None:
                write_pack(_arrays(root, name, clips), directory / name, source=cache)
                found[name] = Pack(directory / name)
                log.info("%s pack: %.2f GB", name, found[name].nbytes / 1e9)
        _remove_old_frame_pack(directory, names)
    return assembled()


def _remove_old_frame_pack(directory: Path, names: Sequence[str]) -> None:
    """Removes layout 2's ``frames.bin`` (now ``visual.bin``), which nothing reads any more."""
    old = [directory / f"{OLD_FRAME_PACK}{suffix}" for suffix in (".bin", ".json")]
    if OLD_FRAME_PACK not in names and any(path.is_file() for path in old):
        for path in old:
            path.unlink(missing_ok=True)
        log.info("removed the frame pack of an older layout (%s)", old[0])
