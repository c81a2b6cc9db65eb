"""Tests of the word vocabulary (`datamodules.text`) and the easy-VQA datamodule, configs and a short training."""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import easy_vqa
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from balance.run import build_model_config, train
from datamodules.easy_vqa import EasyVQADataModule, default_root
from datamodules.text import PAD_ID, UNK_ID, Vocabulary, tokenize

CONF = str(Path(__file__).resolve().parents[1] / "conf")
PACKAGE_TRAIN_QUESTIONS = 38_575
PACKAGE_TEST_QUESTIONS = 9_673


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=["data=easy_vqa", "model=easy_vqa", *overrides])


@pytest.fixture(scope="module")
def dm() -> EasyVQADataModule:
    datamodule = EasyVQADataModule(batch_size=32, seed=0)
    datamodule.setup()
    return datamodule


# ---------------------------------------------------------------- vocabulary


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("Is there a RED shape?") == ["is", "there", "a", "red", "shape", "?"]
    assert tokenize("don't, stop!") == ["don't", ",", "stop", "!"]
    assert tokenize("  ") == []


def test_vocabulary_ids_are_by_count_then_alphabetical():
    vocab = Vocabulary.build(["b a c", "a b", "a d", "c"])
    # counts: a 3, b 2, c 2, d 1 -> b before c alphabetically
    assert vocab.itos == ["<pad>", "<unk>", "a", "b", "c", "d"]
    assert len(vocab) == 6
    assert [vocab.stoi[t] for t in "abcd"] == [2, 3, 4, 5]
    assert Vocabulary.build(["c", "a b", "a d", "b a c"]) == vocab  # order of texts does not matter


def test_vocabulary_min_count_sends_rare_words_to_unknown():
    vocab = Vocabulary.build(["a a b", "a c c"], min_count=2)
    assert vocab.itos[2:] == ["a", "c"]
    assert vocab.encode("b a zebra", 4).tolist() == [UNK_ID, 2, UNK_ID, PAD_ID]


def test_encode_pads_truncates_and_marks_unknown():
    vocab = Vocabulary.build(["what color is the shape ?"])
    ids = vocab.encode("What color is the zebra?", 8)
    assert ids.dtype == torch.long and ids.shape == (8,)
    assert ids.tolist()[:5] == [vocab.stoi["what"], vocab.stoi["color"], vocab.stoi["is"], vocab.stoi["the"], UNK_ID]
    assert ids.tolist()[5] == vocab.stoi["?"]
    assert ids.tolist()[6:] == [PAD_ID, PAD_ID]
    assert vocab.encode("what color is the shape ?", 3).tolist() == [vocab.stoi[t] for t in ("what", "color", "is")]
    assert vocab.encode("", 3).tolist() == [PAD_ID] * 3
    assert vocab.decode(vocab.encode("what shape", 5)) == ["what", "shape"]
    batch = vocab.encode_batch(["what", "color shape"], 4)
    assert batch.shape == (2, 4) and batch.dtype == torch.long
    with pytest.raises(ValueError):
        vocab.encode("what", 0)


def test_vocabulary_round_trips_through_json(tmp_path):
    vocab = Vocabulary.build(["is there a red shape ?", "what color is it ?"])
    again = Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again == vocab and again.stoi == vocab.stoi
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab


def test_vocabulary_rejects_duplicates_and_bad_min_count():
    with pytest.raises(ValueError):
        Vocabulary(["a", "a"])
    with pytest.raises(ValueError):
        Vocabulary(["<pad>"])
    with pytest.raises(ValueError):
        Vocabulary.build(["a"], min_count=0)


# ---------------------------------------------------------------- datamodule on the package's data


def test_split_sizes_match_the_package(dm):
    train_texts, _, _ = easy_vqa.get_train_questions()
    test_texts, _, _ = easy_vqa.get_test_questions()
    assert len(train_texts) == PACKAGE_TRAIN_QUESTIONS and len(test_texts) == PACKAGE_TEST_QUESTIONS
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == PACKAGE_TRAIN_QUESTIONS
    assert len(dm.datasets["test"]) == PACKAGE_TEST_QUESTIONS
    val_images = np.unique(dm.datasets["val"].dataset.image_ids)
    assert len(val_images) == 400  # 10% of the 4,000 training images
    assert 0.07 < len(dm.datasets["val"]) / PACKAGE_TRAIN_QUESTIONS < 0.13


