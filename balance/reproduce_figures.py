"""The figures of a reproduced table (``OUT/figures/``): how the rows compare, each drawn as mean +- sample std
over seeds.

- ``contributions.png``: each modality's mean Shapley contribution ``phi_m`` and unimodal accuracy on the
  validation split after every epoch (from the runs' CSV logs), one line per row.
- ``convergence.png``: fused training and validation accuracy after every epoch, one panel per row, to show
  whether the runs are long enough (validation accuracy flat over the last epochs).
- ``<name>.png``: a diagnostic's test scalars across the rows, as its class declares (``table_figure``: one of
  :class:`Bars`, :class:`StackedBars`, :class:`Lines`, or any object with such a ``draw``). The shipped ones:
  ``emap.png`` (fused test accuracy of the model and of its EMAP, per row), ``mm_shap.png`` (each modality's
  MM-SHAP share, stacked per row), ``missing_modality.png`` (test accuracy against the missing-modality rate, one
  line per row), ``modality_gap.png`` (distance between the modalities' feature centroids, per row).

A figure is drawn only when some run has its numbers (the diagnostics the runs were trained or evaluated with).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from balance.diagnostics.base import Diagnostic

Values = Mapping[str, Sequence[float]]  # metric -> one value per finished seed


@dataclass(frozen=True)
class Keys:
    """Scalar keys of one pattern: ``template`` with ``{}`` for the part that varies (a modality, a pair, a rate),
    e.g. ``gap/{}``; ``but_not`` gives patterns of look-alike keys that are not of it (``share_{}`` is not
    ``share_{}_correct``). The part is never empty and never contains ``/``. A plain string is a pattern too: with
    ``{}`` as above, without it the one key it names (its own part)."""

    template: str
    but_not: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for template in (self.template, *self.but_not):
            if template.count("{}") > 1:
                raise ValueError(f"a key pattern has at most one {{}}, got {template!r}")

    @staticmethod
    def of(keys: str | Keys) -> Keys:
        return keys if isinstance(keys, Keys) else Keys(keys)

    def find(self, keys: Iterable[str]) -> list[tuple[str, str]]:
        """``(part, key)`` for each of ``keys`` of this pattern, ordered by part (as numbers where all are)."""
        found = {part: key for key in keys if (part := _part(self.template, key)) is not None
                 and all(_part(other, key) is None for other in self.but_not)}
        try:
            order = sorted(found, key=float)
        except ValueError:
            order = sorted(found)
        return [(part, found[part]) for part in order]


def _part(template: str, key: str) -> str | None:
    """What ``{}`` stands for in ``key`` (``key`` itself for a template without it); None where it does not fit."""
    if "{}" not in template:
        return key if key == template else None
    prefix, suffix = template.split("{}")
    part = key[len(prefix):len(key) - len(suffix)]
    fits = key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix) + len(suffix)
    return part if fits and "/" not in part else None


class TableFigure(Protocol):
    """A figure of a diagnostic's scalars across the rows of a table (a diagnostic's ``table_figure``; the kinds:
    :class:`Bars`, :class:`StackedBars`, :class:`Lines`)."""

    def draw(self, rows: Mapping[str, Values]) -> plt.Figure | None:
        """The figure (None where no row has its numbers) from, per row, each of the diagnostic's scalars (keys
        as :meth:`Diagnostic.scalars` names them) over the finished seeds."""


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


def _mean_band(ax: plt.Axes, series: Sequence[Mapping[int, float]], scale: float = 1.0, **line: object) -> None:
    """One curve per epoch: the mean over ``series`` (one per seed) x ``scale``, with a ±1 std band in the line's
    colour; ``line``: :meth:`Axes.plot`'s styling (label, colour, line style). Seeds that logged no epoch (a row
    that only tests another row's checkpoints) are left out; with none left nothing is drawn, not even a label."""
    series = [curve for curve in series if curve]
    if not series:
        return
    epochs, mean, std = mean_curve(series)
    drawn, = ax.plot(epochs, scale * mean, **line)
    ax.fill_between(epochs, scale * (mean - std), scale * (mean + std), color=drawn.get_color(), alpha=0.2)


