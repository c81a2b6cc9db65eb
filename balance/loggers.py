"""Logger factories that need more than a constructor call."""

from __future__ import annotations

import netrc
import os
from typing import Any

from pytorch_lightning.loggers import WandbLogger


def wandb_is_logged_in() -> bool:
    """True when W&B credentials exist (``WANDB_API_KEY`` or a netrc entry written by ``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return any("wandb" in host for host in netrc.netrc().hosts)
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A W&B logger that runs offline unless the user is logged in (or ``offline`` says otherwise).

    ``WANDB_MODE=offline`` in the environment always wins, as in W&B itself.
    """
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_is_logged_in()
    logger = WandbLogger(offline=offline, **kwargs)
    if logger._wandb_init.get("anonymous") is None:
        # Lightning always passes the key; W&B warns on every run that it has no effect.
        logger._wandb_init.pop("anonymous")
    return logger
