"""Paired comparisons of a table's rows with their baseline, seed by seed.

The same seed gives two rows the same split, initialisation and batch order, so the difference of a metric between
a method and its baseline *at the same seed* removes most of the seed-to-seed variation that separate means keep.
For each metric the table reports the mean paired difference with a two-sided Student-t interval over the seeds
both rows finished, and whether that interval excludes zero.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

#: the confidence level of the intervals
LEVEL = 0.95
#: the missing-modality accuracy compared (half the (sample, modality) slots missing)
MISSING_KEY = "missing_modality/acc_r0.50"


@dataclass(frozen=True)
class Difference:
    """The mean of ``method - baseline`` over ``n`` paired seeds, with its ``LEVEL`` interval (NaN for one seed)."""

    n: int
    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of zero (never, for one seed)."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"n": self.n, "mean": self.mean, "low": self.low, "high": self.high,
                "excludes_zero": self.excludes_zero}


def paired_difference(method: Mapping[int, float], baseline: Mapping[int, float],
                      level: float = LEVEL) -> Difference | None:
    """The paired difference over the seeds both have (``None`` if they share none).

    Args:
        method: seed -> the method's value.
        baseline: seed -> the baseline's value.
        level: the interval's confidence level.
    """
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    d = np.array([method[s] - baseline[s] for s in seeds], dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return Difference(1, mean, math.nan, math.nan)
    half = float(stats.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return Difference(len(d), mean, mean - half, mean + half)


def compared_keys(keys: Iterable[str]) -> list[str]:
    """The metrics a paired comparison reports, of those logged: fused accuracy, each modality's accuracy and the
    accuracy with half the modality slots missing."""
    keys = set(keys)
    return [k for k in ["acc", *sorted(k for k in keys if re.fullmatch(r"acc_\w+", k)), MISSING_KEY] if k in keys]


def paired_rows(by_seed: Mapping[str, Mapping[int, Mapping[str, float]]],
                baselines: Mapping[str, str | None]) -> dict[str, dict]:
    """Every row's paired differences with its baseline, in percentage points.

    Args:
        by_seed: row -> seed -> metric -> value (accuracies as fractions).
        baselines: row -> the row it is compared with (``None``: none).

    Returns:
        row -> ``{"baseline": name, "metrics": {metric: Difference.as_dict()}}`` for the rows with a baseline
        that ran.
    """
    result = {}
    for row, baseline in baselines.items():
        if baseline is None or baseline == row or baseline not in by_seed or row not in by_seed:
            continue
        keys = compared_keys(k for runs in by_seed[row].values() for k in runs)
        metrics = {}
        for key in keys:
            method = {s: 100 * v[key] for s, v in by_seed[row].items() if key in v}
            base = {s: 100 * v[key] for s, v in by_seed[baseline].items() if key in v}
            difference = paired_difference(method, base)
            if difference is not None:
                metrics[key] = difference.as_dict()
        if metrics:
            result[row] = {"baseline": baseline, "metrics": metrics}
    return result


def _cell(difference: Mapping[str, float]) -> str:
    if math.isnan(difference["low"]):
        return f"{difference['mean']:+.2f} (n=1)"
    mark = " *" if difference["excludes_zero"] else ""
    return f"{difference['mean']:+.2f} [{difference['low']:+.2f}, {difference['high']:+.2f}]{mark}"


def paired_markdown(paired: Mapping[str, Mapping]) -> list[str]:
    """The table section of :func:`paired_rows`: one line per row, one column per metric."""
    if not paired:
        return []
    keys = compared_keys({k for entry in paired.values() for k in entry["metrics"]})
    lines = ["", f"Paired by seed with the row's baseline: mean difference in percentage points and its "
             f"{int(LEVEL * 100)} % t interval over the seeds both finished; * where the interval excludes zero.", "",
             "| row | baseline | seeds | " + " | ".join(f"{k} (pp)" for k in keys) + " |",
             "|" + "---|" * (len(keys) + 3)]
    for row, entry in paired.items():
        metrics = entry["metrics"]
        seeds = max(d["n"] for d in metrics.values())
        cells = [_cell(metrics[k]) if k in metrics else "" for k in keys]
        lines.append("| " + " | ".join([row, entry["baseline"], str(seeds), *cells]) + " |")
    return lines


def paired_figure(paired: Mapping[str, Mapping]) -> plt.Figure | None:
    """One panel per metric: each row's mean paired difference with its interval, a line at zero."""
    if not paired:
        return None
    keys = compared_keys({k for entry in paired.values() for k in entry["metrics"]})
    rows = list(paired)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 0.45 * len(rows) + 1.4), sharey=True,
                             squeeze=False)
    for ax, key in zip(axes[0], keys):
        for y, row in enumerate(rows):
            d = paired[row]["metrics"].get(key)
            if d is None:
                continue
            error = None if math.isnan(d["low"]) else [[d["mean"] - d["low"]], [d["high"] - d["mean"]]]
            ax.errorbar(d["mean"], y, xerr=error, fmt="o", color="C3" if d["excludes_zero"] else "C0", capsize=3)
        ax.axvline(0.0, color="grey", linewidth=0.8)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("difference (pp)")
    axes[0][0].set_yticks(range(len(rows)), [f"{r} - {paired[r]['baseline']}" for r in rows], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"Paired by seed: mean and {int(LEVEL * 100)} % interval (red: excludes zero)", fontsize=10)
    fig.tight_layout()
    return fig


def save_paired_figure(paired: Mapping[str, Mapping], path: Path) -> Path | None:
    """Saves :func:`paired_figure` as ``path`` (PNG); ``None`` if there is nothing to draw."""
    figure = paired_figure(paired)
    if figure is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
