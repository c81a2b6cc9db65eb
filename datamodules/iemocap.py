"""IEMOCAP: dyadic sessions of 10 actors (5 sessions, one woman and one man each), audio + video + transcript,
4 emotion classes (Busso et al., 2008).

Preparation (once): ``balance-prepare iemocap --raw RAW --out OUT`` turns the ``IEMOCAP_full_release`` directory
(``RAW_LAYOUT``) into a cache laid out as ``CACHE_LAYOUT``. Per labelled utterance it stores:

- audio: a Kaldi log-mel filter bank of the utterance's wav (16 kHz, 128 bins, 25 ms windows every 10 ms, no
  dither), scaled with AST's AudioSet statistics, cut or zero-padded to 1,024 frames (10.24 s; utterances average
  about 4.5 s, so only long ones are cut): ``float16 [128, 1024]``;
- visual: 3 frames of the dialog's video at the centres of the thirds of the utterance's time span (EmoEvaluation's;
  the middle frame is the span's middle), as JPEG. The video shows both actors side by side; the whole frame is
  kept;
- text: the utterance's line of the dialog transcription, in ``utterances.csv``.

Labels come from the summary line of each utterance in ``dialog/EmoEvaluation/<dialog>.txt``; as is usual, the
4 classes are neutral (neu), angry (ang), sad (sad) and happy (hap and exc merged). Other labels (fru, sur, fea,
dis, oth, xxx) are left out and counted by label in the report. The default split leaves one session out
(speaker-independent test); MLA's pooled random 60/20/20 split is an option.
"""

from __future__ import annotations

import csv
import functools
import json
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.cache import PreparedCacheDataModule
from datamodules.clips import ClipDataset, clip_cached
from datamodules.media import MediaError, check_file, resized_size
from datamodules.preparation import (
    missing_cache_error,
    PrepareReport,
    prepare_parser,
    run_prepare_command,
    atomic_output,
    atomic_write_text,
    check_params,
    finish,
    remove_stale_temporaries,
    run_items,
)
from datamodules.splits import random_split
from datamodules.text import Vocabulary

CLASSES = ("neutral", "angry", "sad", "happy")
# EmoEvaluation codes of the 4 classes: excited is merged into happy, as in most 4-class IEMOCAP work.
CLASS_OF_CODE = {"neu": "neutral", "ang": "angry", "sad": "sad", "hap": "happy", "exc": "happy"}
SAMPLE_RATE = 16000
MEL_BINS = 128
AUDIO_FRAMES = 1024
# AST's AudioSet filter-bank statistics: they only set the scale (a BatchNorm follows the first convolution).
FBANK_MEAN = -4.2677393
FBANK_STD = 4.5689974
FRAMES = 3
CACHE_VERSION = 1
# Seeking lands on the keyframe before the target and decodes from there: worth it only for a long jump ahead.
SEEK_AHEAD_SECONDS = 2.0
# A span may end a little after the last frame (the video is slightly shorter than the audio): take the last frame.
END_TOLERANCE_SECONDS = 1.0

SOURCE = ("USC SAIL (https://sail.usc.edu/iemocap/iemocap_release.htm): the IEMOCAP release is granted on "
          "request through its release form; unpack IEMOCAP_full_release.tar.gz")
COMMAND = "balance-prepare iemocap --raw RAW --out OUT"
RAW_LAYOUT = """\
RAW/                                         IEMOCAP_full_release (or the directory holding it)
  Session{1..5}/
    sentences/wav/<dialog>/<utterance>.wav   e.g. Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav
    dialog/transcriptions/<dialog>.txt       lines `Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.`
    dialog/EmoEvaluation/<dialog>.txt        labels and times: `[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu...`
    dialog/avi/DivX/<dialog>.avi             the dialog's video (both actors side by side)"""
