"""A small word vocabulary for text modalities, built on the training split only (no external tokenizer).

Ids: 0 is padding, 1 is unknown, then the training words by descending count, ties alphabetically, so the same
texts always give the same ids. A vocabulary round-trips through a plain dict (``to_dict``/``from_dict``) and a
JSON file (``save``/``load``), so a prepared data set can store the one its model was trained with.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

PAD_ID = 0
UNK_ID = 1
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

# Runs of letters/digits (with inner apostrophes, e.g. "don't") or single punctuation marks.
_TOKEN_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Splits a text into lowercase words and punctuation marks.

    Args:
        text: any string.

    Returns:
        The tokens in order, e.g. ``"Is it RED?" -> ["is", "it", "red", "?"]``.
    """
    return _TOKEN_RE.findall(text.lower())


class Vocabulary:
    """Maps tokens to ids and texts to fixed-length id tensors.

    Args:
        tokens: the words in id order, starting at id 2 (padding and unknown are implicit); usually made by
            :meth:`build`.
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        self.itos: list[str] = [PAD_TOKEN, UNK_TOKEN, *tokens]
        self.stoi: dict[str, int] = {token: i for i, token in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary tokens must be unique and must not include the special tokens")

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1, max_size: int | None = None) -> Vocabulary:
        """Builds a vocabulary from (training) texts.

        Args:
            texts: the texts to count words in; pass the training split only.
            min_count: words seen fewer times map to unknown.
            max_size: optional cap on the total size (including padding and unknown); the most frequent words
                are kept.

        Returns:
            The vocabulary, words ordered by descending count, ties alphabetically.
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(token for text in texts for token in tokenize(text))
        counts.pop(PAD_TOKEN, None)
        counts.pop(UNK_TOKEN, None)
        tokens = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        if max_size is not None:
            tokens = tokens[: max(max_size - 2, 0)]
        return cls(tokens)

    def __len__(self) -> int:
        """The number of ids including padding and unknown (an embedding's ``vocab_size``)."""
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"

    def token_ids(self, text: str) -> list[int]:
        """The ids of every token of ``text`` (unknown words -> 1), untruncated."""
        return [self.stoi.get(token, UNK_ID) for token in tokenize(text)]

    def encode(self, text: str, max_length: int) -> torch.Tensor:
        """Encodes one text as a fixed-length id tensor.

        Args:
            text: the text.
            max_length: output length; longer texts are truncated at the end, shorter ones padded with 0.

        Returns:
            ``LongTensor[max_length]``.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        ids = self.token_ids(text)[:max_length]
        out = torch.full((max_length,), PAD_ID, dtype=torch.long)
        out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def encode_batch(self, texts: Iterable[str], max_length: int) -> torch.Tensor:
        """Encodes many texts at once: ``LongTensor[N, max_length]`` (see :meth:`encode`)."""
        rows = [self.encode(text, max_length) for text in texts]
        return torch.stack(rows) if rows else torch.zeros(0, max_length, dtype=torch.long)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The tokens of ``ids``, padding skipped (for inspection and tests)."""
        return [self.itos[i] for i in (int(i) for i in ids) if i != PAD_ID]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description: ``{"tokens": [...]}`` (words from id 2 on)."""
        return {"tokens": self.itos[2:]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        """The inverse of :meth:`to_dict`."""
        return cls(data["tokens"])

    def save(self, path: str | Path) -> None:
        """Writes the vocabulary as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Reads a vocabulary written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))
