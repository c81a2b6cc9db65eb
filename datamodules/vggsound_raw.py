"""VGGSound as it comes from outside: the published list ``vggsound.csv`` (YouTube id, start second, label, split)
and the user's own clips of it, found anywhere below the raw root by their ``<youtube id>_<start>`` names; the
scan of both, and the error for a download that is missing or laid out otherwise."""

from __future__ import annotations

import csv
from pathlib import Path

from datamodules.youtube import ListedClip, ListScan, scan_listed

LIST_FILE = "vggsound.csv"
SPLITS = ("train", "test")
SOURCE = ("the list from https://www.robots.ox.ac.uk/~vgg/data/vggsound/ (vggsound.csv) and the clips it names, "
          "downloaded from YouTube by its ids and start seconds (10 s each; e.g. with yt-dlp and ffmpeg, or a "
          "mirror of the clips)")
RAW_LAYOUT = """\
RAW/
  vggsound.csv                  the published list, no header: <youtube id>,<start second>,<label>,<train|test>
                                e.g. ---g-f_I2yQ,1,people marching,test
  **/<youtube id>_<start>.mp4   the clips, in any folders below RAW, e.g. video/---g-f_I2yQ_000001.mp4; the start
                                may be zero-padded and followed by _<end> (---g-f_I2yQ_000001_000011.mp4);
                                .mkv, .webm and .avi are read too. The audio comes from the clip's own audio stream.
Clips the list names but RAW lacks (YouTube videos go offline) are counted and listed in OUT/missing_clips.txt;
clips RAW holds but the list does not name are counted and skipped."""


def raw_error(problem: str) -> FileNotFoundError:
    return FileNotFoundError(f"VGGSound raw download: {problem}. Expected layout:\n{RAW_LAYOUT}\n"
                             f"Obtain the data set as {SOURCE}; nothing is downloaded automatically.")


def read_list(path: Path) -> list[ListedClip]:
    """The rows of ``vggsound.csv``; a row that is not ``id,start,label,split`` is an error naming its line."""
    rows, seen = [], set()
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for number, fields in enumerate(csv.reader(handle), start=1):
            if not fields or not "".join(fields).strip():
                continue
            if len(fields) != 4 or not fields[1].strip().isdigit() or fields[3].strip() not in SPLITS:
                raise ValueError(f"{path}, line {number}: expected <youtube id>,<start second>,<label>,<train|test>, "
                                 f"got {','.join(fields)!r}")
            ytid, start, label, split = (f.strip() for f in fields)
            key = f"{ytid}_{int(start)}"
            if key in seen:
                raise ValueError(f"{path}, line {number}: clip {key} is listed twice")
            seen.add(key)
            rows.append(ListedClip(key, label, split))
    if not rows:
        raise ValueError(f"{path}: no clips listed")
    return rows


def scan_raw(raw: Path) -> tuple[list[ListedClip], ListScan]:
    """Reads ``raw/vggsound.csv`` and finds the listed clips below ``raw`` (``RAW_LAYOUT``).

    Returns:
        ``(listed, scan)``. A clip found twice keeps its first path (sorted); the others are failures.

    Raises:
        FileNotFoundError: naming the layout, if there is no list or no listed clip is found.
    """
    return scan_listed(raw, LIST_FILE, read_list, raw_error)
