"""The IEMOCAP preparation, ``balance-prepare iemocap --raw RAW --out OUT``: the per-dialog worker, :func:`prepare`
(work items from the release's scan, the report, ``utterances.csv`` and ``meta.json``) and the command line
(:func:`main`, which :mod:`datamodules.iemocap` offers ``balance-prepare`` as ``prepare_main``). It turns the
``IEMOCAP_full_release`` directory (:data:`~datamodules.iemocap_raw.RAW_LAYOUT`) into the cache laid out as
``CACHE_LAYOUT`` that :class:`~datamodules.iemocap.IEMOCAPDataModule` reads.

Per labelled utterance it stores:

- audio: a Kaldi log-mel filter bank of the utterance's wav (16 kHz, 128 bins, 25 ms windows every 10 ms, no
  dither), scaled with AST's AudioSet statistics, cut or zero-padded to 1,024 frames (10.24 s; utterances average
  about 4.5 s, so only long ones are cut): ``float16 [128, 1024]``;
- visual: 3 frames of the dialog's video at the centres of the thirds of the utterance's time span (EmoEvaluation's;
  the middle frame is the span's middle), as JPEG. The video shows both actors side by side; the whole frame is
  kept;
- text: the utterance's line of the dialog transcription, in ``utterances.csv``.

Utterances whose label is not one of the 4 classes are left out and counted by label in the report.
"""

from __future__ import annotations

import csv
import functools
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.clips import clip_cached
from datamodules.iemocap_media import (
    AUDIO_FRAMES,
    FBANK_MEAN,
    FBANK_STD,
    MEL_BINS,
    SAMPLE_RATE,
    frame_times,
    grab_frames,
    log_mel,
)
from datamodules.iemocap_raw import (
    CLASS_OF_CODE,
    CLASSES,
    RAW_LAYOUT,
    SESSION_DIR,
    SOURCE,
    avi_file,
    find_release,
    kept_utterances,
    raw_error,
    scan_release,
    session_dirs,
    wav_file,
)
from datamodules.media import MediaError
from datamodules.preparation import (
    atomic_output,
    atomic_write_text,
    check_params,
    finish,
    not_a_directory,
    prepare_parser,
    PrepareReport,
    remove_stale_temporaries,
    report_reason,
    run_items,
    run_prepare_command,
)

FRAMES = 3
CACHE_VERSION = 1
COMMAND = "balance-prepare iemocap --raw RAW --out OUT"
CACHE_LAYOUT = """\
OUT/
  meta.json                      preparation parameters and counts (written last: marks a complete cache)
  utterances.csv                 utterance,session,dialog,speaker,emotion,label,start,end,text: one row per
                                 usable utterance (emotion: the EmoEvaluation code, label: the class)
  audio/<utterance>.npy          float16 [128, 1024] log-mel filter bank (16 kHz, 10 ms frames)
  visual/<utterance>/0000k.jpg   3 frames at the centres of the thirds of the utterance's span (00001.jpg: the middle)
  prepare_report.txt             what the last preparation did, every failed utterance with its reason"""


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
    utterances = kept_utterances(session_dir, dialog, int(SESSION_DIR.match(session_name).group(1)))
    problems: dict[str, list[str]] = {}

    for u in utterances:
        target = out_path / "audio" / f"{u.utterance}.npy"
        if target.exists():
            continue
        try:
            wave, _ = read_audio(wav_file(session_dir, u), SAMPLE_RATE)
            bank = log_mel(wave, mel_bins, audio_frames).astype(np.float16)
        except (MediaError, ValueError) as error:
            problems.setdefault(u.utterance, []).append(f"audio: {report_reason(error, raw_path)}")
            continue
        with atomic_output(target) as temp:
            np.save(temp, bank)

    todo = [u for u in utterances if not (out_path / "visual" / u.utterance).is_dir()]
    if todo:
        avi = avi_file(session_dir, dialog)
        try:
            times = [t for u in todo for t in frame_times(u.start, u.end, frames)]
            images = grab_frames(avi, times, short_side)
        except MediaError as error:
            for u in todo:
                problems.setdefault(u.utterance, []).append(f"visual: {report_reason(error, raw_path)}")
        else:
            for k, u in enumerate(todo):
                own = images[k * frames:(k + 1) * frames]
                if any(image is None for image in own):
                    problems.setdefault(u.utterance, []).append(
                        f"visual: the span [{u.start}-{u.end}] s is past the end of {report_reason(avi, raw_path)}")
                    continue
                with atomic_output(out_path / "visual" / u.utterance, directory=True) as temp:
                    for j, image in enumerate(own):
                        image.save(temp / f"{j:05d}.jpg", format="JPEG", quality=quality)
    if problems:
        atomic_write_text(Path(failures) / f"{dialog}.json", json.dumps(problems))


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
    if (problem := not_a_directory(raw)) is not None:
        raise raw_error(problem)
    raw = find_release(raw)
    sessions = session_dirs(raw)
    if not sessions:
        raise raw_error(f"{raw} has no Session<n>/ directory")
    if frames < 1 or audio_frames < 1:
        raise ValueError(f"frames and audio_frames must be at least 1, got {frames} and {audio_frames}")
    params = {"sample_rate": SAMPLE_RATE, "fbank": "kaldi hanning 25/10 ms, htk_compat, no dither",
              "mel_bins": int(mel_bins), "audio_frames": int(audio_frames), "fbank_mean": FBANK_MEAN,
              "fbank_std": FBANK_STD, "frames": int(frames), "short_side": int(short_side),
              "jpeg_quality": int(quality)}

    release = scan_release(raw, sessions)
    utterances, texts, text_problems = release.utterances, release.texts, release.text_problems
    by_item: dict[str, list[str]] = {}
    for u in utterances:
        by_item.setdefault(f"{sessions[u.session].name}/{u.dialog}", []).append(u.utterance)
    report = PrepareReport(failed=list(release.failed))
    if not utterances and not report.failed:
        raise raw_error(f"no labelled utterance of the 4 classes in {raw}/Session*/dialog/EmoEvaluation/*.txt")
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


def main(argv: Sequence[str] | None = None) -> None:
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
