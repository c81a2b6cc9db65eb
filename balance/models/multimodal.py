"""`MultimodalModel`: per-modality encoders and a fusion head, with modality dropping by feature zeroing, and
optional MMTM mid-fusion blocks between the encoders' stages."""

from __future__ import annotations

from collections.abc import Callable, Mapping
import torch
from torch import nn

from balance.dropping import drop_features, zero_input
from balance.models.fusion import FusionHead
from balance.models.mmtm import MMTMFusion


class MultimodalModel(nn.Module):
    """Encoders (one per modality, in the data's modality order) and a fusion head.

    Args:
        encoders: modality name -> encoder; each encoder exposes ``out_dim``.
        fusion: a callable (a ``_partial_`` fusion config) taking ``feature_dims`` and ``num_classes``.
        num_classes: number of classes; run.py fills it in from the datamodule.
        feature_dim: if set, every encoder whose ``out_dim`` differs is followed by a linear projection to this
            size (needed by a shared head).
        init: ``default`` (each layer's PyTorch initialisation) or ``xavier``: the OGM-GE / MLA official
            ``weight_init`` applied to the whole model (linear layers Xavier-normal with zero bias, 2-D convolutions
            Kaiming-normal with fan-out and ReLU gain, 2-D batch norms weight 1 and bias 0). ``xavier``
            re-initialises every such layer, pretrained encoder weights included.
        mmtm: ``None`` (default: each encoder runs alone) or a callable (a ``_partial_``
            :class:`~balance.models.mmtm.MMTMFusion` config, ``conf/model/mmtm/default.yaml``) taking the encoders:
            MMTM blocks between the encoders' stages (Greedy's mid-fusion), kept as ``mid_fusion``. Only encoders
            with stages support it (``ResNet18Encoder``, ``SmallCNNEncoder``). Its parameters belong to no single
            modality (``shared_parameters``); ``mid_fusion.modality_parameters(m)`` are modality m's excitations.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        fusion: Callable[..., FusionHead],
        num_classes: int,
        feature_dim: int | None = None,
        init: str = "default",
        mmtm: Callable[..., MMTMFusion] | None = None,
    ) -> None:
        super().__init__()
        if len(encoders) < 1:
            raise ValueError("a MultimodalModel needs at least one encoder")
        self.modalities = list(encoders)
        self.num_classes = num_classes
        self.encoders = nn.ModuleDict(dict(encoders))
        self.projections = nn.ModuleDict(
            {
                m: nn.Linear(enc.out_dim, feature_dim)
                for m, enc in encoders.items()
                if feature_dim is not None and enc.out_dim != feature_dim
            }
        )
        dims = {m: feature_dim if feature_dim is not None else enc.out_dim for m, enc in encoders.items()}
        self.fusion = fusion(feature_dims=dims, num_classes=num_classes)
        self.mid_fusion = mmtm(encoders=self.encoders) if mmtm is not None else None
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if init == "xavier":
            self.apply(official_weight_init)

    def encode(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Runs each modality's encoder (and projection) once: modality -> ``[B, d_m]`` features. With MMTM
        mid-fusion the encoders run stage by stage, side by side, with the blocks between their stages."""
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise KeyError(f"batch has no input for modalities {missing}; it has {list(inputs)}")
        if self.mid_fusion is None:
            return {m: self.encode_modality(m, inputs[m]) for m in self.modalities}
        return {m: self.project(m, f) for m, f in self.mid_fusion(self.encoders, inputs).items()}

    def encode_modality(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """One modality's features from its encoder (and projection) alone, without mid-fusion."""
        return self.project(modality, self.encoders[modality](inputs))

    def project(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        """``modality``'s projection of its encoder's output (the output itself where it has none)."""
        return self.projections[modality](features) if modality in self.projections else features

    def fuse(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        """Fused logits; ``keep`` (``BoolTensor[B, M]``, modality order) drops modalities by zeroing their features."""
        return self.fusion(drop_features(features, self.modalities, keep))

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's own logits (see the fusion head for the convention)."""
        return self.fusion.unimodal_logits(features)

    def forward(self, inputs: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.fuse(self.encode(inputs), keep)

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """The parameters that belong to ``modality``: its encoder, its projection and, where the fusion head has
        a block for it (sum and late fusion heads, gated projections, FiLM's conditioning layer), that block."""
        if modality not in self.encoders:
            raise KeyError(f"no modality {modality!r}; the model has {self.modalities}")
        parameters = list(self.encoders[modality].parameters())
        if modality in self.projections:
            parameters += list(self.projections[modality].parameters())
        return parameters + self.fusion.modality_parameters(modality)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters of no single modality (e.g. a concat or shared head, the MMTM blocks)."""
        owned = {id(p) for m in self.modalities for p in self.modality_parameters(m)}
        return [p for p in self.parameters() if id(p) not in owned]


INITS = ("default", "xavier")


def official_weight_init(module: nn.Module) -> None:
    """The initialisation of the OGM-GE and MLA official code (their ``weight_init``), for ``model.apply``."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
