"""MMPareto: boosting multimodal learning with innocent unimodal assistance (Wei & Hu, ICML 2024).

Every modality gets a linear classifier of its own on its encoder features (the official model's ``head_audio``
and ``head_video``, beside the fused ``head``); the loss is ``CE(fused) + sum_m CE(head_m(f_m))``. The parameters
of encoder ``m`` then receive two gradients: ``g_mm`` of the multimodal loss and ``g_m`` of its own unimodal loss
(no other unimodal loss reaches encoder ``m``: each encoder sees only its modality). MMPareto integrates the two
per encoder: equal weights ``(1/2, 1/2)`` where they agree (``cos(g_mm, g_m) > 0``), else MinNorm's (MGDA's)
``(c, 1 - c)`` with ``c = clip(((g_m - g_mm) . g_m) / ||g_mm - g_m||^2, 0, 1)``; the new gradient
``2 (c g_mm + (1 - c) g_m)`` is lifted to the norm of the summed gradient ``g_mm + g_m`` where it is smaller and
multiplied by ``gamma`` (official 1.5). The fusion head and the unimodal heads keep their ordinary gradients.

Two backward passes give every ``g_mm`` and ``g_m`` for any number of modalities: ``observe_step`` takes ``g_mm``
of every encoder with one ``torch.autograd.grad`` of the multimodal loss, and the ordinary backward leaves
``g_mm + g_m`` in each encoder's ``.grad``, so ``g_m`` is the difference (the official code backpropagates each
of the M + 1 losses separately, then their sum).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.step import Step

RESCALES = ("tensor", "encoder")


def min_norm_weights(aa: torch.Tensor, ab: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
    """``[2]``: the weights ``(c, 1 - c)`` of the point of smallest norm on the segment between two vectors
    ``g1``, ``g2``, from their inner products ``aa = g1.g1``, ``ab = g1.g2``, ``bb = g2.g2`` (MGDA's MinNorm for
    two objectives): ``c = clip((bb - ab) / (aa - 2 ab + bb), 0, 1)``. Equal vectors (every ``c`` gives the same
    point) get ``(1/2, 1/2)``. The official solver clips to ``[0.001, 0.999]`` instead of ``[0, 1]``; the ends are
    only reached when the gradients agree, where MMPareto does not call it."""
    denominator = aa - 2 * ab + bb  # ||g1 - g2||^2
    tiny = torch.finfo(denominator.dtype).tiny
    c = torch.where(denominator > 0, ((bb - ab) / denominator.clamp_min(tiny)).clamp(0, 1), torch.full_like(aa, 0.5))
    return torch.stack([c, 1 - c])


def pareto_weights(aa: torch.Tensor, ab: torch.Tensor, bb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [2], cosine)`` of the multimodal and the unimodal gradient of one encoder: ``(1/2, 1/2)`` where
    they agree (``cos > 0``), :func:`min_norm_weights` where they conflict (a zero gradient has cosine 0)."""
    cosine = ab / (aa.sqrt() * bb.sqrt()).clamp_min(1e-8)
    weights = torch.where(cosine > 0, torch.full((2,), 0.5, dtype=aa.dtype, device=aa.device),
                          min_norm_weights(aa, ab, bb))
    return weights, cosine


