"""DDP on the CPU (2 processes, gloo): training runs and distributed evaluation counts every sample once."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from balance.run import build
from compose import SYNTHETIC, compose_train

REPO = Path(__file__).resolve().parents[1]


IMAGES = ["data=synthetic", "model=small_cnn", "data.image_shape=[1,4,4]", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false"]
# Per method: its overrides (after the runs' defaults) and a logged quantity whose presence (or value) shows
# that its mechanism acted.
MODULATIONS = {
    "ogm_ge": ([*SYNTHETIC, "method.params=weights"], "coeff", lambda values: min(values) < 1.0),
    "inforeg": ([*SYNTHETIC], "beta", lambda values: max(values) > 0.0),
    "cggm": ([*SYNTHETIC], "coeff", lambda values: len(values) > 0),
    "mmpareto": ([*SYNTHETIC], "cos", lambda values: len(values) > 0),
    "greedy": ([*IMAGES, "method.starting_epoch=0"], "bdr", lambda values: len(values) > 0),
    "agm": ([*SYNTHETIC, "method.modulation_starts=0"], "coeff", lambda values: len(values) > 0),
    "pmr": ([*SYNTHETIC], "coeff", lambda values: len(values) > 0),
    "opm": ([*SYNTHETIC, "method.modulation_starts=0"], "drop_prob", lambda values: max(values) > 0.0),
    # The loss history is a buffer: equal on both ranks only if each adds every rank's samples.
    "qmf": ([*SYNTHETIC], "confidence", lambda values: len(values) > 0),
    # The purities come from KMeans on features gathered from every rank, the blend weights from losses summed over
    # the ranks and clones trained on averaged gradients, the selected dimensions from gathered features.
    "relearning": ([*SYNTHETIC, "trainer.max_epochs=2", "method.warmup_epochs=1"], "reinit",
                   lambda values: len(values) > 0),
    "gblending": ([*SYNTHETIC, "method.estimate_epochs=1"], "weight", lambda values: len(values) > 0),
    "dimml": ([*SYNTHETIC, "method.warmup_epochs=0"], "effective_dims", lambda values: len(values) > 0),
    # The alignment weight comes from a hypergradient on the held-out batch: the same batch on every rank.
    "lfm": ([*SYNTHETIC, "method.lr_alpha=1.0"], "weight_align", lambda values: min(values) < 0.95),
    # A learner phase trains one encoder: DDP must be told that the others' parameters get no gradient.
    "reconboost": ([*SYNTHETIC, "trainer.strategy=ddp_find_unused_parameters_true", "trainer.max_epochs=2",
                    "method.learner_epochs=1", "method.correction_epochs=1"], "boost_rate",
                   lambda values: len(values) > 0),
}


# 1,991 samples: odd-sized evaluation splits, which DistributedSampler would pad with duplicates.
EVALUATED = [*SYNTHETIC, "data.num_samples=1991", "trainer.max_epochs=2"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Joint training on EVALUATED (``evaluated/``) and every method of MODULATIONS for an epoch (``<method>/``,
    with each rank's final state in ``ranks/``), trained under DDP in one launch (ddp_methods.py)."""
    root = tmp_path_factory.mktemp("ddp_runs")
    runs = {str(root / "evaluated"): EVALUATED}
    for method, (base, _, _) in MODULATIONS.items():
        runs[str(root / method)] = [
            f"method={method}", "data.num_samples=600", "trainer.max_epochs=1", *base,
            f"+callbacks.rank_dump={{_target_:ddp_probe.RankStateDump,directory:{root / method / 'ranks'}}}"]
    (root / "runs.json").write_text(json.dumps(runs))
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ddp_methods.py"), str(root / "runs.json")],
        cwd=REPO, env={**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO / "tests")},
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def test_ddp_evaluation_matches_single_process(ddp_runs, tmp_path):
    results = json.loads((ddp_runs / "evaluated" / "results.json").read_text())
    datamodule, method = build(compose_train(EVALUATED, run_dir=tmp_path))
    assert len(datamodule.datasets["test"]) % 2 == 1
    state = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    method.load_state_dict(state)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.test(method, datamodule=datamodule, verbose=False)[0]
    for name in ("acc", "acc_m0", "acc_m1", "f1"):
        assert abs(single[f"test/{name}"] - results["test"][name]) < 1e-6, name


@pytest.mark.parametrize("method", sorted(MODULATIONS))
def test_gradient_modulation_is_the_same_on_every_rank(method, ddp_runs):
    # What decides a modification comes from each rank's batch (scores, accuracies, speeds) and noise from the
    # method's generator: unless the deciding values are reduced over the ranks (or computed from the averaged
    # gradients) and the noise is drawn alike, the ranks' weights and method state drift apart.
    _, quantity, acted = MODULATIONS[method]
    run = ddp_runs / method
    rank0, rank1 = (torch.load(run / "ranks" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    rows = list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()))
    names = [f"train/{quantity}", *(f"train/{quantity}_{m}" for m in ("m0", "m1"))]  # one value, or one per modality
    values = [float(r[name]) for r in rows for name in names if r.get(name)]
    assert acted(values), values  # the mechanism acted
    differing = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not differing, differing


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    # Were only the rank with the NaN to stop, the others would fail in the next gradient all-reduce with gloo's
    # "Connection closed by peer" (under NCCL: wait until the process group times out), which hides the cause.
    overrides = [*SYNTHETIC, "data.num_samples=600", "trainer.max_epochs=2",
                 "+callbacks.poison={_target_:ddp_probe.PoisonOneRank,rank:1,step:2}"]
    out = subprocess.run(
        [sys.executable, "train.py", *overrides, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.sync_batchnorm=false", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, env={**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO / "tests")},
        capture_output=True, text=True, timeout=150,
    )
    assert out.returncode != 0
    assert "non-finite training loss on 1 of 2 ranks" in out.stdout + out.stderr
    assert "Connection closed by peer" not in out.stdout + out.stderr
    assert not (tmp_path / "results.json").exists()
