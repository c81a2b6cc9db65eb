"""MVSA-Single: the label aggregation on hand-worked cases, preparation from tiny files in the raw layout
(labelResultAll.txt, data/<id>.jpg, data/<id>.txt) with tweets in several encodings, its report (inconsistent pairs
dropped, missing and corrupt files), resumability, splits (stratified, random, MMBT jsonl and MLA txt files), the
training-only vocabulary, the batch contract, the error for a missing root, and one training run end to end."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compose import model_logits_on_a_batch, small_encoder, train_briefly
from raw_media import write_jpg
from datamodules.image_text_raw import read_split_file
from datamodules.mvsa import CLASSES, MVSADataModule, aggregate, read_labels
from datamodules.prepare import main as balance_prepare
from datamodules.text import PAD_ID, Vocabulary, tokenize

# (text label, image label) -> the pair's label, worked out by hand from the usual rule.
CASES = {
    ("positive", "positive"): "positive",
    ("negative", "negative"): "negative",
    ("neutral", "neutral"): "neutral",
    ("neutral", "positive"): "positive",
    ("positive", "neutral"): "positive",
    ("neutral", "negative"): "negative",
    ("negative", "neutral"): "negative",
    ("positive", "negative"): None,
    ("negative", "positive"): None,
}
# Ten usable pairs per class (ids 1-30), each class through every combination that gives it.
COMBOS = {"positive": [("positive", "positive"), ("neutral", "positive"), ("positive", "neutral")],
          "neutral": [("neutral", "neutral")],
          "negative": [("negative", "negative"), ("neutral", "negative"), ("negative", "neutral")]}
LABELS = {}
for _c, _label in enumerate(("positive", "neutral", "negative")):
    for _k in range(10):
        LABELS[str(1 + 10 * _c + _k)] = COMBOS[_label][_k % len(COMBOS[_label])]
INCONSISTENT = {"31": ("positive", "negative"), "32": ("negative", "positive")}
# Broken on purpose (consistent labels): a corrupt image, an image without text, a text without image.
BROKEN = {"40": ("positive", "positive"), "41": ("neutral", "neutral"), "42": ("negative", "neutral")}
GOOD = sorted(LABELS, key=int)


def tweet(sample: str) -> str:
    return f"so {aggregate(*LABELS[sample])} today tag{sample}"


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("MVSA_Single")
    (root / "data").mkdir()
    for sample in GOOD + list(INCONSISTENT) + ["40", "41", "99"]:
        write_jpg(root / "data" / f"{sample}.jpg", (20 * int(sample) % 255, 100, 50), seed=int(sample))
    for sample in GOOD + list(INCONSISTENT) + ["40", "42", "99"]:
        (root / "data" / f"{sample}.txt").write_text(tweet(sample) if sample in LABELS else "meh", encoding="utf-8")
    (root / "data" / "40.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    # Tweets in other encodings, with a mention, a URL and a line break.
    (root / "data" / "1.txt").write_bytes("Caf\xe9 au lait tag1".encode("latin-1"))
    (root / "data" / "2.txt").write_bytes(b"\x93Quoted\x94 tag2")  # Windows-1252 curly quotes
    (root / "data" / "3.txt").write_text("RT @someone: great day\nhttp://t.co/AbC #sunny tag3 \U0001F600",
                                         encoding="utf-8")
    rows = {**LABELS, **INCONSISTENT, **BROKEN}
    lines = ["ID\ttext,image"] + [f"{sample}\t{t},{i}" for sample, (t, i) in rows.items()]
    lines += ["43\tpositive", "44\tpositive,happy"]  # malformed, unknown label
    (root / "labelResultAll.txt").write_text("\r\n".join(lines) + "\r\n")
    return root


@pytest.fixture(scope="module")
def cache(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mvsa_cache")
    balance_prepare(["mvsa", "--raw", str(raw), "--out", str(out), "--workers", "1", "--short-side", "40",
                     "--max-length", "12"])
    return out


def read_items(cache: Path) -> dict[str, dict[str, str]]:
    with open(cache / "items.csv", newline="", encoding="utf-8") as f:
        return {r["item"]: r for r in csv.DictReader(f)}


def test_aggregation_on_hand_worked_cases():
    for (text_label, image_label), expected in CASES.items():
        assert aggregate(text_label, image_label) == expected


def test_read_labels_skips_the_header_and_reports_bad_lines(raw):
    labels, problems = read_labels(raw / "labelResultAll.txt")
    assert len(labels) == 35 and labels["3"] == LABELS["3"] and labels["31"] == ("positive", "negative")
    assert [where for where, _ in problems] == ["labelResultAll.txt:37", "labelResultAll.txt:38"]
    assert "malformed line" in problems[0][1] and "unknown label" in problems[1][1]


def test_prepare_writes_the_cache_and_reports(cache):
    report = (cache / "prepare_report.txt").read_text()
    assert report.startswith("balance-prepare mvsa: 30 ok, 0 skipped (already done), 5 failed")
    assert ("labelResultAll.txt: 35 labelled pairs: 20 with equal labels, 13 with one neutral label, "
            "2 dropped as inconsistent (one positive, one negative)") in report
    assert "  31\tpositive,negative\n  32\tnegative,positive\n" in report
    assert "ids in data/ without a label row (not used): 1" in report
    failures = dict(line.split("\t") for line in report.splitlines()
                    if line.startswith(("data/", "labelResultAll.txt:")) and "\t" in line)
    assert set(failures) == {"data/40.jpg", "data/41.txt", "data/42.jpg", "labelResultAll.txt:37",
                             "labelResultAll.txt:38"}
    assert "unreadable image" in failures["data/40.jpg"]
    assert failures["data/41.txt"].startswith("no text: no such file")
    assert failures["data/42.jpg"].startswith("no image: no such file")

    items = read_items(cache)
    assert list(items) == GOOD
    for sample, row in items.items():
        assert (row["text_label"], row["image_label"]) == LABELS[sample]
        assert row["label"] == CASES[LABELS[sample]]
    assert items["1"]["text"] == "Café au lait tag1"
    assert items["2"]["text"] == "\u201cQuoted\u201d tag2"
    assert items["3"]["text"] == "RT @user: great day #sunny tag3 \U0001F600"
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["classes"] == ["negative", "neutral", "positive"] == list(CLASSES)
    assert meta["class_counts"] == {"negative": 10, "neutral": 10, "positive": 10}
    tokens = np.load(cache / "tokens.npy")
    words = Vocabulary.load(cache / "words.json")
    assert tokens.shape == (30, 12) and words.decode(tokens[2]) == tokenize(items["3"]["text"])
    with Image.open(cache / "images" / "5.jpg") as image:
        assert image.size == (40, 40)


def test_prepare_resumes_and_refuses_other_parameters(raw, cache, capsys):
    args = ["mvsa", "--raw", str(raw), "--out", str(cache), "--workers", "1", "--short-side", "40",
            "--max-length", "12"]
    (cache / "images" / "7.jpg").unlink()
    balance_prepare(args)
    assert "1 ok, 29 skipped (already done), 5 failed; 30 usable" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare([*args[:-2], "--max-length", "20"])
    assert exit_info.value.code == 2


def test_prepare_names_the_raw_layout(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare(["mvsa", "--raw", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "has no labelResultAll.txt" in err and "data/<id>.txt" in err and "mcrlab.net" in err


def test_missing_or_incomplete_root_names_layout_command_and_source(tmp_path, raw):
    for root in (tmp_path / "nowhere", raw):
        with pytest.raises(FileNotFoundError) as error:
            MVSADataModule(root=str(root)).setup()
        message = str(error.value)
        assert "balance-prepare mvsa --raw RAW --out OUT" in message
        assert "labelResultAll.txt" in message and "data/<id>.jpg" in message and "items.csv" in message
        assert "mcrlab.net/research/mvsa" in message
    assert "looks like the raw download" in message


def test_stratified_split_is_seeded_and_stratified(cache):
    def parts(seed, split="stratified"):
        dm = MVSADataModule(root=str(cache), split=split, max_length=12, seed=seed)
        dm.setup()
        return dm.split_items, dm

    first, dm = parts(0)
    assert first == parts(0)[0] and first != parts(1)[0]
    assert sorted(sum(first.values(), []), key=int) == GOOD
    for name, count in (("train", 8), ("val", 1), ("test", 1)):
        labels = dm.datasets[name].dataset.labels
        assert (torch.bincount(labels, minlength=3) == count).all()
    random = parts(0, "random")[0]
    assert [len(random[s]) for s in ("train", "val", "test")] == [24, 3, 3]


def test_batch_contract_and_training_vocabulary(cache):
    dm = MVSADataModule(root=str(cache), max_length=8, image_size=32, batch_size=3, min_count=1)
    dm.setup("fit")
    assert dm.modalities == ["visual", "text"] and dm.num_classes == 3
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"inputs", "label", "index"}
    assert batch["inputs"]["visual"].shape == (3, 3, 32, 32) and batch["inputs"]["visual"].dtype == torch.float32
    text = batch["inputs"]["text"]
    assert text.shape == (3, 8) and text.dtype == torch.long and ((text != PAD_ID).int().diff(dim=1) <= 0).all()
    items = read_items(cache)
    assert batch["label"].tolist() == [CLASSES.index(items[i]["label"]) for i in dm.split_items["test"]]
    assert torch.equal(batch["index"], torch.arange(3))
    train_texts = [" ".join(tokenize(items[i]["text"])[:8]) for i in dm.split_items["train"]]
    assert dm.vocab == Vocabulary.build(train_texts)
    assert dm.encoder_kwargs == {"text": {"vocab_size": len(dm.vocab)}}
    for name in ("train", "val", "test"):
        for sample in dm.split_items[name]:
            if f"tag{sample}" in tokenize(items[sample]["text"])[:8]:  # a word of this pair's tweet only
                assert (f"tag{sample}" in dm.vocab) == (name == "train")


def test_split_files_in_mmbt_jsonl_and_mla_txt(cache, tmp_path):
    items = read_items(cache)
    parts = {"train": GOOD[:20], "dev": GOOD[20:25], "test": GOOD[25:] + ["40"]}  # 40 failed: skipped
    for name, samples in parts.items():
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for sample in samples:
                label = items[sample]["label"] if sample in items else "positive"
                f.write(json.dumps({"id": sample, "label": label, "text": "...", "img": f"data/{sample}.jpg"}) + "\n")
        (tmp_path / f"my_{name}_mvsa.txt").write_text(
            "".join(f"{s}.jpg {items[s]['label'] if s in items else 'positive'}\n" for s in samples))
    assert read_split_file(tmp_path / "dev.jsonl") == read_split_file(tmp_path / "my_dev_mvsa.txt")
    assert read_split_file(tmp_path / "dev.jsonl")[0] == (GOOD[20], items[GOOD[20]]["label"])
    mmbt = MVSADataModule(root=str(cache), max_length=12, split_files={
        name: str(tmp_path / f"{name}.jsonl") for name in parts})
    mmbt.setup()
    assert mmbt.split == "files"
    assert (mmbt.split_items["train"], mmbt.split_items["val"], mmbt.split_items["test"]) == (
        GOOD[:20], GOOD[20:25], GOOD[25:])
    mla = MVSADataModule(root=str(cache), max_length=12, val_fraction=0.2, split_files=[
        str(tmp_path / "my_train_mvsa.txt"), str(tmp_path / "my_test_mvsa.txt")])
    mla.setup()
    assert mla.split_items["test"] == GOOD[25:] and len(mla.split_items["val"]) == 4
    assert sorted(mla.split_items["train"] + mla.split_items["val"], key=int) == GOOD[:20]


DATA = ["data=mvsa", "model=mvsa", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
        "data.max_length=12"]


def test_one_training_run_end_to_end(cache, tmp_path):
    small = ["~model.encoders", small_encoder("visual", 3),
             "+model.encoders.text={_target_:balance.models.TextEncoder,vocab_size:???,embed_dim:16,out_dim:16,"
             "max_length:12}"]
    results = train_briefly([*DATA, f"data.root={cache}", *small], tmp_path)
    assert {"acc", "acc_visual", "acc_text"} <= set(results["test"])


def test_model_config_takes_a_batch(cache):
    """The shipped model config: ResNet18 on the image, the text encoder sized by the training vocabulary."""
    datamodule, method, logits = model_logits_on_a_batch([*DATA, f"data.root={cache}"])
    assert method.model.encoders["text"].embedding.num_embeddings == len(datamodule.vocab)
    assert logits.shape == (3, 3)
