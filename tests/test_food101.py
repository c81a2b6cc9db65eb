"""UPMC Food-101: preparation from tiny files in the raw layout (images/{train,test}/<class>/*.jpg,
texts/{train,test}_titles.csv), its report of missing counterparts and corrupt images, resumability, the cache,
the official split with a carved validation split, split files, the training-only vocabulary, the batch contract,
the error for a missing root, and one training run end to end."""

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compose import model_logits_on_a_batch, small_encoder, train_briefly
from raw_media import write_jpg
from datamodules.food101 import Food101DataModule
from datamodules.image_text_raw import read_split_file
from datamodules.prepare import main as balance_prepare
from datamodules.text import PAD_ID, UNK_ID, Vocabulary, tokenize

CLASSES = ("apple_pie", "baklava", "waffles")
TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 2
LONG = " ".join(f"w{k}" for k in range(30))  # 30 tokens: truncated to --max-length 16


def title(stem: str, part: str) -> str:
    """A text with a word unique to the image (its stem) and, in test, a word seen only there."""
    extra = " testonly" if part == "test" else ""
    return f"Best {stem.split('_')[0]} recipe {stem}{extra}"


def good_items(part: str) -> list[str]:
    count = TRAIN_PER_CLASS if part == "train" else TEST_PER_CLASS
    offset = 0 if part == "train" else 100  # UPMC numbers images per class across both parts
    return [f"{c}_{offset + k}" for c in CLASSES for k in range(count)]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("UPMC_Food101")
    rows = {"train": [], "test": []}
    for part in ("train", "test"):
        for stem in good_items(part):
            label = stem.rsplit("_", 1)[0]
            write_jpg(root / "images" / part / label / f"{stem}.jpg", (80 * CLASSES.index(label), 120, 60),
                      seed=len(rows[part]))
            rows[part].append([f"{stem}.jpg", title(stem, part), label])
    # Quoting and cleaning: a quoted comma, an HTML entity, a URL, UTF-8 accents, a long text.
    rows["train"][0][1] = "Apple pie, the classic &amp; best http://example.com/pie crème brûlée"
    rows["train"][1][1] = LONG
    # Broken on purpose: a truncated JPEG (with its row), an image without a row, a row without an image.
    write_jpg(root / "images" / "train" / "baklava" / "baklava_99.jpg", (0, 0, 0), seed=99)
    data = (root / "images" / "train" / "baklava" / "baklava_99.jpg").read_bytes()
    (root / "images" / "train" / "baklava" / "baklava_99.jpg").write_bytes(data[: len(data) // 3])
    rows["train"].append(["baklava_99.jpg", "Baklava", "baklava"])
    write_jpg(root / "images" / "train" / "waffles" / "waffles_98.jpg", (0, 0, 0), seed=98)
    rows["train"].append(["apple_pie_97.jpg", "Lost pie", "apple_pie"])
    (root / "texts").mkdir()
    with open(root / "texts" / "train_titles.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows["train"])  # the real files have no header
    # An unquoted comma in a text, and a header row, are tolerated.
    lines = ["image_path,text,food"] + [f"{image},{text},{label}" for image, text, label in rows["test"]]
    lines[1] = "apple_pie_100.jpg,Apple pie, warm testonly,apple_pie"
    (root / "texts" / "test_titles.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def cache(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("food101_cache")
    balance_prepare(["food101", "--raw", str(raw), "--out", str(out), "--workers", "1", "--short-side", "48",
                     "--max-length", "16"])
    return out


def read_items(cache: Path) -> list[dict[str, str]]:
    with open(cache / "items.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_prepare_writes_the_cache_and_reports_bad_pairs(cache):
    report = (cache / "prepare_report.txt").read_text()
    assert report.startswith("balance-prepare food101: 24 ok, 0 skipped (already done), 3 failed")
    assert "images without text: 1" in report and "texts without image: 1" in report
    assert "images that could not be converted: 1" in report
    failures = dict(line.split("\t") for line in report.splitlines() if line.startswith("images/"))
    assert set(failures) == {"images/train/baklava/baklava_99.jpg", "images/train/waffles/waffles_98.jpg",
                             "images/train/apple_pie/apple_pie_97.jpg"}
    assert failures["images/train/baklava/baklava_99.jpg"].startswith("unreadable image (OSError")
    no_row = "no text: no row for waffles_98.jpg in texts/train_titles.csv"
    assert failures["images/train/waffles/waffles_98.jpg"] == no_row
    assert failures["images/train/apple_pie/apple_pie_97.jpg"].startswith("no image: no such file")

    meta = json.loads((cache / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["num_items"] == 24 and meta["num_failed"] == 3
    assert meta["class_counts"] == {c: 8 for c in CLASSES}
    rows = read_items(cache)
    assert [r["item"] for r in rows] == good_items("train") + good_items("test")
    assert [r["part"] for r in rows] == ["train"] * 18 + ["test"] * 6
    assert all(r["label"] == r["item"].rsplit("_", 1)[0] for r in rows)
    texts = {r["item"]: r["text"] for r in rows}
    assert texts["apple_pie_0"] == "Apple pie, the classic & best crème brûlée"
    assert texts["apple_pie_100"] == "Apple pie, warm testonly"

    tokens, lengths = np.load(cache / "tokens.npy"), np.load(cache / "lengths.npy")
    assert tokens.shape == (24, 16) and tokens.dtype == np.int32 and lengths.dtype == np.int32
    words = Vocabulary.load(cache / "words.json")
    for row, r in enumerate(rows):
        expected = tokenize(r["text"])
        assert lengths[row] == len(expected) and words.decode(tokens[row]) == expected[:16]
    assert lengths[1] == 30 and (tokens[1] != PAD_ID).all()  # the long text, truncated
    with Image.open(cache / "images" / "apple_pie_0.jpg") as image:
        assert image.size == (48, 48) and image.mode == "RGB"
    assert sorted(p.stem for p in (cache / "images").iterdir()) == sorted(texts)


def test_prepare_resumes_and_redoes_only_what_is_missing(raw, cache, capsys):
    args = ["food101", "--raw", str(raw), "--out", str(cache), "--workers", "1", "--short-side", "48",
            "--max-length", "16"]
    balance_prepare(args)
    assert "0 ok, 24 skipped (already done), 3 failed; 24 usable" in capsys.readouterr().out
    (cache / "images" / "waffles_3.jpg").unlink()
    balance_prepare(args)
    assert "1 ok, 23 skipped (already done), 3 failed; 24 usable" in capsys.readouterr().out
    assert (cache / "images" / "waffles_3.jpg").is_file()
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare([*args[:-4], "--short-side", "64", "--max-length", "16"])
    assert exit_info.value.code == 2


def test_prepare_exits_nonzero_when_nothing_is_usable(tmp_path):
    raw = tmp_path / "raw"
    for part in ("train", "test"):
        (raw / "images" / part / "pho").mkdir(parents=True)
    (raw / "images" / "train" / "pho" / "pho_0.jpg").write_bytes(b"not a jpeg")
    (raw / "texts").mkdir()
    (raw / "texts" / "train_titles.csv").write_text("pho_0.jpg,Pho,pho\n")
    (raw / "texts" / "test_titles.csv").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare(["food101", "--raw", str(raw), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert exit_info.value.code == 1
    assert "0 ok, 0 skipped (already done), 1 failed" in (tmp_path / "out" / "prepare_report.txt").read_text()
    assert not (tmp_path / "out" / "meta.json").exists()


def test_prepare_names_the_raw_layout(tmp_path, capsys):
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare(["food101", "--raw", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "has no images/test, texts/train_titles.csv, texts/test_titles.csv" in err
    assert "texts/train_titles.csv" in err and "images/train/<class>/<file>.jpg" in err
    assert "visiir.isir.upmc.fr" in err and "kaggle.com/datasets/gianmarco96/upmcfood101" in err


def test_missing_or_incomplete_root_names_layout_command_and_source(tmp_path, raw):
    for root in (tmp_path / "nowhere", raw):
        with pytest.raises(FileNotFoundError) as error:
            Food101DataModule(root=str(root)).setup()
        message = str(error.value)
        assert "balance-prepare food101 --raw RAW --out OUT" in message
        assert "images/train/<class>/<file>.jpg" in message and "texts/train_titles.csv" in message
        assert "visiir.isir.upmc.fr" in message and "gianmarco96/upmcfood101" in message
    assert "looks like the raw download" in message


def test_official_split_with_a_stratified_seeded_validation(cache):
    def parts(seed):
        dm = Food101DataModule(root=str(cache), val_fraction=1 / 3, max_length=16, seed=seed)
        dm.setup()
        return dm.split_items

    first = parts(0)
    assert first == parts(0) and first != parts(1)
    assert sorted(first["test"]) == sorted(good_items("test"))
    assert sorted(first["train"] + first["val"]) == sorted(good_items("train"))
    for name, count in (("train", 4), ("val", 2)):
        assert sorted(item.rsplit("_", 1)[0] for item in first[name]) == sorted(CLASSES * count)


def test_batch_contract(cache):
    dm = Food101DataModule(root=str(cache), val_fraction=1 / 3, max_length=12, image_size=32, batch_size=4)
    dm.setup("fit")
    assert dm.modalities == ["visual", "text"] and dm.num_classes == 3 and dm.classes == list(CLASSES)
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"inputs", "label", "index"}
    visual, text = batch["inputs"]["visual"], batch["inputs"]["text"]
    assert visual.shape == (4, 3, 32, 32) and visual.dtype == torch.float32
    assert text.shape == (4, 12) and text.dtype == torch.long
    texts = {r["item"]: r["text"] for r in read_items(cache)}
    lengths = [min(12, len(tokenize(texts[i]))) for i in dm.split_items["val"][:4]]
    assert (text != PAD_ID).sum(1).tolist() == lengths and ((text != PAD_ID).int().diff(dim=1) <= 0).all()
    assert batch["label"].tolist() == [CLASSES.index(i.rsplit("_", 1)[0]) for i in dm.split_items["val"][:4]]
    assert torch.equal(batch["index"], torch.arange(4))
    # Evaluation is deterministic; training images are augmented; the evaluation view of train is not.
    view = dm.evaluation_view("train")
    assert torch.equal(view[0]["inputs"]["visual"], view[0]["inputs"]["visual"]) and view[0]["index"] == 0
    assert next(iter(dm.train_dataloader()))["inputs"]["visual"].shape == (4, 3, 32, 32)
    dropped = Food101DataModule(root=str(cache), max_length=12, image_size=32, batch_size=24, missing_rate=0.5)
    dropped.setup()
    batch = next(iter(dropped.test_dataloader()))
    assert (batch["inputs"]["text"][~batch["present"][:, 1]] == PAD_ID).all()
    with pytest.raises(ValueError, match="exceeds the 16 tokens"):
        Food101DataModule(root=str(cache), max_length=32).setup()


def test_vocabulary_is_built_on_the_training_split_only(cache):
    texts = {r["item"]: r["text"] for r in read_items(cache)}
    for min_count in (1, 2):
        dm = Food101DataModule(root=str(cache), val_fraction=1 / 3, max_length=16, min_count=min_count)
        dm.setup()
        train_texts = [" ".join(tokenize(texts[i])[:16]) for i in dm.split_items["train"]]
        assert dm.vocab == Vocabulary.build(train_texts, min_count=min_count)
        assert dm.encoder_kwargs == {"text": {"vocab_size": len(dm.vocab)}}
        assert "testonly" not in dm.vocab and "recipe" in dm.vocab
        for item in dm.split_items["val"] + dm.split_items["test"]:
            assert item not in dm.vocab
        for item in dm.split_items["train"]:
            if item in tokenize(texts[item]):  # seen once in training: kept with min_count 1 only
                assert (item in dm.vocab) == (min_count == 1)
    test = dm.datasets["test"].dataset
    row = dm.split_items["test"].index("apple_pie_101")  # "best apple recipe apple_pie_101 testonly"
    assert test.tokens[row, 3].item() == UNK_ID and test.tokens[row, 4].item() == UNK_ID
    assert test.tokens[row, 0].item() == dm.vocab.stoi["best"]


def test_split_files_in_mmbt_jsonl_and_mla_txt(cache, tmp_path, caplog):
    official = {part: good_items(part) for part in ("train", "test")}
    # MLA's txt lists image names and classes; it lists a pair whose image failed (skipped with a warning).
    for part in ("train", "test"):
        lines = [f"{i}.jpg {i.rsplit('_', 1)[0]}" for i in official[part]]
        (tmp_path / f"my_{part}_food.txt").write_text("\n".join(lines + ["baklava_99.jpg baklava"] * (part == "test")))
    # MMBT's jsonl, with a dev file: validation is the dev file.
    dev = [i for i in official["train"] if i.endswith("_5")]
    for name, items in (("train", [i for i in official["train"] if i not in dev]), ("dev", dev),
                        ("test", official["test"])):
        rows = [json.dumps({"id": i, "label": i.rsplit("_", 1)[0], "text": "...",
                            "img": f"images/{'test' if name == 'test' else 'train'}/{i.rsplit('_', 1)[0]}/{i}.jpg"})
                for i in items]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    assert read_split_file(tmp_path / "dev.jsonl") == [(i, i.rsplit("_", 1)[0]) for i in dev]
    assert read_split_file(tmp_path / "my_train_food.txt")[0] == ("apple_pie_0", "apple_pie")

    with caplog.at_level(logging.WARNING):
        mla = Food101DataModule(root=str(cache), max_length=16, val_fraction=1 / 3,
                                split_files=[str(tmp_path / "my_train_food.txt"), str(tmp_path / "my_test_food.txt")])
        mla.setup()
    assert "1 items of" in caplog.text and "not in the cache" in caplog.text
    assert mla.split == "files" and sorted(mla.split_items["test"]) == sorted(official["test"])
    assert len(mla.split_items["val"]) == 6 and sorted(mla.split_items["train"] + mla.split_items["val"]) == sorted(
        official["train"])
    mmbt = Food101DataModule(root=str(cache), max_length=16, split_files={
        name: str(tmp_path / f"{name}.jsonl") for name in ("train", "dev", "test")})
    mmbt.setup()
    assert mmbt.split_items["val"] == dev and len(mmbt.split_items["train"]) == 15
    with pytest.raises(ValueError, match="repeats"):
        Food101DataModule(root=str(cache), max_length=16, split_files={
            "train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "train.jsonl")}).setup()


DATA = ["data=food101", "model=food101", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
        "data.max_length=16", "data.val_fraction=0.34"]


def test_model_config_takes_a_batch(cache):
    """The shipped model config (ResNet18 on the image, the text encoder with the training vocabulary's size)."""
    datamodule, method, logits = model_logits_on_a_batch([*DATA, f"data.root={cache}"])
    assert method.model.encoders["text"].embedding.num_embeddings == len(datamodule.vocab)
    assert logits.shape == (4, 3)


def test_one_training_run_end_to_end(cache, tmp_path):
    # Small encoders keep this fast; test_model_config_takes_a_batch covers the shipped config.
    small = ["~model.encoders", small_encoder("visual", 3),
             "+model.encoders.text={_target_:balance.models.TextEncoder,vocab_size:???,embed_dim:16,out_dim:16,"
             "max_length:16}"]
    results = train_briefly([*DATA, f"data.root={cache}", *small], tmp_path)
    assert {"acc", "acc_visual", "acc_text"} <= set(results["test"])
