"""Diagnostics of how much a model uses each modality, as functions and Lightning callbacks."""

from balance.diagnostics.contributions import ContributionCallback

__all__ = ["ContributionCallback"]
