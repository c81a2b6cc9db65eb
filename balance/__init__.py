"""balance: balanced multimodal learning on PyTorch Lightning and Hydra."""

import warnings

# Lightning's own use of a deprecated torch API; nothing a user of balance can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
