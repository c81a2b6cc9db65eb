"""The results table printed at the end of a run."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.table import Table


def format_results(results: dict[str, Any], modalities: list[str]) -> str:
    """A table with one row per split: fused accuracy, each modality's accuracy, macro-F1, loss, then any other
    metric the method reports."""
    columns = ["acc", *[f"acc_{m}" for m in modalities], "f1", "loss"]
    # Method-specific figures (e.g. MLA's fusion weights) follow the common ones.
    columns += sorted({k for split in ("val", "test") for k in results.get(split, {})} - set(columns))
    epoch = results.get("best_epoch")
    title = f"{results.get('selection', '')}" + (f" (epoch {epoch})" if epoch is not None else "")
    table = Table(title=title)
    table.add_column("split")
    for column in columns:
        table.add_column(column, justify="right")
    for split in ("val", "test"):
        row = results.get(split, {})
        table.add_row(split, *[f"{row[c]:.4f}" if c in row else "-" for c in columns])
    buffer = io.StringIO()
    Console(file=buffer, width=120, force_terminal=False).print(table)
    return buffer.getvalue()
