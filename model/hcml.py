"""The full HCML network: backbone + three motion levels + classifier + per-level contrastive losses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hcml.model.backbone import build_backbone, level_stages
from hcml.model.contrastive import future_prediction_loss
from hcml.model.motion import Fusion, MotionLevel, PrimeMotionBlock, Predictor, resample

LEVELS = ("low", "mid", "high")


@dataclass
class HCMLSpec:
    """What the network needs to know. The training config's ``model`` section *is* an HCMLSpec (it adds the loss
    weights and the initialisation), so no field is copied by hand between the config and the model."""

    arch: str = "r2d50"
    num_classes: int = 400
    motion: bool = True
    max_displacement: int = 6
    cv_stride: int = 2
    motion_channels: list[int] = field(default_factory=list)
    dropout: float = 0.5
    nce_temperature: float = 0.1
    nce_samples: int = 8  # N spatial positions sampled per video for the contrastive loss
    nce_negatives: str = "all"  # all (the paper: spatial + temporal + easy) | video (spatial + temporal) | temporal
    nce_sampling: str = "uniform"  # uniform (the paper) | motion: positions in proportion to how much they change
    detach_targets: bool = False  # stop-gradient on the future targets (predictive-coding style)


class HCML(nn.Module):
    """Clips (B, 3, T, H, W) → ``{"logits": (B, classes), "nce_low"|"nce_mid"|"nce_high": scalar}``.

    ``motion=False`` gives the plain backbone baseline with everything else identical (no NCE terms).
    """

    def __init__(self, spec: HCMLSpec):
        super().__init__()
        self.spec = spec
        # the stages feeding the motion levels see no future frame (supplementary: predict the future)
        # motion level → the backbone stage it follows (the backbone says; res2/res3/res4 for the paper's nets)
        self.level_stage = level_stages(spec.arch)
        self.backbone = build_backbone(spec.arch, tuple(self.level_stage.values()) if spec.motion else ())
        self.motion_enabled = spec.motion
        if spec.motion:
            chans = {lv: self.backbone.stage_channels(self.level_stage[lv]) for lv in LEVELS}
            cm = spec.motion_channels or [max(16, chans[lv] // 4) for lv in LEVELS]
            if len(cm) != 3:
                raise ValueError(f"motion_channels needs 3 values (low, mid, high), got {cm}")
            self.motion_channels = dict(zip(LEVELS, cm))
            self.prime = PrimeMotionBlock(chans["low"], cm[0], spec.max_displacement, spec.cv_stride)
            self.levels = nn.ModuleDict({"mid": MotionLevel(cm[0], chans["mid"], cm[1]),
                                         "high": MotionLevel(cm[1], chans["high"], cm[2])})
            self.fusion = nn.ModuleDict({lv: Fusion(cm[i], chans[lv]) for i, lv in enumerate(LEVELS)})
            # Level l predicts the future of level l−1 (level 0 = backbone res2 features).
            targets = {"low": chans["low"], "mid": cm[0], "high": cm[1]}
            self.predictors = nn.ModuleDict({lv: Predictor(cm[i], targets[lv]) for i, lv in enumerate(LEVELS)})
        self.dropout = nn.Dropout(spec.dropout)
        self.fc = nn.Linear(self.backbone.out_channels, spec.num_classes)

    def _run(self, x: Tensor, want_nce: bool, until: str | None = None
             ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Stem and stages (up to and including stage ``until``), with the motion levels between them."""
        bb = self.backbone
        h = bb.stem(x)
        feats: dict[str, Tensor] = {}
        nce: dict[str, Tensor] = {}
        prev_motion: Tensor | None = None
        for name in bb.stage_names:
            h = bb.stages[name](h)
            if not self.motion_enabled:
                continue
            level = next((lv for lv, st in self.level_stage.items() if st == name), None)
            if level is None:
                continue
            if level == "low":
                p = self.prime(h)
                target = h
            else:
                p = self.levels[level](prev_motion, h)
                target = prev_motion
            feats[level] = p
            if want_nce:
                pred = self.predictors[level](p)
                tgt = resample(target.detach() if self.spec.detach_targets else target, p.shape[2:])
                nce[f"nce_{level}"] = future_prediction_loss(pred, tgt, self.spec.nce_samples,
                                                             self.spec.nce_temperature,
                                                             negatives=self.spec.nce_negatives,
                                                             sampling=self.spec.nce_sampling)
            if name == until:  # nothing after this stage is needed (its fusion feeds only later stages)
                break
            h = self.fusion[level](h, p)
            prev_motion = p
        return h, feats, nce

    def forward(self, x: Tensor, with_nce: bool = True, with_logits: bool = True) -> dict[str, Tensor]:
        """``with_logits=False`` (self-supervised phase): only the contrastive terms, computed without the stages
        after the last motion level and without the classifier."""
        if not with_logits:
            if not (with_nce and self.motion_enabled):
                raise ValueError("nothing to compute: with_logits=False needs the motion module's NCE terms")
            return self._run(x, True, until=self.level_stage[LEVELS[-1]])[2]
        h, _, nce = self._run(x, with_nce and self.motion_enabled)
        pooled = h.mean(dim=(2, 3, 4))
        return {"logits": self.fc(self.dropout(pooled)), **nce}

    def unused_without_logits(self) -> list[nn.Module]:
        """What the contrastive terms alone cannot reach (frozen in the SSL phase, where DDP would otherwise wait
        for their gradients): the classifier, the stages after the last motion level, and that level's fusion."""
        last = self.level_stage[LEVELS[-1]]
        later = self.backbone.stage_names[self.backbone.stage_names.index(last) + 1:]
        return [self.fc, *(self.backbone.stages[n] for n in later)] + ([self.fusion[LEVELS[-1]]]
                                                                       if self.motion_enabled else [])

    @torch.no_grad()
    def motion_features(self, x: Tensor) -> dict[str, Tensor]:
        """Per-level motion feature maps {"low", "mid", "high"}: (B, C_l, T_l, H_l, W_l) each (KNN, Table 7)."""
        if not self.motion_enabled:
            raise RuntimeError("motion_features needs a model built with motion=True")
        return self._run(x, False)[1]


class Classifier(nn.Module):
    """HCML as inference sees it: clips (B, 3, T, H, W) → class logits (B, classes), no contrastive terms. The
    module ``hcml export`` traces, so a serving stack gets a plain tensor-in, tensor-out graph."""

    def __init__(self, model: HCML):
        super().__init__()
        self.model = model

    def forward(self, clips: Tensor) -> Tensor:
        return self.model(clips, with_nce=False)["logits"]
