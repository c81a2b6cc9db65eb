"""G-Blending: gradient blending by the overfitting-to-generalisation ratio (Wang, Tran, Feiszli, "What Makes
Training Multi-Modal Classification Networks Hard?", CVPR 2020).

Every modality gets a linear classifier of its own on its encoder features (the official model's ``a_last_out``
and ``v_last_out`` beside the fused head); the loss blends the heads' cross-entropies,
``loss = sum_k w_k CE(z_k)`` over the M unimodal heads and the fused one. The weights come from how each head
overfits and generalises over a super-epoch of ``n`` epochs, measured on the training and the validation split:

    O       = L_val - L_train                              (overfitting, at a checkpoint)
    Delta O = O_end - O_start,   Delta G = L_val,start - L_val,end
    w_k     = |Delta G_k| / Delta O_k^2,  normalised to sum 1

At every super-epoch boundary (every ``super_epoch`` epochs, from epoch 0 on) the weights are estimated anew and
the main model trains with them until the next one. Two estimates:

- ``clones`` (the G-Blend estimate, as BalanceBenchmark's port runs it): a copy of each unimodal
  branch (encoder and its own head) and of the fused model, taken from the main model, trains alone on its own
  cross-entropy for ``estimate_epochs`` epochs; its losses before and after give its ``Delta O`` and ``Delta G``.
  With ``super_epoch >= trainer.max_epochs`` there is one estimate, from the initial model: the paper's offline
  G-Blend.
- ``online``: no copies; the main model's own heads' losses at the start of consecutive super-epochs (the first
  super-epoch trains with equal weights).

Losses are means over the whole split in eval mode (the training split with evaluation transforms), never on the
test split. The estimate leaves the global random state as it found it; the clones' batches are drawn from the
method's generator, so every rank draws the same ones, and under DDP the clones' gradients are averaged over the
ranks like the main model's.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.step import Step
from balance.scopes import evaluation_mode, isolated_rng, to_device

ESTIMATES = ("clones", "online")
#: the name of the fused head among the blended heads (after the modalities)
FUSED = "fused"
#: the floor of Delta O^2: a head whose overfitting did not change at all would get an infinite weight
OVERFITTING_FLOOR = 1e-12

log = logging.getLogger(__name__)

#: batch -> (``[K]`` summed cross-entropies, ``[K]`` sample counts) of the heads it evaluates
HeadLosses = Callable[[Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]]


def overfitting_and_gain(train_start: torch.Tensor, val_start: torch.Tensor, train_end: torch.Tensor,
                         val_end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Delta O, Delta G)`` per head between two checkpoints, from each head's mean training and validation
    losses there: ``Delta O = (L_val,end - L_train,end) - (L_val,start - L_train,start)``,
    ``Delta G = L_val,start - L_val,end``."""
    delta_o = (val_end - train_end) - (val_start - train_start)
    return delta_o, val_start - val_end