CACHE_LAYOUT = """\
OUT/
  meta.json                      preparation parameters and counts (written last: marks a complete cache)
  utterances.csv                 utterance,session,dialog,speaker,emotion,label,start,end,text: one row per
                                 usable utterance (emotion: the EmoEvaluation code, label: the class)
  audio/<utterance>.npy          float16 [128, 1024] log-mel filter bank (16 kHz, 10 ms frames)
  visual/<utterance>/0000k.jpg   3 frames at the centres of the thirds of the utterance's span (00001.jpg: the middle)
  prepare_report.txt             what the last preparation did, every failed utterance with its reason"""
SPLITS_HELP = "session (leave one session out, default) or random (MLA's pooled 60/20/20)"

_SESSION_DIR = re.compile(r"^Session(\d+)$")
# `[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]`; evaluator lines don't match.
_LABEL_LINE = re.compile(r"^\[(\d+(?:\.\d*)?)\s*-\s*(\d+(?:\.\d*)?)\]\s+(\S+)\s+(\w+)\s+\[")
# `Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.`
_TEXT_LINE = re.compile(r"^(\S+)\s+\[(\d+(?:\.\d*)?)-(\d+(?:\.\d*)?)\]:\s?(.*)$")


# ---------------------------------------------------------------------------------------------------------------
# The raw files


@dataclass(frozen=True)
class Utterance:
    """One labelled utterance: its id, dialog, session, time span in the dialog (seconds) and EmoEvaluation code."""

    utterance: str
    dialog: str
    session: int
    start: float
    end: float
    emotion: str

    @property
    def speaker(self) -> str:
        """``Ses01F_impro01_M000`` -> ``Ses01M``: the session and the speaking actor's gender letter."""
        return self.utterance[:5] + self.utterance.rsplit("_", 1)[-1][0]


def parse_labels(text: str, dialog: str, session: int) -> list[Utterance]:
    """The utterances of an EmoEvaluation file's summary lines (per-evaluator lines and comments are ignored).

    Args:
        text: the file's content.
        dialog: the dialog name (the file's stem); only utterances named ``<dialog>_...`` are kept.
        session: the session number.
    """
    utterances = []
    for line in text.splitlines():
        match = _LABEL_LINE.match(line.strip())
        if match and match.group(3).startswith(f"{dialog}_"):
            start, end, name, code = match.groups()
            utterances.append(Utterance(name, dialog, session, float(start), float(end), code.lower()))
    return utterances


def parse_transcription(text: str, dialog: str) -> dict[str, str]:
    """Utterance id -> transcript from a transcription file; lines that are not utterances are skipped."""
    texts = {}
    for line in text.splitlines():
        match = _TEXT_LINE.match(line.strip())
        if match and match.group(1).startswith(f"{dialog}_"):
            texts[match.group(1)] = match.group(4).strip()
    return texts


def frame_times(start: float, end: float, count: int) -> list[float]:
    """Where the frames of an utterance are taken: the centres of ``count`` equal parts of ``[start, end]``
    (seconds in the dialog video); for ``count = 1`` the middle of the span."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if end < start:
        raise ValueError(f"the span [{start}, {end}] ends before it starts")
    return [start + (k + 0.5) * (end - start) / count for k in range(count)]


def find_release(raw: Path) -> Path:
    """``raw`` itself if it holds ``Session<n>/`` directories, else its ``IEMOCAP_full_release/`` if that does."""
    nested = raw / "IEMOCAP_full_release"
    if not _sessions(raw) and nested.is_dir() and _sessions(nested):
        return nested
    return raw


def _sessions(raw: Path) -> dict[int, Path]:
    if not raw.is_dir():
        return {}
    found = {}
    for path in raw.iterdir():
        match = _SESSION_DIR.match(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _read_text(path: Path) -> str:
    # The release's text files are ASCII; a stray byte must not stop the preparation.
    return path.read_text(encoding="utf-8", errors="replace")


def _label_file(session_dir: Path, dialog: str) -> Path:
    return session_dir / "dialog" / "EmoEvaluation" / f"{dialog}.txt"


def _wav(session_dir: Path, utterance: Utterance) -> Path:
    return session_dir / "sentences" / "wav" / utterance.dialog / f"{utterance.utterance}.wav"


def _avi(session_dir: Path, dialog: str) -> Path:
    return session_dir / "dialog" / "avi" / "DivX" / f"{dialog}.avi"


def _kept_utterances(session_dir: Path, dialog: str, session: int) -> list[Utterance]:
    """The utterances of a dialog whose label is one of the 4 classes."""
    labels = parse_labels(_read_text(_label_file(session_dir, dialog)), dialog, session)
    return [u for u in labels if u.emotion in CLASS_OF_CODE]


# ---------------------------------------------------------------------------------------------------------------
# Preparation


def log_mel(wave: np.ndarray, mel_bins: int = MEL_BINS, frames: int = AUDIO_FRAMES) -> np.ndarray:
    """The audio input from a 16 kHz mono waveform: ``float32 [mel_bins, frames]``.

    A Kaldi filter bank (``torchaudio.compliance.kaldi.fbank``: 25 ms Hanning windows every 10 ms, log mel
    energies, no dither so that the cache is deterministic), scaled as ``(x - FBANK_MEAN) / (2 * FBANK_STD)``, then
    cut to its first ``frames`` frames or padded at the end with zeros (the scaled mean).
    """
    from torchaudio.compliance.kaldi import fbank

    if len(wave) < SAMPLE_RATE * 25 // 1000:
        raise ValueError(f"{len(wave)} samples: shorter than one 25 ms window")
    bank = fbank(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None], sample_frequency=SAMPLE_RATE,
                 num_mel_bins=mel_bins, frame_length=25.0, frame_shift=10.0, dither=0.0, window_type="hanning",
                 htk_compat=True, use_energy=False)
    bank = (bank[:frames] - FBANK_MEAN) / (2 * FBANK_STD)
    out = torch.zeros(frames, mel_bins)
    out[: len(bank)] = bank
    return out.T.contiguous().numpy()


def grab_frames(path: str | Path, times: Sequence[float], short_side: int | None = 224) -> list:
    """The video frames shown at ``times`` (seconds), decoding the video once for all of them.

    For each time: the first frame whose timestamp is at or after it (half a frame of tolerance, as
    :func:`datamodules.media.extract_frames`). Times are visited in increasing order, decoding forward and seeking
    (PyAV, to the keyframe before the target) only for a jump of more than ``SEEK_AHEAD_SECONDS`` ahead or back.
    A time after the last frame gets the last frame if it is at most ``END_TOLERANCE_SECONDS`` after it, else
    ``None``.

    Args:
        path: the video file.
        times: the timestamps, in any order.
        short_side: resize so that the shorter side has this many pixels (bicubic); ``None`` or 0 keeps the size.

    Returns:
        One RGB PIL image (or ``None``) per time, in the order of ``times``.

    Raises:
        MediaError: missing, empty or corrupt file, or no video stream.
    """
    import av
    from PIL import Image

    path = check_file(path)
    images: list = [None] * len(times)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            half = 0.5 / float(stream.average_rate or stream.guessed_rate or 25)
            decoded, frame, exhausted = None, None, False
            for i in sorted(range(len(times)), key=lambda k: times[k]):
                target = max(0.0, float(times[i]))
                if decoded is None or (frame is not None and not frame.time - half <= target
                                       <= frame.time + SEEK_AHEAD_SECONDS):
                    container.seek(int(target / stream.time_base), stream=stream, backward=True)
                    decoded, frame, exhausted = container.decode(stream), None, False
                while not exhausted and (frame is None or frame.time + half < target):
                    following = next(decoded, None)
                    if following is None:
                        exhausted = True
                    else:
                        frame = following
                if frame is None or frame.time + half + END_TOLERANCE_SECONDS < target:
                    continue
                image = frame.to_image()
                size = resized_size(image.width, image.height, short_side)
                images[i] = image if size == image.size else image.resize(size, Image.BICUBIC)
    except MediaError:
        raise
    except Exception as error:  # av.FFmpegError and subclasses, OSError
        raise MediaError(f"{path}: unreadable video ({type(error).__name__}: {error})") from error
    return images


def _short(error: Exception, raw: Path) -> str:
    return str(error).replace(f"{raw}/", "")


def _prepare_dialog(item: str, raw: str, out: str, failures: str, frames: int, short_side: int, quality: int,
                    mel_bins: int, audio_frames: int) -> None:
    """Writes the audio and frames of every kept utterance of one dialog (``item``: ``Session<n>/<dialog>``).

    The video is decoded once for all its utterances. Utterances that fail are written with their reasons to
    ``<failures>/<dialog>.json`` for the main process's report.
    """
    from datamodules.media import read_audio

    raw_path, out_path = Path(raw), Path(out)
    session_name, dialog = item.split("/")
    session_dir = raw_path / session_name
    utterances = _kept_utterances(session_dir, dialog, int(_SESSION_DIR.match(session_name).group(1)))
    problems: dict[str, list[str]] = {}

    for u in utterances:
        target = out_path / "audio" / f"{u.utterance}.npy"
        if target.exists():
            continue
        try:
            wave, _ = read_audio(_wav(session_dir, u), SAMPLE_RATE)
            bank = log_mel(wave, mel_bins, audio_frames).astype(np.float16)
        except (MediaError, ValueError) as error:
            problems.setdefault(u.utterance, []).append(f"audio: {_short(error, raw_path)}")
            continue
        with atomic_output(target) as temp:
            np.save(temp, bank)

    todo = [u for u in utterances if not (out_path / "visual" / u.utterance).is_dir()]
    if todo:
        avi = _avi(session_dir, dialog)
        try:
            times = [t for u in todo for t in frame_times(u.start, u.end, frames)]
            images = grab_frames(avi, times, short_side)
        except MediaError as error:
            for u in todo:
                problems.setdefault(u.utterance, []).append(f"visual: {_short(error, raw_path)}")
        else:
            for k, u in enumerate(todo):
                own = images[k * frames:(k + 1) * frames]
                if any(image is None for image in own):
                    problems.setdefault(u.utterance, []).append(
                        f"visual: the span [{u.start}-{u.end}] s is past the end of {_short(avi, raw_path)}")
                    continue
                with atomic_output(out_path / "visual" / u.utterance, directory=True) as temp:
                    for j, image in enumerate(own):
                        image.save(temp / f"{j:05d}.jpg", format="JPEG", quality=quality)
    if problems:
        atomic_write_text(Path(failures) / f"{dialog}.json", json.dumps(problems))


def _raw_error(problem: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"IEMOCAP raw download: {problem}. Expected layout:\n{RAW_LAYOUT}\n"
        f"Obtain the data set from {SOURCE}; nothing is downloaded automatically."
    )


@dataclass
class _Release:
    """What the text files of the release say: the kept utterances, their transcripts, and what is wrong."""

    utterances: list[Utterance] = field(default_factory=list)
    texts: dict[str, str | None] = field(default_factory=dict)
    text_problems: dict[str, str] = field(default_factory=dict)
    kept: Counter = field(default_factory=Counter)  # per EmoEvaluation code of the 4 classes
    left_out: Counter = field(default_factory=Counter)  # per other code
    failed: list[tuple[str, str]] = field(default_factory=list)  # dialogs without usable labels


def _scan(raw: Path, sessions: dict[int, Path]) -> _Release:
    """Reads every EmoEvaluation and transcription file (cheap: the main process does it before the work)."""
    release = _Release()
    for session, session_dir in sessions.items():
        for wav_dir in sorted((session_dir / "sentences" / "wav").glob("Ses*")):
            if wav_dir.is_dir() and not _label_file(session_dir, wav_dir.name).is_file():
                release.failed.append((wav_dir.name, f"{session_dir.name}/dialog/EmoEvaluation/{wav_dir.name}.txt: "
                                                     "no such file (no labels for this dialog's wav files)"))
        for label_file in sorted((session_dir / "dialog" / "EmoEvaluation").glob("Ses*.txt")):
            dialog = label_file.stem
            try:
                labelled = parse_labels(_read_text(label_file), dialog, session)
            except OSError as error:
                release.failed.append((dialog, f"{label_file.relative_to(raw)}: unreadable ({error})"))
                continue
            kept = [u for u in labelled if u.emotion in CLASS_OF_CODE]
            release.left_out.update(u.emotion for u in labelled if u.emotion not in CLASS_OF_CODE)
            release.kept.update(u.emotion for u in kept)
            transcription = session_dir / "dialog" / "transcriptions" / f"{dialog}.txt"
            lines, unusable = None, "no such file"
            if transcription.is_file():
                try:
                    lines = parse_transcription(_read_text(transcription), dialog)
                except OSError as error:
                    unusable = f"unreadable ({error})"
            for u in kept:
                text = None if lines is None else lines.get(u.utterance)
                release.texts[u.utterance] = text
                if text is None:
                    missing = unusable if lines is None else f"no line for {u.utterance}"
                    release.text_problems[u.utterance] = f"text: {transcription.relative_to(raw)}: {missing}"
            release.utterances += kept
    return release


def prepare(
    raw: str | Path,
    out: str | Path,
    workers: int | None = None,
    frames: int = FRAMES,
    short_side: int = 224,
    quality: int = 95,
    mel_bins: int = MEL_BINS,
    audio_frames: int = AUDIO_FRAMES,
) -> PrepareReport:
    """Prepares the cache (``CACHE_LAYOUT``) from the raw release (``RAW_LAYOUT``); resumable.

    One work item per dialog (its video is decoded once); the report counts utterances: those prepared now,
    those skipped because their audio and frames exist, and every failed one with its reason (unreadable or
    missing wav or video, no transcription line). Utterances whose label is not one of the 4 classes are left out
    and counted by label. Exits with status 1 when no usable utterance is left, 2 when ``out`` was prepared with
    other parameters.

    Args:
        raw: ``IEMOCAP_full_release`` or the directory holding it.
        out: the cache directory (``data.root``).
        workers: processes (default: all cores).
        frames: frames kept per utterance (at the centres of equal parts of its span).
        short_side: frames are resized so that their short side has this many pixels (0 keeps 720 x 480).
        quality: JPEG quality.
        mel_bins: mel bins of the filter bank.
        audio_frames: filter-bank frames (10 ms each) kept per utterance; shorter utterances are zero-padded.
    """
    raw, out = Path(raw).expanduser().resolve(), Path(out).expanduser().resolve()
    if not raw.is_dir():
        raise _raw_error(f"{raw} does not exist")
    raw = find_release(raw)
    sessions = _sessions(raw)
    if not sessions:
        raise _raw_error(f"{raw} has no Session<n>/ directory")
    if frames < 1 or audio_frames < 1:
        raise ValueError(f"frames and audio_frames must be at least 1, got {frames} and {audio_frames}")
    params = {"sample_rate": SAMPLE_RATE, "fbank": "kaldi hanning 25/10 ms, htk_compat, no dither",
              "mel_bins": int(mel_bins), "audio_frames": int(audio_frames), "fbank_mean": FBANK_MEAN,
              "fbank_std": FBANK_STD, "frames": int(frames), "short_side": int(short_side),
              "jpeg_quality": int(quality)}

    release = _scan(raw, sessions)
    utterances, texts, text_problems = release.utterances, release.texts, release.text_problems
    by_item: dict[str, list[str]] = {}
    for u in utterances:
        by_item.setdefault(f"{sessions[u.session].name}/{u.dialog}", []).append(u.utterance)
    report = PrepareReport(failed=list(release.failed))
    if not utterances and not report.failed:
        raise _raw_error(f"no labelled utterance of the 4 classes in {raw}/Session*/dialog/EmoEvaluation/*.txt")
    check_params(out, params, "balance-prepare iemocap")

    remove_stale_temporaries(out / "audio", out / "visual")
    failures = out / ".failures"
    shutil.rmtree(failures, ignore_errors=True)
    failures.mkdir(parents=True)
    done_before = {u.utterance for u in utterances if clip_cached(u.utterance, out)}
    work = functools.partial(_prepare_dialog, raw=str(raw), out=str(out), failures=str(failures), frames=frames,
                             short_side=short_side, quality=quality, mel_bins=mel_bins, audio_frames=audio_frames)
    run = run_items(sorted(by_item), work, workers=workers, desc="IEMOCAP: preparing dialogs",
                    is_done=lambda item: all(clip_cached(name, out) for name in by_item[item]))
    reasons: dict[str, list[str]] = {}
    for path in failures.glob("*.json"):
        reasons.update(json.loads(path.read_text()))
    for item, reason in run.failed:  # the dialog's worker itself failed (e.g. crashed)
        for name in by_item[item]:
            reasons.setdefault(name, [reason])
    shutil.rmtree(failures, ignore_errors=True)

    usable = []
    for u in utterances:
        problems = [] if clip_cached(u.utterance, out) else list(reasons.get(u.utterance, ["no output written"]))
        problems += [text_problems[u.utterance]] if u.utterance in text_problems else []
        if problems:
            report.failed.append((u.utterance, "; ".join(problems)))
        else:
            usable.append(u)
            (report.done if u.utterance in done_before else report.ok).append(u.utterance)

    rows = [["utterance", "session", "dialog", "speaker", "emotion", "label", "start", "end", "text"]]
    rows += [[u.utterance, u.session, u.dialog, u.speaker, u.emotion, CLASS_OF_CODE[u.emotion], u.start, u.end,
              texts[u.utterance]] for u in usable]
    details = [
        f"raw: {raw} (sessions {', '.join(map(str, sessions))}; {len(by_item)} dialogs with kept utterances)",
        f"labels kept: {len(utterances)} utterances of neu, ang, sad, hap + exc (happy: hap "
        f"{release.kept['hap']}, exc {release.kept['exc']})",
        "left out by label: " + (", ".join(f"{code} {n}" for code, n in sorted(release.left_out.items())) or "none"),
        f"out: {out}",
    ]
    if usable:
        with atomic_output(out / "utterances.csv") as temp, open(temp, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    finish(report, out, "balance-prepare iemocap", details, usable=len(usable))  # exits 1 if nothing is usable
    meta = {"dataset": "iemocap", "version": CACHE_VERSION, "params": params, "classes": list(CLASSES),
            "class_of_code": CLASS_OF_CODE, "audio_shape": [mel_bins, audio_frames], "frames": frames,
            "num_utterances": len(usable), "num_failed": len(report.failed),
            "left_out": dict(sorted(release.left_out.items())), "sessions": sorted({u.session for u in usable})}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return report


def prepare_main(argv: Sequence[str] | None = None) -> None:
    """``balance-prepare iemocap --raw RAW --out OUT [--workers N] [--frames 3] [--short-side 224] ...``."""
    parser = prepare_parser("iemocap", "Prepare IEMOCAP (IEMOCAP_full_release) into filter banks, frames and "
                            "transcripts per utterance.", RAW_LAYOUT, CACHE_LAYOUT, SOURCE, short_side=224)
    parser.add_argument("--frames", type=int, default=FRAMES,
                        help=f"frames per utterance, at the centres of equal parts of its span (default {FRAMES})")
    parser.add_argument("--mel-bins", type=int, default=MEL_BINS, help=f"default {MEL_BINS}")
    parser.add_argument("--audio-frames", type=int, default=AUDIO_FRAMES,
                        help=f"10 ms filter-bank frames per utterance, cut or zero-padded (default {AUDIO_FRAMES})")
    args = parser.parse_args(argv)
    run_prepare_command(parser, "iemocap", args.out, lambda: prepare(
        args.raw, args.out, args.workers, args.frames, args.short_side, args.jpeg_quality, args.mel_bins,
        args.audio_frames))


# ---------------------------------------------------------------------------------------------------------------
# Dataset and datamodule


class IEMOCAPDataset(ClipDataset):
    """Items ``{"inputs": {"audio": [1, 128, 1024], "visual": [T, 3, S, S], "text": [L]}, "label": int}``.

    The cache stores audio and frames in CREMA-D's layout (``audio/<id>.npy``, ``visual/<id>/0000k.jpg``), so
    reading them and choosing the frames (random in training, centres of equal parts in evaluation) is
    :class:`ClipDataset`'s; this adds the token ids of the transcript.

    Args:
        tokens: ``LongTensor[N, L]`` token ids of the utterances' transcripts.
        *args, **kwargs: :class:`ClipDataset`'s (root, utterance ids, labels, frames per utterance, ...).
    """

    def __init__(self, *args, tokens: torch.Tensor, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(tokens) != len(self.clips):
            raise ValueError(f"{len(tokens)} token rows for {len(self.clips)} utterances")
        self.tokens = tokens

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        item["inputs"]["text"] = self.tokens[index]
        return item


class IEMOCAPDataModule(PreparedCacheDataModule):
    """IEMOCAP from the prepared cache: filter bank ``[1, 128, 1024]`` + frames ``[T, 3, S, S]`` + transcript
    token ids ``[max_length]``, 4 classes (neutral, angry, sad, happy with excited merged).

    The vocabulary is built from the transcripts of the training split only (validation and test words unseen in
    training map to unknown); ``encoder_kwargs`` passes its size to the text encoder.

    Args:
        root: the prepared cache (``balance-prepare iemocap --raw RAW --out OUT``; ``OUT`` here).
        split: ``session`` (speaker-independent: ``test_session`` is the test split; validation is
            ``val_session`` or, when that is ``None``, a class-stratified ``val_fraction`` of the other sessions'
            utterances) or ``random`` (MLA's pooled random split of all utterances: ``1 - val_fraction -
            test_fraction`` / ``val_fraction`` / ``test_fraction``, not stratified).
        test_session: the session left out for testing (``split=session``).
        val_session: a second session left out for validation (``split=session``); ``None`` carves validation
            from the training sessions (its speakers are then also in training).
        val_fraction: fraction of the training sessions' utterances (``session``) or of all (``random``) in
            validation.
        test_fraction: fraction of all utterances in test (``random`` only).
        num_frames: frames per utterance (``T``), from those the preparation stored (3 by default).
        image_size: side of the square frames fed to the model.
        augment: random resized crop + horizontal flip on training frames; evaluation uses resize + centre crop.
        max_length: transcript length in tokens (longer ones are truncated, shorter padded).
        min_count: training-word count below which a word maps to unknown.
        **kwargs: the base datamodule's arguments (``batch_size``, ``num_workers``, ``seed``, ``missing_rate``, ...).
    """

    modalities = ["audio", "visual", "text"]
    num_classes = 4
    title = "IEMOCAP"
    cache_name = "iemocap"
    cache_version = CACHE_VERSION
    cache_files = ("meta.json", "utterances.csv", "audio", "visual")
    split_choices = ("session", "random")
    splits_help = SPLITS_HELP

    def __init__(
        self,
        root: str | None = None,
        split: str = "session",
        test_session: int = 5,
        val_session: int | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        num_frames: int = 1,
        max_length: int = 64,
        min_count: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(root=root, split=split, val_fraction=val_fraction, **kwargs)
        if val_session is not None and val_session == test_session:
            raise ValueError(f"val_session and test_session are both {test_session}: choose two sessions")
        if split == "random" and not 0 < test_fraction < 1 - val_fraction:
            raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in (0, 1) and "
                             "leave a training part")
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        self.test_session = test_session
        self.val_session = val_session
        self.test_fraction = test_fraction
        self.num_frames = num_frames
        self.max_length = max_length
        self.min_count = min_count
        self.vocab: Vocabulary | None = None
        self.split_utterances: dict[str, list[str]] = {}

    @property
    def encoder_kwargs(self) -> dict[str, dict[str, int]]:
        if self.vocab is None:
            raise RuntimeError("the vocabulary is built in setup(): call it before reading encoder_kwargs")
        return {"text": {"vocab_size": len(self.vocab)}}

    # -- the cache -------------------------------------------------------------------------------------------------

    def _missing_error(self, problem: str) -> FileNotFoundError:
        looks_raw = self.root is not None and (bool(_sessions(self.root))
                                               or (self.root / "IEMOCAP_full_release").is_dir())
        return missing_cache_error(
            problem, title=self.title, root=self.root, looks_raw=looks_raw, command=COMMAND, raw_layout=RAW_LAYOUT,
            cache_layout=CACHE_LAYOUT, obtained=f"from {SOURCE}", prepare="balance-prepare iemocap",
            download="release")

    def _read_utterances(self) -> list[dict[str, str]]:
        with open(self.root / "utterances.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        lost = [r["utterance"] for r in rows if not clip_cached(r["utterance"], self.root)]
        if lost:
            raise self._missing_error(f"{len(lost)} utterances of {self.root}/utterances.csv have no filter bank or "
                                      f"frames (e.g. {lost[:3]}); re-run the preparation, it resumes")
        return rows

    # -- splits ----------------------------------------------------------------------------------------------------

    def _split_indices(self, sessions: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        if self.split == "random":
            fractions = {"train": 1 - self.val_fraction - self.test_fraction, "val": self.val_fraction,
                         "test": self.test_fraction}
            return random_split(len(labels), fractions, self.seed)
        present = sorted(set(sessions.tolist()))
        for name, session in (("test_session", self.test_session), ("val_session", self.val_session)):
            if session is not None and session not in present:
                raise ValueError(f"{name}={session} is not in the cache {self.root} (sessions {present})")
        test = np.flatnonzero(sessions == self.test_session)
        if self.val_session is not None:
            val = np.flatnonzero(sessions == self.val_session)
            train = np.flatnonzero((sessions != self.test_session) & (sessions != self.val_session))
        else:
            carved = self.carve_val(np.flatnonzero(sessions != self.test_session), labels)
            train, val = carved["train"], carved["val"]
        if len(train) == 0:
            raise ValueError(f"no training utterances left: the cache {self.root} holds sessions {present}")
        return {"train": train, "val": val, "test": test}

    # -- datasets --------------------------------------------------------------------------------------------------

    def build_datasets(self) -> dict[str, Dataset]:
        meta = self._check_root()
        rows = self._read_utterances()
        names = [r["utterance"] for r in rows]
        texts = [r["text"] for r in rows]
        sessions = np.array([int(r["session"]) for r in rows])
        labels = np.array([CLASSES.index(r["label"]) for r in rows])
        parts = self._split_indices(sessions, labels)
        self.split_utterances = {name: [names[i] for i in idx] for name, idx in parts.items()}
        self.vocab = Vocabulary.build((texts[i] for i in parts["train"]), min_count=self.min_count)
        tokens = self.vocab.encode_batch(texts, self.max_length)
        frames = np.full(len(rows), int(meta["frames"]))

        return self.split_datasets(parts, lambda idx, train: IEMOCAPDataset(
            self.root, [names[i] for i in idx], labels[idx], frames[idx], self.num_frames, self.image_size, train,
            tokens=tokens[torch.from_numpy(idx)]))

