"""UCF-101: preparation from a tiny tree in the download's layout (UCF-101/<Class>/*.avi, ucfTrainTestlist/), the
optical flow (quantisation by hand, Farneback's estimate of a known motion, precomputed TV-L1 images read at the
kept frames), the flow transform, the official splits with validation carved by group, the errors, packed against
per-file items, and training: end to end, and a flow-only model learning the motion classes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from compose import fit_briefly, held_out_accuracy, small_encoder, train_briefly
from datamodules.optical_flow import BOUND, frames_and_flow, quantise
from datamodules.prepare import main as balance_prepare
from datamodules.transforms import FlowTransform
from datamodules.ucf101 import UCF101DataModule
from datamodules.ucf101_raw import read_list

pytest.importorskip("cv2")

# The classes move the same texture right, down, or not at all: only the flow tells them apart. The folder and the
# files of the second spell it differently, as UCF-101's HandstandPushups does.
CLASSES = {"MoveRight": (2, 0), "HandstandPushups": (0, 2), "StandStill": (0, 0)}
FILE_NAMES = {"MoveRight": "MoveRight", "HandstandPushups": "HandStandPushups", "StandStill": "StandStill"}
GROUPS, CLIPS_PER_GROUP, FPS, SECONDS = 5, 2, 25, 2.2
TEST_GROUPS = {1: {1}, 2: {2}}  # official split -> the groups in its test list (split 3's lists are absent)
MISSING = "MoveRight/v_MoveRight_g05_c09.avi"


def clip_name(label: str, group: int, c: int) -> str:
    return f"v_{FILE_NAMES[label]}_g{group:02d}_c{c:02d}"


ALL_CLIPS = [(label, g, c) for label in CLASSES for g in range(1, GROUPS + 1) for c in range(1, CLIPS_PER_GROUP + 1)]


def texture(shift_x: float, shift_y: float, size=(96, 72)) -> np.ndarray:
    y, x = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    x, y = x - shift_x, y - shift_y
    grey = 128 + 50 * np.sin(x / 4.0) * np.cos(y / 5.0) + 40 * np.sin((x + y) / 7.0)
    return np.clip(grey, 0, 255).astype(np.uint8)


def write_avi(path: Path, motion: tuple[int, int], tint: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 96, 72, "yuv420p"
        stream.bit_rate = 2_000_000
        for i in range(int(SECONDS * FPS)):
            grey = texture(motion[0] * i, motion[1] * i)
            image = np.stack([grey, grey, np.clip(grey.astype(int) + tint, 0, 255).astype(np.uint8)], axis=-1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ucf101_raw")
    for n, (label, g, c) in enumerate(ALL_CLIPS):
        write_avi(root / "UCF-101" / label / f"{clip_name(label, g, c)}.avi", CLASSES[label], tint=(n * 7) % 40)
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{k + 1} {label}\n" for k, label in enumerate(CLASSES)))
    for split, test_groups in TEST_GROUPS.items():
        train = [f"{label}/{clip_name(label, g, c)}.avi {list(CLASSES).index(label) + 1}"
                 for label, g, c in ALL_CLIPS if g not in test_groups]
        test = [f"{label}/{clip_name(label, g, c)}.avi" for label, g, c in ALL_CLIPS if g in test_groups]
        extra = [f"{MISSING} 1", train[0]] if split == 1 else []  # a clip without video, a repeat
        (lists / f"trainlist0{split}.txt").write_text("\r\n".join(train + extra) + "\r\n")
        (lists / f"testlist0{split}.txt").write_text("\n".join(test) + "\n")
    return root


@pytest.fixture(scope="module")
def cache(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ucf101_cache")
    balance_prepare(["ucf101", "--raw", str(raw), "--out", str(out), "--workers", "2", "--short-side", "72"])
    return out


def index(cache: Path) -> list[dict]:
    with open(cache / "clips.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_flow_quantisation_by_hand():
    flow = np.array([[[0.0, 20.0], [-20.0, 30.0], [10.0, -5.0]]], np.float32)  # [1, 3, 2]: (u, v) per pixel
    u, v = quantise(flow)
    assert u.tolist() == [[128, 0, 191]]  # 127.5 rounds to even 128; -20 -> 0; 10 -> 191.25
    assert v.tolist() == [[255, 255, 96]]  # 20 -> 255; 30 clipped to 20; -5 -> 95.625
    assert BOUND == 20


def test_farneback_recovers_the_motion_of_each_kept_frame(raw):
    rgb, flow = frames_and_flow(raw / "UCF-101" / "MoveRight" / f"{clip_name('MoveRight', 1, 1)}.avi", fps=1,
                                short_side=0, method="farneback")
    assert len(rgb) == len(flow) == 3  # seconds 0, 1, 2 of a 2.2 s clip
    for u, v in flow:
        u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
        inner = (slice(12, -12), slice(12, -12))  # away from the borders the texture enters and leaves by
        motion_u = (np.median(u[inner]) - 127.5) * 2 * BOUND / 255
        motion_v = (np.median(v[inner]) - 127.5) * 2 * BOUND / 255
        assert motion_u == pytest.approx(2.0, abs=0.35) and abs(motion_v) < 0.35
    _, still = frames_and_flow(raw / "UCF-101" / "StandStill" / f"{clip_name('StandStill', 1, 1)}.avi", fps=1,
                               short_side=0, method="farneback")
    assert all(abs(float(np.median(np.asarray(u))) - 127.5) <= 1 for u, _ in still)


def test_tvl1_recovers_the_motion_or_names_the_package_it_needs(raw):
    import cv2

    path = raw / "UCF-101" / "MoveRight" / f"{clip_name('MoveRight', 1, 1)}.avi"
    if not hasattr(cv2, "optflow"):  # opencv-python-headless, the flow extra's: TV-L1 is in the contrib build
        with pytest.raises(ImportError, match="opencv-contrib-python-headless"):
            frames_and_flow(path, fps=1, short_side=0, method="tvl1")
        return
    _, flow = frames_and_flow(path, fps=1, short_side=0, method="tvl1")
    for u, _ in flow:
        motion = (np.median(np.asarray(u, np.float32)[12:-12, 12:-12]) - 127.5) * 2 * BOUND / 255
        assert motion == pytest.approx(2.0, abs=0.35)


def test_the_lists_are_read_and_checked(raw, tmp_path):
    classes = list(CLASSES)
    entries = read_list(raw / "ucfTrainTestlist" / "testlist01.txt", classes)
    assert entries[0] == (f"MoveRight/{clip_name('MoveRight', 1, 1)}.avi", "MoveRight")
    bad = tmp_path / "trainlist01.txt"
    bad.write_text(f"MoveRight/{clip_name('MoveRight', 2, 1)}.avi 2\n")
    with pytest.raises(ValueError, match="class number 2 is not MoveRight's"):
        read_list(bad, classes)
    bad.write_text("Unknown/v_Unknown_g01_c01.avi 1\n")
    with pytest.raises(ValueError, match="line 1"):
        read_list(bad, classes)


def test_prepare_writes_frames_flow_and_the_index(cache):
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["splits"] == [1, 2]
    assert meta["num_clips"] == len(ALL_CLIPS) and meta["params"]["flow"] == "farneback"
    rows = index(cache)
    assert len(rows) == len(ALL_CLIPS)
    row = next(r for r in rows if r["clip"] == clip_name("HandstandPushups", 1, 2))
    assert (row["label"], row["group"], row["split1"], row["split2"], row["split3"]) == \
        ("HandstandPushups", "1", "test", "train", "")
    assert {r["frames"] for r in rows} == {"3"}
    clip = row["clip"]
    for folder in ("rgb", "flow/u", "flow/v"):
        assert sorted(p.name for p in (cache / folder / clip).iterdir()) == ["00000.jpg", "00001.jpg", "00002.jpg"]
    assert Image.open(cache / "rgb" / clip / "00000.jpg").mode == "RGB"
    assert Image.open(cache / "flow" / "u" / clip / "00000.jpg").mode == "L"
    v = np.asarray(Image.open(cache / "flow" / "v" / clip / "00001.jpg"), np.float32)
    assert (np.median(v[12:-12, 12:-12]) - 127.5) * 2 * BOUND / 255 == pytest.approx(2.0, abs=0.4)  # moves down
    report = (cache / "prepare_report.txt").read_text()
    assert "no video UCF-101/MoveRight/v_MoveRight_g05_c09.avi" in report
    assert "listed again (first in the train list)" in report


def test_a_second_preparation_skips_every_clip(cache, raw, capsys):
    balance_prepare(["ucf101", "--raw", str(raw), "--out", str(cache), "--workers", "1", "--short-side", "72"])
    assert f"0 ok, {len(ALL_CLIPS)} skipped (already done)" in capsys.readouterr().out


def test_precomputed_flow_is_read_at_the_kept_frames(raw, tmp_path):
    flow_dir = tmp_path / "tvl1"
    for label, g, c in ALL_CLIPS[:2]:
        clip = clip_name(label, g, c)
        frames = int(SECONDS * FPS) - 1  # one image per pair of consecutive frames
        for component, offset in (("u", 10), ("v", 100)):
            (flow_dir / component / clip).mkdir(parents=True)
            for k in range(frames):
                Image.fromarray(np.full((72, 96), offset + 2 * k, np.uint8)).save(
                    flow_dir / component / clip / f"frame{k + 1:06d}.jpg", quality=100)
    out = tmp_path / "cache"
    # Most clips have no precomputed flow: reported, the two others prepared.
    balance_prepare(["ucf101", "--raw", str(raw), "--out", str(out), "--workers", "1", "--flow", "precomputed",
                     "--flow-dir", str(flow_dir), "--short-side", "72"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_clips"] == 2 and meta["params"]["flow"] == "precomputed"
    clip = clip_name(*ALL_CLIPS[0])
    # Kept frames 0, 25, 50 read the images of those pairs; the last pair's image is number 53 (0-based).
    for k, number in enumerate((0, 25, 50)):
        u = np.asarray(Image.open(out / "flow" / "u" / clip / f"{k:05d}.jpg"), np.float32)
        v = np.asarray(Image.open(out / "flow" / "v" / clip / f"{k:05d}.jpg"), np.float32)
        assert abs(u.mean() - (10 + 2 * number)) <= 1 and abs(v.mean() - (100 + 2 * number)) <= 1
    assert f"u/{clip_name(*ALL_CLIPS[2])}: no such precomputed flow folder" in (out / "prepare_report.txt").read_text()


@pytest.mark.parametrize("split", [1, 2])
def test_official_splits_and_validation_by_group(cache, split):
    dm = UCF101DataModule(root=str(cache), official_split=split, val_fraction=0.25, batch_size=4, num_workers=0,
                          image_size=64)
    dm.prepare_data()
    dm.setup("fit")
    groups = {r["clip"]: (r["label"], r["group"]) for r in index(cache)}
    parts = {name: {groups[clip] for clip in clips} for name, clips in dm.split_items.items()}
    assert {g for _, g in parts["test"]} == {str(g) for g in TEST_GROUPS[split]}
    assert not parts["train"] & parts["val"] and not parts["val"] & parts["test"], "a group in two parts"
    assert {label for label, _ in parts["val"]} == set(CLASSES), "validation has every class"
    assert len(parts["val"]) == len(CLASSES)  # a quarter of each class's four training groups
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"]["rgb"].shape == (4, 3, 3, 64, 64)
    assert batch["inputs"]["flow"].shape == (4, 3, 2, 64, 64)
    assert batch["inputs"]["flow"].abs().max() <= 1


def test_packed_items_equal_the_files_items(cache, tmp_path):
    kwargs = dict(root=str(cache), batch_size=4, num_workers=0, image_size=64)
    packed = UCF101DataModule(pack_dir=str(tmp_path / "packs"), **kwargs)
    files = UCF101DataModule(store="files", **kwargs)
    for dm in (packed, files):
        dm.setup("fit")
    assert (tmp_path / "packs" / "rgb.bin").is_file() and (tmp_path / "packs" / "flow.bin").is_file()
    a, b = packed.datasets["test"][0], files.datasets["test"][0]
    for name in ("rgb", "flow"):
        assert torch.equal(a["inputs"][name], b["inputs"][name])


def test_stratified_splits_keep_groups_whole(cache):
    dm = UCF101DataModule(root=str(cache), split="stratified", val_fraction=0.2, test_fraction=0.2, num_workers=0)
    dm.setup("fit")
    groups = {r["clip"]: (r["label"], r["group"]) for r in index(cache)}
    parts = [{groups[clip] for clip in clips} for clips in dm.split_items.values()]
    assert sum(len(p) for p in parts) == len(CLASSES) * GROUPS and not (parts[0] & parts[1] or parts[1] & parts[2])


def test_flow_transform_reverses_u_on_a_flip_and_keeps_v():
    flow = torch.stack([torch.full((4, 4), 200, dtype=torch.uint8), torch.full((4, 4), 60, dtype=torch.uint8)])
    flipped = FlowTransform(4, train=True).flip(flow[None].clone())[0]
    assert flipped[0].unique().tolist() == [55] and flipped[1].unique().tolist() == [60]
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = FlowTransform(4, train=True)(flow[None].clone())[0]
        assert torch.allclose(out[1], torch.tensor((60 - 127.5) / 127.5))
        seen.add(round(float(out[0].mean()), 4))
    assert seen == {round((200 - 127.5) / 127.5, 4), round((55 - 127.5) / 127.5, 4)}


def test_errors_name_the_layout_the_command_and_the_splits(raw, cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="balance-prepare ucf101 --raw"):
        UCF101DataModule(root=str(raw)).prepare_data()
    with pytest.raises(FileNotFoundError, match=r"without split 3 \(it has \[1, 2\]\)"):
        UCF101DataModule(root=str(cache), official_split=3).prepare_data()
    with pytest.raises(ValueError, match="official_split must be one of"):
        UCF101DataModule(root=str(cache), official_split=4)
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare(["ucf101", "--raw", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:  # no precomputed flow where it is asked for
        balance_prepare(["ucf101", "--raw", str(raw), "--out", str(tmp_path / "out"), "--flow", "precomputed"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("experiment", ["valuation/ucf101_concat", "valuation/ucf101_sample_level"])
def test_one_training_run_end_to_end(cache, tmp_path, experiment):
    small = ["~model.encoders", small_encoder("rgb", 3), small_encoder("flow", 2)]
    resampling = ["method.warmup_epochs=0"] if experiment.endswith("sample_level") else []  # resample at once
    results = train_briefly([f"experiment={experiment}", f"data.root={cache}", "data.num_workers=0",
                             "data.batch_size=4", "data.image_size=32", *resampling, *small], tmp_path)
    assert {"acc", "acc_rgb", "acc_flow", "phi_rgb", "phi_flow"} <= set(results["test"])


def test_the_flow_stream_learns_the_motion_classes(cache, tmp_path):
    # The classes differ only in their motion (same texture, tints at random): joint training must learn them
    # from the flow alone, well above the chance of 1/3 on the held-out groups.
    small = ["~model.encoders", small_encoder("rgb", 3), small_encoder("flow", 2)]
    _, datamodule, method = fit_briefly(["data=ucf101", "model=ucf101", f"data.root={cache}", "data.num_workers=0",
                                         "data.batch_size=8", "data.image_size=32", *small], epochs=25,
                                        run_dir=tmp_path)
    assert held_out_accuracy(datamodule, method, "flow") >= 0.9
    assert held_out_accuracy(datamodule, method, "rgb") <= 0.6, "the frames alone hold no class"
