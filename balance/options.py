"""Checks of options when the run is built, each naming the option as the config spells it and what it accepts:
``scope`` is the config group the option belongs to (``method``, or e.g. ``diagnostics.linear_probe``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def positive(name: str, value: Any, optional: bool = False, scope: str = "method") -> None:
    """Refuses ``value`` unless it is a number > 0 (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{scope}.{name} must be a number > 0{' or null' if optional else ''}, got {value!r}")


def non_negative(name: str, value: Any, scope: str = "method") -> None:
    """Refuses ``value`` unless it is a number >= 0."""
    if not _is_number(value) or not value >= 0:
        raise ValueError(f"{scope}.{name} must be a number >= 0, got {value!r}")


def one_of(name: str, value: Any, choices: Iterable[Any], scope: str = "method") -> None:
    """Refuses ``value`` unless it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{scope}.{name} must be one of {choices}, got {value!r}")


def integer(name: str, value: Any, minimum: int, optional: bool = False, scope: str = "method") -> None:
    """Refuses ``value`` unless it is an integer >= ``minimum`` (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{scope}.{name} must be an integer >= {minimum}{' or null' if optional else ''}, "
                         f"got {value!r}")


def interval(name: str, value: Any, low: float, high: float, open_low: bool = False, open_high: bool = False,
             scope: str = "method") -> None:
    """Refuses ``value`` unless it is a number between ``low`` and ``high`` (each end closed unless ``open_*``)."""
    above = _is_number(value) and (value > low if open_low else value >= low)
    below = _is_number(value) and (value < high if open_high else value <= high)
    if not (above and below):
        bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{scope}.{name} must be a number in {bounds}, got {value!r}")