def test_no_image_in_both_train_and_val(dm):
    train_images = set(dm.datasets["train"].dataset.image_ids.tolist())
    val_images = set(dm.datasets["val"].dataset.image_ids.tolist())
    assert not train_images & val_images
    assert len(train_images | val_images) == len(easy_vqa.get_train_image_paths()) == 4000


def test_split_is_seeded(dm):
    ids = np.array(easy_vqa.get_train_questions()[2])
    train0, val0 = EasyVQADataModule(seed=0).split_images(ids)
    again_train, again_val = EasyVQADataModule(seed=0).split_images(ids)
    _, val1 = EasyVQADataModule(seed=1).split_images(ids)
    assert np.array_equal(val0, again_val) and np.array_equal(train0, again_train)
    assert not np.array_equal(val0, val1) and len(val0) == len(val1)
    # the datamodule really uses this split
    assert np.array_equal(np.unique(dm.datasets["val"].dataset.image_ids), val0)


def test_labels_are_answer_indices(dm):
    answers = easy_vqa.get_answers()
    assert dm.answers == answers and dm.num_classes == len(answers) == 13
    texts, test_answers, image_ids = easy_vqa.get_test_questions()
    test = dm.datasets["test"].dataset
    assert test.texts == texts and test.image_ids.tolist() == image_ids
    assert [answers[y] for y in test.labels.tolist()] == test_answers
    for split in ("train", "val", "test"):
        labels = dm.datasets[split].dataset.labels
        assert labels.min() >= 0 and labels.max() < 13


def test_items_hold_the_right_image(dm):
    from PIL import Image

    test = dm.datasets["test"]
    for index in (0, 1234, len(test) - 1):
        item = test[index]
        path = easy_vqa.get_test_image_paths()[int(test.dataset.image_ids[index])]
        expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()
        assert torch.allclose(item["inputs"]["visual"], expected / 127.5 - 1.0)


def test_batch_contract(dm):
    batch = next(iter(dm.val_dataloader()))
    b = batch["label"].shape[0]
    assert b == 32
    assert list(batch["inputs"]) == ["visual", "text"] == dm.modalities
    visual, text = batch["inputs"]["visual"], batch["inputs"]["text"]
    assert visual.shape == (b, 3, 64, 64) and visual.dtype == torch.float32
    assert -1.0 <= visual.min() and visual.max() <= 1.0 and visual.std() > 0.1
    assert text.shape == (b, 16) and text.dtype == torch.long
    assert (text[:, 0] != PAD_ID).all() and (text[:, -1] == PAD_ID).all()  # questions are < 16 tokens
    assert batch["label"].dtype == torch.long
    assert torch.equal(batch["index"], torch.arange(b))  # evaluation order: index == position in the split
    assert "present" not in batch

    train_batch = next(iter(dm.train_dataloader()))
    train = dm.datasets["train"]
    for i, index in enumerate(train_batch["index"].tolist()[:4]):
        item = train[index]
        assert item["index"] == index and item["label"] == train_batch["label"][i]
        assert torch.equal(item["inputs"]["text"], train_batch["inputs"]["text"][i])


def test_vocabulary_is_built_from_the_training_part_only(dm):
    assert dm.vocab == Vocabulary.build(dm.datasets["train"].dataset.texts, min_count=1)
    assert dm.encoder_kwargs == {"text": {"vocab_size": len(dm.vocab)}}
    # every token id in the data is inside the vocabulary
    for split in ("train", "val", "test"):
        assert int(dm.datasets[split].dataset.tokens.max()) < len(dm.vocab)


def test_model_config_gets_the_vocabulary_size(dm):
    cfg = compose_cfg()
    model_cfg = build_model_config(cfg, dm)
    assert model_cfg.num_classes == 13
    assert model_cfg.encoders.text.vocab_size == len(dm.vocab)
    model = instantiate(model_cfg)
    batch = next(iter(dm.val_dataloader()))
    assert model.fuse(model.encode(batch["inputs"])).shape == (32, 13)


# ---------------------------------------------------------------- datamodule on tiny files in the package's layout


def write_tiny_root(root: Path, num_images: int = 10) -> None:
    """Ten training and two test images (copied from the package) with one question each using a word unique to
    that image, e.g. ``"is there a word3 shape?"``."""
    source = default_root()
    shutil.copy(source / "answers.txt", root / "answers.txt")
    for part, count in (("train", num_images), ("test", 2)):
        (root / part / "images").mkdir(parents=True)
        rows = []
        for i in range(count):
            shutil.copy(source / part / "images" / f"{i}.png", root / part / "images" / f"{i}.png")
            rows += [[f"is there a {part}word{i} shape?", "yes", i], ["what shape is it?", "circle", i]]
        (root / part / "questions.json").write_text(json.dumps(rows))


def test_unseen_words_of_val_and_test_map_to_unknown(tmp_path):
    write_tiny_root(tmp_path)
    dm = EasyVQADataModule(root=str(tmp_path), val_fraction=0.3, batch_size=4, seed=3)
    dm.setup()
    train_ids, val_ids = dm.split_images(np.arange(10))
    assert len(val_ids) == 3 and len(dm.datasets["train"]) == 14 and len(dm.datasets["val"]) == 6
    for i in train_ids:
        assert f"trainword{i}" in dm.vocab
    for i in val_ids:
        assert f"trainword{i}" not in dm.vocab
    assert "testword0" not in dm.vocab
    for split in ("val", "test"):
        data = dm.datasets[split].dataset
        unique_word_rows = [k for k, t in enumerate(data.texts) if "word" in t]
        assert unique_word_rows
        for k in unique_word_rows:
            assert data.tokens[k, 3] == UNK_ID  # "is there a <word> shape ?"
    assert len(dm.vocab) == 2 + len({"is", "there", "a", "shape", "?", "what", "it"}) + len(train_ids)


def test_missing_data_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="questions.json"):
        EasyVQADataModule(root=str(tmp_path)).setup()


def test_missing_modalities_zero_the_question(tmp_path):
    write_tiny_root(tmp_path)
    dm = EasyVQADataModule(root=str(tmp_path), val_fraction=0.3, batch_size=14, seed=0, missing_rate=0.5)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    present = batch["present"]
    assert present.any(dim=1).all() and not present.all()
    text_dropped = ~present[:, 1]
    assert (batch["inputs"]["text"][text_dropped] == PAD_ID).all()


# ---------------------------------------------------------------- training


def test_train_py_writes_results(tmp_path):
    cfg = compose_cfg(
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=5",
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2",
        "++trainer.enable_progress_bar=false",
        f"run_dir={tmp_path}",
    )
    train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("acc", "acc_visual", "acc_text", "f1"):
        assert 0.0 <= results["test"][key] <= 1.0


def test_a_short_training_beats_the_majority_class_and_text_alone(dm):
    """200 Adam steps of the easy_vqa model: fused validation accuracy well above the majority answer and above
    the best any text-only predictor can do (the most frequent training answer of each question text), so the
    model must use the image."""
    torch.manual_seed(0)
    model = instantiate(build_model_config(compose_cfg(), dm))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(dm.datasets["train"], batch_size=64, shuffle=True, generator=generator)
    losses = []
    for step, batch in enumerate(loader):
        loss = torch.nn.functional.cross_entropy(model.fuse(model.encode(batch["inputs"])), batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step + 1 == 200:
            break
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])

    val = dm.datasets["val"]
    rows = torch.arange(0, len(val), 2)  # half of the validation questions, to keep the test fast
    model.eval()
    with torch.no_grad():
        batch = torch.utils.data.default_collate([val[int(i)] for i in rows])
        accuracy = (model.fuse(model.encode(batch["inputs"])).argmax(1) == batch["label"]).float().mean().item()

    labels = batch["label"].tolist()
    majority = Counter(labels).most_common(1)[0][1] / len(labels)
    answers_of = defaultdict(Counter)
    for text, label in zip(dm.datasets["train"].dataset.texts, dm.datasets["train"].dataset.labels.tolist()):
        answers_of[text][label] += 1
    text_only = np.mean([answers_of[val.dataset.texts[int(i)]].most_common(1)[0][0] == y for i, y in zip(rows, labels)])
    print(f"accuracy {accuracy:.3f}, majority {majority:.3f}, best text-only {text_only:.3f}")
    assert accuracy > majority + 0.25
    assert accuracy > text_only + 0.03
