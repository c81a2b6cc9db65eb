"""What a run shows on the console: the model summary and the progress bar, in place of Lightning's defaults.

Lightning's summary lists the LightningModule's direct children (the model and the metric collections) with a
FLOPs column that is zero without an example input; what a user of this project wants to see is how the
parameters split between the modalities, which is what methods balance. Its progress bar shows the logger's
``v_num``, a number that means nothing here (the run directory names the run).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelSummary, RichProgressBar
from pytorch_lightning.utilities.model_summary import get_human_readable_count
from torch import nn

log = logging.getLogger(__name__)


def _count(parameters: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)


def parameter_table(method: pl.LightningModule) -> list[tuple[str, int]]:
    """``(part, parameter count)`` for each modality (its encoder, projection and own head block), the shared
    model parameters (e.g. a concatenation head) and the method's parameters outside the model (e.g. auxiliary
    classifiers), then the total."""
    model = method.model
    rows = [(f"{m} (encoder and own head parts)", _count(model.modality_parameters(m))) for m in model.modalities]
    rows.append(("shared (fusion head, cross-modal blocks)", _count(model.shared_parameters())))
    in_model = {id(p) for p in model.parameters()}
    rows.append(("method's own (outside the model)", _count(p for p in method.parameters() if id(p) not in in_model)))
    rows.append(("total", _count(method.parameters())))
    return rows


class ModalitySummary(ModelSummary):
    """Logs :func:`parameter_table` (and how many parameters train) when fitting starts, on rank zero; it takes
    the place of Lightning's own summary (``trainer.enable_model_summary=false`` turns it off)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not hasattr(pl_module, "model"):
            return
        rows = parameter_table(pl_module)
        width = max(len(part) for part, _ in rows)
        trainable = _count(p for p in pl_module.parameters() if p.requires_grad)
        lines = [f"  {part:<{width}}  {get_human_readable_count(count):>8}" for part, count in rows]
        log.info("%s parameters (%s trainable):\n%s", type(pl_module).__name__, get_human_readable_count(trainable),
                 "\n".join(lines))


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar without ``v_num``."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def console_callbacks(trainer: DictConfig) -> list[pl.Callback]:
    """The summary and progress bar callbacks for the ``trainer`` config: each only where its
    ``enable_model_summary`` / ``enable_progress_bar`` flag (default true) leaves it on."""
    callbacks: list[pl.Callback] = []
    if trainer.get("enable_model_summary", True):
        callbacks.append(ModalitySummary())
    if trainer.get("enable_progress_bar", True):
        callbacks.append(ProgressBar())
    return callbacks


def log_lightning_through_root() -> None:
    """Sends Lightning's messages through the root logger's handlers (under Hydra: the console and the run's
    ``train.log``) instead of its own stderr handler, which keeps them out of ``train.log``. Call it once logging is
    configured (in the Hydra entry point); elsewhere Lightning keeps its own handler."""
    if not logging.getLogger().handlers:
        return
    for name in ("pytorch_lightning", "lightning_fabric"):
        lightning = logging.getLogger(name)
        for handler in list(lightning.handlers):
            if type(handler) is logging.StreamHandler:
                lightning.removeHandler(handler)
        lightning.propagate = True
