"""YouTube clips (Kinetics, VGGSound, MM-Debiased): their names, ``<11-character id>_<start>[_<end>]``, matched
across downloads and list files whatever their zero padding, and a published list's clips found in a user's
download."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi")

YOUTUBE_ID = r"[A-Za-z0-9_-]{11}"
YOUTUBE_CLIP = re.compile(rf"^({YOUTUBE_ID})_(\d+)(?:_(\d+))?$")  # <11-char id>_<start>[_<end>]


def clip_key(name: str) -> str:
    """The name a clip is matched by across layouts and list files.

    ``-3Mwkq-7TV4_000002_000012`` (Kinetics' ``<youtube id>_<start>_<end>``), ``-3Mwkq-7TV4_2`` (OGM-GE's lists:
    ``<youtube id>_<start>``), ``-3Mwkq-7TV4_000002.mp4`` and ``-3Mwkq-7TV4_000002_000012.mp4`` all become
    ``-3Mwkq-7TV4_2``; names that are not YouTube clip names are kept (without a media suffix).
    """
    stem = re.sub(r"\.(mp4|mkv|webm|avi|wav|npy)$", "", name.strip(), flags=re.IGNORECASE)
    match = YOUTUBE_CLIP.match(stem)
    return f"{match.group(1)}_{int(match.group(2))}" if match else stem


@dataclass
class FoundClips:
    """Which listed clips a download holds: ``found`` (key -> path relative to the root), the files the list does
    not name (``unlisted``), and the files that repeat or match ambiguously (``failed``, with the reason)."""

    found: dict[str, str] = field(default_factory=dict)
    unlisted: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def find_clips(raw: Path, keys: Iterable[str]) -> FoundClips:
    """The video files below ``raw`` (any folders; dot files skipped) of the clips ``keys`` (as :func:`clip_key`
    makes them), matched by :func:`clip_key` of their names. A key that is a bare YouTube id (no start second, as
    some lists give) matches the one file of that id, whatever its start; a file found twice keeps its first path
    (sorted)."""
    wanted = set(keys)
    bare = {key for key in wanted if re.fullmatch(YOUTUBE_ID, key)}
    by_id: dict[str, list[str]] = {}
    result = FoundClips()
    for path in sorted(p for p in raw.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
                       and not p.name.startswith(".")):
        key, item = clip_key(path.name), str(path.relative_to(raw))
        if key in wanted and key not in bare:
            if key in result.found:
                result.failed.append((item, f"the same clip as {result.found[key]}"))
            else:
                result.found[key] = item
        elif key[:11] in bare and (key == key[:11] or key[11:12] == "_"):
            by_id.setdefault(key[:11], []).append(item)
        else:
            result.unlisted += 1
    for ytid, items in by_id.items():
        result.found[ytid] = items[0]
        result.failed += [(item, f"another clip of {ytid}, which the list names without a start (kept {items[0]})")
                          for item in items[1:]]
    return result


@dataclass(frozen=True)
class ListedClip:
    """A clip of a published list."""

    key: str  # as clip_key makes it
    label: str
    split: str


@dataclass
class RawClip:
    """A listed clip that the download holds."""

    path: str  # relative to the raw root: the preparation item, named in the report
    key: str
    label: str
    split: str

    @property
    def clip(self) -> str:
        """The clip's name in the cache: its file's :func:`clip_key` (the listed key, or, for a list entry without
        a start, the key with the start of the file it matched)."""
        return clip_key(Path(self.path).name)


@dataclass
class ListScan:
    """A list against a download: the clips to prepare, the listed clips without a file, the files not listed,
    and the files that cannot be used."""

    clips: list[RawClip] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unlisted: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def scan_listed(raw: Path, list_file: str, read: Callable[[Path], list[ListedClip]],
                raw_error: Callable[[str], Exception]) -> tuple[list[ListedClip], ListScan]:
    """Reads the list ``raw/list_file`` with ``read`` and finds its clips below ``raw`` (:func:`find_clips`), in
    the list's order.

    Raises:
        ``raw_error(problem)`` (the data set's error naming its layout): if there is no list or no listed clip is
        found.
    """
    if not (raw / list_file).is_file():
        raise raw_error(f"no {list_file} in {raw}")
    listed = read(raw / list_file)
    clips = find_clips(raw, [row.key for row in listed])
    scan = ListScan(clips=[RawClip(clips.found[row.key], row.key, row.label, row.split) for row in listed
                           if row.key in clips.found],
                    missing=[row.key for row in listed if row.key not in clips.found],
                    unlisted=clips.unlisted, failed=clips.failed)
    if not scan.clips:
        raise raw_error(f"none of the {len(listed)} clips {list_file} lists is below {raw} "
                        f"({scan.unlisted} video files with other names)")
    return listed, scan
