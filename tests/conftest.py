"""Shared test setup: keep Weights & Biases offline so no test ever reaches the network; share the cores among
parallel test workers; a one-thread fixture."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Workers share the cores: each takes its share for torch's threads and for the runs it launches, instead of
    # every worker's threads contending for all of them.
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    torch.set_num_threads(_share)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a loaded machine intra-op threads slow small ops ~5x.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
