"""Small models and batches the diagnostics' tests share."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from balance.methods.joint import JointTraining
from balance.models import ConcatFusion, MultimodalModel


class Identity(nn.Module):
    """An encoder that passes its feature-vector input through, so a test sets the features directly."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def joint_method(encoders: dict[str, nn.Module], num_classes: int = 3, fusion=ConcatFusion,
                 **model_kwargs) -> JointTraining:
    """Joint training (SGD, lr 0.1) of ``encoders`` under a ``fusion`` head."""
    model = MultimodalModel(encoders, partial(fusion), num_classes=num_classes, **model_kwargs)
    return JointTraining(model=model, optimizer=partial(torch.optim.SGD, lr=0.1))


def make_batches(inputs: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int,
                 present: torch.Tensor | None = None) -> list[dict]:
    """Batches ``{"inputs", "label", "index"}`` (and ``present`` when given) of ``batch_size`` rows, in order."""
    out = []
    for start in range(0, len(labels), batch_size):
        rows = slice(start, start + batch_size)
        batch = {"inputs": {m: x[rows] for m, x in inputs.items()}, "label": labels[rows],
                 "index": torch.arange(len(labels))[rows]}
        if present is not None:
            batch["present"] = present[rows]
        out.append(batch)
    return out
