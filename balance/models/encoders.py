"""Encoders: each maps one modality's input to a pooled feature vector of size `out_dim`.

The convolutional encoders (`ResNet18Encoder`, `SmallCNNEncoder`) also expose their *stages*, so that mid-fusion
blocks (`balance.models.mmtm`, MMTM) can run between them: ``fold(x)`` gives the input as a batch of 2-D inputs
and its frame count (frames folded into the batch), ``stages()`` the stage modules in order, ``stage_channels``
their output channels, and ``finish(maps, frames)`` the feature vector from the last stage's maps, so that
``finish(stages[-1](... stages[0](fold(x)[0])), frames)`` equals ``forward(x)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torchvision
from torch import nn


def _fold_frames(x: torch.Tensor, frame_dims: int) -> tuple[torch.Tensor, int]:
    """Folds an optional frame axis ``[B, T, C, H, W]`` into the batch so a 2-D network can run on it."""
    if x.dim() == frame_dims + 1:
        return x, 1
    if x.dim() == frame_dims + 2:
        batch, frames = x.shape[:2]
        return x.flatten(0, 1), frames
    raise ValueError(f"expected a {frame_dims + 1}-D or {frame_dims + 2}-D input, got shape {tuple(x.shape)}")


class ResNet18Encoder(nn.Module):
    """ResNet18 trunk for spectrograms (1 channel) or video frames, pooled over time and space.

    Frames come as ``[B, T, C, H, W]`` (or a single image ``[B, C, H, W]``); as in OGM-GE every frame runs through
    the 2-D network and the feature maps are average-pooled over frames and space together.

    Args:
        in_channels: 1 for a spectrogram, 3 for RGB frames.
        weights: a torchvision weights name (e.g. ``"IMAGENET1K_V1"``) for users who can download them; only
            for 3 input channels. ``None`` trains from scratch (the papers' setting).
    """

    out_dim = 512

    def __init__(self, in_channels: int = 3, weights: str | None = None) -> None:
        super().__init__()
        if weights is not None and in_channels != 3:
            raise ValueError("pretrained ResNet18 weights need in_channels=3")
        net = torchvision.models.resnet18(weights=weights)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.trunk = nn.Sequential(*list(net.children())[:-2])

    #: output channels of each stage (`stages`)
    stage_channels = (64, 128, 256, 512)

    def fold(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``([B*T, C, H, W], T)``: the input with its frames folded into the batch (``T = 1`` for an image)."""
        return _fold_frames(x, frame_dims=3)

    def stages(self) -> list[nn.Module]:
        """The trunk's stages for mid-fusion: stem and ``layer1``, then ``layer2``, ``layer3``, ``layer4``."""
        return [self.trunk[:5], self.trunk[5], self.trunk[6], self.trunk[7]]

    def finish(self, maps: torch.Tensor, frames: int) -> torch.Tensor:
        """``[B, 512]``: the last stage's maps ``[B*T, 512, h, w]`` pooled over frames and space."""
        return maps.unflatten(0, (-1, frames)).mean(dim=(1, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, frames = self.fold(x)
        return self.finish(self.trunk(flat), frames)  # trunk: [B*T, 512, h, w]


class SmallCNNEncoder(nn.Module):
    """A few conv-BN-ReLU blocks with max pooling, for small images and short spectrograms.

    Accepts ``[B, C, H, W]`` or frames ``[B, T, C, H, W]`` (features averaged over frames).

    Args:
        in_channels: input channels.
        channels: output channels of each block; each block halves the resolution.
        out_dim: size of the output feature (a linear projection of the pooled maps).
        dropout: dropout before the projection.
    """

    def __init__(
        self, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128), out_dim: int = 128, dropout: float = 0.0
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            blocks += [
                nn.Conv2d(previous, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.project = nn.Sequential(nn.Dropout(dropout), nn.Linear(previous, out_dim))
        self.out_dim = out_dim
        self.stage_channels = tuple(channels)

    def fold(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``([B*T, C, H, W], T)``: the input with its frames folded into the batch (``T = 1`` for an image)."""
        return _fold_frames(x, frame_dims=3)

    def stages(self) -> list[nn.Module]:
        """One stage per block (conv, batch norm, ReLU, max pooling), for mid-fusion."""
        return [self.blocks[i:i + 4] for i in range(0, len(self.blocks), 4)]

    def finish(self, maps: torch.Tensor, frames: int) -> torch.Tensor:
        """``[B, out_dim]``: the last block's maps pooled over space, then frames, and projected."""
        return self.project(maps.mean(dim=(2, 3)).unflatten(0, (-1, frames)).mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, frames = self.fold(x)
        return self.finish(self.blocks(flat), frames)


class MLPEncoder(nn.Module):
    """An MLP for pre-extracted feature vectors ``[B, in_dim]``.

    Args:
        in_dim: input feature size.
        hidden_dims: widths of the hidden layers (ReLU after each).
        out_dim: output feature size.
        dropout: dropout after each hidden layer.
    """

    def __init__(
        self, in_dim: int, hidden_dims: Sequence[int] = (128,), out_dim: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_dim
        for width in hidden_dims:
            layers += [nn.Linear(previous, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            previous = width
        layers.append(nn.Linear(previous, out_dim))
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` (0 = padding) to a feature vector.

    With ``num_layers=0`` a bag of embeddings (mean over non-padding tokens); otherwise a small Transformer
    encoder with learned positions, mean-pooled over non-padding tokens.

    Args:
        vocab_size: number of token ids including padding (0) and unknown; the datamodule fills it in from the
            vocabulary it builds on the training split.
        embed_dim: embedding and model width.
        out_dim: output feature size.
        num_layers: Transformer layers (0 for a bag of embeddings).
        num_heads: attention heads.
        max_length: longest sequence the learned positions cover.
        dropout: dropout inside the Transformer.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 128,
        out_dim: int = 128,
        num_layers: int = 1,
        num_heads: int = 4,
        max_length: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.positions = nn.Parameter(torch.zeros(max_length, embed_dim)) if num_layers else None
        self.transformer = (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(
                    embed_dim, num_heads, dim_feedforward=2 * embed_dim, dropout=dropout, batch_first=True
                ),
                num_layers,
                enable_nested_tensor=False,
            )
            if num_layers
            else None
        )
        self.project = nn.Linear(embed_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == 0
        x = self.embedding(tokens)
        if self.transformer is not None:
            if tokens.shape[1] > self.positions.shape[0]:
                raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_length {self.positions.shape[0]}")
            # An all-padding row (a dropped text) would make attention NaN: let it attend to its padding.
            all_pad = pad.all(dim=1, keepdim=True)
            x = self.transformer(x + self.positions[: tokens.shape[1]], src_key_padding_mask=pad & ~all_pad)
        weights = (~pad).unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.project(pooled)


class SequenceEncoder(nn.Module):
    """Feature sequences ``[B, L, in_dim]`` (a time step of all zeros is padding) to a feature vector: a GRU's last
    hidden state over the steps that are not padding (``kind="gru"``), or a small Transformer encoder with learned
    positions, mean-pooled over them (``kind="transformer"``). The steps are taken in order, padding anywhere; a
    sequence of padding only (a dropped modality) gives the features of one zero step.

    Args:
        in_dim: features per time step (e.g. 300 GloVe, 74 COVAREP, 35 Facet for CMU-MOSEI).
        hidden_dim: the GRU's or the Transformer's width.
        out_dim: output feature size.
        kind: ``gru`` or ``transformer``.
        num_layers: GRU or Transformer layers.
        num_heads: attention heads (``transformer``).
        dropout: dropout between GRU layers or inside the Transformer.
        max_length: longest sequence the learned positions cover (``transformer``).
    """

    KINDS = ("gru", "transformer")

    def __init__(self, in_dim: int, hidden_dim: int = 128, out_dim: int = 128, kind: str = "gru", num_layers: int = 1,
                 num_heads: int = 4, dropout: float = 0.1, max_length: int = 512) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown sequence encoder kind={kind!r}: choose {' or '.join(self.KINDS)}")
        self.kind = kind
        if kind == "gru":
            self.gru = nn.GRU(in_dim, hidden_dim, num_layers=num_layers, batch_first=True,
                              dropout=dropout if num_layers > 1 else 0.0)
        else:
            self.embed = nn.Linear(in_dim, hidden_dim)
            self.positions = nn.Parameter(torch.zeros(max_length, hidden_dim))
            self.transformer = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(hidden_dim, num_heads, dim_feedforward=2 * hidden_dim, dropout=dropout,
                                           batch_first=True), num_layers, enable_nested_tensor=False)
        self.project = nn.Linear(hidden_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        present = x.abs().sum(dim=-1) > 0  # [B, L]
        # The steps that are not padding first, in their order: the sequences are then [0, length) each.
        order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)
        x = torch.gather(x, 1, order.unsqueeze(-1).expand_as(x))
        lengths = present.sum(dim=1).clamp_min(1)
        if self.kind == "gru":
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, hidden = self.gru(packed)
            return self.project(hidden[-1])
        if x.shape[1] > self.positions.shape[0]:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_length {self.positions.shape[0]}")
        pad = torch.arange(x.shape[1], device=x.device) >= lengths.unsqueeze(1)
        out = self.transformer(self.embed(x) + self.positions[: x.shape[1]], src_key_padding_mask=pad)
        weights = (~pad).unsqueeze(-1).to(out.dtype)
        return self.project((out * weights).sum(dim=1) / weights.sum(dim=1))


def replicate(encoder: Callable[[], nn.Module], modalities: Sequence[str]) -> dict[str, nn.Module]:
    """One fresh encoder per modality from one partial config (e.g. the same MLP for every synthetic modality)."""
    return {modality: encoder() for modality in modalities}


class AbsentEncoder(nn.Module):
    """Stands in for the encoder of a modality the model does not use: zero features ``[B, out_dim]``, no
    parameters, the input never read. A fusion head then sees the modality as dropped (zero features), everywhere:
    training, evaluation, valuation and diagnostics.

    Args:
        out_dim: the feature size the fusion head expects for the modality.
    """

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        # Follows the model's device and dtype (a buffer moves with it), so the zeros match the other features.
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.anchor.new_zeros(len(x), self.out_dim)
