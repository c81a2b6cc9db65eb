"""``balance-reproduce TABLE``: runs a paper table's rows over seeds and writes mean +- std beside the references.

A table is a YAML file (``conf/reproduce/<name>.yaml``, or any path) naming its rows: each an ``experiment`` from
``conf/experiment/`` (or a list of ``overrides``), with the reference number the papers report, if any::

    title: CREMA-D (audio + visual)
    rows:
      - experiment: mla/crema_d_mla
        reference: 72.30            # test accuracy, %
        source: BalanceBenchmark reproduction

A row may give both an ``experiment`` and ``overrides`` on top of it (e.g. UMT's teachers: the unimodal rows'
runs of the same seed, ``'${run_dir}/../../<row>/seed${seed}'``). A row (or the whole table) may name a
``baseline`` row: the table then adds each row's difference from it paired
by seed, with a 95 % t interval (:mod:`balance.paired`), and ``figures/paired.png``. The table's own
``overrides`` apply to every row, before the row's (so a row's value wins), e.g. the study's training length::

    overrides: [trainer.max_epochs=40]

A table may ``extends: <table>``: it has the other table's rows, the other's overrides then its own, and
``row_overrides: {<row>: [...]}`` adds overrides to named rows (e.g. a schedule scaled to the new length)::

    extends: avdigits_study
    overrides: [trainer.max_epochs=40]
    row_overrides: {relearning: [method.relearn_every=10]}

A row with ``evaluate_from: <row above>`` trains nothing: its runs evaluate that row's selected checkpoints, seed
by seed, with the row's overrides (``task=evaluate``), e.g. MLA's trained models with another test-time fusion.

Every (row, seed) runs in ``OUT/<row>/seed<seed>/`` as a Hydra multirun of ``train.py`` (one per row, over the
seeds still to run). A run with ``results.json`` is done and never rerun; one with ``checkpoints/last.ckpt`` but no
results resumes from it; so an interrupted table continues where it stopped. The table (``OUT/table.md``,
``OUT/table.json``) and its figures (``OUT/figures/``, see :mod:`balance.reproduce_figures`) are written from
whatever runs are done; a diagnostic's columns and figure are those its class declares (``table_columns``,
``table_figure`` of :class:`~balance.diagnostics.base.Diagnostic`), the class found by the ``_target_`` of its
config (``conf/diagnostics/<name>.yaml``, or the runs' own).

Every command is a Hydra multirun, so ``--launcher NAME`` (``hydra/launcher=NAME`` for all of them) sends every
run through a launcher: ``--launcher slurm --parallel 8`` queues eight rows' seeds on a SLURM cluster at once.

``--evaluate NAME`` trains nothing: it evaluates every finished run's selected checkpoint with the overrides given
(``task=evaluate``, e.g. ``-- "diagnostics=[mm_shap]"``) into ``<run>/NAME/``, and the table adds the numbers, so a
diagnostic can be added to a finished table without retraining. ``--export DIR`` trains nothing: it copies the table
and every finished run's records (no checkpoints) into DIR, laid out as OUT, to commit it or continue elsewhere.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import yaml

from balance.overrides import expand_home
from balance.reproduce_table import write_table
from balance.sweeps.plugins import check_plugins

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
TABLES = REPO / "conf" / "reproduce"


@dataclass
class Row:
    """One table row: what to run and what the papers report for it."""

    name: str
    overrides: list[str]
    reference: float | None = None
    source: str | None = None
    evaluate_from: str | None = None  # trains nothing: evaluates this row's checkpoints with the overrides
    baseline: str | None = None  # the row it is compared with, seed by seed (balance.paired)

    @property
    def directory_name(self) -> str:
        """The name of the directory of the row's runs (``OUT/<directory_name>/seed<seed>/``)."""
        return self.name.replace("/", "__")

    def needs(self, rows: list[Row]) -> set[str]:
        """The other rows whose runs this row's overrides name (UMT's teachers, ``../../<row>/seed${seed}``): with
        ``--parallel``, its runs start only once theirs have ended."""
        text = " ".join(self.overrides)
        return {row.name for row in rows if row is not self and f"/{row.directory_name}/" in text}


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
    path = _table_path(table)
    spec = _read_spec(path)
    common = spec.get("overrides") or []
    rows = []
    for number, entry in enumerate(spec.get("rows") or [], start=1):
        if "experiment" not in entry and "overrides" not in entry:
            raise ValueError(f"{path}: row {number} needs an `experiment` or `overrides` (or both: the overrides then "
                             "apply on top of the experiment)")
        overrides = [f"experiment={entry['experiment']}"] if "experiment" in entry else []
        overrides += [*common, *(entry.get("overrides") or [])]
        name = entry.get("name") or entry.get("experiment")
        if not name:
            raise ValueError(f"{path}: row {number} gives overrides, so it needs a `name`")
        source_row = entry.get("evaluate_from")
        if source_row is not None and source_row not in {r.name for r in rows if r.evaluate_from is None}:
            raise ValueError(f"{path}: row {name!r} evaluates {source_row!r}, which is no trained row above it")
        for variant, extra, reference in _variants(entry, name, path):
            rows.append(Row(variant, [*overrides, *extra], reference, entry.get("source"), source_row,
                            entry.get("baseline", spec.get("baseline"))))
    if not rows:
        raise ValueError(f"{path}: no rows")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: row names repeat: {names}")
    unknown = sorted({r.baseline for r in rows if r.baseline is not None} - set(names))
    if unknown:
        raise ValueError(f"{path}: baseline {unknown} names no row of the table ({names})")
    return spec.get("title", path.stem), rows


