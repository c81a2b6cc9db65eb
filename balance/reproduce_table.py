"""The table ``balance-reproduce`` writes from a table's finished runs: per row the test metrics' mean ± sample std
over seeds, the paired differences with the row's baseline (:mod:`balance.paired`), the diagnostics' headline
numbers (the :class:`Column` each diagnostic declares), where and how long the runs ran; as ``table.md``,
``table.json`` and ``figures/`` (:mod:`balance.reproduce_figures`)."""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from hydra.utils import get_class

from balance.environment import describe
from balance.paired import paired_markdown, paired_rows, save_paired_figure
from balance.reproduce_figures import Keys, epoch_metrics, mean_std, write_figures

if TYPE_CHECKING:
    from balance.diagnostics.base import Diagnostic
    from balance.reproduce import Run

DIAGNOSTICS = Path(__file__).resolve().parents[1] / "conf" / "diagnostics"
METRICS = ("acc", "f1")
FORMATS = {"plain": (1.0, 3), "percent": (100.0, 2)}  # a Column's format -> (scale, decimals)


@dataclass(frozen=True)
class Column:
    """A headline number of a diagnostic in ``balance-reproduce``'s table: the scalar logged as
    ``test/<name>/<key>``, mean ± sample std over seeds, one column (or one per key of a pattern).

    Args:
        key: the scalar's key as the diagnostic's ``scalars`` names it, or a pattern of keys (a string with ``{}`` or
            :class:`~balance.reproduce_figures.Keys`): a column for each key of it that some row has.
        label: the column's header, ``{}`` standing for the pattern's part; default ``<name>/<key>`` as logged.
        format: ``plain`` (3 decimals, accuracies as fractions) or ``percent`` (x100, 2 decimals, `` (%)`` after
            the label).
        last: only the key with the last part (e.g. ``acc_r{}``: the highest missing rate).
    """

    key: str | Keys
    label: str | None = None
    format: str = "plain"
    last: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown column format {self.format!r}; choose one of {sorted(FORMATS)}")

    @property
    def scale(self) -> float:
        return FORMATS[self.format][0]

    @property
    def digits(self) -> int:
        return FORMATS[self.format][1]

    def headers(self, name: str, keys: Iterable[str]) -> list[tuple[str, str]]:
        """``(key as logged, header)`` of this column's keys among a diagnostic ``name``'s ``keys``."""
        found = Keys.of(self.key).find(keys)
        suffix = " (%)" if self.format == "percent" else ""
        return [(f"{name}/{key}", (self.label.format(part) if self.label else f"{name}/{key}") + suffix)
                for part, key in (found[-1:] if self.last else found)]


def test_scalars(run_directory: Path) -> dict[str, float]:
    """A finished run's test metrics (``results.json``) with those of evaluations of its checkpoint saved in a
    subdirectory (``balance-reproduce --evaluate NAME``: ``<run>/NAME/results.json``), which add diagnostics."""
    scalars = {}
    for path in [*sorted(run_directory.glob("*/results.json")), run_directory / "results.json"]:
        results = json.loads(path.read_text())
        if path.parent != run_directory and results.get("task") != "evaluate":
            continue
        scalars |= results["test"]
    return scalars


