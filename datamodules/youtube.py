"""Names of YouTube clips (Kinetics, VGGSound): ``<11-character id>_<start>[_<end>]``, matched across downloads and
list files whatever their zero padding."""

from __future__ import annotations

import re

YOUTUBE_CLIP = re.compile(r"^([A-Za-z0-9_-]{11})_(\d+)(?:_(\d+))?$")  # <11-char id>_<start>[_<end>]


def clip_key(name: str) -> str:
    """The name a clip is matched by across layouts and list files.

    ``-3Mwkq-7TV4_000002_000012`` (Kinetics' ``<youtube id>_<start>_<end>``), ``-3Mwkq-7TV4_2`` (OGM-GE's lists:
    ``<youtube id>_<start>``), ``-3Mwkq-7TV4_000002.mp4`` and ``-3Mwkq-7TV4_000002_000012.mp4`` all become
    ``-3Mwkq-7TV4_2``; names that are not YouTube clip names are kept (without a media suffix).
    """
    stem = re.sub(r"\.(mp4|mkv|webm|avi|wav|npy)$", "", name.strip(), flags=re.IGNORECASE)
    match = YOUTUBE_CLIP.match(stem)
    return f"{match.group(1)}_{int(match.group(2))}" if match else stem
