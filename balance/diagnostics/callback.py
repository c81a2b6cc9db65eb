"""Runs the configured diagnostics during training and in the final evaluation, and writes their outputs."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from balance.diagnostics.base import Diagnostic  # noqa: E402
from balance.plots import log_figure  # noqa: E402
from balance.scopes import isolated_rng  # noqa: E402

log = logging.getLogger(__name__)


def full_split_loader(datamodule: Any, split: str) -> DataLoader:
    """The whole split in order, with evaluation transforms, unsharded: diagnostics see every sample once even
    under DDP (they run on rank zero)."""
    datamodule.setup()
    return DataLoader(datamodule.evaluation_view(split), batch_size=datamodule.eval_batch_size, shuffle=False,
                      num_workers=datamodule.num_workers)


class ProgressLoader:
    """A loader that shows a progress bar (batches done of the split, rate, time left) each time it is iterated:
    diagnostics such as MM-SHAP take minutes on a whole split."""

    def __init__(self, loader: Any, description: str) -> None:
        self.loader = loader
        self.description = description

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # the wrapped loader's ``dataset``, ``batch_size``, ...
        return getattr(self.__dict__["loader"], name)

    def __iter__(self) -> Iterator[Any]:
        yield from tqdm(self.loader, desc=self.description, unit="batch", leave=False, dynamic_ncols=True)


def run_diagnostics(
    diagnostics: Mapping[str, Diagnostic],
    method: torch.nn.Module,
    loader: Iterable[Any],
    progress: bool = True,
    datamodule: Any = None,
) -> dict[str, dict[str, Any]]:
    """Computes every diagnostic on ``loader``; returns ``{name: result}``.

    A diagnostic that fails (e.g. the modality gap of encoders with different feature sizes) is logged and its
    result is ``{"error": message}``: the others still run and a finished training run is not lost to it. The
    global RNG states are restored afterwards, so a diagnostic that samples (permutations, masks, partners) leaves
    a training run exactly as it would be without it. Each diagnostic's time is logged; ``progress`` shows a bar
    over the split's batches while one runs. With ``datamodule``, each diagnostic's ``prepare`` gets it first.
    """
    results = {}
    with isolated_rng():
        for name, diagnostic in diagnostics.items():
            log.info("diagnostic %s ...", name)
            start = time.perf_counter()
            try:
                if datamodule is not None:
                    diagnostic.prepare(method, datamodule)
                results[name] = diagnostic.compute(method, ProgressLoader(loader, name) if progress else loader)
            except Exception as error:  # noqa: BLE001 - reported in the outputs, the run goes on
                log.error("diagnostic %s failed: %s: %s", name, type(error).__name__, error)
                results[name] = {"error": f"{type(error).__name__}: {error}"}
            log.info("diagnostic %s took %.1f s", name, time.perf_counter() - start)
    return results


def write_outputs(
    diagnostics: Mapping[str, Diagnostic],
    results: Mapping[str, Mapping[str, Any]],
    directory: Path,
    header: Mapping[str, Any],
    trainer: pl.Trainer | None = None,
    plots: bool = True,
) -> None:
    """Writes ``diagnostics.json`` (``header`` plus one section per diagnostic), ``diagnostics.md`` and each
    diagnostic's figures as ``<directory>/diagnostics/<name>_<stem>.png`` (also sent to image-taking loggers)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "diagnostics.json").write_text(json.dumps({**header, **results}, indent=2))
    lines = ["# Diagnostics", ""] + [f"- {key}: {value}" for key, value in header.items()] + [""]
    for name, result in results.items():
        failed = "error" in result
        lines.append(f"## {name}\n\nfailed: {result['error']}\n" if failed else diagnostics[name].summary(result))
    (directory / "diagnostics.md").write_text("\n".join(lines))
    if not plots:
        return
    for name, result in results.items():
        if "error" in result:
            continue
        for stem, figure in diagnostics[name].figures(result).items():
            log_figure(trainer, f"diagnostics/{name}_{stem}", figure, directory / "diagnostics" / f"{name}_{stem}.png")