def _table_path(table: str) -> Path:
    """The YAML file of a table given by name (``conf/reproduce/<name>.yaml``) or path."""
    path = Path(table)
    if not path.is_file():
        path = TABLES / f"{table}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TABLES.glob("*.yaml"))
        raise FileNotFoundError(f"no table {table!r}: give a path or one of {known}")
    return path


def _read_spec(path: Path, children: tuple[Path, ...] = ()) -> dict:
    """A table's YAML with its ``extends:`` resolved: the parent table's rows, its overrides followed by this
    table's, ``row_overrides: {row: [...]}`` appended to the named rows' overrides, any ``rows`` of its own after
    the parent's, and every other key (title, baseline) this table's where it gives one."""
    spec = yaml.safe_load(path.read_text()) or {}
    common = spec.get("overrides")
    if common is not None and (not isinstance(common, list) or not all(isinstance(o, str) for o in common)):
        raise ValueError(f"{path}: the table's `overrides` is a list of overrides for every row, "
                         "e.g. [trainer.max_epochs=40]")
    parent = spec.pop("extends", None)
    row_overrides = spec.pop("row_overrides", None)
    if parent is None:
        if row_overrides is not None:
            raise ValueError(f"{path}: `row_overrides` changes rows of the table it `extends`, and it extends none")
        return spec
    parent_path = _table_path(str(parent))
    if parent_path.resolve() in {p.resolve() for p in (path, *children)}:
        raise ValueError(f"{path}: `extends: {parent}` makes a cycle of tables")
    base = _read_spec(parent_path, (*children, path))
    rows = [{**entry, "overrides": list(entry.get("overrides") or [])} for entry in base.get("rows") or []]
    by_name = {entry.get("name") or entry.get("experiment"): entry for entry in rows}
    if not isinstance(row_overrides or {}, dict):
        raise ValueError(f"{path}: `row_overrides` maps a row's name to a list of overrides, "
                         "e.g. {dimml: [method.stage2_epoch=30]}")
    for name, extra in (row_overrides or {}).items():
        if name not in by_name:
            raise ValueError(f"{path}: row_overrides names {name!r}, which is no row of {parent} "
                             f"({sorted(by_name)})")
        if not isinstance(extra, list) or not all(isinstance(o, str) for o in extra):
            raise ValueError(f"{path}: row_overrides of {name!r} is a list of overrides")
        by_name[name]["overrides"] += extra
    merged = {**base, **{k: v for k, v in spec.items() if k not in ("overrides", "rows")}}
    merged["overrides"] = [*(base.get("overrides") or []), *(spec.get("overrides") or [])]
    merged["rows"] = [*rows, *(spec.get("rows") or [])]
    return merged


