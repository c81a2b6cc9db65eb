"""CMU-MOSEI: about 23,000 opinion utterances of YouTube speakers with a sentiment score in
[-3, 3], three modalities: the word-aligned features most of the field uses, as MultiBench ships them
(``mosei_senti_data.pkl``: text 300-d GloVe, audio 74-d COVAREP, visual 35-d Facet, 50 steps). The preparation,
``balance-prepare mosei --raw RAW --out OUT`` (:func:`prepare_main`), turns the pickle into memory-mapped arrays
once, as MultiBench's loader reads it; the datamodule serves binary or 7-class sentiment."""

from __future__ import annotations

import argparse
import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.cache import PreparedCacheDataModule
from datamodules.preparation import atomic_output, atomic_write_text, missing_cache_error

PICKLE = "mosei_senti_data.pkl"
SPLITS = {"train": "train", "val": "valid", "test": "test"}  # ours -> the pickle's
MODALITIES = {"text": "text", "audio": "audio", "visual": "vision"}  # ours -> the pickle's
CACHE_VERSION = 1
PROG = "balance-prepare mosei"
COMMAND = f"{PROG} --raw RAW --out OUT"
TASKS = {"binary": 2, "seven": 7}
SOURCE = ("MultiBench's aligned CMU-MOSEI features (mosei_senti_data.pkl, linked from "
          "https://github.com/pliang279/MultiBench under Affective computing), from the CMU Multimodal SDK's "
          "CMU-MOSEI release")
RAW_LAYOUT = """\
RAW/
  mosei_senti_data.pkl          {"train" | "valid" | "test": {"text": [N, 50, 300] GloVe, "audio": [N, 50, 74]
                                COVAREP, "vision": [N, 50, 35] Facet, "labels": [N, 1, 1] sentiment in [-3, 3],
                                ...}}: the word-aligned features as MultiBench ships them"""
CACHE_LAYOUT = """\
OUT/
  meta.json                     the source, counts per split, the dropped utterances (written last)
  <split>_<modality>.npy        float32 [N, 50, D] per split (train, val, test) and modality (text, audio, visual),
                                each utterance's steps from its first word on, padded with zero steps at the end
  <split>_labels.npy            float32 [N] sentiment scores"""


def _aligned(split: dict) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """MultiBench's reading of one split: utterances without text dropped, -inf audio set to 0, every modality cut
    from the first step with text (the word alignment), the steps shifted to the front and the rest zero."""
    text = np.asarray(split["text"], dtype=np.float32)
    keep = np.abs(text).sum(axis=(1, 2)) > 0
    arrays = {}
    for ours, theirs in MODALITIES.items():
        array = np.nan_to_num(np.asarray(split[theirs], dtype=np.float32)[keep], nan=0.0, neginf=0.0, posinf=0.0)
        arrays[ours] = array
    starts = (np.abs(arrays["text"]).sum(axis=2) > 0).argmax(axis=1)
    steps = arrays["text"].shape[1]
    for name, array in arrays.items():
        shifted = np.zeros_like(array)
        for i, start in enumerate(starts):
            shifted[i, : steps - start] = array[i, start:]
        arrays[name] = shifted
    labels = np.asarray(split["labels"], dtype=np.float32).reshape(len(text), -1)[keep, 0]
    return arrays, labels, int((~keep).sum())


def prepare(raw: str | Path, out: str | Path) -> dict:
    """Writes the cache (``CACHE_LAYOUT``) from ``RAW/mosei_senti_data.pkl``; returns ``meta.json``'s content."""
    raw, out = Path(raw).expanduser().resolve(), Path(out).expanduser().resolve()
    source = raw / PICKLE if raw.is_dir() else raw
    if not source.is_file():
        raise FileNotFoundError(f"CMU-MOSEI: no {PICKLE} in {raw}. Expected layout:\n{RAW_LAYOUT}\nObtain it as "
                                f"{SOURCE}; nothing is downloaded automatically.")
    with open(source, "rb") as handle:
        data = pickle.load(handle)
    missing = [theirs for theirs in SPLITS.values() if theirs not in data]
    if missing:
        raise ValueError(f"{source} has no {missing} split: expected {list(SPLITS.values())}")
    meta = {"dataset": "mosei", "version": CACHE_VERSION, "source": str(source), "sizes": {}, "dropped": {},
            "dims": {}}
    for ours, theirs in SPLITS.items():
        arrays, labels, dropped = _aligned(data[theirs])
        for name, array in arrays.items():
            with atomic_output(out / f"{ours}_{name}.npy") as temp:
                np.save(temp, array)
            meta["dims"][name] = int(array.shape[2])
        with atomic_output(out / f"{ours}_labels.npy") as temp:
            np.save(temp, labels)
        meta["sizes"][ours], meta["dropped"][ours] = int(len(labels)), dropped
        print(f"{PROG}: {ours}: {len(labels)} utterances ({dropped} without text dropped)")
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return meta


