"""Diagnosing and Re-learning (Wei, Li, Feng, Hu, "Diagnosing and Re-learning for Balanced Multimodal Learning",
ECCV 2024).

Training is joint training (cross-entropy on the fused logits); a few times during it, each modality's learning
state is diagnosed and its encoder is softly re-initialised accordingly. The diagnosis clusters the modality's
features of the training split and of the validation split with KMeans (one cluster per class), each split's
features min-max scaled to [-1, 1] on their own, and takes the purity of the clusters against the labels on each
split. A large gap between the two purities means that the encoder has memorised the training split rather than
learnt what generalises, so it is pulled back towards its initial weights the more the wider the gap:

    g_m = |P_train,m - P_val,m|,   w_m = tanh(lambda g_m),   theta_m <- w_m theta_m,init + (1 - w_m) theta_m

(``theta_m``: the parameters of modality m's encoder and projection; the fusion head and the batch-norm running
statistics are kept). The official loop diagnoses after the epochs ``e > 0`` with ``e % R == 0``, at most N times;
here the diagnosis of epoch e's weights runs at the start of epoch e + 1, after epoch e's validation and
checkpoint, so that the checkpoint selected on validation holds the weights validation measured.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.preprocessing import MinMaxScaler
from torch import nn
from torch.utils.data import DataLoader

from balance import options
from balance.gather import gather_rows
from balance.methods.base import MultimodalMethod
from balance.scopes import evaluation_mode, isolated_rng

#: checkpoint entry holding the encoders' initial weights
INITIAL_WEIGHTS_KEY = "relearning_initial_weights"


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """The share of samples whose label is the most frequent label of their cluster.

    Args:
        labels: ``[N]`` non-negative integer class labels.
        clusters: ``[N]`` cluster assignments.
    """
    majority = sum(int(np.bincount(labels[clusters == c]).max()) for c in np.unique(clusters))
    return majority / len(labels)


def cluster_purity(features: np.ndarray, labels: np.ndarray, num_clusters: int, seed: int, n_init: int) -> float:
    """The purity of a KMeans clustering of ``features`` (``[N, d]``), scaled per dimension to [-1, 1] on
    themselves first, into ``num_clusters`` clusters (fewer if there are fewer samples)."""
    scaled = MinMaxScaler(feature_range=(-1, 1)).fit_transform(features)
    kmeans = KMeans(n_clusters=min(num_clusters, len(features)), random_state=seed, n_init=n_init)
    return purity(labels, kmeans.fit_predict(scaled))


def reinit_weight(train_purity: float, val_purity: float, strength: float) -> float:
    """``w = tanh(strength * |train_purity - val_purity|)``: how far an encoder goes back to its initial weights."""
    return math.tanh(strength * abs(train_purity - val_purity))


def blend(initial: torch.Tensor, current: torch.Tensor, weight: float) -> torch.Tensor:
    """The soft re-initialisation ``weight * initial + (1 - weight) * current``."""
    return weight * initial + (1 - weight) * current


def relearning_epochs(warmup_epochs: int, every: int, times: int) -> list[int]:
    """The 0-based epochs that start with a diagnosis and re-initialisation: ``warmup_epochs``, then every
    ``every`` epochs, ``times`` in all."""
    return [warmup_epochs + k * every for k in range(times)]


@dataclass
class SplitFeatures:
    """One split's encoder features, in sample order (``index``), gathered from every rank.

    Attributes:
        features: modality -> ``[N, d_m]`` features (CPU).
        labels: ``[N]`` labels.
        present: ``[N, M]`` whether each sample has each modality.
    """

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    present: torch.Tensor


class Relearning(MultimodalMethod):
    """Joint training with diagnosis and soft re-initialisation of each encoder (see the module docstring).

    The encoders' initial weights are kept on the CPU and saved in checkpoints (``relearning_initial_weights``),
    so a resumed run re-initialises towards the same point; which epochs re-learn follows from the epoch alone.
    Under DDP every rank encodes its shard, the shards are gathered, rank 0 clusters them and broadcasts the
    purities, so every rank re-initialises alike.

    Args:
        strength: lambda of ``w = tanh(lambda |purity gap|)`` (official ``--move_lambda`` 3).
        relearn_every: epochs between two diagnoses (official ``--reinit_epoch`` 20; BalanceBenchmark 15).
        relearn_times: the most diagnoses in a run (official ``--reinit_num`` 3; BalanceBenchmark 2).
        warmup_epochs: epochs trained before the first diagnosis (``None``: ``relearn_every + 1``, the official
            rule, which diagnoses after the 0-based epochs 20, 40, 60). 0 diagnoses the initial encoders too (their
            pull towards the initial weights changes nothing; the diagnosis is logged and costs what later ones do).
        kmeans_n_init: KMeans restarts (the official call leaves scikit-learn's default: 10 before 1.4, 1 since).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    def __init__(self, strength: float = 3.0, relearn_every: int = 20, relearn_times: int = 3,
                 warmup_epochs: int | None = None, kmeans_n_init: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.non_negative("strength", strength)
        options.integer("relearn_every", relearn_every, 1)
        options.integer("relearn_times", relearn_times, 0)
        if warmup_epochs is not None:
            options.integer("warmup_epochs", warmup_epochs, 0)
        options.integer("kmeans_n_init", kmeans_n_init, 1)
        self.strength = float(strength)
        self.kmeans_n_init = kmeans_n_init
        first = relearn_every + 1 if warmup_epochs is None else warmup_epochs
        self.relearning_epochs = relearning_epochs(first, relearn_every, relearn_times)
        # The weights the model was built with: its initialisation, before any training step (kept on the meta
        # device for a model built there to check a config: it has no values to copy).
        self.initial_weights = {name: p.detach().clone() if p.is_meta else p.detach().cpu().clone()
                                for m in self.modalities for name, p in self.feature_parameters(m).items()}
        for m in self.modalities:
            for name in (f"purity_train_{m}", f"purity_val_{m}", f"reinit_{m}"):
                self.declare_metric(name)

    def feature_parameters(self, modality: str) -> dict[str, nn.Parameter]:
        """The parameters that produce ``modality``'s features (its encoder and projection), by their names in
        the model: what a re-initialisation blends."""
        modules = {"encoders": self.model.encoders}
        if modality in self.model.projections:
            modules["projections"] = self.model.projections
        return {f"{kind}.{modality}.{name}": p for kind, group in modules.items()
                for name, p in group[modality].named_parameters()}

    # -- the diagnosis ---------------------------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        if self.current_epoch in self.relearning_epochs:
            self.relearn(self.fitted_datamodule("Re-learning diagnoses on the datamodule's training and "
                                                "validation splits"))

    def relearn(self, datamodule: Any) -> None:
        """Diagnoses every modality on the datamodule's training split (in order, evaluation transforms) and
        validation split, and re-initialises its encoder; never reads the test split."""
        # The passes draw nothing from the run's random state (a loader's iterator would), so the run's
        # shuffling is the same as without them.
        with isolated_rng():
            train = self.encode_split(datamodule.unshuffled_train_dataloader())
            val = self.encode_split(datamodule.val_dataloader())
        purities = self.diagnose(train, val) if self.global_rank == 0 else None
        if self.trainer.world_size > 1:
            purities = self.trainer.strategy.broadcast(purities, src=0)
        for m in self.modalities:
            train_purity, val_purity = purities[m]
            weight = reinit_weight(train_purity, val_purity, self.strength)
            self.record(f"purity_train_{m}", train_purity)
            self.record(f"purity_val_{m}", val_purity)
            self.record(f"reinit_{m}", weight)
            self.reinitialise(m, weight)

    def diagnose(self, train: SplitFeatures, val: SplitFeatures) -> dict[str, tuple[float, float]]:
        """Modality -> (training purity, validation purity), each over the samples that have the modality."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # the run's seed: the official random_state 0 at seed 0

        def split_purity(split: SplitFeatures, index: int, modality: str) -> float:
            rows = split.present[:, index]
            return cluster_purity(split.features[modality][rows].numpy(), split.labels[rows].numpy(),
                                  self.model.num_classes, seed, self.kmeans_n_init)

        return {m: (split_purity(train, i, m), split_purity(val, i, m)) for i, m in enumerate(self.modalities)}

    @torch.no_grad()
    def reinitialise(self, modality: str, weight: float) -> None:
        """``theta <- weight * theta_init + (1 - weight) * theta`` for the parameters of ``modality``'s features
        (the optimizer's state is kept, as in the official code)."""
        for name, p in self.feature_parameters(modality).items():
            p.copy_(blend(self.initial_weights[name].to(p), p, weight))

    def encode_split(self, loader: DataLoader) -> SplitFeatures:
        """The loader's features in eval mode, gathered from every rank and put in sample order (the clustering
        then does not depend on the number of ranks)."""
        features: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        labels, indices, present = [], [], []
        with evaluation_mode(self.model):
            for batch in loader:
                batch = self.trainer.strategy.batch_to_device(batch)
                for m, f in self.model.encode(batch["inputs"]).items():
                    features[m].append(f.float())
                labels.append(batch["label"])
                indices.append(batch["index"])
                mask = batch.get("present")
                present.append(torch.ones(len(batch["label"]), len(self.modalities), dtype=torch.long,
                                          device=self.device) if mask is None else mask.long())
        order = gather_rows(self, torch.cat(indices)).argsort()

        def gathered(parts: list[torch.Tensor]) -> torch.Tensor:
            return gather_rows(self, torch.cat(parts))[order]

        return SplitFeatures({m: gathered(f) for m, f in features.items()}, gathered(labels), gathered(present).bool())

    # -- checkpoints ---------------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[INITIAL_WEIGHTS_KEY] = self.initial_weights

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if INITIAL_WEIGHTS_KEY not in checkpoint:
            return
        saved = checkpoint[INITIAL_WEIGHTS_KEY]
        if saved.keys() != self.initial_weights.keys():
            raise ValueError(f"the checkpoint's {INITIAL_WEIGHTS_KEY} name other parameters than this model's "
                             f"encoders: {sorted(set(saved) ^ set(self.initial_weights))[:5]}")
        self.initial_weights = {name: w.cpu().clone() for name, w in saved.items()}
