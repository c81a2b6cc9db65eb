"""MM-Debiased as it comes from outside: the valuation paper's sample list ``MM-Debiased.json`` (14,025 clip ids
of VGGSound and Kinetics-400 with their subset and label, 10 classes) and the user's own clips of those two data
sets, found anywhere below the raw root; the list's reading, the scan, and the error for a missing download."""

from __future__ import annotations

import json
from pathlib import Path

from datamodules.youtube import ListedClip, ListScan, clip_key, scan_listed

LIST_FILE = "MM-Debiased.json"
SUBSETS = {"training": "train", "validation": "val", "testing": "test"}
SOURCE = ("the sample list MM-Debiased/MM-Debiased.json of "
          "https://github.com/GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation, and the VGGSound and Kinetics-400 "
          "clips it names (VGGSound: https://www.robots.ox.ac.uk/~vgg/data/vggsound/; Kinetics-400: "
          "https://github.com/cvdfoundation/kinetics-dataset)")
RAW_LAYOUT = """\
RAW/
  MM-Debiased.json              the sample list: {"<clip id>": {"subset": "training|validation|testing",
                                "label": "<one of 10 classes>"}, ...}
  **/<clip id>.mp4              the clips, in any folders below RAW (e.g. a VGGSound and a Kinetics-400 folder,
                                or links to yours): Kinetics-400's <youtube id>_<start>_<end>.mp4, VGGSound's
                                <youtube id>_<start>.mp4 (any zero padding); an id the list gives without a start
                                matches the one clip of that YouTube id. .mkv, .webm and .avi are read too.
Clips the list names but RAW lacks are counted and listed in OUT/missing_clips.txt; other videos are skipped."""


def raw_error(problem: str) -> FileNotFoundError:
    return FileNotFoundError(f"MM-Debiased raw download: {problem}. Expected layout:\n{RAW_LAYOUT}\n"
                             f"Obtain the data set as {SOURCE}; nothing is downloaded automatically.")


def read_list(path: Path) -> list[ListedClip]:
    """The entries of ``MM-Debiased.json``; an entry without a known subset or a label is an error naming it."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from error
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{path}: expected an object of clip ids, got {type(entries).__name__}")
    rows, seen = [], set()
    for clip, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("subset") not in SUBSETS or not entry.get("label"):
            raise ValueError(f"{path}: entry {clip!r} needs a subset ({', '.join(SUBSETS)}) and a label, got {entry!r}")
        key = clip_key(clip)
        if key in seen:
            raise ValueError(f"{path}: clip {clip!r} is listed twice")
        seen.add(key)
        rows.append(ListedClip(key, str(entry["label"]), SUBSETS[entry["subset"]]))
    return rows


def scan_raw(raw: Path) -> tuple[list[ListedClip], ListScan]:
    """Reads ``raw/MM-Debiased.json`` and finds the listed clips below ``raw`` (``RAW_LAYOUT``).

    Raises:
        FileNotFoundError: naming the layout, if there is no list or no listed clip is found.
    """
    return scan_listed(raw, LIST_FILE, read_list, raw_error)
