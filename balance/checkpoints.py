"""Reading checkpoints, with errors that name the file: for resuming, evaluating, and methods built on the
checkpoints of earlier runs (e.g. UMT's unimodal teachers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded on the CPU; a missing, empty, truncated or foreign file is refused with its
    path and size."""
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises EOFError, RuntimeError, UnpicklingError, OSError
        raise ValueError(f"ckpt_path {path} ({path.stat().st_size} bytes) is truncated or not a checkpoint: "
                         f"{type(error).__name__}: {error}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"ckpt_path {path} is not a Lightning checkpoint (it holds no state_dict)")
    return checkpoint


def selected_checkpoint(path: str | Path) -> Path:
    """The checkpoint ``path`` names: a ``.ckpt`` file itself, or a finished run's directory, whose
    ``results.json`` names the checkpoint that run selected.

    Raises:
        FileNotFoundError: naming what is missing (no such path; a run directory that has not finished).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    results = path / "results.json"
    if path.is_dir() and results.is_file():
        selected = json.loads(results.read_text()).get("best_checkpoint")
        if selected:
            return Path(selected)
        raise FileNotFoundError(f"{results} names no selected checkpoint")
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a run directory without results.json: that run has not finished "
                                "(train it first, or give its checkpoint file)")
    raise FileNotFoundError(f"{path} is neither a checkpoint file nor a finished run's directory")
