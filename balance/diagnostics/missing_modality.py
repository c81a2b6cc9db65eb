"""Missing-modality robustness: the method's accuracy as a growing share of modalities goes missing at test time.

For each rate r the sweep draws CPM-Net's mask (as in MLA's IEMOCAP study): an overall fraction r of the
(sample, modality) slots is missing and every sample keeps at least one modality, so r runs up to (M - 1) / M.
The mask is drawn over the whole split (``missing_mask(N, M, r, seed)``) and looked up by each batch's
``index``, so a sample loses the same modalities whatever the batch order or batch size. Modalities the batch
already marks missing (``present``) stay missing, so the realised rate can exceed r (and a sample can then end
up with none).

Dropping (``drop``):

- ``"features"`` (default): the dropped modalities' features are zeroed through ``method.fused_logits(features,
  keep)``, the way the methods and the valuation drop modalities; every batch is encoded once for all rates.
- ``"inputs"``: the dropped modalities' inputs are zeroed (``zero_input``) and the batch re-encoded for every
  rate, the model not being told (``keep`` is only the batch's own ``present``), as CPM-Net's mask zeroes the
  inputs in the official code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score  # noqa: E402

from balance.diagnostics.base import Diagnostic, batches  # noqa: E402
from balance.dropping import drop_inputs  # noqa: E402
from balance.missing import missing_mask  # noqa: E402
from balance.reproduce_table import Column  # noqa: E402
from balance.reproduce_figures import Lines  # noqa: E402

DROPS = ("features", "inputs")
DEFAULT_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def split_size(dataloader: Iterable[Mapping[str, Any]]) -> int:
    """The number of samples in the split behind a dataloader, so that draws per sample index cover it all.

    ``len(dataloader.dataset)`` for a ``DataLoader`` (the whole split, even when its sampler shards it across
    ranks); for any other iterable of batches, one more pass that reads ``index`` (``max + 1``), so it has to be
    re-iterable (e.g. a list of batches).
    """
    dataset = getattr(dataloader, "dataset", None)
    if dataset is not None:
        return len(dataset)
    return max((int(batch["index"].max()) + 1 for batch in dataloader if len(batch["index"])), default=0)


class MissingModalitySweep(Diagnostic):
    """Accuracy, macro-F1 and loss of the method at each missing rate (see the module docstring).

    Args:
        rates: missing rates to evaluate, each in ``[0, (M - 1) / M]``; ``None`` for 0.0, 0.1, ..., 0.7 without
            those above ``(M - 1) / M`` (0.5 for two modalities).
        drop: ``"features"`` (zero the features through ``fused_logits``'s ``keep``; encode once) or
            ``"inputs"`` (zero the inputs and re-encode, the model not told).
        seed: seed of the masks (the same for every rate).
    """

    name = "missing_modality"
    table_columns = (Column("acc_r{}", last=True),)  # the accuracy at the highest rate
    table_figure = Lines("acc_r{}", xlabel="missing rate (share of (sample, modality) slots)",
                         ylabel="test accuracy (%)", title="Missing-modality robustness", percent=True)

    def __init__(self, rates: Iterable[float] | None = None, drop: str = "features", seed: int = 0) -> None:
        if drop not in DROPS:
            raise ValueError(f"unknown drop {drop!r}; choose one of {DROPS}")
        self.rates = None if rates is None else [float(r) for r in rates]
        if self.rates is not None and not self.rates:
            raise ValueError("rates is empty; give at least one rate (or null for the default sweep)")
        self.drop = drop
        self.seed = seed

    def resolved_rates(self, num_modalities: int) -> list[float]:
        """The rates swept for ``num_modalities`` modalities (the defaults capped at ``(M - 1) / M``)."""
        if self.rates is not None:
            return list(self.rates)
        return [r for r in DEFAULT_RATES if r <= (num_modalities - 1) / num_modalities + 1e-9]

    def compute(self, method: torch.nn.Module, dataloader: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Evaluates the method at every rate.

        Returns:
            ``{"drop", "seed", "num_samples", "rates", "realised_rate", "acc", "f1", "loss"}``: the last four are
            lists parallel to ``rates``; ``realised_rate`` is the fraction of (sample, modality) slots of the
            evaluated samples that were missing (the mask combined with the batch's own ``present``), ``loss``
            the mean cross-entropy.
        """
        modalities = list(method.modalities)
        rates = self.resolved_rates(len(modalities))
        n = split_size(dataloader)
        # missing_mask raises for a rate above (M - 1) / M.
        masks = [torch.from_numpy(missing_mask(n, len(modalities), r, self.seed)) for r in rates]
        preds: list[list[torch.Tensor]] = [[] for _ in rates]
        missing = [0] * len(rates)
        loss = [0.0] * len(rates)
        labels = []
        for batch in batches(method, dataloader):
            present = batch.get("present")
            index = batch["index"].cpu()
            features = method.model.encode(batch["inputs"]) if self.drop == "features" else None
            for k, mask in enumerate(masks):
                kept = mask[index].to(batch["label"].device)
                keep = kept if present is None else kept & present.bool()
                if self.drop == "features":
                    logits = method.fused_logits(features, keep=keep)
                else:
                    inputs = drop_inputs(batch["inputs"], modalities, kept)
                    logits = method.fused_logits(method.model.encode(inputs), keep=present)
                preds[k].append(logits.argmax(dim=1).cpu())
                loss[k] += float(F.cross_entropy(logits.float(), batch["label"], reduction="sum"))
                missing[k] += int((~keep).sum())
            labels.append(batch["label"].cpu())
            num_classes = logits.shape[1]
        if not labels:
            raise ValueError("the missing-modality sweep needs at least one sample; the dataloader gave none")
        label = torch.cat(labels)
        num_samples = len(label)
        acc, f1 = [], []
        for p in preds:
            p = torch.cat(p)
            acc.append(float(multiclass_accuracy(p, label, num_classes, average="micro")))
            f1.append(float(multiclass_f1_score(p, label, num_classes, average="macro")))
        return {
            "drop": self.drop,
            "seed": self.seed,
            "num_samples": num_samples,
            "rates": rates,
            "realised_rate": [count / (num_samples * len(modalities)) for count in missing],
            "acc": acc,
            "f1": f1,
            "loss": [total / num_samples for total in loss],
        }

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        """``acc_r<rate>`` and ``f1_r<rate>`` for every rate (e.g. ``acc_r0.30``)."""
        out = {}
        for r, acc, f1 in zip(result["rates"], result["acc"], result["f1"]):
            out |= {f"acc_r{r:.2f}": acc, f"f1_r{r:.2f}": f1}
        return out

    def summary(self, result: Mapping[str, Any]) -> str:
        """One table row per rate."""
        lines = [
            f"## {self.name}",
            "",
            f"{result['num_samples']} samples, modalities dropped by zeroing their {result['drop']}, "
            f"mask seed {result['seed']}.",
            "",
            "| missing rate | realised | accuracy | macro-F1 | loss |",
            "|---|---|---|---|---|",
        ]
        for row in zip(result["rates"], result["realised_rate"], result["acc"], result["f1"], result["loss"]):
            lines.append("| {:.2f} | {:.3f} | {:.4f} | {:.4f} | {:.4f} |".format(*row))
        return "\n".join(lines) + "\n"

    def figures(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """``accuracy_vs_rate``: accuracy and macro-F1 against the missing rate."""
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(result["rates"], result["acc"], marker="o", label="accuracy")
        ax.plot(result["rates"], result["f1"], marker="s", linestyle="--", label="macro-F1")
        ax.set_xlabel("missing rate r")
        ax.set_ylabel("score")
        ax.set_ylim(0, 1)
        ax.set_title(f"missing modalities ({result['drop']} zeroed)")
        ax.legend()
        fig.tight_layout()
        return {"accuracy_vs_rate": fig}
