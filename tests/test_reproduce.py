"""balance-reproduce: a table over seeds from real runs, resuming, the dry run, bad input; the committed tables
agree with the experiment files' reference comments."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from balance.reproduce import TABLES, Row, load_table, main, plan_runs
from balance.reproduce_table import write_table
from compose import CONF_DIR

RESULTS = CONF_DIR.parent / "docs" / "results"
# Trained with emap, modality_gap and missing_modality; the other committed tables check a few rows with fewer.
FULL_STUDIES = {"avdigits_study", "avdigits_40_epochs", "easy_vqa_study", "easy_vqa_10_epochs"}

TINY = ["data=synthetic", "model=mlp", "data.num_samples=400", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "callbacks.contributions.plots=false"]


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"title": "Tiny", "baseline": "joint", "rows": [
        {"name": "joint", "overrides": ["method=joint"], "reference": 50.0, "source": "made up"},
        {"name": "mla", "overrides": ["method=mla"]},
    ]}))
    return path


def test_table_over_two_seeds_then_resume_runs_nothing(table, tmp_path, capsys):
    out = tmp_path / "out"
    main([str(table), "--seeds", "2", "--out", str(out), "--", *TINY])
    results = {(row, seed): json.loads((out / row / f"seed{seed}" / "results.json").read_text())
               for row in ("joint", "mla") for seed in (0, 1)}
    assert results[("joint", 0)]["test"] != results[("joint", 1)]["test"], "seeds must differ"
    summary = json.loads((out / "table.json").read_text())
    joint = summary["rows"]["joint"]
    accs = [100 * results[("joint", s)]["test"]["acc"] for s in (0, 1)]
    mean = sum(accs) / 2
    std = abs(accs[0] - accs[1]) / 2 ** 0.5  # sample std of two values
    assert joint["seeds"] == [0, 1]
    assert joint["stats"]["acc"] == pytest.approx([mean, std])
    assert {"acc_m0", "acc_m1", "phi_m0", "phi_m1", "f1"} <= set(joint["stats"])
    text = (out / "table.md").read_text()
    line = next(l for l in text.splitlines() if l.startswith("| joint "))
    assert f"{mean:.2f} ± {std:.2f}" in line and "50.00" in line and f"{mean - 50:+.2f}" in line
    assert "protocol=val" in text and "best val/acc" in text
    threads = results[("joint", 0)]["environment"]["threads"]
    assert f"Every run: {threads} torch thread" in text, "the runs' setting is stated"
    seconds = sorted(r["seconds"] for r in results.values())
    assert all(s > 0 for s in seconds)
    assert f"Run time: median {(seconds[1] + seconds[2]) / 120:.1f} min a run" in text
    assert f"{sum(seconds) / 3600:.1f} h for the 4 runs that record it." in text
    # MLA against joint, paired by seed: the mean difference and its t interval (t(0.975, 1) = 12.706).
    diffs = [100 * (results[("mla", s)]["test"]["acc"] - results[("joint", s)]["test"]["acc"]) for s in (0, 1)]
    paired = summary["paired"]["mla"]
    half = 12.7062 * abs(diffs[0] - diffs[1]) / 2 ** 0.5 / 2 ** 0.5
    assert paired["baseline"] == "joint" and "joint" not in summary["paired"]
    assert paired["metrics"]["acc"]["n"] == 2
    assert [paired["metrics"]["acc"][k] for k in ("mean", "low", "high")] == pytest.approx(
        [sum(diffs) / 2, sum(diffs) / 2 - half, sum(diffs) / 2 + half], rel=1e-4)
    assert {"acc_m0", "acc_m1"} <= set(paired["metrics"])
    assert "Paired by seed with the row's baseline" in text and (out / "figures" / "paired.png").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    capsys.readouterr()
    main([str(table), "--seeds", "2", "--out", str(out), "--dry-run", "--", *TINY])
    listing = capsys.readouterr().out
    assert listing.count("done") == 4 and "train.py" not in listing
    main([str(table), "--seeds", "2", "--out", str(out), "--", *TINY])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == stamps

    # The export: the table and the runs' records without checkpoints; the table written again from it is the same,
    # and its runs count as done.
    exported = tmp_path / "exported"
    main([str(table), "--seeds", "2", "--out", str(out), "--export", str(exported), "--", *TINY])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == stamps, "an export trains nothing"
    assert not list(exported.rglob("*.ckpt")) and (exported / "figures" / "paired.png").is_file()
    assert (exported / "joint" / "seed1" / ".hydra" / "config.yaml").is_file()
    assert list((exported / "mla" / "seed0" / "csv").glob("version_*/metrics.csv"))
    capsys.readouterr()
    main([str(table), "--seeds", "2", "--out", str(exported), "--dry-run", "--", *TINY])
    assert capsys.readouterr().out.count("done") == 4
    main([str(table), "--seeds", "2", "--out", str(exported), "--export", str(tmp_path / "again"), "--", *TINY])
    assert (exported / "table.md").read_text() == text


def test_dry_run_lists_pending_runs_and_one_multirun_per_row(table, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "mla" / "seed1" / "checkpoints").mkdir(parents=True)
    (out / "mla" / "seed1" / "checkpoints" / "last.ckpt").write_bytes(b"")
    main([str(table), "--seeds", "2", "--out", str(out), "--dry-run", "--", "data=synthetic"])
    lines = capsys.readouterr().out.splitlines()
    assert sum(l.startswith("pending") for l in lines) == 3 and sum(l.startswith("partial") for l in lines) == 1
    commands = [l for l in lines if "train.py" in l]
    assert len(commands) == 3  # joint seeds 0,1; mla seed 0; mla seed 1 resumed
    assert "-m" in commands[0].split() and "seed=0,1" in commands[0]
    assert f"ckpt_path={out / 'mla' / 'seed1' / 'checkpoints' / 'last.ckpt'}" in commands[2]
    assert not (out / "joint").exists(), "a dry run runs nothing"


def test_bad_tables_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no table"):
        load_table("no_such_table")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rows": [{"overrides": ["method=joint"]}]}))
    with pytest.raises(ValueError, match="needs a `name`"):
        load_table(str(bad))
    with pytest.raises(SystemExit):
        main([str(bad), "--dry-run"])
    bad.write_text(yaml.safe_dump({"baseline": "jiont", "rows": [{"name": "joint", "overrides": ["method=joint"]}]}))
    with pytest.raises(ValueError, match=r"baseline \['jiont'\] names no row"):
        load_table(str(bad))


@pytest.mark.parametrize("name", sorted(p.stem for p in TABLES.glob("*.yaml")))
def test_committed_tables_match_their_experiments(name):
    """Every row's experiment exists; its reference equals the `# reference:` comment of the experiment file."""
    _, rows = load_table(name)
    for row in rows:
        if not row.overrides[0].startswith("experiment="):
            assert row.reference is None, "a reference number belongs to a committed experiment"
            continue
        experiment = row.overrides[0].removeprefix("experiment=")
        text = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()
        noted = re.search(r"^# reference: ([0-9.]+)", text, re.M)
        assert (None if noted is None else float(noted.group(1))) == row.reference, experiment


