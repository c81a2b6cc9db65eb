"""UCF-101's preparation of one clip: the frames with the optical flow at them, against the frames alone.

On a synthetic clip of UCF-101's format and average length (320 x 240, 25 fps, 7.2 s, MPEG-4 in AVI: a texture
panning 2 pixels right and 1 down per frame), one process, one OpenCV thread (as a preparation worker has):

- ``frames``: the RGB frames at 1 fps (:func:`datamodules.media.extract_frames`), what every video preparation does;
- ``frames + farneback``: the frames and OpenCV's Farneback flow at each (:func:`datamodules.optical_flow.
  frames_and_flow`), ``balance-prepare ucf101``'s default;
- ``frames + tvl1``: the same with OpenCV contrib's TV-L1, where ``cv2.optflow`` exists.

The variants take turns (in rotating order), each time the median of ``--repeats``. Prints a markdown table and
the one-core time of the 13,320 clips of UCF-101 at each rate.

    python benchmarks/ucf101_preparation.py --repeats 5
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine
from datamodules.media import extract_frames
from datamodules.optical_flow import frames_and_flow

CLIPS = 13_320


def write_clip(path: Path, seconds: float = 7.2, fps: int = 25, size: tuple[int, int] = (320, 240)) -> None:
    import av

    y, x = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = size[0], size[1], "yuv420p", 1_500_000
        for i in range(int(seconds * fps)):
            grey = 128 + 50 * np.sin((x - 2 * i) / 4.0) * np.cos((y - i) / 5.0) + 40 * np.sin((x + y - 3 * i) / 7.0)
            image = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import cv2

    cv2.setNumThreads(1)
    directory = Path(tempfile.mkdtemp(prefix="ucf101_bench_"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / "v_Bench_g01_c01.avi"
    write_clip(path)
    variants = {"frames": lambda: extract_frames(path, 1.0, 224),
                "frames + farneback": lambda: frames_and_flow(path, 1.0, 224, "farneback")}
    if hasattr(cv2, "optflow"):
        variants["frames + tvl1"] = lambda: frames_and_flow(path, 1.0, 224, "tvl1")
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["frames"])
    print(f"\nUCF-101 preparation of a 7.2 s 320x240 clip, one process, one OpenCV thread, median of {args.repeats}; "
          f"{machine()}\n")
    print("| variant | s per clip | x the frames alone | 13,320 clips on one core (h) |")
    print("| --- | ---: | ---: | ---: |")
    for name, spent in times.items():
        median = statistics.median(spent)
        print(f"| {name} | {median:.3f} | {median / base:.1f} | {median * CLIPS / 3600:.1f} |")


if __name__ == "__main__":
    main()
