"""The IEMOCAP release as it is unpacked (``RAW_LAYOUT``): where its sessions, sentence wavs, dialog videos,
transcriptions and EmoEvaluation label files lie, the parsing of their lines, the 4 classes the labels map to, the
error for a release that is missing or laid out otherwise, and the scan of all its text files that the preparation
(:mod:`datamodules.iemocap_prepare`) starts with.

Labels come from the summary line of each utterance in ``dialog/EmoEvaluation/<dialog>.txt``; as is usual, the
4 classes are neutral (neu), angry (ang), sad (sad) and happy (hap and exc merged). Other labels (fru, sur, fea,
dis, oth, xxx) are left out; the scan counts them by label for the preparation's report.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CLASSES = ("neutral", "angry", "sad", "happy")
# EmoEvaluation codes of the 4 classes: excited is merged into happy, as in most 4-class IEMOCAP work.
CLASS_OF_CODE = {"neu": "neutral", "ang": "angry", "sad": "sad", "hap": "happy", "exc": "happy"}
SOURCE = ("USC SAIL (https://sail.usc.edu/iemocap/iemocap_release.htm): the IEMOCAP release is granted on "
          "request through its release form; unpack IEMOCAP_full_release.tar.gz")
RAW_LAYOUT = """\
RAW/                                         IEMOCAP_full_release (or the directory holding it)
  Session{1..5}/
    sentences/wav/<dialog>/<utterance>.wav   e.g. Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav
    dialog/transcriptions/<dialog>.txt       lines `Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.`
    dialog/EmoEvaluation/<dialog>.txt        labels and times: `[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu...`
    dialog/avi/DivX/<dialog>.avi             the dialog's video (both actors side by side)"""

SESSION_DIR = re.compile(r"^Session(\d+)$")
# `[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]`; evaluator lines don't match.
_LABEL_LINE = re.compile(r"^\[(\d+(?:\.\d*)?)\s*-\s*(\d+(?:\.\d*)?)\]\s+(\S+)\s+(\w+)\s+\[")
# `Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.`
_TEXT_LINE = re.compile(r"^(\S+)\s+\[(\d+(?:\.\d*)?)-(\d+(?:\.\d*)?)\]:\s?(.*)$")


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


def find_release(raw: Path) -> Path:
    """``raw`` itself if it holds ``Session<n>/`` directories, else its ``IEMOCAP_full_release/`` if that does."""
    nested = raw / "IEMOCAP_full_release"
    if not session_dirs(raw) and nested.is_dir() and session_dirs(nested):
        return nested
    return raw


def session_dirs(raw: Path) -> dict[int, Path]:
    """The ``Session<n>/`` directories of ``raw`` by session number, in order (none if ``raw`` is no directory)."""
    if not raw.is_dir():
        return {}
    found = {}
    for path in raw.iterdir():
        match = SESSION_DIR.match(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _read_text(path: Path) -> str:
    # The release's text files are ASCII; a stray byte must not stop the preparation.
    return path.read_text(encoding="utf-8", errors="replace")


def _label_file(session_dir: Path, dialog: str) -> Path:
    return session_dir / "dialog" / "EmoEvaluation" / f"{dialog}.txt"


def wav_file(session_dir: Path, utterance: Utterance) -> Path:
    return session_dir / "sentences" / "wav" / utterance.dialog / f"{utterance.utterance}.wav"


def avi_file(session_dir: Path, dialog: str) -> Path:
    return session_dir / "dialog" / "avi" / "DivX" / f"{dialog}.avi"


def kept_utterances(session_dir: Path, dialog: str, session: int) -> list[Utterance]:
    """The utterances of a dialog whose label is one of the 4 classes."""
    labels = parse_labels(_read_text(_label_file(session_dir, dialog)), dialog, session)
    return [u for u in labels if u.emotion in CLASS_OF_CODE]


def raw_error(problem: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"IEMOCAP raw download: {problem}. Expected layout:\n{RAW_LAYOUT}\n"
        f"Obtain the data set from {SOURCE}; nothing is downloaded automatically."
    )


@dataclass
class Release:
    """What the text files of the release say: the kept utterances, their transcripts, and what is wrong."""

    utterances: list[Utterance] = field(default_factory=list)
    texts: dict[str, str | None] = field(default_factory=dict)
    text_problems: dict[str, str] = field(default_factory=dict)
    kept: Counter = field(default_factory=Counter)  # per EmoEvaluation code of the 4 classes
    left_out: Counter = field(default_factory=Counter)  # per other code
    failed: list[tuple[str, str]] = field(default_factory=list)  # dialogs without usable labels


def scan_release(raw: Path, sessions: dict[int, Path]) -> Release:
    """Reads every EmoEvaluation and transcription file (cheap: the main process does it before the work)."""
    release = Release()
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