def test_every_referenced_experiment_is_in_a_table():
    tabled = {row.overrides[0].removeprefix("experiment=") for p in TABLES.glob("*.yaml")
              for row in load_table(p.stem)[1]}
    for path in (CONF_DIR / "experiment").rglob("*.yaml"):
        if re.search(r"^# reference:", path.read_text(), re.M):
            assert str(path.relative_to(CONF_DIR / "experiment").with_suffix("")) in tabled, path


def test_row_evaluating_another_rows_checkpoints(tmp_path, capsys):
    """`evaluate_from`: MLA's checkpoint tested with fixed weights (1, 0) predicts with m0 alone, so its fused
    accuracy is the trained row's m0 accuracy; it trains nothing, and an `--evaluate` adds diagnostics' numbers."""
    path = tmp_path / "derived.yaml"
    path.write_text(yaml.safe_dump({"title": "Derived", "rows": [
        {"name": "mla", "overrides": ["method=mla"]},
        {"name": "mla_m0", "evaluate_from": "mla",
         "overrides": ["method=mla", "method.fusion=fixed", "method.fixed_weights={m0: 1.0, m1: 0.0}"]},
    ]}))
    out = tmp_path / "out"
    main([str(path), "--seeds", "1", "--out", str(out), "--dry-run", "--", *TINY])
    listing = capsys.readouterr().out
    assert "(evaluates mla seed=0)" in listing and listing.count("train.py") == 1, "no source run is done yet"
    main([str(path), "--seeds", "1", "--out", str(out), "--", *TINY])
    trained = json.loads((out / "mla" / "seed0" / "results.json").read_text())
    derived = json.loads((out / "mla_m0" / "seed0" / "results.json").read_text())
    assert derived["task"] == "evaluate" and derived["best_checkpoint"] == trained["best_checkpoint"]
    assert derived["test"]["acc"] == pytest.approx(trained["test"]["acc_m0"])
    assert not (out / "mla_m0" / "seed0" / "checkpoints").exists()

    main([str(path), "--seeds", "1", "--out", str(out), "--rows", "mla", "--evaluate", "gap", "--",
          *TINY, "diagnostics=[modality_gap]"])
    table = json.loads((out / "table.json").read_text())["rows"]
    assert "modality_gap/gap/m0-m1" in table["mla"]["stats"] and table["mla"]["stats"]["acc"][0] == \
        pytest.approx(100 * trained["test"]["acc"])
    assert table["mla_m0"]["seeds"] == [0], "the table covers every row, whichever rows a call ran"
    assert (out / "figures" / "modality_gap.png").is_file() and (out / "figures" / "contributions.png").is_file()
    capsys.readouterr()
    main([str(path), "--seeds", "1", "--out", str(out), "--rows", "mla_m0", "--evaluate", "gap", "--dry-run"])
    command = next(l for l in capsys.readouterr().out.splitlines() if "train.py" in l)
    assert "method.fusion=fixed" in command, "an evaluation keeps the row's test-time options"
    with pytest.raises(SystemExit):
        main([str(path), "--seeds", "1", "--out", str(out), "--evaluate", "../x", "--", *TINY])


