"""balance: balanced multimodal learning on PyTorch Lightning and Hydra."""

import logging
import warnings

# Lightning's own use of a deprecated torch API; nothing a user of balance can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
# Lightning asks for sync_dist on every epoch-level value under DDP; the values balance logs are synced already
# (torchmetrics metrics, reduce_across_ranks, gathered valuation tables) or logged by rank zero only.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist=True\)`")


class _DropLightningAdvert(logging.Filter):
    """Lightning's tip to install its cloud logger, printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropLightningAdvert())
