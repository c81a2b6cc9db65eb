"""CGGM: classifier-guided gradient modulation (Guo, Jin, Chen, Zhao, NeurIPS 2024).

Beside the multimodal model, every modality ``m`` gets an auxiliary classifier ``f_m`` trained on the *detached*
features of its encoder (so it measures what the encoder has learnt without teaching it anything). At every
training step, with ``acc_m`` the batch accuracy of ``f_m`` (before its update) and ``d_m = acc_m - acc_m'`` its
change since the previous step:

- magnitude: ``B_m = (sum_j d_j + eps - d_m) / (sum_j d_j + eps)`` (``eps = 1e-8``; for two modalities
  ``B_1 = d_2 / (d_1 + d_2)``): a modality whose classifier improved less than the others gets the larger
  coefficient, and the gradients of its encoder are multiplied by ``rho * B_m`` (``rho`` 1.3);
- direction: ``L_gm = (sum_m |B_m| - sum_m B_m cos_m) / M`` is added to the loss with weight ``lamda``, where
  ``cos_m`` compares classifier ``m``'s output layer with the block of the fusion head's output layer that
  modality ``m`` reaches: the cosine of their *gradients* (``direction: gradients``, the paper's definition; the
  term then reaches the fusion head only) or of the *weights* themselves one step late (``direction: weights``,
  what the official code computes).

The classifiers train on their summed cross-entropy at their own learning rate and weight decay (a parameter
group of the one optimizer); the direction loss never reaches them. After the modulation the model's gradients
(not the classifiers') are clipped to the norm ``clip`` (official 0.8), as the official loop does before its step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from balance import options
from balance.methods.base import STAGES, MultimodalMethod
from balance.methods.step import Step

DIRECTIONS = ("gradients", "weights")
log = logging.getLogger(__name__)


def balance_coefficients(gains: torch.Tensor, eps: float = 1e-8, max_coefficient: float | None = None) -> torch.Tensor:
    """``[M]`` CGGM's ``B_m = (sum_j d_j + eps - d_m) / (sum_j d_j + eps)`` from the classifiers' accuracy changes
    ``d`` (the official formula for any M). Where the changes cancel (``sum_j d_j = 0`` with some ``d_m != 0``) the
    denominator is ``eps`` and the coefficients reach about ``|d_m| / eps``; ``max_coefficient`` (not official)
    clamps them to ``[-max_coefficient, max_coefficient]``."""
    total = gains.sum() + eps
    coefficients = (total - gains) / total
    if max_coefficient is not None:
        coefficients = coefficients.clamp(-max_coefficient, max_coefficient)
    return coefficients


def direction_loss(coefficients: torch.Tensor, cosines: torch.Tensor) -> torch.Tensor:
    """CGGM's ``L_gm = (sum_m |B_m| - sum_m B_m cos_m) / M``; ``coefficients`` are constants (no gradient)."""
    coefficients = coefficients.detach().to(cosines)
    return (coefficients.abs().sum() - (coefficients * cosines).sum()) / len(coefficients)


