"""MM-Debiased: preparation from the list (MM-Debiased.json) and tiny clips in VGGSound's and Kinetics-400's names
below the root (ids without a start too), the report of missing and ambiguous clips, the list's subsets as the
splits, the batch contract, the errors, and one training run end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from compose import small_encoder, train_briefly
from datamodules.mm_debiased import MMDebiasedDataModule
from datamodules.mm_debiased_raw import read_list
from datamodules.prepare import main as balance_prepare
from raw_media import write_video

MP4 = {"container_format": "mp4", "video_codec": "mpeg4", "audio_codec": "aac"}
LABELS = ("bowling", "playing cello", "singing")
SUBSETS = {"training": 4, "validation": 1, "testing": 1}


def _entries() -> dict[str, tuple[str, str, str]]:
    """list key -> (file name, folder, label, subset)."""
    entries = {}
    for k, label in enumerate(LABELS):
        for subset, n in SUBSETS.items():
            for i in range(n):
                ytid = f"{k}{subset[:2]}{i}-_abcdefg"[:11]
                if i % 2:  # Kinetics-400: <id>_<start:06d>_<end:06d>, listed so
                    entries[f"{ytid}_000003_000013"] = (f"{ytid}_000003_000013.mp4", "k400/train", label, subset)
                else:  # VGGSound: listed <id>_<start>, the file zero-padded
                    entries[f"{ytid}_30"] = (f"{ytid}_000030.mp4", "vggsound/video", label, subset)
    entries["bareid00001"] = ("bareid00001_000007_000017.mp4", "k400/val", "singing", "training")  # no start listed
    return entries


ENTRIES = _entries()


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mm_debiased")
    listing = {key: {"subset": subset, "label": label} for key, (_, _, label, subset) in ENTRIES.items()}
    listing["gone0000000_5"] = {"subset": "testing", "label": "bowling"}  # not downloaded
    listing["twice000000"] = {"subset": "training", "label": "singing"}  # two files of that id: ambiguous
    (root / "MM-Debiased.json").write_text(json.dumps(listing))
    for n, (name, folder, label, _) in enumerate(ENTRIES.values()):
        (root / folder).mkdir(parents=True, exist_ok=True)
        k = LABELS.index(label)
        write_video(root / folder / name, 2.0 + 0.5 * (n % 3), (80 * k, 200 - 60 * k, 20 + n), rate=16000, **MP4)
    for start in (1, 2):
        write_video(root / "k400" / "train" / f"twice000000_{start:06d}_{start + 10:06d}.mp4", 2.0, (5, 5, 5), **MP4)
    return root


@pytest.fixture(scope="module")
def cache(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mm_debiased_cache")
    balance_prepare(["mm_debiased", "--raw", str(raw), "--out", str(out), "--workers", "2"])
    return out


def test_the_list_is_read_and_checked(raw, tmp_path):
    rows = read_list(raw / "MM-Debiased.json")
    assert {row.split for row in rows} == {"train", "val", "test"} and len(rows) == len(ENTRIES) + 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"abc": {"subset": "train", "label": "x"}}))
    with pytest.raises(ValueError, match="training, validation, testing"):
        read_list(bad)


def test_prepare_finds_both_namings_and_reports_the_rest(cache):
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["classes"] == sorted(LABELS) and meta["num_clips"] == len(ENTRIES) + 1
    assert (cache / "missing_clips.txt").read_text().split() == ["gone0000000_5"]
    report = (cache / "prepare_report.txt").read_text()
    assert "another clip of twice000000, which the list names without a start" in report
    with open(cache / "clips.csv", newline="") as handle:
        rows = {r["clip"]: r for r in csv.DictReader(handle)}
    assert "bareid00001_7" in rows and rows["bareid00001_7"]["split"] == "train", "the file's start names it"
    assert "twice000000_1" in rows, "the first file of an ambiguous id is kept"
    assert {r["split"] for r in rows.values()} == {"train", "val", "test"}


def test_the_lists_subsets_are_the_splits(cache):
    dm = MMDebiasedDataModule(root=str(cache), batch_size=4, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 3
    assert {name: len(v) for name, v in dm.split_items.items()} == {"train": 3 * 4 + 2, "val": 3, "test": 3}
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"]["audio"].shape == (4, 1, 1024, 128)
    assert batch["inputs"]["visual"].shape == (4, 3, 3, 224, 224)


def test_errors_name_the_layout_and_the_command(raw, tmp_path):
    with pytest.raises(FileNotFoundError, match="balance-prepare mm_debiased"):
        MMDebiasedDataModule(root=str(raw)).prepare_data()
    with pytest.raises(SystemExit):
        balance_prepare(["mm_debiased", "--raw", str(tmp_path), "--out", str(tmp_path / "out")])


def test_one_training_run_end_to_end(cache, tmp_path):
    small = ["~model.encoders", small_encoder("audio", 1), small_encoder("visual", 3)]
    results = train_briefly(["data=mm_debiased", "model=mm_debiased", f"data.root={cache}", "data.num_workers=0",
                             "data.batch_size=4", *small], tmp_path)
    assert {"acc", "acc_audio", "acc_visual"} <= set(results["test"])
