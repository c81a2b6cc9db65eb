"""EMAP (Hessel & Lee, EMNLP 2020): how much of a model's accuracy needs interactions between modalities.

The model's logits ``f`` are projected onto additive functions ``sum_m g_m(x_m)`` with the empirical marginals of
an evaluation set of N samples. For two modalities ``t`` and ``v`` (the paper's formula),

    f_hat(t_i, v_i) = mean_j f(t_i, v_j) + mean_j f(t_j, v_i) - mean_{j,k} f(t_j, v_k).

For M modalities,

    f_hat(x_i) = sum_m E_m(i) - (M - 1) E,    E_m(i) = mean_j f(x_m^i, x_{-m}^j),

where ``x_{-m}^j`` are partner j's other modalities taken jointly (N^2 evaluations per modality instead of N^M),
and ``E`` is the mean of every cross evaluation (all m, i, j). For M = 2 this is the paper's formula; for any M
an additive ``f`` is its own projection (``f_hat == f``), and ``mean_i f_hat(x_i) == E``. If the projection is
about as accurate as the model, the model's accuracy does not come from cross-modal interactions.

Two ways to evaluate ``f`` on a cross pair (sample i's modality m with partner j's other modalities):

- ``path: features`` (default): every sample is encoded once and only the method's prediction from features
  (``method.fused_logits``) runs on the pairs, chunked. For M = 2 the grid ``f(t_i, v_j)`` serves both modalities
  (row means and column means), so it takes N^2 head evaluations, M N^2 for M > 2. Exact whenever each
  modality's features depend only on that modality's input, as with every ``MultimodalModel``.
- ``path: inputs``: the whole model runs on paired inputs, for models whose encoders mix modalities before the
  fusion head; ``partners: K`` evaluates K partners per sample (drawn without replacement, seeded) instead of all
  N. With K = N it equals the features path on models where both apply.

Both require the prediction of a row not to depend on the other rows of its batch: true in eval mode, but not for
a fusion that normalises over the batch (such as MLA's batch-axis softmax option).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score  # noqa: E402

from balance.diagnostics.base import Diagnostic, batches  # noqa: E402
from balance.scopes import evaluation_mode  # noqa: E402
from balance.diagnostics.missing_modality import split_size  # noqa: E402
from balance.reproduce_table import Column  # noqa: E402
from balance.reproduce_figures import Bars  # noqa: E402

PATHS = ("features", "inputs")


@dataclass
class EMAPProjection:
    """A model's logits and their EMAP projection on the evaluated samples, sorted by sample index (CPU tensors).

    Attributes:
        index: ``LongTensor[N]`` sample positions in their split.
        label: ``LongTensor[N]`` labels.
        logits: ``FloatTensor[N, C]`` the method's own prediction ``f(x_i)``.
        projected: ``DoubleTensor[N, C]`` the additive projection ``f_hat(x_i)``.
        partners: partners per sample behind each ``E_m(i)`` (N unless ``partners`` sampled fewer).
    """

    index: torch.Tensor
    label: torch.Tensor
    logits: torch.Tensor
    projected: torch.Tensor
    partners: int


def _apply(fn: Callable[[torch.Tensor], torch.Tensor], x: Any) -> Any:
    """``fn`` on a tensor, or on every tensor of a (nested) dict of inputs."""
    if isinstance(x, Mapping):
        return {k: _apply(fn, v) for k, v in x.items()}
    return fn(x)


def _gather(x: Any, rows: torch.Tensor, device: torch.device) -> Any:
    """Rows of cached (CPU) inputs, moved to the device."""
    return _apply(lambda t: t[rows].to(device, non_blocking=True), x)


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], Mapping):
        return {k: _cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


@dataclass
class _Split:
    """What one pass over the data leaves for the pair evaluations, sorted by index."""

    index: torch.Tensor
    label: torch.Tensor
    logits: torch.Tensor
    present: torch.Tensor | None  # [N, M] on the device, or None when no batch marks missing modalities
    features: dict[str, torch.Tensor] | None  # on the device (features path)
    inputs: dict[str, Any] | None  # on the CPU (inputs path)


def _read_split(method: torch.nn.Module, dataloader: Iterable[Mapping[str, Any]], keep_inputs: bool,
                chosen: torch.Tensor | None) -> _Split:
    """Encodes the (chosen) samples once: the method's own logits plus the features or the inputs."""
    parts: dict[str, list[Any]] = {key: [] for key in ("index", "label", "logits", "present", "features", "inputs")}
    for batch in batches(method, dataloader):
        inputs, index, label, present = batch["inputs"], batch["index"], batch["label"], batch.get("present")
        if chosen is not None:
            rows = chosen[index.cpu()].to(index.device)
            if not rows.any():
                continue
            inputs, index, label = _apply(lambda x: x[rows], inputs), index[rows], label[rows]
            present = None if present is None else present[rows]
        features = method.model.encode(inputs)
        parts["logits"].append(method.fused_logits(features, keep=present).float())
        parts["index"].append(index)
        parts["label"].append(label)
        parts["present"].append(present)
        if keep_inputs:
            parts["inputs"].append(_apply(torch.Tensor.cpu, inputs))
        else:
            parts["features"].append(features)
    if not parts["index"]:
        raise ValueError("EMAP needs at least one sample; the dataloader gave none")
    index = torch.cat(parts["index"])
    order = torch.argsort(index, stable=True)
    present = None
    if any(p is not None for p in parts["present"]):
        # A batch without `present` has every modality.
        present = torch.cat([torch.ones(len(i), len(method.modalities), dtype=torch.bool, device=i.device)
                             if p is None else p.bool() for p, i in zip(parts["present"], parts["index"])])[order]
    return _Split(
        index=index[order],
        label=torch.cat(parts["label"])[order],
        logits=torch.cat(parts["logits"])[order],
        present=present,
        features={m: f[order] for m, f in _cat(parts["features"]).items()} if parts["features"] else None,
        inputs=_apply(lambda x: x[order.cpu()], _cat(parts["inputs"])) if parts["inputs"] else None,
    )


