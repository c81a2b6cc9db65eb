"""Scopes that leave a model and the random state as they found them, and batches moved to a device.

One owner for three things every evaluation-style pass needs (valuation, diagnostics, per-epoch test accuracy):
eval mode without gradients that gives every submodule its own mode back, the global random state kept
untouched by whatever samples inside, and a batch (nested dicts of tensors) on the model's device.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn


@contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside the block; afterwards every submodule has its previous mode again.

    Restoring submodule by submodule matters when a caller froze part of the model in eval mode (e.g. frozen
    BatchNorm statistics): ``module.train(was_training)`` would switch those back to training.
    """
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for sub, training in modes.items():
            sub.train(training)


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Whatever draws random numbers inside the block (torch on the CPU and CUDA, NumPy, Python's ``random``)
    leaves the global generators as they were, so a run with a diagnostic draws exactly what it would without."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def to_device(x: Any, device: torch.device | str) -> Any:
    """``x`` (a tensor, or nested mappings of tensors and other values) with every tensor on ``device``."""
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    return x


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without parameters)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