def _lift(target: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``max(1, target / norm)``; 1 for a zero gradient (there is no direction to lift)."""
    return torch.where(norm > 0, (target / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp_min(1),
                       torch.ones_like(norm))


def integrate_gradients(multimodal: list[torch.Tensor], total: list[torch.Tensor], gamma: float = 1.5,
                        rescale: str = "tensor") -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """MMPareto's gradient for one encoder's parameter tensors.

    Args:
        multimodal: ``g_mm`` per parameter tensor (the multimodal loss's gradient).
        total: ``g_mm + g_m`` per parameter tensor (the summed loss's gradient).
        gamma: the final factor (official 1.5).
        rescale: ``tensor`` (official): each tensor's new gradient is lifted to the norm of its own summed
            gradient where smaller; ``encoder``: one factor for the whole encoder, which keeps the integrated
            direction (a tensor-wise lift tilts it).

    Returns:
        ``(gradients, cosine, weight)``: the new gradient per tensor, ``cos(g_mm, g_m)`` over the whole encoder and
        the weight ``c`` of ``g_mm`` (1/2 without conflict).
    """
    # Three inner products per tensor give everything; g_m = total - g_mm is never materialised.
    aa, at, tt = (torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys)])
                  for xs, ys in ((multimodal, multimodal), (multimodal, total), (total, total)))
    a2, ab = aa.sum(), at.sum() - aa.sum()
    weights, cosine = pareto_weights(a2, ab, tt.sum() - 2 * at.sum() + a2)
    # 2 (c g_mm + (1 - c) g_m) = 2 (1 - c) total + 2 (2c - 1) g_mm; measured, not expanded, for its norm.
    new = [torch.mul(t, 2 * weights[1]).addcmul_(a, 2 * (weights[0] - weights[1])) for a, t in zip(multimodal, total)]
    norms = torch.stack([n.norm() for n in new])
    if rescale == "tensor":
        factors = _lift(tt.sqrt(), norms)
    else:
        factors = _lift(tt.sum().sqrt(), norms.norm()).expand(len(new))
    return [n.mul_(gamma * f) for n, f in zip(new, factors)], cosine, weights[0]


class MMPareto(MultimodalMethod):
    """MMPareto: a unimodal head per modality, and per encoder the Pareto integration of the multimodal and the
    unimodal gradient (module docstring).

    Works with every fusion head (the fused loss may mix the modalities in any way: each encoder still sees only
    its own input). Under DDP ``g_mm`` is averaged over the ranks like the ``.grad`` it is subtracted from, so every
    rank integrates the same gradients. With gradient accumulation the integration runs once per optimizer step,
    on the accumulated gradients.

    Args:
        gamma: factor of the integrated gradient (official 1.5, hard-coded; BalanceBenchmark's ``alpha``).
        rescale: ``tensor`` (official, per parameter tensor) or ``encoder`` (one factor per encoder), see
            :func:`integrate_gradients`.
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    def __init__(self, gamma: float = 1.5, rescale: str = "tensor", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.positive("gamma", gamma)
        options.one_of("rescale", rescale, RESCALES)
        self.gamma = float(gamma)
        self.rescale = rescale
        dims = self.model.fusion.feature_dims
        self.unimodal_heads = nn.ModuleDict({m: nn.Linear(dims[m], self.model.num_classes) for m in self.modalities})
        self.encoder_parameters = {m: self._encoder_parameters(m) for m in self.modalities}
        owner: dict[int, str] = {}
        for m, parameters in self.encoder_parameters.items():
            for p in parameters:
                if id(p) in owner:
                    raise ValueError(f"MMPareto needs encoders that see only their own modality, but {owner[id(p)]!r} "
                                     f"and {m!r} share a parameter: give every modality its own encoder")
                owner[id(p)] = m
        # g_mm of the current optimizer step (summed over accumulated batches); never outlives the step.
        self._multimodal_grads: dict[str, list[torch.Tensor]] | None = None
        for m in self.modalities:
            for name in ("cos", "conflict", "weight"):
                self.declare_metric(f"{name}_{m}")

    def _encoder_parameters(self, modality: str) -> list[nn.Parameter]:
        """Modality's trainable parameters upstream of its features (encoder, projection): the ones both losses
        reach. A block the fusion head keeps for the modality only sees the multimodal loss and is left alone."""
        in_head = {id(p) for p in self.model.fusion.modality_parameters(modality)}
        parameters = [p for p in self.model.modality_parameters(modality) if p.requires_grad and id(p) not in in_head]
        if not parameters:
            raise ValueError(f"MMPareto integrates the gradients of each modality's encoder, but {modality!r} has "
                             "no trainable encoder parameter: unfreeze it, or use method=joint "
                             "method.unimodal_loss_weight=1")
        return parameters

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's logits through its own unimodal head."""
        return {m: self.unimodal_heads[m](features[m]) for m in self.modalities}

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        unimodal = torch.stack(list(self.unimodal_losses(step).values())).sum()
        return {"fused": F.cross_entropy(step.logits, step.labels), "unimodal": unimodal}

    def observe_step(self, step: Step) -> None:
        """Takes ``g_mm`` of every encoder (the first backward pass; the graph is kept for the ordinary one)."""
        parameters = [p for m in self.modalities for p in self.encoder_parameters[m]]
        grads = torch.autograd.grad(step.losses["fused"], parameters, retain_graph=True, allow_unused=True)
        # Lightning divides the loss by the accumulation count before backward; so is g_mm, to match .grad.
        scale = 1.0 / self.trainer.accumulate_grad_batches
        grads = iter([torch.zeros_like(p) if g is None else g if scale == 1 else g * scale
                      for p, g in zip(parameters, grads)])
        new = {m: [next(grads) for _ in self.encoder_parameters[m]] for m in self.modalities}
        if self._multimodal_grads is not None:
            new = {m: [a + b for a, b in zip(self._multimodal_grads[m], new[m])] for m in self.modalities}
        self._multimodal_grads = new

    def modify_gradients(self, step: Step) -> None:
        multimodal, self._multimodal_grads = self._multimodal_grads, None
        if multimodal is None:
            return
        # .grad is averaged over the ranks; g_mm must be too.
        reduced = iter(self.mean_across_ranks([g for m in self.modalities for g in multimodal[m]]))
        multimodal = {m: [next(reduced) for _ in multimodal[m]] for m in self.modalities}
        for m in self.modalities:
            parameters = self.encoder_parameters[m]
            total = [torch.zeros_like(p) if p.grad is None else p.grad for p in parameters]
            new, cosine, weight = integrate_gradients(multimodal[m], total, self.gamma, self.rescale)
            for p, grad in zip(parameters, new):
                p.grad = grad
            self.record(f"cos_{m}", cosine)
            self.record(f"conflict_{m}", (cosine <= 0).float())
            self.record(f"weight_{m}", weight)
