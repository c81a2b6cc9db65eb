"""Training methods: one LightningModule per method, sharing `MultimodalMethod`."""

from balance.methods.base import MultimodalMethod
from balance.methods.joint import JointTraining
from balance.methods.mla import MLA

__all__ = ["MLA", "JointTraining", "MultimodalMethod"]