def summarise(runs: list[Run]) -> dict[str, Any]:
    """Per row, every test metric over its finished seeds (``values``, as logged) and the table's statistics
    (``stats``): mean and sample standard deviation of fused accuracy and macro-F1 and of each modality's accuracy
    (in %) and mean Shapley contribution (``phi_<m>``), and of the diagnostics' scalars (``name/key``, as logged)."""
    rows: dict[str, dict[str, Any]] = {}
    by_seed: dict[str, dict[int, dict[str, float]]] = {}
    selections = set()
    environments: dict[str, int] = {}
    for run in runs:
        entry = rows.setdefault(run.row.name, {"reference": run.row.reference, "source": run.row.source,
                                               "seeds": [], "values": {}})
        if run.status != "done":
            continue
        results = json.loads((run.directory / "results.json").read_text())
        selections.add(results.get("selection", "?"))
        setting = describe(results["environment"]) if "environment" in results else "not recorded"
        environments[setting] = environments.get(setting, 0) + 1
        if results.get("seconds") is not None:
            entry.setdefault("seconds", []).append(results["seconds"])
        entry["seeds"].append(run.seed)
        for key, value in test_scalars(run.directory).items():
            if key in METRICS or "/" in key or re.fullmatch(r"(acc|phi)_\w+", key):
                entry["values"].setdefault(key, []).append(value)
                by_seed.setdefault(run.row.name, {}).setdefault(run.seed, {})[key] = value
    rows = {name: entry for name, entry in rows.items() if entry["seeds"]}  # rows not run yet stay out of the table
    for entry in rows.values():
        entry["stats"] = {key: mean_std([100 * v for v in values] if key in METRICS or key.startswith("acc_")
                                         else values)
                          for key, values in entry["values"].items()}
    baselines = {run.row.name: run.row.baseline for run in runs}
    return {"selection": sorted(selections), "environments": environments, "rows": rows,
            "paired": paired_rows(by_seed, baselines)}


def diagnostic_classes(runs: list[Run]) -> dict[str, type[Diagnostic]]:
    """The diagnostics a table can show, by the name that prefixes their logged scalars: those of
    ``conf/diagnostics/<name>.yaml`` and those of the finished runs' saved configs (``.hydra/config.yaml``, also of
    ``--evaluate`` subdirectories: a diagnostic configured on the command line), each by its ``_target_``. What
    each puts into the table and figures its class declares (``table_columns``, ``table_figure``)."""
    from balance.diagnostics.base import Diagnostic  # imports torch: only when a table is written

    saved = [path for run in runs if run.status == "done"
             for path in [run.directory / ".hydra" / "config.yaml", *sorted(run.directory.glob("*/.hydra/config.yaml"))]
             if path.is_file()]
    configs = [yaml.safe_load(path.read_text()) for path in sorted(DIAGNOSTICS.glob("*.yaml"))]
    configs += [(yaml.safe_load(path.read_text()) or {}).get("diagnostics") or {} for path in saved]
    targets = {name: node["_target_"] for config in configs for name, node in config.items()
               if isinstance(node, dict) and "_target_" in node}
    classes = {}
    for name, target in targets.items():
        try:
            found = get_class(target)
        except Exception as error:  # noqa: BLE001 - a table is still written without it
            print(f"balance-reproduce: diagnostic {name} ({target}) not importable, not in the table: {error}",
                  file=sys.stderr)
            continue
        if isinstance(found, type) and issubclass(found, Diagnostic):
            classes[name] = found
    return classes


def _cell(stats: dict[str, tuple[float, float]], key: str, digits: int = 2, scale: float = 1.0) -> str:
    if key not in stats:
        return ""
    mean, std = (scale * v for v in stats[key])
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(title: str, summary: dict[str, Any], protocol: str,
             diagnostics: dict[str, type[Diagnostic]] | None = None) -> str:
    """The table: one line per row, mean ± std over seeds, the reference and the difference to it; then the
    ``diagnostics``' headline numbers (:func:`diagnostics_markdown`)."""
    rows = summary["rows"]
    keys = sorted({k for r in rows.values() for k in r["stats"] if "/" not in k})
    modality_acc = [k for k in keys if k.startswith("acc_")]
    phis = [k for k in keys if k.startswith("phi_")]
    header = ["row", "seeds", "acc (%)", "F1 (%)", *[f"{k} (%)" for k in modality_acc], *phis, "reference (%)",
              "acc - reference"]
    lines = [f"# {title}", "",
             f"Test metrics, mean ± sample std over seeds. Selection: {', '.join(summary['selection']) or 'none yet'} "
             f"(protocol={protocol}). {environment_line(summary.get('environments') or {})}"
             f"{cost_line(rows)}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        stats, reference = row["stats"], row["reference"]
        gap = f"{stats['acc'][0] - reference:+.2f}" if reference is not None and "acc" in stats else ""
        cells = [name, str(len(row["seeds"])), _cell(stats, "acc"), _cell(stats, "f1"),
                 *[_cell(stats, k) for k in modality_acc], *[_cell(stats, k, 3) for k in phis],
                 "" if reference is None else f"{reference:.2f}", gap]
        lines.append("| " + " | ".join(cells) + " |")
    sources = sorted({r["source"] for r in rows.values() if r["source"]})
    if sources:
        lines += ["", "References: " + "; ".join(sources) + "."]
    lines += paired_markdown(summary.get("paired") or {})
    return "\n".join(lines + diagnostics_markdown(rows, diagnostics or {})) + "\n"


def environment_line(environments: dict[str, int]) -> str:
    """Where the runs ran (:func:`~balance.environment.describe`), with a warning where they ran on more than one
    setting: the thread count alone moves a run's numbers."""
    if not environments:
        return ""
    if len(environments) == 1:
        return f"Every run: {next(iter(environments))}."
    return ("Runs on more than one setting, whose numbers are not comparable seed by seed: " +
            "; ".join(f"{setting} ({count} runs)" for setting, count in sorted(environments.items())) + ".")


def cost_line(rows: dict[str, Any]) -> str:
    """What the runs cost: the median and range of a run's wall time (training and testing, as ``results.json``
    records it) and the sum over the runs that record it."""
    seconds = sorted(t for row in rows.values() for t in row.get("seconds", []))
    if not seconds:
        return ""
    median = statistics.median(seconds)
    return (f" Run time: median {median / 60:.1f} min a run ({seconds[0] / 60:.1f}-{seconds[-1] / 60:.1f}), "
            f"{sum(seconds) / 3600:.1f} h for the {len(seconds)} runs that record it.")


def diagnostics_markdown(rows: dict[str, Any], diagnostics: dict[str, type[Diagnostic]]) -> list[str]:
    """The diagnostics' headline numbers per row (mean ± std over seeds), where the runs have them: the columns
    each diagnostic's class declares (``table_columns``), diagnostic by diagnostic."""
    columns = []
    for name, diagnostic in diagnostics.items():
        logged = {key.removeprefix(f"{name}/") for row in rows.values() for key in row["stats"]
                  if key.startswith(f"{name}/")}
        columns += [(key, label, column) for column in diagnostic.table_columns
                    for key, label in column.headers(name, logged)]
    if not columns:
        return []
    lines = ["", "Diagnostics on the test split, mean ± sample std over seeds (accuracies as fractions).", "",
             "| row | " + " | ".join(label for _, label, _ in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, row in rows.items():
        cells = [_cell(row["stats"], key, column.digits, column.scale) for key, _, column in columns]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines


def write_table(title: str, runs: list[Run], out: Path, protocol: str) -> str:
    """Writes ``table.md``, ``table.json`` and ``figures/`` from the finished runs; returns the markdown."""
    summary = summarise(runs)
    diagnostics = diagnostic_classes(runs)
    out.mkdir(parents=True, exist_ok=True)
    curves = {name: [epoch_metrics(run.directory) for run in runs if run.row.name == name and run.status == "done"]
              for name in summary["rows"]}
    figures = write_figures({name: row["values"] for name, row in summary["rows"].items()}, curves,
                            out / "figures", diagnostics)
    comparison = save_paired_figure(summary["paired"], out / "figures" / "paired.png")
    if comparison is not None:
        figures.append(comparison)
    text = markdown(title, summary, protocol, diagnostics)
    if figures:
        text += "\nFigures: " + ", ".join(f"[{p.stem}](figures/{p.name})" for p in figures) + ".\n"
    (out / "table.md").write_text(text)
    serialisable = {name: {**row, "stats": {k: list(v) for k, v in row["stats"].items()}}
                    for name, row in summary["rows"].items()}
    (out / "table.json").write_text(json.dumps({"title": title, "protocol": protocol,
                                                "selection": summary["selection"],
                                                "environments": summary["environments"], "rows": serialisable,
                                                "paired": summary["paired"]}, indent=2, allow_nan=True))
    return text
