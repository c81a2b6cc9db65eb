"""IEMOCAP: dyadic sessions of 10 actors (5 sessions, one woman and one man each), audio + video + transcript,
4 emotion classes (Busso et al., 2008). This module holds the dataset and the datamodule (``data=iemocap``) that
read the prepared cache: filter banks, frames and transcripts per utterance, written by ``balance-prepare iemocap
--raw RAW --out OUT`` (:mod:`datamodules.iemocap_prepare`, whose command is ``prepare_main`` here, where
``balance-prepare`` finds it) from the release as :mod:`datamodules.iemocap_raw` reads it. The default split leaves
one session out (speaker-independent test); MLA's pooled random 60/20/20 split is an option.
"""

from __future__ import annotations

import csv

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.clip_cache import ClipCacheDataModule
from datamodules.clips import ClipDataset, clip_cached
from datamodules.iemocap_prepare import CACHE_LAYOUT, CACHE_VERSION, COMMAND
from datamodules.iemocap_prepare import main as prepare_main  # noqa: F401 (balance-prepare finds it here)
from datamodules.iemocap_raw import CLASSES, RAW_LAYOUT, SOURCE, session_dirs
from datamodules.preparation import missing_cache_error
from datamodules.splits import random_split
from datamodules.text import Vocabulary

SPLITS_HELP = "session (leave one session out, default) or random (MLA's pooled 60/20/20)"


class IEMOCAPDataset(ClipDataset):
    """Items ``{"inputs": {"audio": [1, 128, 1024], "visual": [T, 3, S, S], "text": [L]}, "label": int}``.

    The cache stores audio and frames in CREMA-D's layout (``audio/<id>.npy``, ``visual/<id>/0000k.jpg``), so
    reading them and choosing the frames (random in training, centres of equal parts in evaluation) is
    :class:`ClipDataset`'s; this adds the token ids of the transcript.

    Args:
        tokens: ``LongTensor[N, L]`` token ids of the utterances' transcripts.
        *args, **kwargs: :class:`ClipDataset`'s (root, utterance ids, labels, frames per utterance, ...).
    """

    other_modalities = ("text",)

    def __init__(self, *args, tokens: torch.Tensor, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(tokens) != len(self.clips):
            raise ValueError(f"{len(tokens)} token rows for {len(self.clips)} utterances")
        self.tokens = tokens

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        item["inputs"]["text"] = self.tokens[index]
        return item


class IEMOCAPDataModule(ClipCacheDataModule):
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

    dataset_class = IEMOCAPDataset
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
        looks_raw = self.root is not None and (bool(session_dirs(self.root))
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

        packs = self.clip_packs(names, frames)
        return self.split_datasets(parts, lambda idx, train: self.dataset_class(
            self.root, [names[i] for i in idx], labels[idx], frames[idx], self.num_frames, self.image_size, train,
            packs=packs, tokens=tokens[torch.from_numpy(idx)]))
