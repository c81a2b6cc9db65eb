"""Kinetics-Sounds as it comes from outside: the 31 classes and the class names of folders and lists, the clip
names matched across layouts and list files, the raw download's layouts (``RAW_LAYOUT``: split and class folders
of videos) with their scan and the error for a download that is missing or laid out otherwise, and the list files
of other projects (OGM-GE's ``my_train.txt``/``my_test.txt`` and other formats) with the check of their labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datamodules.splits import split_file_lines
from datamodules.youtube import clip_key  # noqa: F401 (the list files' keys; imported from here too)

# The 31 Kinetics-400 classes of Kinetics-Sounds, sorted. The 34 classes of Arandjelović and Zisserman (2017)
# were named in a pre-release of Kinetics; these are their Kinetics-400 names, the 31-class list that AdaMML's
# authors published (IBM/AdaMML issue #3) for the 31-class set OGM-GE also reports. Papers use 31, 32 or 34.
CLASSES = (
    "blowing nose", "blowing out candles", "bowling", "chopping wood", "dribbling basketball", "laughing",
    "mowing lawn", "playing accordion", "playing bagpipes", "playing bass guitar", "playing clarinet",
    "playing drums", "playing guitar", "playing harmonica", "playing keyboard", "playing organ", "playing piano",
    "playing saxophone", "playing trombone", "playing trumpet", "playing violin", "playing xylophone",
    "ripping paper", "shoveling snow", "shuffling cards", "singing", "stomping grapes", "tap dancing",
    "tapping guitar", "tapping pen", "tickling",
)
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")
RAW_SPLITS = ("train", "val", "test")
SOURCE = ("Kinetics-400 from https://github.com/cvdfoundation/kinetics-dataset (k400_downloader.sh and "
          "k400_extractor.sh; then `python arrange_by_classes.py k400` sorts the clips into "
          "k400/videos/<split>/<class>/: use RAW=k400/videos); only the 31 Kinetics-Sounds classes are needed")
RAW_LAYOUT = """\
RAW/                            Kinetics-400 (all of it, or just the Kinetics-Sounds classes) in class folders
  <split>/<class>/<clip>.mp4    split: train, val, test (any of them), e.g.
                                train/playing bagpipes/-3Mwkq-7TV4_000002_000012.mp4
or, without split folders:
  <class>/<clip>.mp4            e.g. playing_bagpipes/-3Mwkq-7TV4_000002_000012.mp4
<class> is a Kinetics-400 class name with spaces or underscores, in any case; clips of classes outside
Kinetics-Sounds are skipped and counted. <clip> is <youtube id>_<start>_<end> in the official download (any name
works); .mkv and .webm are read too. The audio comes from the video file's own audio stream."""


def _class_key(name: str) -> str:
    return " ".join(name.replace("_", " ").replace('"', "").split()).lower()


_CLASS_BY_KEY = {_class_key(name): name for name in CLASSES}


def class_of(name: str) -> str | None:
    """The Kinetics-Sounds class a folder or list name denotes (underscores, case, quotes ignored), else ``None``."""
    return _CLASS_BY_KEY.get(_class_key(name))


@dataclass
class RawClip:
    """A clip of a Kinetics-Sounds class in the raw download."""

    path: str  # relative to RAW: the preparation item, named in the report
    label: str  # one of CLASSES
    split: str  # its split folder, or "" in the layout without split folders

    @property
    def clip(self) -> str:
        return Path(self.path).stem


@dataclass
class RawScan:
    """What the raw download holds: Kinetics-Sounds clips, other classes' clip counts, files that cannot be used."""

    layout: str  # "split folders" or "class folders"
    clips: list[RawClip] = field(default_factory=list)
    other_classes: dict[str, int] = field(default_factory=dict)  # folder (relative to RAW) -> clips skipped
    failed: list[tuple[str, str]] = field(default_factory=list)


