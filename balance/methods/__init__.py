"""Training methods: one LightningModule per method, sharing `MultimodalMethod`."""

from balance.methods.base import MultimodalMethod
from balance.methods.joint import JointTraining
from balance.methods.mla import MLA
from balance.methods.mmcosine import MMCosine
from balance.methods.ogm_ge import OGMGE
from balance.methods.resampling import ModalityLevelResampling, SampleLevelResampling, ShapleyResampling

__all__ = [
    "MLA",
    "MMCosine",
    "JointTraining",
    "ModalityLevelResampling",
    "MultimodalMethod",
    "OGMGE",
    "SampleLevelResampling",
    "ShapleyResampling",
]
