"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022).

Joint training on the fused cross-entropy; after every backward pass each modality's confidence on the batch,
``s_m = sum_i softmax(z_m,i)[y_i]`` with ``z_m`` its own logits (the concat head's block of ``m`` plus ``b / M``),
decides how much the dominant modality's encoder may learn: with ``rho_m = s_m / s_weakest`` a modality with
``rho_m > 1`` has its gradients scaled by ``k_m = 1 - tanh(alpha * relu(rho_m))``, the others keep ``k = 1``.
Generalisation enhancement (``ge``) then adds Gaussian noise with the gradient's own standard deviation to every
modulated gradient, ``g <- k g + N(0, std(g))``, the dominant modality's and the others' alike, as the official
code does. For two modalities this is the official rule exactly (``rho`` of the stronger modality against the
weaker); for more, each modality is compared with the weakest one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.epochs import EpochWindow
from balance.methods.step import Step

PARAMS = ("conv", "weights", "all")


def confidence_scores(unimodal_logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """``[M]``: each modality's summed softmax probability of the true class over the batch (OGM-GE's ``s_m``)."""
    return torch.stack([F.softmax(z.detach().float(), dim=1).gather(1, labels.view(-1, 1)).sum()
                        for z in unimodal_logits.values()])


def modulation_coefficients(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[M]`` gradient coefficients: ``1 - tanh(alpha * relu(rho_m))`` where ``rho_m = s_m / min_{j != m} s_j``
    exceeds 1, else 1 (at an exact tie nothing is damped; the official code damps the audio branch there)."""
    others = torch.stack([torch.cat([scores[:m], scores[m + 1:]]).min() for m in range(len(scores))])
    ratio = scores / others
    return torch.where(ratio > 1, 1 - torch.tanh(alpha * F.relu(ratio)), torch.ones_like(ratio))


class OGMGE(MultimodalMethod):
    """On-the-fly gradient modulation (OGM) with generalisation enhancement (GE).

    The loss is the fused cross-entropy only (official). The modulation is the gradient hook: it runs after the
    backward pass, on the gradients averaged over DDP ranks, with the scores summed over the ranks, so every rank
    modulates alike; the GE noise comes from the method's generator on the gradients' device, the same on every
    rank and restored on resume.

    Args:
        alpha: modulation strength (official: 0.8 CREMA-D, 0.1 VGGSound; BalanceBenchmark 0.3).
        ge: add the generalisation-enhancement noise (``False`` is OGM alone).
        modulation_starts: first modulated epoch (0-based, official 0).
        modulation_ends: last modulated epoch, inclusive (official 50).
        params: which gradients of a modality are modulated: ``conv`` (official: its 4-D gradients, the 2-D
            convolution kernels of its encoder), ``weights`` (every parameter of the modality with two or more
            dimensions, BalanceBenchmark's choice), ``all`` (every parameter of the modality,
            ``model.modality_parameters``).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    def __init__(self, alpha: float = 0.8, ge: bool = True, modulation_starts: int = 0, modulation_ends: int = 50,
                 params: str = "conv", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.positive("alpha", alpha)
        options.one_of("params", params, PARAMS)
        self.alpha = float(alpha)
        self.ge = ge
        self.window = EpochWindow(modulation_starts, modulation_ends)
        self.params = params
        self.modulated = {m: self._selected(m) for m in self.modalities}
        for m in self.modalities:
            self.declare_metric(f"coeff_{m}")

    def _selected(self, modality: str) -> list[torch.nn.Parameter]:
        parameters = [p for p in self.model.modality_parameters(modality) if p.requires_grad]
        if self.params == "conv":
            parameters = [p for p in parameters if p.dim() == 4]
        elif self.params == "weights":
            parameters = [p for p in parameters if p.dim() >= 2]
        if not parameters:
            raise ValueError(
                f"OGM-GE with params={self.params!r} modulates nothing of modality {modality!r} (its encoder "
                "has no convolution kernels): use method.params=weights or method.params=all")
        return parameters

    def modify_gradients(self, step: Step) -> None:
        if self.current_epoch not in self.window:
            return
        scores = self.reduce_across_ranks(confidence_scores(step.unimodal_logits, step.labels))
        coefficients = modulation_coefficients(scores, self.alpha)
        for m, k in zip(self.modalities, coefficients):
            self.record(f"coeff_{m}", k)
            for p in self.modulated[m]:
                if p.grad is None:
                    continue
                grad = p.grad * k.to(p.grad)
                if self.ge:
                    noise = torch.randn(p.grad.shape, generator=self.generator_on(p.grad.device),
                                        device=p.grad.device, dtype=p.grad.dtype)
                    grad = grad + noise * (p.grad.std() + 1e-8)
                p.grad = grad
