"""CREMA-D: 7,442 clips of 91 actors speaking with one of 6 emotions, audio + video (Cao et al., 2014).

Preparation (once): ``balance-prepare crema_d --raw RAW --out OUT`` turns a clone of
https://github.com/CheyneyComputerScience/CREMA-D (media in Git LFS) into a cache laid out as ``CACHE_LAYOUT``:
the log-magnitude spectrogram of every clip computed as OGM-GE does (audio at 22,050 Hz tiled to 3 s, clipped to
[-1, 1], STFT n_fft 512, hop 353, ``log(|S| + 1e-7)``: 257 x 188) and its frames at 1 fps as JPEG. Training then
reads a small ``.npy`` and one or a few JPEGs per item: no audio decoding or STFT per epoch.

The label is the third field of the clip id (``1001_DFA_ANG_XX`` -> ANG), in OGM-GE's class order
NEU, HAP, SAD, FEA, DIS, ANG. Splits: seeded stratified train/val/test (default), actor-disjoint
(speaker-independent), MLA's pooled random split, or user-supplied split files in OGM-GE's (``train.csv``) or
MLA's (``my_train_cre.txt``) format.
"""

from __future__ import annotations

import csv
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from datamodules.clip_cache import ClipCacheDataModule
from datamodules.clips import clip_cached, write_clip
from datamodules.media import tiled_log_stft
from datamodules.preparation import (
    atomic_write_text,
    check_params,
    finish,
    missing_cache_error,
    not_a_directory,
    prepare_parser,
    PrepareReport,
    remove_stale_temporaries,
    report_reason,
    run_items,
    run_prepare_command,
)
from datamodules.splits import group_split, random_split, split_file_lines, stratified_split

CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")  # OGM-GE's class indices
CLASS_WORDS = {"Neutral": "NEU", "Happy": "HAP", "Sad": "SAD", "Fear": "FEA", "Disgust": "DIS", "Anger": "ANG"}
CLIP_ID = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{1,2})$")  # actor_sentence_emotion_level
SAMPLE_RATE = 22050
SECONDS = 3
N_FFT = 512
HOP_LENGTH = 353
SPECTROGRAM_SHAPE = (N_FFT // 2 + 1, SAMPLE_RATE * SECONDS // HOP_LENGTH + 1)  # (257, 188)
CACHE_VERSION = 1
SOURCE = ("https://github.com/CheyneyComputerScience/CREMA-D (the media are stored with Git LFS: "
          "`git lfs install && git clone https://github.com/CheyneyComputerScience/CREMA-D.git`)")
COMMAND = "balance-prepare crema_d --raw RAW --out OUT"
RAW_LAYOUT = """\
RAW/                       a clone of the CREMA-D repository with its Git LFS files pulled
  AudioWAV/<clip>.wav      e.g. AudioWAV/1001_DFA_ANG_XX.wav
  VideoFlash/<clip>.flv    e.g. VideoFlash/1001_DFA_ANG_XX.flv"""
CACHE_LAYOUT = """\
OUT/
  meta.json                 preparation parameters and counts (written last: marks a complete cache)
  clips.csv                 clip,actor,label,frames: one row per usable clip
  audio/<clip>.npy          float16 [257, 188] log-magnitude spectrogram
  visual/<clip>/00000.jpg   frames at 1 fps (00000.jpg = second 0, 00001.jpg = second 1, ...)
  prepare_report.txt        what the last preparation did, every failed clip with its reason"""
SPLITS_HELP = "stratified (default), actor (speaker-independent), random (MLA's pooled), files"


def parse_clip(clip: str) -> tuple[int, str]:
    """``"1001_DFA_ANG_XX"`` -> ``(1001, "ANG")``; raises ``ValueError`` on anything else."""
    match = CLIP_ID.match(clip)
    if match is None or match.group(3) not in CLASSES:
        raise ValueError(f"{clip!r} is not a CREMA-D clip id (<actor>_<sentence>_<emotion>_<level>, "
                         f"emotion one of {', '.join(CLASSES)})")
    return int(match.group(1)), match.group(3)


# ---------------------------------------------------------------------------------------------------------------
# Preparation


def log_spectrogram(wave: np.ndarray) -> np.ndarray:
    """OGM-GE's audio input from a 22,050 Hz mono waveform: ``float32 [257, 188]``: the wave tiled to 3 s (OGM-GE
    tiles three times, enough for every CREMA-D clip; shorter clips are tiled further so the shape never changes),
    STFT with n_fft 512, hop 353 (:func:`~datamodules.media.tiled_log_stft`)."""
    return tiled_log_stft(wave, SAMPLE_RATE * SECONDS, N_FFT, HOP_LENGTH)


def _prepare_clip(clip: str, raw: str, out: str, fps: float, short_side: int, quality: int) -> None:
    raw_path = Path(raw)
    write_clip(clip, Path(out), raw_path / "AudioWAV" / f"{clip}.wav", raw_path / "VideoFlash" / f"{clip}.flv",
               SAMPLE_RATE, log_spectrogram, fps, short_side, quality,
               reason=lambda error: report_reason(error, raw_path))


def _raw_error(raw: Path, problem: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"CREMA-D raw download: {problem}. Expected layout:\n{RAW_LAYOUT}\n"
        f"Obtain the data set from {SOURCE}; nothing is downloaded automatically."
    )


def prepare(
    raw: str | Path,
    out: str | Path,
    workers: int | None = None,
    fps: float = 1.0,
    short_side: int = 224,
    quality: int = 95,
) -> PrepareReport:
    """Prepares the cache (``CACHE_LAYOUT``) from the raw download (``RAW_LAYOUT``); resumable.

    Clips whose spectrogram and frames both exist are skipped; every clip that fails (missing, corrupt, Git LFS
    pointer, not a clip id) is listed with its reason in ``OUT/prepare_report.txt``. Exits with status 1 when no
    usable clip is left, 2 when ``out`` was prepared with other parameters.

    Args:
        raw: the raw download.
        out: the cache directory (``data.root``).
        workers: processes (default: all cores).
        fps: frames kept per second of video.
        short_side: frames are resized so that their short side has this many pixels (0 keeps 480 x 360).
        quality: JPEG quality.
    """
    raw, out = Path(raw).expanduser().resolve(), Path(out).expanduser().resolve()
    audio_dir, video_dir = raw / "AudioWAV", raw / "VideoFlash"
    if (problem := not_a_directory(raw)) is not None:
        raise _raw_error(raw, problem)
    if not audio_dir.is_dir() or not video_dir.is_dir():
        raise _raw_error(raw, f"{raw} has no {'AudioWAV/' if not audio_dir.is_dir() else 'VideoFlash/'} directory")
    params = {"sample_rate": SAMPLE_RATE, "seconds": SECONDS, "n_fft": N_FFT, "hop_length": HOP_LENGTH,
              "stft_pad_mode": "reflect", "resampling": "kaiser_best", "fps": float(fps),
              "short_side": int(short_side), "jpeg_quality": int(quality)}
    wavs = {p.stem for p in audio_dir.glob("*.wav")}
    flvs = {p.stem for p in video_dir.glob("*.flv")}
    if not wavs and not flvs:
        raise _raw_error(raw, f"no .wav in {audio_dir} and no .flv in {video_dir}")
    check_params(out, params, "balance-prepare crema_d")
    report = PrepareReport()
    clips = []
    for clip in sorted(wavs | flvs):
        try:
            parse_clip(clip)
        except ValueError as error:
            report.failed.append((clip, str(error)))
        else:
            clips.append(clip)

    remove_stale_temporaries(out / "audio", out / "visual")
    work = functools.partial(_prepare_clip, raw=str(raw), out=str(out), fps=fps, short_side=short_side,
                             quality=quality)
    run = run_items(clips, work, is_done=functools.partial(clip_cached, out=out), workers=workers,
                    desc="CREMA-D: preparing clips")
    report.ok, report.done, report.failed = run.ok, run.done, report.failed + run.failed

    usable = sorted(report.ok + report.done)
    rows = ["clip,actor,label,frames"]
    for clip in usable:
        actor, label = parse_clip(clip)
        frames = len(list((out / "visual" / clip).glob("*.jpg")))
        rows.append(f"{clip},{actor},{label},{frames}")
    details = [f"raw: {raw} ({len(wavs)} .wav, {len(flvs)} .flv)", f"out: {out}"]
    if usable:
        atomic_write_text(out / "clips.csv", "\n".join(rows) + "\n")
    finish(report, out, "balance-prepare crema_d", details, usable=len(usable))  # exits 1 if nothing is usable
    meta = {"dataset": "crema_d", "version": CACHE_VERSION, "params": params, "classes": list(CLASSES),
            "audio_shape": list(SPECTROGRAM_SHAPE), "num_clips": len(usable), "num_failed": len(report.failed)}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return report


def prepare_main(argv: Sequence[str] | None = None) -> None:
    """``balance-prepare crema_d --raw RAW --out OUT [--workers N] [--fps 1] [--short-side 224]``."""
    parser = prepare_parser("crema_d", "Prepare CREMA-D (AudioWAV/*.wav, VideoFlash/*.flv) into spectrograms and 1 fps "
                            "frames.", RAW_LAYOUT, CACHE_LAYOUT, SOURCE, short_side=224, fps=1.0)
    args = parser.parse_args(argv)
    run_prepare_command(parser, "crema_d", args.out, lambda: prepare(
        args.raw, args.out, args.workers, args.fps, args.short_side, args.jpeg_quality))


# ---------------------------------------------------------------------------------------------------------------
# Split files


def read_split_file(path: str | Path) -> list[tuple[str, str]]:
    """Reads a split file in either community format; returns ``[(clip, label code), ...]``.

    - OGM-GE (``train.csv``/``test.csv``): ``1088_IOM_NEU_XX,NEU`` per row, often with a UTF-8 BOM and CRLF.
    - MLA (``my_train_cre.txt``): ``1085_IWL_SAD_XX.flv Sad`` per line.

    The label is checked against the clip id's emotion field.
    """
    path = Path(path)
    rows = []
    for number, line in split_file_lines(path):
        fields = [f.strip() for f in (line.split(",") if "," in line else line.split())]
        if len(fields) < 2:
            raise ValueError(f"{path}:{number}: expected `clip,LABEL` (OGM-GE) or `clip.flv Label` (MLA), got {line!r}")
        clip = re.sub(r"\.(flv|wav|mp4|npy)$", "", fields[0])
        label = CLASS_WORDS.get(fields[1], fields[1].upper())
        try:
            _, expected = parse_clip(clip)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        if label != expected:
            raise ValueError(f"{path}:{number}: label {fields[1]!r} does not match clip {clip} ({expected})")
        rows.append((clip, label))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Dataset and datamodule


class CremaDDataModule(ClipCacheDataModule):
    """CREMA-D from the prepared cache: audio spectrogram ``[1, 257, 188]`` + frames ``[T, 3, S, S]``, 6 classes.

    Args:
        root: the prepared cache (``balance-prepare crema_d --raw RAW --out OUT``; ``OUT`` here).
        split: ``stratified`` (seeded, class-stratified train/val/test over all clips), ``actor`` (actor-disjoint,
            speaker-independent: fractions of the 91 actors), ``random`` (MLA's pooled random split, not
            stratified), or ``files`` (``split_files``; implied when ``split_files`` is given).
        split_files: ``{"train": path, "test": path}`` (optionally ``"val"``), or ``[train, test]``; each file in
            OGM-GE's csv or MLA's txt format (auto-detected). Without a val file, validation is carved from the
            training file (stratified, ``val_fraction`` of it, with ``seed``). Listed clips missing from the cache
            are skipped with a warning.
        val_fraction: fraction of the clips (of the actors for ``actor``; of the training file for ``files``) in
            validation.
        test_fraction: fraction in test (unused with ``files``).
        num_frames: frames per clip (``T``); OGM-GE uses 1 on CREMA-D, MLA 3.
        **kwargs: :class:`~datamodules.clip_cache.ClipCacheDataModule`'s (``store``, ``pack_dir``) and its base's
            (``image_size``, ``augment``) and the base datamodule's arguments (``batch_size``, ``num_workers``,
            ``seed``, ...).
    """

    num_classes = 6
    title = "CREMA-D"
    cache_name = "crema_d"
    cache_version = CACHE_VERSION
    cache_files = ("meta.json", "clips.csv", "audio", "visual")
    split_choices = ("stratified", "actor", "random", "files")
    splits_help = SPLITS_HELP

    def __init__(self, root: str | None = None, split: str = "stratified", test_fraction: float = 0.1,
                 num_frames: int = 1, **kwargs) -> None:
        super().__init__(root=root, split=split, **kwargs)
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        self.test_fraction = test_fraction
        self.num_frames = num_frames
        self.split_clips: dict[str, list[str]] = {}

    # -- the cache -------------------------------------------------------------------------------------------------

    def _missing_error(self, problem: str) -> FileNotFoundError:
        return missing_cache_error(
            problem, title=self.title, root=self.root,
            looks_raw=self.root is not None and (self.root / "AudioWAV").is_dir(), command=COMMAND,
            raw_layout=RAW_LAYOUT, cache_layout=CACHE_LAYOUT, obtained=f"from {SOURCE}",
            prepare="balance-prepare crema_d")

    def _read_clips(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        with open(self.root / "clips.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        clips = [r["clip"] for r in rows]
        actors = np.array([int(r["actor"]) for r in rows])
        labels = np.array([CLASSES.index(r["label"]) for r in rows])
        frames = np.array([int(r["frames"]) for r in rows])
        lost = [c for c, n in zip(clips, frames) if n < 1 or not clip_cached(c, self.root)]
        if lost:
            raise self._missing_error(f"{len(lost)} clips of {self.root}/clips.csv have no spectrogram or frames "
                                      f"(e.g. {lost[:3]}); re-run the preparation, it resumes")
        return clips, actors, labels, frames

    # -- splits ----------------------------------------------------------------------------------------------------

    def _split_indices(self, clips: list[str], actors: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        fractions = {"train": 1 - self.val_fraction - self.test_fraction, "val": self.val_fraction,
                     "test": self.test_fraction}
        if self.split == "stratified":
            return stratified_split(labels, fractions, self.seed)
        if self.split == "actor":
            return group_split(actors, fractions, self.seed)
        if self.split == "random":
            return random_split(len(clips), fractions, self.seed)
        # read_split_file checks each label against its clip id
        return self.file_split({clip: i for i, clip in enumerate(clips)}, labels, read_split_file)

    # -- datasets --------------------------------------------------------------------------------------------------

    def build_datasets(self) -> dict[str, Dataset]:
        self._check_root()
        clips, actors, labels, frames = self._read_clips()
        parts = self._split_indices(clips, actors, labels)
        self.split_clips = {name: [clips[i] for i in idx] for name, idx in parts.items()}
        self.split_actors = {name: sorted(set(actors[idx].tolist())) for name, idx in parts.items()}
        packs = self.clip_packs(clips, frames)
        return self.split_datasets(parts, lambda idx, train: self.dataset_class(
            self.root, [clips[i] for i in idx], labels[idx], frames[idx], self.num_frames, self.image_size, train,
            packs=packs))
