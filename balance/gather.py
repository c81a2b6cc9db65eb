"""Gathering per-sample tables across DDP ranks, so that every rank holds the whole split."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from balance.valuation import ValuationTable


def last_per_index(table: ValuationTable) -> ValuationTable:
    """Keeps one row per sample (its last valuation), e.g. where a distributed sampler repeated a sample to pad
    its shards. The table must be sorted by index (stably)."""
    last = torch.ones(len(table), dtype=torch.bool)
    last[:-1] = table.index[1:] != table.index[:-1]
    return ValuationTable(table.index[last], table.label[last], table.correct[last], table.phi[last],
                          table.modalities)


def gather_table(module: pl.LightningModule, table: ValuationTable) -> ValuationTable:
    """Every rank's shard of a valuation table, concatenated and sorted by index on every rank."""
    if module.trainer.world_size == 1:
        return table
    # Shards differ in length: pad with index -1, gather, drop the padding.
    longest = int(module.all_gather(torch.tensor(len(table), device=module.device)).max())
    pad = longest - len(table)

    def gather(column: torch.Tensor) -> torch.Tensor:
        padded = F.pad(column, (0, 0) * (column.dim() - 1) + (0, pad), value=-1 if column is table.index else 0)
        return module.all_gather(padded.to(module.device)).flatten(0, 1).cpu()

    index, label, correct = gather(table.index), gather(table.label), gather(table.correct.long())
    phi = gather(table.phi)
    valid = index >= 0
    return ValuationTable.sorted_by_index(index[valid], label[valid], correct[valid].bool(), phi[valid],
                                          table.modalities)
