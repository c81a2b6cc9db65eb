"""PMR: prototypical modal rebalance (Fan et al., CVPR 2023).

Every modality gets a non-parametric classifier: per class, a prototype ``c_m,k`` (the mean encoder feature of
class ``k``), and logits ``-||h_m - c_m,k||``. The prototypes are computed before training and after every epoch,
in eval mode and without gradients, on the first ``prototype_fraction`` (official 10 %) of the training loader's
batches, and from the third pass on blended with the previous ones,
``c <- (1 - prototype_momentum) c_new + prototype_momentum c_old`` (official). On each batch the modalities'
prototype confidences ``s_m = sum_i softmax(-||h_m,i - c_m||)[y_i]`` are compared, and in the modulation epochs
every modality below the most confident one is pulled towards its class prototypes by an extra prototypical
cross-entropy, ``loss = CE(fused) + alpha * sum_{m: s_m < max_j s_j} CE(-||h_m - c_m||, y)``. For two modalities
this is the official rule (only the weaker modality's term, none at a tie).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.epochs import EpochWindow
from balance.methods.ogm_ge import confidence_scores
from balance.methods.step import Step
from balance.scopes import evaluation_mode

#: the official code replaces the prototypes outright at its first two passes (before training and after epoch 0)
#: and blends them with the previous ones from the pass after epoch 1 on.
REPLACING_PASSES = 2


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` negative Euclidean distances of ``[B, d]`` features to ``[C, d]`` prototypes."""
    # The exact per-pair distance (not the matrix-product shortcut), as the official loop computes it.
    return -torch.cdist(features.float(), prototypes.float(), compute_mode="donot_use_mm_for_euclid_dist")


