"""What the image + text data sets (UPMC Food-101, MVSA-Single) share on the raw side: how one is named, obtained
and laid out (:class:`ImageTextSource`, with the error for an unusable raw download and the cache layout its
messages show), the image suffixes read, the decoding and cleaning of raw texts, and the split files of other
projects (MMBT's jsonl, MLA's txt).
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from datamodules.splits import split_file_lines

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)


@dataclass(frozen=True)
class ImageTextSource:
    """How one image + text data set is named, obtained and laid out (for its command and its error messages).

    Args:
        name: the module and ``balance-prepare`` name, also ``meta.json``'s ``dataset``.
        title: the data set's name in messages.
        source: where the data set is obtained.
        raw_layout: the raw download's layout, as shown to users.
        raw_marker: a path that only the raw download has (to tell a user who points ``data.root`` at it).
        columns: the ``items.csv`` columns besides ``item``, ``label`` and ``text``.
    """

    name: str
    title: str
    source: str
    raw_layout: str
    raw_marker: str
    columns: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        return f"balance-prepare {self.name} --raw RAW --out OUT"

    @property
    def cache_layout(self) -> str:
        columns = ",".join(("item", "label", *self.columns, "text"))
        return f"""\
OUT/
  meta.json            parameters, classes and counts (written last: marks a complete cache)
  items.csv            {columns}: one row per usable pair (text: the cleaned text)
  images/<item>.jpg    the image, short side 256 (--short-side), JPEG quality 95
  words.json           every word of the cached texts (alphabetical): the ids of tokens.npy
  tokens.npy           int32 [N, 128 (--max-length)]: row i = the first tokens of row i's text, 0-padded
  lengths.npy          int32 [N]: the token count of every text before truncation
  prepare_report.txt   what the last preparation did, every failed item with its reason
  prepare_params.json  the parameters, checked when resuming"""

    def raw_error(self, problem: str) -> FileNotFoundError:
        """The error for an unusable raw download: the problem, the expected layout and the source."""
        return FileNotFoundError(f"{self.title} raw download: {problem}. Expected layout:\n{self.raw_layout}\n"
                                 f"Obtain the data set from {self.source}; nothing is downloaded automatically.")


def decode_text(data: bytes) -> str:
    """Decodes text of unknown encoding: UTF-8 (a BOM dropped), else Windows-1252, else Latin-1 (never fails).

    Tweets and scraped pages come in all three; Windows-1252 before Latin-1 reads curly quotes and dashes right.
    """
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def clean_text(text: str) -> str:
    """HTML entities decoded, URLs dropped, Unicode compatibility-normalised (NFKC), whitespace collapsed."""
    text = unicodedata.normalize("NFKC", html.unescape(text))
    return " ".join(_URL.sub(" ", text).split())


def read_split_file(path: str | Path) -> list[tuple[str, str]]:
    """Reads a user-supplied split file; returns ``[(item, label name), ...]``.

    Two community formats, detected per line:

    - MMBT's jsonl: ``{"id": ..., "label": "positive", "text": ..., "img": "data/123.jpg"}`` per line; the item is
      the stem of ``img`` (of ``id`` without ``img``).
    - MLA's txt (``my_train_mvsa.txt``, ``my_train_food.txt``): ``123.jpg positive``, ``apple_pie_0.jpg apple_pie``.
    """
    path = Path(path)
    rows = []
    for number, line in split_file_lines(path):
        if line.startswith("{"):
            try:
                entry = json.loads(line)
                name, label = entry.get("img") or entry["id"], entry["label"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{path}:{number}: not an MMBT jsonl row with img/id and label ({error})") from None
        else:
            fields = line.replace(",", " ").split()
            if len(fields) < 2:
                raise ValueError(f"{path}:{number}: expected `<image> <label>` (MLA) or a jsonl row (MMBT), "
                                 f"got {line!r}")
            name, label = fields[0], fields[1]
        rows.append((Path(str(name)).stem, str(label).strip().lower()))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows
