"""``balance-reproduce TABLE``: runs a paper table's rows over seeds and writes mean +- std beside the references.

A table is a YAML file (``conf/reproduce/<name>.yaml``, or any path) naming its rows: each an ``experiment`` from
``conf/experiment/`` (or a list of ``overrides``), with the reference number the papers report, if any::

    title: CREMA-D (audio + visual)
    rows:
      - experiment: mla/crema_d_mla
        reference: 72.30            # test accuracy, %
        source: BalanceBenchmark reproduction

Every (row, seed) runs in ``OUT/<row>/seed<seed>/`` as a Hydra multirun of ``train.py`` (one per row, over the
seeds still to run). A run with ``results.json`` is done and never rerun; one with ``checkpoints/last.ckpt`` but no
results resumes from it; so an interrupted table continues where it stopped. The table (``OUT/table.md``,
``OUT/table.json``) is written from whatever runs are done.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
TABLES = REPO / "conf" / "reproduce"
METRICS = ("acc", "f1")


@dataclass
class Row:
    """One table row: what to run and what the papers report for it."""

    name: str
    overrides: list[str]
    reference: float | None = None
    source: str | None = None


@dataclass
class Run:
    """One (row, seed) run and where it lives."""

    row: Row
    seed: int
    directory: Path

    @property
    def status(self) -> str:
        if (self.directory / "results.json").is_file():
            return "done"
        if (self.directory / "checkpoints" / "last.ckpt").is_file():
            return "partial"
        return "pending"


def load_table(table: str) -> tuple[str, list[Row]]:
    """Reads a table by name (``conf/reproduce/<name>.yaml``) or path; returns its title and rows."""
    path = Path(table)
    if not path.is_file():
        path = TABLES / f"{table}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TABLES.glob("*.yaml"))
        raise FileNotFoundError(f"no table {table!r}: give a path or one of {known}")
    spec = yaml.safe_load(path.read_text())
    rows = []
    for number, entry in enumerate(spec.get("rows") or [], start=1):
        if ("experiment" in entry) == ("overrides" in entry):
            raise ValueError(f"{path}: row {number} needs exactly one of `experiment` and `overrides`")
        overrides = [f"experiment={entry['experiment']}"] if "experiment" in entry else list(entry["overrides"])
        name = entry.get("name") or entry.get("experiment")
        if not name:
            raise ValueError(f"{path}: row {number} gives overrides, so it needs a `name`")
        rows.append(Row(name, overrides, entry.get("reference"), entry.get("source")))
    if not rows:
        raise ValueError(f"{path}: no rows")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: row names repeat: {names}")
    return spec.get("title", path.stem), rows


def plan_runs(rows: list[Row], seeds: list[int], out: Path) -> list[Run]:
    return [Run(row, seed, out / row.name.replace("/", "__") / f"seed{seed}") for row in rows for seed in seeds]


def commands(runs: list[Run], protocol: str, extra: list[str]) -> list[tuple[list[Run], list[str]]]:
    """The commands that complete ``runs``: per row, one multirun over its pending seeds, and one resuming run
    per partial seed."""
    result = []
    base = [sys.executable, str(TRAIN)]
    for row in dict.fromkeys(run.row.name for run in runs):
        row_runs = [run for run in runs if run.row.name == row]
        pending = [run for run in row_runs if run.status == "pending"]
        if pending:
            sweep = pending[0].directory.parent
            result.append((pending, [*base, "-m", *pending[0].row.overrides,
                                     f"seed={','.join(str(run.seed) for run in pending)}", f"protocol={protocol}",
                                     *extra, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=seed${seed}"]))
        for run in row_runs:
            if run.status == "partial":
                result.append(([run], [*base, *run.row.overrides, f"seed={run.seed}", f"protocol={protocol}", *extra,
                                       f"ckpt_path={run.directory / 'checkpoints' / 'last.ckpt'}",
                                       f"hydra.run.dir={run.directory}"]))
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(runs: list[Run]) -> dict[str, Any]:
    """Mean and sample standard deviation (in %) over each row's finished seeds of the test metrics: fused
    accuracy and macro-F1, each modality's accuracy and mean Shapley contribution (``phi_<m>``, not in %)."""
    rows: dict[str, dict[str, Any]] = {}
    selections = set()
    for run in runs:
        entry = rows.setdefault(run.row.name, {"reference": run.row.reference, "source": run.row.source,
                                               "seeds": [], "values": {}})
        if run.status != "done":
            continue
        results = json.loads((run.directory / "results.json").read_text())
        selections.add(results.get("selection", "?"))
        entry["seeds"].append(run.seed)
        for key, value in results["test"].items():
            if key in METRICS or re.fullmatch(r"(acc|phi)_\w+", key):
                entry["values"].setdefault(key, []).append(100 * value if not key.startswith("phi_") else value)
    for entry in rows.values():
        entry["stats"] = {key: _mean_std(values) for key, values in entry.pop("values").items()}
    return {"selection": sorted(selections), "rows": rows}