def contributions_figure(curves: Mapping[str, Sequence[Mapping[str, Mapping[int, float]]]]) -> plt.Figure | None:
    """Validation ``phi_m`` (top) and ``acc_m`` (bottom) per epoch for every modality (columns) and row (lines).

    Args:
        curves: per row, one :func:`epoch_metrics` per finished seed.
    """
    keys = {key for runs in curves.values() for run in runs for key in run}
    modalities = [part for part, _ in Keys("val/phi_{}").find(keys)]
    if not modalities:
        return None
    fig, axes = plt.subplots(2, len(modalities), figsize=(4.5 * len(modalities), 6.5), squeeze=False, sharex=True)
    for column, modality in enumerate(modalities):
        for line, (kind, label) in enumerate((("phi", "contribution phi"), ("acc", "unimodal accuracy"))):
            ax = axes[line, column]
            for row, runs in curves.items():
                _mean_band(ax, [run[f"val/{kind}_{modality}"] for run in runs if f"val/{kind}_{modality}" in run],
                           label=row)
            ax.set_title(f"{modality}: {label} (val)")
            ax.grid(alpha=0.3)
            if line == 1:
                ax.set_xlabel("epoch")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def convergence_figure(curves: Mapping[str, Sequence[Mapping[str, Mapping[int, float]]]]) -> plt.Figure | None:
    """Fused ``train/acc`` and ``val/acc`` (%) per epoch, one panel per row (small multiples on a shared y axis:
    one plot of 29 overlapping rows would say nothing).

    Args:
        curves: per row, one :func:`epoch_metrics` per finished seed.
    """
    rows = {row: runs for row, runs in curves.items() if any(run.get("val/acc") for run in runs)}
    if not rows:
        return None
    columns = min(6, len(rows))
    lines = math.ceil(len(rows) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(2.6 * columns, 2.1 * lines + 0.6), squeeze=False,
                             sharex=True, sharey=True)
    for ax, (row, runs) in zip(axes.flat, rows.items()):
        for key, style in (("train/acc", ":"), ("val/acc", "-")):
            _mean_band(ax, [run[key] for run in runs if key in run], scale=100.0, linestyle=style, color="C0",
                       label=key.split("/")[0])
        ax.set_title(f"{row} ({len(runs)} seeds)", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(rows):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("fused acc (%)")
    for column in range(columns):  # the lowest panel drawn in each column carries the epochs
        lowest = axes[(len(rows) - 1 - column) // columns, column]
        lowest.set_xlabel("epoch")
        lowest.xaxis.set_tick_params(labelbottom=True)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Fused accuracy per epoch, mean ± std over seeds")
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


def _series(keys: Sequence[str | Keys], labels: Sequence[str], rows: Mapping[str, Values]) -> list[tuple[str, str]]:
    """``(label, key)`` of every key of ``keys`` that some row has (a pattern: each of its keys), labelled by the
    label in the same place of ``labels`` (``{}``: the pattern's part), by default by the part (a key: itself)."""
    available = {key for values in rows.values() for key in values}
    series = []
    for i, pattern in enumerate(keys):
        label = labels[i] if i < len(labels) else "{}"
        series += [(label.format(part), key) for part, key in Keys.of(pattern).find(available)]
    return series


# The kinds of a diagnostic's figure across a table's rows (its ``table_figure``, a :class:`TableFigure`).


@dataclass(frozen=True)
class Bars:
    """Bars side by side per row, one per key, mean ± std over seeds (e.g. the model's accuracy and its EMAP's).

    Args:
        keys: scalar keys or patterns of them (a pattern: a bar for each of its keys; see :class:`Keys`).
        labels: the legend label of each of ``keys`` (``{}``: the pattern's part); default the key (the part).
        ylabel, title: the axes'.
        percent: values x100.
        zoom: the y axis starts this far below the lowest bar (not below 0) instead of at 0.
    """

    keys: tuple[str | Keys, ...]
    labels: tuple[str, ...] = ()
    ylabel: str = ""
    title: str = ""
    percent: bool = False
    zoom: float | None = None

    def draw(self, rows: Mapping[str, Values]) -> plt.Figure | None:
        series = _series(self.keys, self.labels, rows)
        if not series:
            return None
        scale = 100.0 if self.percent else 1.0
        fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows)), 4))
        _bars(ax, rows, [key for _, key in series], [label for label, _ in series], scale)
        if self.zoom is not None:
            low = min(scale * min(values[key]) for values in rows.values() for _, key in series if key in values)
            ax.set_ylim(max(0.0, low - self.zoom), None)
        ax.set_ylabel(self.ylabel)
        ax.set_title(self.title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


@dataclass(frozen=True)
class StackedBars:
    """One bar per row stacking the means of a pattern's keys (e.g. each modality's share), each written on its
    segment, std as error bars.

    Args:
        keys: the pattern (a segment for each of its keys, labelled by its part).
        ylabel, title: the axes'.
        line: a dashed horizontal line at this height (None: none).
        ylim: the y axis's range (None: matplotlib's).
    """

    keys: str | Keys
    ylabel: str = ""
    title: str = ""
    line: float | None = None
    ylim: tuple[float, float] | None = None

    def draw(self, rows: Mapping[str, Values]) -> plt.Figure | None:
        series = _series([self.keys], [], rows)
        names = [row for row, values in rows.items() if series[0][1] in values] if series else []
        if not names:
            return None
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names) + 1.5), 4))
        bottom = np.zeros(len(names))
        for label, key in series:
            stats = [_error_bar(rows[row][key]) if key in rows[row] else (0.0, 0.0) for row in names]
            means = np.array([m for m, _ in stats])
            ax.bar(names, means, 0.6, bottom=bottom, yerr=[s for _, s in stats], capsize=3, label=label)
            for x, (y, m) in enumerate(zip(bottom, means)):
                ax.text(x, y + m / 2, f"{m:.2f}", ha="center", va="center", fontsize=8)
            bottom += means
        if self.line is not None:
            ax.axhline(self.line, color="black", lw=0.8, ls="--")
        if self.ylim is not None:
            ax.set_ylim(*self.ylim)
        ax.set_ylabel(self.ylabel)
        ax.set_title(self.title)
        ax.tick_params(axis="x", rotation=30)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        fig.tight_layout()
        return fig


