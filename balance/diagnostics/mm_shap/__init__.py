"""MM-SHAP (Parcalabescu & Frank, ACL 2023): each modality's share of the absolute Shapley values of its input
features, per sample.

The players of the game are input features: text tokens, image patches, frame-and-patch cells of a frame stack,
time-frequency blocks of a spectrogram, chunks of a feature vector. The game's value is the logit of the class the
unmasked model predicts, with the absent features masked to zero (a token to the padding id 0). Shapley values
``phi`` are estimated by antithetic permutation sampling, and modality ``m``'s share of a sample is
``sum_{f of m} |phi_f| / sum_f |phi_f|``. One module per idea:

- ``grouping``: which input elements make up each feature, with about equal counts across modalities, under the
  ``covering`` layout (the default: every element in a feature) or the ``official`` one (the official code's
  ``size // p`` patches, the remainder strip never masked, special tokens in the token count);
- ``sampling``: the Shapley values, by captum's ``ShapleyValueSampling`` played through one gate per feature;
- ``shares``: the modality shares from the Shapley values;
- ``diagnostic``: the ``MMSHAP`` diagnostic (compute over a split, scalars, summary, figure).

Documentation: ``docs/diagnostics/mm_shap.md``.
"""

from balance.diagnostics.mm_shap.diagnostic import MMSHAP
from balance.diagnostics.mm_shap.grouping import (
    LAYOUTS,
    FeatureGroups,
    check_layout,
    feature_groups,
    grid_shape,
    group_features,
    split_axes,
    token_count,
)
from balance.diagnostics.mm_shap.sampling import mm_shap_values, permutation_generator
from balance.diagnostics.mm_shap.shares import modality_shares

__all__ = [
    "LAYOUTS",
    "MMSHAP",
    "FeatureGroups",
    "check_layout",
    "feature_groups",
    "grid_shape",
    "group_features",
    "mm_shap_values",
    "modality_shares",
    "permutation_generator",
    "split_axes",
    "token_count",
]
