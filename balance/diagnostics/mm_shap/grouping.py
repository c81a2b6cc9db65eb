"""MM-SHAP's players: which input elements of a modality make up each feature, with about equal feature counts
across modalities.

A modality cut into more features tends to collect more of the summed absolute Shapley values, so the modalities
need about equal feature counts. The paper's rule for text + image: the text's tokens, and ``p x p`` image
patches with ``p = ceil(sqrt(#tokens))``. Generalised here: a target count ``n`` per sample (the token count where
a modality is text, the mean over text modalities if there are several; ``features_per_modality`` otherwise), and
every non-text input is cut into a grid whose ``k`` split axes each get ``ceil(n ** (1 / k))`` cells (an axis
shorter than that gets one cell per element, and the others share out its deficit; ``grid_shape``). Split axes:
height and width of an image or a spectrogram ``[C, H, W]`` (channels stay together), frames, height and width of
a frame stack ``[T, C, H, W]``, the one axis of a feature vector ``[D]``. With three split axes (frame stacks)
the count overshoots more (``n = 16`` gives 3 x 3 x 3 = 27 cells for three frames), a rounding up the paper's
rule makes too.

Two layouts place the cells (``LAYOUTS``):

- ``covering`` (the default): each split axis of length ``L`` is cut into ``c`` near-equal contiguous runs
  (element ``i`` goes to run ``i * c // L``), so every element belongs to a feature. The token count leaves out
  ``keep_token_ids`` (special tokens, never masked) as well as padding.
- ``official``: as the official MM-SHAP code: patches of ``L // c`` elements along each split axis, starting at
  the first element; the ``L - c * (L // c)`` elements left at the end of the axis (the right and bottom strip of
  an image) belong to no feature and are never masked. The token count that sets the grid includes the kept
  special tokens (they stay unmasked either way; padding is still left out). The official code cuts two axes
  (``224 // p`` pixel patches of a 224 x 224 image); cutting the frame axis of a frame stack by the same rule is
  balance's generalisation. Feature vectors keep the covering chunks under both layouts (the official code has
  none, and a strip there would leave whole coordinates unexplained).

Grid sizes (the number of cells per axis) are the same under both layouts; only where the cells lie differs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

LAYOUTS = ("covering", "official")


def check_layout(layout: str) -> str:
    """``layout`` if it is one of ``LAYOUTS``, else a ``ValueError``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    return layout


def _ceil_root(value: float, k: int) -> int:
    """The smallest integer ``c >= 1`` with ``c ** k >= value`` (exact, unlike ``ceil(value ** (1 / k))``, which
    rounds 27 ** (1/3) up to 4)."""
    c = max(1, math.ceil(value ** (1.0 / k)))
    while c > 1 and (c - 1) ** k >= value:
        c -= 1
    while c**k < value:
        c += 1
    return c


def grid_shape(sizes: Sequence[int], target: int) -> tuple[int, ...]:
    """Cells per axis of the grid that cuts an input with split axes ``sizes`` into about ``target`` features.

    Every axis gets ``ceil(target ** (1 / k))`` cells (``k = len(sizes)``); an axis with fewer elements than that
    gets one cell per element and the remaining axes share the target that is left. For an image this is the
    paper's ``p x p`` patch count with ``p = ceil(sqrt(target))`` (where the patches lie depends on the layout).

    Args:
        sizes: lengths of the axes to split (e.g. ``(H, W)``, ``(T, H, W)`` or ``(D,)``).
        target: the wanted number of features (at least 1).

    Returns:
        the number of cells along each axis (never more than the axis has elements).
    """
    if target < 1:
        raise ValueError(f"target must be >= 1, got {target}")
    counts = [0] * len(sizes)
    free = list(range(len(sizes)))
    remaining = float(target)
    while free:
        per_axis = _ceil_root(remaining, len(free))
        short = [i for i in free if sizes[i] < per_axis]
        if not short:
            for i in free:
                counts[i] = per_axis
            break
        for i in short:
            counts[i] = sizes[i]
            remaining /= sizes[i]
        free = [i for i in free if i not in short]
    return tuple(counts)