@dataclass(frozen=True)
class Lines:
    """One line per row over a pattern's keys, at their parts as numbers on the x axis (e.g. ``acc_r{}``: the
    missing rate), mean ± std over seeds.

    Args:
        keys: the pattern, its parts numbers.
        xlabel, ylabel, title: the axes'.
        percent: values x100.
    """

    keys: str | Keys
    xlabel: str = ""
    ylabel: str = ""
    title: str = ""
    percent: bool = False

    def draw(self, rows: Mapping[str, Values]) -> plt.Figure | None:
        series = _series([self.keys], [], rows)
        if not series:
            return None
        scale = 100.0 if self.percent else 1.0
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for row, values in rows.items():
            present = [(float(part), key) for part, key in series if key in values]
            if not present:
                continue
            stats = [_error_bar(values[key]) for _, key in present]
            ax.errorbar([x for x, _ in present], [scale * m for m, _ in stats], yerr=[scale * s for _, s in stats],
                        marker="o", capsize=3, label=row)
        ax.set_xlabel(self.xlabel)
        ax.set_ylabel(self.ylabel)
        ax.set_title(self.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


def diagnostic_figure(name: str, diagnostic: type[Diagnostic], rows: Mapping[str, Values]) -> plt.Figure | None:
    """``diagnostic``'s ``table_figure`` (None: no figure) of the rows' scalars of the diagnostic logged as
    ``name`` (``<name>/<key>``)."""
    if diagnostic.table_figure is None:
        return None
    prefix = f"{name}/"
    return diagnostic.table_figure.draw({row: {key.removeprefix(prefix): v for key, v in values.items()
                                               if key.startswith(prefix)} for row, values in rows.items()})


def write_figures(rows: Mapping[str, Values], curves: Mapping[str, Sequence[Mapping[str, Mapping[int, float]]]],
                  out: Path, diagnostics: Mapping[str, type[Diagnostic]] | None = None) -> list[Path]:
    """Draws every figure there are numbers for into ``out`` (PNG): ``contributions``,
    ``convergence`` and each diagnostic's ``table_figure`` as ``<name>``; returns their paths.

    Args:
        rows: per row, each test metric's values over the finished seeds (accuracies as fractions).
        curves: per row, one :func:`epoch_metrics` per finished seed.
        out: the figure directory (created).
        diagnostics: name (the prefix of its logged scalars) -> class of the diagnostics to draw.
    """
    figures = {"contributions": contributions_figure(curves), "convergence": convergence_figure(curves)}
    figures |= {name: diagnostic_figure(name, diagnostic, rows) for name, diagnostic in (diagnostics or {}).items()}
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