def additive_projection(evaluate: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], num_samples: int,
                        num_modalities: int, partners: torch.Tensor | None = None, chunk_size: int = 65536,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """The EMAP projection ``f_hat(x_i) = sum_m E_m(i) - (M - 1) E`` from cross evaluations, in chunks.

    Args:
        evaluate: ``evaluate(m, i, j)`` -> ``[P, C]`` logits of the P cross pairs that take modality ``m`` from
            samples ``i`` (``LongTensor[P]``) and every other modality from samples ``j``.
        num_samples: N.
        num_modalities: M.
        partners: ``LongTensor[N, K]`` the partners ``j`` of each sample ``i``; ``None`` for all N (for M = 2 the
            grid is then evaluated once and read both ways).
        chunk_size: pairs per ``evaluate`` call (bounds memory).
        device: where the pair indices are made.

    Returns:
        ``DoubleTensor[N, C]`` projected logits (sums in float64, so chunking changes only the last bits).
    """
    n, k = num_samples, num_samples if partners is None else partners.shape[1]
    # f(t_i, v_j) is both modality 0's cross evaluation for i and modality 1's for j.
    symmetric = num_modalities == 2 and partners is None
    sums = None
    for m in [0] if symmetric else range(num_modalities):
        for start in range(0, n * k, chunk_size):
            p = torch.arange(start, min(start + chunk_size, n * k), device=device)
            i = p // k
            j = p % k if partners is None else partners[i, p % k]
            logits = evaluate(m, i, j).double()
            if sums is None:
                sums = logits.new_zeros(num_modalities, n, logits.shape[1])
            sums[m].index_add_(0, i, logits)
            if symmetric:
                sums[1].index_add_(0, j, logits)
    means = sums / k  # E_m(i)
    return means.sum(dim=0) - (num_modalities - 1) * means.mean(dim=(0, 1))


def _sources(m: int, i: torch.Tensor, j: torch.Tensor, num_modalities: int) -> list[torch.Tensor]:
    """Which sample each modality comes from in the pairs (i's modality m, j's others)."""
    return [i if k == m else j for k in range(num_modalities)]


def _pair_keep(present: torch.Tensor | None, sources: list[torch.Tensor]) -> torch.Tensor | None:
    if present is None:
        return None
    return torch.stack([present[s, k] for k, s in enumerate(sources)], dim=1)


