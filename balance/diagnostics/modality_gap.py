"""Modality gap (MLA, Zhang et al. CVPR 2024, section Q4; Liang et al. NeurIPS 2022): how far apart the modalities'
feature clouds sit.

Every modality's encoder features (``method.model.encode``, projections included) are L2-normalised per sample,
``u_m(i) = f_m(i) / ||f_m(i)||``; the modality's centroid is ``c_m = mean_i u_m(i)`` over the samples where it is
present, and the gap between modalities a and b is ``||c_a - c_b||_2``: 0 when both clouds have the same centre,
at most 2. ``||c_m||`` (at most 1) says how concentrated modality m's directions are. With more than two
modalities every pair is reported.

Features are compared coordinate by coordinate, so every modality needs the same feature size. When they differ
(e.g. concat fusion over encoders of different widths) no gap is defined: :meth:`ModalityGap.compute` raises a
``ValueError`` naming the sizes; set the model's ``feature_dim`` so that every encoder is followed by a projection
to a common size (the shared head of MLA needs it anyway), and the gap is measured after that projection.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from balance.diagnostics.base import Diagnostic, batches  # noqa: E402
from balance.reproduce_table import Column  # noqa: E402
from balance.reproduce_figures import Bars  # noqa: E402


def _pca_2d(points: torch.Tensor, sign_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean, the top two principal directions ``[2, d]`` (zero rows where there are fewer) and their shares
    of the variance. Each direction's sign puts ``sign_ref`` on its positive side, so figures do not flip."""
    mean = points.mean(dim=0)
    _, singular, vh = torch.linalg.svd(points - mean, full_matrices=False)
    directions = torch.zeros(2, points.shape[1], dtype=points.dtype)
    k = min(2, vh.shape[0])
    directions[:k] = vh[:k]
    sign = torch.where((sign_ref - mean) @ directions.T < 0, -1.0, 1.0).to(points.dtype)
    variance = singular**2
    share = torch.zeros(2, dtype=points.dtype)
    share[:k] = variance[:k] / variance.sum().clamp_min(1e-12)
    return mean, directions * sign.unsqueeze(1), share


class ModalityGap(Diagnostic):
    """Distance between the centroids of the modalities' L2-normalised features (see the module docstring).

    Args:
        plot_samples: samples per modality in the PCA scatter (a seeded random subset; 0 for no scatter).
        seed: seed of the scatter's subset.
    """

    name = "modality_gap"
    table_columns = (Column("gap/{}"),)
    table_figure = Bars(("gap/{}",), ylabel="centroid distance", title="Modality gap of the fused features")

    def __init__(self, plot_samples: int = 500, seed: int = 0) -> None:
        if plot_samples < 0:
            raise ValueError(f"plot_samples must be >= 0, got {plot_samples}")
        self.plot_samples = plot_samples
        self.seed = seed

    def compute(self, method: torch.nn.Module, dataloader: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Centroids of the normalised features of each modality and their pairwise distances.

        Returns:
            ``{"feature_dim", "num_samples": {m: n}, "gap": {"a-b": float}, "centroid_norm": {m: float},
            "pca": {"variance_share": [2], "points": {m: [[x, y], ...]}, "centroids": {m: [x, y]}}}``; ``pca``
            (the scatter's data, from the pooled subsets) is absent when ``plot_samples`` is 0.

        Raises:
            ValueError: when the modalities' features have different sizes, or a modality is never present.
        """
        modalities = list(method.modalities)
        if len(modalities) < 2:
            raise ValueError(f"a modality gap needs at least two modalities, the method has {modalities}")
        chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
        for batch in batches(method, dataloader):
            features = method.model.encode(batch["inputs"])
            dims = {m: features[m].shape[1] for m in modalities}
            if len(set(dims.values())) != 1:
                raise ValueError(
                    f"the modality gap compares features of one size, but they differ: {dims}; set the model's "
                    "feature_dim to project every encoder to a common size"
                )
            present = batch.get("present")
            for i, m in enumerate(modalities):
                u = F.normalize(features[m].float(), dim=1)
                # A missing modality's features describe its zeroed input, not the sample.
                chunks[m].append((u if present is None else u[present[:, i].bool()]).cpu().double())
        normalised = {m: torch.cat(parts) for m, parts in chunks.items() if parts}
        absent = [m for m in modalities if len(normalised.get(m, ())) == 0]
        if absent:
            raise ValueError(f"no sample has modality {absent} present; no centroid to compare")
        centroids = {m: u.mean(dim=0) for m, u in normalised.items()}
        result: dict[str, Any] = {
            "feature_dim": int(normalised[modalities[0]].shape[1]),
            "num_samples": {m: len(u) for m, u in normalised.items()},
            "gap": {f"{a}-{b}": float((centroids[a] - centroids[b]).norm())
                    for a, b in itertools.combinations(modalities, 2)},
            "centroid_norm": {m: float(c.norm()) for m, c in centroids.items()},
        }
        if self.plot_samples:
            generator = torch.Generator().manual_seed(self.seed)
            subsets = {m: u[torch.randperm(len(u), generator=generator)[: self.plot_samples]]
                       for m, u in normalised.items()}
            mean, directions, share = _pca_2d(torch.cat(list(subsets.values())), centroids[modalities[0]])

            def project(x: torch.Tensor) -> list:
                return ((x - mean) @ directions.T).round(decimals=4).tolist()

            result["pca"] = {
                "variance_share": share.tolist(),
                "points": {m: project(u) for m, u in subsets.items()},
                "centroids": {m: project(c.unsqueeze(0))[0] for m, c in centroids.items()},
            }
        return result

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        """``gap/<a>-<b>`` for every pair and ``centroid_norm/<m>`` for every modality."""
        return ({f"gap/{pair}": value for pair, value in result["gap"].items()}
                | {f"centroid_norm/{m}": value for m, value in result["centroid_norm"].items()})

    def summary(self, result: Mapping[str, Any]) -> str:
        """The pairwise gaps and each centroid's norm."""
        lines = [
            f"## {self.name}",
            "",
            f"Distance between the centroids of the L2-normalised {result['feature_dim']}-d features "
            "(0: same centre, at most 2).",
            "",
            "| pair | gap |",
            "|---|---|",
            *[f"| {pair} | {value:.4f} |" for pair, value in result["gap"].items()],
            "",
            "| modality | samples | centroid norm |",
            "|---|---|---|",
            *[f"| {m} | {result['num_samples'][m]} | {value:.4f} |" for m, value in result["centroid_norm"].items()],
        ]
        return "\n".join(lines) + "\n"

    def figures(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """``pca``: the normalised features of each modality and the centroids on the top two principal axes
        of the pooled scatter subsets (nothing when the result has no ``pca``)."""
        pca = result.get("pca")
        if pca is None:
            return {}
        fig, ax = plt.subplots(figsize=(5, 4.5))
        for i, (m, points) in enumerate(pca["points"].items()):
            if points:
                x, y = zip(*points)
                ax.scatter(x, y, s=6, alpha=0.35, color=f"C{i}", label=m)
            cx, cy = pca["centroids"][m]
            ax.scatter([cx], [cy], s=160, marker="X", color=f"C{i}", edgecolors="black", linewidths=1.0)
        share = pca["variance_share"]
        ax.set_xlabel(f"PC1 ({share[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({share[1]:.0%} of variance)")
        gaps = ", ".join(f"{pair} {value:.3f}" for pair, value in result["gap"].items())
        ax.set_title(f"modality gap: {gaps}", fontsize=9)
        ax.legend(markerscale=2)
        fig.tight_layout()
        return {"pca": fig}
