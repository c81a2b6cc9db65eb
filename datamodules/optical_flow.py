"""Optical flow for the flow modality of action videos (UCF-101): computed from a video with OpenCV (Farneback's
method, or TV-L1 where opencv-contrib is installed) or read from the widely shared precomputed TV-L1 images, and
stored as the two grey images per frame that layout uses (``u``: horizontal, ``v``: vertical motion).

Both ways store a frame's flow as that layout quantises it: each component clipped to +-:data:`BOUND` pixels and
mapped linearly to 0..255, zero motion at 127.5 (:func:`quantise`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.media import MediaError, frame_image, resized_size, video_frames

#: the motion, in pixels per frame, that maps to 0 and 255 (the precomputed TV-L1 images' bound)
BOUND = 20.0
#: the methods that compute flow, and the OpenCV package each needs
METHODS = {"farneback": "opencv-python-headless", "tvl1": "opencv-contrib-python-headless"}
#: OpenCV's Farneback parameters (pyramid scale, levels, window, iterations, polynomial size and sigma): its
#: documentation's example values, the usual choice for action recognition
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2)


def quantise(flow: np.ndarray) -> np.ndarray:
    """``uint8 [2, H, W]`` of a flow field ``float [H, W, 2]`` (``u``, ``v`` in pixels): clipped to +-``BOUND``,
    scaled to 0..255."""
    scaled = (np.clip(flow, -BOUND, BOUND) + BOUND) * (255.0 / (2 * BOUND))
    return np.round(scaled).astype(np.uint8).transpose(2, 0, 1)


def flow_method(method: str):
    """``calc(previous, current) -> float32 [H, W, 2]`` for two grey ``uint8 [H, W]`` images.

    Raises:
        ValueError: an unknown method.
        ImportError: naming the package to install when OpenCV (or its contrib part, for ``tvl1``) is missing.
    """
    if method not in METHODS:
        raise ValueError(f"unknown flow method {method!r}: choose {' or '.join(METHODS)}")
    try:
        import cv2
    except ImportError as error:
        raise ImportError(f"computing optical flow needs OpenCV: pip install -e \".[flow]\" (or pip install "
                          f"{METHODS[method]})") from error
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        # OpenCV keeps its own thread pool: one thread per preparation worker, as torch's (the pool is the
        # parallelism), where the worker sets OMP_NUM_THREADS.
        cv2.setNumThreads(int(os.environ["OMP_NUM_THREADS"]))
    if method == "farneback":
        return lambda previous, current: cv2.calcOpticalFlowFarneback(previous, current, None, *FARNEBACK, 0)
    if not hasattr(cv2, "optflow"):
        raise ImportError("flow method tvl1 needs OpenCV's contrib modules: pip uninstall opencv-python-headless; "
                          "pip install opencv-contrib-python-headless (or use the default, farneback)")
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
    return lambda previous, current: tvl1.calc(previous, current, None)


def _grey(frame) -> np.ndarray:
    return frame.to_ndarray(format="gray")


def _resized(components: np.ndarray, short_side: int | None) -> list:
    from PIL import Image

    images = [Image.fromarray(c) for c in components]
    size = resized_size(images[0].width, images[0].height, short_side)
    return [image.resize(size, Image.BILINEAR) if size != image.size else image for image in images]


def frames_and_flow(path: str | Path, fps: float, short_side: int | None, method: str) -> tuple[list, list]:
    """The frames of a video kept at ``fps`` (as :func:`~datamodules.media.extract_frames` keeps them) and the flow
    at each: ``(rgb images, [(u image, v image), ...])``, PIL images with ``short_side`` pixels on the short side.

    A kept frame's flow is the motion from it to the next frame, computed at the video's own resolution; the last
    frame of a video takes the motion from the frame before it, and a one-frame video no motion.

    Raises:
        MediaError: the video cannot be read (see :func:`~datamodules.media.video_frames`).
    """
    calc = flow_method(method)
    rgb, flow = [], []
    # Decoded frames are kept as they come and turned grey only where a flow needs them (the conversion of every
    # frame cost more than the flow of the kept ones).
    previous = pending = pending_previous = None
    for frame, keep in video_frames(path, fps):
        if pending is not None:
            flow.append(_resized(quantise(calc(_grey(pending), _grey(frame))), short_side))
            pending = None
        if keep:
            rgb.append(frame_image(frame, short_side))
            pending, pending_previous = frame, previous
        previous = frame
    if pending is not None:
        grey = _grey(pending)
        motion = calc(_grey(pending_previous), grey) if pending_previous is not None else \
            np.zeros((*grey.shape, 2), np.float32)
        flow.append(_resized(quantise(motion), short_side))
    return rgb, flow


def kept_frame_numbers(path: str | Path, fps: float, short_side: int | None) -> tuple[list, list[int]]:
    """The frames of a video kept at ``fps`` (RGB PIL images, ``short_side`` pixels on the short side) and their
    numbers among the video's decoded frames (0-based), for reading precomputed flow at the same instants."""
    rgb, numbers = [], []
    for number, (frame, keep) in enumerate(video_frames(path, fps)):
        if keep:
            rgb.append(frame_image(frame, short_side))
            numbers.append(number)
    return rgb, numbers


def precomputed_flow(u_dir: Path, v_dir: Path, numbers: Sequence[int], short_side: int | None) -> list:
    """The precomputed flow at the decoded frame ``numbers``: ``[(u image, v image), ...]`` from ``u_dir`` and
    ``v_dir`` (one grey JPEG per pair of consecutive frames, ``frame000001.jpg`` the motion from the first frame to
    the second; file names ordered by their frame number), resized to ``short_side``; frame numbers past the last
    image take the last.

    Raises:
        MediaError: a folder is missing or empty, the two hold different counts, or an image is unreadable.
    """
    from PIL import Image

    files = []
    for folder in (u_dir, v_dir):
        if not folder.is_dir():
            raise MediaError(f"{folder}: no such precomputed flow folder")
        found = sorted(folder.glob("*.jpg"), key=lambda f: (len(f.stem), f.stem))
        if not found:
            raise MediaError(f"{folder}: no flow images (*.jpg)")
        files.append(found)
    if len(files[0]) != len(files[1]):
        raise MediaError(f"{u_dir} holds {len(files[0])} flow images and {v_dir} {len(files[1])}")
    flow = []
    for number in numbers:
        k = min(number, len(files[0]) - 1)
        try:
            pair = [np.asarray(Image.open(f[k]).convert("L")) for f in files]
        except OSError as error:
            raise MediaError(f"{files[0][k]}: unreadable flow image ({error})") from error
        flow.append(_resized(np.stack(pair), short_side))
    return flow
