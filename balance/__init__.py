"""balance: balanced multimodal learning on PyTorch Lightning and Hydra."""

import logging
import warnings

# Lightning's own use of a deprecated torch API; nothing a user of balance can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


class _DropLightningAdvert(logging.Filter):
    """Lightning's tip to install its cloud logger, printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropLightningAdvert())
