"""MMTM mid-fusion: multimodal transfer modules between the stages of the encoders (Joze et al., CVPR 2020), as
Greedy (Wu et al., ICML 2022) uses them, generalised to M modalities.

One MMTM block joins one stage of every encoder. With ``A_m`` the maps of modality ``m`` after that stage
(``[B*T_m, C_m, h_m, w_m]``, frames folded into the batch):

- squeeze: ``S_m = mean of A_m over its frames and space`` (``[B, C_m]``);
- joint representation: ``Z = relu(W_s [S_1, ..., S_M] + b_s)``, one shared layer on the concatenation, of width
  ``int(2 * sum_m C_m / ratio)`` (the official ``fc_squeeze``; ``ratio`` 4);
- excitation: ``E_m = sigmoid(W_m Z + b_m)`` (``[B, C_m]``, one layer per modality: the official ``fc_<m>``);
- output: ``A_m * E_m``, the scale of each channel broadcast over the modality's frames and space.

For two modalities this is the official ``MMTM_mitigate`` block (without its ``SEonly``/``shareweight``
variants). For M modalities the only choice is the width of ``Z``: the official formula is kept as it is,
``2 * (sum of the channels) / ratio``, so the joint layer grows with the channels it sees, and every excitation
reads the one joint representation of all modalities (each modality's scale depends on every modality's
squeeze, as the pairwise block's do).

Greedy's *isolation* (its curation mode): an isolated modality ``c`` gets a constant scale, the running average
of its own past excitations ``avg_c`` (a buffer, so checkpoints keep it), instead of ``E_c``; no cross-modal input
then reaches branch ``c``, while the other modalities' scales are computed as usual (they still see ``S_c``).
The averages are cumulative means over every training forward pass since the start (isolated ones included), each
updated with the batch mean of the modality's own ``E_m`` before it is used, so an isolated scale includes the
current batch, as in the official code. The official code has two slips here, selectable as
``running_average="official"``: the second modality's average is updated with the *first* modality's scales, and
the averages are updated in evaluation forward passes too. The default ``"own"`` is the paper's intent: each
modality's own scales, training forward passes only.

The isolated modality's excitation stays in the autograd graph with a zero weight, so its parameters get a zero
gradient rather than none: DDP without ``find_unused_parameters`` needs every parameter to take part in every
step (the official loop, on PyTorch 1.x whose ``zero_grad`` filled zeros, gave them zero gradients too).

Encoders that support MMTM expose their stages (see `balance.models.encoders`): ``ResNet18Encoder`` (stem with
``layer1``, then ``layer2``, ``layer3``, ``layer4``) and ``SmallCNNEncoder`` (one stage per block).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn import functional as F

RUNNING_AVERAGES = ("own", "official")
log = logging.getLogger(__name__)


def supports_stages(encoder: nn.Module) -> bool:
    """Whether ``encoder`` exposes the stage protocol (``fold``, ``stages``, ``stage_channels``, ``finish``)."""
    return all(hasattr(encoder, name) for name in ("fold", "stages", "stage_channels", "finish"))


def squeeze(maps: torch.Tensor, frames: int) -> torch.Tensor:
    """``[B, C]``: maps ``[B*T, C, *space]`` averaged over their ``T`` frames and space."""
    grouped = maps.unflatten(0, (-1, frames))  # [B, T, C, *space]
    return grouped.mean(dim=(1, *range(3, grouped.dim())))


def excite(maps: torch.Tensor, scale: torch.Tensor, frames: int) -> torch.Tensor:
    """Maps ``[B*T, C, *space]`` times a per-sample channel scale ``[B, C]`` (broadcast over frames and space)."""
    grouped = maps.unflatten(0, (-1, frames))
    return (grouped * scale.view(scale.shape[0], 1, scale.shape[1], *([1] * (maps.dim() - 2)))).flatten(0, 1)


class MMTM(nn.Module):
    """One MMTM block over M modalities (module docstring), with the running averages Greedy's isolation uses.

    Args:
        channels: modality -> channels of its maps at this block (in the model's modality order).
        ratio: reduction ratio of the joint layer (official 4): its width is ``int(2 * sum(channels) / ratio)``.
        running_average: ``own`` (each modality's own scales, training forwards only) or ``official`` (every
            modality's average follows the first modality's scales, in every forward pass; needs equal channels).

    Attributes:
        isolated: the modality whose scale is its running average (``None``: none); set it with
            :meth:`MMTMFusion.isolating`.
    """

    def __init__(self, channels: Mapping[str, int], ratio: float = 4, running_average: str = "own") -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"an MMTM block joins at least two modalities, got {list(channels)}")
        if not ratio > 0:
            raise ValueError(f"ratio must be > 0, got {ratio!r}")
        if running_average not in RUNNING_AVERAGES:
            raise ValueError(f"running_average must be one of {RUNNING_AVERAGES}, got {running_average!r}")
        if running_average == "official" and len(set(channels.values())) > 1:
            raise ValueError("running_average='official' updates every modality's average with the first "
                             f"modality's scales, which needs equal channels; got {dict(channels)}")
        self.modalities = list(channels)
        self.channels = dict(channels)
        self.running_average = running_average
        hidden = max(1, int(2 * sum(channels.values()) / ratio))
        self.squeeze = nn.Linear(sum(channels.values()), hidden)
        self.excitations = nn.ModuleDict({m: nn.Linear(hidden, c) for m, c in channels.items()})
        for m, c in channels.items():
            self.register_buffer(f"average_{m}", torch.zeros(c))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.isolated: str | None = None

    def average(self, modality: str) -> torch.Tensor:
        """``[C_m]``: the running average of modality's scales."""
        return getattr(self, f"average_{modality}")

    def scales(self, squeezed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Modality -> ``[B, C_m]`` excitation ``sigmoid(W_m relu(W_s [S_1, ..., S_M] + b_s) + b_m)``."""
        joint = F.relu(self.squeeze(torch.cat([squeezed[m] for m in self.modalities], dim=1)))
        return {m: torch.sigmoid(self.excitations[m](joint)) for m in self.modalities}

    @torch.no_grad()
    def _update_averages(self, scales: Mapping[str, torch.Tensor]) -> None:
        for m in self.modalities:
            source = scales[self.modalities[0]] if self.running_average == "official" else scales[m]
            average = self.average(m)
            n = self.count.to(average.dtype)  # a tensor: no host synchronisation
            average.mul_(n).add_(source.mean(0).to(average)).div_(n + 1)
        self.count += 1

    def forward(self, maps: Mapping[str, torch.Tensor], frames: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Modality -> its maps ``[B*T_m, C_m, ...]`` rescaled channel-wise; ``frames`` is each modality's ``T_m``."""
        scales = self.scales({m: squeeze(maps[m], frames[m]) for m in self.modalities})
        if self.training or self.running_average == "official":
            self._update_averages(scales)
        if self.isolated is not None:
            scale = scales[self.isolated]
            # The average, constant over the batch; `scale * 0` keeps the excitation in the graph (zero gradient).
            scales[self.isolated] = self.average(self.isolated).to(scale).expand_as(scale) + scale * 0
        return {m: excite(maps[m], scales[m], frames[m]) for m in self.modalities}


class MMTMFusion(nn.Module):
    """MMTM blocks between the encoders' stages: the mid-fusion of a :class:`~balance.models.MultimodalModel`
    (its ``mmtm`` option, a ``_partial_`` of this class that the model completes with its encoders).

    Stages are paired counting from the end: block ``k`` of ``K`` joins stage ``n_m - K + k`` of every encoder
    ``m`` (``n_m`` its stage count), so the last block rescales the last stage's maps, before pooling, and encoders
    of different depth pair their deepest stages (AV-Digits' audio CNN has 3 blocks, the visual one 2). For two
    ResNet18s and ``stages=3`` this is the official model: blocks after ``layer2``, ``layer3`` and ``layer4``.

    Args:
        encoders: modality -> encoder with stages (``ResNet18Encoder``, ``SmallCNNEncoder``).
        ratio: the blocks' reduction ratio (official 4).
        stages: how many of the last stages get a block (official 3); capped at the shallowest encoder's count.
        running_average: ``own`` or ``official``, see :class:`MMTM`.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], ratio: float = 4, stages: int = 3,
                 running_average: str = "own") -> None:
        super().__init__()
        unsupported = {m: type(e).__name__ for m, e in encoders.items() if not supports_stages(e)}
        if unsupported:
            raise ValueError(f"MMTM mid-fusion runs between encoder stages; the encoders of {unsupported} have none. "
                             "Encoders that support it: ResNet18Encoder, SmallCNNEncoder")
        if len(encoders) < 2:
            raise ValueError(f"MMTM mid-fusion joins at least two modalities, got {list(encoders)}")
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
        self.modalities = list(encoders)
        channels = {m: list(e.stage_channels) for m, e in encoders.items()}
        depth = min(len(c) for c in channels.values())
        if stages > depth:
            log.info("MMTM: %d blocks asked for, the shallowest encoder has %d stages: %d blocks", stages, depth,
                     depth)
        self.num_blocks = min(stages, depth)
        #: modality -> index of the stage after which each block runs
        self.positions = {m: [len(c) - self.num_blocks + k for k in range(self.num_blocks)]
                          for m, c in channels.items()}
        self.blocks = nn.ModuleList(
            MMTM({m: channels[m][self.positions[m][k]] for m in self.modalities}, ratio, running_average)
            for k in range(self.num_blocks))

    def forward(self, encoders: Mapping[str, nn.Module], inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Modality -> ``[B, out_dim_m]`` encoder features, the encoders run stage by stage with the blocks between."""
        maps, frames, stages, done = {}, {}, {}, {}
        for m in self.modalities:
            maps[m], frames[m] = encoders[m].fold(inputs[m])
            stages[m], done[m] = encoders[m].stages(), 0
        for k, block in enumerate(self.blocks):
            for m in self.modalities:
                for stage in stages[m][done[m]:self.positions[m][k] + 1]:
                    maps[m] = stage(maps[m])
                done[m] = self.positions[m][k] + 1
            maps = block(maps, frames)
        return {m: encoders[m].finish(maps[m], frames[m]) for m in self.modalities}

    @contextlib.contextmanager
    def isolating(self, modality: str | None) -> Iterator[None]:
        """Within the block, ``modality``'s scale at every MMTM block is its running average (``None``: none)."""
        if modality is not None and modality not in self.modalities:
            raise KeyError(f"no modality {modality!r}; the mid-fusion joins {self.modalities}")
        previous = [block.isolated for block in self.blocks]
        for block in self.blocks:
            block.isolated = modality
        try:
            yield
        finally:
            for block, before in zip(self.blocks, previous):
                block.isolated = before

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """The excitation layers of ``modality`` (every block's ``W_m``, ``b_m``): Greedy's bypass of that branch."""
        if modality not in self.modalities:
            raise KeyError(f"no modality {modality!r}; the mid-fusion joins {self.modalities}")
        return [p for block in self.blocks for p in block.excitations[modality].parameters()]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The joint (squeeze) layers of every block, shared by every modality's bypass."""
        return [p for block in self.blocks for p in block.squeeze.parameters()]
