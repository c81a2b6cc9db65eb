"""Cross-modal input ablation (Frank, Bugliarello & Elliott, EMNLP 2021): how much each prediction relies on each
modality's input.

One modality's input at a time is ablated at three levels and the loss and accuracy are measured, of the model's
prediction (``method.fused_logits``) and of every modality's own prediction (``method.model.unimodal_logits``):

- ``none``: nothing ablated (the plain evaluation, computed once and shared by every fill and modality);
- ``part``: a random ``fraction`` of the modality's units, drawn per sample (seeded); units are the cells of
  the grid MM-SHAP uses (``balance.diagnostics.mm_shap.grid_shape``: patches of an image, time-frequency blocks of
  a spectrogram, frame-and-patch cells of a frame stack, chunks of a vector; about ``units_per_modality`` of
  them) or the non-padding tokens of a text, ``fraction * units`` of them rounded half up;
- ``all``: the whole input.

Ablated elements are filled with (``fills``):

- ``zero``: zeros, a token the padding id 0 (``all`` is then exactly a dropped modality, ``zero_input``);
- ``mean``: the dataset mean of the modality's input (element-wise, from a first pass over the loader); for
  token ids a mean is meaningless, so tokens get the padding id, as under ``zero``;
- ``shuffled``: the same elements of another sample of the batch (a seeded random derangement of the batch; a
  batch of one sample takes a sample of the previous batch).

The paper ablates the image regions aligned with a masked phrase (``object``) or all regions, and the phrase
aligned with a masked object or all tokens; ablated regions get the dataset's average region feature and ablated
tokens the [MASK] token. Without alignment annotations, ``part`` here ablates a random half by default (the
midpoint between none and all); without a [MASK] token, tokens are padded.

With balance's ``MultimodalModel`` every encoder sees only its own modality's input, so modality ``n``'s own
prediction cannot change when another modality ``m`` is ablated (``acc_<n>`` stays at its ``none`` value); the
cross-modal reliance shows in the fused prediction, and ``acc_<m>`` under ablation of ``m`` shows how strong the
ablation is. The columns are computed, not assumed, so a model whose encoders mix modalities is measured too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from balance.diagnostics.base import Diagnostic, batches  # noqa: E402
from balance.diagnostics.mm_shap import FeatureGroups, group_features  # noqa: E402

FILLS = ("zero", "mean", "shuffled")
LEVELS = ("none", "part", "all")


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of ``range(n)`` with no fixed point (``n >= 2``), by rejection."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    while True:
        order = torch.randperm(n, generator=generator)
        if not (order == torch.arange(n)).any():
            return order


def choose_units(groups: FeatureGroups, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Per sample, ``fraction * count`` (rounded half up) of its units drawn at random: ``BoolTensor[B, width]``."""
    count = groups.count.cpu()
    keys = torch.rand(len(count), groups.width, generator=generator)
    keys[torch.arange(groups.width) >= count.unsqueeze(1)] = float("inf")  # unused columns are never drawn
    rank = keys.argsort(dim=1).argsort(dim=1)
    chosen = torch.floor(fraction * count + 0.5).long().clamp(0, groups.width)
    return (rank < chosen.unsqueeze(1)).to(groups.count.device)


