"""Per-sample modality contributions (Shapley values) over training: CSV tables, logged means and plots."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from balance.gather import gather_table  # noqa: E402
from balance.plots import log_figure  # noqa: E402
from balance.valuation import TableBuilder, ValuationTable, ZeroInputCache, modality_shapley  # noqa: E402


def write_table(table: ValuationTable, path: Path) -> None:
    """``index, label, correct, phi_<modality>...`` one row per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = table.to_rows()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["index", "label", "correct", *[f"phi_{m}" for m in table.modalities]])
        writer.writeheader()
        writer.writerows(rows)


def histogram_figure(table: ValuationTable, title: str) -> plt.Figure:
    """One histogram of per-sample contributions per modality."""
    fig, axes = plt.subplots(1, len(table.modalities), figsize=(4 * len(table.modalities), 3), sharey=True)
    for ax, (i, m) in zip(list(axes) if len(table.modalities) > 1 else [axes], enumerate(table.modalities)):
        ax.hist(table.phi[:, i].numpy(), bins=21, color=f"C{i}")
        ax.set_title(f"{m} (mean {float(table.phi[:, i].mean()):.3f})")
        ax.set_xlabel("Shapley contribution")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def curve_figure(history: dict[str, list[tuple[int, dict[str, float]]]]) -> plt.Figure:
    """Mean contribution of each modality against the epoch, one line style per split."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for style, (split, points) in zip(("-", "--", ":"), history.items()):
        if not points:
            continue
        epochs = [e for e, _ in points]
        for i, m in enumerate(points[0][1]):
            ax.plot(epochs, [means[m] for _, means in points], style, color=f"C{i}", marker="o", label=f"{split} {m}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean Shapley contribution")
    ax.legend()
    fig.tight_layout()
    return fig


class ContributionCallback(pl.Callback):
    """Values the validation split every epoch (any method) and records each modality's contribution.

    Writes ``<dirpath>/val_epoch<NNN>.csv`` (``index, label, correct, phi_<modality>...``), logs ``val/phi_<m>``;
    in the final evaluation of the selected checkpoint it logs ``val/phi_<m>`` and ``test/phi_<m>`` (so they reach
    ``results.json``) and writes ``val_final.csv`` and ``test_final.csv``. For methods that value the training split themselves (the resampling methods, through their ``table``)
    writes ``train_epoch<NNN>.csv`` too. Plots ``<split>_histogram.png`` (the latest epoch) and
    ``mean_contribution.png`` (the imbalance curve over epochs), also sent to loggers that take images.

    Args:
        dirpath: output directory (``${run_dir}/contributions`` in the config).
        benefit: valuation benefit (``official``, ``correct``, ``true_prob``); ``None`` (default): the method's
            own (``method.valuation_settings()``), else ``official``.
        drop: ``features`` or ``inputs``; ``None`` (default): the method's own, else ``features``.
        every_n_epochs: value every n-th epoch.
        plots: write and log the figures.
    """

    def __init__(self, dirpath: str, benefit: str | None = None, drop: str | None = None, every_n_epochs: int = 1,
                 plots: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.benefit = benefit
        self.drop = drop
        # What is used: the given options, else (at setup) the method's own.
        self._benefit = benefit or "official"
        self._drop = drop or "features"
        self.every_n_epochs = every_n_epochs
        self.plots = plots
        self.history: dict[str, list[tuple[int, dict[str, float]]]] = {"val": [], "train": []}
        self._train_table_seen: Any = None
        self._builder: TableBuilder | None = None
        self._cache: ZeroInputCache | None = None

    # The validation and test batches are valued as they pass, on the features the method's evaluation step
    # returns when it returns them: no second pass over the split, no encoder run twice, no draw from the RNG.

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        own = pl_module.valuation_settings()
        self._benefit = self.benefit or own.get("benefit", "official")
        self._drop = self.drop or own.get("drop", "features")

    def _start(self, pl_module: pl.LightningModule) -> None:
        self._builder = TableBuilder(pl_module.model.modalities)
        self._cache = ZeroInputCache() if self._drop == "inputs" else None

    def _observe(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        features = outputs.get("features") if isinstance(outputs, Mapping) and self._drop == "features" else None
        self._builder.add(modality_shapley(pl_module.model, batch, benefit=self._benefit, drop=self._drop,
                                           cache=self._cache, features=features))

    def _finish(self, pl_module: pl.LightningModule, split: str) -> ValuationTable:
        table = gather_table(pl_module, self._builder.table())
        self._builder = None
        for m, value in table.mean().items():
            pl_module.log(f"{split}/phi_{m}", value, on_epoch=True, on_step=False)
        return table

    def _values_this_epoch(self, trainer: pl.Trainer) -> bool:
        fitting = trainer.state.fn == "fit"
        return not trainer.sanity_checking and not (fitting and trainer.current_epoch % self.every_n_epochs)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._builder = None
        if self._values_this_epoch(trainer):
            self._start(pl_module)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._builder is not None:
            self._observe(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._builder is None:
            return
        table = self._finish(pl_module, "val")
        if trainer.state.fn == "fit":
            self._record(trainer, "val", trainer.current_epoch, table)
        elif trainer.is_global_zero:
            write_table(table, self.dirpath / "val_final.csv")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._observe(pl_module, outputs, batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = self._finish(pl_module, "test")
        if trainer.is_global_zero:
            write_table(table, self.dirpath / "test_final.csv")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record_training_table(trainer, pl_module, trainer.current_epoch - 1)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record_training_table(trainer, pl_module, trainer.current_epoch - 1)

    def _record_training_table(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        # The resampling methods value the training split at the end of an epoch, after this callback's hooks.
        table = pl_module.training_valuation()
        if table is not None and table is not self._train_table_seen:
            self._train_table_seen = table
            self._record(trainer, "train", epoch, table)

    def _record(self, trainer: pl.Trainer, split: str, epoch: int, table: ValuationTable) -> None:
        self.history[split].append((epoch, table.mean()))
        if not trainer.is_global_zero:
            return
        write_table(table, self.dirpath / f"{split}_epoch{epoch:03d}.csv")
        if self.plots:
            log_figure(trainer, f"contributions/{split}_histogram", histogram_figure(table, f"{split}, epoch {epoch}"),
                       self.dirpath / f"{split}_histogram.png")
            log_figure(trainer, "contributions/mean_contribution", curve_figure(self.history),
                       self.dirpath / "mean_contribution.png")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = state_dict["history"]
