# hcml on an NGC PyTorch image. The image's torch (and apex, where shipped) is kept as is: the project is
# installed with --no-deps for torch, and the cost-volume CUDA op is built ahead of time for Ampere + Hopper.
# Not built in CI (no GPU, no registry access there); see README "Production Kinetics retraining".
ARG BASE=nvcr.io/nvidia/pytorch:24.10-py3
FROM ${BASE}

# DALI for CUDA 12 (for CUDA 13 images: --build-arg DALI=nvidia-dali-cuda130)
ARG DALI=nvidia-dali-cuda120
RUN pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com ${DALI}

WORKDIR /opt/hcml
COPY pyproject.toml README.md ./
COPY hcml hcml
COPY pipeline pipeline
COPY model model
COPY ops ops
COPY launch launch
COPY configs configs
# Install without letting pip touch torch: the image's build is the one that matches its CUDA/NCCL.
RUN python -c "import torch; print('image torch', torch.__version__)" \
 && pip install --no-cache-dir pyyaml prometheus-client tqdm matplotlib av \
 && pip install --no-cache-dir --no-deps -e . \
 && TORCH_CUDA_ARCH_LIST="8.0;9.0" python -m hcml.ops.build \
 && python -c "import hcml_cost_volume_cuda, hcml, nvidia.dali; print('hcml ready')"

ENV PYTHONUNBUFFERED=1
ENTRYPOINT []
CMD ["hcml", "--help"]
