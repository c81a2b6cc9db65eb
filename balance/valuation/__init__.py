"""Exact per-sample modality Shapley values (Wei et al., CVPR 2024), for any number of modalities, batched.

A sample's modalities play a cooperative game whose coalition values are the benefits of the model's
predictions with only those modalities kept; a modality's contribution is its exact Shapley value over all
2^M coalitions. Three modules, every public name re-exported here:

- :mod:`balance.valuation.shapley`: the arithmetic. Coalitions as bitmasks (:func:`subset_masks`), the Shapley
  weights and :func:`shapley_values` (exact for integer coalition values), the benefits (:data:`BENEFITS`,
  :func:`coalition_benefit`) and the value table built from the subsets' logits.
- :mod:`balance.valuation.coalitions`: a model's coalition values, dropping a modality by zeroing its features
  (:func:`subset_values`, the fast path) or its inputs (:func:`subset_values_from_inputs`, with a
  :class:`ZeroInputCache`); :data:`DROPS` names the two.
- :mod:`balance.valuation.table`: a batch's valuation (:func:`modality_shapley`) and a whole split's
  (:func:`value_dataloader`), collected by a :class:`TableBuilder` into a :class:`ValuationTable`.

Everything here is a pure function of a model and tensors; nothing knows about Lightning.
"""

from balance.valuation.coalitions import DROPS, ZeroInputCache, subset_values, subset_values_from_inputs
from balance.valuation.shapley import BENEFITS, coalition_benefit, shapley_values, shapley_weights, subset_masks
from balance.valuation.table import TableBuilder, ValuationTable, modality_shapley, value_dataloader

__all__ = [
    "BENEFITS",
    "DROPS",
    "TableBuilder",
    "ValuationTable",
    "ZeroInputCache",
    "coalition_benefit",
    "modality_shapley",
    "shapley_values",
    "shapley_weights",
    "subset_masks",
    "subset_values",
    "subset_values_from_inputs",
    "value_dataloader",
]
