"""UMT, uni-modal teachers (Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning",
ICML 2023): each encoder of the multimodal model is distilled from the encoder of a model trained on that modality
alone, ``loss = CE(fused) + w sum_m MSE(f_m, f_m^teacher)``.

The teachers are this project's own unimodal runs (``method=unimodal method.modality=<m>``), given as checkpoint
files or finished run directories (``method.teachers={audio: <run or ckpt>, visual: <run or ckpt>}``). They are
loaded when fitting starts, frozen, kept in evaluation mode and out of the optimizer and of the checkpoints, so a
trained UMT model is evaluated without them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from balance.checkpoints import read_checkpoint, selected_checkpoint
from balance import options
from balance.methods.joint import JointTraining
from balance.methods.step import Step

log = logging.getLogger(__name__)


class UniModalTeachers(JointTraining):
    """Joint training plus feature distillation from unimodal teachers (see the module docstring).

    Args:
        teachers: modality -> a unimodal run's checkpoint file or finished run directory (its selected
            checkpoint); every modality of the model needs one.
        distill_weight: ``w`` (10 in the paper's recipe).
        **kwargs: :class:`JointTraining` arguments (``unimodal_loss_weight`` 0 by default, as UMT).
    """

    def __init__(self, teachers: Mapping[str, str], distill_weight: float = 10.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.non_negative("distill_weight", distill_weight)
        missing = [m for m in self.modalities if m not in (teachers or {})]
        unknown = sorted(set(teachers or {}) - set(self.modalities))
        if missing or unknown:
            raise ValueError(f"method.teachers must name a unimodal run for each of {self.modalities} (missing "
                             f"{missing}, unknown {unknown}), e.g. method.teachers={{{self.modalities[0]}: "
                             f"outputs/<run of method=unimodal method.modality={self.modalities[0]}>, ...}}")
        self.teacher_paths = {m: str(teachers[m]) for m in self.modalities}
        self.distill_weight = distill_weight
        # Not submodules: frozen, outside the optimizer and the checkpoints (see the module docstring).
        self._teachers: dict[str, nn.Module] = {}
        for m in self.modalities:
            self.declare_metric(f"distill_{m}")

    def on_fit_start(self) -> None:
        self._teachers = {m: self.load_teacher(m).to(self.device) for m in self.modalities}

    def load_teacher(self, modality: str) -> nn.Module:
        """The encoder (and projection) of ``modality``'s teacher: a copy of this model's, with the teacher
        checkpoint's weights, frozen and in evaluation mode."""
        path = selected_checkpoint(self.teacher_paths[modality])
        checkpoint = read_checkpoint(path)
        trained = (checkpoint.get("run_config") or {}).get("method") or {}
        if trained and not (str(trained.get("_target_", "")).endswith("UnimodalTraining")
                            and trained.get("modality") == modality):
            raise ValueError(f"the {modality} teacher {path} was not trained with method=unimodal "
                             f"method.modality={modality} (its method: {trained.get('_target_')}, modality "
                             f"{trained.get('modality')})")
        parts = {"encoder": copy.deepcopy(self.model.encoders[modality])}
        if modality in self.model.projections:
            parts["projection"] = copy.deepcopy(self.model.projections[modality])
        teacher = nn.ModuleDict(parts)
        prefixes = {"encoder": f"model.encoders.{modality}.", "projection": f"model.projections.{modality}."}
        state = {f"{part}.{key[len(prefix):]}": value for part, prefix in prefixes.items()
                 for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
        try:
            teacher.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"the {modality} teacher {path} does not fit this model's {modality} encoder (train "
                             f"the teacher with the same model config): {str(error).splitlines()[0]}") from None
        log.info("UMT: %s teacher from %s", modality, path)
        return teacher.eval().requires_grad_(False)

    def teacher_features(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """``[B, d_m]``: the teacher's features of ``modality`` for ``inputs`` (no gradient)."""
        teacher = self._teachers[modality]
        with torch.no_grad():
            features = teacher["encoder"](inputs)
            return teacher["projection"](features) if "projection" in teacher else features

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        terms = dict(super().loss_terms(step))
        present = step.batch.get("present")
        distill = 0
        for i, m in enumerate(self.modalities):
            target = self.teacher_features(m, step.batch["inputs"][m])
            per_sample = F.mse_loss(step.features[m], target, reduction="none").mean(dim=1)
            distill = distill + self.record_over_present(f"distill_{m}", per_sample,
                                                         None if present is None else present[:, i])
        terms["distill"] = self.distill_weight * distill
        return terms
