"""Gathering per-sample rows and valuation tables across DDP ranks, so that every rank holds the whole split."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from balance.valuation import ValuationTable


def last_per_index(table: ValuationTable) -> ValuationTable:
    """Keeps one row per sample (its last valuation), e.g. where a distributed sampler repeated a sample to pad
    its shards. The table must be sorted by index (stably)."""
    last = torch.ones(len(table), dtype=torch.bool)
    last[:-1] = table.index[1:] != table.index[:-1]
    return ValuationTable(table.index[last], table.label[last], table.correct[last], table.phi[last],
                          table.modalities)


def gather_rows(module: pl.LightningModule, rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` (first axis: samples; the shards may differ in length), concatenated in rank order,
    on the CPU; ``rows`` itself on one process."""
    if module.trainer.world_size == 1:
        return rows.cpu()
    rows = rows.to(module.device)
    counts = module.all_gather(torch.tensor(len(rows), device=module.device))
    # all_gather needs equal shapes: pad each shard to the longest, then keep each rank's own rows.
    padded = rows.new_zeros((int(counts.max()), *rows.shape[1:]))
    padded[:len(rows)] = rows
    gathered = module.all_gather(padded)
    return torch.cat([gathered[rank, :int(count)] for rank, count in enumerate(counts)]).cpu()


def gather_table(module: pl.LightningModule, table: ValuationTable) -> ValuationTable:
    """Every rank's shard of a valuation table, concatenated and sorted by index on every rank."""
    if module.trainer.world_size == 1:
        return table
    index, label, correct, phi = (gather_rows(module, column) for column in
                                  (table.index, table.label, table.correct.long(), table.phi))
    return ValuationTable.sorted_by_index(index, label, correct.bool(), phi, table.modalities)
