#!/usr/bin/env bash
# Every GPU check and benchmark in ONE call (the lent GPU machine gives a session 15 minutes in all).
#   run from the repository root:  bash bench/gpu.sh        (writes JSON under $OUT, default ./out)
# 1. CUDA correctness: the tests marked `gpu` (kernels against their references at real shapes, compiled bf16 path).
# 2. Benchmarks, each ours vs its anchors in the same process, each writing $OUT/<name>.json.
# Budget: well under 8 minutes on one H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The GPU machine is offline. Anchors it lacks (liger-kernel, a pure-Python wheel) travel as wheels in ./.whl, made
# on a machine with network:  python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5
# (.whl/ is git-ignored; pass it in the device tool's `carry`). Without it the Liger rows say "not installed".
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu.log") 2>&1  # one log: the device tool returns at most 8 files from $OUT
python3 - <<'PY'
import torch, platform
import triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PY
status=0
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name"; local t0=$SECONDS
  timeout "$t" "$@" || { echo "!!! $name failed (rc=$?)"; status=1; }
  echo "=== $name took $((SECONDS - t0)) s"
}
# Caps add up to 7.75 minutes (typical runs take far less); each benchmark also keeps its own time budget and
# writes JSON after every row.
step gpu_tests 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests
# The whole trainer once on CUDA: one-rank nccl group, bf16 FSDP2, per-block compile with activation checkpointing,
# the compiled log-prob kernel, a DCP checkpoint, greedy eval through the sampler, HF export.
step sft_cuda 45 python3 -m posttrain.train.sft --config configs/tiny_sft.toml --device=cuda --out_dir=/tmp/sft_cuda \
  --parallel.param_dtype=bfloat16 --parallel.compile=true --parallel.activation_checkpointing=true \
  --train.max_steps=20 --eval.every_epochs=0 --eval.at_start=false --eval.max_examples=16
step bench_logprob 85 python3 -m posttrain.bench.bench_logprob --json "$OUT/bench_logprob.json"
step bench_grpo 55 python3 -m posttrain.bench.bench_grpo --json "$OUT/bench_grpo.json"
step bench_grpo_step 40 python3 -m posttrain.bench.bench_grpo_step --json "$OUT/bench_grpo_step.json"
step bench_sampler 75 python3 -m posttrain.bench.bench_sampler --json "$OUT/bench_sampler.json"
step bench_train 85 python3 -m posttrain.bench.bench_train --json "$OUT/bench_train.json"
step bench_ring 20 python3 -m posttrain.bench.bench_ring --json "$OUT/bench_ring.json"
exit $status
