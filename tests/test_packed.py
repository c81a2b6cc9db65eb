"""Decoded frames and audio in memory-mapped packs: the pack format, items equal to reading the cache's files (the
same crops under the same seed), built once and again when the cache changes, the errors; the fused
normalisation equals torchvision's."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.crema_d import CLASSES, CremaDDataModule
from datamodules.packed import Pack, write_pack
from datamodules.prepare import main as balance_prepare
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageNetNormalize
from raw_media import write_flv, write_wav

CLIPS = [f"{actor}_DFA_{emotion}_XX" for actor in (1001, 1002, 1003, 1004) for emotion in CLASSES]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("CREMA-D")
    (raw / "AudioWAV").mkdir()
    (raw / "VideoFlash").mkdir()
    for i, clip in enumerate(CLIPS):
        seconds = 1.6 + 0.5 * (i % 3)  # 2 to 3 frames at 1 fps
        write_wav(raw / "AudioWAV" / f"{clip}.wav", seconds, freq=200 + 20 * i)
        write_flv(raw / "VideoFlash" / f"{clip}.flv", seconds, colour=(10 * i, 255 - 10 * i, 60 + 5 * i))
    out = tmp_path_factory.mktemp("crema_d_cache")
    balance_prepare(["crema_d", "--raw", str(raw), "--out", str(out), "--workers", "1"])
    return out


def datamodule(root: Path, **kwargs) -> CremaDDataModule:
    dm = CremaDDataModule(root=str(root), num_frames=2, batch_size=4, num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


def test_a_pack_returns_each_array_as_written(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"item{i}": rng.integers(0, 255, (i + 1, 3, 5 + i, 7), dtype=np.uint8) for i in range(4)}
    write_pack(arrays.items(), tmp_path / "p", source="abc")
    pack = Pack(tmp_path / "p")
    assert pack.source == "abc" and pack.nbytes == sum(a.nbytes for a in arrays.values())
    for key, array in arrays.items():
        assert np.array_equal(pack[key], array)
    pack["item0"][...] = 0  # copy-on-write: the file keeps its bytes
    assert np.array_equal(Pack(tmp_path / "p")["item0"], arrays["item0"])
    copy = pickle.loads(pickle.dumps(pack))  # as DataLoader workers get it: the map reopens there
    assert np.array_equal(copy["item2"][[0, 2]], arrays["item2"][[0, 2]])
    with pytest.raises(ValueError, match="float32"):
        write_pack([("a", np.zeros((2, 2), np.uint8)), ("b", np.zeros((2, 2), np.float32))], tmp_path / "q")
    assert not (tmp_path / "q.json").exists(), "a failed write leaves no pack"


def test_decoded_frames_give_the_items_the_jpeg_cache_gives(cache):
    decoded, jpeg = datamodule(cache), datamodule(cache, store="files")
    assert (cache / "packed" / "visual.bin").is_file() and (cache / "packed" / "audio.bin").is_file()
    for split in ("train", "val", "test"):
        a, b = decoded.datasets[split].dataset, jpeg.datasets[split].dataset
        assert a.packs is not None and b.packs is None
        for i in range(len(a)):
            torch.manual_seed(i)  # training: the same frames and crop from both stores
            x = a[i]
            torch.manual_seed(i)
            y = b[i]
            assert x["label"] == y["label"]
            assert torch.equal(x["inputs"]["visual"], y["inputs"]["visual"])
            assert torch.equal(x["inputs"]["audio"], y["inputs"]["audio"])
    batch = next(iter(decoded.train_dataloader()))
    assert batch["inputs"]["visual"].shape == (4, 2, 3, 224, 224)


def test_the_pack_is_built_once_and_again_when_the_cache_changes(cache, tmp_path):
    pack_dir = tmp_path / "pack"
    datamodule(cache, pack_dir=str(pack_dir))
    written = (pack_dir / "visual.bin").stat().st_mtime_ns
    datamodule(cache, pack_dir=str(pack_dir))
    assert (pack_dir / "visual.bin").stat().st_mtime_ns == written, "reused"
    index = json.loads((pack_dir / "visual.json").read_text())
    index["source"] = "another cache"
    (pack_dir / "visual.json").write_text(json.dumps(index))
    datamodule(cache, pack_dir=str(pack_dir))
    assert (pack_dir / "visual.bin").stat().st_mtime_ns != written, "a pack of another cache is written again"
    counts = {c: len(list((cache / "visual" / c).glob("*.jpg"))) for c in CLIPS}
    pack = Pack(pack_dir / "visual")
    assert {c: pack.shapes[pack.position[c]][0] for c in CLIPS} == counts
    assert all(pack.shapes[pack.position[c]][-1] == 3 for c in CLIPS), "channels last"
    audio = Pack(pack_dir / "audio")
    assert all(np.array_equal(audio[c], np.load(cache / "audio" / f"{c}.npy")) for c in CLIPS)


def test_bad_frame_options_are_refused(cache, tmp_path):
    with pytest.raises(ValueError, match="packed or files"):
        CremaDDataModule(root=str(cache), store="png")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(OSError, match="data.store=files"):
        datamodule(cache, pack_dir=str(blocked / "pack"))


def test_the_fused_normalisation_equals_torchvisions():
    from torchvision.transforms import v2

    images = torch.randint(0, 256, (2, 3, 17, 19), dtype=torch.uint8)
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(ImageNetNormalize()(images), reference(images), atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        ImageNetNormalize()(images.float())


@pytest.mark.parametrize("train", [True, False])
def test_the_frame_transform_equals_torchvisions_composition(train):
    from torchvision.transforms import v2

    from datamodules.transforms import frame_transform

    head = ([v2.RandomResizedCrop(32, antialias=True), v2.RandomHorizontalFlip()] if train
            else [v2.Resize(32, antialias=True), v2.CenterCrop(32)])
    reference = v2.Compose([*head, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ours = frame_transform(32, train)
    for seed in range(40):
        # Odd shapes, one frame or two, a very wide image (the centre-crop fallback), channels-last memory.
        shape = (1 + seed % 2, 3, 40 + seed, 50 if seed % 5 else 400)
        frames = torch.randint(0, 256, shape, dtype=torch.uint8)
        if seed % 3 == 0:
            frames = frames.contiguous(memory_format=torch.channels_last)
        torch.manual_seed(seed)
        expected = reference(frames)
        torch.manual_seed(seed)
        got = ours(frames)
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5), seed
        assert torch.rand(1).item() == (torch.manual_seed(seed), reference(frames), torch.rand(1).item())[2], \
            "the same random draws"


def test_packs_the_disk_cannot_hold_are_refused_before_writing(cache, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 0, 10**5))  # 100 kB free
    with pytest.raises(OSError, match=r"need about 0\.\d GB.*data.pack_dir.*data.store=files"):
        datamodule(cache, pack_dir=str(tmp_path / "small"))
    assert not (tmp_path / "small" / "visual.bin").exists()


def test_the_frame_pack_of_the_older_layout_is_removed(cache, tmp_path):
    pack_dir = tmp_path / "pack"
    pack_dir.mkdir()
    for suffix in (".bin", ".json"):
        (pack_dir / f"frames{suffix}").write_text("layout 2")
    datamodule(cache, pack_dir=str(pack_dir))
    assert not (pack_dir / "frames.bin").exists() and not (pack_dir / "frames.json").exists()
    assert (pack_dir / "visual.bin").is_file() and (pack_dir / "audio.bin").is_file()
