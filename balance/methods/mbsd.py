"""MBSD: modality-balanced self-distillation (Liu et al., 2023; as BalanceBenchmark lists it).

Besides the cross-entropies of the fused and of every unimodal prediction, each sample distils between its
modalities: the modality whose own prediction gives the true class the higher probability is the sample's teacher,
the other one its student. For a pair of modalities ``a, b`` with unimodal logits ``z_a, z_b`` (``[B, C]``),
true-class probabilities ``q_a = softmax(z_a)[y]``, ``q_b``, and per sample

- the weight ``w = |q_a - q_b|`` where at least one of the two predicts the label (argmax), else 0 (detached);
- the logit regression ``RS = ||z_a - z_b||^2 / C`` between the two modalities (both get its gradient);
- the distillation ``KL = T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` of the student ``s`` onto the teacher
  ``t``, the teacher's side detached (``detach_teacher``), so that it moves the weaker modality towards the
  stronger one and not the other way,

the loss is ``CE(z, y) + sum_m CE(z_m, y) + rs_weight * mean_i w RS + kl_weight * mean_i w KL``. For M > 2
modalities the two terms are the mean over the M(M-1)/2 pairs, each with its own per-sample teacher, as
BalanceBenchmark's three-modality branch does. A pair counts only on the samples that have both modalities, and
each modality's cross-entropy only where it is present.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations
from typing import Any, NamedTuple

import torch
from torch.nn import functional as F

from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.step import Step


class PairTerms(NamedTuple):
    """Per-sample distillation terms of one pair of modalities ``(a, b)``, each ``[B]``."""

    #: ``|q_a - q_b|`` where either modality predicts the label, else 0 (no graph)
    weight: torch.Tensor
    #: ``||z_a - z_b||^2 / C`` (symmetric: both modalities' logits get its gradient)
    regression: torch.Tensor
    #: ``T^2 KL(softmax(z_teacher / T) || softmax(z_student / T))``
    divergence: torch.Tensor
    #: whether ``a`` is the sample's teacher (``q_a >= q_b``)
    a_teaches: torch.Tensor


def true_class_probability(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]``: ``softmax(logits)[y]``, without the graph."""
    return F.softmax(logits.detach(), dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)