def _accumulate(totals: torch.Tensor | None, method: torch.nn.Module, inputs: Mapping[str, torch.Tensor],
                labels: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """Adds one batch's summed losses and correct counts, ``[fused, *modalities] x (loss, correct)``, to totals."""
    features = method.model.encode(inputs)
    unimodal = method.model.unimodal_logits(features)
    logits = [method.fused_logits(features, keep=present), *[unimodal[n] for n in method.modalities]]
    sums = torch.stack([
        torch.stack([F.cross_entropy(z, labels, reduction="sum"), (z.argmax(dim=-1) == labels).sum()])
        for z in logits
    ]).double()
    return sums if totals is None else totals + sums


class CrossModalAblation(Diagnostic):
    """Loss and accuracy of the fused and of each modality's own prediction while one modality's input is ablated.

    Result (``compute``): ``fill -> ablated modality -> level -> {"loss", "acc", "loss_<n>", "acc_<n>"}`` (the
    fused prediction's mean cross-entropy and accuracy, and those of every modality ``n``'s own prediction).

    Args:
        fills: what replaces ablated elements, any of ``zero``, ``mean``, ``shuffled``.
        fraction: share of a modality's units ablated at level ``part``.
        units_per_modality: about how many units a non-text input is cut into (a grid, as MM-SHAP's features).
        seed: seed of the units drawn at level ``part`` and of the shuffling partners.
    """

    name = "ablation"

    def __init__(self, fills: Sequence[str] = FILLS, fraction: float = 0.5, units_per_modality: int = 16,
                 seed: int = 0) -> None:
        unknown = set(fills) - set(FILLS)
        if unknown or not fills:
            raise ValueError(f"fills must be a non-empty subset of {FILLS}, got {list(fills)}")
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        if units_per_modality < 1:
            raise ValueError(f"units_per_modality must be >= 1, got {units_per_modality}")
        self.fills = list(fills)
        self.fraction = fraction
        self.units_per_modality = units_per_modality
        self.seed = seed

    def _means(self, method: torch.nn.Module, dataloader: Iterable[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """The element-wise mean input of every non-token modality (first pass over the loader)."""
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for batch in batches(method, dataloader):
            for m in method.modalities:
                x = batch["inputs"][m]
                if isinstance(x, torch.Tensor) and x.is_floating_point():  # group_features rejects the others
                    sums[m] = sums.get(m, 0) + x.double().sum(dim=0)
            count += len(batch["label"])
        return {m: (s / count).float() for m, s in sums.items()}

    def _fill(self, fill: str, x: torch.Tensor, mean: torch.Tensor | None, partner: torch.Tensor) -> torch.Tensor:
        """What replaces ablated elements of ``x``, broadcastable to it."""
        if fill == "shuffled":
            return partner
        if fill == "mean" and x.is_floating_point():
            return mean.to(x.dtype).unsqueeze(0)
        return torch.zeros((), dtype=x.dtype, device=x.device)  # zero, and mean of token ids: padding

    def compute(self, method: torch.nn.Module, dataloader: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        modalities = list(method.modalities)
        means = self._means(method, dataloader) if "mean" in self.fills else {}
        generator = torch.Generator().manual_seed(self.seed)
        none: torch.Tensor | None = None
        totals: dict[tuple[str, str, str], torch.Tensor] = {}
        samples = 0
        previous: dict[str, torch.Tensor] | None = None
        for batch in batches(method, dataloader):
            inputs, labels, present = batch["inputs"], batch["label"], batch.get("present")
            samples += len(labels)
            none = _accumulate(none, method, inputs, labels, present)
            partners = self._partners(inputs, previous, generator) if "shuffled" in self.fills else inputs
            for m in modalities:
                x = inputs[m]
                groups = group_features(x, self.units_per_modality)
                part = groups.element_mask(choose_units(groups, self.fraction, generator), rest=False)
                for fill in self.fills:
                    value = self._fill(fill, x, means.get(m), partners[m])
                    for level, ablated in (("part", torch.where(part, value, x)), ("all", value.expand_as(x))):
                        key = (fill, m, level)
                        totals[key] = _accumulate(totals.get(key), method, {**inputs, m: ablated}, labels, present)
            previous = inputs
        if not samples:
            raise ValueError("cross-modal ablation got no samples")

        def metrics(sums: torch.Tensor) -> dict[str, float]:
            values = (sums / samples).tolist()
            out = {"loss": values[0][0], "acc": values[0][1]}
            for n, (loss, acc) in zip(modalities, values[1:]):
                out |= {f"loss_{n}": loss, f"acc_{n}": acc}
            return out

        return {
            fill: {
                m: {"none": metrics(none), **{level: metrics(totals[(fill, m, level)]) for level in ("part", "all")}}
                for m in modalities
            }
            for fill in self.fills
        }

    @staticmethod
    def _partners(inputs: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor] | None,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Every sample's shuffling partner: another sample of the batch (one derangement for all modalities)."""
        size = len(next(iter(inputs.values())))
        if size >= 2:
            order = derangement(size, generator)
            return {m: x[order.to(x.device)] for m, x in inputs.items()}
        if previous is None:
            raise ValueError("the shuffled fill needs a second sample, but the first batch has only one")
        row = int(torch.randint(len(next(iter(previous.values()))), (1,), generator=generator))
        return {m: previous[m][row:row + 1] for m in inputs}

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        first = next(iter(result.values()))
        out = {"acc": next(iter(first.values()))["none"]["acc"]}
        for fill, by_modality in result.items():
            for m, levels in by_modality.items():
                out |= {f"{fill}/{m}/{level}/acc": levels[level]["acc"] for level in ("part", "all")}
        return out

    def summary(self, result: Mapping[str, Any]) -> str:
        lines = ["## Cross-modal ablation", "",
                 f"Loss and accuracy of the fused prediction and of each modality's own prediction while one "
                 f"modality's input is ablated (part: {self.fraction:g} of its units).", ""]
        for fill, by_modality in result.items():
            modalities = list(by_modality)
            lines += [f"### fill: {fill}", "",
                      "| ablated | level | loss | acc | " + " | ".join(f"acc_{n}" for n in modalities) + " |",
                      "|---|---|---|---|" + "---|" * len(modalities)]
            for m, levels in by_modality.items():
                for level, values in levels.items():
                    own = " | ".join(f"{values[f'acc_{n}']:.4f}" for n in modalities)
                    lines.append(f"| {m} | {level} | {values['loss']:.4f} | {values['acc']:.4f} | {own} |")
            lines.append("")
        return "\n".join(lines)

    def figures(self, result: Mapping[str, Any]) -> dict[str, Any]:
        fills = list(result)
        modalities = list(result[fills[0]])
        predictions = [("fused", "acc"), *[(n, f"acc_{n}") for n in modalities]]
        styles = ["-", "--", ":", "-."]
        fig, axes = plt.subplots(1, len(fills), figsize=(4.5 * len(fills) + 2.5, 3.5), sharey=True, squeeze=False,
                                 layout="constrained")
        for ax, fill in zip(axes[0], fills):
            for i, m in enumerate(modalities):
                for j, (prediction, key) in enumerate(predictions):
                    accuracy = [result[fill][m][level][key] for level in LEVELS]
                    ax.plot(LEVELS, accuracy, styles[j % len(styles)], color=f"C{i}", marker="o",
                            label=f"ablate {m}: {prediction}")
            ax.set_title(f"fill: {fill}")
            ax.set_xlabel("ablation level")
        axes[0][0].set_ylabel("accuracy")
        # Beside the panels, not over them: the lines fill the whole range of each panel.
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right center", fontsize="small")
        return {"ablation": fig}
