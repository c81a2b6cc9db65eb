"""Prepared CREMA-D loading against decoding audio and computing the STFT per item (target: at least 5x).

Writes ``--clips`` synthetic clips in CREMA-D's raw layout (``AudioWAV/<clip>.wav``: 16 kHz mono 16-bit,
1.5-3.5 s; ``VideoFlash/<clip>.flv``: 480 x 360, 30 fps, Sorenson video + mp3 audio, as the real files), runs
``balance-prepare crema_d`` on them, then times per-item loading (one process, one thread, items read in order,
``__getitem__`` only, no collation) of:

- ``prepared``: :class:`ClipDataset` as training uses it (``data.store=packed``, the default): the float16
  spectrogram and one 1 fps frame (224 short side, decoded) read from the memory-mapped packs, with the training
  transforms (RandomResizedCrop 224 + flip + normalise);
- ``prepared, files``: the same with ``data.store=files``: the cache's ``.npy`` (``np.load``) and JPEG file;
- ``reference``: the reference loaders' way (OGM-GE's ``CramedDataset``, MLA's): decode the wav, resample to
  22,050 Hz (torchaudio's default sinc filter, cheaper than the ``kaiser_best`` filter the preparation and
  librosa < 0.10 use, so the ratio errs low), tile to 3 s, clip, STFT (n_fft 512, hop 353), ``log(|S| + 1e-7)``; the
  frame exactly as ``prepared`` (same JPEG, same transforms), so the difference is the audio path alone;
- ``reference, OGM-GE frames``: as ``reference`` but with the frame as OGM-GE stores and reads it: a full
  480 x 360 JPEG opened with PIL and transformed with torchvision's PIL transforms;

and the audio path alone (``np.load`` against decode + resample + STFT). Within a repeat the variants take turns
item by item, so that drift in a shared machine's speed hits all of them alike; each figure is the median over
``--repeats``. Prints a markdown table.

    python benchmarks/crema_d_loading.py                       # 200 clips, 5 repeats
    python benchmarks/crema_d_loading.py --clips 500 --repeats 3 --keep /tmp/crema_d_bench
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ACTORS = range(1001, 1092)
SENTENCES = ("DFA", "IEO", "IOM", "ITH", "ITS", "IWL", "IWW", "MTI", "TAI", "TIE", "TSI", "WSI")
EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
WAV_RATE = 16000


def clip_ids(count: int) -> list[str]:
    ids = []
    for i in range(count):
        actor = ACTORS[i % len(ACTORS)]
        ids.append(f"{actor}_{SENTENCES[(i // len(ACTORS)) % 12]}_{EMOTIONS[i % 6]}_XX")
    return sorted(set(ids))


def write_clip(raw: Path, clip: str, seconds: float, rng: np.random.Generator, size=(480, 360), fps=30) -> None:
    import av
    import soundfile

    t = np.arange(int(seconds * WAV_RATE)) / WAV_RATE
    voice = np.sin(2 * np.pi * rng.uniform(100, 300) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    wave = 0.3 * voice + 0.02 * rng.standard_normal(len(t))
    soundfile.write(raw / "AudioWAV" / f"{clip}.wav", wave.astype(np.float32), WAV_RATE, subtype="PCM_16")

    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, int(rng.integers(256)))], -1)
    base = np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)  # some texture
    with av.open(str(raw / "VideoFlash" / f"{clip}.flv"), "w", format="flv") as container:
        video = container.add_stream("flv", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.bit_rate = 400_000
        audio = container.add_stream("mp3", rate=22050)
        for i in range(int(seconds * fps)):
            image = base.copy()
            cy, cx = height // 2 + int(40 * math.sin(i / 5)), width // 2 + int(60 * math.cos(i / 7))
            image[cy - 60 : cy + 60, cx - 45 : cx + 45] = (220, 180, 150)  # a moving "face"
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        samples = np.interp(np.arange(int(seconds * 22050)) / 22050, t, wave).astype(np.float32)
        for start in range(0, len(samples), 1152):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1152], format="flt", layout="mono")
            frame.sample_rate, frame.pts = 22050, start
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)


def reference_audio(path: Path):
    """The reference loaders' audio, per item: decode, resample to 22,050 Hz, tile to 3 s, clip, STFT, log."""
    import soundfile
    import torch
    import torchaudio.functional as AF

    samples, rate = soundfile.read(str(path), dtype="float32")
    wave = AF.resample(torch.from_numpy(samples), rate, 22050)
    tiled = torch.clamp(wave.repeat(3)[: 22050 * 3], -1.0, 1.0)
    spectrum = torch.stft(tiled, n_fft=512, hop_length=353, window=torch.hann_window(512), center=True,
                          pad_mode="reflect", return_complex=True)
    return torch.log(spectrum.abs() + 1e-7).unsqueeze(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None, help="preparation processes (default: all cores)")
    parser.add_argument("--keep", default=None, help="write the clips and caches here and keep them")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image
    from torchvision import transforms as T

    from datamodules.clip_packs import clip_packs
    from datamodules.clips import ClipDataset
    from datamodules.crema_d import parse_clip, prepare
    from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD
    from datamodules.media import extract_frames, save_frames

    torch.set_num_threads(1)
    if args.keep:
        work = Path(args.keep)
    else:
        work = Path(tempfile.mkdtemp(prefix="crema_d_bench_"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    raw, out, full = work / "raw", work / "cache", work / "frames_full"
    (raw / "AudioWAV").mkdir(parents=True, exist_ok=True)
    (raw / "VideoFlash").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    clips = clip_ids(args.clips)
    start = time.perf_counter()
    for clip in clips:
        if not (raw / "VideoFlash" / f"{clip}.flv").exists():
            write_clip(raw, clip, float(rng.uniform(1.5, 3.5)), rng)
    print(f"wrote {len(clips)} clips in {time.perf_counter() - start:.1f} s ({work})", file=sys.stderr)

    start = time.perf_counter()
    report = prepare(raw, out, workers=args.workers)
    prep_seconds = time.perf_counter() - start
    preparation = (f"preparation: {len(report.ok) / prep_seconds:.1f} clips/s ({len(report.ok)} clips, "
                   f"{args.workers or os.cpu_count()} workers)" if report.ok else "preparation: reused the cache")
    for clip in clips:  # OGM-GE's own frames: full resolution
        if not (full / clip).is_dir():
            save_frames(extract_frames(raw / "VideoFlash" / f"{clip}.flv", short_side=0, max_frames=1), full / clip)

    frames = [len(list((out / "visual" / c).glob("*.jpg"))) for c in clips]
    labels = [EMOTIONS.index(parse_clip(c)[1]) for c in clips]
    packs = clip_packs(out, clips, frames, out / "packed", frames=ClipDataset.frame_modalities,
                      arrays=ClipDataset.array_modalities)
    prepared = ClipDataset(out, clips, labels, frames, num_frames=1, image_size=224, train=True, packs=packs)
    prepared_files = ClipDataset(out, clips, labels, frames, num_frames=1, image_size=224, train=True)
    pil_transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def prepared_item(i):
        return prepared[i]

    def prepared_files_item(i):
        return prepared_files[i]

    def reference_item(i):
        audio = reference_audio(raw / "AudioWAV" / f"{clips[i]}.wav")
        visual = prepared.transforms["visual"](prepared_frames(i))
        return audio, visual

    def prepared_frames(i):
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        return decode_jpeg(read_file(str(out / "visual" / clips[i] / "00000.jpg")), mode=ImageReadMode.RGB)[None]

    def reference_ogm_item(i):
        audio = reference_audio(raw / "AudioWAV" / f"{clips[i]}.wav")
        with Image.open(full / clips[i] / "00000.jpg") as image:
            visual = pil_transform(image.convert("RGB"))[None]
        return audio, visual

    def prepared_audio(i):
        return torch.from_numpy(np.load(out / "audio" / f"{clips[i]}.npy")).float().unsqueeze(0)

    def reference_audio_only(i):
        return reference_audio(raw / "AudioWAV" / f"{clips[i]}.wav")

    # Same tensors from both audio paths (float16 cache against float32 on the fly; resampler filters differ).
    a, b = prepared_audio(0), reference_audio_only(0)
    assert a.shape == b.shape == (1, 257, 188), (a.shape, b.shape)

    variants = {
        "prepared": prepared_item,
        "prepared, files": prepared_files_item,
        "reference": reference_item,
        "reference, OGM-GE frames": reference_ogm_item,
        "prepared, audio only": prepared_audio,
        "reference, audio only": reference_audio_only,
    }
    for fn in variants.values():  # warm-up (imports, allocator, filter caches)
        fn(0)
    totals = {name: [] for name in variants}
    for _ in range(args.repeats):
        spent = dict.fromkeys(variants, 0.0)
        for i in range(len(clips)):
            for name, fn in variants.items():
                begin = time.perf_counter()
                fn(i)
                spent[name] += time.perf_counter() - begin
        for name in variants:
            totals[name].append(spent[name])
    rate = {name: len(clips) / statistics.median(t) for name, t in totals.items()}

    rows = [
        ("prepared cache, packed: spectrogram + 1 decoded frame, training transforms", "prepared", None),
        ("prepared cache, files: np.load + the frame's JPEG (data.store=files)", "prepared, files", None),
        ("decode wav + resample + STFT per item, decode the same frame's JPEG", "reference", "prepared"),
        ("decode wav + resample + STFT per item, OGM-GE's 480x360 frame via PIL", "reference, OGM-GE frames",
         "prepared"),
        ("prepared cache, audio only (np.load)", "prepared, audio only", None),
        ("decode wav + resample + STFT, audio only", "reference, audio only", "prepared, audio only"),
    ]
    print(f"\nCREMA-D-layout loading, {len(clips)} synthetic clips (1.5-3.5 s, 16 kHz wav, 480x360 flv), one "
          f"process, one thread, median of {args.repeats} passes; torch {torch.__version__}, {os.cpu_count()} "
          f"cores; {preparation}\n")
    print("| loader | items/s | prepared is faster by |")
    print("| --- | ---: | ---: |")
    for label, name, against in rows:
        ratio = f"{rate[against] / rate[name]:.1f}x" if against else ""
        print(f"| {label} | {rate[name]:.0f} | {ratio} |")
    print(f"\nprepared from the files (data.store=files) is faster than the reference (same frame) by "
          f"{rate['prepared, files'] / rate['reference']:.1f}x")
    jpeg_bytes = sum(p.stat().st_size for c in clips for p in (out / "visual" / c).glob("*.jpg"))
    audio_bytes = sum((out / "audio" / f"{c}.npy").stat().st_size for c in clips)
    per = 1e3 * len(clips)
    print(f"\ndisk per clip ({sum(frames) / len(clips):.2f} frames at 1 fps): spectrogram {audio_bytes / per:.0f} kB, "
          f"JPEG frames {jpeg_bytes / per:.0f} kB; packs: decoded frames "
          f"{packs.frames['visual'].nbytes / per:.0f} kB, audio {packs.arrays['audio'].nbytes / per:.0f} kB")


if __name__ == "__main__":
    main()
