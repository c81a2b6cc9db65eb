"""AGM: adaptive gradient modulation (Li, Li, Hu, Lei, Li, Zhou, ICCV 2023, "Boosting Multi-modal Model
Performance with Adaptive Gradient Modulation").

Each modality's own response is read off the fused model with Shapley values over the modalities. With ``z(S)``
the fused logits when only the modalities in ``S`` are present (the others replaced by the encoding of an all-zero
input) and ``w_k = k! (M - k - 1)! / M!``, modality ``i``'s response is

    ``m_i = sum_{S not containing i} w_|S| (z(S + i) - z(S)) + z({}) / M``,

the official two- and three-modality formulas for any M. ``z({})`` cancels (it is never computed) and the
responses sum to the fused logits. A modality's score is its batch cross-entropy
``s_i = mean_b -log max(softmax(m_i,b)[y_b], 1e-8)``; with ``d_i = mean_{j != i} s_j - s_i`` (how much better ``i``
does than the others on this batch) and ``D_i`` the same from the running means of the scores since training began,

    ``c_i = exp(alpha * min(exp(D_i) - exp(d_i), clamp))``:

a modality doing better than its usual standing is slowed (``c < 1``), one doing worse is sped up. The loss is the
cross-entropy of ``sum_i m_i`` (in value the fused logits) with the gradient that reaches ``m_i`` multiplied by
``c_i``, which is what the official backward hooks do.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from balance.dropping import zero_input
from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.epochs import EpochWindow
from balance.methods.step import Step

ABSENT = ("inputs", "features")
#: the smallest true-class probability a score counts (official: ``-log(1e-8)`` for anything below)
MIN_PROBABILITY = 1e-8


def shapley_matrix(num_modalities: int) -> torch.Tensor:
    """``[M, 2^M]``: ``m_i = sum_S C[i, S] z(S)`` over the subsets ``S`` as bit masks (bit ``j``: modality ``j``).

    The empty subset's column is zero: ``z({})`` enters the Shapley value with ``-1/M`` and the official responses
    add it back with ``+1/M``.
    """
    size = 1 << num_modalities
    matrix = torch.zeros(num_modalities, size, dtype=torch.float64)
    for i in range(num_modalities):
        for subset in range(size):
            if subset >> i & 1:
                continue
            k = bin(subset).count("1")
            weight = math.factorial(k) * math.factorial(num_modalities - k - 1) / math.factorial(num_modalities)
            matrix[i, subset | 1 << i] += weight
            if subset:
                matrix[i, subset] -= weight
    return matrix


def response_losses(responses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[M]``: each response's ``-log max(p_y, 1e-8)`` summed over the batch (no gradient), from ``[M, B, C]``."""
    log_p = F.log_softmax(responses.detach().float(), dim=-1)
    picked = log_p.gather(-1, labels.view(1, -1, 1).expand(len(responses), -1, 1)).squeeze(-1)
    return -picked.clamp_min(math.log(MIN_PROBABILITY)).sum(dim=1)


def modulation_coefficients(scores: torch.Tensor, running: torch.Tensor, alpha: float,
                            clamp: float | None) -> torch.Tensor:
    """``[M]`` coefficients ``exp(alpha * min(exp(D_i) - exp(d_i), clamp))`` with ``d_i = mean_{j != i} s_j - s_i``
    from the batch's ``scores`` and ``D_i`` from the ``running`` means (``clamp=None``: no cap)."""
    def lead(s: torch.Tensor) -> torch.Tensor:
        return (s.sum() - s) / (len(s) - 1) - s

    gap = torch.exp(lead(running)) - torch.exp(lead(scores))
    return torch.exp(alpha * (gap if clamp is None else gap.clamp_max(clamp)))


@contextmanager
def _eval_mode_with_grad(module: nn.Module) -> Iterator[None]:
    # The official padded passes run in eval mode but keep their graph, so unlike balance.scopes.evaluation_mode
    # gradients stay on; every submodule gets its own mode back (a frozen BatchNorm stays frozen).
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for sub, training in modes.items():
            sub.training = training


def _first_row(x: Any) -> Any:
    return {k: _first_row(v) for k, v in x.items()} if isinstance(x, Mapping) else x[:1]


