"""Synthetic feature vectors with a configurable informativeness per modality (tests, benchmarks, M > 2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import InMemoryDataset, MultimodalDataModule
from datamodules.splits import stratified_split


class SyntheticDataModule(MultimodalDataModule):
    """M modalities of Gaussian feature vectors around per-class prototypes.

    Modality ``m`` of a sample of class ``y`` is ``informativeness[m] * P_m[y] + noise`` with random unit-variance
    prototypes ``P_m`` and standard normal noise, so a larger informativeness makes a modality easier (0 makes it
    pure noise). Modalities are independent given the label, so fusing them beats each one alone.

    Args:
        modalities: modality names.
        informativeness: signal scale of each modality (same length as ``modalities``).
        num_classes: number of classes.
        feature_dim: size of every feature vector.
        num_samples: samples over all splits.
        image_shape: if set (e.g. ``[1, 4, 4]``, whose product is ``feature_dim``), every feature vector is served
            reshaped to it, as a tiny image for convolutional encoders (``model=small_cnn``).
        val_fraction: fraction of samples in the validation split.
        test_fraction: fraction of samples in the test split.
        **kwargs: the base datamodule's arguments.
    """

    def __init__(
        self,
        modalities: Sequence[str] = ("m0", "m1"),
        informativeness: Sequence[float] = (1.0, 0.3),
        num_classes: int = 4,
        feature_dim: int = 16,
        num_samples: int = 2000,
        image_shape: Sequence[int] | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if len(modalities) != len(informativeness):
            raise ValueError(f"{len(modalities)} modalities but {len(informativeness)} informativeness values")
        self.modalities = list(modalities)
        self.informativeness = list(informativeness)
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.num_samples = num_samples
        if image_shape is not None and int(np.prod(image_shape)) != feature_dim:
            raise ValueError(f"image_shape {list(image_shape)} holds {int(np.prod(image_shape))} values, "
                             f"feature_dim is {feature_dim}")
        self.image_shape = None if image_shape is None else tuple(int(d) for d in image_shape)
        self.fractions = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}

    def build_datasets(self) -> dict[str, Dataset]:
        rng = np.random.default_rng(self.seed)
        labels = rng.integers(self.num_classes, size=self.num_samples)
        features = {}
        for m, scale in zip(self.modalities, self.informativeness):
            prototypes = rng.standard_normal((self.num_classes, self.feature_dim))
            noise = rng.standard_normal((self.num_samples, self.feature_dim))
            features[m] = torch.from_numpy(scale * prototypes[labels] + noise).float()
            if self.image_shape is not None:
                features[m] = features[m].view(-1, *self.image_shape)
        parts = stratified_split(labels, self.fractions, self.seed)
        labels_t = torch.from_numpy(labels)
        return {
            split: InMemoryDataset({m: x[idx] for m, x in features.items()}, labels_t[idx])
            for split, idx in parts.items()
        }