def test_one_entry_stands_for_a_row_per_value(tmp_path):
    path = tmp_path / "each.yaml"
    path.write_text(yaml.safe_dump({"baseline": "joint", "rows": [
        {"name": "joint", "overrides": ["method=joint"]},
        {"name": "only", "overrides": ["method=unimodal"], "for_each": {"method.modality": ["audio", "visual"]},
         "reference": {"audio": 55.0}}]}))
    _, rows = load_table(str(path))
    assert [(r.name, r.overrides, r.reference, r.baseline) for r in rows[1:]] == [
        ("only_audio", ["method=unimodal", "method.modality=audio"], 55.0, "joint"),
        ("only_visual", ["method=unimodal", "method.modality=visual"], None, "joint")]
    path.write_text(yaml.safe_dump({"rows": [{"name": "only", "overrides": [], "for_each": ["audio"]}]}))
    with pytest.raises(ValueError, match="for_each takes one key and a list of values"):
        load_table(str(path))


def test_the_tables_overrides_reach_every_row_and_a_rows_own_value_wins(tmp_path):
    path = tmp_path / "length.yaml"
    path.write_text(yaml.safe_dump({"overrides": ["trainer.max_epochs=2"], "rows": [
        {"name": "joint", "overrides": ["method=joint"]},
        {"name": "short", "experiment": "mla/avdigits_mla", "overrides": ["trainer.max_epochs=1"]}]}))
    _, rows = load_table(str(path))
    assert [r.overrides for r in rows] == [
        ["trainer.max_epochs=2", "method=joint"],
        ["experiment=mla/avdigits_mla", "trainer.max_epochs=2", "trainer.max_epochs=1"]]
    out = tmp_path / "out"
    main([str(path), "--seeds", "1", "--rows", "joint", "--out", str(out), "--",
          *[o for o in TINY if not o.startswith("trainer.max_epochs")]])
    metrics = (out / "joint" / "seed0" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert {line.split(",")[0] for line in metrics[1:]} >= {"0", "1"}, "the run trained the table's two epochs"
    path.write_text(yaml.safe_dump({"overrides": "trainer.max_epochs=2", "rows": [{"name": "a", "overrides": []}]}))
    with pytest.raises(ValueError, match="list of overrides for every row"):
        load_table(str(path))


def test_a_table_extending_another_has_its_rows_and_changes_only_what_it_names(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "title": "Base", "baseline": "joint", "overrides": ["trainer.max_epochs=20"], "rows": [
            {"name": "joint", "overrides": ["method=joint"]},
            {"name": "only", "overrides": ["method=unimodal"], "for_each": {"method.modality": ["m0", "m1"]}},
            {"name": "relearning", "overrides": ["method=relearning", "method.relearn_every=5"]}]}))
    longer = tmp_path / "longer.yaml"
    longer.write_text(yaml.safe_dump({
        "extends": str(tmp_path / "base.yaml"), "title": "Longer", "overrides": ["trainer.max_epochs=40"],
        "row_overrides": {"relearning": ["method.relearn_every=10"], "only": ["method.lr_scale=2"]},
        "rows": [{"name": "extra", "overrides": ["method=mla"]}]}))
    title, rows = load_table(str(longer))
    assert title == "Longer"
    assert {r.name: r.overrides for r in rows} == {
        "joint": ["trainer.max_epochs=20", "trainer.max_epochs=40", "method=joint"],
        "only_m0": ["trainer.max_epochs=20", "trainer.max_epochs=40", "method=unimodal", "method.lr_scale=2",
                    "method.modality=m0"],
        "only_m1": ["trainer.max_epochs=20", "trainer.max_epochs=40", "method=unimodal", "method.lr_scale=2",
                    "method.modality=m1"],
        "relearning": ["trainer.max_epochs=20", "trainer.max_epochs=40", "method=relearning",
                       "method.relearn_every=5", "method.relearn_every=10"],
        "extra": ["trainer.max_epochs=20", "trainer.max_epochs=40", "method=mla"]}
    assert {r.baseline for r in rows} == {"joint"}, "the parent's baseline is kept"
    assert load_table(str(tmp_path / "base.yaml"))[1][-1].overrides[-1] == "method.relearn_every=5", \
        "extending a table leaves the table itself unchanged"


