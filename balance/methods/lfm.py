"""LFM: dynamically learning the modality gap (Yang, Wan, Jiang, Xu, "Facilitating Multimodal Classification via
Dynamically Learning Modality Gap", NeurIPS 2024; official code njustkmg/NeurIPS24-LFM).

The training loss mixes the supervised cross-entropy of the fused prediction with an unsupervised term that
aligns the modalities' own predictions (the gap between them), with weights that sum to one:

    loss = 2 ((1 - alpha) CE(fused, y) + alpha A),    A = mean over modality pairs of D(p_i, p_j)

``D`` is the official code's ``Alignment`` (``alignment=official``): ``0.5 (KL(m || p) + KL(m || q))`` with the
mixture ``m = (p + q) / 2`` of the two modalities' softmax predictions; ``alignment=js`` is the Jensen-Shannon
divergence ``0.5 (KL(p || m) + KL(q || m))`` that the function's names describe. For two modalities the mean over
pairs is the official term.

The alignment weight ``alpha`` (official start 0.95, classification 0.05) is learnt once per epoch, before the
epoch trains, by one gradient step on the bilevel problem ``min_alpha CE_held-out(theta*(alpha))`` with
``theta*(alpha)`` the minimiser of the training loss, then clamped to [0.05, 0.95]. The hypergradient comes from
the implicit function theorem (the paper's Eq. 3), ``-(d/d alpha grad_theta loss)^T H^-1 grad_theta CE``, with the
inverse-Hessian-vector product approximated by a truncated Neumann series of Hessian-vector products
(``hypergradient=implicit``). ``hypergradient=official`` is the official code's quantity: the mean over the first
parameter tensor of one Hessian-vector product ``H grad CE``. Both are evaluated on a fixed held-out batch drawn
once from the validation split (never the test split), in eval mode; the step size halves every
``lr_alpha_halve_every`` epochs, as in the official code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import default_collate

from balance import options
from balance.methods.base import MultimodalMethod, mean_over_present
from balance.methods.step import Step
from balance.scopes import evaluation_mode, to_device

ALIGNMENTS = ("official", "js")
HYPERGRADIENTS = ("implicit", "official")
#: the official training loss is ``2 (a_cls CE + a_align A)``: equal weights give ``CE + A``
LOSS_SCALE = 2.0
#: the official clamp of the alignment weight after each update (the classification weight is its complement)
WEIGHT_BOUNDS = (0.05, 0.95)

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``log((p + q) / 2)`` from log-probabilities, without underflow."""
    return torch.logaddexp(log_p, log_q) - math.log(2.0)


def mixture_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """``[B]``: the official ``Alignment`` per sample, ``0.5 (KL(m || p) + KL(m || q))``, ``m = (p + q) / 2``.

    The official code calls ``F.kl_div(p.log(), m)``, which is ``KL(m || p)`` (the target comes first), so its
    "JS score" measures the mixture against each prediction. Computed here from log-softmax values, which gives
    the same number without the ``log(0)`` of an underflowing softmax.
    """
    log_p, log_q = F.log_softmax(logits_p, dim=1), F.log_softmax(logits_q, dim=1)
    log_m = _log_mixture(log_p, log_q)
    return (log_m.exp() * (log_m - 0.5 * (log_p + log_q))).sum(dim=1)


