#!/usr/bin/env bash
# Training throughput and MFU of a ~1B-parameter decoder (experiments/gpt_1b.py) in bfloat16
# on one GPU, at 2k and at 8k context (experiments/gpt_1b_8k.py), in a few minutes: each
# compiles, then the median of 3 windows of 10 steps.
#
#   bash benchmarks/gpu_mfu.sh            # on a machine with an NVIDIA GPU
#   GPU_MFU_SMOKE=1 bash benchmarks/gpu_mfu.sh   # a tiny version of the same runs, any CPU
#
# config.model.kernels=auto picks the GPU's fused attention (cuDNN for bfloat16, Pallas
# Triton for packed segments; lm/models/kernels). Prints, per context, lm.plan's estimate
# and the JSON line of benchmarks/train_throughput.py: ms/step, tokens/s, MFU against the
# device's dense bf16 peak (989 TFLOP/s for an H100/H200, PaLM's convention: causal
# attention counted whole), the kernels run and the allocator's peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ -z "${GPU_MFU_SMOKE:-}" ]]; then
  if ! "$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
    "$PY" -m pip install --quiet -e . "jax[cuda12]"
  fi
  "$PY" -c "import jax; print('devices:', jax.devices())"
  SIZES=()
else
  SIZES=(--config.model.num_layers=2 --config.model.d_model=64 --config.model.num_heads=2
         --config.model.num_kv_heads=2 --config.model.d_ff=128 --config.train.batch_size=2)
fi
for experiment in gpt_1b gpt_1b_8k; do
  OVERRIDES=("${SIZES[@]}")
  if [[ -n "${GPU_MFU_SMOKE:-}" ]]; then
    len=$([[ $experiment == gpt_1b ]] && echo 128 || echo 256)
    OVERRIDES+=(--config.data.seq_len=$len --config.model.max_len=$len)
  fi
  echo "== experiments/$experiment.py"
  "$PY" -m lm.plan --config=experiments/$experiment.py --hardware=h200 --devices=1 --mfu=0.5 \
    "${OVERRIDES[@]}" | tail -1
  XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95} \
    "$PY" benchmarks/train_throughput.py --config=experiments/$experiment.py --steps=10 \
    --repeats=3 "${OVERRIDES[@]}"
done