@pytest.mark.parametrize("spec, message", [
    ({"row_overrides": {"joint": ["a=1"]}}, "it extends none"),
    ({"extends": "base", "row_overrides": {"jiont": ["a=1"]}}, r"names 'jiont', which is no row of base"),
    ({"extends": "base", "row_overrides": {"joint": "a=1"}}, "is a list of overrides"),
    ({"extends": "cycle"}, "makes a cycle of tables"),
])
def test_bad_extensions_are_refused(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    Path("base").write_text(yaml.safe_dump({"rows": [{"name": "joint", "overrides": ["method=joint"]}]}))
    Path("cycle").write_text(yaml.safe_dump({"extends": "bad.yaml"}))
    Path("bad.yaml").write_text(yaml.safe_dump({**spec, "rows": [{"name": "own", "overrides": []}]}))
    with pytest.raises(ValueError, match=message):
        load_table("bad.yaml")


@pytest.mark.parametrize("longer, study, length, scaled", [
    ("avdigits_40_epochs", "avdigits_study", "trainer.max_epochs=40", {
        "gblending": ["method.super_epoch=40", "method.estimate_epochs=10"],
        "relearning": ["method.relearn_every=10"],
        "dimml": ["method.warmup_epochs=10", "method.stage2_epoch=30"]}),
    ("easy_vqa_10_epochs", "easy_vqa_study", "trainer.max_epochs=10", {}),
])
def test_the_longer_study_tables_change_only_the_length_and_the_scaled_schedules(longer, study, length, scaled):
    """A longer table is its study with the training length after the study's own (so it wins) and, for the
    rows whose schedule is set in epochs, that schedule scaled; rows, baselines and everything else unchanged."""
    _, rows = load_table(study)
    _, long_rows = load_table(longer)
    assert [r.name for r in long_rows] == [r.name for r in rows]
    for row, long_row in zip(rows, long_rows):
        assert (long_row.baseline, long_row.evaluate_from) == (row.baseline, row.evaluate_from)
        lengths = [o for o in row.overrides if o.startswith("trainer.max_epochs=")]
        assert long_row.overrides == [*lengths, length, *row.overrides[len(lengths):], *scaled.get(row.name, [])]
        assert [o for o in long_row.overrides if o.startswith("trainer.max_epochs=")][-1] == length, row.name


def test_a_umt_row_distils_from_the_unimodal_rows_of_its_seed(tmp_path):
    path = tmp_path / "teachers.yaml"
    teachers = "{m0: '${run_dir}/../../only_m0/seed${seed}', m1: '${run_dir}/../../only_m1/seed${seed}'}"
    path.write_text(yaml.safe_dump({"rows": [
        {"name": "only", "overrides": ["method=unimodal"], "for_each": {"method.modality": ["m0", "m1"]}},
        {"name": "umt", "overrides": ["method=umt", f"method.teachers={teachers}"]}]}))
    out = tmp_path / "out"
    main([str(path), "--seeds", "1", "--out", str(out), "--", *TINY])
    log = (out / "umt" / "seed0" / "train.log").read_text()
    for m in ("m0", "m1"):
        selected = json.loads((out / f"only_{m}" / "seed0" / "results.json").read_text())["best_checkpoint"]
        assert f"UMT: {m} teacher from {Path(selected)}" in log.replace("/umt/seed0/../../", "/")
    assert json.loads((out / "table.json").read_text())["rows"]["umt"]["seeds"] == [0]


def test_evaluate_from_must_name_a_trained_row_above(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"rows": [{"name": "a", "evaluate_from": "b", "overrides": []},
                                             {"name": "b", "overrides": []}]}))
    with pytest.raises(ValueError, match="no trained row above"):
        load_table(str(path))