def prepare_main(argv: Sequence[str] | None = None) -> None:
    """``balance-prepare mosei --raw RAW --out OUT``."""
    parser = argparse.ArgumentParser(prog=PROG, description="Prepare CMU-MOSEI (MultiBench's aligned features) into "
                                     "memory-mapped arrays.", epilog=f"Raw layout:\n{RAW_LAYOUT}\n\nCache layout:\n"
                                     f"{CACHE_LAYOUT}\n\nSource: {SOURCE}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True, help=f"the directory holding {PICKLE} (or the file itself)")
    parser.add_argument("--out", required=True, help="the cache directory to write (data.root for training)")
    args = parser.parse_args(argv)
    try:
        prepare(args.raw, args.out)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"{PROG}: {error}\n")
    print(f"train with: python train.py data=mosei model=mosei data.root={Path(args.out).expanduser().resolve()}")


def sentiment_classes(scores: np.ndarray, task: str) -> np.ndarray:
    """Class indices of sentiment scores: ``binary``, positive (> 0) against the rest, as MultiBench's
    classification task; ``seven``, the score rounded to an integer in [-3, 3], shifted to 0-6."""
    if task == "binary":
        return (scores > 0).astype(np.int64)
    return (np.clip(np.round(scores), -3, 3) + 3).astype(np.int64)


class SequenceDataset(Dataset):
    """Items ``{"inputs": {modality: [L, D]}, "label": int}`` from memory-mapped arrays ``[N, L, D]``."""

    def __init__(self, arrays: dict[str, np.ndarray], labels: np.ndarray) -> None:
        self.arrays = arrays
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"inputs": {m: torch.from_numpy(np.array(a[index])) for m, a in self.arrays.items()},
                "label": int(self.labels[index])}


class MOSEIDataModule(PreparedCacheDataModule):
    """CMU-MOSEI from the prepared cache: text ``[50, 300]``, audio ``[50, 74]``, visual ``[50, 35]`` per utterance
    (zero steps are padding), binary or 7-class sentiment, the data set's own train/valid/test split.

    Args:
        root: the prepared cache (``balance-prepare mosei --raw RAW --out OUT``; ``OUT`` here).
        task: ``binary`` (positive against the rest, MultiBench's) or ``seven`` (the rounded score, 7 classes).
        **kwargs: the base datamodule's arguments (``batch_size``, ``num_workers``, ``seed``, ``missing_rate``, ...).
    """

    modalities = list(MODALITIES)
    title = "CMU-MOSEI"
    cache_name = "mosei"
    cache_version = CACHE_VERSION
    cache_files = ("meta.json", *(f"{s}_{m}.npy" for s in SPLITS for m in (*MODALITIES, "labels")))
    split_choices = ("official",)
    item_noun = "utterance"

    def __init__(self, root: str | None = None, task: str = "binary", **kwargs) -> None:
        super().__init__(root=root, split="official", **kwargs)
        if task not in TASKS:
            raise ValueError(f"unknown CMU-MOSEI task={task!r}: choose {' or '.join(TASKS)}")
        self.task = task
        self.num_classes = TASKS[task]
        self.dims: dict[str, int] = {}

    def _missing_error(self, problem: str) -> FileNotFoundError:
        return missing_cache_error(
            problem, title=self.title, root=self.root,
            looks_raw=self.root is not None and (self.root / PICKLE).is_file(), command=COMMAND,
            raw_layout=RAW_LAYOUT, cache_layout=CACHE_LAYOUT, obtained=f"as {SOURCE}", prepare=PROG)

    @property
    def encoder_kwargs(self) -> dict[str, dict[str, int]]:
        if not self.dims:
            raise RuntimeError("the feature sizes are read in setup(): call it before reading encoder_kwargs")
        return {m: {"in_dim": d} for m, d in self.dims.items()}

    def build_datasets(self) -> dict[str, Dataset]:
        meta = self._check_root()
        self.dims = {m: int(meta["dims"][m]) for m in self.modalities}
        datasets = {}
        for split in SPLITS:
            arrays = {m: np.load(self.root / f"{split}_{m}.npy", mmap_mode="r") for m in self.modalities}
            scores = np.load(self.root / f"{split}_labels.npy")
            datasets[split] = SequenceDataset(arrays, sentiment_classes(scores, self.task))
        return datasets
