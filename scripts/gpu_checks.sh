#!/usr/bin/env bash
# Every GPU check of lumrec in one run on the GPU test machine (../shared/device/README.md), results under $OUT.
#
# Here:   bash ../shared/device/wheels.sh      (writes .whl/; prints the line that installs it there)
# There:  <that line> bash scripts/gpu_checks.sh [quick|ml1m|ml1m-large]   (the device tool: carry=[".whl"], timeout ~540 s)
#
# Each step writes its own log under $OUT and a failing step does not stop the others; the summary at the
# end lists each step's exit code. `quick` runs the tests and the shortest benchmark shapes only.
# `ml1m` / `ml1m-large` run only the ML-1M HSTU retrieval benchmark on the GPU (bf16, Triton attention) with a
# 2-minute / 8-minute training budget: import ML-1M here first (`lumrec import ml-1m ../shared/data/ml-1m out/ml-1m`,
# 2.4 MB) and carry it too: carry=[".whl", "out/ml-1m"].
# What it checks, and where the figures go once measured:
#   the Triton kernels compiled for this GPU's architecture (shared memory per program)
#   gpu-marked tests: device moves, jagged ops, Triton attention, compiled/exported stack, sharding, sparse grads
#   benchmarks/hstu_attention.py -> docs/kernels.md (Triton vs PyTorch vs SDPA, forward + backward)
#   a tiny pretrain on cuda, fp32 and bf16 + activation checkpointing -> docs/gpu.md (tokens/s, activation memory)
set -u
OUT=${OUT:-/tmp/lumrec-gpu}
mkdir -p "$OUT"
MODE=${1:-full}
PY="python3 -P"
declare -a SUMMARY=()

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember the exit code
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*" | tee "$OUT/$name.log"
  "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$name rc=$rc $((SECONDS - t0))s")
  tail -5 "$OUT/$name.log"
}

ml1m() {  # ml1m MODEL MINUTES: the ML-1M retrieval benchmark on the GPU, its row under $OUT
  if [ ! -d out/ml-1m ]; then
    echo "out/ml-1m is missing: import it before the run and carry it (see the top of this file)" | tee "$OUT/ml1m.log"
    SUMMARY+=("ml1m_$1 rc=missing-data")
    return
  fi
  step "ml1m_$1" env LUMREC_KERNEL=triton $PY benchmarks/ml1m_retrieval.py --model "$1" --data-dir out/ml-1m --minutes "$2" \
    --out "$OUT/ml1m" --results "$OUT/ml1m_retrieval.json" --variant gpu-bf16 train.device=cuda train.precision=bf16
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1

if [ "$MODE" = ml1m ] || [ "$MODE" = ml1m-large ]; then
  if [ "$MODE" = ml1m ]; then ml1m hstu 2; else ml1m hstu-large 8; fi
  printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
  exit 0
fi

step compile_kernels $PY scripts/compile_triton_kernels.py --arch "$($PY -c 'import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)')"

step tests_gpu $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_device.py tests/test_ops.py tests/test_triton_attention.py \
  tests/test_stack_export.py tests/test_sharding_scale.py tests/test_sparse_table_grads.py

if [ "$MODE" = quick ]; then
  step hstu_attention $PY benchmarks/hstu_attention.py --shapes 8x8192 128x200_bf16 --bias off --repeats 10 \
    --out "$OUT/hstu_attention.json"
else
  step hstu_attention $PY benchmarks/hstu_attention.py --out "$OUT/hstu_attention.json"
  mkdir -p "$OUT/runs"
  step synth $PY -m lumrec.cli synth "$OUT/runs/synth" --num-users 300 --num-items 200 --num-days 3
  step pretrain_fp32 $PY -m lumrec.cli pretrain configs/ml1m_hstu.yaml data.path="$OUT/runs/synth" out="$OUT/runs/fp32" \
    data.max_len=50 train.epochs=2 train.eval_every_epochs=1 train.device=cuda
  step pretrain_bf16_ckpt $PY -m lumrec.cli pretrain configs/ml1m_hstu.yaml data.path="$OUT/runs/synth" out="$OUT/runs/bf16" \
    data.max_len=50 train.epochs=2 train.eval_every_epochs=1 train.device=cuda train.precision=bf16 \
    train.activation_checkpointing=true
fi

printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