def _cell(stats: dict[str, tuple[float, float]], key: str, digits: int = 2) -> str:
    if key not in stats:
        return ""
    mean, std = stats[key]
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(title: str, summary: dict[str, Any], protocol: str) -> str:
    """The table: one line per row, mean ± std over seeds, the reference and the difference to it."""
    rows = summary["rows"]
    keys = sorted({k for r in rows.values() for k in r["stats"]})
    modality_acc = [k for k in keys if k.startswith("acc_")]
    phis = [k for k in keys if k.startswith("phi_")]
    header = ["row", "seeds", "acc (%)", "F1 (%)", *[f"{k} (%)" for k in modality_acc], *phis, "reference (%)",
              "acc - reference"]
    lines = [f"# {title}", "",
             f"Test metrics, mean ± sample std over seeds. Selection: {', '.join(summary['selection']) or 'none yet'} "
             f"(protocol={protocol}).", "",
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
    return "\n".join(lines) + "\n"


def write_table(title: str, runs: list[Run], out: Path, protocol: str) -> str:
    summary = summarise(runs)
    text = markdown(title, summary, protocol)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    serialisable = {name: {**row, "stats": {k: list(v) for k, v in row["stats"].items()}}
                    for name, row in summary["rows"].items()}
    (out / "table.json").write_text(json.dumps({"title": title, "protocol": protocol,
                                                "selection": summary["selection"], "rows": serialisable},
                                               indent=2, allow_nan=True))
    return text


def main(argv: list[str] | None = None) -> None:
    """``balance-reproduce TABLE [--seeds N] [--out DIR] [--protocol val|paper] [--dry-run] [-- overrides]``."""
    parser = argparse.ArgumentParser(
        prog="balance-reproduce", description=__doc__.split("\n\n")[0],
        epilog="Overrides after `--` go to every run, e.g. `-- data.root=/data/crema_d trainer=gpu`.")
    parser.add_argument("table", help=f"a table name ({', '.join(sorted(p.stem for p in TABLES.glob('*.yaml')))}) "
                                      "or a path to a table YAML")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--out", type=Path, help="output directory (default reproduce/<table>)")
    parser.add_argument("--protocol", choices=("val", "paper"), default="val",
                        help="model selection: val (default) or paper (best test epoch, as the papers)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, their status and the commands")
    parser.add_argument("--rows", help="comma-separated row names to run (default all)")
    args, extra = parser.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    try:
        title, rows = load_table(args.table)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"balance-reproduce: {error}\n")
    if args.rows:
        wanted = args.rows.split(",")
        missing = sorted(set(wanted) - {r.name for r in rows})
        if missing:
            parser.exit(2, f"balance-reproduce: no rows {missing} in {args.table}\n")
        rows = [r for r in rows if r.name in wanted]
    out = (args.out or Path("reproduce") / Path(args.table).stem).resolve()
    runs = plan_runs(rows, list(range(args.seeds)), out)
    todo = commands(runs, args.protocol, extra)
    if args.dry_run:
        for run in runs:
            print(f"{run.status:8s} {run.row.name} seed={run.seed}  {run.directory}")
        for _, command in todo:
            print(shlex.join(command))
        return
    failed = []
    for number, (batch, command) in enumerate(todo, start=1):
        label = ", ".join(f"{run.row.name} seed={run.seed}" for run in batch)
        print(f"[{number}/{len(todo)}] {label}", flush=True)
        if subprocess.run(command, cwd=REPO).returncode != 0:
            failed.append(label)
    print(write_table(title, runs, out, args.protocol))
    print(f"table: {out / 'table.md'}")
    if failed:
        print(f"balance-reproduce: failed: {'; '.join(failed)} (rerun to retry them)", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