class CGGM(MultimodalMethod):
    """Classifier-guided gradient modulation (module docstring).

    The auxiliary classifier of modality ``m`` is an MLP on its ``[B, d_m]`` features whose output layer has the
    shape of the block of the fusion head's output layer that ``m`` reaches (``FusionHead.output_weight``: the
    concat head's columns of ``m``, the sum / late-fusion head ``m``, the shared head, the gated and FiLM heads'
    output layer), so the cosine of the direction loss is defined. The official classifiers are small
    transformers on token sequences with a linear output layer of the fusion output layer's shape; here the
    features are vectors, hence the MLP.

    Under DDP the classifiers' correct counts and sample counts are summed over the ranks before the accuracies
    are taken, so every rank computes the same coefficients and scales alike; the model's gradients are already
    averaged when they are scaled and clipped. With ``direction: gradients`` each rank's direction loss uses its
    own batch's gradients (DDP then averages its gradient like any loss's). With gradient accumulation every
    micro-batch is one CGGM step for the accuracies and the direction loss; the accumulated encoder gradients are
    scaled once, by the last micro-batch's coefficients.

    Args:
        rho: the factor of every encoder gradient coefficient, ``rho * B_m`` (official ``--rou``, 1.3).
        lamda: weight of the direction loss (official ``--lamda``: 0.05 Food-101, 0.2 CMU-MOSI and IEMOCAP);
            0 switches it off.
        direction: ``gradients`` (the paper: cosine of the gradients of the classifiers' and the fusion head's
            output layers, taken in the same step) or ``weights`` (the official code: cosine of the weights, the
            term built at one step and backpropagated at the next).
        classifier_lr: learning rate of the classifiers' parameter group (official ``--cls_lr``, 5e-4).
        classifier_weight_decay: their weight decay (official 3e-3 on Food-101, 0 on CMU-MOSI / IEMOCAP).
        classifier_layers: hidden layers of each classifier (Linear + ReLU; 0: a linear classifier, possible where
            the fusion block has the feature size).
        clip: the norm the model's gradients are clipped to after the modulation (official ``--clip`` 0.8);
            ``None``: no clipping by the method (``trainer.gradient_clip_val`` would clip every parameter,
            classifiers included).
        eps: the constant added to the summed accuracy changes (official 1e-8).
        max_coefficient: bound on ``|B_m|`` (``None``, official: unbounded).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    needs_several_modalities = "CGGM balances modalities"

    def __init__(self, rho: float = 1.3, lamda: float = 0.05, direction: str = "gradients",
                 classifier_lr: float = 5e-4, classifier_weight_decay: float = 3e-3, classifier_layers: int = 1,
                 clip: float | None = 0.8, eps: float = 1e-8, max_coefficient: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, value in (("rho", rho), ("classifier_lr", classifier_lr), ("eps", eps)):
            options.positive(name, value)
        for name, value in (("lamda", lamda), ("classifier_weight_decay", classifier_weight_decay)):
            options.non_negative(name, value)
        for name, value in (("clip", clip), ("max_coefficient", max_coefficient)):
            options.positive(name, value, optional=True)
        options.one_of("direction", direction, DIRECTIONS)
        options.integer("classifier_layers", classifier_layers, 0)
        self.rho = float(rho)
        self.lamda = float(lamda)
        self.direction = direction
        self.classifier_lr = float(classifier_lr)
        self.classifier_weight_decay = float(classifier_weight_decay)
        self.clip = None if clip is None else float(clip)
        self.eps = float(eps)
        self.max_coefficient = None if max_coefficient is None else float(max_coefficient)

        fusion = self.model.fusion
        self.output_weights = {m: fusion.output_weight(m) for m in self.modalities}
        if self.lamda > 0 and any(w is None for w in self.output_weights.values()):
            raise ValueError(f"CGGM's direction loss compares each classifier's output layer with the fusion head's, "
                             f"but {type(fusion).__name__} has no linear output layer: use a head that has one "
                             "(model/fusion=concat, sum, late_fusion, shared, gated or film), or method.lamda=0")
        classes = self.model.num_classes
        widths = {m: fusion.feature_dims[m] if w is None else w[0][:, w[1]].shape[1]
                  for m, w in self.output_weights.items()}
        self.classifiers = nn.ModuleDict({m: self._classifier(fusion.feature_dims[m], widths[m], classes,
                                                              classifier_layers) for m in self.modalities})

        self.encoder_parameters = {m: [p for p in self.model.encoders[m].parameters() if p.requires_grad]
                                   for m in self.modalities}
        owner: dict[int, str] = {}
        for m, parameters in self.encoder_parameters.items():
            for p in parameters:
                if id(p) in owner:
                    raise ValueError(f"CGGM scales each modality's encoder gradients by its own coefficient, but "
                                     f"{owner[id(p)]!r} and {m!r} share a parameter: give every modality its own "
                                     "encoder")
                owner[id(p)] = m

        # The state one step carries to the next (in checkpoints, so a resumed run continues exactly).
        count = len(self.modalities)
        self.register_buffer("previous_correct", torch.zeros(count, dtype=torch.long))
        self.register_buffer("previous_total", torch.zeros(count, dtype=torch.long))
        self.register_buffer("previous_coefficients", torch.ones(count))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))
        if self.direction == "weights":
            # The weights the official code's direction term was built from, backpropagated one step later.
            for i, m in enumerate(self.modalities):
                shape = (classes, widths[m])
                self.register_buffer(f"previous_fusion_weight_{i}", torch.zeros(shape))
                self.register_buffer(f"previous_classifier_weight_{i}", torch.zeros(shape))
        # This step's coefficients, for the gradient hook; never outlive the optimizer step.
        self._coefficients: torch.Tensor | None = None

        for m in self.modalities:
            for name in ("coeff", "cos"):
                self.declare_metric(f"{name}_{m}")
            self.declare_metric(f"cls_acc_{m}", stages=STAGES)
        self.declare_metric("direction_loss")

    @staticmethod
    def _classifier(in_dim: int, width: int, num_classes: int, hidden_layers: int) -> nn.Sequential:
        if hidden_layers == 0 and width != in_dim:
            raise ValueError(f"a linear classifier (classifier_layers=0) has a {in_dim}-wide output layer, but the "
                             f"fusion head's block is {width} wide: use method.classifier_layers >= 1")
        layers: list[nn.Module] = []
        for i in range(hidden_layers):
            layers += [nn.Linear(in_dim if i == 0 else width, width), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(width if hidden_layers else in_dim, num_classes))

    def classifier_weight(self, modality: str) -> nn.Parameter:
        """The output-layer weight ``[C, k]`` of modality's auxiliary classifier."""
        return self.classifiers[modality][-1].weight

    def fusion_weight(self, modality: str) -> torch.Tensor:
        """The block ``[C, k]`` of the fusion head's output-layer weight that modality's features reach (a view of
        the parameter, so gradients reach it)."""
        weight, columns = self.output_weights[modality]
        return weight[:, columns]

    def parameter_groups(self) -> list[dict[str, Any]]:
        classifiers = {id(p) for p in self.classifiers.parameters()}
        return [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in classifiers]},
                {"params": [p for p in self.classifiers.parameters() if p.requires_grad],
                 "lr": self.classifier_lr, "weight_decay": self.classifier_weight_decay}]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.clip is not None and self.trainer.gradient_clip_val:
            log.warning("CGGM clips the model's gradients itself (method.clip=%s); trainer.gradient_clip_val=%s "
                        "clips every parameter again, the classifiers included", self.clip,
                        self.trainer.gradient_clip_val)

    # -- one training step ------------------------------------------------------------------------------------------

    def _mask(self, step: Step, index: int, like: torch.Tensor) -> torch.Tensor:
        present = step.batch.get("present")
        return torch.ones_like(like) if present is None else present[:, index].to(like)

    def accuracies(self, correct: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """``[M]`` float64 accuracies on the CPU from counts (0 where nothing was counted, as the official start)."""
        correct, total = correct.cpu().double(), total.cpu().double()  # MPS has no float64
        return torch.where(total > 0, correct / total.clamp_min(1), torch.zeros_like(total))

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        """``fused`` and ``classifiers`` CE, and ``direction``; also this step's coefficients and the state the next
        step needs (called once per training batch)."""
        labels = step.labels
        terms = {"fused": F.cross_entropy(step.logits, labels)}
        classifier_losses, correct, total = [], [], []
        for i, m in enumerate(self.modalities):
            logits = self.classifiers[m](step.features[m].detach())
            loss = F.cross_entropy(logits, labels, reduction="none")
            mask = self._mask(step, i, loss)  # a missing modality's zeroed input has nothing to teach or show
            classifier_losses.append((loss * mask).sum() / mask.sum().clamp_min(1))
            correct.append(((logits.detach().argmax(1) == labels).to(loss) * mask).sum())
            total.append(mask.sum())
        terms["classifiers"] = torch.stack(classifier_losses).sum()

        # The coefficients from the accuracies of the whole (all-rank) batch, before the classifiers' update.
        counts = self.reduce_across_ranks(torch.stack([*correct, *total]).detach()).round().long()
        count = len(self.modalities)
        correct_now, total_now = counts[:count], counts[count:]
        seen = total_now > 0  # a modality absent from the whole batch keeps its previous accuracy
        correct_now = torch.where(seen, correct_now, self.previous_correct)
        total_now = torch.where(seen, total_now, self.previous_total)
        accuracy = self.accuracies(correct_now, total_now)
        gains = accuracy - self.accuracies(self.previous_correct, self.previous_total)
        coefficients = balance_coefficients(gains, self.eps, self.max_coefficient).to(self.device, torch.float32)

        if self.lamda > 0:
            if self.direction == "gradients":
                cosines = self._gradient_cosines(step, classifier_losses)
                used = coefficients
            elif bool(self.has_previous):
                cosines, used = self._previous_weight_cosines(), self.previous_coefficients.clone()
            else:
                cosines = used = None  # the official first step: no direction term yet
            if cosines is not None:
                value = direction_loss(used, cosines)
                # The term's gradient, not its value: `sum |B|` and `B cos` reach ~1e7 where the accuracy changes
                # cancel (B ~ d / eps) and would swamp the logged loss; its value is logged as direction_loss.
                terms["direction"] = self.lamda * (value - value.detach())
                self.record("direction_loss", value)
                for m, c in zip(self.modalities, cosines):
                    self.record(f"cos_{m}", c)
            if self.direction == "weights":
                # Built now (before any update this step), backpropagated at the next step, as the official term.
                for i, m in enumerate(self.modalities):
                    getattr(self, f"previous_fusion_weight_{i}").copy_(self.fusion_weight(m).detach())
                    getattr(self, f"previous_classifier_weight_{i}").copy_(self.classifier_weight(m).detach())

        self.previous_correct.copy_(correct_now)
        self.previous_total.copy_(total_now)
        self.previous_coefficients.copy_(coefficients)
        self.has_previous.fill_(True)
        self._coefficients = coefficients
        for m, b, a, n in zip(self.modalities, coefficients, accuracy, total_now):
            self.record(f"coeff_{m}", b)
            self.record(f"cls_acc_{m}", float(a), weight=float(n))
        return terms

    def _gradient_cosines(self, step: Step, classifier_losses: list[torch.Tensor]) -> torch.Tensor:
        """``[M]`` cosines between the gradient of each classifier's loss on its output layer (a constant) and the
        gradient of the fused loss on the fusion head's block of that modality, the latter with its graph (from
        the detached features, so the direction term reaches the fusion head and nothing upstream)."""
        fused = self.model.fuse({m: f.detach() for m, f in step.features.items()}, keep=step.batch.get("present"))
        weights = list({id(w): w for w, _ in self.output_weights.values()}.values())
        grads = dict(zip(map(id, weights), torch.autograd.grad(F.cross_entropy(fused, step.labels), weights,
                                                                create_graph=True)))
        cosines = []
        for m, loss in zip(self.modalities, classifier_losses):
            weight, columns = self.output_weights[m]
            fusion_grad = grads[id(weight)][:, columns]
            (classifier_grad,) = torch.autograd.grad(loss, self.classifier_weight(m), retain_graph=True)
            cosines.append(F.cosine_similarity(classifier_grad.flatten(), fusion_grad.flatten(), dim=0))
        return torch.stack(cosines)

    def _previous_weight_cosines(self) -> torch.Tensor:
        """``[M]`` the official cosines: the previous step's classifier weight against the previous step's fusion
        weight, the latter routed to the fusion parameter so its gradient lands on the current weight (the
        official code backpropagates its stale clone of the parameter)."""
        cosines = []
        for i, m in enumerate(self.modalities):
            current = self.fusion_weight(m)
            # Value: the previous weight exactly (x - x is 0); gradient: the identity onto the parameter.
            previous = getattr(self, f"previous_fusion_weight_{i}").clone() + (current - current.detach())
            classifier = getattr(self, f"previous_classifier_weight_{i}").clone()
            cosines.append(F.cosine_similarity(classifier.flatten(), previous.flatten(), dim=0))
        return torch.stack(cosines)

    def modify_gradients(self, step: Step) -> None:
        coefficients, self._coefficients = self._coefficients, None
        if coefficients is None:
            return
        for m, b in zip(self.modalities, coefficients):
            factor = b * self.rho
            for p in self.encoder_parameters[m]:
                if p.grad is not None:
                    p.grad.mul_(factor.to(p.grad.dtype))
        if self.clip is not None:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], self.clip)

    # -- evaluation -------------------------------------------------------------------------------------------------

    def evaluation_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        # The base's, plus each auxiliary classifier's accuracy (the paper's per-modality accuracies).
        out = super().evaluation_step(batch, stage)
        present = batch.get("present")
        for i, m in enumerate(self.modalities):
            hits = (self.classifiers[m](out["features"][m]).argmax(1) == batch["label"]).float()
            mask = torch.ones_like(hits) if present is None else present[:, i].float()
            if mask.sum() > 0:
                self.record(f"cls_acc_{m}", (hits * mask).sum() / mask.sum(), stage, weight=mask.sum())
        return out
