"""What every diagnostic shares: the `Diagnostic` interface and evaluation-mode iteration over a dataloader."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from balance.scopes import evaluation_mode, module_device, to_device

if TYPE_CHECKING:
    from balance.reproduce_table import Column
    from balance.reproduce_figures import TableFigure


def batches(method: torch.nn.Module, dataloader: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """Yields the dataloader's batches on ``method``'s device (CPU for a method without parameters), with the
    method in eval mode and gradients off (see :func:`~balance.scopes.evaluation_mode`)."""
    device = module_device(method)
    with evaluation_mode(method):
        for batch in dataloader:
            yield to_device(dict(batch), device)


class Diagnostic(abc.ABC):
    """A measurement of how a trained method uses its modalities, over one split.

    A subclass is registered by its config file ``conf/diagnostics/<name>.yaml`` and implements ``compute``;
    ``scalars``, ``summary`` and ``figures`` say how its result is logged, summarised in markdown and drawn;
    ``table_columns`` and ``table_figure`` which of its scalars ``balance-reproduce`` puts into a table's columns
    (:class:`~balance.reproduce_table.Column`) and how it draws them across the table's rows as ``figures/<name>.png``
    (:mod:`balance.reproduce_figures`), e.g.::

        table_columns = (Column("acc_gap"), Column("gap/{}", label="gap {}"))  # {}: a part that varies
        table_figure = Bars(("acc_model", "acc_emap"), labels=("model", "EMAP"), percent=True)

    The ``method`` passed to ``compute`` is a :class:`~balance.methods.base.MultimodalMethod`: features come from
    ``method.model.encode(inputs)``, the method's prediction from ``method.fused_logits(features, keep)``, and each
    modality's own prediction from ``method.model.unimodal_logits(features)``.
    """

    #: key of the result in ``diagnostics.json`` and prefix of the logged scalars
    name: str = ""
    #: the headline scalars in ``balance-reproduce``'s table, one column each (or one per key of a pattern)
    table_columns: tuple[Column, ...] = ()
    #: the figure of its scalars across a table's rows (None: none), e.g. Bars, StackedBars, Lines
    table_figure: TableFigure | None = None

    def prepare(self, method: torch.nn.Module, datamodule: Any) -> None:
        """Called with the run's datamodule before each :meth:`compute`, for a diagnostic that needs a split other
        than the one it is computed on (e.g. a probe fitted on the training split, read through
        ``datamodule.evaluation_view("train")``). Most need nothing here."""

    @abc.abstractmethod
    def compute(self, method: torch.nn.Module, dataloader: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Runs the diagnostic; returns JSON-serialisable plain numbers (floats, ints, lists, nested dicts)."""

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        """The headline numbers of a result, logged as ``<split>/<name>/<key>``."""
        return {}

    def summary(self, result: Mapping[str, Any]) -> str:
        """A markdown section (heading included) that states the result."""
        lines = [f"## {self.name}", ""]
        lines += [f"- {key}: {value:.4f}" for key, value in self.scalars(result).items()]
        return "\n".join(lines) + "\n"

    def figures(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """Figures of a result, ``{file stem: matplotlib Figure}``; the caller saves them as PNG, logs and closes
        them."""
        return {}