def jensen_shannon(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """``[B]``: the Jensen-Shannon divergence ``0.5 (KL(p || m) + KL(q || m))`` of the two softmax predictions."""
    log_p, log_q = F.log_softmax(logits_p, dim=1), F.log_softmax(logits_q, dim=1)
    log_m = _log_mixture(log_p, log_q)
    return 0.5 * ((log_p.exp() * (log_p - log_m)).sum(dim=1) + (log_q.exp() * (log_q - log_m)).sum(dim=1))


DIVERGENCES: dict[str, Divergence] = {"official": mixture_divergence, "js": jensen_shannon}


def pairwise_alignment(logits: Sequence[torch.Tensor], divergence: Divergence,
                       present: torch.Tensor | None = None) -> torch.Tensor:
    """The alignment term: the mean over the unordered modality pairs of each pair's mean divergence over the
    samples that have both modalities (``present``, ``[B, M]`` bool; all samples when ``None``)."""
    terms = []
    for i, j in itertools.combinations(range(len(logits)), 2):
        both = None if present is None else present[:, i] & present[:, j]
        terms.append(mean_over_present(divergence(logits[i], logits[j]), both)[0])
    return torch.stack(terms).mean()


def training_loss(loss_cls: torch.Tensor, loss_align: torch.Tensor, weight_align: torch.Tensor | float
                  ) -> torch.Tensor:
    """The inner objective ``2 ((1 - alpha) CE + alpha A)`` with ``alpha`` the alignment weight."""
    return LOSS_SCALE * ((1 - weight_align) * loss_cls + weight_align * loss_align)


def _gradients(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``d loss / d params`` with its graph (for second derivatives); zeros for parameters it does not use."""
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _hessian_vector_product(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                            vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` for the Hessian whose first derivatives are ``grads`` (built with their graph)."""
    # A gradient without a graph is constant in the parameters: its rows of the Hessian are zero.
    pairs = [(g, v) for g, v in zip(grads, vector) if g.requires_grad]
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    outputs, grad_outputs = zip(*pairs)
    products = torch.autograd.grad(outputs, params, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for p, h in zip(params, products)]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def implicit_hypergradient(loss_cls: torch.Tensor, loss_align: torch.Tensor, params: Sequence[torch.Tensor],
                           weight_align: float, neumann_steps: int, neumann_lr: float) -> torch.Tensor:
    """``d CE(theta*(alpha)) / d alpha`` by the implicit function theorem, with a truncated Neumann series.

    The inner objective is ``g = 2 ((1 - alpha) CE + alpha A)`` (:func:`training_loss`), the outer one ``f = CE``;
    both losses come with their graph on the same held-out batch. At a minimiser of ``g``,

        d f / d alpha = -(d/d alpha grad g)^T H^-1 grad f,   d/d alpha grad g = 2 (grad A - grad CE),

    and ``H^-1`` (the Hessian of ``g``) is approximated by ``eta sum_{k=0..K} (I - eta H)^k`` (``K =
    neumann_steps`` Hessian-vector products, ``eta = neumann_lr``), which converges to it when ``eta`` is below
    ``2 / lambda_max(H)``. With ``K = 0`` it is the one-step unrolled hypergradient
    ``-2 eta (grad A - grad CE)^T grad CE``.

    Args:
        loss_cls: the cross-entropy ``CE`` on the held-out batch (with its graph).
        loss_align: the alignment term ``A`` on the same batch (with its graph).
        params: the parameters ``theta``.
        weight_align: the current alignment weight ``alpha``.
        neumann_steps: ``K``, the number of Hessian-vector products.
        neumann_lr: ``eta``, the step of the Neumann series.

    Returns:
        The scalar hypergradient (detached); positive means a smaller alignment weight lowers the held-out loss.
    """
    grad_cls = _gradients(loss_cls, params)
    grad_align = _gradients(loss_align, params)
    grad_inner = [LOSS_SCALE * ((1 - weight_align) * c + weight_align * a) for c, a in zip(grad_cls, grad_align)]
    term = [g.detach() for g in grad_cls]
    series = list(term)
    for _ in range(neumann_steps):
        product = _hessian_vector_product(grad_inner, params, term)
        term = [t - neumann_lr * h for t, h in zip(term, product)]
        series = [s + t for s, t in zip(series, term)]
    inverse_hvp = [neumann_lr * s for s in series]
    mixed = [LOSS_SCALE * (a - c).detach() for c, a in zip(grad_cls, grad_align)]
    return -_dot(mixed, inverse_hvp).detach()


def official_hypergradient(loss_cls: torch.Tensor, loss_align: torch.Tensor, params: Sequence[torch.Tensor],
                           weight_align: float) -> torch.Tensor:
    """The official code's update quantity: ``mean((H grad CE)[params[0]])``, the mean of the first parameter
    tensor's entries of the Hessian of ``(1 - alpha) CE + alpha A`` (no factor 2) times the gradient of ``CE``.

    It contracts no mixed derivative with ``alpha``, and its value depends on which tensor the model lists first
    (in the official model: the audio encoder's first convolution), so it is kept as a labelled option only.
    """
    grad_total = _gradients((1 - weight_align) * loss_cls + weight_align * loss_align, params)
    grad_cls = [g.detach() for g in _gradients(loss_cls, params)]
    return _hessian_vector_product(grad_total, params, grad_cls)[0].mean().detach()


def alpha_learning_rate(lr_alpha: float, epoch: int, halve_every: int) -> float:
    """The official step size schedule: ``lr_alpha`` halved at every ``halve_every``-th epoch (20 officially)."""
    return lr_alpha * 0.5 ** (epoch // halve_every)


def updated_weight(weight_align: torch.Tensor, hypergradient: torch.Tensor, lr: float) -> torch.Tensor:
    """One gradient step on the alignment weight, clamped to the official [0.05, 0.95]."""
    return (weight_align - lr * hypergradient).clamp(*WEIGHT_BOUNDS)


class LFM(MultimodalMethod):
    """Cross-entropy plus a learnt-weight alignment of the modalities' predictions (see the module docstring).

    The alignment weight and the held-out sample indices are buffers (in every checkpoint, so a resumed run goes
    on with them); the held-out indices are drawn once from the method's seeded generator, the same on every
    rank, and the hypergradient is averaged over the ranks, so every rank holds the same weights.

    Args:
        initial_weight_align: the alignment weight ``alpha`` before the first update (official 0.95, so the
            classification weight starts at 0.05; BalanceBenchmark swaps them).
        lr_alpha: step size of the hypergradient update (official 1e-4); 0 keeps the weights fixed. At the
            official step the weights move little (the hypergradients measured here are 0.01-0.1 per epoch).
        lr_alpha_halve_every: the step size halves every this many epochs (official 20).
        hypergradient: ``implicit`` (the paper's Eq. 3, Neumann-approximated) or ``official`` (the official
            code's quantity; see :func:`official_hypergradient`).
        neumann_steps: Hessian-vector products of the Neumann series (``implicit``; 1: one, as the official code).
        neumann_lr: step ``eta`` of the Neumann series (``implicit``; 0.01, the official SGD learning rate).
        held_out_size: validation samples of the fixed held-out batch (official 8: half of its 16-sample batch).
        alignment: ``official`` (the mixture divergence of the official code) or ``js`` (Jensen-Shannon).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    needs_several_modalities = "LFM aligns modalities with each other"

    def __init__(
        self,
        initial_weight_align: float = 0.95,
        lr_alpha: float = 1.0e-4,
        lr_alpha_halve_every: int = 20,
        hypergradient: str = "implicit",
        neumann_steps: int = 1,
        neumann_lr: float = 0.01,
        held_out_size: int = 8,
        alignment: str = "official",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        options.interval("initial_weight_align", initial_weight_align, *WEIGHT_BOUNDS)
        options.non_negative("lr_alpha", lr_alpha)
        options.integer("lr_alpha_halve_every", lr_alpha_halve_every, 1)
        options.one_of("hypergradient", hypergradient, HYPERGRADIENTS)
        options.integer("neumann_steps", neumann_steps, 0)
        options.positive("neumann_lr", neumann_lr)
        options.integer("held_out_size", held_out_size, 1)
        options.one_of("alignment", alignment, ALIGNMENTS)
        self.lr_alpha = float(lr_alpha)
        self.lr_alpha_halve_every = lr_alpha_halve_every
        self.hypergradient = hypergradient
        self.neumann_steps = neumann_steps
        self.neumann_lr = float(neumann_lr)
        self.alignment = alignment
        self.register_buffer("weight_align", torch.tensor(float(initial_weight_align)))
        # -1: not drawn yet (drawn when training starts, once the validation split is known).
        self.register_buffer("held_out_index", torch.full((held_out_size,), -1, dtype=torch.long))
        for name in ("weight_cls", "weight_align", "hypergradient"):
            self.declare_metric(name)
        self.declare_metric("alignment", stages=("train", "val"))

    # -- the loss ----------------------------------------------------------------------------------------------------

    def classification_and_alignment(self, logits: torch.Tensor, unimodal: Mapping[str, torch.Tensor],
                                     labels: torch.Tensor, present: torch.Tensor | None
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CE(fused, y), A)``: the two terms the weights mix, with their graphs."""
        alignment = pairwise_alignment([unimodal[m] for m in self.modalities], DIVERGENCES[self.alignment], present)
        return F.cross_entropy(logits, labels), alignment

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        loss_cls, loss_align = self.classification_and_alignment(step.logits, step.unimodal_logits, step.labels,
                                                                 step.batch.get("present"))
        self.record("alignment", loss_align, weight=len(step.labels))
        weight_align = self.weight_align
        return {"cls": LOSS_SCALE * (1 - weight_align) * loss_cls, "align": LOSS_SCALE * weight_align * loss_align}

    def evaluation_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        outputs = super().evaluation_step(batch, stage)
        if stage == "val":
            unimodal = self.unimodal_logits(outputs["features"])
            alignment = pairwise_alignment([unimodal[m] for m in self.modalities], DIVERGENCES[self.alignment],
                                           batch.get("present"))
            self.record("alignment", alignment, stage, weight=len(batch["label"]))
        return outputs

    # -- the weight update -------------------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        if int(self.held_out_index[0]) < 0:  # not when resuming: the checkpoint holds the indices
            self.held_out_index.copy_(self._draw_held_out_index(self.generator))

    def on_train_epoch_start(self) -> None:
        # Before the epoch trains, as the official loop (epoch 0 included); the checkpoint written at the epoch's
        # end holds the weight the epoch trained with, and the resumed run's next update is the uninterrupted one's.
        if self.lr_alpha > 0:
            hypergradient = self.reduce_across_ranks(self.held_out_hypergradient(self._held_out_batch()), op="mean")
            lr = alpha_learning_rate(self.lr_alpha, self.current_epoch, self.lr_alpha_halve_every)
            self.weight_align.copy_(updated_weight(self.weight_align, hypergradient, lr))
            self.record("hypergradient", hypergradient)
        self.record("weight_align", self.weight_align)
        self.record("weight_cls", 1 - self.weight_align)

    def _draw_held_out_index(self, generator: torch.Generator) -> torch.Tensor:
        """The held-out batch's positions in the validation split: a random subset drawn from the method's
        generator (the official code draws its held-out samples at random once, too)."""
        size = len(self._validation_split())
        wanted = len(self.held_out_index)
        if size < wanted:
            raise ValueError(f"method.held_out_size must be at most the validation split's size ({size}), got "
                             f"{wanted}")
        return torch.randperm(size, generator=generator)[:wanted]

    def _validation_split(self) -> Any:
        datamodule = self.fitted_datamodule("LFM learns its weights on the datamodule's validation split")
        return datamodule.evaluation_view("val")

    def _held_out_batch(self) -> dict[str, Any]:
        split = self._validation_split()
        return to_device(default_collate([split[int(i)] for i in self.held_out_index]), self.device)

    def held_out_hypergradient(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The hypergradient of the current weights on ``batch`` (the held-out batch, on the method's device), in
        eval mode (batch-norm running statistics, no dropout); the model's modes are restored afterwards."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        weight_align = float(self.weight_align)
        with evaluation_mode(self.model), torch.enable_grad():
            features = self.model.encode(batch["inputs"])
            present = batch.get("present")
            loss_cls, loss_align = self.classification_and_alignment(
                self.fuse(features, keep=present), self.unimodal_logits(features), batch["label"], present)
            if self.hypergradient == "official":
                return official_hypergradient(loss_cls, loss_align, params, weight_align)
            return implicit_hypergradient(loss_cls, loss_align, params, weight_align, self.neumann_steps,
                                          self.neumann_lr)