def _scores(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Accuracy and macro-F1 as the methods log them, and correct predictions per class."""
    preds = logits.argmax(dim=1)
    correct = torch.bincount(labels[preds == labels], minlength=num_classes)
    return {
        "acc": float(multiclass_accuracy(preds, labels, num_classes, average="micro")),
        "f1": float(multiclass_f1_score(preds, labels, num_classes, average="macro")),
        "correct": correct.tolist(),
    }


class EMAP(Diagnostic):
    """Accuracy and macro-F1 of the method next to those of its EMAP projection (see the module docstring).

    Args:
        path: ``"features"`` (encode once, the method's head on the pairs) or ``"inputs"`` (the whole model on
            paired inputs).
        max_samples: evaluate a seeded random subset of this many samples of the split (the cost is O(N^2));
            ``None`` for all.
        chunk_size: pairs per ``fused_logits`` call on the features path.
        partners: inputs path only: partners per sample (K), drawn without replacement and seeded; ``None`` (or
            K >= N) for every sample, which matches the features path.
        batch_size: inputs path only: pairs per full-model call.
        seed: seed of the subset and of the partners.

    The features path keeps the evaluated samples' features on the method's device; the inputs path keeps their
    inputs in CPU memory.
    """

    name = "emap"
    table_columns = (Column("acc_gap"),)
    table_figure = Bars(("acc_model", "acc_emap"), labels=("model", "EMAP (additive part)"), percent=True, zoom=10,
                        ylabel="test accuracy (%)", title="EMAP: how much accuracy the cross-modal interactions carry")

    def __init__(self, path: str = "features", max_samples: int | None = 2000, chunk_size: int = 65536,
                 partners: int | None = None, batch_size: int = 256, seed: int = 0) -> None:
        if path not in PATHS:
            raise ValueError(f"unknown EMAP path {path!r}; choose one of {PATHS}")
        if partners is not None and path != "inputs":
            raise ValueError("partners applies to path: inputs; the features path always uses every partner")
        for key, value in {"max_samples": max_samples, "partners": partners}.items():
            if value is not None and value < 1:
                raise ValueError(f"{key} must be at least 1 (or null), got {value}")
        if chunk_size < 1 or batch_size < 1:
            raise ValueError(f"chunk_size and batch_size must be at least 1, got {chunk_size} and {batch_size}")
        self.path = path
        self.max_samples = max_samples
        self.chunk_size = chunk_size
        self.partners = partners
        self.batch_size = batch_size
        self.seed = seed

    def _chosen(self, dataloader: Iterable[Mapping[str, Any]]) -> torch.Tensor | None:
        """``BoolTensor[split size]`` of the sampled indices, or None to keep every sample."""
        if self.max_samples is None:
            return None
        n = split_size(dataloader)
        if n <= self.max_samples:
            return None
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: self.max_samples]] = True
        return chosen

    def _partners(self, n: int, device: torch.device) -> torch.Tensor | None:
        if self.partners is None or self.partners >= n:
            return None
        generator = torch.Generator().manual_seed(self.seed)
        return torch.stack([torch.randperm(n, generator=generator)[: self.partners] for _ in range(n)]).to(device)

    def project(self, method: torch.nn.Module, dataloader: Iterable[Mapping[str, Any]]) -> EMAPProjection:
        """The method's logits and their EMAP projection on the (sampled) split.

        Args:
            method: a :class:`~balance.methods.base.MultimodalMethod`.
            dataloader: batches with ``inputs``, ``label``, ``index`` and optionally ``present``; a plain iterable
                must be re-iterable when ``max_samples`` is set (see :func:`split_size`).

        Returns:
            An :class:`EMAPProjection` sorted by sample index.
        """
        modalities = list(method.modalities)
        num_modalities = len(modalities)
        if num_modalities < 2:
            raise ValueError(f"EMAP needs at least two modalities, the method has {modalities}")
        with evaluation_mode(method):
            split = _read_split(method, dataloader, keep_inputs=self.path == "inputs",
                                chosen=self._chosen(dataloader))
            device = split.logits.device
            n = len(split.index)
            partners = self._partners(n, device)

            if self.path == "features":
                def evaluate(m: int, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
                    sources = _sources(m, i, j, num_modalities)
                    features = {mod: split.features[mod][s] for mod, s in zip(modalities, sources)}
                    return method.fused_logits(features, keep=_pair_keep(split.present, sources))
                chunk_size = self.chunk_size
            else:
                def evaluate(m: int, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
                    sources = _sources(m, i, j, num_modalities)
                    inputs = {mod: _gather(split.inputs[mod], s.cpu(), device)
                              for mod, s in zip(modalities, sources)}
                    return method.fused_logits(method.model.encode(inputs),
                                               keep=_pair_keep(split.present, sources))
                chunk_size = self.batch_size

            projected = additive_projection(evaluate, n, num_modalities, partners, chunk_size, device)
        return EMAPProjection(
            index=split.index.cpu(),
            label=split.label.cpu(),
            logits=split.logits.cpu(),
            projected=projected.cpu(),
            partners=n if partners is None else partners.shape[1],
        )

    def compute(self, method: torch.nn.Module, dataloader: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Accuracy and macro-F1 of the method and of its projection, their gap and per-class counts.

        Returns:
            ``{"path", "num_samples", "num_classes", "partners", "model": {"acc", "f1"}, "emap": {"acc", "f1"},
            "gap": {"acc", "f1"}`` (model minus projection), ``"agreement"`` (fraction of samples on which both
            predict the same class), ``"per_class": {"support", "correct_model", "correct_emap"}}``.
        """
        projection = self.project(method, dataloader)
        num_classes = projection.logits.shape[1]
        label = projection.label
        model = _scores(projection.logits, label, num_classes)
        emap = _scores(projection.projected, label, num_classes)
        agreement = (projection.logits.argmax(1) == projection.projected.argmax(1)).double().mean()
        return {
            "path": self.path,
            "num_samples": len(label),
            "num_classes": num_classes,
            "partners": projection.partners,
            "model": {"acc": model["acc"], "f1": model["f1"]},
            "emap": {"acc": emap["acc"], "f1": emap["f1"]},
            "gap": {"acc": model["acc"] - emap["acc"], "f1": model["f1"] - emap["f1"]},
            "agreement": float(agreement),
            "per_class": {
                "support": torch.bincount(label, minlength=num_classes).tolist(),
                "correct_model": model["correct"],
                "correct_emap": emap["correct"],
            },
        }

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        """``acc_model``, ``acc_emap``, ``acc_gap``, the same for ``f1`` (macro), and ``agreement``."""
        out = {}
        for metric in ("acc", "f1"):
            out |= {f"{metric}_model": result["model"][metric], f"{metric}_emap": result["emap"][metric],
                    f"{metric}_gap": result["gap"][metric]}
        return out | {"agreement": result["agreement"]}

    def summary(self, result: Mapping[str, Any]) -> str:
        """A table of the model against its projection, with a reading of the gap."""
        lines = [
            f"## {self.name}",
            "",
            f"EMAP projection (Hessel & Lee, 2020) on {result['num_samples']} samples ({result['path']} path, "
            f"{result['partners']} partners per sample). A small gap means the model's accuracy does not come "
            "from interactions between modalities.",
            "",
            "| | model | EMAP | gap |",
            "|---|---|---|---|",
        ]
        for metric, label in (("acc", "accuracy"), ("f1", "macro-F1")):
            lines.append(f"| {label} | {result['model'][metric]:.4f} | {result['emap'][metric]:.4f} "
                         f"| {result['gap'][metric]:+.4f} |")
        lines += ["", f"Same prediction on {result['agreement']:.1%} of the samples."]
        return "\n".join(lines) + "\n"

    def figures(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """``per_class_accuracy``: accuracy of the model and of its projection on each class."""
        per_class = result["per_class"]
        support = np.maximum(np.asarray(per_class["support"], dtype=float), 1)
        classes = np.arange(len(support))
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(classes) + 2), 3.5))
        for offset, key, label in ((-0.2, "model", "model"), (0.2, "emap", "EMAP")):
            accuracy = np.asarray(per_class[f"correct_{key}"]) / support
            ax.bar(classes + offset, accuracy, width=0.4, label=f"{label} ({result[key]['acc']:.3f})")
        ax.set_xlabel("class")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.2)  # room for the legend above the bars
        ax.set_xticks(classes)
        ax.set_title(f"EMAP: {result['num_samples']} samples, {result['path']} path")
        ax.legend(loc="upper center", ncols=2)
        fig.tight_layout()
        return {"per_class_accuracy": fig}
