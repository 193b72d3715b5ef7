#!/usr/bin/env bash
# Create or reuse .venv and install lumrec's pinned stack; a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LUMREC_VENV:-.venv}
STAMP="$VENV/.lumrec-stack"
# The stamp records what was installed; bump STACK when a pin changes.
STACK="torch==2.13.0 fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0 torchmetrics==1.0.3 torchx==0.7.0 pins-v5"
# LUMREC_GPU=1: the CUDA builds of torch and fbgemm-gpu instead (docs/gpu.md); LUMREC_CUDA: PyTorch's CUDA index
# tag (cu126 / cu128 / cu130), one the machine's driver runs. The CPU stack stays the default.
GPU=${LUMREC_GPU:-0}
CUDA_TAG=${LUMREC_CUDA:-cu128}
if [ "$GPU" = 1 ]; then
  STACK="torch==2.13.0+$CUDA_TAG fbgemm-gpu==1.8.0 torchrec==1.8.0 torchmetrics==1.0.3 torchx==0.7.0 pins-v5-gpu"
fi
install_redis_server() {
  # The knowledge store's key-value tier and its tests need a real redis-server (Debian's package).
  command -v redis-server >/dev/null 2>&1 && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing redis-server (apt) ..." >&2
  $sudo apt-get install -y -q redis-server >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q redis-server >/dev/null 2>&1; } \
    || { echo "setup: could not install redis-server with apt-get; install it (e.g. 'apt-get install redis-server') and rerun" >&2; return 1; }
}
install_redis_server
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STACK" ] && [ pyproject.toml -ot "$STAMP" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_q() {
  # pip's find-links warnings and torchrec's expected "requires fbgemm-gpu" notice are noise here.
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v -e "^WARNING: Location" -e "requires fbgemm-gpu" -e "dependency resolver does not" || true; }
  return "${PIPESTATUS[0]}"
}
PIP=pip_q
if [ "$GPU" = 1 ]; then
  INDEX="https://download.pytorch.org/whl/$CUDA_TAG"
  # fbgemm's CPU and CUDA builds install the same fbgemm_gpu package: never both.
  "$VENV/bin/python" -m pip uninstall -y -q fbgemm-gpu-cpu >/dev/null 2>&1 || true
  # The local version label matters: a CPU torch 2.13.0 already installed would satisfy a bare ==2.13.0.
  $PIP install "torch==2.13.0+$CUDA_TAG" --index-url "$INDEX"
  $PIP install "fbgemm-gpu==1.8.0" --index-url "$INDEX"
  $PIP install --no-deps "torchrec==1.8.0"
else
  # CPU torch first, so nothing later pulls a CUDA build.
  $PIP install "torch==2.13.0"
  # fbgemm's CPU build; torchrec's metadata wants the CUDA 'fbgemm-gpu', which would overwrite
  # fbgemm_gpu and fail to load on CPU torch, so torchrec goes in with --no-deps.
  $PIP install "fbgemm-gpu-cpu==1.8.0"
  $PIP install --no-deps "torchrec==1.8.0"
fi
$PIP install tensordict==0.15.3 torchmetrics==1.0.3 pyre-extensions==0.0.32 tqdm==4.70.1 iopath==0.1.10 "torchx==0.7.0" \
  pyarrow==26.0.1 numpy==2.4.6 pyyaml==6.0.3 tensorboard==2.21.0 pytest==9.2.0 matplotlib==3.11.2
# Serving: the HTTP endpoint, its metrics, the Redis client (tests and the benchmark speak HTTP through httpx).
$PIP install fastapi==0.165.0 uvicorn==0.55.0 redis==8.2.0 prometheus-client==0.26.0 httpx==0.29.0
# Triton: the HSTU attention kernel's language; on CPU its tests run it in Triton's interpreter (TRITON_INTERPRET=1).
# A CUDA torch brings the Triton build it was compiled with.
[ "$GPU" = 1 ] || $PIP install --no-deps triton==3.9.0
$PIP install --no-deps -e .
"$VENV/bin/python" -c "import torch, fbgemm_gpu, torchrec, torchx, pyarrow, matplotlib, fastapi, uvicorn, redis, lumrec"
if [ "$GPU" = 1 ]; then
  "$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'LUMREC_GPU=1 but torch sees no GPU'; print('cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
fi
echo "$STACK" > "$STAMP"
