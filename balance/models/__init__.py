"""Models: encoders, fusion heads and the `MultimodalModel` that joins them (plain nn.Modules)."""

from balance.models.encoders import (
    MLPEncoder,
    ResNet18Encoder,
    SequenceEncoder,
    SmallCNNEncoder,
    TextEncoder,
    replicate,
)
from balance.models.fusion import (
    ConcatFusion,
    CosineFusion,
    FiLMFusion,
    FusionHead,
    GatedFusion,
    LateFusion,
    SharedHead,
    SumFusion,
)
from balance.dropping import drop_features, zero_input
from balance.models.multimodal import MultimodalModel

__all__ = [
    "ConcatFusion",
    "CosineFusion",
    "FiLMFusion",
    "FusionHead",
    "GatedFusion",
    "LateFusion",
    "MLPEncoder",
    "MultimodalModel",
    "ResNet18Encoder",
    "SequenceEncoder",
    "SharedHead",
    "SmallCNNEncoder",
    "SumFusion",
    "TextEncoder",
    "drop_features",
    "replicate",
    "zero_input",
]
