"""Phase losses. SSL: Σ_l w_l·L_nce^l. Joint (paper Eq. 5): L_cls + λ·Σ_l w_l·L_nce^l. Fine-tune: L_cls."""

from __future__ import annotations

from enum import Enum

import torch.nn.functional as F
from torch import Tensor

from hcml.model.hcml import LEVELS


class Phase(str, Enum):
    """A training phase, by what its loss holds (the one place that says so; config, loop and loss ask it)."""

    SSL = "ssl"            # the contrastive terms only (supplementary §3.3)
    JOINT = "joint"        # classification + lambda x the contrastive terms (Eq. 5)
    FINETUNE = "finetune"  # classification only

    def __str__(self) -> str:  # "joint", not "Phase.JOINT", in logs and f-strings on every Python
        return self.value

    @property
    def classifies(self) -> bool:
        """Has a classification term: the classifier trains and a final evaluation means something."""
        return self is not Phase.SSL

    @property
    def predicts_future(self) -> bool:
        """Its loss may hold the future-prediction terms (so each level needs >= 2 time steps)."""
        return self is not Phase.FINETUNE

    def has_nce(self, motion: bool, nce_lambda: float) -> bool:
        """Whether the loss has contrastive terms: SSL always, joint unless lambda = 0, fine-tuning never."""
        return motion and (self is Phase.SSL or (self is Phase.JOINT and nce_lambda > 0))


def phase_loss(out: dict[str, Tensor], labels: Tensor, phase: Phase | str, nce_weights, nce_lambda: float
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and its named terms (``ce``, ``nce_low``, ...), each a detached-free scalar tensor."""
    phase = Phase(phase)
    terms: dict[str, Tensor] = {}
    if phase.classifies:
        terms["ce"] = F.cross_entropy(out["logits"].float(), labels)
    nce = {k: out[f"nce_{k}"] for k in LEVELS if f"nce_{k}" in out}
    terms.update({f"nce_{k}": v for k, v in nce.items()})
    if phase is Phase.FINETUNE or not nce:
        if phase is Phase.SSL:
            raise ValueError("phase 'ssl' needs the motion module's NCE terms (model.motion=true)")
        return terms["ce"], terms
    weighted = sum(w * nce[k] for k, w in zip(LEVELS, nce_weights) if k in nce)
    total = weighted if phase is Phase.SSL else terms["ce"] + nce_lambda * weighted
    return total, terms
