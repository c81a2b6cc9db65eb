"""AVE (the Audio-Visual Event data set) as it comes from its download: ``AVE_Dataset/`` with the videos, the
annotations (``Category&VideoID&Quality&StartTime&EndTime``, one audio-visual event a line) and the three split
files in the same format; their reading, the scan, and the error for a download that is missing or laid out
otherwise."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datamodules.splits import split_file_lines

ANNOTATIONS = "Annotations.txt"
SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
VIDEO_DIR = "AVE"
SOURCE = ("the AVE data set of Tian et al. (ECCV 2018), https://github.com/YapengTian/AVE-ECCV18 (AVE_Dataset.zip "
          "from the Google Drive link there)")
RAW_LAYOUT = """\
RAW/                            AVE_Dataset/ as it unzips
  Annotations.txt               Category&VideoID&Quality&StartTime&EndTime (a header, then one event a line)
  trainSet.txt, valSet.txt, testSet.txt
                                the official splits (3,339 / 402 / 402 events), in the same format
  AVE/<VideoID>.mp4             the 10 s videos (4,143 events in 4,097 videos: a video may hold several events)"""


@dataclass(frozen=True)
class Event:
    """An annotated audio-visual event: a video's span of whole seconds with its category."""

    category: str
    video: str
    start: int
    end: int

    @property
    def key(self) -> str:
        """The event's name in the cache: ``<VideoID>_<start>_<end>`` (a video's events have distinct spans)."""
        return f"{self.video}_{self.start}_{self.end}"


@dataclass
class RawScan:
    """The split files' events, each with its split, and those whose video the download lacks."""

    events: list[tuple[Event, str]] = field(default_factory=list)  # (event, split)
    failed: list[tuple[str, str]] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)


def raw_error(problem: str) -> FileNotFoundError:
    return FileNotFoundError(f"AVE raw download: {problem}. Expected layout:\n{RAW_LAYOUT}\n"
                             f"Obtain the data set as {SOURCE}; nothing is downloaded automatically.")


def read_events(path: Path) -> list[Event]:
    """The events of an annotation or split file (a ``Category&VideoID&...`` header line is skipped); a line of
    another form is an error naming it."""
    events = []
    for number, line in split_file_lines(path):
        fields = [f.strip() for f in line.split("&")]
        if fields[:2] == ["Category", "VideoID"]:
            continue
        if len(fields) != 5 or not fields[3].isdigit() or not fields[4].isdigit() or int(fields[3]) >= int(fields[4]):
            raise ValueError(f"{path}, line {number}: expected Category&VideoID&Quality&StartTime&EndTime with "
                             f"whole seconds, start before end, got {line!r}")
        events.append(Event(fields[0], fields[1], int(fields[3]), int(fields[4])))
    if not events:
        raise ValueError(f"{path}: no events")
    return events


def scan_raw(raw: Path) -> RawScan:
    """Reads the annotations and the split files under ``raw`` and finds each event's video (``RAW_LAYOUT``).

    An event listed in two splits, or twice in one, keeps its first listing; the repeats are failures, as are
    events whose video is missing and split-file events the annotations do not hold.

    Raises:
        FileNotFoundError: naming the layout, if a file is missing or no video is found.
    """
    missing = [name for name in (ANNOTATIONS, *SPLIT_FILES.values()) if not (raw / name).is_file()]
    if missing:
        raise raw_error(f"{', '.join(missing)} not in {raw}")
    if not (raw / VIDEO_DIR).is_dir():
        raise raw_error(f"no {VIDEO_DIR}/ folder of videos in {raw}")
    annotated = set(read_events(raw / ANNOTATIONS))
    scan, seen = RawScan(), {}
    for split, name in SPLIT_FILES.items():
        for event in read_events(raw / name):
            if event in seen:
                scan.failed.append((f"{name}: {event.key}", f"listed again (first in {seen[event]})"))
                continue
            seen[event] = name
            if event not in annotated:
                scan.failed.append((f"{name}: {event.key}", f"not in {ANNOTATIONS}"))
            elif not (raw / VIDEO_DIR / f"{event.video}.mp4").is_file():
                scan.failed.append((f"{name}: {event.key}", f"no video {VIDEO_DIR}/{event.video}.mp4"))
            else:
                scan.events.append((event, split))
    scan.categories = sorted({event.category for event in annotated})
    if not scan.events:
        raise raw_error(f"no video of the split files' events is in {raw / VIDEO_DIR}")
    return scan
