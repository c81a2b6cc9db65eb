"""Kinetics-Sounds: preparation from tiny mp4 clips (aac audio) in the raw layout (<split>/<class>/<clip>.mp4), its
report of corrupt, silent and other-class files, resumability, the cache (fbank and frames), splits (ours, the
raw folders', list files), frame sampling within thirds, the batch contract, the error for a missing root, and one
training run end to end."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compose import model_logits_on_a_batch, small_encoder, train_briefly
from raw_media import write_video
from datamodules.kinetics_sounds import KineticsSoundsDataModule, frame_indices
from datamodules.kinetics_sounds_media import NORM_MEAN, NORM_STD
from datamodules.kinetics_sounds_raw import CLASSES, class_of, clip_key, read_list_file
from datamodules.prepare import main as balance_prepare

# Folder names as users have them: spaces, underscores, capitals.
FOLDERS = {"playing bagpipes": "playing bagpipes", "tap dancing": "tap_dancing", "blowing nose": "Blowing_Nose"}
PER_SPLIT = {"train": 4, "test": 2}
MP4 = {"container_format": "mp4", "video_codec": "mpeg4", "audio_codec": "aac"}


def _youtube_id(label: str, split: str, i: int) -> str:
    return f"{CLASSES.index(label):02d}{split[:2]}{i}-_abcdef"[:11]  # 11 characters, with - and _ as YouTube's


GOOD = {  # clip -> (label, split)
    f"{_youtube_id(label, split, i)}_{10 * i:06d}_{10 * i + 10:06d}": (label, split)
    for label in FOLDERS for split, n in PER_SPLIT.items() for i in range(n)
}
BAD = {
    "train/playing bagpipes/corrupt0000_000000_000010.mp4": "video: unreadable video",
    "test/tap_dancing/silent00000_000000_000010.mp4": "audio: no audio stream",
    "train/Blowing_Nose/empty000000_000000_000010.mp4": "empty file",
    "train/loose000000_000000_000010.mp4": "not in a class folder",
}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("k400_videos")
    for i, (clip, (label, split)) in enumerate(GOOD.items()):
        folder = root / split / FOLDERS[label]
        folder.mkdir(parents=True, exist_ok=True)
        k = CLASSES.index(label)
        write_video(folder / f"{clip}.mp4", 2.0 + 0.5 * (i % 3), (40 * (k % 6), 200 - 5 * k, 90), **MP4)  # 2-3 frames
    (root / "train" / "playing bagpipes" / "corrupt0000_000000_000010.mp4").write_bytes(b"\x00\x00\x00 ftypisom" * 99)
    write_video(root / "test" / "tap_dancing" / "silent00000_000000_000010.mp4", 2.0, (0, 0, 0), container_format="mp4",
                video_codec="mpeg4", audio_codec=None)
    (root / "train" / "Blowing_Nose" / "empty000000_000000_000010.mp4").write_bytes(b"")
    write_video(root / "train" / "loose000000_000000_000010.mp4", 2.0, (0, 0, 0), **MP4)
    (root / "train" / "abseiling").mkdir()  # a Kinetics-400 class outside Kinetics-Sounds
    write_video(root / "train" / "abseiling" / "other000000_000000_000010.mp4", 2.0, (9, 9, 9), **MP4)
    (root / "train" / "playing bagpipes" / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def cache(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kinetics_sounds_cache")
    balance_prepare(["kinetics_sounds", "--raw", str(raw), "--out", str(out), "--workers", "2"])
    return out


def test_class_list_and_name_matching():
    assert len(CLASSES) == len(set(CLASSES)) == 31 and list(CLASSES) == sorted(CLASSES)
    assert class_of("Playing_Bagpipes") == class_of(" playing  bagpipes ") == "playing bagpipes"
    assert class_of('"tap dancing"') == "tap dancing" and class_of("abseiling") is None
    assert clip_key("-3Mwkq-7TV4_000002_000012.mp4") == clip_key("-3Mwkq-7TV4_2") == "-3Mwkq-7TV4_2"
    assert clip_key("0HQsAGUnQ_0_000006_000016") == "0HQsAGUnQ_0_6"  # the id itself holds "_0"
    assert clip_key("my clip.mp4") == "my clip"


def test_prepare_writes_the_cache_and_reports_bad_files(raw, cache):
    report = (cache / "prepare_report.txt").read_text()
    assert report.startswith("balance-prepare kinetics_sounds: 18 ok, 0 skipped (already done), 4 failed")
    failures = dict(line.split("\t") for line in report.splitlines() if "\t" in line and not line.startswith("item"))
    assert set(failures) == set(BAD)
    for item, reason in BAD.items():
        assert reason in failures[item] and str(raw) not in failures[item], (item, failures[item])
    assert "skipped, not a Kinetics-Sounds class: 1 clips in 1 folders\n  train/abseiling: 1\n" in report

    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_clips"] == 18 and meta["num_failed"] == 4 and meta["num_other_classes"] == 1
    assert meta["audio_shape"] == [1024, 128] and meta["clips_per_split"] == {"test": 6, "train": 12}
    rows = (cache / "clips.csv").read_text().splitlines()
    assert rows[0] == "clip,label,split,frames" and len(rows) == 19
    for row in rows[1:]:
        clip, label, split, frames = row.split(",")
        assert GOOD[clip] == (label, split)
        jpgs = sorted(p.name for p in (cache / "visual" / clip).iterdir())
        assert jpgs == [f"{k:05d}.jpg" for k in range(int(frames))] and int(frames) in (2, 3)
        fbank = np.load(cache / "audio" / f"{clip}.npy")
        assert fbank.shape == (1024, 128) and fbank.dtype == np.float16 and np.isfinite(fbank).all()
    fbank = np.load(cache / "audio" / f"{next(iter(GOOD))}.npy").astype(np.float32)
    # write_video's 300 Hz tone peaks in mel bin 16 (128 HTK mel bins, 20 Hz - 8 kHz); 2 s = ~200 frames, then
    # zero padding, normalised as OGM-GE does.
    assert abs(int(fbank[:150].mean(0).argmax()) - 16) <= 1
    assert np.allclose(fbank[300:], (0 - NORM_MEAN) / NORM_STD, atol=1e-3)
    from PIL import Image

    with Image.open(cache / "visual" / next(iter(GOOD)) / "00000.jpg") as image:
        assert min(image.size) == 224
    assert not list(cache.rglob(".*tmp-*"))


def test_prepare_resumes_and_redoes_only_what_is_missing(raw, cache, capsys):
    balance_prepare(["kinetics_sounds", "--raw", str(raw), "--out", str(cache), "--workers", "1"])
    out = capsys.readouterr().out
    assert "0 ok, 18 skipped (already done), 4 failed; 18 usable" in out
    assert "skipped 1 clips in 1 folders of classes outside Kinetics-Sounds" in out
    clips = list(GOOD)
    (cache / "audio" / f"{clips[3]}.npy").unlink()
    shutil.rmtree(cache / "visual" / clips[4])
    balance_prepare(["kinetics_sounds", "--raw", str(raw), "--out", str(cache), "--workers", "1"])
    assert "2 ok, 16 skipped (already done), 4 failed; 18 usable" in capsys.readouterr().out
    assert (cache / "audio" / f"{clips[3]}.npy").is_file() and (cache / "visual" / clips[4] / "00000.jpg").is_file()


def test_prepare_refuses_other_parameters_in_the_same_cache(raw, cache):
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare(["kinetics_sounds", "--raw", str(raw), "--out", str(cache), "--short-side", "112"])
    assert exit_info.value.code == 2


def test_prepare_exits_nonzero_when_nothing_is_usable(tmp_path):
    raw = tmp_path / "raw"  # the layout without split folders
    (raw / "playing_piano").mkdir(parents=True)
    (raw / "playing_piano" / "broken.mp4").write_bytes(b"not a video at all" * 100)
    (raw / "yoga").mkdir()
    write_video(raw / "yoga" / "clip.mp4", 1.0, (0, 0, 0), **MP4)
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare(["kinetics_sounds", "--raw", str(raw), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert exit_info.value.code == 1
    report = (tmp_path / "out" / "prepare_report.txt").read_text()
    assert "0 ok, 0 skipped (already done), 1 failed" in report and "playing_piano/broken.mp4\t" in report
    assert "class folders" in report and "  yoga: 1" in report
    assert not (tmp_path / "out" / "meta.json").exists()


def test_prepare_names_the_raw_layout(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    write_video(tmp_path / "train" / "clip.mp4", 1.0, (0, 0, 0), **MP4)  # the download before arrange_by_classes
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare(["kinetics_sounds", "--raw", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "arrange_by_classes.py" in err and "<split>/<class>/<clip>.mp4" in err and "cvdfoundation" in err


def test_missing_or_incomplete_root_names_layout_command_and_source(tmp_path, raw):
    for root in (tmp_path / "nowhere", raw):
        with pytest.raises(FileNotFoundError) as error:
            KineticsSoundsDataModule(root=str(root)).setup()
        message = str(error.value)
        assert "balance-prepare kinetics_sounds --raw RAW --out OUT" in message
        assert "<split>/<class>/<clip>.mp4" in message and "audio/<clip>.npy" in message
        assert "Kinetics-400" in message and "github.com/cvdfoundation/kinetics-dataset" in message
    assert "looks like the raw download" in message
    with pytest.raises(FileNotFoundError, match="data.root is not set"):
        KineticsSoundsDataModule().setup()


def test_frames_are_drawn_within_thirds_in_training_and_centred_in_evaluation():
    assert frame_indices(10, 3, train=False) == [1, 4, 7]  # thirds 0-2, 3-5, 6-9
    assert frame_indices(9, 3, train=False) == [1, 4, 7]
    assert frame_indices(2, 3, train=False) == [0, 0, 1] and frame_indices(1, 3, train=True) == [0, 0, 0]
    assert frame_indices(7, 1, train=False) == [3]
    generator = torch.Generator().manual_seed(0)
    draws = np.array([frame_indices(10, 3, train=True, generator=generator) for _ in range(300)])
    for k, third in enumerate(([0, 1, 2], [3, 4, 5], [6, 7, 8, 9])):
        assert sorted(set(draws[:, k].tolist())) == third  # every frame of the third, nothing outside it
    with pytest.raises(ValueError):
        frame_indices(0, 3, train=False)


def test_batch_contract(cache):
    dm = KineticsSoundsDataModule(root=str(cache), val_fraction=0.34, test_fraction=0.16, image_size=32,
                                  batch_size=4)
    dm.setup("fit")
    assert dm.modalities == ["audio", "visual"] and dm.num_classes == 31
    assert {k: len(v) for k, v in dm.split_clips.items()} == {"train": 9, "val": 6, "test": 3}
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"inputs", "label", "index"}
    assert batch["inputs"]["audio"].shape == (4, 1, 1024, 128) and batch["inputs"]["audio"].dtype == torch.float32
    assert batch["inputs"]["visual"].shape == (4, 3, 3, 32, 32) and batch["inputs"]["visual"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and torch.equal(batch["index"], torch.arange(4))
    assert batch["label"].tolist() == [CLASSES.index(GOOD[c][0]) for c in dm.split_clips["val"][:4]]
    assert torch.equal(dm.datasets["val"][0]["inputs"]["visual"], dm.datasets["val"][0]["inputs"]["visual"])
    assert next(iter(dm.train_dataloader()))["inputs"]["visual"].shape == (4, 3, 3, 32, 32)
    view = dm.evaluation_view("train")
    assert torch.equal(view[0]["inputs"]["visual"], view[0]["inputs"]["visual"]) and view[0]["index"] == 0


def test_stratified_split_is_seeded_and_stratified(cache):
    def parts(seed):
        dm = KineticsSoundsDataModule(root=str(cache), val_fraction=1 / 3, test_fraction=1 / 3, seed=seed)
        dm.setup()
        return dm.split_clips

    first = parts(0)
    assert first == parts(0) and first != parts(1)
    assert sorted(sum(first.values(), [])) == sorted(GOOD)
    for clips in first.values():
        assert sorted(GOOD[c][0] for c in clips) == sorted(list(FOLDERS) * 2)  # 2 clips of each class


def _with_clips_csv(cache: Path, directory: Path, rewrite) -> Path:
    """A copy of the cache's index (media linked) with each clips.csv row passed through ``rewrite``."""
    directory.mkdir()
    for name in ("audio", "visual"):
        os.symlink(cache / name, directory / name)
    shutil.copy(cache / "meta.json", directory / "meta.json")
    rows = (cache / "clips.csv").read_text().splitlines()
    (directory / "clips.csv").write_text("\n".join([rows[0], *(rewrite(r) for r in rows[1:])]) + "\n")
    return directory