def pce_coefficients(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[M]`` weights of the prototypical cross-entropies: ``alpha`` for every modality less confident than the
    most confident one, 0 for that one (and for all at an exact tie). For M = 2 the official rule on
    ``rho = s_0 / s_1``: the weaker modality gets ``alpha``."""
    return torch.where(scores < scores.max(), torch.full_like(scores, alpha), torch.zeros_like(scores))


def update_prototypes(previous: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
                      momentum: float) -> torch.Tensor:
    """``(1 - momentum) * mean + momentum * previous`` per class, with ``mean = sums / counts``; a class absent
    from the pass keeps its previous prototype (the official code divides by its zero count)."""
    seen = (counts > 0).unsqueeze(1)
    mean = torch.where(seen, sums / counts.clamp(min=1).unsqueeze(1), previous)
    return (1 - momentum) * mean + momentum * previous


class PMR(MultimodalMethod):
    """Prototypical modal rebalance: joint training plus a prototypical cross-entropy for the slow modalities.

    The prototypes and the number of passes are buffers (saved in checkpoints, so a resumed run continues with
    them); under DDP the per-class feature sums and counts of the prototype pass and the batch confidences are
    summed over the ranks, so every rank holds the same prototypes and stimulates the same modalities.

    Args:
        alpha: weight of the prototypical cross-entropy (official default 1.0; its CREMA-D concat scripts 2.0).
        prototype_momentum: weight of the previous prototypes in their update (official default 0.2, scripts 0.0).
        prototype_fraction: share of the training loader's batches the prototypes are computed on, at least one
            batch (official 0.1: ``len(loader) // 10`` batches).
        modulation_starts: first epoch with the prototypical loss (0-based, official 0).
        modulation_ends: last epoch with it, inclusive (official default 100; scripts 70).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    needs_several_modalities = "PMR rebalances modalities against each other"

    def __init__(self, alpha: float = 1.0, prototype_momentum: float = 0.2, prototype_fraction: float = 0.1,
                 modulation_starts: int = 0, modulation_ends: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.positive("alpha", alpha)
        options.interval("prototype_momentum", prototype_momentum, 0, 1, open_high=True)
        options.interval("prototype_fraction", prototype_fraction, 0, 1, open_low=True)
        self.alpha = float(alpha)
        self.prototype_momentum = float(prototype_momentum)
        self.prototype_fraction = float(prototype_fraction)
        self.window = EpochWindow(modulation_starts, modulation_ends)
        dims = self.model.fusion.feature_dims
        self.register_buffer("prototype_passes", torch.zeros((), dtype=torch.long))
        for m in self.modalities:
            self.register_buffer(f"prototypes_{m}", torch.zeros(self.model.num_classes, dims[m]))
            self.declare_metric(f"coeff_{m}")
            self.declare_metric(f"proto_score_{m}")
            self.declare_metric(f"proto_acc_{m}", stages=("train", "val", "test"))

    def prototypes(self, modality: str) -> torch.Tensor:
        """``[C, d_m]`` the current class prototypes of ``modality``."""
        return getattr(self, f"prototypes_{modality}")

    # -- the prototype pass ----------------------------------------------------------------------------------------

    # The pass runs before training and at every epoch's end (as the official loop), before the epoch's
    # checkpoint is written: a resumed run starts with the prototypes, the pass count and the random state that
    # the uninterrupted run had at that point.
    def on_train_start(self) -> None:
        if int(self.prototype_passes) == 0:  # not when resuming: the checkpoint holds the prototypes
            self._prototype_pass()

    def on_train_epoch_end(self) -> None:
        self._prototype_pass()
        super().on_train_epoch_end()

    def _prototype_pass(self) -> None:
        loader = self.trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise TypeError(f"PMR computes its prototypes on one training DataLoader, got {type(loader).__name__}")
        batches = max(1, int(len(loader) * self.prototype_fraction + 1e-9))
        # A loader of its own over the training loader's dataset and batch sampler (the same shuffling, DDP
        # shard and transforms): iterating the trainer's persistent-worker loader would reset the very iterator
        # that the epoch draws its batches from.
        own = DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn,
                         num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                         worker_init_fn=loader.worker_init_fn, generator=loader.generator)
        sums, counts = self._class_sums(own, batches)
        momentum = self.prototype_momentum if int(self.prototype_passes) >= REPLACING_PASSES else 0.0
        for m in self.modalities:
            sums_m, counts_m = self.reduce_across_ranks(sums[m]), self.reduce_across_ranks(counts[m])
            self.prototypes(m).copy_(update_prototypes(self.prototypes(m), sums_m, counts_m, momentum))
        self.prototype_passes += 1

    def _class_sums(self, loader: DataLoader, batches: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per modality, the ``[C, d]`` feature sums and ``[C]`` counts of each class over the loader's first
        ``batches`` batches, in eval mode (as the official pass); a sample lacking a modality counts for none."""
        num_classes = self.model.num_classes
        sums = {m: torch.zeros_like(self.prototypes(m)) for m in self.modalities}
        counts = {m: torch.zeros(num_classes, device=self.device) for m in self.modalities}
        with evaluation_mode(self.model):
            for i, batch in enumerate(loader):
                if i >= batches:
                    break
                batch = self.trainer.strategy.batch_to_device(batch)
                features = self.model.encode(batch["inputs"])
                onehot = F.one_hot(batch["label"], num_classes).float()
                present = batch.get("present")
                for j, m in enumerate(self.modalities):
                    weight = onehot if present is None else onehot * present[:, j:j + 1].float()
                    sums[m] += weight.T @ features[m].float()
                    counts[m] += weight.sum(0)
        return sums, counts

    # -- the loss ----------------------------------------------------------------------------------------------------

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        terms = dict(super().loss_terms(step))
        logits = {m: prototype_logits(step.features[m], self.prototypes(m)) for m in self.modalities}
        scores = confidence_scores(logits, step.labels)
        batch_size = len(step.labels)
        for m, z in logits.items():
            self.record(f"proto_acc_{m}", (z.argmax(1) == step.labels).float().mean(), weight=batch_size)
        for m, s in zip(self.modalities, scores):
            self.record(f"proto_score_{m}", s / batch_size, weight=batch_size)
        if self.current_epoch not in self.window:
            return terms
        # Summed over the ranks: every rank stimulates the same modalities.
        coefficients = pce_coefficients(self.reduce_across_ranks(scores), self.alpha)
        for m, k in zip(self.modalities, coefficients):
            self.record(f"coeff_{m}", k)
            if k > 0:
                terms[f"pce_{m}"] = k * F.cross_entropy(logits[m], step.labels)
        return terms

    def evaluation_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        out = super().evaluation_step(batch, stage)
        for m, f in out["features"].items():
            correct = (prototype_logits(f, self.prototypes(m)).argmax(1) == batch["label"]).float()
            self.record(f"proto_acc_{m}", correct.mean(), stage, weight=len(correct))
        return out
