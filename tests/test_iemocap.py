"""IEMOCAP: preparation from a tiny release in the real layout (sentence wavs, transcriptions, EmoEvaluation files,
dialog avis), its report of excluded labels and broken files, resumability, label parsing and merging, the frame
times, the session and random splits, the batch contract with missing modalities, the error for a missing root,
and one training run end to end."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compose import model_logits_on_a_batch, train_briefly
from raw_media import write_video, write_wav
from datamodules.iemocap import IEMOCAPDataModule
from datamodules.iemocap_media import frame_times, grab_frames
from datamodules.iemocap_raw import CLASS_OF_CODE, CLASSES, parse_labels, parse_transcription
from datamodules.prepare import main as balance_prepare

# Per dialog, the EmoEvaluation code of each utterance (alternating speakers F, M). Left out by label: fru, xxx.
DIALOGS = {
    (1, "Ses01F_impro01"): ["neu", "ang", "sad", "hap", "exc", "neu", "fru", "ang"],
    (1, "Ses01M_script01_1"): ["sad", "neu", "ang", "exc", "hap", "sad", "xxx", "neu"],
    (2, "Ses02F_impro02"): ["neu", "ang", "sad", "hap", "exc", "sad", "neu", "ang"],
    (2, "Ses02M_script02_1"): ["neu", "sad", "ang", "hap"],
}
CORRUPT_WAV = "Ses01M_script01_1_M001"  # exc
NO_TEXT = "Ses02F_impro02_M003"  # ang: labelled, but its transcription line is missing
NO_AVI = "Ses02M_script02_1"  # the dialog's video is missing: its 4 utterances fail
UNLABELLED_DIALOG = "Ses02F_impro03"  # wavs without an EmoEvaluation file
WORDS = {"neutral": "okay fine", "angry": "stop that now", "sad": "i miss her", "happy": "great news"}
COLOURS = {1: (0, 0, 128), 2: (0, 96, 0)}


def utterance_name(dialog: str, k: int) -> str:
    return f"{dialog}_{'FM'[k % 2]}{k // 2:03d}"


def span(k: int) -> tuple[float, float]:
    return 0.4 + 0.75 * k, 0.9 + 0.75 * k


def write_release(root: Path, dialogs=DIALOGS, avi_seconds: float = 6.5) -> None:
    """A tiny IEMOCAP_full_release: sentence wavs, transcriptions, EmoEvaluation files and 64x48 dialog avis."""
    for (session, dialog), codes in dialogs.items():
        base = root / f"Session{session}"
        wav_dir = base / "sentences" / "wav" / dialog
        for sub in ("dialog/transcriptions", "dialog/EmoEvaluation", "dialog/avi/DivX"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        wav_dir.mkdir(parents=True, exist_ok=True)
        labels = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        lines = []
        for k, code in enumerate(codes):
            name, (start, end) = utterance_name(dialog, k), span(k)
            write_wav(wav_dir / f"{name}.wav", end - start, freq=200 + 100 * k)
            labels += [f"[{start:.4f} - {end:.4f}]\t{name}\t{code}\t[2.5000, 3.0000, 2.5000]",
                       "C-E2:\tNeutral;\t()", "C-E3:\tAnger;\tFrustration;\t()",
                       "A-E3:\tval 3; act 2; dom  2;\t(mildly aggravated)", ""]
            if name != NO_TEXT:
                words = WORDS.get(CLASS_OF_CODE.get(code), "hmm")
                zebra = " zebra" if session == 2 else ""  # a word only the test session says
                lines.append(f"{name} [{start:08.4f}-{end:08.4f}]: {words.capitalize()}{zebra}, take {k}.")
            if k == 2:
                lines += ["", "M: [BREATHING]", f"{dialog}_MXX0 [{start:08.4f}-{end:08.4f}]: [LAUGHTER]"]
        (base / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(labels) + "\n")
        (base / "dialog" / "transcriptions" / f"{dialog}.txt").write_text("\n".join(lines) + "\n")
        if dialog != NO_AVI:
            write_video(base / "dialog" / "avi" / "DivX" / f"{dialog}.avi", avi_seconds, COLOURS[session],
                        container_format="avi", video_codec="mpeg4", audio_codec=None)


KEPT = [utterance_name(d, k) for (_, d), codes in DIALOGS.items() for k, c in enumerate(codes) if c in CLASS_OF_CODE]
FAILED = {CORRUPT_WAV, NO_TEXT} | {n for n in KEPT if n.startswith(NO_AVI)}
GOOD = sorted(set(KEPT) - FAILED)
LABEL = {utterance_name(d, k): CLASS_OF_CODE.get(c) for (_, d), codes in DIALOGS.items() for k, c in enumerate(codes)}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("IEMOCAP") / "IEMOCAP_full_release"
    write_release(root)
    wav = root / "Session1" / "sentences" / "wav" / "Ses01M_script01_1" / f"{CORRUPT_WAV}.wav"
    wav.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + bytes(range(40)))
    unlabelled = root / "Session2" / "sentences" / "wav" / UNLABELLED_DIALOG
    unlabelled.mkdir(parents=True)
    write_wav(unlabelled / f"{UNLABELLED_DIALOG}_F000.wav", 0.5, 300)
    return root


@pytest.fixture(scope="module")
def cache(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("iemocap_cache")
    # The parent of IEMOCAP_full_release is accepted as --raw too.
    balance_prepare(["iemocap", "--raw", str(raw.parent), "--out", str(out), "--workers", "1"])
    return out


def test_parse_labels_and_transcriptions_skip_what_is_not_an_utterance():
    labels = parse_labels(
        "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
        "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]\n"
        "C-E2:\tNeutral;\t()\nA-E3:\tval 3; act 2; dom  2;\t()\n\n"
        "[10.0100 - 11.3925]\tSes01F_impro01_M000\texc\t[3.5000, 3.5000, 3.0000]\n",
        "Ses01F_impro01", 1)
    assert [(u.utterance, u.start, u.end, u.emotion, u.speaker) for u in labels] == [
        ("Ses01F_impro01_F000", 6.2901, 8.2357, "neu", "Ses01F"),
        ("Ses01F_impro01_M000", 10.01, 11.3925, "exc", "Ses01M")]
    texts = parse_transcription(
        "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.\nM: [BREATHING]\n\n"
        "Ses01F_impro01_M000 [010.0100-011.3925]: Do you have your forms?\nnot a line\n", "Ses01F_impro01")
    assert texts == {"Ses01F_impro01_F000": "Excuse me.", "Ses01F_impro01_M000": "Do you have your forms?"}
    assert [CLASS_OF_CODE.get(c) for c in ("neu", "ang", "sad", "hap", "exc", "fru")] == [
        "neutral", "angry", "sad", "happy", "happy", None]


def test_frame_times_are_centres_of_the_span():
    assert frame_times(2.0, 5.0, 1) == [3.5]
    assert frame_times(2.0, 5.0, 3) == pytest.approx([2.5, 3.5, 4.5])
    with pytest.raises(ValueError):
        frame_times(5.0, 2.0, 1)


def _bar_height(image) -> int:
    """Rows of the white bar write_video draws in the left 4 columns: (frame index % 48) + 1."""
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    return int((pixels[:, :3].mean(axis=1) > 160).sum())


def test_grab_frames_takes_the_frame_shown_at_each_time(tmp_path):
    avi = tmp_path / "dialog.avi"
    write_video(avi, 4.0, (0, 0, 128), container_format="avi", video_codec="mpeg4", audio_codec=None)
    # Out of order; 0.2 -> 2.5 jumps far enough to seek; 4.5 is past the last frame (3.967 s) but within the
    # tolerance (the last frame), 6.0 is beyond it.
    times = [2.5, 0.2, 3.9, 0.0, 4.5, 6.0, 1.01]
    images = grab_frames(avi, times, short_side=0)
    assert images[5] is None and all(image is not None for k, image in enumerate(images) if k != 5)
    assert images[0].size == (64, 48)
    for t, image in zip(times, images):
        if image is not None:
            index = min(int(np.ceil(30 * t - 0.5)), 119)  # first frame at or after t (half a frame of tolerance)
            assert abs(_bar_height(image) - (index % 48 + 1)) <= 1, t


def test_prepare_writes_the_cache_and_reports_labels_and_bad_files(cache):
    report = (cache / "prepare_report.txt").read_text()
    assert report.startswith(f"balance-prepare iemocap: {len(GOOD)} ok, 0 skipped (already done), 7 failed")
    assert "left out by label: fru 1, xxx 1" in report and "(happy: hap 4, exc 3)" in report
    failures = dict(line.split("\t") for line in report.splitlines() if line.startswith("Ses0"))
    assert set(failures) == FAILED | {UNLABELLED_DIALOG}
    assert failures[CORRUPT_WAV].startswith(
        f"audio: Session1/sentences/wav/Ses01M_script01_1/{CORRUPT_WAV}.wav: unreadable audio")
    assert failures[NO_TEXT] == f"text: Session2/dialog/transcriptions/Ses02F_impro02.txt: no line for {NO_TEXT}"
    assert failures[f"{NO_AVI}_F000"] == f"visual: Session2/dialog/avi/DivX/{NO_AVI}.avi: no such file"
    assert "no labels" in failures[UNLABELLED_DIALOG]

    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_utterances"] == len(GOOD) == 20 and meta["num_failed"] == 7
    assert meta["audio_shape"] == [128, 1024] and meta["frames"] == 3 and meta["left_out"] == {"fru": 1, "xxx": 1}
    with open(cache / "utterances.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["utterance"] for r in rows) == GOOD
    for row in rows:
        assert row["label"] == LABEL[row["utterance"]] == CLASS_OF_CODE[row["emotion"]]
        assert row["speaker"] == row["utterance"][:5] + row["utterance"].rsplit("_", 1)[1][0]
        assert row["text"].startswith(WORDS[row["label"]].capitalize())
        bank = np.load(cache / "audio" / f"{row['utterance']}.npy")
        assert bank.shape == (128, 1024) and bank.dtype == np.float16 and np.isfinite(bank).all()
        assert not bank[:, 60:].any()  # 0.5 s of speech (49 frames), then zero padding
        assert sorted(p.name for p in (cache / "visual" / row["utterance"]).iterdir()) == [
            "00000.jpg", "00001.jpg", "00002.jpg"]
    from PIL import Image

    # The middle frame is the one shown at the middle of the span (bar height, scaled from 48 to 224 rows).
    row = next(r for r in rows if r["utterance"] == "Ses01F_impro01_F001")  # k = 2: span [1.9, 2.4]
    with Image.open(cache / "visual" / row["utterance"] / "00001.jpg") as image:
        assert image.size == (299, 224)
        index = int(np.ceil(30 * 2.15 - 0.5))
        assert abs(_bar_height(image) * 48 / 224 - (index % 48 + 1)) <= 1.5
    assert not list(cache.rglob(".*tmp-*")) and not (cache / ".failures").exists()


def test_prepare_resumes_and_redoes_only_what_is_missing(raw, cache, capsys):
    balance_prepare(["iemocap", "--raw", str(raw), "--out", str(cache), "--workers", "1"])
    assert "0 ok, 20 skipped (already done), 7 failed; 20 usable" in capsys.readouterr().out
    (cache / "audio" / f"{GOOD[3]}.npy").unlink()
    shutil.rmtree(cache / "visual" / GOOD[4])
    balance_prepare(["iemocap", "--raw", str(raw), "--out", str(cache), "--workers", "1"])
    assert "2 ok, 18 skipped (already done), 7 failed; 20 usable" in capsys.readouterr().out
    assert (cache / "audio" / f"{GOOD[3]}.npy").is_file() and (cache / "visual" / GOOD[4] / "00002.jpg").is_file()
    with pytest.raises(SystemExit) as exit_info:  # other parameters into the same cache
        balance_prepare(["iemocap", "--raw", str(raw), "--out", str(cache), "--frames", "1"])
    assert exit_info.value.code == 2


def test_prepare_exits_nonzero_when_nothing_is_usable(tmp_path):
    raw = tmp_path / "raw"
    write_release(raw, {(1, NO_AVI): ["ang"]})
    (raw / "Session1" / "sentences" / "wav" / NO_AVI / f"{NO_AVI}_F000.wav").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare(["iemocap", "--raw", str(raw), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert exit_info.value.code == 1
    report = (tmp_path / "out" / "prepare_report.txt").read_text()
    assert "0 ok, 0 skipped (already done), 1 failed" in report and "empty file" in report
    assert not (tmp_path / "out" / "meta.json").exists()


def test_prepare_names_the_raw_layout(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        balance_prepare(["iemocap", "--raw", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "no Session<n>/ directory" in err and "dialog/EmoEvaluation/<dialog>.txt" in err and "sail.usc.edu" in err


def test_missing_or_incomplete_root_names_layout_command_and_source(tmp_path, raw):
    for root in (tmp_path / "nowhere", raw):
        with pytest.raises(FileNotFoundError) as error:
            IEMOCAPDataModule(root=str(root)).setup()
        message = str(error.value)
        assert "balance-prepare iemocap --raw RAW --out OUT" in message
        assert "sentences/wav/<dialog>/<utterance>.wav" in message and "dialog/avi/DivX/<dialog>.avi" in message
        assert "sail.usc.edu/iemocap" in message and "release form" in message
    assert "looks like the raw release" in message


def _labels(names):
    return [LABEL[n] for n in names]


def test_leave_one_session_out_split(cache):
    dm = IEMOCAPDataModule(root=str(cache), test_session=2)
    dm.setup()
    parts = dm.split_utterances
    assert sorted(sum(parts.values(), [])) == GOOD
    assert {n[:5] for n in parts["test"]} == {"Ses02"} and len(parts["test"]) == 7
    assert {n[:5] for n in parts["train"] + parts["val"]} == {"Ses01"}
    assert not set(parts["train"]) & set(parts["val"])
    # Session 1 holds 4 neutral, 3 angry, 3 sad, 3 happy: the carve takes one of each.
    assert sorted(_labels(parts["val"])) == sorted(CLASSES)
    # The vocabulary is the training split's: a word only session 2 says is unknown.
    assert "zebra" not in dm.vocab and "okay" in dm.vocab
    assert dm.encoder_kwargs == {"text": {"vocab_size": len(dm.vocab)}}
    swapped = IEMOCAPDataModule(root=str(cache), test_session=1)
    swapped.setup()
    assert {n[:5] for n in swapped.split_utterances["test"]} == {"Ses01"} and "zebra" in swapped.vocab
    with pytest.raises(ValueError, match="no training utterances"):
        IEMOCAPDataModule(root=str(cache), test_session=2, val_session=1).setup()
    with pytest.raises(ValueError, match="test_session=5 is not in the cache"):
        IEMOCAPDataModule(root=str(cache)).setup()


def test_random_split_is_pooled_and_seeded(cache):
    def parts(seed):
        dm = IEMOCAPDataModule(root=str(cache), split="random", seed=seed)
        dm.setup()
        return dm.split_utterances

    first = parts(0)
    assert first == parts(0) and first != parts(1)
    assert sorted(sum(first.values(), [])) == GOOD
    assert [len(first[s]) for s in ("train", "val", "test")] == [12, 4, 4]


def test_batch_contract(cache):
    dm = IEMOCAPDataModule(root=str(cache), test_session=2, image_size=32, batch_size=4)
    dm.setup("fit")
    assert dm.modalities == ["audio", "visual", "text"] and dm.num_classes == 4
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"inputs", "label", "index"} and list(batch["inputs"]) == dm.modalities
    assert batch["inputs"]["audio"].shape == (4, 1, 128, 1024) and batch["inputs"]["audio"].dtype == torch.float32
    assert batch["inputs"]["visual"].shape == (4, 1, 3, 32, 32) and batch["inputs"]["visual"].dtype == torch.float32
    assert batch["inputs"]["text"].shape == (4, 64) and batch["inputs"]["text"].dtype == torch.long
    assert batch["label"].tolist() == [CLASSES.index(c) for c in _labels(dm.split_utterances["test"][:4])]
    assert torch.equal(batch["index"], torch.arange(4))
    first = dm.split_utterances["test"][0]
    expected = ["okay", "fine", "<unk>", ",", "take", "0", "."]  # "zebra" is unknown to the training vocabulary
    assert first == "Ses02F_impro02_F000" and dm.vocab.decode(batch["inputs"]["text"][0]) == expected
    train_batch = next(iter(dm.train_dataloader()))
    assert train_batch["inputs"]["visual"].shape == (4, 1, 3, 32, 32)
    view = dm.evaluation_view("train")
    assert torch.equal(view[0]["inputs"]["visual"], view[0]["inputs"]["visual"]) and view[0]["index"] == 0


def test_missing_rate_keeps_one_modality_per_sample(cache):
    dm = IEMOCAPDataModule(root=str(cache), split="random", image_size=32, batch_size=12, missing_rate=0.5)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    present = batch["present"]
    assert present.shape == (12, 3) and present.dtype == torch.bool
    assert present.any(dim=1).all() and not present.all()
    for m, modality in enumerate(dm.modalities):
        dropped = batch["inputs"][modality][~present[:, m]]
        assert not dropped.any()  # zeroed inputs; token ids all padding


DATA = ["data=iemocap", "model=iemocap", "data.test_session=2", "data.image_size=32", "data.batch_size=4",
        "data.num_workers=0"]


def test_model_config_takes_a_batch(cache):
    """The shipped model config (ResNet18s on the filter bank and frames, the text Transformer) on a batch."""
    datamodule, method, logits = model_logits_on_a_batch([*DATA, f"data.root={cache}"])
    assert logits.shape == (4, 4)
    assert method.model.encoders["text"].embedding.num_embeddings == len(datamodule.vocab)


def test_one_training_run_end_to_end(cache, tmp_path):
    # A small CNN on the filter bank and a small text encoder keep this fast (the visual ResNet18 sees 32 x 32
    # frames); test_model_config_takes_a_batch covers the full config. Changed in place, so that the encoders keep
    # the data's modality order.
    small = ["model.encoders.audio._target_=balance.models.SmallCNNEncoder", "+model.encoders.audio.channels=[8,16]",
             "+model.encoders.audio.out_dim=16", "model.encoders.text.embed_dim=16", "model.encoders.text.out_dim=16"]
    results = train_briefly([*DATA, f"data.root={cache}", *small], tmp_path)
    assert {"acc", "acc_audio", "acc_visual", "acc_text"} <= set(results["test"])
