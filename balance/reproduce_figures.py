"""The figures of a reproduced table (``OUT/figures/``): how the rows compare, each drawn as mean +- sample std
over seeds.

- ``contributions.png``: each modality's mean Shapley contribution ``phi_m`` and unimodal accuracy on the
  validation split after every epoch (from the runs' CSV logs), one line per row.
- ``emap.png``: fused test accuracy of the model and of its EMAP (additive projection), per row.
- ``mm_shap.png``: each modality's MM-SHAP share of the test predictions, per row (stacked).
- ``missing_modality.png``: test accuracy against the missing-modality rate, one line per row.
- ``modality_gap.png``: distance between the modalities' feature centroids, per row.

A figure is drawn only when some run has its numbers (the diagnostics the runs were trained or evaluated with).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Values = Mapping[str, Sequence[float]]  # metric -> one value per finished seed


def epoch_metrics(run_directory: Path) -> dict[str, dict[int, float]]:
    """Every train and val metric a run logged once per training epoch (``csv/version_*/metrics.csv``), as
    ``{metric: {epoch: value}}``; where a resumed run logged an epoch again, the later version wins."""
    metrics: dict[str, dict[int, float]] = {}
    versions = sorted((run_directory / "csv").glob("version_*/metrics.csv"),
                      key=lambda p: int(p.parent.name.removeprefix("version_")))
    for path in versions:
        with path.open(newline="") as handle:
            for line in csv.DictReader(handle):
                if not line.get("epoch"):
                    continue
                epoch = int(float(line["epoch"]))
                for key, value in line.items():
                    if key not in ("epoch", "step") and value not in (None, ""):
                        metrics.setdefault(key, {})[epoch] = float(value)
    # The evaluations after training (the selected checkpoint on val and test) log with the epoch count as epoch.
    trained = {epoch for key, values in metrics.items() if key.startswith("train/") for epoch in values}
    return {key: {e: v for e, v in values.items() if e in trained} for key, values in metrics.items()
            if not key.startswith("test/")}


def mean_curve(curves: Sequence[Mapping[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs every seed logged, with the mean and sample std (0 for one seed) over seeds."""
    epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    table = np.array([[c[e] for e in epochs] for c in curves], dtype=float).reshape(len(curves), len(epochs))
    std = table.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(epochs))
    return np.array(epochs), table.mean(axis=0), std


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _error_bar(values: Sequence[float]) -> tuple[float, float]:
    """:func:`mean_std` with no error bar (0) for a single seed."""
    mean, std = mean_std(values)
    return mean, 0.0 if math.isnan(std) else std


def _captured(rows: Mapping[str, Values], pattern: str) -> list[str]:
    found = {m.group(1) for values in rows.values() for key in values if (m := re.fullmatch(pattern, key))}
    return sorted(found)


def contributions_figure(curves: Mapping[str, Sequence[Mapping[str, Mapping[int, float]]]]) -> plt.Figure | None:
    """Validation ``phi_m`` (top) and ``acc_m`` (bottom) per epoch for every modality (columns) and row (lines).

    Args:
        curves: per row, one :func:`epoch_metrics` per finished seed.
    """
    keys = {key for runs in curves.values() for run in runs for key in run}
    modalities = sorted({m.group(1) for key in keys if (m := re.fullmatch(r"val/phi_(\w+)", key))})
    if not modalities:
        return None
    fig, axes = plt.subplots(2, len(modalities), figsize=(4.5 * len(modalities), 6.5), squeeze=False, sharex=True)
    for column, modality in enumerate(modalities):
        for line, (kind, label) in enumerate((("phi", "contribution phi"), ("acc", "unimodal accuracy"))):
            ax = axes[line, column]
            for row, runs in curves.items():
                series = [run[f"val/{kind}_{modality}"] for run in runs if f"val/{kind}_{modality}" in run]
                if not series:
                    continue
                epochs, mean, std = mean_curve(series)
                ax.plot(epochs, mean, label=row)
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
            ax.set_title(f"{modality}: {label} (val)")
            ax.grid(alpha=0.3)
            if line == 1:
                ax.set_xlabel("epoch")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _bars(ax: plt.Axes, rows: Mapping[str, Values], keys: Sequence[str], labels: Sequence[str],
          scale: float = 1.0) -> None:
    names = [row for row, values in rows.items() if any(k in values for k in keys)]
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(zip(keys, labels)):
        stats = [_error_bar(rows[row][key]) if key in rows[row] else (math.nan, 0.0) for row in names]
        positions = np.arange(len(names)) + (i - (len(keys) - 1) / 2) * width
        ax.bar(positions, [scale * m for m, _ in stats], width, yerr=[scale * s for _, s in stats], capsize=3,
               label=label)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.grid(axis="y", alpha=0.3)


