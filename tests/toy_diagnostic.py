"""A minimal diagnostic for testing the diagnostics machinery: fused accuracy, counted by hand."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from balance.diagnostics.base import Diagnostic, batches  # noqa: E402
from balance.reproduce_table import Column  # noqa: E402
from balance.reproduce_figures import Bars  # noqa: E402


class FusedAccuracy(Diagnostic):
    """Accuracy of the method's prediction; draws one random number per batch to exercise RNG neutrality."""

    name = "toy"
    # What balance-reproduce puts into a table's diagnostics columns and figures/toy.png: nothing in reproduce.py
    # names it.
    table_columns = (Column("acc", label="toy acc", format="percent"),)
    table_figure = Bars(("acc",), labels=("fused",), ylabel="test accuracy (%)", percent=True)

    def compute(self, method, dataloader):
        correct = total = 0
        for batch in batches(method, dataloader):
            torch.rand(1)
            logits = method.fused_logits(method.model.encode(batch["inputs"]), batch.get("present"))
            correct += int((logits.argmax(-1) == batch["label"]).sum())
            total += len(batch["label"])
        return {"acc": correct / total, "count": total}

    def scalars(self, result):
        return {"acc": result["acc"]}

    def figures(self, result):
        fig, ax = plt.subplots()
        ax.bar(["acc"], [result["acc"]])
        return {"bar": fig}