def test_official_split_uses_the_raw_folders(cache, tmp_path):
    dm = KineticsSoundsDataModule(root=str(cache), split="official", val_fraction=0.25)
    dm.setup()
    assert sorted(dm.split_clips["test"]) == sorted(c for c, (_, s) in GOOD.items() if s == "test")
    train = sorted(dm.split_clips["train"] + dm.split_clips["val"])
    assert train == sorted(c for c, (_, s) in GOOD.items() if s == "train")
    assert sorted(GOOD[c][0] for c in dm.split_clips["val"]) == sorted(FOLDERS)  # one per class, stratified

    # train, val and test folders: each is its split; no split folders: refused with a way out.
    def to_val(row):
        clip = row.split(",")[0]
        return row.replace(",train,", ",val,") if clip.startswith(tuple(f"{k:02d}tr0" for k in range(31))) else row

    three = KineticsSoundsDataModule(root=str(_with_clips_csv(cache, tmp_path / "three", to_val)), split="official")
    three.setup()
    assert {k: len(v) for k, v in three.split_clips.items()} == {"train": 9, "val": 3, "test": 6}
    flat = _with_clips_csv(cache, tmp_path / "flat", lambda r: r.replace(",train,", ",,").replace(",test,", ",,"))
    with pytest.raises(ValueError, match="class folders only"):
        KineticsSoundsDataModule(root=str(flat), split="official").setup()


