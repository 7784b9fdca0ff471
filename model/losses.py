"""Phase losses. SSL: Σ_l w_l·L_nce^l. Joint (paper Eq. 5): L_cls + λ·Σ_l w_l·L_nce^l. Fine-tune: L_cls."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from hcml.model.hcml import LEVELS


def phase_loss(out: dict[str, Tensor], labels: Tensor, phase: str, nce_weights, nce_lambda: float
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and its named terms (``ce``, ``nce_low``, ...), each a detached-free scalar tensor."""
    terms: dict[str, Tensor] = {}
    if phase in ("joint", "finetune"):
        terms["ce"] = F.cross_entropy(out["logits"].float(), labels)
    nce = {k: out[f"nce_{k}"] for k in LEVELS if f"nce_{k}" in out}
    terms.update({f"nce_{k}": v for k, v in nce.items()})
    if phase == "finetune" or not nce:
        if phase == "ssl":
            raise ValueError("phase 'ssl' needs the motion module's NCE terms (model.motion=true)")
        return terms["ce"], terms
    weighted = sum(w * nce[k] for k, w in zip(LEVELS, nce_weights) if k in nce)
    total = weighted if phase == "ssl" else terms["ce"] + nce_lambda * weighted
    return total, terms