def distillation_weight(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]``: ``|softmax(z_a)[y] - softmax(z_b)[y]|`` where ``a`` or ``b`` predicts the label, 0 elsewhere (no
    graph). A sample that neither modality gets right has no teacher to trust, so it is not distilled."""
    either = (logits_a.argmax(1) == labels) | (logits_b.argmax(1) == labels)
    gap = (true_class_probability(logits_a, labels) - true_class_probability(logits_b, labels)).abs()
    return gap * either.to(gap)


def pair_terms(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
               detach_teacher: bool = True) -> PairTerms:
    """The per-sample weight, logit regression and softened KL of one pair of modalities.

    Args:
        logits_a: ``[B, C]`` the first modality's own logits (with their graph).
        logits_b: ``[B, C]`` the second's.
        labels: ``[B]`` class labels.
        temperature: ``T`` of the KL's softened predictions (the weight and the teacher use ``T = 1``).
        detach_teacher: stop the KL's gradient at the teacher's logits, so that it distils the student only.

    Returns:
        The :class:`PairTerms`; the teacher of a sample is the modality with the higher true-class probability
        (``a`` at a tie, where the weight is 0).
    """
    a_teaches = true_class_probability(logits_a, labels) >= true_class_probability(logits_b, labels)
    rows = a_teaches.unsqueeze(1)
    teacher = torch.where(rows, logits_a, logits_b)
    student = torch.where(rows, logits_b, logits_a)
    if detach_teacher:
        teacher = teacher.detach()
    # The regression is between the modalities, not from a teacher: with the teacher's side detached it grows with
    # the strong modality's logit scale, which its cross-entropy keeps raising and the student cannot follow.
    regression = (logits_a - logits_b).pow(2).sum(1) / logits_a.shape[1]
    # KL(p_t || p_s): torch's kl_div takes the student's log-probabilities first, then the teacher's.
    divergence = F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                          reduction="none", log_target=True).sum(1) * temperature ** 2
    return PairTerms(distillation_weight(logits_a, logits_b, labels), regression, divergence, a_teaches)


class MBSD(MultimodalMethod):
    """Modality-balanced self-distillation (see the module docstring): fused and unimodal cross-entropies plus the
    per-sample weighted logit regression between each pair of modalities and KL from its stronger modality to its
    weaker one.

    Works with any fusion head; the unimodal logits are the head's own (the concat head's ``W_m f_m + b / M``, as in
    BalanceBenchmark).

    Args:
        rs_weight: weight of the logit-regression term (1 in BalanceBenchmark's loss).
        kl_weight: weight of the distillation term (1 in BalanceBenchmark's loss).
        temperature: ``T`` of the KL's softened predictions (1: none, as BalanceBenchmark).
        detach_teacher: detach the teacher's side of the KL (default, as a distillation does); ``false`` lets
            its gradient pull the teacher towards the student too (BalanceBenchmark detaches nothing).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    needs_several_modalities = "MBSD distils between modalities"

    def __init__(self, rs_weight: float = 1.0, kl_weight: float = 1.0, temperature: float = 1.0,
                 detach_teacher: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.non_negative("rs_weight", rs_weight)
        options.non_negative("kl_weight", kl_weight)
        options.positive("temperature", temperature)
        if not isinstance(detach_teacher, bool):
            raise ValueError(f"method.detach_teacher must be true or false, got {detach_teacher!r}")
        self.rs_weight = float(rs_weight)
        self.kl_weight = float(kl_weight)
        self.temperature = float(temperature)
        self.detach_teacher = detach_teacher
        self.declare_metric("distill_weight")
        for m in self.modalities:
            self.declare_metric(f"teach_{m}")

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        regression, divergence, teaching = self.distillation(step.unimodal_logits, step.labels,
                                                             step.batch.get("present"))
        batch = len(step.labels)
        self.record("distill_weight", sum(teaching.values()), weight=batch)
        for m, value in teaching.items():
            self.record(f"teach_{m}", value, weight=batch)
        return {"fused": F.cross_entropy(step.logits, step.labels),
                "unimodal": sum(self.unimodal_losses(step).values()),
                "rs": self.rs_weight * regression, "kl": self.kl_weight * divergence}

    def distillation(self, unimodal_logits: Mapping[str, torch.Tensor], labels: torch.Tensor,
                     present: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The regression and KL terms (unweighted by ``rs_weight`` / ``kl_weight``) and each modality's teaching.

        Each pair's terms are ``sum_i w_i term_i / n`` over the ``n`` samples that have both modalities (the batch
        when none is missing), and the terms are the mean over the pairs.

        Returns:
            ``(regression, divergence, teaching)``; ``teaching[m]`` (no graph) is the mean over the pairs of the
            per-sample weight with which ``m`` teaches, so that ``sum_m teaching[m]`` is the mean weight.
        """
        regressions, divergences = [], []
        teaching = {m: unimodal_logits[m].new_zeros(()) for m in self.modalities}
        pairs = list(combinations(enumerate(self.modalities), 2))
        for (i, a), (j, b) in pairs:
            terms = pair_terms(unimodal_logits[a], unimodal_logits[b], labels, self.temperature,
                               self.detach_teacher)
            both = (terms.weight.new_ones(len(labels)) if present is None
                    else (present[:, i] & present[:, j]).to(terms.weight))
            weight = terms.weight * both
            count = both.sum().clamp_min(1.0)
            regressions.append((weight * terms.regression).sum() / count)
            divergences.append((weight * terms.divergence).sum() / count)
            teaching[a] = teaching[a] + (weight * terms.a_teaches).sum() / count / len(pairs)
            teaching[b] = teaching[b] + (weight * ~terms.a_teaches).sum() / count / len(pairs)
        return torch.stack(regressions).mean(), torch.stack(divergences).mean(), teaching
