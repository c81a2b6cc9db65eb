"""The base datamodule: splits, the batch contract (``inputs``, ``label``, ``index``, ``present``), loaders."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from balance.dropping import drop_inputs
from balance.resampling import TrainingPlan
from balance.missing import missing_mask

SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank`` on, without the padding of ``DistributedSampler``, so that
    distributed evaluation sees every sample exactly once (torchmetrics then sums exact counts over ranks)."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class NoLoneLastBatch(BatchSampler):
    """Batches of ``batch_size`` in the sampler's order, except that a last batch of one sample joins the batch
    before it: a batch of one breaks every batch-norm layer in training mode, and dropping the sample would lose it
    for the epoch (and for a method that values every training sample as it trains). The training plan's size
    changes from epoch to epoch; the loader is built anew for each, so every size is covered."""

    def __init__(self, sampler: Sampler[int], batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)

    def __iter__(self):
        batches = list(super().__iter__())
        if len(batches) > 1 and len(batches[-1]) == 1:
            lone = batches.pop()
            batches[-1] = batches[-1] + lone
        yield from batches

    def __len__(self) -> int:
        count = len(self.sampler)
        full, rest = divmod(count, self.batch_size)
        return full + (rest > 1) + (rest == 1 and full == 0)


def _check_split_sizes(sizes: Mapping[str, int], datamodule: str) -> None:
    """Refuses, before any training, a data set with an empty split: the run would train and then fail to
    select or test a model."""
    empty = [split for split, size in sizes.items() if size == 0]
    if empty:
        listed = ", ".join(f"{split} {size}" for split, size in sizes.items())
        raise ValueError(
            f"{datamodule}: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
            f"(samples per split: {listed}). Every split needs at least one sample: use more data, raise "
            "data.val_fraction / data.test_fraction, or give split files whose items are all in the data")


def _warn_of_classes_missing_from_training(datasets: Mapping[str, Dataset], datamodule: str) -> None:
    """Warns when a class of the validation or test split has no training sample: the model cannot learn it, so
    every such sample is an error whatever the method. Reads ``labels`` where a dataset keeps them (none loads
    media for this)."""
    labels = {split: getattr(datasets[split], "labels", None) for split in SPLITS}
    if labels["train"] is None:
        return
    trained = set(np.asarray(labels["train"]).tolist())
    for split in ("val", "test"):
        if labels[split] is None:
            continue
        values, counts = np.unique(np.asarray(labels[split]), return_counts=True)
        unseen = {int(v): int(c) for v, c in zip(values, counts) if int(v) not in trained}
        if unseen:
            listed = ", ".join(f"class {v} ({c} sample{'s' if c > 1 else ''})" for v, c in unseen.items())
            log.warning(f"{datamodule}: {listed} of the {split} split never occur in training, so the model "
                        "cannot learn them; a stratified split (data.split=stratified where the data set has one) "
                        "or more data keeps every class in training")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _distributed_sampler(dataset: Dataset, shuffle: bool) -> Sampler[int]:
    rank, world = dist.get_rank(), dist.get_world_size()
    if not shuffle:
        return ShardSampler(dataset, rank, world)
    # Lightning calls set_epoch on it every epoch; the seed is the run's (seed_everything exports it).
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)


class InMemoryDataset(Dataset):
    """Per-modality input tensors (first axis = sample) and labels held in memory."""

    def __init__(self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> None:
        lengths = {m: len(x) for m, x in inputs.items()}
        if any(n != len(labels) for n in lengths.values()):
            raise ValueError(f"inputs have lengths {lengths} but there are {len(labels)} labels")
        self.inputs = dict(inputs)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"inputs": {m: x[index] for m, x in self.inputs.items()}, "label": int(self.labels[index])}


class IndexedDataset(Dataset):
    """Adds ``index`` (the position in its split) and, when a missing mask is given, ``present`` to each sample.

    Missing modalities have their inputs zeroed (token ids become padding), as in CPM-Net's masks.
    """

    def __init__(self, dataset: Dataset, modalities: list[str], keep: np.ndarray | None = None) -> None:
        self.dataset = dataset
        self.modalities = modalities
        self.keep = None if keep is None else torch.from_numpy(keep)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        sample["index"] = index
        if self.keep is not None:
            present = self.keep[index]
            sample["inputs"] = drop_inputs(sample["inputs"], self.modalities, present)
            sample["present"] = present
        return sample


class PlannedDataset(Dataset):
    """A split served through a :class:`~balance.resampling.TrainingPlan`: item i is sample ``indices[i]`` with
    only the modalities ``keep[i]``.

    ``index`` stays the sample's position in its split, so per-sample bookkeeping sees copies as their sample.
    ``present`` (combined with any missing-modality mask) tells the model which features to zero; with the
    plan's ``zero_inputs`` the dropped modalities' inputs are zeroed too.
    """

    def __init__(self, dataset: Dataset, plan: TrainingPlan) -> None:
        if not plan.active:
            raise ValueError("PlannedDataset needs an active plan")
        self.dataset = dataset
        self.indices = plan.indices
        self.keep = plan.keep
        self.zero_inputs = plan.zero_inputs

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = dict(self.dataset[int(self.indices[i])])
        keep = self.keep[i]
        if "present" in sample:
            keep = keep & sample["present"]
        if self.zero_inputs:
            sample["inputs"] = drop_inputs(sample["inputs"], list(sample["inputs"]), keep)
        sample["present"] = keep
        return sample


class MultimodalDataModule(pl.LightningDataModule):
    """Base of every datamodule: subclasses set ``modalities`` and ``num_classes`` and build the three splits.

    A subclass implements :meth:`build_datasets`, returning ``{"train", "val", "test"}`` datasets whose items are
    ``{"inputs": {modality: tensor}, "label": int}`` with inputs in ``modalities`` order. The base adds ``index``
    and the optional missing-modality mask, and builds the loaders (training shuffled from the global seed, so a
    resumed run continues the same order; evaluation in order, nothing dropped). Under DDP the loaders shard
    themselves: training through ``DistributedSampler``, evaluation through :class:`ShardSampler`, which never
    pads, so the trainer's ``use_distributed_sampler`` is off in the presets.

    Args:
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader workers.
        seed: seed of the split and of the missing mask.
        missing_rate: fraction of (sample, modality) slots dropped in every split (0 = none).
        pin_memory: pin host memory for GPU runs.
    """

    modalities: list[str]
    num_classes: int

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        missing_rate: float = 0.0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        for name, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"data.{name} must be an integer >= {minimum}, got {value!r}")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size < 1):
            raise ValueError(f"data.eval_batch_size must be an integer >= 1 or null, got {eval_batch_size!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.missing_rate = missing_rate
        self.pin_memory = pin_memory
        self.datasets: dict[str, IndexedDataset] = {}
        self._train_eval: IndexedDataset | None = None
        self.train_plan = TrainingPlan()

    def build_datasets(self) -> dict[str, Dataset]:
        """Returns the raw ``train``/``val``/``test`` datasets (items without ``index``).

        A datamodule whose training items are augmented also returns ``train_eval``: the same training samples
        with evaluation transforms, which :meth:`evaluation_view` serves for valuing or diagnosing the split.
        """
        raise NotImplementedError

    @property
    def encoder_kwargs(self) -> dict[str, dict[str, Any]]:
        """Modality -> encoder arguments only known from the data (e.g. a vocabulary size); run.py fills them in."""
        return {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        raw = self.build_datasets()
        _check_split_sizes({split: len(raw[split]) for split in SPLITS}, type(self).__name__)
        _warn_of_classes_missing_from_training(raw, type(self).__name__)
        masks = {}
        for offset, split in enumerate(SPLITS):
            masks[split] = None
            if self.missing_rate > 0:
                masks[split] = missing_mask(len(raw[split]), len(self.modalities), self.missing_rate,
                                            self.seed + offset)
            self.datasets[split] = IndexedDataset(raw[split], list(self.modalities), masks[split])
        self._train_eval = None
        if raw.get("train_eval") is not None:
            if len(raw["train_eval"]) != len(raw["train"]):
                raise ValueError("train_eval must hold the training samples, in the same order")
            # The same missing-modality mask as training: the view shows the split as training sees it.
            self._train_eval = IndexedDataset(raw["train_eval"], list(self.modalities), masks["train"])

    def use_train_plan(self, plan: TrainingPlan) -> None:
        """Serves the training split through ``plan`` (the resampling method's own object) from the next
        training loader on; the method sets the plan between epochs and the trainer reloads the training loader
        every epoch (the method sets ``trainer.reload_dataloaders_every_n_epochs=1``)."""
        self.train_plan = plan

    def train_dataset(self) -> Dataset:
        """The training split as the next epoch trains on it: through the plan when one is set."""
        self.setup()
        if self.train_plan.active:
            return PlannedDataset(self.datasets["train"], self.train_plan)
        return self.datasets["train"]

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = _distributed_sampler(dataset, shuffle) if _world_size() > 1 else None
        if shuffle:
            # The same order DataLoader(shuffle=True) draws, batched so that no training batch holds one sample.
            batches = NoLoneLastBatch(sampler if sampler is not None else RandomSampler(dataset), batch_size)
            return DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                              pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset(), self.batch_size, shuffle=True)

    def evaluation_view(self, split: str) -> Dataset:
        """The split as evaluation sees it: for ``train``, without training augmentation when the datamodule
        has any (its ``train_eval``)."""
        self.setup()
        if split == "train" and self._train_eval is not None:
            return self._train_eval
        return self.datasets[split]

    def unshuffled_train_dataloader(self, augment: bool = False) -> DataLoader:
        """The training split in order, every sample once, no plan (e.g. to value it); with evaluation
        transforms unless ``augment``."""
        self.setup()
        dataset = self.datasets["train"] if augment else self.evaluation_view("train")
        return self._loader(dataset, self.eval_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.evaluation_view("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.evaluation_view("test"), self.eval_batch_size, shuffle=False)