def history_figure(history: Mapping[str, list[tuple[int, float]]]) -> plt.Figure:
    """Every logged diagnostic scalar over the validation epochs, one panel per diagnostic."""
    names = sorted({key.split("/")[0] for key in history})
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for key, points in sorted(history.items()):
            if key.split("/")[0] == name:
                epochs, values = zip(*points)
                ax.plot(epochs, values, marker="o", label=key.split("/", 1)[1])
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


class DiagnosticsCallback(pl.Callback):
    """Runs diagnostics on the test split in the final evaluation and, optionally, on validation during training.

    At test end (the evaluation of the selected checkpoint, or of a checkpoint in ``task=evaluate``) every
    diagnostic runs on the whole test split: ``<dirpath>/diagnostics.json`` (one section per diagnostic),
    ``diagnostics.md`` and ``diagnostics/<name>_<stem>.png``; the headline scalars are logged as
    ``test/<name>/<key>`` and so reach ``results.json``. With ``every_n_epochs > 0`` they also run on the
    validation split every n-th training epoch: scalars logged as ``val/<name>/<key>``, each epoch's results in
    ``diagnostics/val_epoch<NNN>.json`` and the scalars' curves in ``diagnostics/epochs.png``.

    Diagnostics run on rank zero over the whole split and leave the global RNG untouched.

    Args:
        diagnostics: name -> :class:`~balance.diagnostics.base.Diagnostic` (the ``diagnostics`` config node).
        dirpath: output directory (the run directory).
        every_n_epochs: also run on validation every n-th epoch during training (0: only at test).
        plots: write and log the figures.
    """

    def __init__(self, diagnostics: Mapping[str, Diagnostic], dirpath: str, every_n_epochs: int = 0,
                 plots: bool = True) -> None:
        unknown = [name for name, d in diagnostics.items() if not isinstance(d, Diagnostic)]
        if unknown:
            raise TypeError(f"diagnostics {unknown} are not Diagnostic instances (check their _target_)")
        self.diagnostics = dict(diagnostics)
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.plots = plots
        self.history: dict[str, list[tuple[int, float]]] = {}

    def _scalars(self, results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
        return {f"{name}/{key}": float(value) for name, result in results.items() if "error" not in result
                for key, value in self.diagnostics[name].scalars(result).items()}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.sanity_checking or trainer.state.fn != "fit" or self.every_n_epochs <= 0
                or trainer.current_epoch % self.every_n_epochs):
            return
        if trainer.is_global_zero:
            epoch = trainer.current_epoch
            results = run_diagnostics(self.diagnostics, pl_module, full_split_loader(trainer.datamodule, "val"),
                                      datamodule=trainer.datamodule,
                                      progress=trainer.progress_bar_callback is not None)
            scalars = self._scalars(results)
            for key, value in scalars.items():
                self.history.setdefault(key, []).append((epoch, value))
                pl_module.log(f"val/{key}", value, on_epoch=True, on_step=False, rank_zero_only=True)
            path = self.dirpath / "diagnostics" / f"val_epoch{epoch:03d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"split": "val", "epoch": epoch, **results}, indent=2))
            if self.plots and self.history:
                log_figure(trainer, "diagnostics/epochs", history_figure(self.history),
                           self.dirpath / "diagnostics" / "epochs.png")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        results = run_diagnostics(self.diagnostics, pl_module, full_split_loader(trainer.datamodule, "test"),
                                  datamodule=trainer.datamodule,
                                  progress=trainer.progress_bar_callback is not None)
        for key, value in self._scalars(results).items():
            pl_module.log(f"test/{key}", value, on_epoch=True, on_step=False, rank_zero_only=True)
        header = {"split": "test", "checkpoint": trainer.ckpt_path}
        write_outputs(self.diagnostics, results, self.dirpath, header, trainer, self.plots)
        log.info("diagnostics: %s", self.dirpath / "diagnostics.json")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = state_dict["history"]
