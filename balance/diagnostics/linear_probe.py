"""Linear probes: how much each frozen encoder learned, whatever the fusion head made of it.

The trained model's encoders are frozen and a multinomial logistic regression is fitted on the features
``method.model.encode(inputs)`` of the training split: one probe per modality and one, ``concat``, on every
modality's features side by side (with two modalities or more). Each probe is scored on the training split, on
validation and on the evaluated split (test at the end of a run, validation during training). A modality whose
probe is far above chance has an encoder that separates the classes, even when the fusion head ignores it; a probe
at chance says the encoder learned little about the labels.

The fit is deterministic: features are standardised with the training split's mean and standard deviation (a
constant feature is left unscaled), the weights start at zero, and full-batch L-BFGS (strong Wolfe line search, on
the CPU in float64) minimises the mean cross-entropy plus ``weight_decay / 2 * ||W||^2`` (the bias is not
penalised) for at most ``max_iter`` iterations. The only random draw, the optional subset of the training split
(``max_train_samples``), comes from a local seeded generator. The features of a missing modality are zeroed, as the
methods drop modalities (:func:`~balance.dropping.drop_features`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from balance import options  # noqa: E402
from balance.diagnostics.base import Diagnostic, batches  # noqa: E402
from balance.dropping import drop_features  # noqa: E402
from balance.reproduce_table import Column  # noqa: E402
from balance.reproduce_figures import Bars  # noqa: E402

log = logging.getLogger(__name__)

#: the probe on every modality's features side by side
CONCAT = "concat"
#: the config group of the options, as refusals name them
SCOPE = "diagnostics.linear_probe"


@dataclass
class FittedProbe:
    """A fitted multinomial logistic regression on standardised features (CPU float64 tensors).

    Attributes:
        mean: ``[d]`` the training features' mean.
        scale: ``[d]`` their standard deviation (1 for a constant feature).
        weight: ``[d, C]`` weights on the standardised features.
        bias: ``[C]``.
        iterations: L-BFGS iterations the fit took.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    iterations: int

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` logits of raw (unstandardised) ``[N, d]`` features."""
        return (features.double() - self.mean) / self.scale @ self.weight + self.bias

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Share of the samples whose most likely class is their label."""
        return float((self.logits(features).argmax(dim=1) == labels).double().mean())


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
                     max_iter: int = 200) -> FittedProbe:
    """Fits a multinomial logistic regression by full-batch L-BFGS (see the module docstring).

    Args:
        features: ``[N, d]`` training features.
        labels: ``LongTensor[N]`` their classes, in ``[0, num_classes)``.
        num_classes: C.
        weight_decay: L2 penalty ``weight_decay / 2 * ||W||^2`` on the weights (not on the bias).
        max_iter: the most L-BFGS iterations.

    Returns:
        The fitted :class:`FittedProbe`.
    """
    # Lightning tests under inference mode; the fit needs autograd, on tensors made outside it.
    with torch.inference_mode(False), torch.enable_grad():
        x = features.detach().cpu().double().clone()
        y = labels.detach().cpu().long().clone()
        mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False)
        scale = torch.where(std > 1e-12, std, torch.ones_like(std))
        x = (x - mean) / scale
        weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                      line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight + bias, y) + weight_decay / 2 * weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        iterations = int(optimizer.state[weight].get("n_iter", 0))
    return FittedProbe(mean=mean, scale=scale, weight=weight.detach(), bias=bias.detach(), iterations=iterations)


@dataclass
class SplitFeatures:
    """Every sample's encoder features (missing modalities zeroed) and labels, on the CPU."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor

    def probe_inputs(self) -> dict[str, torch.Tensor]:
        """The features of each probe: every modality's, then ``concat`` (with two modalities or more)."""
        inputs = dict(self.features)
        if len(self.features) > 1:
            inputs[CONCAT] = torch.cat(list(self.features.values()), dim=1)
        return inputs


def encode_split(method: torch.nn.Module, dataloader: Iterable[Mapping[str, Any]]) -> SplitFeatures:
    """The frozen encoders' features of every batch of ``dataloader`` (the method in eval mode, no gradients).

    Raises:
        ValueError: when the dataloader gives no sample.
    """
    modalities = list(method.modalities)
    parts: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    labels = []
    for batch in batches(method, dataloader):
        # A missing modality's features describe its zeroed input: zero them, as the methods do.
        features = drop_features(method.model.encode(batch["inputs"]), modalities, batch.get("present"))
        for m in modalities:
            parts[m].append(features[m].flatten(1).float().cpu())
        labels.append(batch["label"].cpu())
    if not labels or not sum(len(y) for y in labels):
        raise ValueError("a linear probe needs at least one sample; the dataloader gave none")
    return SplitFeatures({m: torch.cat(p) for m, p in parts.items()}, torch.cat(labels).long())


class LinearProbe(Diagnostic):
    """Accuracy of linear probes on each modality's frozen features and on their concatenation (see the module
    docstring), fitted on the training split, scored on it, on validation and on the evaluated split.

    Args:
        weight_decay: L2 penalty ``weight_decay / 2 * ||W||^2`` on the probes' weights (standardised features).
        max_iter: the most L-BFGS iterations per probe.
        max_train_samples: fit on a seeded random subset of this many training samples (bounds the cost of
            encoding and fitting); ``None`` for the whole split.
        seed: seed of that subset.
    """

    name = "linear_probe"
    table_columns = (Column("acc_{}", label="probe {}"),)
    table_figure = Bars(("acc_{}",), percent=True, ylabel="test accuracy of the linear probe (%)",
                        title="Linear probes on the frozen encoders' features")

    def __init__(self, weight_decay: float = 1e-4, max_iter: int = 200, max_train_samples: int | None = None,
                 seed: int = 0) -> None:
        options.non_negative("weight_decay", weight_decay, scope=SCOPE)
        options.integer("max_iter", max_iter, 1, scope=SCOPE)
        options.integer("max_train_samples", max_train_samples, 1, optional=True, scope=SCOPE)
        self.weight_decay = weight_decay
        self.max_iter = max_iter
        self.max_train_samples = max_train_samples
        self.seed = seed
        self._datamodule: Any = None

    def prepare(self, method: torch.nn.Module, datamodule: Any) -> None:
        """Keeps the datamodule: :meth:`compute` encodes its training and validation splits with the model it is
        given, so the probes always see the features of the model being diagnosed."""
        self._datamodule = datamodule

    def _loader(self, split: str) -> DataLoader:
        """The split with evaluation transforms, in order, every sample once (a seeded subset of the training
        split with ``max_train_samples``), as :func:`~balance.diagnostics.callback.full_split_loader` reads it but
        with a local generator: iterating a loader seeded by the global one would draw from it."""
        datamodule = self._datamodule
        dataset = datamodule.evaluation_view(split)
        if split == "train" and self.max_train_samples is not None and len(dataset) > self.max_train_samples:
            rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
            dataset = Subset(dataset, rows[: self.max_train_samples].sort().values.tolist())
        return DataLoader(dataset, batch_size=datamodule.eval_batch_size, shuffle=False,
                          num_workers=datamodule.num_workers, generator=torch.Generator().manual_seed(self.seed))

    def compute(self, method: torch.nn.Module, dataloader: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Fits the probes on the training split and scores them on train, validation and ``dataloader``.

        Returns:
            ``{"num_classes", "num_samples": {"train", "val", "evaluated"}, "weight_decay", "max_iter",
            "majority_acc"`` (evaluated split's accuracy of always predicting the most frequent training class),
            ``"probes": {probe: {"num_features", "iterations", "train_acc", "val_acc", "acc"}}}``, ``acc`` being
            the evaluated split's; the probes are the modalities, then ``concat``.

        Raises:
            ValueError: when :meth:`prepare` has not given the datamodule (the probe needs the training split).
        """
        if self._datamodule is None:
            raise ValueError("the linear probe is fitted on the training split: call prepare(method, datamodule) "
                             "before compute (the diagnostics callback does)")
        num_classes = int(method.model.num_classes)
        splits = {"train": encode_split(method, self._loader("train")),
                  "val": encode_split(method, self._loader("val")),
                  "evaluated": encode_split(method, dataloader)}
        inputs = {split: features.probe_inputs() for split, features in splits.items()}
        probes = {}
        for name, train_features in inputs["train"].items():
            start = time.perf_counter()
            probe = fit_linear_probe(train_features, splits["train"].labels, num_classes, self.weight_decay,
                                     self.max_iter)
            log.info("linear probe %s: fitted on %d samples x %d features, %d L-BFGS iterations, %.2f s", name,
                     *train_features.shape, probe.iterations, time.perf_counter() - start)
            if probe.iterations >= self.max_iter:
                log.warning("linear probe %s reached max_iter=%d L-BFGS iterations and may not have converged "
                            "(raise max_iter)", name, self.max_iter)
            probes[name] = {
                "num_features": int(train_features.shape[1]),
                "iterations": probe.iterations,
                "train_acc": probe.accuracy(train_features, splits["train"].labels),
                "val_acc": probe.accuracy(inputs["val"][name], splits["val"].labels),
                "acc": probe.accuracy(inputs["evaluated"][name], splits["evaluated"].labels),
            }
        majority = torch.bincount(splits["train"].labels, minlength=num_classes).argmax()
        return {
            "num_classes": num_classes,
            "num_samples": {split: len(features.labels) for split, features in splits.items()},
            "weight_decay": self.weight_decay,
            "max_iter": self.max_iter,
            "majority_acc": float((splits["evaluated"].labels == majority).double().mean()),
            "probes": probes,
        }

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        """``acc_<probe>`` (evaluated split), ``train_acc_<probe>`` and ``val_acc_<probe>`` for every probe."""
        return {f"{prefix}acc_{name}": probe[f"{prefix}acc"] for prefix in ("", "train_", "val_")
                for name, probe in result["probes"].items()}

    def summary(self, result: Mapping[str, Any]) -> str:
        """A table of every probe's accuracy on the three splits."""
        n = result["num_samples"]
        lines = [
            f"## {self.name}",
            "",
            f"Logistic regression on the frozen encoders' standardised features, fitted on {n['train']} training "
            f"samples (L-BFGS, at most {result['max_iter']} iterations, weight decay {result['weight_decay']:g}); "
            f"scored on {n['val']} validation samples and {n['evaluated']} samples of the evaluated split. "
            f"Always predicting the most frequent training class scores {result['majority_acc']:.4f}.",
            "",
            "| probe | features | iterations | train acc | val acc | acc |",
            "|---|---|---|---|---|---|",
            *[f"| {name} | {p['num_features']} | {p['iterations']} | {p['train_acc']:.4f} | {p['val_acc']:.4f} "
              f"| {p['acc']:.4f} |" for name, p in result["probes"].items()],
        ]
        return "\n".join(lines) + "\n"

    def figures(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """``accuracy``: grouped bars of each probe's accuracy on train, validation and the evaluated split, with
        the majority-class accuracy as a dashed line."""
        names = list(result["probes"])
        positions = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(names) + 1.5), 3.5))
        for i, (key, label) in enumerate((("train_acc", "train"), ("val_acc", "val"), ("acc", "evaluated"))):
            ax.bar(positions + (i - 1) * 0.27, [result["probes"][name][key] for name in names], width=0.27,
                   label=label)
        ax.axhline(result["majority_acc"], color="grey", linestyle="--", linewidth=1, label="majority class")
        ax.set_xticks(positions, names)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.2)  # room for the legend above the bars
        ax.set_title(f"linear probes: {result['num_samples']['train']} training samples")
        ax.legend(loc="upper center", ncols=4, fontsize="small")
        fig.tight_layout()
        return {"accuracy": fig}
