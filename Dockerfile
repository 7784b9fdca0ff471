# hcml on an NGC PyTorch image, written against the 25.10 release (nvcr.io/nvidia/pytorch:25.10-py3; pass another
# with --build-arg BASE=...). NGC images ship torch, DALI and apex, and pin their packages through a pip constraints
# file (PIP_CONSTRAINT): nothing here replaces any of them. The project goes in with --no-deps; its small pure-Python
# dependencies are installed under the image's constraints. The cost-volume op is built ahead of time for Ampere
# (sm_80), Hopper (sm_90) and Blackwell (sm_100). Not built in CI (no GPU, no registry there).
ARG BASE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE}

WORKDIR /opt/hcml
COPY pyproject.toml README.md ./
COPY hcml hcml
COPY pipeline pipeline
COPY model model
COPY ops ops
COPY launch launch
COPY configs configs
RUN python -c "import torch, nvidia.dali; print('image torch', torch.__version__, 'DALI', nvidia.dali.__version__)" \
 && pip install --no-cache-dir pyyaml prometheus-client tqdm matplotlib av \
 && pip install --no-cache-dir --no-deps -e . \
 && TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0" python -m hcml.ops.build \
 && python -c "import hcml_cost_volume_cuda, hcml, nvidia.dali; print('hcml ready')"

ENV PYTHONUNBUFFERED=1
ENTRYPOINT []
CMD ["hcml", "--help"]