class AGM(MultimodalMethod):
    """Adaptive gradient modulation through Shapley-value modality responses.

    The encoders run once on the batch; a modality's absence is its encoder's output on an all-zero input (one
    sample, in eval mode, with gradients, as the official padded passes) or zero features, so the ``2^M - 2``
    extra subsets cost fusion-head evaluations only. The running means of the scores and their step count are
    buffers (saved in checkpoints); under DDP the scores are reduced over the ranks, so every rank scales alike.

    Args:
        alpha: modulation strength (official default 1.0; its README's AV-MNIST command 2.5; BalanceBenchmark 0.1).
        modulation_starts: first modulated epoch (0-based; official 0).
        modulation_ends: last modulated epoch, inclusive (official 20 in its 1-based epochs: 19 here); ``None``:
            to the end. The running means are updated in every epoch, as in the official loop.
        clamp: cap on ``exp(D_i) - exp(d_i)`` (official 10 for CREMA-D, 7 for UR-Funny, none for AVE, AV-MNIST and
            CMU-MOSEI; BalanceBenchmark 7); ``None``: no cap.
        clip_threshold: when a gradient entry of the fusion head's weight matrices exceeds it in absolute value,
            all gradients are clipped to this total norm (official 1.0 for CREMA-D and AV-MNIST, 5.0 for UR-Funny;
            BalanceBenchmark 5.0), in every epoch; ``None``: never.
        absent: how an absent modality looks: ``inputs`` (official: the encoding of an all-zero input) or
            ``features`` (zero features, the framework's dropping; no extra encoder pass).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    needs_several_modalities = "AGM compares modalities"

    def __init__(self, alpha: float = 1.0, modulation_starts: int = 0, modulation_ends: int | None = 19,
                 clamp: float | None = 10.0, clip_threshold: float | None = 1.0, absent: str = "inputs",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.positive("alpha", alpha)
        for name, value in (("clamp", clamp), ("clip_threshold", clip_threshold)):
            options.positive(name, value, optional=True)
        options.one_of("absent", absent, ABSENT)
        self.alpha = float(alpha)
        self.window = EpochWindow(modulation_starts, modulation_ends)
        self.clamp = None if clamp is None else float(clamp)
        self.clip_threshold = None if clip_threshold is None else float(clip_threshold)
        self.absent = absent
        # Columns of the non-empty subsets; the last one is the full set, the fused logits of the shared pass.
        self.register_buffer("shapley", shapley_matrix(len(self.modalities))[:, 1:].float(), persistent=False)
        self.register_buffer("running_scores", torch.zeros(len(self.modalities)))
        self.register_buffer("score_steps", torch.zeros((), dtype=torch.long))
        self.head_weights = [p for p in self.model.fusion.parameters() if p.dim() >= 2 and p.requires_grad]
        for m in self.modalities:
            self.declare_metric(f"coeff_{m}")
            self.declare_metric(f"score_{m}")
        self.declare_metric("clipped")

    def absent_features(self, step: Step) -> dict[str, torch.Tensor]:
        """Modality -> ``[B, d_m]``: what stands for the modality where a subset leaves it out."""
        if self.absent == "features":
            return {m: torch.zeros_like(f) for m, f in step.features.items()}
        # In eval mode one zero sample encodes every row alike, so one row per modality is enough.
        zeros = {m: zero_input(_first_row(step.batch["inputs"][m])) for m in self.modalities}
        with _eval_mode_with_grad(self.model):
            encoded = self.model.encode(zeros)
        return {m: encoded[m].expand_as(step.features[m]) for m in self.modalities}

    def responses(self, step: Step) -> torch.Tensor:
        """``[M, B, C]``: each modality's Shapley response ``m_i`` on the step's batch."""
        absent = self.absent_features(step)
        keep = step.batch.get("present")  # a missing modality stays dropped in every subset
        subsets = [self.model.fuse({m: step.features[m] if subset >> i & 1 else absent[m]
                                    for i, m in enumerate(self.modalities)}, keep=keep)
                   for subset in range(1, (1 << len(self.modalities)) - 1)]
        logits = torch.stack([*subsets, step.logits])
        return torch.einsum("ms,sbc->mbc", self.shapley.to(logits.dtype), logits)

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        active = self.current_epoch in self.window
        with torch.set_grad_enabled(active and torch.is_grad_enabled()):
            responses = self.responses(step)
        losses = self.reduce_across_ranks(response_losses(responses, step.labels))
        count = self.reduce_across_ranks(torch.tensor(float(len(step.labels)), device=losses.device))
        scores = losses / count
        coefficients = modulation_coefficients(scores, self.running_scores, self.alpha, self.clamp)
        # The official cumulative mean over every training step so far, updated after the coefficients.
        steps = self.score_steps + 1
        self.running_scores.copy_(self.running_scores * (steps - 1) / steps + scores / steps)
        self.score_steps.copy_(steps)
        for m, s in zip(self.modalities, scores):
            self.record(f"score_{m}", s)
        if not active:
            return super().loss_terms(step)
        for m, c in zip(self.modalities, coefficients):
            self.record(f"coeff_{m}", c)
        # Value m_i, gradient c_i * dL/dm_i: the official full backward hooks on each response.
        c = coefficients.to(responses.dtype).view(-1, 1, 1)
        scaled = responses.detach() + c * (responses - responses.detach())
        return {"fused": F.cross_entropy(scaled.sum(dim=0), step.labels)}

    def modify_gradients(self, step: Step) -> None:
        if self.clip_threshold is None:
            return
        grads = [p.grad for p in self.head_weights if p.grad is not None]
        clipped = bool(grads) and bool(torch.stack([g.abs().max() for g in grads]).max() > self.clip_threshold)
        if clipped:
            nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], self.clip_threshold)
        self.record("clipped", float(clipped))
