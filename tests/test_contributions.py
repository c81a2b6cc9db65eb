"""The contributions callback: per-epoch CSVs, logged means, plots, final-evaluation values in results.json."""

import csv

import pytest
import pytorch_lightning as pl
import torch

from balance.diagnostics import ContributionCallback
from balance.run import build, train
from balance.valuation import value_dataloader
from compose import SYNTHETIC, compose_train


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", ["joint", "sample_level"])
def test_contribution_tables_and_plots(tmp_path, method):
    cfg = compose_train([*SYNTHETIC, f"method={method}", "method.warmup_epochs=1" if method != "joint" else "seed=0",
                         "data.informativeness=[1.0,0.2]", "trainer.max_epochs=2"], run_dir=tmp_path)
    results = train(cfg)
    out = tmp_path / "contributions"
    for epoch in (0, 1):
        rows = _rows(out / f"val_epoch{epoch:03d}.csv")
        assert list(rows[0]) == ["index", "label", "correct", "phi_m0", "phi_m1"]
        # Every validation sample once, in order (15% of 2,000, up to per-class rounding).
        assert [int(r["index"]) for r in rows] == list(range(len(rows))) and abs(len(rows) - 300) <= 4
        for r in rows:  # efficiency under the official benefit: phi_m0 + phi_m1 = v(all) = 2 * correct
            assert float(r["phi_m0"]) + float(r["phi_m1"]) == pytest.approx(2.0 * (r["correct"] == "True"))
    assert (out / "val_histogram.png").stat().st_size > 1000 and (out / "mean_contribution.png").exists()
    assert abs(len(_rows(out / "test_final.csv")) - 300) <= 4
    # The informative modality contributes more, and the final values reach results.json.
    assert results["val"]["phi_m0"] > results["val"]["phi_m1"] + 0.2
    assert {"phi_m0", "phi_m1"} <= set(results["test"])
    train_tables = sorted(p.name for p in out.glob("train_epoch*.csv"))
    assert train_tables == (["train_epoch000.csv", "train_epoch001.csv"] if method == "sample_level" else [])


@pytest.mark.parametrize("method,drop", [("joint", "features"), ("mla", "features"), ("joint", "inputs")])
def test_values_from_the_validation_steps_equal_a_separate_pass(tmp_path, method, drop):
    """The callback values the batches of the validation loop (on the features the evaluation step returns); the
    values are those of a separate valuation pass over the validation split with the same weights."""
    datamodule, module = build(compose_train([*SYNTHETIC, f"method={method}", "data.informativeness=[1.0,0.3]"]))
    callback = ContributionCallback(str(tmp_path), drop=drop, plots=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    rows = _rows(tmp_path / "val_epoch000.csv")
    separate = value_dataloader(module.model, datamodule.val_dataloader(), drop=drop)
    assert [int(r["index"]) for r in rows] == separate.index.tolist()
    phi = torch.tensor([[float(r["phi_m0"]), float(r["phi_m1"])] for r in rows])
    assert torch.allclose(phi, separate.phi, atol=1e-6)
    assert [r["correct"] == "True" for r in rows] == separate.correct.tolist()
