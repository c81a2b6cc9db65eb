"""Shared test setup: keep Weights & Biases offline so no test ever reaches the network."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
