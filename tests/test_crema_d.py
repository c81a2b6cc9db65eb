"""CREMA-D: preparation from tiny clips in the raw layout (AudioWAV/*.wav, VideoFlash/*.flv), its report of
corrupt and missing files, resumability, the cache, splits (ours and the community's split files), the batch
contract, the error for a missing root, and one training run end to end."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compose import model_logits_on_a_batch, small_encoder, train_briefly
from raw_media import write_flv, write_wav
from datamodules.crema_d import CLASSES, CremaDDataModule, parse_clip, read_split_file
from datamodules.prepare import main as balance_prepare

ACTORS = (1001, 1002, 1003, 1004)
SENTENCES = ("DFA", "IEO", "IOM", "ITH", "ITS", "IWL", "IWW", "MTI", "TAI", "TIE", "TSI", "WSI")
WORDS = {"NEU": "Neutral", "HAP": "Happy", "SAD": "Sad", "FEA": "Fear", "DIS": "Disgust", "ANG": "Anger"}
GOOD = [f"{a}_{SENTENCES[(a + e) % 12]}_{emotion}_XX" for a in ACTORS for e, emotion in enumerate(CLASSES)]
# Broken on purpose: corrupt wav, corrupt flv, flv missing, wav a Git LFS pointer.
BAD = {"1005_DFA_ANG_XX": "corrupt wav", "1005_DFA_SAD_XX": "corrupt flv", "1005_DFA_HAP_XX": "no flv",
       "1005_IEO_NEU_LO": "lfs pointer"}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("CREMA-D")
    (root / "AudioWAV").mkdir()
    (root / "VideoFlash").mkdir()
    for i, clip in enumerate(GOOD):
        label = CLASSES.index(parse_clip(clip)[1])
        seconds = 1.6 + 0.1 * (i % 7)  # 2 or 3 frames at 1 fps
        write_wav(root / "AudioWAV" / f"{clip}.wav", seconds, freq=200 + 150 * label)
        write_flv(root / "VideoFlash" / f"{clip}.flv", seconds, colour=(40 * label, 255 - 40 * label, 128))
    (root / "AudioWAV" / "1005_DFA_ANG_XX.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + bytes(range(40)))
    write_flv(root / "VideoFlash" / "1005_DFA_ANG_XX.flv", 2.0, (0, 0, 0))
    write_wav(root / "AudioWAV" / "1005_DFA_SAD_XX.wav", 2.0, 300)
    (root / "VideoFlash" / "1005_DFA_SAD_XX.flv").write_bytes(b"FLV\x01\x05" + b"\x00garbage" * 200)
    write_wav(root / "AudioWAV" / "1005_DFA_HAP_XX.wav", 2.0, 300)
    (root / "AudioWAV" / "1005_IEO_NEU_LO.wav").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 12345\n")
    write_flv(root / "VideoFlash" / "1005_IEO_NEU_LO.flv", 2.0, (0, 0, 0))
    return root


@pytest.fixture(scope="module")
def cache(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crema_d_cache")
    balance_prepare(["crema_d", "--raw", str(raw), "--out", str(out), "--workers", "2"])
    return out


def test_prepare_writes_the_cache_and_reports_bad_files(cache):
    report = (cache / "prepare_report.txt").read_text()
    assert report.startswith("balance-prepare crema_d: 24 ok, 0 skipped (already done), 4 failed")
    failures = dict(line.split("\t") for line in report.splitlines() if line.startswith("1005_"))
    assert set(failures) == set(BAD)
    assert "audio: AudioWAV/1005_DFA_ANG_XX.wav: unreadable audio" in failures["1005_DFA_ANG_XX"]
    assert "video: VideoFlash/1005_DFA_SAD_XX.flv: unreadable video" in failures["1005_DFA_SAD_XX"]
    assert "VideoFlash/1005_DFA_HAP_XX.flv: no such file" in failures["1005_DFA_HAP_XX"]
    assert "Git LFS pointer" in failures["1005_IEO_NEU_LO"]

    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_clips"] == 24 and meta["num_failed"] == 4 and meta["audio_shape"] == [257, 188]
    rows = (cache / "clips.csv").read_text().splitlines()
    assert rows[0] == "clip,actor,label,frames" and sorted(r.split(",")[0] for r in rows[1:]) == sorted(GOOD)
    for row in rows[1:]:
        clip, actor, label, frames = row.split(",")
        assert (int(actor), label) == parse_clip(clip)
        jpgs = sorted(p.name for p in (cache / "visual" / clip).iterdir())
        assert jpgs == [f"{k:05d}.jpg" for k in range(int(frames))] and int(frames) in (2, 3)
        spectrogram = np.load(cache / "audio" / f"{clip}.npy")
        assert spectrogram.shape == (257, 188) and spectrogram.dtype == np.float16
        assert np.isfinite(spectrogram).all()
    # The tone of class k (200 + 150 k Hz at 22,050 Hz, n_fft 512) peaks in its frequency bin.
    clip = GOOD[5]
    peak = np.load(cache / "audio" / f"{clip}.npy").astype(np.float32).mean(1).argmax()
    assert abs(peak - (200 + 150 * CLASSES.index(parse_clip(clip)[1])) * 512 / 22050) <= 1
    from PIL import Image

    with Image.open(cache / "visual" / GOOD[0] / "00000.jpg") as image:
        assert min(image.size) == 224
    assert not list(cache.rglob(".*tmp-*"))


def test_prepare_resumes_and_redoes_only_what_is_missing(raw, cache, capsys):
    balance_prepare(["crema_d", "--raw", str(raw), "--out", str(cache), "--workers", "1"])
    assert "0 ok, 24 skipped (already done), 4 failed; 24 usable" in capsys.readouterr().out
    (cache / "audio" / f"{GOOD[3]}.npy").unlink()
    shutil.rmtree(cache / "visual" / GOOD[4])
    balance_prepare(["crema_d", "--raw", str(raw), "--out", str(cache), "--workers", "1"])
    assert "2 ok, 22 skipped (already done), 4 failed; 24 usable" in capsys.readouterr().out
    assert (cache / "audio" / f"{GOOD[3]}.npy").is_file() and (cache / "visual" / GOOD[4] / "00000.jpg").is_file()


def test_prepare_refuses_other_parameters_in_the_same_cache(raw, cache):
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare(["crema_d", "--raw", str(raw), "--out", str(cache), "--fps", "2"])
    assert exit_info.value.code == 2


def test_prepare_exits_nonzero_when_nothing_is_usable(tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "AudioWAV").mkdir(parents=True)
    (raw / "VideoFlash").mkdir()
    (raw / "AudioWAV" / "1001_DFA_ANG_XX.wav").write_bytes(b"not a wav file at all")
    (raw / "VideoFlash" / "1001_DFA_ANG_XX.flv").write_bytes(b"")
    (raw / "AudioWAV" / "notes.wav").write_bytes(b"x")
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare(["crema_d", "--raw", str(raw), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert exit_info.value.code == 1
    report = (tmp_path / "out" / "prepare_report.txt").read_text()
    assert "0 ok, 0 skipped (already done), 2 failed" in report and "empty file" in report
    assert "'notes' is not a CREMA-D clip id" in report
    assert not (tmp_path / "out" / "meta.json").exists()


def test_prepare_names_the_raw_layout(tmp_path, capsys):
    (tmp_path / "AudioWAV").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare(["crema_d", "--raw", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "no VideoFlash/" in err and "VideoFlash/<clip>.flv" in err and "CheyneyComputerScience/CREMA-D" in err


def test_missing_or_incomplete_root_names_layout_command_and_source(tmp_path, raw):
    for root in (tmp_path / "nowhere", raw):
        with pytest.raises(FileNotFoundError) as error:
            CremaDDataModule(root=str(root)).setup()
        message = str(error.value)
        assert "balance-prepare crema_d --raw RAW --out OUT" in message
        assert "AudioWAV/<clip>.wav" in message and "VideoFlash/<clip>.flv" in message
        assert "github.com/CheyneyComputerScience/CREMA-D" in message and "Git LFS" in message
    assert "looks like the raw download" in message


def test_batch_contract(cache):
    dm = CremaDDataModule(root=str(cache), val_fraction=0.25, test_fraction=0.25, image_size=64, batch_size=4)
    dm.setup("fit")
    assert dm.modalities == ["audio", "visual"] and dm.num_classes == 6
    assert {k: len(v) for k, v in dm.split_clips.items()} == {"train": 12, "val": 6, "test": 6}
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"inputs", "label", "index"}
    assert batch["inputs"]["audio"].shape == (4, 1, 257, 188) and batch["inputs"]["audio"].dtype == torch.float32
    assert batch["inputs"]["visual"].shape == (4, 1, 3, 64, 64) and batch["inputs"]["visual"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and torch.equal(batch["index"], torch.arange(4))
    expected = [CLASSES.index(parse_clip(c)[1]) for c in dm.split_clips["val"][:4]]
    assert batch["label"].tolist() == expected
    # Evaluation is deterministic; training frames are augmented; the evaluation view of train is not.
    assert torch.equal(dm.datasets["val"][0]["inputs"]["visual"], dm.datasets["val"][0]["inputs"]["visual"])
    train_batch = next(iter(dm.train_dataloader()))
    assert train_batch["inputs"]["visual"].shape == (4, 1, 3, 64, 64)
    view = dm.evaluation_view("train")
    assert torch.equal(view[0]["inputs"]["visual"], view[0]["inputs"]["visual"]) and view[0]["index"] == 0
    three = CremaDDataModule(root=str(cache), val_fraction=0.25, test_fraction=0.25, num_frames=3, image_size=32)
    three.setup()
    assert three.datasets["test"][0]["inputs"]["visual"].shape == (3, 3, 32, 32)
    assert three.datasets["train"][0]["inputs"]["visual"].shape == (3, 3, 32, 32)


def test_stratified_split_is_seeded_and_stratified(cache):
    def parts(seed):
        dm = CremaDDataModule(root=str(cache), val_fraction=0.25, test_fraction=0.25, seed=seed)
        dm.setup()
        return dm.split_clips

    first = parts(0)
    assert first == parts(0) and first != parts(1)
    assert sorted(sum(first.values(), [])) == sorted(GOOD)
    for split, clips in first.items():
        counts = np.bincount([CLASSES.index(parse_clip(c)[1]) for c in clips], minlength=6)
        assert (counts == {"train": 2, "val": 1, "test": 1}[split]).all()


@pytest.mark.parametrize("split", ["actor", "random"])
def test_actor_disjoint_and_pooled_random_splits(cache, split):
    dm = CremaDDataModule(root=str(cache), split=split, val_fraction=0.25, test_fraction=0.25)
    dm.setup()
    assert sorted(sum(dm.split_clips.values(), [])) == sorted(GOOD)
    actors = {name: {parse_clip(c)[0] for c in clips} for name, clips in dm.split_clips.items()}
    if split == "actor":
        assert [len(actors[s]) for s in ("train", "val", "test")] == [2, 1, 1]
        assert not (actors["train"] & actors["val"] or actors["train"] & actors["test"] or actors["val"] & actors["test"])
    else:
        assert [len(dm.split_clips[s]) for s in ("train", "val", "test")] == [12, 6, 6]


def _community_files(directory: Path) -> dict[str, dict[str, Path]]:
    """The same split (actor 1004 is the test set) in OGM-GE's csv (BOM, CRLF) and MLA's txt format; both list
    a clip that is not in the cache (its preparation failed)."""
    train = [c for c in GOOD if not c.startswith("1004")]
    test = [c for c in GOOD if c.startswith("1004")] + ["1005_DFA_ANG_XX"]
    files = {}
    for fmt in ("ogm", "mla"):
        files[fmt] = {}
        for name, clips in (("train", train), ("test", test)):
            if fmt == "ogm":
                path = directory / f"{name}.csv"
                text = "".join(f"{c},{parse_clip(c)[1]}\r\n" for c in clips)
                path.write_bytes(b"\xef\xbb\xbf" + text.encode())
            else:
                path = directory / f"my_{name}_cre.txt"
                path.write_text("".join(f"{c}.flv {WORDS[parse_clip(c)[1]]}\n" for c in clips))
            files[fmt][name] = path
    return files


def test_split_files_in_both_community_formats(cache, tmp_path):
    files = _community_files(tmp_path)
    ogm_rows = read_split_file(files["ogm"]["train"])
    assert ogm_rows == read_split_file(files["mla"]["train"])
    assert ogm_rows[0] == (GOOD[0], parse_clip(GOOD[0])[1]) and len(ogm_rows) == 18
    splits = []
    for fmt in ("ogm", "mla"):
        dm = CremaDDataModule(root=str(cache), split_files={k: str(v) for k, v in files[fmt].items()},
                              val_fraction=1 / 3)
        dm.setup()
        assert dm.split == "files"
        assert sorted(dm.split_clips["test"]) == sorted(c for c in GOOD if c.startswith("1004"))
        assert sorted(dm.split_clips["train"] + dm.split_clips["val"]) == sorted(c for c in GOOD if not c.startswith("1004"))
        assert len(dm.split_clips["val"]) == 6  # a third of the training file, one per class
        test = dm.datasets["test"].dataset
        assert test.labels.tolist() == [CLASSES.index(parse_clip(c)[1]) for c in dm.split_clips["test"]]
        splits.append(dm.split_clips)
    assert splits[0] == splits[1]
    bad = tmp_path / "bad.csv"
    bad.write_text("1001_DFA_ANG_XX,SAD\n")
    with pytest.raises(ValueError, match="does not match"):
        read_split_file(bad)


DATA = ["data=crema_d", "model=crema_d", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
        "data.val_fraction=0.25", "data.test_fraction=0.25"]


def test_model_config_takes_a_batch(cache):
    """The shipped model config (ResNet18 audio on [1, 257, 188], ResNet18 visual on [T, 3, S, S]) on a batch."""
    _, _, logits = model_logits_on_a_batch([*DATA, f"data.root={cache}"])
    assert logits.shape == (4, 6)


def test_one_training_run_end_to_end(cache, tmp_path):
    # Small CNN encoders keep this fast; test_model_config_takes_a_batch covers the ResNet18 config.
    small = ["~model.encoders", small_encoder("audio", 1), small_encoder("visual", 3)]
    results = train_briefly([*DATA, f"data.root={cache}", *small], tmp_path)
    assert {"acc", "acc_audio", "acc_visual"} <= set(results["test"])


def test_preparation_pool_reports_failures_and_survives_a_crashing_item(tmp_path, monkeypatch):
    """run_items: an exception is a failure with its reason; an item that kills its worker process (as a decoder
    crash would) is isolated and reported, and every other item is still done."""
    from datamodules.preparation import CRASHED, run_items

    (tmp_path / "crashing_work.py").write_text(
        "import os\n"
        "def work(item):\n"
        "    if item.startswith('crash'):\n"
        "        os._exit(3)\n"
        "    if item.startswith('fail'):\n"
        "        raise ValueError('bad ' + item)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    from crashing_work import work

    items = [f"ok{i}" for i in range(8)] + ["crash1", "fail1"] + [f"ok{i}" for i in range(8, 12)] + ["done1"]
    report = run_items(items, work, is_done=lambda item: item.startswith("done"), workers=2)
    assert sorted(report.ok) == sorted(f"ok{i}" for i in range(12)) and report.done == ["done1"]
    assert sorted(report.failed) == [("crash1", CRASHED), ("fail1", "ValueError: bad fail1")]


def test_prepare_says_when_raw_is_a_file_not_a_directory(tmp_path, capsys):
    archive = tmp_path / "CREMA-D.zip"
    archive.write_bytes(b"PK")
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare(["crema_d", "--raw", str(archive), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is a file, not a directory" in err and "extract an archive first" in err
