"""The MM-SHAP diagnostic: per-sample modality shares over a split, their means over all, correctly and wrongly
predicted samples, a markdown summary and a figure."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from balance import options  # noqa: E402
from balance.diagnostics.base import Diagnostic, batches  # noqa: E402
from balance.diagnostics.mm_shap.grouping import check_layout  # noqa: E402
from balance.diagnostics.mm_shap.sampling import mm_shap_values  # noqa: E402
from balance.diagnostics.mm_shap.shares import modality_shares  # noqa: E402
from balance.reproduce_table import Column  # noqa: E402
from balance.reproduce_figures import Keys, StackedBars  # noqa: E402


#: the config group of the options, as refusals name them
SCOPE = "diagnostics.mm_shap"
#: each modality's mean share (``share_<m>``), not those over the correctly or wrongly predicted samples
SHARES = Keys("share_{}", but_not=("share_{}_correct", "share_{}_incorrect"))


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


class MMSHAP(Diagnostic):
    """MM-SHAP: per sample, each modality's share of the absolute Shapley values of the input features.

    Result (``compute``): ``index``, ``label``, ``prediction`` and ``correct`` of every evaluated sample (loader
    order); ``share``: modality -> per-sample shares (``None`` where every phi is 0); ``mean``, ``mean_correct``,
    ``mean_incorrect``: modality -> mean share over all, correctly and wrongly predicted samples (``None`` for an
    empty group); ``num_features``: modality -> mean feature count per sample; ``num_samples``.

    Args:
        n_samples: permutations per batch (official: 10, antithetic).
        antithetic: also traverse every permutation reversed (the official estimator; doubles the passes).
        perturbations_per_eval: masked copies of a batch per forward pass (memory: this times the batch size).
            Batching pays where a forward pass is cheap (5x for the synthetic MLPs on CPU); on CPU the AV-Digits
            and easy-VQA CNNs run faster with 1 (``benchmarks/mm_shap.py``).
        features_per_modality: target feature count of every modality when there is no text modality (with
            text: the sample's token count, the paper's rule).
        keep_token_ids: token ids never masked (a tokeniser's special tokens; balance's vocabulary has none).
        max_samples: evaluate a seeded random subset of this many samples (chosen by the batches' ``index``, so
            it does not depend on the loader's order); ``None`` for all.
        seed: seed of the subset and of the permutations.
        layout: where a grid's cells lie: ``covering`` (every element in a feature) or ``official`` (the
            official code's ``size // p`` patches, the remainder strip never masked, and the kept special tokens
            counted in the token count that sets the grid); see ``balance.diagnostics.mm_shap.grouping``.
    """

    name = "mm_shap"
    table_columns = (Column(SHARES),)
    table_figure = StackedBars(SHARES, ylabel="share of |Shapley values|",
                               title="MM-SHAP share of the test predictions", line=0.5, ylim=(0, 1))

    def __init__(
        self,
        n_samples: int = 10,
        antithetic: bool = True,
        perturbations_per_eval: int = 32,
        features_per_modality: int = 16,
        keep_token_ids: Sequence[int] = (),
        max_samples: int | None = None,
        seed: int = 0,
        layout: str = "covering",
    ) -> None:
        for name, value in (("n_samples", n_samples), ("perturbations_per_eval", perturbations_per_eval),
                            ("features_per_modality", features_per_modality)):
            options.integer(name, value, 1, scope=SCOPE)
        options.integer("max_samples", max_samples, 1, optional=True, scope=SCOPE)
        self.n_samples = n_samples
        self.antithetic = antithetic
        self.perturbations_per_eval = perturbations_per_eval
        self.features_per_modality = features_per_modality
        self.keep_token_ids = list(keep_token_ids)
        self.layout = check_layout(layout)
        self.max_samples = max_samples
        self.seed = seed

    def _subset(self, dataloader: Iterable[Mapping[str, Any]]) -> torch.Tensor | None:
        """The ``index`` values to evaluate, or ``None`` for all (one pass over the loader, no model)."""
        if self.max_samples is None:
            return None
        indices = torch.cat([torch.as_tensor(batch["index"]).reshape(-1).cpu() for batch in dataloader]).unique()
        if len(indices) <= self.max_samples:
            return None
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(self.seed))
        return indices[order[: self.max_samples]]

    def compute(self, method: torch.nn.Module, dataloader: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        modalities = list(method.modalities)
        subset = self._subset(dataloader)
        generator = torch.Generator().manual_seed(self.seed)
        rows: dict[str, list] = {"index": [], "label": [], "prediction": [], "share": [], "count": []}
        for batch in batches(method, dataloader):
            inputs, labels, index, present = batch["inputs"], batch["label"], batch["index"], batch.get("present")
            if subset is not None:
                chosen = torch.isin(index, subset.to(index.device))
                if not chosen.any():
                    continue
                inputs = {m: inputs[m][chosen] for m in modalities}
                labels, index = labels[chosen], index[chosen]
                present = present[chosen] if present is not None else None
            values = mm_shap_values(
                method, inputs, present, n_samples=self.n_samples, antithetic=self.antithetic,
                perturbations_per_eval=self.perturbations_per_eval, features_per_modality=self.features_per_modality,
                keep_token_ids=self.keep_token_ids, generator=generator, layout=self.layout,
            )
            rows["index"].append(index.cpu())
            rows["label"].append(labels.cpu())
            rows["prediction"].append(values["prediction"].cpu())
            rows["share"].append(modality_shares(values["phi"], values["count"]).cpu())
            rows["count"].append(torch.stack([values["count"][m] for m in modalities], dim=1).cpu())
        if not rows["index"]:
            raise ValueError("MM-SHAP got no samples")
        label, prediction = torch.cat(rows["label"]), torch.cat(rows["prediction"])
        correct = (label == prediction).tolist()
        share = torch.cat(rows["share"])
        shares = {m: [None if math.isnan(v) else v for v in share[:, i].tolist()] for i, m in enumerate(modalities)}
        counts = torch.cat(rows["count"]).double().mean(dim=0)
        return {
            "num_samples": len(correct),
            "index": torch.cat(rows["index"]).tolist(),
            "label": label.tolist(),
            "prediction": prediction.tolist(),
            "correct": correct,
            "share": shares,
            "mean": {m: _mean(shares[m]) for m in modalities},
            "mean_correct": {m: _mean(s for s, c in zip(shares[m], correct) if c) for m in modalities},
            "mean_incorrect": {m: _mean(s for s, c in zip(shares[m], correct) if not c) for m in modalities},
            "num_features": {m: float(counts[i]) for i, m in enumerate(modalities)},
        }

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        out = {}
        for group, suffix in (("mean", ""), ("mean_correct", "_correct"), ("mean_incorrect", "_incorrect")):
            out |= {f"share_{m}{suffix}": v for m, v in result[group].items() if v is not None}
        return out

    def summary(self, result: Mapping[str, Any]) -> str:
        def cell(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        correct = sum(result["correct"])
        lines = [
            "## MM-SHAP",
            "",
            f"Share of each modality in the absolute Shapley values of the input features (logit of the predicted "
            f"class; {result['num_samples']} samples, {correct} predicted correctly; {self.n_samples} "
            f"{'antithetic ' if self.antithetic else ''}permutations; {self.layout} feature layout).",
            "",
            "| modality | features | mean share | correct | incorrect |",
            "|---|---|---|---|---|",
        ]
        for m in result["mean"]:
            lines.append(f"| {m} | {result['num_features'][m]:.1f} | {cell(result['mean'][m])} "
                         f"| {cell(result['mean_correct'][m])} | {cell(result['mean_incorrect'][m])} |")
        return "\n".join(lines) + "\n"

    def figures(self, result: Mapping[str, Any]) -> dict[str, Any]:
        modalities = list(result["mean"])
        fig, (hist_ax, bar_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
        for i, m in enumerate(modalities):
            values = [v for v in result["share"][m] if v is not None]
            hist_ax.hist(values, bins=20, range=(0, 1), color=f"C{i}", alpha=0.5, label=m)
        hist_ax.set_xlabel("MM-SHAP share")
        hist_ax.set_ylabel("samples")
        hist_ax.legend()
        groups = [("all", "mean"), ("correct", "mean_correct"), ("incorrect", "mean_incorrect")]
        width = 0.8 / len(modalities)
        for i, m in enumerate(modalities):
            means = [result[key][m] if result[key][m] is not None else 0.0 for _, key in groups]
            bar_ax.bar([g + (i - (len(modalities) - 1) / 2) * width for g in range(len(groups))], means, width,
                       color=f"C{i}", label=m)
        bar_ax.set_xticks(range(len(groups)), [name for name, _ in groups])
        bar_ax.set_ylim(0, 1)
        bar_ax.set_ylabel("mean share")
        bar_ax.legend()
        fig.suptitle(f"MM-SHAP, {result['num_samples']} samples")
        fig.tight_layout()
        return {"mm_shap": fig}