def _finished_runs(out, values, configs=None, baselines=None):
    """Finished runs in ``out`` made up from ``{row: {key: [value per seed]}}`` (a seed's results.json has the
    keys with a value for it), each with the saved config ``configs`` (a dict, written as .hydra/config.yaml) and
    the row's baseline from ``baselines`` (row -> name)."""
    rows = [Row(name, [], baseline=(baselines or {}).get(name)) for name in values]
    runs = plan_runs(rows, list(range(max(len(v) for r in values.values() for v in r.values()))), out)
    for run in runs:
        run.directory.mkdir(parents=True)
        test = {key: seeds[run.seed] for key, seeds in values[run.row.name].items() if run.seed < len(seeds)}
        (run.directory / "results.json").write_text(json.dumps({"selection": "best val/acc", "test": test}))
        if configs is not None:
            (run.directory / ".hydra").mkdir()
            (run.directory / ".hydra" / "config.yaml").write_text(yaml.safe_dump(configs))
    return runs


def _diagnostics_cells(text):
    """``{row: {column: cell}}`` of a table.md's diagnostics table."""
    lines = text.split("Diagnostics on the test split")[1].strip().splitlines()[2:]
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    header, body = table[0], table[2:]
    return {cells[0]: dict(zip(header[1:], cells[1:])) for cells in body}