def _videos(directory: Path) -> list[Path]:
    # Dot files are skipped: macOS resource forks (._clip.mp4) and our own temporaries are not clips.
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith("."))


def raw_error(problem: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Kinetics-Sounds raw download: {problem}. Expected layout:\n{RAW_LAYOUT}\n"
        f"Obtain the data set as {SOURCE}; nothing is downloaded automatically."
    )


def scan_raw(raw: Path) -> RawScan:
    """Finds the clips under ``raw`` (``RAW_LAYOUT``); raises ``FileNotFoundError`` naming the layout if none.

    A clip name seen twice (in two classes or splits) keeps its first occurrence; the others are failures, as are
    videos outside a class folder.
    """
    splits = [s for s in RAW_SPLITS if (raw / s).is_dir()]
    roots = [(raw / s, s) for s in splits] or [(raw, "")]
    scan = RawScan(layout="split folders" if splits else "class folders")
    first_seen: dict[str, str] = {}
    for root, split in roots:
        scan.failed += [(str(p.relative_to(raw)), "not in a class folder") for p in _videos(root)]
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            videos, label = _videos(folder), class_of(folder.name)
            if label is None:
                if videos:
                    scan.other_classes[str(folder.relative_to(raw))] = len(videos)
                continue
            for video in videos:
                item = str(video.relative_to(raw))
                if video.stem in first_seen:
                    scan.failed.append((item, f"duplicate clip name (kept {first_seen[video.stem]})"))
                    continue
                first_seen[video.stem] = item
                scan.clips.append(RawClip(item, label, split))
    if not scan.clips and not scan.other_classes:
        hint = (" (videos directly in a split folder: sort them into class folders with the official "
                "arrange_by_classes.py)" if scan.failed else "")
        raise raw_error(f"no class folder with videos in {raw}{hint}")
    return scan


# ---------------------------------------------------------------------------------------------------------------
# List files


def read_list_file(path: str | Path) -> list[tuple[str, str | None]]:
    """Reads a list of clips; returns ``[(clip key, label or None), ...]`` (keys as :func:`clip_key` makes them).

    One clip per line, the clip first, the label (a class name or a class index) last and optional:

    - OGM-GE (``my_train.txt``/``my_test.txt``): ``-3Mwkq-7TV4_2,10,23``: ``<youtube id>_<start>``, the clip's
      length in seconds, the class index;
    - csv: ``-3Mwkq-7TV4_000002_000012,playing bagpipes`` (a file name with ``.mp4`` works too);
    - whitespace-separated: ``-3Mwkq-7TV4_000002_000012.mp4 8`` or ``... playing bagpipes``.

    A UTF-8 BOM, CRLF line ends, blank lines and ``#`` comments are allowed.
    """
    path = Path(path)
    rows = []
    for _, line in split_file_lines(path):
        if "," in line:
            fields = [f.strip() for f in line.split(",")]
            clip, label = fields[0], (fields[-1] if len(fields) > 1 else None)
        else:
            clip, *rest = line.split(None, 1)
            label = rest[0].strip() if rest else None
        rows.append((clip_key(clip), label))
    if not rows:
        raise ValueError(f"{path}: no clips listed")
    return rows


class LabelCheck:
    """Checks list labels against the clips' classes: names must match; indices (whose class order is not
    published with the lists) must each denote one class throughout."""

    def __init__(self) -> None:
        self.index_class: dict[int, str] = {}

    def __call__(self, path: str, clip: str, label: str, actual: str) -> None:
        if label.isdigit():
            expected = self.index_class.setdefault(int(label), actual)
            if expected != actual:
                raise ValueError(f"{path}: class index {label} is used for {expected!r} and for {actual!r} "
                                 f"(clip {clip}): the list does not match the class folders")
        elif class_of(label) != actual:
            raise ValueError(f"{path}: label {label!r} of clip {clip} does not match its class folder {actual!r}")
