"""Tensor ops: the cost volume (``hcml::cost_volume``). Knows tensors and CUDA, nothing of models."""

from hcml.ops.cost_volume import cost_volume, cost_volume_reference, num_displacements

__all__ = ["cost_volume", "cost_volume_reference", "num_displacements"]
