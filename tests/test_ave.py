"""AVE: preparation from a tiny AVE_Dataset/ tree (annotations, split files, videos), each event's seconds only
(audio and frames), PMR's audio input against scipy directly, the report of unusable events, resuming, the
official and stratified splits, the batch contract, the errors, and one training run end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from compose import small_encoder, train_briefly
from datamodules.ave import AVEDataModule
from datamodules.ave_prepare import AUDIO_SHAPE, NOVERLAP, NPERSEG, SAMPLE_RATE, log_spectrogram, parse_event
from datamodules.ave_raw import read_events
from datamodules.media import read_audio
from datamodules.prepare import main as balance_prepare
from raw_media import write_video

MP4 = {"container_format": "mp4", "video_codec": "mpeg4", "audio_codec": "aac"}
CATEGORIES = ("Church bell", "Dog barking", "Playing guitar")
HEADER = "Category&VideoID&Quality&StartTime&EndTime"


def _video(k: int, split: str, i: int) -> str:
    return f"v{k}{split[:2]}{i}_-abcdefgh"[:11]  # YouTube-like ids, with _ and -


SPLITS = {"train": 4, "val": 1, "test": 2}
EVENTS = {split: [(CATEGORIES[k], _video(k, split, i), i % 2, 3) for k in range(3) for i in range(n)]
          for split, n in SPLITS.items()}


def _line(event: tuple) -> str:
    category, video, start, end = event
    return f"{category}&{video}&good&{start}&{end}"


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("AVE_Dataset")
    (root / "AVE").mkdir()
    everything = [event for events in EVENTS.values() for event in events]
    for n, (category, video, _, _) in enumerate(everything):
        k = CATEGORIES.index(category)
        write_video(root / "AVE" / f"{video}.mp4", 4.0, (80 * k, 200 - 60 * k, 30 + n), rate=16000, **MP4)
    missing = ("Dog barking", "novideo0000", 0, 2)
    unannotated = ("Church bell", _video(0, "train", 0), 2, 4)
    (root / "Annotations.txt").write_text("\n".join([HEADER, *map(_line, everything + [missing])]) + "\n")
    for split, events in EVENTS.items():
        extra = {"train": [missing, unannotated], "val": [], "test": [events[0]]}[split]  # test: a repeat
        (root / f"{split}Set.txt").write_text("\n".join(map(_line, events + extra)) + "\n")
    return root


@pytest.fixture(scope="module")
def cache(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ave_cache")
    balance_prepare(["ave", "--raw", str(raw), "--out", str(out), "--workers", "2"])
    return out


def test_events_are_read_with_or_without_the_header(raw, tmp_path):
    assert len(read_events(raw / "Annotations.txt")) == 3 * sum(SPLITS.values()) + 1
    assert read_events(raw / "valSet.txt")[0].key == f"{_video(0, 'val', 0)}_0_3"
    assert parse_event("a_b-c_d_ef_2_9") == ("a_b-c_d_ef", 2, 9)
    bad = tmp_path / "bad.txt"
    bad.write_text("Church bell&abc&good&5&2\n")
    with pytest.raises(ValueError, match="line 1.*start before end"):
        read_events(bad)


def test_prepare_writes_each_events_seconds_and_reports_the_rest(cache, raw):
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["classes"] == sorted(CATEGORIES) and meta["num_events"] == 3 * sum(SPLITS.values())
    assert meta["events_per_split"] == {split: 3 * n for split, n in SPLITS.items()}
    report = (cache / "prepare_report.txt").read_text()
    assert "no video AVE/novideo0000.mp4" in report and "not in Annotations.txt" in report
    assert "listed again (first in testSet.txt)" in report
    with open(cache / "events.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # Seconds 0-3 and 1-3 of a 4 s video: 4 and 3 frames.
    assert {(int(r["start"]), int(r["frames"])) for r in rows} == {(0, 4), (1, 3)}
    row = next(r for r in rows if r["start"] == "1")
    wave, _ = read_audio(raw / "AVE" / f"{row['video']}.mp4", SAMPLE_RATE)
    stored = np.load(cache / "audio" / f"{row['event']}.npy")
    assert stored.dtype == np.float16 and stored.shape == AUDIO_SHAPE == (257, 1004)
    expected = log_spectrogram(wave[SAMPLE_RATE:3 * SAMPLE_RATE])  # the event's seconds only
    assert np.allclose(stored, expected, atol=2e-2)


def test_a_second_preparation_skips_every_event(cache, raw, capsys):
    balance_prepare(["ave", "--raw", str(raw), "--out", str(cache), "--workers", "1"])
    assert f"0 ok, {3 * sum(SPLITS.values())} skipped (already done)" in capsys.readouterr().out


def test_the_audio_is_pmrs_standardised_log_psd():
    from scipy import signal

    rng = np.random.default_rng(0)
    wave = (0.3 * rng.standard_normal(SAMPLE_RATE * 3)).astype(np.float32)
    ours = log_spectrogram(wave)
    tiled = np.clip(np.tile(wave, 10)[: SAMPLE_RATE * 10], -1, 1)  # PMR: tile, cut to 10 s, clip
    _, _, psd = signal.spectrogram(tiled, SAMPLE_RATE, nperseg=NPERSEG, noverlap=NOVERLAP)
    log = np.log(np.abs(psd) + 1e-7)
    assert np.allclose(ours, (log - log.mean()) / (log.std() + 1e-9), atol=1e-5)
    assert abs(ours.mean()) < 1e-5 and abs(ours.std() - 1) < 1e-4


def test_official_splits_items_and_stratified(cache):
    dm = AVEDataModule(root=str(cache), batch_size=4, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 3
    for split, events in EVENTS.items():
        assert sorted(dm.split_items[split]) == sorted(f"{v}_{s}_{e}" for _, v, s, e in events)
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"]["audio"].shape == (4, 1, 257, 1004)
    assert batch["inputs"]["visual"].shape == (4, 3, 3, 224, 224)
    stratified = AVEDataModule(root=str(cache), split="stratified", num_workers=0, val_fraction=0.2,
                               test_fraction=0.2)
    stratified.setup("fit")
    assert sum(len(v) for v in stratified.split_items.values()) == 3 * sum(SPLITS.values())


def test_errors_name_the_layout_and_the_command(raw, tmp_path):
    with pytest.raises(FileNotFoundError, match="balance-prepare ave"):
        AVEDataModule(root=str(raw)).prepare_data()
    with pytest.raises(ValueError, match="official"):
        AVEDataModule(root=str(raw), split="files")
    with pytest.raises(SystemExit):
        balance_prepare(["ave", "--raw", str(tmp_path), "--out", str(tmp_path / "out")])


def test_one_training_run_end_to_end(cache, tmp_path):
    small = ["~model.encoders", small_encoder("audio", 1), small_encoder("visual", 3)]
    results = train_briefly(["data=ave", "model=ave", f"data.root={cache}", "data.num_workers=0", "data.batch_size=4",
                             *small], tmp_path)
    assert {"acc", "acc_audio", "acc_visual"} <= set(results["test"])
