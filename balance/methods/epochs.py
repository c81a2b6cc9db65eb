"""`EpochWindow`: the epochs in which a method's mechanism is active (warm-up, start, end)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EpochWindow:
    """The epochs ``start <= epoch <= end`` (0-based, both ends included; ``end=None`` never ends).

    Every method with a warm-up or a bounded active phase uses this one notion: OGM-GE's
    ``modulation_starts``/``modulation_ends`` (inclusive, as in the official loop), the resampling methods'
    valuation from epoch ``warmup_epochs - 1`` on.

    Args:
        start: first active epoch.
        end: last active epoch, or ``None``.
    """

    start: int = 0
    end: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.start, int) or isinstance(self.start, bool) or self.start < 0:
            raise ValueError(f"an epoch window starts at an epoch >= 0, got start={self.start!r}")
        if self.end is not None and (not isinstance(self.end, int) or self.end < self.start):
            raise ValueError(f"an epoch window ends at an epoch >= its start ({self.start}), got end={self.end!r}")

    def __contains__(self, epoch: int) -> bool:
        return epoch >= self.start and (self.end is None or epoch <= self.end)
