"""InfoReg: adaptive unimodal regulation for balanced multimodal information acquisition (Huang et al., CVPR 2025).

The loss is ``CE(fused) + sum_m CE(z_m)`` with ``z_m`` each modality's own logits (the concat head's block of ``m``
plus ``b / M``). Early in training (the "prime learning window") the information-sufficient modality acquires
information fastest and suppresses the others; InfoReg slows it down there by pulling its encoder back towards
where it stood at the start of the epoch, a proximal term added to its gradient after the backward pass:

- information amount of encoder ``m`` in an epoch: the trace of its diagonal Fisher information, estimated as in
  the official code by the squared gradients accumulated over the epoch's steps, averaged per weight tensor of
  the encoder's convolution and linear layers and summed over those tensors;
- window indicator at the start of epoch ``e``: ``k = (T_e - T_{e-10}) / sum_{j=e-9..e} T_j`` over the traces
  ``T`` of the epochs before (zeros before the first), the relative growth of the 10-epoch mean; ``k = 1`` in the
  first epoch; the window is open while ``k > threshold`` (0.05);
- per step, confidences ``s_m = sum_i softmax(z_m,i)[y_i]`` (summed over the batch and the ranks); a modality
  more confident than the weakest of the others, ``s_m > s_min = min_{j != m} s_j``, whose window is open, gets
  ``g <- g + beta_m (theta - theta_epoch_start)`` on every parameter of its encoder with
  ``beta_m = c_m exp(tanh(s_m - s_min))``; the official ``c`` is hard-coded and asymmetric, 0.95 for audio and 0.1
  for visual.

For two modalities this is the official rule; for more, every modality is compared with the weakest of the others
(as this project's OGM-GE), so any modality ahead of the weakest is regulated in proportion to its lead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from balance.methods.base import MultimodalMethod
from balance.methods.ogm_ge import confidence_scores
from balance.methods.step import Step

log = logging.getLogger(__name__)

#: epochs the window indicator compares (the official 10-epoch means)
HISTORY = 10


def window_indicator(traces: torch.Tensor, epochs_seen: int) -> torch.Tensor:
    """``[M]`` relative growth of the 10-epoch mean Fisher trace, ``(T_last - T_{last-10}) / sum(last 10)``.

    Args:
        traces: ``[M, 11]`` the last 11 epochs' traces per modality, oldest first, zeros before the first epoch
            (the official history starts with ten zeros).
        epochs_seen: epochs whose trace is in ``traces``; 0 gives 1 (the official first epoch).
    """
    if epochs_seen == 0:
        return torch.ones(traces.shape[0], dtype=traces.dtype, device=traces.device)
    recent = traces[:, 1:].sum(dim=1)
    growth = traces[:, -1] - traces[:, 0]
    return torch.where(recent > 0, growth / recent.clamp_min(torch.finfo(traces.dtype).tiny),
                       torch.zeros_like(recent))


def regulation_strengths(scores: torch.Tensor, coefficients: torch.Tensor, window_open: torch.Tensor) -> torch.Tensor:
    """``[M]`` proximal strengths ``beta_m = c_m exp(tanh(s_m - min_{j != m} s_j))`` for a modality ahead of the
    weakest of the others whose window is open, else 0."""
    others = torch.stack([torch.cat([scores[:m], scores[m + 1:]]).min() for m in range(len(scores))])
    lead = scores - others
    return torch.where((lead > 0) & window_open, coefficients * torch.exp(torch.tanh(lead)), torch.zeros_like(lead))


class InfoReg(MultimodalMethod):
    """Information acquisition regulation in the prime learning window.

    The state (each encoder's start-of-epoch parameters, the epoch's accumulated squared gradients, the last 11
    traces) is kept in buffers, so checkpoints hold it and a run resumed mid-epoch regulates towards the same
    anchor. The gradient hook sees the gradients averaged over DDP ranks and the confidences summed over them, so
    every rank regulates alike and accumulates the same traces.

    Args:
        beta: the regulation coefficient ``c`` of any modality not in ``beta_by_modality`` (official 0.95 for
            audio).
        beta_by_modality: modality -> its own ``c`` (official: visual 0.1).
        threshold: the window is open while the indicator exceeds it (official 0.05).
        window: ``own`` (each modality's window from its own trace) or a modality name (every modality's window
            from that modality's trace: the official code uses audio's for both).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    def __init__(self, beta: float = 0.95, beta_by_modality: Mapping[str, float] | None = None,
                 threshold: float = 0.05, window: str = "own", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        beta_by_modality = dict(beta_by_modality or {})
        unknown = sorted(set(beta_by_modality) - set(self.modalities))
        if unknown:
            # The default names the official visual modality; other data sets simply have none.
            log.warning("InfoReg: beta_by_modality names %s, not modalities of this model %s; they get no "
                        "coefficient", unknown, self.modalities)
        if window != "own" and window not in self.modalities:
            raise ValueError(f"window must be 'own' or one of the modalities {self.modalities}, got {window!r}")
        coefficients = [float(beta_by_modality.get(m, beta)) for m in self.modalities]
        if any(c < 0 for c in coefficients):
            raise ValueError(f"regulation coefficients must be >= 0, got {dict(zip(self.modalities, coefficients))}")
        self.threshold = float(threshold)
        self.window = window
        self.register_buffer("coefficients", torch.tensor(coefficients), persistent=False)
        self.regulated = {m: [p for p in self.model.encoders[m].parameters() if p.requires_grad]
                          for m in self.modalities}
        self.fisher_weights = {
            m: [layer.weight for layer in self.model.encoders[m].modules()
                if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.weight.requires_grad]
            for m in self.modalities}
        for m in self.modalities:
            if not self.fisher_weights[m]:
                raise ValueError(f"InfoReg measures information by the Fisher trace of convolution and linear "
                                 f"weights; the encoder of {m!r} has none")
            for i, p in enumerate(self.regulated[m]):
                self.register_buffer(f"anchor_{m}_{i}", p.detach().clone())
            for i, w in enumerate(self.fisher_weights[m]):
                self.register_buffer(f"fisher_{m}_{i}", torch.zeros_like(w))
            for name in ("fisher_trace", "window", "beta"):
                self.declare_metric(f"{name}_{m}")
        self.register_buffer("traces", torch.zeros(len(self.modalities), HISTORY + 1))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("anchor_epoch", torch.full((), -1, dtype=torch.long))
        self._window_open = torch.ones(len(self.modalities), dtype=torch.bool)

    def _anchors(self, m: str) -> list[torch.Tensor]:
        return [getattr(self, f"anchor_{m}_{i}") for i in range(len(self.regulated[m]))]

    def _fisher(self, m: str) -> list[torch.Tensor]:
        return [getattr(self, f"fisher_{m}_{i}") for i in range(len(self.fisher_weights[m]))]

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        losses = {"fused": F.cross_entropy(step.logits, step.labels)}
        return losses | {f"unimodal_{m}": loss for m, loss in self.unimodal_losses(step).items()}

    def _epoch_traces(self) -> torch.Tensor:
        """``[M]`` the Fisher traces accumulated so far in the epoch."""
        return torch.stack([sum(f.mean() for f in self._fisher(m)) for m in self.modalities]).to(self.traces)

    def on_train_epoch_start(self) -> None:
        # The state moves on when an epoch starts, not when one ends: a checkpoint written at the end of an epoch
        # (before or after this module's epoch-end hook) then resumes into the same state, and a run resumed
        # mid-epoch keeps the anchor and the accumulated gradients of the epoch it resumes.
        if int(self.anchor_epoch) != self.current_epoch:
            with torch.no_grad():
                if int(self.anchor_epoch) >= 0:
                    self.traces.copy_(torch.cat([self.traces[:, 1:], self._epoch_traces()[:, None]], dim=1))
                    self.epochs_seen += 1
                for m in self.modalities:
                    for anchor, p in zip(self._anchors(m), self.regulated[m]):
                        anchor.copy_(p)
                    for fisher in self._fisher(m):
                        fisher.zero_()
            self.anchor_epoch.fill_(self.current_epoch)
        indicator = window_indicator(self.traces, int(self.epochs_seen))
        if self.window != "own":
            indicator = indicator[self.modalities.index(self.window)].expand(len(self.modalities))
        self._window_open = indicator > self.threshold
        for m, k in zip(self.modalities, indicator):
            self.record(f"window_{m}", k)

    @torch.no_grad()
    def modify_gradients(self, step: Step) -> None:
        scores = self.reduce_across_ranks(confidence_scores(step.unimodal_logits, step.labels))
        betas = regulation_strengths(scores, self.coefficients.to(scores), self._window_open.to(scores.device))
        for m, beta in zip(self.modalities, betas):
            self.record(f"beta_{m}", beta)
            if beta > 0:
                for p, anchor in zip(self.regulated[m], self._anchors(m)):
                    if p.grad is not None:
                        p.grad.add_(p - anchor, alpha=float(beta))
            # The official code measures the information after the regulation, on the gradient the step uses.
            for fisher, w in zip(self._fisher(m), self.fisher_weights[m]):
                if w.grad is not None:
                    fisher.addcmul_(w.grad, w.grad)

    def on_train_epoch_end(self) -> None:
        for m, trace in zip(self.modalities, self._epoch_traces()):
            self.record(f"fisher_trace_{m}", trace)
        super().on_train_epoch_end()