def test_list_files_in_the_community_formats(cache, tmp_path):
    """OGM-GE's lists (`<youtube id>_<start>,10,<class index>`), csv with class names, and whitespace-separated
    file names with indices describe the same split; one listed clip is not in the cache."""
    train = [c for c, (_, s) in GOOD.items() if s == "train"]
    test = [c for c, (_, s) in GOOD.items() if s == "test"]

    def ogm_id(clip):  # -3Mwkq-7TV4_000002_000012 -> -3Mwkq-7TV4_2
        return f"{clip[:11]}_{int(clip[12:18])}"

    formats = {
        "ogm": lambda c: f"{ogm_id(c)},10,{CLASSES.index(GOOD[c][0])}\r\n",
        "names": lambda c: f"{c},{GOOD[c][0]}\n",
        "spaces": lambda c: f"{c}.mp4\t{CLASSES.index(GOOD[c][0])}\n",
    }
    splits = []
    for fmt, line in formats.items():
        paths = {}
        for name, clips in (("train", train), ("test", test)):
            paths[name] = tmp_path / f"{fmt}_{name}.txt"
            paths[name].write_text("".join(line(c) for c in clips) + "zzzzzzzzzzz_0,10,0\n")
        assert read_list_file(paths["train"])[0][0] == ogm_id(train[0])
        dm = KineticsSoundsDataModule(root=str(cache), split_files={k: str(v) for k, v in paths.items()},
                                      val_fraction=0.25)
        dm.setup()
        assert dm.split == "files" and sorted(dm.split_clips["test"]) == sorted(test)
        assert sorted(dm.split_clips["train"] + dm.split_clips["val"]) == sorted(train)
        splits.append(dm.split_clips)
    assert splits[0] == splits[1] == splits[2]

    wrong = tmp_path / "wrong.csv"
    wrong.write_text(f"{train[0]},tickling\n")
    with pytest.raises(ValueError, match="does not match its class folder"):
        KineticsSoundsDataModule(root=str(cache), split_files=[str(wrong), str(wrong)]).setup()
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("".join(f"{c} 5\n" for c in train))  # one index for three classes
    with pytest.raises(ValueError, match="class index 5 is used for"):
        KineticsSoundsDataModule(root=str(cache), split_files=[str(mixed), str(mixed)]).setup()


DATA = ["data=kinetics_sounds", "model=kinetics_sounds", "data.image_size=32", "data.batch_size=4",
        "data.num_workers=0", "data.val_fraction=0.34", "data.test_fraction=0.16"]


def test_model_config_takes_a_batch(cache):
    """The shipped model config (ResNet18 audio on [1, 1024, 128], ResNet18 visual on [T, 3, S, S]) on a batch."""
    _, _, logits = model_logits_on_a_batch([*DATA, f"data.root={cache}"])
    assert logits.shape == (4, 31)


def test_one_training_run_end_to_end(cache, tmp_path):
    # Small CNN encoders keep this fast; test_model_config_takes_a_batch covers the ResNet18 config.
    small = ["~model.encoders", small_encoder("audio", 1), small_encoder("visual", 3)]
    results = train_briefly([*DATA, f"data.root={cache}", *small], tmp_path)
    assert {"acc", "acc_audio", "acc_visual"} <= set(results["test"])
