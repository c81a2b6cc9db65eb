"""AV-Digits: the offline cache, the split, the batch contract, errors, and that both modalities are informative."""

import json
import shutil

import numpy as np
import pytest
import torch

from balance.run import train
from compose import compose_train
from datamodules.avdigits import AVDigitsDataModule

SMALL = {"utterances_per_image": 1}


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
    """One small preparation (1 utterance per image) shared by the session, in a temporary cache."""
    cache = tmp_path_factory.mktemp("balance-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BALANCE_CACHE", str(cache))
        dm = AVDigitsDataModule(**SMALL)
        dm.prepare_data()
        yield cache


@pytest.fixture
def datamodule(cache_env, monkeypatch):
    monkeypatch.setenv("BALANCE_CACHE", str(cache_env))
    dm = AVDigitsDataModule(**SMALL, batch_size=32)
    dm.setup("fit")
    return dm


def test_cache_layout(datamodule):
    root = datamodule.root
    meta = json.loads((root / "meta.json").read_text())
    assert meta["num_utterances"] == 1797 and meta["params"]["utterances_per_image"] == 1
    logmel = np.load(root / "logmel.npy")
    assert logmel.shape == (1797, 64, 64) and logmel.dtype == np.float16 and np.isfinite(logmel).all()
    rows = (root / "utterances.csv").read_text().splitlines()
    assert rows[0] == "image,label,voice,rate,pitch,snr_db" and len(rows) == 1798
    assert len({r.split(",")[2] for r in rows[1:]}) > 50  # many voices


def test_split_keeps_images_together_and_is_stratified(datamodule):
    images = datamodule.split_images
    assert sum(len(v) for v in images.values()) == 1797
    assert not set(images["train"]) & set(images["val"]) and not set(images["train"]) & set(images["test"])
    for split, fraction in (("val", 0.15), ("test", 0.15)):
        labels = datamodule.datasets[split].dataset.labels
        counts = torch.bincount(labels, minlength=10)
        assert abs(len(labels) / 1797 - fraction) < 0.01
        assert counts.min() >= 0.8 * counts.float().mean()


def test_batch_contract(datamodule):
    batch = next(iter(datamodule.val_dataloader()))
    assert set(batch) == {"inputs", "label", "index"}
    assert batch["inputs"]["audio"].shape == (32, 1, 64, 64)
    assert batch["inputs"]["visual"].shape == (32, 1, 8, 8)
    assert batch["label"].dtype == torch.long and batch["label"].max() < 10
    assert torch.equal(batch["index"], torch.arange(32))
    train_batch = next(iter(datamodule.train_dataloader()))
    dataset = datamodule.datasets["train"]
    for i, idx in enumerate(train_batch["index"][:4].tolist()):
        assert torch.equal(dataset[idx]["inputs"]["audio"], train_batch["inputs"]["audio"][i])


def _nearest_centroid_accuracy(dm, modality):
    train_set, test_set = dm.datasets["train"].dataset, dm.datasets["test"].dataset
    x_train, x_test = train_set.inputs[modality].flatten(1), test_set.inputs[modality].flatten(1)
    centroids = torch.stack([x_train[train_set.labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(x_test, centroids).argmin(1)
    return (predicted == test_set.labels).float().mean().item()


def test_both_modalities_carry_the_label(datamodule):
    """A nearest-centroid classifier on raw inputs beats chance (0.1) on each modality."""
    assert _nearest_centroid_accuracy(datamodule, "audio") > 0.2
    assert _nearest_centroid_accuracy(datamodule, "visual") > 0.2


def test_wrong_layout_names_layout_and_command(tmp_path):
    (tmp_path / "something.txt").write_text("not a cache")
    with pytest.raises(FileNotFoundError, match="python -m datamodules.avdigits --out") as error:
        AVDigitsDataModule(root=str(tmp_path)).prepare_data()
    assert "logmel.npy" in str(error.value)


def test_other_preparation_arguments_are_refused(datamodule):
    with pytest.raises(ValueError, match="prepared with"):
        AVDigitsDataModule(root=str(datamodule.root), utterances_per_image=2).prepare_data()


def test_a_run_that_prepares_second_keeps_the_first_runs_cache(cache_env, tmp_path, monkeypatch):
    # Two runs started together both find no cache and prepare one; each writes beside the cache and renames its
    # copy into place, so neither ever reads a half-written one, and the second's rename leaves the first's.
    import datamodules.avdigits as avdigits

    monkeypatch.setenv("BALANCE_CACHE", str(tmp_path))
    finished = next(p for p in (cache_env / "avdigits").iterdir() if (p / "meta.json").exists())
    dm = AVDigitsDataModule(**SMALL)
    staged = []

    def prepare_while_another_run_finishes(out, *args):
        shutil.copytree(finished, dm.root)  # the other run's rename happened meanwhile
        assert not (out / "meta.json").exists() and out.parent == dm.root.parent
        staged.append(out)
        for name in ("meta.json", "utterances.csv", "logmel.npy"):
            shutil.copy(finished / name, out / name)
        (out / "second").write_text("")

    monkeypatch.setattr(avdigits, "prepare", prepare_while_another_run_finishes)
    dm.prepare_data()
    assert staged and not staged[0].exists()
    assert sorted(p.name for p in dm.root.parent.iterdir()) == [dm.root.name]
    assert not (dm.root / "second").exists() and dm._check_root()

    monkeypatch.setattr(avdigits, "prepare", lambda out, *args: shutil.copytree(finished, out, dirs_exist_ok=True))
    shutil.rmtree(dm.root)
    dm.prepare_data()  # alone: its own copy is renamed into place
    assert sorted(p.name for p in dm.root.parent.iterdir()) == [dm.root.name] and dm._check_root()


@pytest.mark.parametrize("method", ["joint", "mla", "sample_level", "modality_level"])
def test_train_runs_on_avdigits(cache_env, tmp_path, monkeypatch, method):
    monkeypatch.setenv("BALANCE_CACHE", str(cache_env))
    cfg = compose_train(
        [f"method={method}", "data.utterances_per_image=1", "trainer.max_epochs=2",
         *(["method.warmup_epochs=1"] if method.endswith("_level") else []),
         "trainer.enable_progress_bar=false"],
        run_dir=tmp_path,
    )
    results = train(cfg)
    assert {"acc", "acc_audio", "acc_visual", "f1"} <= set(results["test"])
    assert results["test"]["acc"] > 0.2  # 2 epochs on 1,257 training pairs: above chance (0.1)


def test_balance_prepare_lists_and_refuses(capsys):
    from datamodules.prepare import main, preparable_datasets

    assert "avdigits" in preparable_datasets()
    with pytest.raises(SystemExit) as exit_info:
        main(["no_such_data"])
    assert exit_info.value.code == 2 and "avdigits" in capsys.readouterr().err


def test_balance_prepare_help_lists_every_data_set_with_its_description(capsys):
    from datamodules.prepare import main, preparable_datasets

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    shown = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--raw" not in shown.splitlines()[0]
    for name in preparable_datasets():
        assert any(line.split()[:1] == [name] and len(line.split()) > 2 for line in shown.splitlines()), name