def emap_figure(rows: Mapping[str, Values]) -> plt.Figure | None:
    """Test accuracy of the model and of its EMAP per row (``emap/acc_model``, ``emap/acc_emap``)."""
    if not any("emap/acc_emap" in values for values in rows.values()):
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows)), 4))
    _bars(ax, rows, ["emap/acc_model", "emap/acc_emap"], ["model", "EMAP (additive part)"], scale=100)
    low = min(100 * min(v) for values in rows.values() for k, v in values.items()
              if k in ("emap/acc_model", "emap/acc_emap"))
    ax.set_ylim(max(0.0, low - 10), None)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("EMAP: how much accuracy the cross-modal interactions carry")
    ax.legend()
    fig.tight_layout()
    return fig


def mm_shap_figure(rows: Mapping[str, Values]) -> plt.Figure | None:
    """Each modality's mean MM-SHAP share of the test predictions, stacked per row (std as error bars)."""
    modalities = [m for m in _captured(rows, r"mm_shap/share_(\w+)") if not m.endswith(("_correct", "_incorrect"))]
    names = [row for row, values in rows.items() if f"mm_shap/share_{modalities[0]}" in values] if modalities else []
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names) + 1.5), 4))
    bottom = np.zeros(len(names))
    for modality in modalities:
        stats = [_error_bar(rows[row][f"mm_shap/share_{modality}"]) for row in names]
        means = np.array([m for m, _ in stats])
        ax.bar(names, means, 0.6, bottom=bottom, yerr=[s for _, s in stats], capsize=3, label=modality)
        for x, (y, m) in enumerate(zip(bottom, means)):
            ax.text(x, y + m / 2, f"{m:.2f}", ha="center", va="center", fontsize=8)
        bottom += means
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of |Shapley values|")
    ax.set_title("MM-SHAP share of the test predictions")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    return fig


def missing_modality_figure(rows: Mapping[str, Values]) -> plt.Figure | None:
    """Test accuracy against the rate of missing (sample, modality) slots, one line per row."""
    rates = sorted(_captured(rows, r"missing_modality/acc_r([0-9.]+)"), key=float)
    if not rates:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for row, values in rows.items():
        present = [r for r in rates if f"missing_modality/acc_r{r}" in values]
        if not present:
            continue
        stats = [_error_bar(values[f"missing_modality/acc_r{r}"]) for r in present]
        ax.errorbar([float(r) for r in present], [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats],
                    marker="o", capsize=3, label=row)
    ax.set_xlabel("missing rate (share of (sample, modality) slots)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Missing-modality robustness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def modality_gap_figure(rows: Mapping[str, Values]) -> plt.Figure | None:
    """Distance between every pair of modality centroids, per row."""
    pairs = _captured(rows, r"modality_gap/gap/(.+)")
    if not pairs:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows)), 4))
    _bars(ax, rows, [f"modality_gap/gap/{p}" for p in pairs], pairs)
    ax.set_ylabel("centroid distance")
    ax.set_title("Modality gap of the fused features")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_figures(rows: Mapping[str, Values], curves: Mapping[str, Sequence[Mapping[str, Mapping[int, float]]]],
                  out: Path) -> list[Path]:
    """Draws every figure there are numbers for into ``out`` (PNG); returns their paths.

    Args:
        rows: per row, each test metric's values over the finished seeds (accuracies as fractions).
        curves: per row, one :func:`epoch_metrics` per finished seed.
        out: the figure directory (created).
    """
    figures = {"contributions": contributions_figure(curves), "emap": emap_figure(rows),
               "mm_shap": mm_shap_figure(rows), "missing_modality": missing_modality_figure(rows),
               "modality_gap": modality_gap_figure(rows)}
    paths = []
    for name, figure in figures.items():
        if figure is None:
            continue
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths
