"""VGGSound: preparation from vggsound.csv and tiny clips named as downloads name them (anywhere below the root,
zero-padded starts), the report of missing, unlisted, corrupt and silent clips, resuming, OGM-GE's audio (the
stored 10 s STFT and the 5 s window cut from it against a direct computation), the list's classes, the splits, the
batch contract, the errors, and one training run end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compose import small_encoder, train_briefly
from datamodules.media import read_audio
from datamodules.prepare import main as balance_prepare
from datamodules.vggsound import VGGSoundDataModule
from datamodules.vggsound_prepare import AUDIO_SHAPE, HOP_LENGTH, N_FFT, SAMPLE_RATE, WINDOW, log_spectrogram
from datamodules.vggsound_raw import read_list
from raw_media import write_video

MP4 = {"container_format": "mp4", "video_codec": "mpeg4", "audio_codec": "aac"}
# Labels with a comma, as some of the list's are; 'dog barking' has no clip in RAW but is a class all the same.
LABELS = ("people marching", "cattle, bovinae cowbell", "playing bass guitar")
ROWS = [(f"{k}{split[:2]}{i}abcdef-_"[:11], 10 * i + 1, LABELS[k], split)
        for k in range(3) for split, n in (("train", 5), ("test", 2)) for i in range(n)]
MISSING = [("zzzzzzzzzzz", 30, "dog barking", "train"), ("yyyyyyyyyyy", 7, "people marching", "test")]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vggsound")
    with open(root / "vggsound.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(ROWS + MISSING)
    for n, (ytid, start, label, split) in enumerate(ROWS):
        folder = root / ("video" if n % 2 else f"more/{split}")  # anywhere below the root
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{ytid}_{start:06d}.mp4" if n % 3 else f"{ytid}_{start}_{start + 10}.mp4"
        k = LABELS.index(label)
        write_video(folder / name, 2.0 + 0.5 * (n % 3), (80 * k, 200 - 60 * k, 90), rate=16000, **MP4)
    write_video(root / "video" / "unlisted000_000001.mp4", 2.0, (0, 0, 0), **MP4)
    return root


@pytest.fixture(scope="module")
def cache(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vggsound_cache")
    balance_prepare(["vggsound", "--raw", str(raw), "--out", str(out), "--workers", "2"])
    return out


def test_the_list_is_read_with_its_quoted_labels(raw):
    rows = read_list(raw / "vggsound.csv")
    assert len(rows) == len(ROWS) + len(MISSING)
    assert rows[0].key == f"{ROWS[0][0]}_1" and rows[7].label == "cattle, bovinae cowbell"
    bad = raw.parent / "bad.csv"
    bad.write_text("abc,xyz,label,train\n")
    with pytest.raises(ValueError, match="line 1"):
        read_list(bad)


def test_prepare_writes_the_cache_and_reports_what_is_missing(cache, raw):
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["classes"] == sorted([*LABELS, "dog barking"]), "the list's classes, clips or not"
    assert meta["num_clips"] == len(ROWS) and meta["num_missing"] == 2
    assert meta["clips_per_split"] == {"train": 15, "test": 6}
    assert (cache / "missing_clips.txt").read_text().split() == ["zzzzzzzzzzz_30", "yyyyyyyyyyy_7"]
    report = (cache / "prepare_report.txt").read_text()
    assert "listed but not in the raw download: 2 clips" in report and "the list does not name: 1" in report
    with open(cache / "clips.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["clip"] for r in rows} == {f"{ytid}_{start}" for ytid, start, _, _ in ROWS}
    assert all(2 <= int(r["frames"]) <= 3 for r in rows)
    audio = np.load(cache / "audio" / f"{rows[0]['clip']}.npy")
    assert audio.dtype == np.float16 and audio.shape == AUDIO_SHAPE == (129, 1251)


def test_a_second_preparation_skips_every_clip(cache, raw, capsys):
    balance_prepare(["vggsound", "--raw", str(raw), "--out", str(cache), "--workers", "1"])
    assert f"0 ok, {len(ROWS)} skipped (already done)" in capsys.readouterr().out


def test_the_audio_is_ogm_ges_spectrogram_and_window(raw):
    """The stored STFT is OGM-GE's of the wave tiled to 10 s; a window of it equals the STFT of that 5 s piece
    except in its first and last column (which see the true neighbours instead of reflected padding)."""
    path = next((raw / "video").glob("*.mp4"))
    wave, _ = read_audio(path, SAMPLE_RATE)
    full = log_spectrogram(wave)
    tiled = np.clip(np.tile(wave, -(-SAMPLE_RATE * 10 // len(wave)))[: SAMPLE_RATE * 10], -1, 1)
    start = 100
    piece = torch.from_numpy(tiled[start * HOP_LENGTH: start * HOP_LENGTH + SAMPLE_RATE * 5].astype(np.float32))
    direct = torch.log(torch.stft(piece, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), center=True,
                                  pad_mode="reflect", return_complex=True).abs() + 1e-7).numpy()
    assert direct.shape == (129, WINDOW) == full[:, start:start + WINDOW].shape
    assert np.allclose(full[:, start + 1:start + WINDOW - 1], direct[:, 1:-1], atol=1e-4)


def test_official_split_and_items(cache):
    dm = VGGSoundDataModule(root=str(cache), batch_size=4, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 4
    test_ids = {f"{ytid}_{start}" for ytid, start, _, split in ROWS if split == "test"}
    assert set(dm.split_items["test"]) == test_ids
    assert not set(dm.split_items["val"]) & test_ids and len(dm.split_items["val"]) >= 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"]["audio"].shape == (4, 1, 129, WINDOW)
    assert batch["inputs"]["visual"].shape == (4, 3, 3, 224, 224)
    test_set = dm.datasets["test"].dataset
    first, again = test_set[0], test_set[0]
    assert torch.equal(first["inputs"]["audio"], again["inputs"]["audio"]), "evaluation: the middle window"
    stored = torch.from_numpy(np.load(cache / "audio" / f"{test_set.clips[0]}.npy")).float()
    middle = (AUDIO_SHAPE[1] - WINDOW) // 2
    assert torch.equal(first["inputs"]["audio"][0], stored[:, middle:middle + WINDOW])
    train_set = dm.datasets["train"].dataset
    windows = {tuple(train_set[0]["inputs"]["audio"][0, :, 0].tolist()) for _ in range(8)}
    assert len(windows) > 1, "training: a random window"


def test_split_files_and_the_errors(cache, tmp_path, raw):
    train = tmp_path / "train.txt"
    test = tmp_path / "test.txt"
    ids = sorted(f"{ytid}_{start:06d}" for ytid, start, _, _ in ROWS)
    train.write_text("\n".join(ids[:14]) + "\n")
    test.write_text("\n".join(ids[14:]) + "\n")
    dm = VGGSoundDataModule(root=str(cache), split_files={"train": str(train), "test": str(test)}, num_workers=0)
    dm.setup("fit")
    assert len(dm.split_items["test"]) == len(ids) - 14
    with pytest.raises(FileNotFoundError, match="balance-prepare vggsound"):
        VGGSoundDataModule(root=str(raw)).prepare_data()
    with pytest.raises(ValueError, match="official, stratified or files|choose"):
        VGGSoundDataModule(root=str(cache), split="actor")


def test_missing_list_names_the_layout(tmp_path):
    with pytest.raises(SystemExit):
        balance_prepare(["vggsound", "--raw", str(tmp_path), "--out", str(tmp_path / "out")])


def test_one_training_run_end_to_end(cache, tmp_path):
    small = ["~model.encoders", small_encoder("audio", 1), small_encoder("visual", 3)]
    results = train_briefly(["data=vggsound", "model=vggsound", f"data.root={cache}", "data.num_workers=0",
                             "data.batch_size=4", *small], tmp_path)
    assert {"acc", "acc_audio", "acc_visual"} <= set(results["test"])
