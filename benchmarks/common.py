"""What the benchmark scripts share: timing with device synchronisation, a quiet Lightning, the composed config,
and the machine line their README figures name."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from balance.environment import cpu_model

CONF = Path(__file__).resolve().parents[1] / "conf"
# Read at import, before a script's --threads changes it.
DEFAULT_THREADS = torch.get_num_threads()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes, with the device's queued work finished before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def quiet() -> None:
    """Silences Lightning's info messages and the warnings it gives for a CPU run without workers."""
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


def load_config(overrides: list[str]):
    """The composed ``conf/train.yaml`` with ``overrides``, as ``python train.py <overrides>`` would see it."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train", overrides=overrides)


def machine() -> str:
    """torch, Lightning, CPU count and model, torch threads: the line the README's machine notes come from."""
    cpu = cpu_model()
    threads = "torch's default" if torch.get_num_threads() == DEFAULT_THREADS else "set with --threads"
    return (f"torch {torch.__version__}, pytorch_lightning {pl.__version__}, {os.cpu_count()} CPUs ({cpu}), "
            f"torch threads {torch.get_num_threads()} ({threads}), Python {platform.python_version()}")


def add_machine_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """``--threads`` (and ``--device`` when ``device``): what a benchmark runs on."""
    if device:
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own, one per core); 1 is steadier on a "
                             "machine shared with other work")


def apply_machine_arguments(args: argparse.Namespace) -> float:
    """Sets ``--threads``; warns on stderr when other work loads the CPU a CPU benchmark runs on.

    Returns:
        The 1-minute load average before the benchmark (for :func:`load_line`).
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    before = os.getloadavg()[0]
    if getattr(args, "device", "cpu") == "cpu" and before > 0.5:
        print(f"warning: the 1-minute load average is {before:.2f} before the benchmark: other processes compete "
              "for the CPU (with torch's default threads, one per core, contention slows small ops erratically)",
              file=sys.stderr)
    return before


def load_line(before: float) -> str:
    """The load averages before and after a benchmark, printed under its table."""
    return f"1-minute load average: {before:.2f} before, {os.getloadavg()[0]:.2f} after (this process included)."
