"""UCF-101 as it comes from its download: ``UCF-101/<Class>/v_<Class>_g<GG>_c<CC>.avi`` (``UCF101.rar``) and the
official lists (``ucfTrainTestlist/``: ``classInd.txt`` and the three train/test splits); their reading, the scan,
and the error for a download that is missing or laid out otherwise."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.splits import split_file_lines

VIDEO_DIR = "UCF-101"
LIST_DIR = "ucfTrainTestlist"
CLASS_FILE = "classInd.txt"
OFFICIAL_SPLITS = (1, 2, 3)
#: the precomputed TV-L1 flow's folder below RAW that ``--flow precomputed`` reads by default
FLOW_DIR = "tvl1_flow"
SOURCE = ("the UCF-101 action recognition data set of Soomro et al. (2012), https://www.crcv.ucf.edu/data/UCF101.php "
          "(UCF101.rar and UCF101TrainTestSplits-RecognitionTask.zip)")
RAW_LAYOUT = """\
RAW/
  UCF-101/<Class>/v_<Class>_g<GG>_c<CC>.avi
                                13,320 clips of 101 actions (UCF101.rar); GG: the group (25 per class, clips of
                                one group come from one long video), CC: the clip in the group
  ucfTrainTestlist/             UCF101TrainTestSplits-RecognitionTask.zip
    classInd.txt                "1 ApplyEyeMakeup": the classes, numbered from 1
    trainlist01.txt             "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1" (and 02, 03: the three splits)
    testlist01.txt              "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi" (and 02, 03)
  tvl1_flow/u/<clip>/frame000001.jpg, tvl1_flow/v/<clip>/frame000001.jpg
                                optional, for --flow precomputed (or --flow-dir DIR): the widely shared
                                precomputed TV-L1 flow, one grey image per pair of consecutive frames"""


def raw_error(problem: str) -> FileNotFoundError:
    return FileNotFoundError(f"UCF-101 raw download: {problem}. Expected layout:\n{RAW_LAYOUT}\n"
                             f"Obtain the data set as {SOURCE}; nothing is downloaded automatically.")


@dataclass(frozen=True)
class Clip:
    """A listed clip: its name (``v_<Class>_g<GG>_c<CC>``), its video below ``UCF-101/``, class and group."""

    clip: str
    video: str  # "<Class>/<clip>.avi", as the lists give it
    label: str
    group: int


@dataclass
class RawScan:
    """The listed clips with a video, each clip's part (``train``/``test``) in each official split the download
    lists, and the listed clips that cannot be used, with the reason."""

    classes: list[str] = field(default_factory=list)
    clips: list[Clip] = field(default_factory=list)
    parts: dict[str, dict[int, str]] = field(default_factory=dict)  # clip -> {split: part}
    splits: list[int] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


GROUP = re.compile(r"_g(\d+)_c(\d+)$")


def read_classes(path: Path) -> list[str]:
    """The classes of ``classInd.txt`` in its order (numbered 1, 2, ... without gaps)."""
    classes = []
    for number, line in split_file_lines(path):
        fields = line.split()
        if len(fields) != 2 or fields[0] != str(len(classes) + 1):
            raise ValueError(f"{path}, line {number}: expected \"{len(classes) + 1} <Class>\", got {line!r}")
        classes.append(fields[1])
    if not classes:
        raise ValueError(f"{path}: no classes")
    return classes


def read_list(path: Path, classes: list[str]) -> list[tuple[str, str]]:
    """``(video, class)`` of a train or test list's lines (``<Class>/<clip>.avi`` and, in train lists, the class
    number, checked against the folder's)."""
    entries = []
    for number, line in split_file_lines(path):
        fields = line.split()
        video = fields[0].replace("\\", "/")
        label = video.split("/")[0]
        if len(fields) > 2 or "/" not in video or label not in classes or not GROUP.search(Path(video).stem):
            raise ValueError(f"{path}, line {number}: expected \"<Class>/v_<Class>_g<GG>_c<CC>.avi\" with a class of "
                             f"{CLASS_FILE}, got {line!r}")
        if len(fields) == 2 and fields[1] != str(classes.index(label) + 1):
            raise ValueError(f"{path}, line {number}: class number {fields[1]} is not {label}'s "
                             f"({classes.index(label) + 1} in {CLASS_FILE})")
        entries.append((video, label))
    return entries


def scan_raw(raw: Path) -> RawScan:
    """Reads the lists under ``raw`` and finds each listed clip's video (``RAW_LAYOUT``).

    Every clip of any list is an item, with its part in each official split whose train and test lists are both
    present. A clip listed twice in one split keeps its first listing (the repeat is reported); a clip whose video
    is missing is a failure.

    Raises:
        FileNotFoundError: naming the layout, if the class file, every split's lists or the videos are missing.
    """
    lists = raw / LIST_DIR
    if not (lists / CLASS_FILE).is_file():
        raise raw_error(f"no {LIST_DIR}/{CLASS_FILE} in {raw}")
    if not (raw / VIDEO_DIR).is_dir():
        raise raw_error(f"no {VIDEO_DIR}/ folder of videos in {raw}")
    scan = RawScan(classes=read_classes(lists / CLASS_FILE))
    found: dict[str, Clip] = {}
    for split in OFFICIAL_SPLITS:
        files = {"train": lists / f"trainlist0{split}.txt", "test": lists / f"testlist0{split}.txt"}
        if not all(f.is_file() for f in files.values()):
            continue
        scan.splits.append(split)
        for part, path in files.items():
            for video, label in read_list(path, scan.classes):
                clip = Path(video).stem
                listed = scan.parts.setdefault(clip, {})
                if split in listed:
                    scan.failed.append((f"{path.name}: {clip}", f"listed again (first in the {listed[split]} list)"))
                    continue
                listed[split] = part
                found.setdefault(clip, Clip(clip, video, label, int(GROUP.search(clip).group(1))))
    if not scan.splits:
        raise raw_error(f"no split's trainlist0N.txt and testlist0N.txt pair in {lists}")
    for clip in found.values():
        if (raw / VIDEO_DIR / clip.video).is_file():
            scan.clips.append(clip)
        else:
            scan.failed.append((clip.clip, f"no video {VIDEO_DIR}/{clip.video}"))
    if not scan.clips:
        raise raw_error(f"no video of the lists' clips is in {raw / VIDEO_DIR}")
    return scan
