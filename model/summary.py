"""Per-stage output shapes, parameter counts and MACs of a model (``hcml info``).

MACs come from ``torch.utils.flop_counter`` (FLOPs / 2) with a formula registered for ``hcml::cost_volume``
(B·D²·H·W·C multiply-adds), run on the meta device, so even R(2+1)D-101 at T=32 costs no real compute.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from hcml.model.hcml import HCML, LEVELS
from hcml.ops import num_displacements


@register_flop_formula(torch.ops.hcml.cost_volume)
def _cost_volume_flops(f1_shape, f2_shape, max_displacement, stride, *args, out_shape=None, **kwargs) -> int:
    B, C, H, W = f1_shape
    D = num_displacements(max_displacement, stride)
    return 2 * B * D * D * H * W * C


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summarize(model: HCML, frames: int, size: int = 224) -> dict:
    """Shapes after each stage (batch 1), parameter split and GMACs per clip."""
    model = model.to("meta").eval()
    x = torch.empty(1, 3, frames, size, size, device="meta")
    shapes: dict[str, list[int]] = {}
    hooks = [model.backbone.stem.register_forward_hook(lambda m, i, o: shapes.__setitem__("stem", list(o.shape[1:])))]
    for name, stage in model.backbone.stages.items():
        hooks.append(stage.register_forward_hook(lambda m, i, o, n=name: shapes.__setitem__(n, list(o.shape[1:]))))
    motion_shapes: dict[str, list[int]] = {}
    if model.motion_enabled:
        for lv, mod in (("low", model.prime), ("mid", model.levels["mid"]), ("high", model.levels["high"])):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, n=lv: motion_shapes.__setitem__(n, list(o.shape[1:]))))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, with_nce=False)
    for h in hooks:
        h.remove()
    macs = counter.get_total_flops() / 2
    motion_p = sum(_count(getattr(model, n)) for n in ("prime", "levels", "fusion") if hasattr(model, n))
    heads_p = _count(model.fc) + (_count(model.predictors) if hasattr(model, "predictors") else 0)
    return {
        "arch": model.spec.arch, "frames": frames, "size": size, "motion": model.spec.motion,
        "stages": shapes,
        "motion_levels": {lv: motion_shapes[lv] for lv in LEVELS if lv in motion_shapes},
        "params": {"backbone": _count(model.backbone), "motion": motion_p, "heads": heads_p,
                   "total": _count(model)},
        "gmacs_per_clip": macs / 1e9,
    }