def _variants(entry: dict, name: str, path: Path) -> list[tuple[str, list[str], float | None]]:
    """The rows one table entry stands for: itself, or with ``for_each: {key: [v1, v2]}`` one row per value
    (``<name>_<v>``, adding ``key=<v>``; a ``reference`` mapping gives each value its number), e.g. the unimodal
    baseline of every modality from one entry."""
    for_each = entry.get("for_each")
    if for_each is None:
        return [(name, [], entry.get("reference"))]
    if not isinstance(for_each, dict) or len(for_each) != 1 or not isinstance(next(iter(for_each.values())), list):
        raise ValueError(f"{path}: row {name!r}: for_each takes one key and a list of values, e.g. "
                         "for_each: {method.modality: [audio, visual]}")
    (key, values), = for_each.items()
    references = entry.get("reference")
    if references is not None and not isinstance(references, dict):
        raise ValueError(f"{path}: row {name!r} has for_each, so its reference maps each value to a number")
    return [(f"{name}_{value}", [f"{key}={value}"], (references or {}).get(value)) for value in values]


def plan_runs(rows: list[Row], seeds: list[int], out: Path) -> list[Run]:
    return [Run(row, seed, out / row.directory_name / f"seed{seed}") for row in rows for seed in seeds]


def commands(runs: list[Run], protocol: str, extra: list[str]) -> list[tuple[list[Run], list[str]]]:
    """The commands that complete the trained rows' ``runs``: per row, one multirun over its pending seeds, and
    one resuming run per partial seed (rows that evaluate another row's checkpoints: :func:`derived_commands`)."""
    result = []
    base = [sys.executable, str(TRAIN), "-m"]
    for row in dict.fromkeys(run.row.name for run in runs if run.row.evaluate_from is None):
        row_runs = [run for run in runs if run.row.name == row]
        pending = [run for run in row_runs if run.status == "pending"]
        if pending:
            sweep = pending[0].directory.parent
            result.append((pending, [*base, *pending[0].row.overrides,
                                     f"seed={','.join(str(run.seed) for run in pending)}", f"protocol={protocol}",
                                     *extra, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=seed${seed}"]))
        for run in row_runs:
            if run.status == "partial":
                result.append(([run], [*base, *run.row.overrides, f"seed={run.seed}", f"protocol={protocol}", *extra,
                                       f"ckpt_path={run.directory / 'checkpoints' / 'last.ckpt'}",
                                       *_one_run_into(run.directory)]))
    return result


def _evaluation(run: Run, overrides: list[str], directory: Path) -> list[str]:
    """The command that evaluates ``run``'s selected checkpoint with ``overrides`` into ``directory``."""
    checkpoint = json.loads((run.directory / "results.json").read_text()).get("best_checkpoint")
    if not checkpoint:
        raise ValueError(f"{run.directory}/results.json names no checkpoint to evaluate")
    return [sys.executable, str(TRAIN), "-m", "task=evaluate", f"ckpt_path={checkpoint}", *overrides,
            *_one_run_into(directory)]


def _one_run_into(directory: Path) -> list[str]:
    """The overrides that put the one run of a multirun (``train.py -m``) in ``directory``: every command is a
    multirun, so that a launcher given to all of them (``--launcher``) runs each of them."""
    return [f"hydra.sweep.dir={directory.parent}", f"hydra.sweep.subdir={directory.name}"]


def derived_commands(runs: list[Run], extra: list[str], sources: list[Run]) -> list[tuple[list[Run], list[str]]]:
    """The commands of the pending ``runs`` of rows that evaluate another row's checkpoints (``evaluate_from``,
    e.g. MLA's test-time fusion changed): each evaluates the same seed's finished run of that row (among
    ``sources``) with the row's overrides. Runs whose source has not finished are left for later."""
    sources = {(run.row.name, run.seed): run for run in sources}
    result = []
    for run in runs:
        if run.row.evaluate_from is None or run.status == "done":
            continue
        source = sources.get((run.row.evaluate_from, run.seed))
        if source is not None and source.status == "done":
            result.append(([run], _evaluation(source, [*run.row.overrides, *extra], run.directory)))
    return result


def evaluation_commands(runs: list[Run], name: str, extra: list[str]) -> list[tuple[list[Run], list[str]]]:
    """The commands that evaluate every finished run's selected checkpoint (``task=evaluate``) with its row's
    overrides (so a row that changed test-time options keeps them) and ``extra`` (e.g. more diagnostics) into
    ``<run>/<name>/``; runs evaluated there already are skipped."""
    return [([run], _evaluation(run, [*run.row.overrides, *extra], run.directory / name)) for run in runs
            if run.status == "done" and not (run.directory / name / "results.json").is_file()]


#: what a finished run's export keeps: what the table and its figures are written from
RECORDS = ("results.json", ".hydra/config.yaml", ".hydra/overrides.yaml", "csv/version_*/metrics.csv",
           "*/results.json", "*/.hydra/config.yaml")
TABLE_FILES = ("table.md", "table.json", "figures/*.png")


def export_runs(runs: list[Run], out: Path, target: Path) -> int:
    """Copies ``out``'s table and every finished run's :data:`RECORDS` into ``target`` (the same layout); returns
    how many runs. A table written from the copy equals the original; runs there count as done (no checkpoints:
    ``--evaluate`` and ``evaluate_from`` rows need the original runs)."""
    def copy(paths: Iterable[Path]) -> None:
        for path in paths:
            destination = target / path.relative_to(out)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)

    copy(path for pattern in TABLE_FILES for path in out.glob(pattern))
    finished = [run for run in runs if run.status == "done"]
    for run in finished:
        copy(path for pattern in RECORDS for path in sorted(run.directory.glob(pattern)))
    return len(finished)


def _run_all(todo: list[tuple[list[Run], list[str]]], parallel: int = 1) -> list[str]:
    """Runs the commands, ``parallel`` at a time in table order, a row's only once the rows it needs
    (:meth:`Row.needs`) have none left to run; progress on stdout. Returns the labels of those that failed."""
    rows = list({batch[0].row.name: batch[0].row for batch, _ in todo}.values())
    needs = {row.name: row.needs(rows) for row in rows}

    def run_one(number: int, batch: list[Run], command: list[str]) -> str | None:
        label = ", ".join(f"{run.row.name} seed={run.seed}" for run in batch)
        print(f"[{number}/{len(todo)}] {label}", flush=True)
        code = subprocess.run(command, cwd=REPO).returncode
        if parallel > 1:
            print(f"[{number}/{len(todo)}] {'done' if code == 0 else f'failed ({code})'}: {label}", flush=True)
        return label if code != 0 else None

    failed: list[str] = []
    waiting = list(enumerate(todo, start=1))
    running: dict[Future, str] = {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while waiting or running:
            for item in list(waiting):
                number, (batch, command) = item
                row = batch[0].row.name
                busy = {b[0].row.name for _, (b, _) in waiting if b[0].row.name != row} | set(running.values())
                if len(running) >= parallel or (needs[row] & busy and running):
                    continue
                waiting.remove(item)
                running[pool.submit(run_one, number, batch, command)] = row
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                del running[future]
                if future.result() is not None:
                    failed.append(future.result())
    return failed


def main(argv: list[str] | None = None) -> None:
    """``balance-reproduce TABLE [--seeds N] [--out DIR] [--protocol val|paper] [--rows R,..] [--evaluate NAME]
    [--launcher NAME] [--parallel K] [--dry-run] [-- overrides]``."""
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
    parser.add_argument("--launcher", metavar="NAME",
                        help="the Hydra launcher of every run, e.g. slurm (a SLURM job per run, pip install -e "
                             "'.[cluster]'), joblib (parallel local runs, one GPU each)")
    parser.add_argument("--parallel", type=int, default=1, metavar="K",
                        help="commands (a row's seeds, a resumed run, an evaluation) in flight at once (default 1; "
                             "with --launcher slurm, e.g. the number of rows, so the whole table is queued)")
    parser.add_argument("--evaluate", metavar="NAME",
                        help="train nothing: evaluate each finished run's selected checkpoint with the overrides "
                             "after -- (e.g. more diagnostics) into <run>/NAME/; the table adds their numbers")
    parser.add_argument("--export", type=Path, metavar="DIR",
                        help="train nothing: write the table from the finished runs and copy it, with every finished "
                             "run's records (results, configs, per-epoch metrics; no checkpoints), into DIR, laid out "
                             "as the output directory, so the table can be rewritten or continued elsewhere")
    args, extra = parser.parse_known_args(argv)
    extra = expand_home([e for e in extra if e != "--"])
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    if args.parallel < 1:
        parser.error("--parallel takes a number >= 1")
    if args.launcher:
        extra.append(f"hydra/launcher={args.launcher}")
    check_plugins(extra)
    try:
        title, rows = load_table(args.table)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"balance-reproduce: {error}\n")
    wanted = args.rows.split(",") if args.rows else [r.name for r in rows]
    missing = sorted(set(wanted) - {r.name for r in rows})
    if missing:
        parser.exit(2, f"balance-reproduce: no rows {missing} in {args.table}\n")
    out = (args.out or Path("reproduce") / Path(args.table).stem).resolve()
    every_run = plan_runs(rows, list(range(args.seeds)), out)
    runs = [run for run in every_run if run.row.name in wanted]
    if args.evaluate and not re.fullmatch(r"[\w.-]+", args.evaluate):
        parser.exit(2, f"balance-reproduce: --evaluate takes a directory name, not {args.evaluate!r}\n")
    try:
        todo = evaluation_commands(runs, args.evaluate, extra) if args.evaluate else \
            commands(runs, args.protocol, extra)
    except ValueError as error:
        parser.exit(2, f"balance-reproduce: {error}\n")
    if args.dry_run:
        for run in runs:
            source = f" (evaluates {run.row.evaluate_from} seed={run.seed})" if run.row.evaluate_from else ""
            print(f"{run.status:8s} {run.row.name} seed={run.seed}  {run.directory}{source}")
        for _, command in todo + ([] if args.evaluate else derived_commands(runs, extra, every_run)):
            print(shlex.join(command))
        return
    failed = [] if args.export else _run_all(todo, args.parallel)
    if not args.evaluate and not args.export:  # the rows evaluating other rows' checkpoints, now they are trained
        failed += _run_all(derived_commands(runs, extra, every_run), args.parallel)
    # The table covers every row and every seed run so far, whichever subset this call ran.
    seeds = set(range(args.seeds)) | {int(p.name.removeprefix("seed")) for p in out.glob("*/seed*")
                                      if re.fullmatch(r"seed\d+", p.name)}
    print(write_table(title, plan_runs(rows, sorted(seeds), out), out, args.protocol))
    print(f"table: {out / 'table.md'}")
    if args.export:
        copied = export_runs(plan_runs(rows, sorted(seeds), out), out, args.export.resolve())
        print(f"exported the table and {copied} finished runs' records to {args.export}")
    if failed:
        print(f"balance-reproduce: failed: {'; '.join(failed)} (rerun to retry them)", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
