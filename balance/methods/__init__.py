"""Training methods: one LightningModule per method, sharing `MultimodalMethod`."""

from balance.methods.base import MultimodalMethod
from balance.methods.joint import JointTraining

__all__ = ["JointTraining", "MultimodalMethod"]