@pytest.mark.parametrize("study", sorted(p.name for p in RESULTS.iterdir()))
def test_shipped_diagnostics_declare_the_committed_columns_and_figures(study, tmp_path):
    """The committed study tables' diagnostics numbers and figures, rewritten from their table.json: the columns
    and figures are what the diagnostics' classes declare (table_columns, table_figure)."""
    spec = json.loads((RESULTS / study / "table.json").read_text())
    baselines = {name: entry["baseline"] for name, entry in spec.get("paired", {}).items()}
    runs = _finished_runs(tmp_path / "out", {name: row["values"] for name, row in spec["rows"].items()},
                          baselines=baselines)
    text = write_table(spec["title"], runs, tmp_path / "out", spec["protocol"])
    committed = _diagnostics_cells((RESULTS / study / "table.md").read_text())
    written = _diagnostics_cells(text)
    assert written == committed
    header = next(line for line in text.split("Diagnostics on the test split")[1].splitlines()
                  if line.startswith("| row |"))
    labels = [label.strip() for label in header.strip("|").split("|")]
    assert not any(label.endswith(("_correct", "_incorrect")) for label in labels)
    figures = {p.name for p in (tmp_path / "out" / "figures").iterdir()}
    committed_figures = {p.name for pattern in ("*.png", "figures/*.png")  # copied flat, or exported (--export)
                         for p in (RESULTS / study).glob(pattern)} - {"contributions.png", "convergence.png"}
    assert figures == committed_figures and "missing_modality.png" in figures
    if study in FULL_STUDIES:  # trained with emap, modality_gap and missing_modality
        assert labels[:3] == ["row", "emap/acc_gap", "missing_modality/acc_r0.50"], "diagnostic by diagnostic"
        assert {"emap.png", "modality_gap.png"} <= figures


def test_a_new_diagnostic_gets_its_column_and_figure_from_its_class(tmp_path, capsys):
    """The toy diagnostic (tests/toy_diagnostic.py, configured in the runs as on a command line, in no
    conf/diagnostics file and named nowhere in balance/reproduce*.py) declares a percent column and a figure."""
    configs = {"diagnostics": {"toy": {"_target_": "toy_diagnostic.FusedAccuracy"},
                               "broken": {"_target_": "no_such_module.Diagnostic"}}}
    runs = _finished_runs(tmp_path, {"a": {"acc": [0.5, 0.5], "toy/acc": [0.1, 0.2], "toy/count": [9, 9]},
                                     "b": {"acc": [0.5], "toy/acc": [0.4]}}, configs)
    text = write_table("Toy", runs, tmp_path, "val")
    assert _diagnostics_cells(text) == {"a": {"toy acc (%)": "15.00 ± 7.07"}, "b": {"toy acc (%)": "40.00"}}
    assert (tmp_path / "figures" / "toy.png").stat().st_size > 0 and "[toy](figures/toy.png)" in text
    assert "diagnostic broken (no_such_module.Diagnostic) not importable" in capsys.readouterr().err


def test_the_table_warns_when_runs_ran_on_different_settings(tmp_path):
    runs = _finished_runs(tmp_path, {"a": {"acc": [0.5, 0.6]}})
    for run, threads in zip(runs, (1, 2)):
        results = json.loads((run.directory / "results.json").read_text())
        results["environment"] = {"device": "cpu", "cpu": "Some CPU", "threads": threads, "torch": "2.14.1"}
        (run.directory / "results.json").write_text(json.dumps(results))
    text = write_table("Mixed", runs, tmp_path, "val")
    assert ("Runs on more than one setting, whose numbers are not comparable seed by seed: 1 torch thread on Some CPU "
            "(cpu), torch 2.14.1 (1 runs); 2 torch threads on Some CPU (cpu), torch 2.14.1 (1 runs).") in text
    assert json.loads((tmp_path / "table.json").read_text())["environments"] == {
        "1 torch thread on Some CPU (cpu), torch 2.14.1": 1, "2 torch threads on Some CPU (cpu), torch 2.14.1": 1}


def test_the_environment_records_the_thread_count_and_the_cpu():
    from balance.environment import describe, run_environment

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        environment = run_environment(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    assert environment["threads"] == 1 and environment["device"] == "cpu" and environment["cpu"]
    assert describe(environment).startswith(f"1 torch thread on {environment['cpu']} (cpu), torch ")
