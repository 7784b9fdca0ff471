"""The project's error types. Each names what is wrong (file, key, value) and what to do; the CLI turns any of them
into one line on stderr and exit code 2, with no traceback, in every process of a torchrun launch.

They live in the package root so that every layer (pipeline, model, ops, launch) raises the same types without
importing another layer.
"""


class HCMLError(Exception):
    """A user-facing error: bad input, not a bug."""


class ConfigError(HCMLError, ValueError):
    """A config key or value is wrong; the message names the key, the value and where it came from."""


class DatasetError(HCMLError, ValueError):
    """A dataset directory or video is missing or malformed (named in the message)."""


class CheckpointError(HCMLError, RuntimeError):
    """A checkpoint file is missing, truncated or not an hcml checkpoint (named in the message)."""


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN/inf; the message names the step and the term (``hcml train`` exits 3)."""


class CostVolumeBuildError(RuntimeError):
    """The CUDA cost-volume op cannot be built here (no CUDA torch, no toolkit, a compiler error)."""
