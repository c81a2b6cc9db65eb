"""AV-Digits: handwritten digit images paired with spoken digit words, built offline.

Images are scikit-learn's bundled digits (1,797 real 8 x 8 scans). Each image is paired with several spoken
utterances of its digit's name, synthesised by eSpeak NG with a random voice, speaking rate and pitch, mixed with
white noise at a random signal-to-noise ratio and stored as log-mel spectrograms. Preparation runs once into a
cache directory (``python -m datamodules.avdigits --out DIR``, or automatically on first use); loading never
synthesises or computes a spectrogram again.

The defaults make audio the dominant modality (clean enough to learn fast) and the images weak (heavy pixel noise
and an occluding square), while each modality alone stays below what the two reach together: the imbalance the
papers study on CREMA-D and Kinetics-Sounds, on a CPU in minutes.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torchaudio
from torch.utils.data import Dataset
from tqdm import tqdm

from datamodules.base import InMemoryDataset, MultimodalDataModule
from datamodules.splits import stratified_split

log = logging.getLogger(__name__)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BASE_VOICES = ("en", "en-029", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp", "en-us", "en-us-nyc")
VOICE_VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5", "+croak",
                  "+klatt", "+klatt2", "+klatt3", "+whisper")
CACHE_VERSION = 1
LAYOUT = """\
<root>/
  meta.json        preparation parameters and shapes
  utterances.csv   one row per utterance: image, label, voice, rate, pitch, snr_db
  logmel.npy       float16 [utterances, n_mels, frames] log-mel spectrograms"""


def default_cache_root() -> Path:
    """``$BALANCE_CACHE/avdigits`` or ``~/.cache/balance/avdigits``."""
    return Path(os.environ.get("BALANCE_CACHE", Path.home() / ".cache" / "balance")) / "avdigits"


def _synthesise_chunk(jobs: list[tuple[str, str, int, int]]) -> list[np.ndarray]:
    from datamodules.speech import synthesize

    return [synthesize(word, voice=voice, rate=rate, pitch=pitch) for word, voice, rate, pitch in jobs]


def _fit_length(wave: np.ndarray, length: int) -> np.ndarray:
    """Centres the utterance in ``length`` samples (zero-padded, or cropped around the middle)."""
    if len(wave) >= length:
        start = (len(wave) - length) // 2
        return wave[start : start + length]
    out = np.zeros(length, dtype=wave.dtype)
    start = (length - len(wave)) // 2
    out[start : start + len(wave)] = wave
    return out


def prepare(
    out: str | Path,
    utterances_per_image: int = 3,
    snr_db: Sequence[float] = (-3.0, 12.0),
    rate: Sequence[int] = (130, 260),
    pitch: Sequence[int] = (15, 85),
    duration: float = 1.0,
    n_mels: int = 64,
    frames: int = 64,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Synthesises the utterances and writes the cache (see ``LAYOUT``); returns ``out``.

    Args:
        out: the cache directory to write.
        utterances_per_image: spoken utterances paired with every image.
        snr_db: range of the per-utterance signal-to-noise ratio of the added white noise (dB).
        rate: range of the speaking rate (words per minute).
        pitch: range of the pitch (0-99).
        duration: seconds of audio kept per utterance (centred, padded or cropped).
        n_mels: mel bands.
        frames: spectrogram frames over ``duration``.
        seed: seed of every random choice.
        workers: synthesis processes (default: all cores).
    """
    from sklearn.datasets import load_digits

    from datamodules.speech import SAMPLE_RATE

    out = Path(out)
    params = _prep_params(utterances_per_image, snr_db, rate, pitch, duration, n_mels, frames, seed)
    labels = load_digits().target
    rng = np.random.default_rng(seed)
    num = len(labels) * utterances_per_image
    rows = {
        "image": np.repeat(np.arange(len(labels)), utterances_per_image),
        "voice": [rng.choice(BASE_VOICES) + rng.choice(VOICE_VARIANTS) for _ in range(num)],
        "rate": rng.integers(rate[0], rate[1] + 1, size=num),
        "pitch": rng.integers(pitch[0], pitch[1] + 1, size=num),
        "snr_db": rng.uniform(snr_db[0], snr_db[1], size=num),
    }
    rows["label"] = labels[rows["image"]]
    jobs = [
        (DIGIT_WORDS[y], str(v), int(r), int(p))
        for y, v, r, p in zip(rows["label"], rows["voice"], rows["rate"], rows["pitch"])
    ]

    workers = workers or os.cpu_count() or 1
    chunks = [jobs[i : i + 64] for i in range(0, num, 64)]
    waves: list[np.ndarray] = []
    desc = f"AV-Digits: synthesising {num} utterances"
    if workers > 1:
        # spawn: eSpeak NG keeps global state, so each worker loads its own copy of the library.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for chunk in tqdm(pool.map(_synthesise_chunk, chunks), total=len(chunks), desc=desc):
                waves.extend(chunk)
    else:
        for chunk in tqdm(chunks, desc=desc):
            waves.extend(_synthesise_chunk(chunk))

    length = int(duration * SAMPLE_RATE)
    clean = np.stack([_fit_length(w, length) for w in waves]).astype(np.float32) / 32768.0
    speech_power = np.array([np.mean(w.astype(np.float32) ** 2) / 32768.0**2 for w in waves])
    noise_std = np.sqrt(speech_power / 10 ** (rows["snr_db"] / 10))
    noisy = clean + rng.standard_normal(clean.shape).astype(np.float32) * noise_std[:, None].astype(np.float32)
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=1024, hop_length=length // frames, n_mels=n_mels
    )
    spectrograms = []
    for start in range(0, num, 512):
        batch = mel(torch.from_numpy(noisy[start : start + 512]))[..., :frames]
        spectrograms.append(torch.log(batch + 1e-6).to(torch.float16))

    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "logmel.npy", torch.cat(spectrograms).numpy())
    with open(out / "utterances.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "voice", "rate", "pitch", "snr_db"])
        for i in range(num):
            writer.writerow([rows["image"][i], rows["label"][i], rows["voice"][i], rows["rate"][i],
                             rows["pitch"][i], f"{rows['snr_db'][i]:.2f}"])
    # meta.json last: its presence marks a complete cache.
    meta = {"version": CACHE_VERSION, "params": params, "num_utterances": num, "sample_rate": SAMPLE_RATE}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


def _prep_params(utterances_per_image, snr_db, rate, pitch, duration, n_mels, frames, seed) -> dict:
    return {
        "utterances_per_image": int(utterances_per_image),
        "snr_db": [float(x) for x in snr_db],
        "rate": [int(x) for x in rate],
        "pitch": [int(x) for x in pitch],
        "duration": float(duration),
        "n_mels": int(n_mels),
        "frames": int(frames),
        "seed": int(seed),
    }


class AVDigitsDataModule(MultimodalDataModule):
    """Audio (log-mel ``[1, n_mels, frames]``) + visual (digit image ``[1, 8, 8]``), 10 classes.

    Samples are (image, utterance) pairs; the split keeps all utterances of an image in one part.

    Args:
        root: the prepared cache; ``None`` uses ``~/.cache/balance/avdigits/<hash of the preparation
            arguments>``, prepared on first use. An explicit root that does not exist is prepared too; one that
            exists with another layout or other preparation arguments is an error.
        utterances_per_image: see :func:`prepare`.
        snr_db: see :func:`prepare`.
        rate: see :func:`prepare`.
        pitch: see :func:`prepare`.
        prepare_seed: seed of the synthesis.
        visual_noise: std of the Gaussian noise added to the images (pixels scaled to [0, 1]).
        occlusion: side of a random square (in pixels of the 8 x 8 image) blanked in every image (0 = none).
        val_fraction: fraction of images in validation.
        test_fraction: fraction of images in test.
        **kwargs: the base datamodule's arguments.
    """

    modalities = ["audio", "visual"]
    num_classes = 10

    def __init__(
        self,
        root: str | None = None,
        utterances_per_image: int = 3,
        snr_db: Sequence[float] = (-3.0, 12.0),
        rate: Sequence[int] = (130, 260),
        pitch: Sequence[int] = (15, 85),
        prepare_seed: int = 0,
        visual_noise: float = 0.5,
        occlusion: int = 4,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.params = _prep_params(utterances_per_image, snr_db, rate, pitch, 1.0, 64, 64, prepare_seed)
        if root is None:
            digest = hashlib.sha1(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:10]
            root = default_cache_root() / f"v{CACHE_VERSION}-{digest}"
        self.root = Path(root).expanduser()
        self.visual_noise = visual_noise
        self.occlusion = occlusion
        self.fractions = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}

    def _check_root(self) -> bool:
        """True if the cache is complete and matches; False if it is absent (to be prepared); raises otherwise."""
        command = f"python -m datamodules.avdigits --out {self.root}"
        meta_path = self.root / "meta.json"
        if not self.root.exists() or (not meta_path.exists() and not any(self.root.iterdir())):
            return False
        missing = [n for n in ("meta.json", "utterances.csv", "logmel.npy") if not (self.root / n).exists()]
        if missing:
            raise FileNotFoundError(
                f"{self.root} is not an AV-Digits cache (missing {missing}). Expected layout:\n{LAYOUT}\n"
                f"Prepare it with: {command} (or leave data.root unset to use the default cache)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("params") != self.params:
            raise ValueError(
                f"{self.root} was prepared with {meta.get('params')} (version {meta.get('version')}), not "
                f"{self.params} (version {CACHE_VERSION}): point data.root elsewhere or delete it and run {command}"
            )
        return True

    def prepare_data(self) -> None:
        if not self._check_root():
            p = self.params
            log.info("preparing AV-Digits in %s (once)", self.root)
            # Written beside the cache and renamed into place, so that runs started together (a sweep, two test
            # workers) never read a half-written cache: each prepares its own, the first rename wins.
            self.root.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{self.root.name}-", dir=self.root.parent))
            try:
                prepare(staging, p["utterances_per_image"], p["snr_db"], p["rate"], p["pitch"], p["duration"],
                        p["n_mels"], p["frames"], p["seed"])
                try:
                    staging.rename(self.root)
                except OSError:
                    if not self._check_root():  # not another run's finished cache: a real failure
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def build_datasets(self) -> dict[str, Dataset]:
        from sklearn.datasets import load_digits

        self.prepare_data()
        with open(self.root / "utterances.csv") as f:
            rows = list(csv.DictReader(f))
        image_of = np.array([int(r["image"]) for r in rows])
        labels = np.array([int(r["label"]) for r in rows])
        audio = torch.from_numpy(np.load(self.root / "logmel.npy")).float().unsqueeze(1)
        images = torch.from_numpy(load_digits().images).float() / 16.0
        if not np.array_equal(load_digits().target[image_of], labels):
            raise ValueError(f"{self.root}/utterances.csv does not match scikit-learn's digits: re-prepare it")

        parts = stratified_split(labels, self.fractions, self.seed, groups=image_of)
        self.split_images = {split: image_of[idx] for split, idx in parts.items()}
        visual = self._corrupt(images[image_of]).unsqueeze(1)
        train = parts["train"]
        # Standardise with training statistics only.
        audio_mean, audio_std = audio[train].mean(), audio[train].std()
        visual_mean, visual_std = visual[train].mean(), visual[train].std()
        audio = (audio - audio_mean) / audio_std
        visual = (visual - visual_mean) / visual_std
        labels_t = torch.from_numpy(labels)
        return {
            split: InMemoryDataset({"audio": audio[idx], "visual": visual[idx]}, labels_t[idx])
            for split, idx in parts.items()
        }

    def _corrupt(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel noise and an occluding square per sample, fixed by the seed (the same in every epoch)."""
        generator = torch.Generator().manual_seed(self.seed)
        out = images + self.visual_noise * torch.randn(images.shape, generator=generator)
        if self.occlusion > 0:
            side = images.shape[-1]
            corners = torch.randint(0, side - self.occlusion + 1, (len(images), 2), generator=generator)
            rows = torch.arange(side)
            inside_r = (rows >= corners[:, :1]) & (rows < corners[:, :1] + self.occlusion)
            inside_c = (rows >= corners[:, 1:]) & (rows < corners[:, 1:] + self.occlusion)
            out = out.masked_fill(inside_r[:, :, None] & inside_c[:, None, :], 0.0)
        return out


def prepare_main(argv: Sequence[str] | None = None) -> None:
    """``balance-prepare avdigits --out DIR`` (or ``python -m datamodules.avdigits --out DIR``): prepare the cache."""
    parser = argparse.ArgumentParser(prog="balance-prepare avdigits", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="cache directory to write")
    parser.add_argument("--utterances-per-image", type=int, default=3)
    parser.add_argument("--snr-db", type=float, nargs=2, default=(-3.0, 12.0))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    out = prepare(args.out, args.utterances_per_image, args.snr_db, seed=args.seed, workers=args.workers)
    print(f"AV-Digits cache written to {out}; train with: python train.py data.root={out}")


if __name__ == "__main__":
    prepare_main()
