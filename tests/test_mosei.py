"""CMU-MOSEI: preparation from a tiny pickle in MultiBench's layout (utterances without text dropped, -inf audio
zeroed, steps cut from the first word, as MultiBench reads them), binary and 7-class labels, the sequence
encoders (padding ignored wherever it is), the errors, and training that learns three modalities."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from balance.models import SequenceEncoder
from balance.run import train
from compose import compose_train
from datamodules.mosei import MOSEIDataModule, prepare, sentiment_classes
from datamodules.prepare import main as balance_prepare

STEPS, DIMS = 12, {"text": 6, "audio": 4, "vision": 3}
SIZES = {"train": 96, "valid": 24, "test": 24}


def _split(n: int, rng: np.random.Generator) -> dict:
    scores = rng.uniform(-3, 3, n).astype(np.float32)
    data = {}
    for name, dim in DIMS.items():
        array = rng.normal(0, 1, (n, STEPS, dim)).astype(np.float32)
        array[:, :, 0] += scores[:, None]  # the first feature carries the sentiment, in every modality
        data[name] = array
    lead = rng.integers(0, 6, n)  # word alignment pads the front
    for i, k in enumerate(lead):
        for name in DIMS:
            data[name][i, :k] = 0
    data["audio"][0, -1, 1] = -np.inf  # COVAREP's -inf, which MultiBench zeroes
    data["text"][1] = 0  # an utterance without text: dropped
    data["labels"] = scores.reshape(n, 1, 1)
    data["id"] = np.array([[f"u{i}", "0"] for i in range(n)])
    return data


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mosei_raw")
    rng = np.random.default_rng(0)
    with open(root / "mosei_senti_data.pkl", "wb") as handle:
        pickle.dump({split: _split(n, rng) for split, n in SIZES.items()}, handle)
    return root


@pytest.fixture(scope="module")
def cache(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mosei_cache")
    balance_prepare(["mosei", "--raw", str(raw), "--out", str(out)])
    return out


def test_prepare_reads_the_pickle_as_multibench_does(cache, raw):
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["sizes"] == {"train": 95, "val": 23, "test": 23} and meta["dropped"]["train"] == 1
    assert meta["dims"] == {"text": 6, "audio": 4, "visual": 3}
    with open(raw / "mosei_senti_data.pkl", "rb") as handle:
        original = pickle.load(handle)["train"]
    text, audio = np.load(cache / "train_text.npy"), np.load(cache / "train_audio.npy")
    assert np.isfinite(audio).all() and audio[0, :, 1].min() > -np.inf
    # Utterance 2 of the pickle is row 1 here (row 1 had no text): its steps from its first word, then zeros.
    start = int((np.abs(original["text"][2]).sum(axis=1) > 0).argmax())
    assert np.array_equal(text[1, : STEPS - start], original["text"][2, start:])
    assert not text[1, STEPS - start:].any()
    labels = np.load(cache / "train_labels.npy")
    assert np.allclose(labels, np.delete(original["labels"].reshape(-1), 1))


def test_sentiment_classes():
    scores = np.array([-3.0, -2.6, -0.4, 0.0, 0.2, 1.5, 2.5, 3.0])
    assert sentiment_classes(scores, "binary").tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert sentiment_classes(scores, "seven").tolist() == [0, 0, 3, 3, 3, 5, 5, 6]


def test_the_datamodule_serves_three_sequences(cache):
    dm = MOSEIDataModule(root=str(cache), task="seven", batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 7 and dm.encoder_kwargs == {"text": {"in_dim": 6}, "audio": {"in_dim": 4},
                                                         "visual": {"in_dim": 3}}
    batch = next(iter(dm.train_dataloader()))
    assert {m: tuple(x.shape) for m, x in batch["inputs"].items()} == {"text": (8, 12, 6), "audio": (8, 12, 4),
                                                                       "visual": (8, 12, 3)}
    assert 0 <= int(batch["label"].min()) and int(batch["label"].max()) < 7


@pytest.mark.parametrize("kind", SequenceEncoder.KINDS)
def test_the_sequence_encoder_ignores_padding_wherever_it_is(kind):
    torch.manual_seed(0)
    encoder = SequenceEncoder(5, 16, 8, kind=kind).eval()
    steps = torch.randn(4, 5)
    front = torch.cat([torch.zeros(3, 5), steps]).unsqueeze(0)
    back = torch.cat([steps, torch.zeros(3, 5)]).unsqueeze(0)
    assert torch.allclose(encoder(front), encoder(back), atol=1e-5)
    assert torch.allclose(encoder(back), encoder(steps.unsqueeze(0)), atol=1e-5), "padding adds nothing"
    dropped = encoder(torch.zeros(2, 7, 5))
    assert torch.isfinite(dropped).all() and torch.allclose(dropped[0], dropped[1])


def test_errors(tmp_path):
    with pytest.raises(SystemExit):
        balance_prepare(["mosei", "--raw", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="balance-prepare mosei"):
        MOSEIDataModule(root=str(tmp_path)).prepare_data()
    with pytest.raises(ValueError, match="binary or seven"):
        MOSEIDataModule(root=str(tmp_path), task="five")
    with pytest.raises(ValueError, match="SequenceEncoder|kind"):
        SequenceEncoder(3, kind="lstm")
    with pytest.raises(FileNotFoundError, match="mosei_senti_data.pkl"):
        prepare(tmp_path, tmp_path / "out")


def test_training_learns_from_the_sequences(cache, tmp_path):
    cfg = compose_train(["data=mosei", "model=mosei", f"data.root={cache}", "data.num_workers=0",
                         "data.batch_size=16", "trainer.max_epochs=15", "method.optimizer.lr=0.01",
                         "trainer.enable_progress_bar=false", "~callbacks.contributions"], run_dir=tmp_path)
    results = train(cfg)
    assert results["test"]["acc"] > 0.75, "the sentiment is in every modality's first feature"
    assert {"acc_text", "acc_audio", "acc_visual"} <= set(results["test"])