def split_axes(x: torch.Tensor) -> tuple[int, ...] | None:
    """The axes of one sample (batch axis excluded) that a grid splits; ``None`` for token ids."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"features are defined for tensor inputs only, got a {type(x).__name__}")
    sample_dims = x.dim() - 1
    if not x.is_floating_point():
        if sample_dims != 1:
            raise ValueError(f"integer inputs must be token ids [B, L], got shape {tuple(x.shape)}")
        return None
    axes = {1: (0,), 3: (1, 2), 4: (0, 2, 3)}.get(sample_dims)
    if axes is None:
        raise ValueError(
            f"cannot group features of an input of shape {tuple(x.shape)}: expected vectors [B, D], images or "
            "spectrograms [B, C, H, W], frame stacks [B, T, C, H, W] or token ids [B, L]"
        )
    return axes


@dataclass
class FeatureGroups:
    """Which feature each input element of one modality belongs to.

    Attributes:
        index: ``LongTensor[B or 1, E]``: for each element of a sample's ``mask_shape`` (flattened), its feature
            number (``0 .. count - 1``); elements that are no feature (padding, kept special tokens, the
            ``official`` layout's unmasked strip) hold ``width``. One row when every sample has the same grid.
        count: ``LongTensor[B]``: the number of features of each sample.
        mask_shape: the per-sample shape the index describes, broadcastable to the input's sample shape
            (channels have size 1: a feature covers all channels).
    """

    index: torch.Tensor
    count: torch.Tensor
    mask_shape: tuple[int, ...]

    @property
    def width(self) -> int:
        """Features of the sample with the most (at least 1, so that a gate tensor is never empty)."""
        return max(int(self.count.max()), 1)

    def element_mask(self, features: torch.Tensor, rest: bool) -> torch.Tensor:
        """Spreads a per-feature boolean ``[N, width]`` onto the input elements: ``BoolTensor[N, *mask_shape]``.

        ``N`` may be a multiple of the batch size (perturbations stacked batch after batch); elements that are
        no feature get ``rest``.
        """
        rows = features.shape[0]
        index = self.index
        index = index.expand(rows, -1) if index.shape[0] == 1 else index.repeat(rows // index.shape[0], 1)
        filler = torch.full((rows, 1), rest, dtype=torch.bool, device=features.device)
        return torch.gather(torch.cat([features, filler], dim=1), 1, index).view(rows, *self.mask_shape)


def _axis_cells(size: int, count: int, layout: str) -> torch.Tensor:
    """The cell of every element along one axis of ``size`` elements cut into ``count`` cells; -1 for an element
    in no cell (the ``official`` layout's strip at the end)."""
    position = torch.arange(size)
    if layout == "covering":
        return position * count // size
    cell = position // (size // count)  # patches of size // count elements; count <= size (grid_shape)
    return torch.where(cell < count, cell, torch.full_like(cell, -1))


def _grid_index(
    sample_shape: Sequence[int], axes: Sequence[int], cells: Sequence[int], layout: str, outside: int
) -> torch.Tensor:
    """Feature number of every element of ``sample_shape`` (split ``axes`` only; other axes have size 1 in the
    result), row-major over the cells; ``outside`` for an element in no cell."""
    index = torch.zeros((), dtype=torch.long)
    missing = torch.zeros((), dtype=torch.bool)
    for axis, count in zip(axes, cells):
        size = sample_shape[axis]
        cell = _axis_cells(size, count, layout)
        view = [1] * len(sample_shape)
        view[axis] = size
        index = index * count + cell.clamp_min(0).view(view)
        missing = missing | (cell < 0).view(view)
    return torch.where(missing, torch.full_like(index, outside), index).reshape(-1)


def _maskable_tokens(x: torch.Tensor, keep_token_ids: Sequence[int]) -> torch.Tensor:
    """``BoolTensor[B, L]``: the tokens that are features (neither padding nor kept)."""
    kept = torch.isin(x, torch.as_tensor(list(keep_token_ids), dtype=x.dtype, device=x.device))
    return (x != 0) & ~kept


def token_count(x: torch.Tensor, keep_token_ids: Sequence[int] = (), layout: str = "covering") -> torch.Tensor:
    """The token count of every sample of token ids ``x`` ``[B, L]`` that sets the other modalities' grids:
    ``LongTensor[B]``, the maskable tokens (``covering``) or all non-padding tokens, kept special tokens included
    (``official``)."""
    if check_layout(layout) == "official":
        return (x != 0).sum(dim=1)
    return _maskable_tokens(x, keep_token_ids).sum(dim=1)


def group_features(
    x: torch.Tensor, target: int | torch.Tensor, keep_token_ids: Sequence[int] = (), layout: str = "covering"
) -> FeatureGroups:
    """Groups one modality's input elements into features (see the module docstring for the rule).

    Args:
        x: the modality's batch of inputs: token ids ``[B, L]`` (int), vectors ``[B, D]``, images or spectrograms
            ``[B, C, H, W]``, frame stacks ``[B, T, C, H, W]``.
        target: the wanted feature count, one for the batch or ``LongTensor[B]`` per sample; ignored for tokens,
            whose features are their non-padding tokens.
        keep_token_ids: token ids that are never features (special tokens).
        layout: ``covering`` or ``official`` (where the cells of a grid lie; ``LAYOUTS``).

    Returns:
        the element-to-feature index of the batch.
    """
    check_layout(layout)
    axes = split_axes(x)
    if axes is None:
        features = _maskable_tokens(x, keep_token_ids)
        count = features.sum(dim=1)
        width = max(int(count.max()), 1)
        index = torch.where(features, features.cumsum(dim=1) - 1, torch.full_like(x, width))
        return FeatureGroups(index=index, count=count, mask_shape=tuple(x.shape[1:]))

    if len(axes) == 1:
        layout = "covering"  # feature vectors: contiguous chunks under both layouts
    sample_shape = tuple(x.shape[1:])
    sizes = [sample_shape[a] for a in axes]
    targets = torch.as_tensor(target).reshape(-1)
    mask_shape = tuple(s if a in axes else 1 for a, s in enumerate(sample_shape))
    if targets.numel() == 1:
        cells = grid_shape(sizes, int(targets))
        count = torch.full((x.shape[0],), math.prod(cells), dtype=torch.long)
        index = _grid_index(sample_shape, axes, cells, layout, outside=math.prod(cells)).unsqueeze(0)
        return FeatureGroups(index=index.to(x.device), count=count.to(x.device), mask_shape=mask_shape)

    grids = {int(t): grid_shape(sizes, int(t)) for t in targets.unique()}
    count = torch.tensor([math.prod(grids[int(t)]) for t in targets], dtype=torch.long)
    width = max(int(count.max()), 1)
    rows = {t: _grid_index(sample_shape, axes, cells, layout, outside=width) for t, cells in grids.items()}
    # A sample with a coarser grid than the batch's finest leaves the upper feature numbers unused: dummy players.
    index = torch.stack([rows[int(t)] for t in targets])
    return FeatureGroups(index=index.to(x.device), count=count.to(x.device), mask_shape=mask_shape)


def feature_groups(
    inputs: Mapping[str, torch.Tensor],
    features_per_modality: int = 16,
    keep_token_ids: Sequence[int] = (),
    layout: str = "covering",
) -> dict[str, FeatureGroups]:
    """The features of every modality of a batch, with about equal counts across modalities.

    The per-sample target is the token count (``token_count``) where there is a text modality (the mean, rounded
    up, over several), else ``features_per_modality``; every non-text modality gets a grid of about that many
    cells (``grid_shape``), placed by ``layout``.

    Args:
        inputs: modality -> batch of inputs.
        features_per_modality: the target count without a text modality.
        keep_token_ids: token ids that are never features.
        layout: ``covering`` or ``official`` (``LAYOUTS``).

    Returns:
        modality -> its element-to-feature index.
    """
    check_layout(layout)
    text = [m for m, x in inputs.items() if split_axes(x) is None]
    if text:
        counts = torch.stack([token_count(inputs[m], keep_token_ids, layout) for m in text]).float().mean(dim=0)
        target: int | torch.Tensor = counts.ceil().long().clamp_min(1).cpu()
    else:
        target = features_per_modality
    return {m: group_features(x, target, keep_token_ids, layout) for m, x in inputs.items()}
