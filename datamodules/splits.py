"""Deterministic, stratified train/val/test splits (optionally keeping groups of samples together), and the
lines of a user's split file."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np


def split_file_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, stripped line)`` of a split file's entries: blank lines and ``#`` comments skipped, a UTF-8
    byte-order mark (common in files saved on Windows) and CRLF line ends removed."""
    for number, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line


def stratified_split(
    labels: Sequence[int],
    fractions: Mapping[str, float],
    seed: int,
    groups: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Splits sample indices into named parts with the same class proportions in each.

    Args:
        labels: the label of every sample.
        fractions: part name -> fraction of the samples (or groups); they must sum to 1. Parts are filled in the
            given order and the last part takes the rounding remainder.
        seed: seed of the shuffle; the same seed gives the same split.
        groups: optional group id of every sample (e.g. the image several utterances were paired with); a group
            never straddles two parts. Every sample of a group must have the same label.

    Returns:
        Part name -> sorted sample indices.
    """
    labels = np.asarray(labels)
    total = sum(fractions.values())
    if not np.isclose(total, 1.0) or any(f < 0 for f in fractions.values()):
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {dict(fractions)}")
    group_ids = np.arange(len(labels)) if groups is None else np.asarray(groups)
    unique_groups, first = np.unique(group_ids, return_index=True)
    group_labels = labels[first]
    if groups is not None:
        mixed = [g for g, y in zip(unique_groups, group_labels) if np.any(labels[group_ids == g] != y)]
        if mixed:
            raise ValueError(f"groups {mixed[:5]} hold samples of different labels")

    rng = np.random.default_rng(seed)
    names = list(fractions)
    chosen: dict[str, list[int]] = {name: [] for name in names}
    for label in np.unique(group_labels):
        members = rng.permutation(unique_groups[group_labels == label])
        bounds = np.round(np.cumsum([fractions[n] for n in names]) * len(members)).astype(int)
        bounds[-1] = len(members)
        for name, start, stop in zip(names, np.r_[0, bounds[:-1]], bounds):
            chosen[name].extend(members[start:stop].tolist())
    _fill_empty_parts(chosen, fractions)
    return {name: np.flatnonzero(np.isin(group_ids, chosen[name])) for name in names}


def _fill_empty_parts(parts: dict[str, list], fractions: Mapping[str, float]) -> None:
    """Gives every part with a positive fraction at least one unit (sample or group), taken from the largest
    part, where rounding left it empty: a tiny data set is still split into parts that can be trained, selected
    and tested on. Nothing moves when every part has a unit already, so larger data sets split as before."""
    for name in fractions:
        if parts[name] or fractions[name] <= 0:
            continue
        donor = max(parts, key=lambda n: len(parts[n]))
        if len(parts[donor]) > 1:
            parts[name].append(parts[donor].pop())


def group_split(groups: Sequence[int], fractions: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """Splits samples so that every group (e.g. an actor) lands in exactly one part; parts get fractions of the groups."""
    groups = np.asarray(groups)
    unique = np.random.default_rng(seed).permutation(np.unique(groups))
    bounds = np.round(np.cumsum(list(fractions.values())) * len(unique)).astype(int)
    bounds[-1] = len(unique)
    chosen = {name: unique[start:stop].tolist() for name, start, stop in zip(fractions, np.r_[0, bounds[:-1]], bounds)}
    _fill_empty_parts(chosen, fractions)
    return {name: np.flatnonzero(np.isin(groups, chosen[name])) for name in fractions}


def random_split(num: int, fractions: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """A pooled random split without stratification (MLA's split: shuffle, cut)."""
    order = np.random.default_rng(seed).permutation(num)
    bounds = np.round(np.cumsum(list(fractions.values())) * num).astype(int)
    bounds[-1] = num
    chosen = {name: order[start:stop].tolist() for name, start, stop in zip(fractions, np.r_[0, bounds[:-1]], bounds)}
    _fill_empty_parts(chosen, fractions)
    return {name: np.sort(np.asarray(chosen[name], dtype=int)) for name in fractions}
