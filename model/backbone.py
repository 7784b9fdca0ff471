"""R2D-50, R(2+1)D-101 and a tiny CPU variant from one builder over stage specs (supplementary Table 8).

Clips are (B, C, T, H, W). All convolutions are Conv3d with a temporal kernel of 1 except the (3×1×1) temporal
convs of R(2+1)D-101's res4/res5 (top-heavy design). Temporal striding starts at res3 (T → T/2) and continues
at res4 (T/4); it sits on the block's 1×3×3 conv together with the spatial stride, as a 1-frame temporal kernel
with stride 2 (frame subsampling).

``causal_stages``: stages whose temporal convs see only the present and the past (two frames of padding in
front instead of one on each side; the same weights). HCML makes the stages that feed its motion levels causal,
so that the motion feature at t never sees t + 1, the future its contrastive loss asks it to predict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Union

import torch
from torch import nn


class BackboneLike(Protocol):
    """What HCML needs of a backbone, any family (not only the ResNet-shaped specs below):

    - ``stem``: (B, 3, T, H, W) clips → the first feature map;
    - ``stages``: an ``nn.ModuleDict`` run in order after the stem, ``stage_names`` their order; HCML runs its
      motion levels between them, so each stage maps (B, C, T, H, W) → (B, C', T', H', W');
    - ``level_stages``: which stage each motion level ("low", "mid", "high") follows, in order;
    - ``stage_channels(name)``: a stage's output channels; ``out_channels``: the last stage's (the classifier's
      input);
    - built with ``causal_stages``: stages whose temporal convolutions must see no later frame (the stages that
      feed the motion levels: their features must not see the future the contrastive loss predicts).

    A new family is a builder ``(causal_stages) -> BackboneLike`` registered in ``ARCHS``.
    """

    stem: nn.Module
    stages: nn.ModuleDict
    level_stages: dict[str, str]
    out_channels: int

    @property
    def stage_names(self) -> list[str]: ...

    def stage_channels(self, name: str) -> int: ...


@dataclass(frozen=True)
class StageSpec:
    name: str
    blocks: int
    width: int  # bottleneck width
    out: int  # output channels
    t_stride: int
    s_stride: int
    temporal: bool  # (3×1×1) temporal conv inside each block


@dataclass(frozen=True)
class BackboneSpec:
    stem: int
    stem_pool: bool
    stages: tuple[StageSpec, ...]
    # motion level → the stage it follows (res2, res3, res4: the paper's low, mid, high)
    level_stages: dict[str, str] = field(default_factory=lambda: {"low": "res2", "mid": "res3", "high": "res4"})


def _stages(blocks, widths, temporal) -> tuple[StageSpec, ...]:
    t_strides, s_strides = (1, 2, 2, 1), (1, 2, 2, 2)
    return tuple(StageSpec(f"res{i + 2}", b, w, 4 * w, ts, ss, tc)
                 for i, (b, w, ts, ss, tc) in enumerate(zip(blocks, widths, t_strides, s_strides, temporal)))


# The registry: a ResNet-shaped family is a BackboneSpec; any other family a builder (causal_stages) -> BackboneLike.
ARCHS: dict[str, Union[BackboneSpec, Callable[[tuple[str, ...]], BackboneLike]]] = {
    "r2d50": BackboneSpec(64, True, _stages((3, 4, 6, 3), (64, 128, 256, 512), (False,) * 4)),
    "r2plus1d101": BackboneSpec(64, True, _stages((3, 4, 23, 3), (64, 128, 256, 512), (False, False, True, True))),
    # For CPU work and tests: R2D topology (no temporal convs), 1 block per stage, 1/8 width, no stem max-pool.
    "tiny": BackboneSpec(16, False, _stages((1, 1, 1, 1), (8, 16, 32, 64), (False,) * 4)),
}


class CausalTimeConv3d(nn.Conv3d):
    """A (k×1×1) temporal convolution padded with k − 1 frames in front: output t sees inputs t − k + 1 .. t."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) and \
            not x.is_contiguous() else torch.contiguous_format
        x = nn.functional.pad(x, (0, 0, 0, 0, self.kernel_size[0] - 1, 0)).contiguous(memory_format=fmt)
        return super().forward(x)


def conv_bn(cin: int, cout: int, kernel, stride=1, padding=0, relu: bool = True, causal: bool = False
            ) -> nn.Sequential:
    conv = (CausalTimeConv3d(cin, cout, kernel, stride, 0, bias=False) if causal else
            nn.Conv3d(cin, cout, kernel, stride, padding, bias=False))
    layers = [conv, nn.BatchNorm3d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """1×1×1 → (3×1×1) → 1×3×3 (strided) → 1×1×1, plus a projection shortcut when the shape changes."""

    def __init__(self, cin: int, width: int, cout: int, t_stride: int, s_stride: int, temporal: bool,
                 causal: bool = False):
        super().__init__()
        layers = [conv_bn(cin, width, 1)]
        if temporal:
            layers.append(conv_bn(width, width, (3, 1, 1), padding=(1, 0, 0), causal=causal))
        layers += [conv_bn(width, width, (1, 3, 3), (t_stride, s_stride, s_stride), (0, 1, 1)),
                   conv_bn(width, cout, 1, relu=False)]
        self.body = nn.Sequential(*layers)
        nn.init.zeros_(self.body[-1][1].weight)  # zero-init last BN gamma: each block starts as identity
        self.shortcut = None
        if cin != cout or t_stride != 1 or s_stride != 1:
            self.shortcut = conv_bn(cin, cout, 1, (t_stride, s_stride, s_stride), relu=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.body(x) + idt)


class Backbone(nn.Module):
    """Stem + res2..res5 (``stages``, run one by one by HCML so that the motion module runs between them)."""

    def __init__(self, spec: BackboneSpec, causal_stages: tuple[str, ...] = ()):
        super().__init__()
        self.spec = spec
        self.level_stages = dict(spec.level_stages)
        stem = [conv_bn(3, spec.stem, (1, 7, 7), (1, 2, 2), (0, 3, 3))]
        if spec.stem_pool:
            stem.append(nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
        self.stem = nn.Sequential(*stem)
        self.stages = nn.ModuleDict()
        cin = spec.stem
        for st in spec.stages:
            blocks = [Bottleneck(cin if i == 0 else st.out, st.width, st.out, st.t_stride if i == 0 else 1,
                                 st.s_stride if i == 0 else 1, st.temporal, st.name in causal_stages)
                      for i in range(st.blocks)]
            self.stages[st.name] = nn.Sequential(*blocks)
            cin = st.out
        self.out_channels = cin

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.spec.stages]

    def stage_channels(self, name: str) -> int:
        return next(s.out for s in self.spec.stages if s.name == name)


def build_backbone(arch: str, causal_stages: tuple[str, ...] = ()) -> BackboneLike:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    entry = ARCHS[arch]
    return Backbone(entry, causal_stages) if isinstance(entry, BackboneSpec) else entry(causal_stages)


def level_stages(arch: str) -> dict[str, str]:
    """The stages an architecture's motion levels follow (without building it when it is a spec)."""
    entry = ARCHS[arch]
    return dict(entry.level_stages) if isinstance(entry, BackboneSpec) else entry(()).level_stages
