"""Ahead-of-time build of the CUDA cost-volume op: ``python -m hcml.ops.build [--arch "8.0;9.0"]``.

Installs the ``hcml_cost_volume_cuda`` module into site-packages (used by the Dockerfile), so training never
waits for a JIT build.
"""

import argparse
import os
import sys
import tempfile

from hcml.ops._cuda import SOURCES


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"))
    args = ap.parse_args()
    os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = ["setup.py", "build_ext", f"--build-temp={tmp}", "install"]
        setup(name="hcml_cost_volume_cuda",
              ext_modules=[CUDAExtension("hcml_cost_volume_cuda", [str(s) for s in SOURCES],
                                         extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]})],
              cmdclass={"build_ext": BuildExtension}, script_args=sys.argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
