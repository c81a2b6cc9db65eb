"""Kinetics-Sounds: the Kinetics-400 clips of 31 actions that can be heard, audio + video (Arandjelović and
Zisserman, 2017; the 31-class version that OGM-GE and later balancing papers train on).

Preparation (once): ``balance-prepare kinetics_sounds --raw RAW --out OUT`` reads Kinetics-400 sorted into class
folders (``RAW_LAYOUT``; clips of other classes are skipped and counted) and writes a cache laid out as
``CACHE_LAYOUT``: for every clip the AST-style audio input OGM-GE uses on Kinetics-Sounds (16 kHz, Kaldi fbank with
128 mel bins, 1,024 frames of 10 ms, normalised with mean -4.503877 and std 2 x 5.141276) and its frames at 1 fps
as JPEG. Training then reads a small ``.npy`` and three JPEGs per item: no audio decoding or fbank per epoch.

Labels are positions in ``CLASSES``. Splits: seeded stratified train/val/test (default), the raw download's own
train/val/test folders (``official``), or user-supplied list files (OGM-GE's ``my_train.txt``/``my_test.txt`` and
other formats, see :func:`read_list_file`). Every item shows three frames, one per third of the clip: at random
within each third in training, each third's middle frame in evaluation (:func:`frame_indices`).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.cache import PreparedCacheDataModule
from datamodules.clips import ClipDataset, clip_cached, write_clip
from datamodules.preparation import (
    missing_cache_error,
    PrepareReport,
    prepare_parser,
    run_prepare_command,
    atomic_write_text,
    check_params,
    finish,
    remove_stale_temporaries,
    run_items,
)
from datamodules.splits import stratified_split

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
SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
TARGET_FRAMES = 1024  # 10.24 s of 10 ms frames: every 10 s Kinetics clip, zero-padded
FRAME_SHIFT_MS = 10
NORM_MEAN = -4.503877  # AudioSet fbank statistics (AST); OGM-GE divides by twice the std
NORM_STD = 2 * 5.141276
AUDIO_SHAPE = (TARGET_FRAMES, NUM_MEL_BINS)
MIN_SAMPLES = SAMPLE_RATE * 25 // 1000  # one 25 ms fbank window
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")
RAW_SPLITS = ("train", "val", "test")
YOUTUBE_CLIP = re.compile(r"^([A-Za-z0-9_-]{11})_(\d+)(?:_(\d+))?$")  # <11-char id>_<start>[_<end>]
CACHE_VERSION = 1
PROG = "balance-prepare kinetics_sounds"
COMMAND = f"{PROG} --raw RAW --out OUT"
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
CACHE_LAYOUT = """\
OUT/
  meta.json                 preparation parameters and counts (written last: marks a complete cache)
  clips.csv                 clip,label,split,frames: one row per usable clip (split: its raw folder, or empty)
  audio/<clip>.npy          float16 [1024, 128] normalised log-mel fbank (time x mel)
  visual/<clip>/00000.jpg   frames at 1 fps (00000.jpg = second 0, 00001.jpg = second 1, ...)
  prepare_report.txt        what the last preparation did, every failed clip with its reason, skipped classes
  prepare_params.json       the parameters, checked when resuming"""
SPLITS_HELP = "stratified (default), official (the raw train/val/test folders), files (list files)"


def _class_key(name: str) -> str:
    return " ".join(name.replace("_", " ").replace('"', "").split()).lower()


_CLASS_BY_KEY = {_class_key(name): name for name in CLASSES}


def class_of(name: str) -> str | None:
    """The Kinetics-Sounds class a folder or list name denotes (underscores, case, quotes ignored), else ``None``."""
    return _CLASS_BY_KEY.get(_class_key(name))


def clip_key(name: str) -> str:
    """The name a clip is matched by across layouts and list files.

    ``-3Mwkq-7TV4_000002_000012`` (the official download's ``<youtube id>_<start>_<end>``), ``-3Mwkq-7TV4_2``
    (OGM-GE's lists: ``<youtube id>_<start>``) and ``-3Mwkq-7TV4_000002_000012.mp4`` all become ``-3Mwkq-7TV4_2``;
    names that are not YouTube clip names are kept (without a media suffix).
    """
    stem = re.sub(r"\.(mp4|mkv|webm|avi|wav|npy)$", "", name.strip(), flags=re.IGNORECASE)
    match = YOUTUBE_CLIP.match(stem)
    return f"{match.group(1)}_{int(match.group(2))}" if match else stem


def frame_indices(available: int, num: int, train: bool, generator: torch.Generator | None = None) -> list[int]:
    """Which of a clip's ``available`` frames an item shows: one from each of ``num`` equal segments (thirds).

    Segment ``k`` holds frames ``k * available // num`` to ``(k + 1) * available // num - 1``. Training draws one
    frame uniformly within each segment; evaluation takes each segment's middle frame (rounded down). A clip with
    fewer frames than segments repeats frames.

    Args:
        available: frames of the clip (at least 1).
        num: frames to pick.
        train: draw at random (``True``) or take the middles.
        generator: random generator for the training draw (default: torch's global one).
    """
    if available < 1 or num < 1:
        raise ValueError(f"need at least one frame and one pick, got available={available}, num={num}")
    picks = []
    for k in range(num):
        first = k * available // num
        last = max(first, (k + 1) * available // num - 1)
        if train:
            picks.append(int(torch.randint(first, last + 1, (1,), generator=generator)))
        else:
            picks.append((first + last) // 2)
    return picks


# ---------------------------------------------------------------------------------------------------------------
# Preparation


def log_mel_fbank(wave: np.ndarray) -> np.ndarray:
    """OGM-GE's (AST's) audio input from a 16 kHz mono waveform: ``float32 [1024, 128]`` (time x mel).

    The mean is removed, then a Kaldi fbank with 128 mel bins, 25 ms Hanning windows every 10 ms, HTK-compatible
    output, no energy and no dither; zero-padded or cut to 1,024 frames; then ``(fbank + 4.503877) / (2 *
    5.141276)``. The padding comes before the normalisation, as in OGM-GE, so padded frames hold 0.438.
    """
    from torchaudio.compliance import kaldi

    if len(wave) < MIN_SAMPLES:
        raise ValueError(f"audio of {len(wave)} samples is shorter than one 25 ms window")
    waveform = torch.from_numpy(np.asarray(wave - wave.mean(), dtype=np.float32)).unsqueeze(0)
    fbank = kaldi.fbank(waveform, htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False,
                        window_type="hanning", num_mel_bins=NUM_MEL_BINS, dither=0.0, frame_shift=FRAME_SHIFT_MS)
    fbank = torch.nn.functional.pad(fbank, (0, 0, 0, max(0, TARGET_FRAMES - len(fbank))))[:TARGET_FRAMES]
    return ((fbank - NORM_MEAN) / NORM_STD).numpy()


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


def _raw_error(problem: str) -> FileNotFoundError:
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
        raise _raw_error(f"no class folder with videos in {raw}{hint}")
    return scan


def _reason(error: Exception, path: Path, raw: Path) -> str:
    # The report names the item already; FFmpeg's messages repeat the path, which is shortened to the item.
    return str(error).replace(f"{path}: ", "").replace(f"{raw}/", "")


def _prepare_clip(item: str, raw: str, out: str, fps: float, short_side: int, quality: int) -> None:
    raw_path, path = Path(raw), Path(raw) / item
    write_clip(Path(item).stem, Path(out), path, path, SAMPLE_RATE, log_mel_fbank, fps, short_side, quality,
               reason=lambda error: _reason(error, path, raw_path))


def _is_done(item: str, out: Path) -> bool:
    return clip_cached(Path(item).stem, out)


def _clips_csv(clips: Sequence[RawClip], out: Path) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["clip", "label", "split", "frames"])
    for c in clips:
        writer.writerow([c.clip, c.label, c.split, len(list((out / "visual" / c.clip).glob("*.jpg")))])
    return text.getvalue()


def _details(raw: Path, out: Path, scan: RawScan) -> list[str]:
    skipped = sum(scan.other_classes.values())
    lines = [f"raw: {raw} ({scan.layout}; {len(scan.clips)} clips of Kinetics-Sounds classes)", f"out: {out}",
             f"skipped, not a Kinetics-Sounds class: {skipped} clips in {len(scan.other_classes)} folders"]
    lines += [f"  {folder}: {count}" for folder, count in sorted(scan.other_classes.items())]
    return lines


def prepare(
    raw: str | Path,
    out: str | Path,
    workers: int | None = None,
    fps: float = 1.0,
    short_side: int = 224,
    quality: int = 95,
) -> PrepareReport:
    """Prepares the cache (``CACHE_LAYOUT``) from the raw download (``RAW_LAYOUT``); resumable.

    Clips whose fbank and frames both exist are skipped; every clip that fails (missing or unreadable audio or
    video, no audio stream, duplicate name, outside a class folder) is listed with its reason in
    ``OUT/prepare_report.txt``, and the clips of classes outside Kinetics-Sounds are counted there per folder.
    Exits with status 1 when no usable clip is left, 2 when ``out`` was prepared with other parameters.

    Args:
        raw: the raw download.
        out: the cache directory (``data.root``).
        workers: processes (default: all cores).
        fps: frames kept per second of video.
        short_side: frames are resized so that their short side has this many pixels (0 keeps the size).
        quality: JPEG quality.
    """
    raw, out = Path(raw).expanduser().resolve(), Path(out).expanduser().resolve()
    if not raw.is_dir():
        raise _raw_error(f"{raw} does not exist")
    scan = scan_raw(raw)
    params = {"sample_rate": SAMPLE_RATE, "resampling": "kaiser_best", "channels": "mean", "remove_mean": True,
              "num_mel_bins": NUM_MEL_BINS, "frame_shift_ms": FRAME_SHIFT_MS, "target_frames": TARGET_FRAMES,
              "norm_mean": NORM_MEAN, "norm_std": NORM_STD, "fps": float(fps), "short_side": int(short_side),
              "jpeg_quality": int(quality)}
    check_params(out, params, PROG)
    remove_stale_temporaries(out / "audio", out / "visual")
    work = functools.partial(_prepare_clip, raw=str(raw), out=str(out), fps=fps, short_side=short_side,
                             quality=quality)
    run = run_items([c.path for c in scan.clips], work, is_done=functools.partial(_is_done, out=out),
                    workers=workers, desc="Kinetics-Sounds: preparing clips")
    report = PrepareReport(ok=run.ok, done=run.done, failed=scan.failed + run.failed)

    ready = set(run.ok + run.done)
    usable = [c for c in scan.clips if c.path in ready]
    if usable:
        atomic_write_text(out / "clips.csv", _clips_csv(usable, out))
    if scan.other_classes:
        print(f"{PROG}: skipped {sum(scan.other_classes.values())} clips in {len(scan.other_classes)} folders of "
              "classes outside Kinetics-Sounds (listed in the report)")
    finish(report, out, PROG, _details(raw, out, scan), usable=len(usable))  # exits 1 if nothing is usable
    per_split = {s: sum(c.split == s for c in usable) for s in sorted({c.split for c in usable}) if s}
    meta = {"dataset": "kinetics_sounds", "version": CACHE_VERSION, "params": params, "classes": list(CLASSES),
            "audio_shape": list(AUDIO_SHAPE), "layout": scan.layout, "num_clips": len(usable),
            "clips_per_split": per_split, "num_failed": len(report.failed),
            "num_other_classes": sum(scan.other_classes.values())}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return report


def prepare_main(argv: Sequence[str] | None = None) -> None:
    """``balance-prepare kinetics_sounds --raw RAW --out OUT [--workers N] [--fps 1] [--short-side 224]``."""
    parser = prepare_parser("kinetics_sounds", "Prepare Kinetics-Sounds (Kinetics-400 class folders of .mp4) into "
                            "fbanks and 1 fps frames.", RAW_LAYOUT, CACHE_LAYOUT, SOURCE, short_side=224)
    parser.add_argument("--fps", type=float, default=1.0, help="frames kept per second of video (default 1)")
    args = parser.parse_args(argv)
    run_prepare_command(parser, "kinetics_sounds", args.out, lambda: prepare(
        args.raw, args.out, args.workers, args.fps, args.short_side, args.jpeg_quality))


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
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
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


class _LabelCheck:
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


# ---------------------------------------------------------------------------------------------------------------
# Dataset and datamodule


class KineticsSoundsDataset(ClipDataset):
    """Items ``{"inputs": {"audio": [1, 1024, 128], "visual": [T, 3, S, S]}, "label": int}`` from the cache; the
    ``T`` frames come from :func:`frame_indices` (one per ``T``-th of the clip)."""

    def _frame_indices(self, available: int) -> list[int]:
        return frame_indices(available, self.num_frames, self.train)


class KineticsSoundsDataModule(PreparedCacheDataModule):
    """Kinetics-Sounds from the prepared cache: fbank ``[1, 1024, 128]`` + frames ``[T, 3, S, S]``, 31 classes.

    Args:
        root: the prepared cache (``balance-prepare kinetics_sounds --raw RAW --out OUT``; ``OUT`` here).
        split: ``stratified`` (seeded, class-stratified train/val/test over all clips), ``official`` (the raw
            download's split folders: train, and test, or val when there is no test folder, is the test set;
            validation is the val folder when train, val and test all exist, else carved from train), or
            ``files`` (``split_files``; implied when ``split_files`` is given).
        split_files: ``{"train": path, "test": path}`` (optionally ``"val"``), or ``[train, test]``, in any format
            :func:`read_list_file` reads. Without a val file, validation is carved from the training list
            (stratified, ``val_fraction`` of it, with ``seed``). Listed clips missing from the cache are skipped
            with a warning; cached clips in no list are left out.
        val_fraction: fraction of the clips (of the training clips for ``official`` and ``files``) in validation.
        test_fraction: fraction in test (``stratified`` only).
        num_frames: frames per clip (``T``), one per ``T``-th of the clip; OGM-GE uses 3.
        augment: training items draw their frames at random within the segments and get random resized crop +
            horizontal flip (the papers'); without it, and always in evaluation: the segments' middle frames, resize
            + centre crop.
        **kwargs: :class:`~datamodules.cache.PreparedCacheDataModule`'s (``image_size``) and the base
            datamodule's arguments (``batch_size``, ``num_workers``, ``seed``, ...).
    """

    modalities = ["audio", "visual"]
    num_classes = len(CLASSES)
    title = "Kinetics-Sounds"
    cache_name = "kinetics_sounds"
    cache_version = CACHE_VERSION
    cache_files = ("meta.json", "clips.csv", "audio", "visual")
    split_choices = ("stratified", "official", "files")
    splits_help = SPLITS_HELP

    def __init__(self, root: str | None = None, split: str = "stratified", test_fraction: float = 0.1,
                 num_frames: int = 3, **kwargs) -> None:
        super().__init__(root=root, split=split, **kwargs)
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        self.test_fraction = test_fraction
        self.num_frames = num_frames
        self.split_clips: dict[str, list[str]] = {}

    # -- the cache -------------------------------------------------------------------------------------------------

    def _looks_raw(self) -> bool:
        folders = [p for p in self.root.iterdir() if p.is_dir()]
        return any(p.name in RAW_SPLITS or class_of(p.name) for p in folders)

    def _missing_error(self, problem: str) -> FileNotFoundError:
        return missing_cache_error(
            problem, title=self.title, root=self.root,
            looks_raw=self.root is not None and self.root.is_dir() and self._looks_raw(), command=COMMAND,
            raw_layout=RAW_LAYOUT, cache_layout=CACHE_LAYOUT, obtained=f"as {SOURCE}", prepare=PROG)

    def _read_clips(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        with open(self.root / "clips.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        clips = [r["clip"] for r in rows]
        labels = np.array([CLASSES.index(r["label"]) for r in rows], dtype=np.int64)
        raw_splits = np.array([r["split"] for r in rows], dtype=object)
        frames = np.array([int(r["frames"]) for r in rows])
        lost = [c for c, n in zip(clips, frames) if n < 1 or not clip_cached(c, self.root)]
        if lost:
            raise self._missing_error(f"{len(lost)} clips of {self.root}/clips.csv have no fbank or frames "
                                      f"(e.g. {lost[:3]}); re-run the preparation, it resumes")
        return clips, labels, raw_splits, frames

    # -- splits ----------------------------------------------------------------------------------------------------

    def _split_indices(self, clips: list[str], labels: np.ndarray, raw_splits: np.ndarray) -> dict[str, np.ndarray]:
        if self.split == "stratified":
            fractions = {"train": 1 - self.val_fraction - self.test_fraction, "val": self.val_fraction,
                         "test": self.test_fraction}
            return stratified_split(labels, fractions, self.seed)
        if self.split == "official":
            return self._official_split(labels, raw_splits)
        check = _LabelCheck()

        def check_labels(path: str, listed: list[tuple[str, str, int]]) -> None:
            for key, label, index in listed:
                check(str(path), key, label, CLASSES[labels[index]])

        return self.file_split({clip_key(clip): i for i, clip in enumerate(clips)}, labels, read_list_file,
                               check_labels)

    def _official_split(self, labels: np.ndarray, raw_splits: np.ndarray) -> dict[str, np.ndarray]:
        present = sorted(set(raw_splits.tolist()) - {""})
        if "train" not in present or len(present) < 2:
            found = f"split folders {present}" if present else "no split folders (class folders only)"
            raise ValueError(f"split=official needs a raw download with a train folder and a val or test folder; "
                             f"{self.root} was prepared from one with {found}: use split=stratified or split_files")
        parts = {name: np.flatnonzero(raw_splits == name) for name in present}
        if "test" not in parts:
            parts["test"] = parts.pop("val")  # Kinetics' val set is the usual test set
        if "val" not in parts:
            parts.update(self.carve_val(parts["train"], labels))
        return parts

    # -- datasets --------------------------------------------------------------------------------------------------

    def build_datasets(self) -> dict[str, Dataset]:
        self._check_root()
        clips, labels, raw_splits, frames = self._read_clips()
        parts = self._split_indices(clips, labels, raw_splits)
        self.split_clips = {name: [clips[i] for i in idx] for name, idx in parts.items()}
        return self.split_datasets(parts, lambda idx, train: KineticsSoundsDataset(
            self.root, [clips[i] for i in idx], labels[idx], frames[idx], self.num_frames, self.image_size, train))