def blending_weights(delta_o: torch.Tensor, delta_g: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """G-Blend's weights ``w_k = |Delta G_k| / Delta O_k^2`` normalised to sum 1 (``Delta O^2`` floored at
    :data:`OVERFITTING_FLOOR`). ``previous`` is kept when no head generalised or overfitted measurably (all
    ``Delta G = 0``, or a non-finite loss): there is nothing to blend by."""
    raw = delta_g.double().abs() / delta_o.double().square().clamp_min(OVERFITTING_FLOOR)
    total = raw.sum()
    if not bool(torch.isfinite(total)) or not total > 0:
        return previous.clone()
    return (raw / total).to(previous)


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of the cross-entropies over the samples in ``mask`` (all when ``None``), so that means over
    several batches and ranks are exact."""
    losses = F.cross_entropy(logits, labels, reduction="none")
    weight = torch.ones_like(losses) if mask is None else mask.to(losses)
    return (losses * weight).sum(), weight.sum()


def epoch_batches(num_samples: int, batch_size: int, generator: torch.Generator, rank: int = 0,
                  world_size: int = 1) -> list[list[int]]:
    """One shuffled epoch of a rank's batches of sample indices, drawn from ``generator``: a permutation (the
    same on every rank), padded by wrapping so that every rank gets as many samples (as ``DistributedSampler``),
    the rank's every ``world_size``-th sample, in batches of ``batch_size``; a last batch of one sample joins
    the one before (a batch of one breaks batch norm in training mode)."""
    order = torch.randperm(num_samples, generator=generator)
    padding = -num_samples % world_size
    order = torch.cat([order, order[:padding]])[rank::world_size].tolist()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        lone = batches.pop()
        batches[-1] = batches[-1] + lone
    return batches


class GBlending(MultimodalMethod):
    """Gradient blending: a linear head per modality beside the model's fused head, and the loss
    ``sum_k w_k CE(z_k)`` with weights from each head's overfitting-to-generalisation ratio (module docstring).

    The weights (``blend_weights``: the modalities' heads in order, then the fused head) and, for ``online``, the
    losses of the last super-epoch boundary are buffers, saved in checkpoints; the estimate itself runs at the
    start of a boundary epoch, so a run resumed from any epoch's checkpoint estimates where the uninterrupted one
    did, from the same state and generator.

    Works with every fusion head (it is the fused head) and any number of modalities; refused with MMTM mid-fusion
    (a unimodal branch must run alone).

    Args:
        estimate: ``clones`` (train a copy of each unimodal branch and of the fused model per estimate, the paper)
            or ``online`` (the main model's own heads, no copies).
        super_epoch: epochs between estimates (BalanceBenchmark 10); at least ``trainer.max_epochs`` gives one
            estimate at the start (the paper's offline G-Blend).
        estimate_epochs: epochs each clone trains per estimate (``clones`` only); ``None``: ``super_epoch``, the
            super-epoch's length (the paper). Not capped by the epochs left, so that an estimate never depends on
            ``trainer.max_epochs`` (a run resumed with a larger one continues exactly).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    runs_encoders_alone = "G-Blending trains each modality's branch alone"

    def __init__(self, estimate: str = "clones", super_epoch: int = 10, estimate_epochs: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.one_of("estimate", estimate, ESTIMATES)
        options.integer("super_epoch", super_epoch, 1)
        if estimate_epochs is not None:
            options.integer("estimate_epochs", estimate_epochs, 1)
            if estimate == "online":
                raise ValueError("method.estimate_epochs must be null with method.estimate=online (it is the clones' "
                                 f"training length), got {estimate_epochs!r}")
        self.estimate = estimate
        self.super_epoch = super_epoch
        self.estimate_epochs = estimate_epochs
        dims = self.model.fusion.feature_dims
        self.unimodal_heads = nn.ModuleDict({m: nn.Linear(dims[m], self.model.num_classes) for m in self.modalities})
        self.heads = [*self.modalities, FUSED]
        heads = len(self.heads)
        # Equal weights until the first estimate (the whole first super-epoch under `online`).
        self.register_buffer("blend_weights", torch.full((heads,), 1.0 / heads))
        if estimate == "online":
            # Each head's mean training and validation losses at the last boundary, once there was one.
            self.register_buffer("boundary_losses", torch.zeros(2, heads))
            self.register_buffer("boundary_seen", torch.zeros((), dtype=torch.bool))
        for k in self.heads:
            self.declare_metric(f"weight_{k}")

    # -- the blended loss --------------------------------------------------------------------------------------------

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's logits through its own head."""
        return {m: self.unimodal_heads[m](features[m]) for m in self.modalities}

    def weight(self, head: str) -> torch.Tensor:
        """The current blending weight of ``head`` (a modality or ``fused``)."""
        return self.blend_weights[self.heads.index(head)]

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        terms = {FUSED: self.weight(FUSED) * F.cross_entropy(step.logits, step.labels)}
        for m, loss in self.unimodal_losses(step).items():
            terms[f"unimodal_{m}"] = self.weight(m) * loss
        return terms

    def on_train_epoch_start(self) -> None:
        if self.current_epoch % self.super_epoch == 0:
            with isolated_rng():
                self._estimate_weights()

    def on_train_epoch_end(self) -> None:
        for k, w in zip(self.heads, self.blend_weights):
            self.record(f"weight_{k}", w)
        super().on_train_epoch_end()

    # -- the estimate ------------------------------------------------------------------------------------------------

    def _estimate_weights(self) -> None:
        now = self._split_losses(self, self._main_head_losses)
        if self.estimate == "clones":
            start, end = now, torch.stack([self._clone_end_losses(k) for k in self.heads], dim=1)
        else:
            start, end, seen = self.boundary_losses.clone(), now, bool(self.boundary_seen)
            self.boundary_losses.copy_(now)
            self.boundary_seen.fill_(True)
            if not seen:
                return  # the first boundary: nothing to compare with yet
        delta_o, delta_g = overfitting_and_gain(start[0], start[1], end[0], end[1])
        self.blend_weights.copy_(blending_weights(delta_o, delta_g, self.blend_weights))
        log.info("G-Blending weights from epoch %d: %s", self.current_epoch,
                 ", ".join(f"{k} {float(w):.4f}" for k, w in zip(self.heads, self.blend_weights)))

    def _split_losses(self, module: nn.Module, head_losses: HeadLosses) -> torch.Tensor:
        """``[2, K]``: the heads' mean cross-entropies on the training split (evaluation transforms) and on the
        validation split, with ``module`` in eval mode, summed over the ranks' shards."""
        datamodule = self._datamodule()
        with evaluation_mode(module):
            return torch.stack([self._mean_losses(loader, head_losses) for loader in
                                (datamodule.unshuffled_train_dataloader(), datamodule.val_dataloader())])

    def _mean_losses(self, loader: DataLoader, head_losses: HeadLosses) -> torch.Tensor:
        sums = counts = None
        for batch in loader:
            s, c = head_losses(to_device(batch, self.device))
            sums, counts = (s, c) if sums is None else (sums + s, counts + c)
        return self.reduce_across_ranks(sums) / self.reduce_across_ranks(counts).clamp_min(1)

    def _main_head_losses(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head of the main model: the modalities' heads, then the fused head."""
        features = self.model.encode(batch["inputs"])
        logits = self.unimodal_logits(features)
        logits[FUSED] = self.fused_logits(features, keep=batch.get("present"))
        return self._stack_losses(logits, batch)

    def _stack_losses(self, logits: Mapping[str, torch.Tensor], batch: Mapping[str, Any]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads' summed cross-entropies and counts, each unimodal head over the samples with its modality."""
        present = batch.get("present")
        pairs = [summed_cross_entropy(z, batch["label"], None if k == FUSED or present is None
                                      else present[:, self.modalities.index(k)]) for k, z in logits.items()]
        return torch.stack([s for s, _ in pairs]), torch.stack([c for _, c in pairs])

    def _clone(self, head: str) -> tuple[nn.Module, Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]]:
        """A copy of ``head``'s branch of the main model and its forward pass (batch -> logits): a modality's
        encoder, projection and own head, or the whole model with its fused head."""
        if head == FUSED:
            return (copy.deepcopy(self.model),
                    lambda clone, batch: clone.fuse(clone.encode(batch["inputs"]), keep=batch.get("present")))
        projection = self.model.projections[head] if head in self.model.projections else nn.Identity()
        branch = nn.Sequential(self.model.encoders[head], projection, self.unimodal_heads[head])
        return copy.deepcopy(branch), lambda clone, batch: clone(batch["inputs"][head])

    def _clone_end_losses(self, head: str) -> torch.Tensor:
        """``[2]``: the training and validation losses of ``head``'s clone after it trained alone."""
        clone, forward = self._clone(head)

        def head_losses(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
            return self._stack_losses({head: forward(clone, batch)}, batch)

        self._train_clone(clone, head_losses)
        return self._split_losses(clone, head_losses)[:, 0]

    def _train_clone(self, clone: nn.Module, head_losses: HeadLosses) -> None:
        """Trains ``clone`` on its head's cross-entropy with a fresh optimizer of the method's kind at the main
        optimizer's current learning rate, for ``estimate_epochs`` epochs (default ``super_epoch``)."""
        parameters = [p for p in clone.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=parameters)
        for group in optimizer.param_groups:
            group["lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        clone.train()
        with torch.enable_grad():
            for _ in range(self.estimate_epochs or self.super_epoch):
                for batch in self._clone_batches():
                    sums, counts = head_losses(to_device(batch, self.device))
                    optimizer.zero_grad()
                    (sums[0] / counts[0].clamp_min(1)).backward()
                    self._average_gradients(parameters)
                    optimizer.step()

    def _clone_batches(self) -> Iterator[Mapping[str, Any]]:
        """One epoch of training batches for a clone (training transforms), this rank's share of a shuffle from
        the method's generator, as many batches as a main training epoch has at most."""
        datamodule = self._datamodule()
        dataset = datamodule.datasets["train"]
        batches = epoch_batches(len(dataset), datamodule.batch_size, self.generator, self.global_rank,
                                self.trainer.world_size)
        limit = self.trainer.num_training_batches
        if limit != float("inf"):
            batches = batches[:max(1, int(limit))]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=datamodule.num_workers,
                            pin_memory=datamodule.pin_memory)
        return iter(loader)

    def _average_gradients(self, parameters: list[nn.Parameter]) -> None:
        """Averages the clone's gradients over the DDP ranks (one reduction), so every rank's clone stays equal."""
        if self.trainer.world_size == 1:
            return  # a parameter without a gradient keeps none (an optimizer skips it)
        grads = self.mean_across_ranks([torch.zeros_like(p) if p.grad is None else p.grad for p in parameters])
        for p, g in zip(parameters, grads):
            p.grad = g

    def _datamodule(self) -> Any:
        return self.fitted_datamodule("G-Blending measures losses on the datamodule's training and validation "
                                      "splits")
