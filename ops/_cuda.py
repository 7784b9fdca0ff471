"""Loading the CUDA extension: a prebuilt module (Dockerfile builds it ahead of time) or a cached JIT build."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from hcml.errors import CostVolumeBuildError

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "cost_volume_binding.cpp", CSRC / "cost_volume_kernels.cu"]


def ext_dir() -> Path:
    """Where the op's compiled extensions are cached: ``$HCML_EXT_DIR``, default ``~/.cache/hcml/ext``."""
    return Path(os.environ.get("HCML_EXT_DIR", Path.home() / ".cache" / "hcml" / "ext"))


@functools.lru_cache(maxsize=None)
def extension():
    """Import ``hcml_cost_volume_cuda`` if prebuilt, else JIT-build it into ``$HCML_EXT_DIR`` (cached)."""
    try:
        import hcml_cost_volume_cuda  # built by `python -m hcml.ops.build` (the Dockerfile does this)

        return hcml_cost_volume_cuda
    except ImportError:
        pass
    if torch.version.cuda is None:
        raise CostVolumeBuildError("this torch build has no CUDA support (torch.version.cuda is None); "
                                   "the CUDA cost volume needs a CUDA build of torch")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise CostVolumeBuildError("CUDA toolkit not found (set CUDA_HOME or put nvcc on PATH) to JIT-build the "
                                   "cost-volume op, or use an image where it was built ahead of time")
    build_dir = ext_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(name="hcml_cost_volume_cuda", sources=[str(s) for s in SOURCES],
                                  build_directory=str(build_dir), extra_cuda_cflags=["-O3", "--use_fast_math"],
                                  extra_cflags=["-O3"], verbose=os.environ.get("HCML_EXT_VERBOSE") == "1")
    except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError
        raise CostVolumeBuildError(f"building the CUDA cost-volume op failed: {e}") from e


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def forward(f1, f2, md: int, s: int):
    return extension().forward(f1, f2, md, s, _stream(f1))


def backward(grad, f1, f2, md: int, s: int):
    g1, g2 = extension().backward(grad, f1, f2, md, s, _stream(f1))
    return g1, g2
