"""What a run's numbers depend on besides its config: the machine, the device, the torch build and the number of
CPU threads (a run is deterministic for a seed only with all of them fixed). ``results.json`` records it and
``balance-reproduce`` states it in its tables."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string where that is not readable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_environment(device: torch.device) -> dict[str, Any]:
    """``{"device", "cpu", "threads", "torch"}`` of this process: ``device`` is the GPU's name when the run's
    ``device`` is one, else ``cpu``; ``threads`` is torch's intra-op thread count."""
    import torch  # here: balance-reproduce reads the other functions without loading torch

    gpu = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "cpu": cpu_model(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def describe(environment: dict[str, Any]) -> str:
    """One line for a table: ``1 torch thread on AMD EPYC ... (cpu), torch 2.14.1``."""
    threads = environment.get("threads")
    count = f"{threads} torch thread{'s' if threads != 1 else ''}"
    return f"{count} on {environment.get('cpu', '?')} ({environment.get('device', '?')}), torch " \
           f"{environment.get('torch', '?')}"
