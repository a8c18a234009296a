#!/usr/bin/env bash
# The GPU figures of issue 15 in one go, on a machine with one NVIDIA GPU and jax[cuda]
# 0.10.2 installed:
#
#   bash benchmarks/gpu_suite.sh            # the real run (about 8 minutes on an H100/H200)
#   bash benchmarks/gpu_suite.sh --dry-run  # the same steps with tiny shapes on CPU
#
# Parts, each logged to $OUT/<part>.log and continuing past a failure:
#   0. the devices, jax and cuDNN versions
#   1. cuDNN vs XLA attention, forward + backward, causal GQA bf16 (T=2048)
#   2. MFU of gpt2-small T=1024 bf16 over attention impl x remat policy (target >= 45%)
#   3. MFU of llama-1b T=2048 bf16 over the same grid (target >= 55%); compile <= 30 s
#   4. batch-1 greedy decode tokens/s of llama-1b bf16 vs the HBM-bandwidth floor (>= 60%)
#   5. pytest tests/gpu (cuDNN attention against the XLA reference)
# The summary at the end repeats each part's verdict lines.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUITE="python benchmarks/gpu_suite.py"

if [[ "${1:-}" == "--dry-run" ]]; then
  export JAX_PLATFORMS=cpu
  ATTN="--tiny --seq 128 --batch 1 --heads 4 --kv-heads 2 --head-dim 16 --repeats 1 --fused pallas"
  GPT2="--tiny --seq 128 --batch 2 --steps 1 --remats none,full"
  LLAMA="--tiny --seq 128 --batch 2 --steps 1 --remats dots_no_batch"
  DECODE="--tiny --prompt 8 --new-tokens 4 --repeats 1"
  LIMIT=600
else
  export JAX_PLATFORMS=cuda
  # Let XLA take most of the GPU up front (the default), and keep the autotuner on.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
  ATTN="--seq 2048 --batch 4 --heads 32 --kv-heads 8 --head-dim 64 --repeats 10"
  GPT2="--seq 1024 --batch 16 --steps 10 --remats none,dots_no_batch"
  LLAMA="--seq 2048 --batch 8 --steps 10 --remats dots_no_batch,full"
  DECODE="--prompt 128 --new-tokens 128 --repeats 3"
  LIMIT=300
fi

run() {  # run NAME COMMAND...: log, time limit, and carry on after a failure
  local name=$1
  shift
  echo "=== $name: $*"
  if timeout "$LIMIT" "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "=== $name: done"
  else
    echo "=== $name: FAILED (exit ${PIPESTATUS[0]}; see $OUT/$name.log)"
  fi
}

run env python -c "import jax; print(jax.__version__, jax.devices(), jax.default_backend()); \
from jax._src.lib import cuda_versions as c; print('cudnn', c and c.cudnn_get_version())"
if [[ "${1:-}" != "--dry-run" ]] && ! python -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  echo "no GPU backend: install jax[cuda12]==0.10.2 (or run with --dry-run on CPU)"
  exit 1
fi
run attention $SUITE attention $ATTN
run mfu_gpt2_small $SUITE mfu --preset gpt2-small --target-mfu 0.45 --impls auto,xla $GPT2
run mfu_llama_1b $SUITE mfu --preset llama-1b --target-mfu 0.55 --impls auto,xla $LLAMA
# XLA attention for decoding: a KV-cache step reads a dense mask, and attention is a small
# part of a weight-bandwidth-bound step.
run decode_llama_1b $SUITE decode --preset llama-1b --impl xla $DECODE
if [[ "${1:-}" == "--dry-run" ]]; then
  run tests_gpu python -m pytest -q -p no:cacheprovider tests/gpu
else
  run tests_gpu env JAX_PLATFORMS=cuda python -m pytest -q -p no:cacheprovider tests/gpu
fi

echo "=== summary ($OUT)"
grep -h -E "^(# |best:|xla:|max \||tokens/s|fraction|[0-9]+ (passed|failed)|.*skipped)" \
  "$OUT"/attention.log "$OUT"/mfu_*.log "$OUT"/decode_llama_1b.log "$OUT"/tests_gpu.log 2>/dev/null
