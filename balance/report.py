"""The results table printed at the end of a run."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.table import Table

#: the console width the table is laid out for
WIDTH = 120
#: up to this many metrics, one column per metric (splits as rows); more, one row per metric
WIDE_LAYOUT_METRICS = 8


def format_results(results: dict[str, Any], modalities: list[str]) -> str:
    """The run's validation and test numbers: fused accuracy, each modality's accuracy, macro-F1, loss, then the
    method's own figures, then each diagnostic's. A few metrics make one column each (a row per split); more (any
    number of modalities and diagnostics) make one row each, grouped, so that every name is shown in full at any
    width."""
    common = ["acc", *[f"acc_{m}" for m in modalities], "f1", "loss"]
    logged = {k for split in ("val", "test") for k in results.get(split, {})}
    others = sorted(logged - set(common))
    columns = common + others
    epoch = results.get("best_epoch")
    title = f"{results.get('selection', '')}" + (f" (epoch {epoch})" if epoch is not None else "")
    val, test = results.get("val", {}), results.get("test", {})

    def cell(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.4f}" if row.get(key) is not None else "-"

    if len(columns) <= WIDE_LAYOUT_METRICS:
        table = Table(title=title)
        table.add_column("split")
        for column in columns:
            table.add_column(column, justify="right")
        for split, row in (("val", val), ("test", test)):
            table.add_row(split, *[cell(row, c) for c in columns])
    else:
        table = Table(title=title)
        for name, justify in (("metric", "left"), ("val", "right"), ("test", "right")):
            table.add_column(name, justify=justify, overflow="fold")
        groups: dict[str, list[str]] = {"": common + [k for k in others if "/" not in k]}
        for key in others:
            if "/" in key:
                groups.setdefault(key.split("/", 1)[0], []).append(key)
        for number, keys in enumerate(groups.values()):
            if number:
                table.add_section()
            for key in keys:
                table.add_row(key, cell(val, key), cell(test, key))
    buffer = io.StringIO()
    Console(file=buffer, width=WIDTH, force_terminal=False).print(table)
    return buffer.getvalue()
