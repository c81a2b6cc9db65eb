"""One GPU per run when a parallel local launcher (``hydra/launcher=joblib``) runs several on one machine.

Each run that asks for one GPU (``trainer=gpu``) claims the first free GPU through a lock file that it holds until
it ends, so runs in flight never share a device whichever of them finishes first; with more runs in flight than
GPUs, a run waits for one to be freed. (CPU runs need nothing: joblib gives each worker its share of the cores'
threads.) Under SLURM the scheduler assigns the devices itself.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

#: where the per-device lock files live (one directory per user)
LOCK_DIR = Path(tempfile.gettempdir()) / f"balance-devices-{os.getuid()}"


@contextmanager
def device_lock(count: int, lock_dir: Path = LOCK_DIR, poll_s: float = 2.0) -> Iterator[int]:
    """Holds the lock of the first free device of ``count`` (waiting for one if all are held); yields its index."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(count):
            handle = (lock_dir / f"cuda{index}.lock").open("w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if not waited:
            log.info("all %d GPUs are taken by other runs: waiting for one", count)
            waited = True
        time.sleep(poll_s)


def _under_parallel_local_launcher() -> bool:
    if not HydraConfig.initialized():
        return False
    hydra = HydraConfig.get()
    return hydra.mode == RunMode.MULTIRUN and "joblib" in str(hydra.launcher.get("_target_", "")).lower()


@contextmanager
def own_device(cfg: DictConfig) -> Iterator[DictConfig]:
    """``cfg`` with ``trainer.devices`` set to a GPU of its own if this run is one of several that a parallel local
    launcher runs at once on a machine with several GPUs, each asking for one; else ``cfg`` as it is."""
    import torch

    trainer = cfg.get("trainer") or {}
    wants_one_gpu = trainer.get("accelerator") in ("gpu", "cuda") and trainer.get("devices") == 1
    count = torch.cuda.device_count() if wants_one_gpu and _under_parallel_local_launcher() else 0
    if count < 2:
        yield cfg
        return
    with device_lock(count, LOCK_DIR) as index:
        log.info("this run trains on cuda:%d (one GPU per parallel run)", index)
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.trainer.devices = [index]
        yield cfg
