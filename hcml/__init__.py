"""hcml: Hierarchical Contrastive Motion Learning for video action recognition.

Sub-packages map the repository's top-level folders: ``hcml.pipeline`` (DALI, datasets),
``hcml.model`` (backbones, motion module, losses), ``hcml.ops`` (cost volume) and
``hcml.launch`` (config, training driver, CLI).
"""

__version__ = "0.1.0"
