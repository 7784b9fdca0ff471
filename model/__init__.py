"""Models: backbones (Table 8), the hierarchical motion module and its contrastive losses. Plain nn.Modules;
nothing here knows DALI, torchrun or files."""

from hcml.model.backbone import ARCHS, build_backbone
from hcml.model.hcml import HCML, LEVELS, Classifier, HCMLSpec
from hcml.model.losses import Phase, phase_loss


def build_model(arch: str, num_classes: int, **kwargs) -> HCML:
    """timm-style builder: ``build_model("r2d50", 400, motion=True)``; kwargs are :class:`HCMLSpec` fields."""
    return HCML(HCMLSpec(arch=arch, num_classes=num_classes, **kwargs))


__all__ = ["ARCHS", "Classifier", "HCML", "HCMLSpec", "LEVELS", "Phase", "build_backbone", "build_model", "phase_loss"]
