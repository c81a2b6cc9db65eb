"""Arrays of many items in one memory-mapped file: a clip cache's frames decoded once, read without decoding.

A pack is two files: ``<name>.bin`` (every item's array, one after the other, C order) and ``<name>.json`` (the
dtype, each item's key, shape and offset). Reading an item is a slice of the memory map: no file is opened, no
image decoded, and the operating system's page cache keeps what training reads again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from datamodules.preparation import atomic_output


def write_pack(items: Iterable[tuple[str, np.ndarray]], path: Path, source: str = "") -> Path:
    """Writes ``(key, array)`` items (one dtype and number of dimensions for all) as the pack ``path`` (``.bin``
    and ``.json`` beside it), atomically: an interrupted write leaves no pack. ``source`` names what the pack was
    made from (to tell a stale pack). Returns the ``.bin`` path."""
    data, index = path.with_suffix(".bin"), path.with_suffix(".json")
    index.unlink(missing_ok=True)  # no reader pairs an old index with the new data
    keys, shapes, offsets, dtype, ndim, offset = [], [], [], None, None, 0
    with atomic_output(data) as temp, open(temp, "wb") as handle:
        for key, array in items:
            array = np.ascontiguousarray(array)
            if dtype is None:
                dtype, ndim = array.dtype, array.ndim
            if array.dtype != dtype or array.ndim != ndim:
                raise ValueError(f"pack {path}: item {key!r} is {array.dtype} {array.shape}, the pack holds "
                                 f"{dtype} arrays of {ndim} dimensions")
            handle.write(array.tobytes())
            keys.append(key)
            shapes.append(list(array.shape))
            offsets.append(offset)
            offset += array.nbytes
    with atomic_output(index) as temp:
        Path(temp).write_text(json.dumps({"dtype": str(dtype or np.uint8), "keys": keys, "shapes": shapes,
                                          "offsets": offsets, "bytes": offset, "source": source}))
    return data


class Pack:
    """The items of a pack written by :func:`write_pack`, by key (``pack[key]``: a view of the map).

    The map is opened on first use in each process, so a dataset holding a pack can go to DataLoader workers. It
    is copy-on-write: a view can be handed to torch as it is (``torch.from_numpy``), and writing to one changes
    only this process's copy of the page, never the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        meta = json.loads(self.path.with_suffix(".json").read_text())
        self.dtype = np.dtype(meta["dtype"])
        self.keys = meta["keys"]
        self.position = {key: i for i, key in enumerate(self.keys)}
        self.shapes = [tuple(shape) for shape in meta["shapes"]]
        self.offsets = meta["offsets"]
        self.sizes = [int(np.prod(shape)) * self.dtype.itemsize for shape in self.shapes]
        self.nbytes = int(meta["bytes"])
        self.source = meta.get("source", "")
        self._map: np.ndarray | None = None
        self._pid: int | None = None

    def __contains__(self, key: str) -> bool:
        return key in self.position

    def __getitem__(self, key: str) -> np.ndarray:
        if self._map is None or self._pid != os.getpid():
            # A plain array over the map: slicing a np.memmap costs as much again in its Python-level bookkeeping.
            self._map = np.memmap(self.path.with_suffix(".bin"), dtype=np.uint8, mode="c").view(np.ndarray) \
                if self.nbytes else np.zeros(0, np.uint8)
            self._pid = os.getpid()
        i = self.position[key]
        return self._map[self.offsets[i]:self.offsets[i] + self.sizes[i]].view(self.dtype).reshape(self.shapes[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None, "_pid": None}
