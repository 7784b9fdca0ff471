#!/usr/bin/env bash
# Create/reuse the project virtualenv and install what hcml needs.
# - On a machine without CUDA: torch==2.13.0 (CPU wheel) first, so that no multi-GB CUDA build is pulled.
# - Inside an NGC container (torch already importable by the system python): the venv sees the system
#   site-packages and torch is never reinstalled.
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
stamp="$VENV/.hcml-installed"

pip_install() {  # quiet pip that still fails loudly, with its log
  # --no-compile: pip byte-compiles every module of every wheel on one core (~40 of the ~95 s of a fresh install
  # here); the compileall step below does the same on every core.
  local log; log=$(mktemp)
  if ! "$VENV/bin/pip" install -q --no-compile --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2; rm -f "$log"; echo "[bootstrap] pip install $* failed" >&2; exit 1
  fi
  rm -f "$log"
}

if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi

if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[bootstrap] system torch found ($("$PY" -c 'import torch; print(torch.__version__)')): keeping it"
  [ -d "$VENV" ] || "$PY" -m venv --system-site-packages "$VENV"
else
  [ -d "$VENV" ] || "$PY" -m venv "$VENV"
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    # On PyPI torch==X is the CUDA build on Linux; machines here cache the CPU wheel of this version.
    echo "[bootstrap] installing torch==$TORCH_CPU_VERSION"
    pip_install "torch==$TORCH_CPU_VERSION"
  fi
fi
echo "[bootstrap] installing hcml (editable) with dev extras"
pip_install -e ".[dev]"
# Byte-compile the venv's packages on every core. Every module needs its .pyc ahead of time: where
# PYTHONDONTWRITEBYTECODE is set (these machines, many CI images) an interpreter never writes one, so each torchrun
# worker and test subprocess would recompile what it imports (torch._dynamo/_inductor: seconds per process).
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" -m compileall -q -j 0 "$site" >/dev/null || true
"$VENV/bin/python" -c "import hcml, torch, nvidia.dali; print('[bootstrap] ok: torch', torch.__version__, 'dali', nvidia.dali.__version__)"
touch "$stamp"
