#!/usr/bin/env bash
# Every GPU check and benchmark in ONE call (the lent GPU machine gives a session 15 minutes in all, start-up
# included, and one command at most 10 minutes).
#   run from the repository root:  bash bench/gpu.sh        (writes JSON under $OUT, default ./out)
# 1. CUDA correctness: the tests marked `gpu` (kernels against their references at real shapes, compiled bf16 path).
# 2. The SFT trainer once on CUDA.
# 3. Benchmarks, each ours vs its anchors in the same process, each writing $OUT/<name>.json.
#
# The machine runs this in a bare copy of the working tree: nothing installed, no network. `posttrain` is made
# importable without pip by a view of the repository laid out as the installed namespace (<tmp>/posttrain/<folder>
# -> <folder>, on PYTHONPATH), as .ci/lint-imports does.
#
# Time. The steps stop themselves within GPU_SH_BUDGET_S (default 540 s), counted from the first step: a 10-minute
# call keeps 60 s for the wheel install, the version probe (importing torch and Triton cold) and teardown. Each step has a cold budget (below): how long it may take on a cold
# machine, empty Triton and Inductor caches. A step gets whatever the budget has left minus the cold budgets of the
# steps after it, so time a warm step saves goes to the next one, and no step can eat a later step's share; the
# remaining time is printed before each step. A benchmark is told its share less 10 s (BENCH_BUDGET_S, for imports
# and teardown) and skips rows past it, writing JSON after every row; the tests and the trainer are all or nothing.
# The cold budgets are estimates from what each step compiles, not yet measured on a cold machine:
#   gpu_tests        120 s  ~30 Triton variants (log-prob, GRPO, sampling, decode kernels) compile one after another,
#                           ~1-3 s each cold; a Qwen2-0.5B-shape model is built; the tests themselves ~20 s warm
#   sft_cuda         100 s  Inductor compiles each block's forward and backward under activation checkpointing, again
#                           for the no-grad evaluation forward and for the last, smaller batch; the decode kernels of
#                           the greedy evaluation compile; a DCP checkpoint and an HF export are written
#   bench_logprob     70 s  torch.compile of the plain reference (~20 s cold), then rows until its budget
#   bench_grpo        45 s
#   bench_grpo_step   50 s  ~10 s of set-up (NCCL group, a sharded 0.5B-shape model) before the first step
#   bench_sampler     65 s  graph captures of every decode window, HF generate as the anchor
#   bench_train       65 s  per-block torch.compile is its last variant, cut at its budget
#   bench_ring        25 s  3 GB of host memory page-locked and copied both ways
# (sum: 540 s.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
BUDGET_S="${GPU_SH_BUDGET_S:-540}"

view=$(mktemp -d)
trap 'rm -rf "$view"' EXIT
mkdir "$view/posttrain"
for folder in core kernels train eval bench; do ln -s "$PWD/$folder" "$view/posttrain/$folder"; done
export PYTHONPATH="$view:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # $PWD: the tests import each other as `tests.<module>`

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
import platform

import torch
import triton

import posttrain.core.ring  # importable from the view, not installed

print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PY
T0=$SECONDS  # the steps' budget starts here

ORDER=(gpu_tests sft_cuda bench_logprob bench_grpo bench_grpo_step bench_sampler bench_train bench_ring)
declare -A COLD=([gpu_tests]=120 [sft_cuda]=100 [bench_logprob]=70 [bench_grpo]=45 [bench_grpo_step]=50
                 [bench_sampler]=65 [bench_train]=65 [bench_ring]=25)
status=0
step() {  # step NAME CMD...: run CMD with what the budget leaves it (see the header)
  local name=$1; shift
  local left=$((BUDGET_S - (SECONDS - T0))) later=0 after=0 n
  for n in "${ORDER[@]}"; do
    if (( after )); then later=$((later + COLD[$n])); fi
    if [[ $n == "$name" ]]; then after=1; fi
  done
  local t=$((left - later))
  echo "=== $name: ${left} s of the ${BUDGET_S} s budget left; this step gets ${t} s (cold budget ${COLD[$name]} s)"
  if (( t < 10 )); then
    echo "!!! $name skipped: ${t} s is too little"; status=1; return
  fi
  local t0=$SECONDS rc=0
  BENCH_BUDGET_S=$((t - 10)) timeout --kill-after=5 "$t" "$@" || rc=$?
  if (( rc )); then
    echo "!!! $name failed (rc=$rc$( ((rc == 124)) && echo ": stopped at its ${t} s"))"; status=1
  fi
  echo "=== $name took $((SECONDS - t0)) s"
}
step gpu_tests python3 -m pytest -q -m gpu -p no:cacheprovider tests
# The whole trainer once on CUDA: one-rank nccl group, bf16 FSDP2, per-block compile with activation checkpointing,
# the compiled log-prob kernel, a DCP checkpoint, greedy eval through the sampler, HF export.
step sft_cuda python3 -m posttrain.train.sft --config configs/tiny_sft.toml --device=cuda --out_dir=/tmp/sft_cuda \
  --parallel.param_dtype=bfloat16 --parallel.compile=true --parallel.activation_checkpointing=true \
  --train.max_steps=20 --eval.every_epochs=0 --eval.at_start=false --eval.max_examples=16
step bench_logprob python3 -m posttrain.bench.bench_logprob --json "$OUT/bench_logprob.json"
step bench_grpo python3 -m posttrain.bench.bench_grpo --json "$OUT/bench_grpo.json"
step bench_grpo_step python3 -m posttrain.bench.bench_grpo_step --json "$OUT/bench_grpo_step.json"
step bench_sampler python3 -m posttrain.bench.bench_sampler --json "$OUT/bench_sampler.json"
step bench_train python3 -m posttrain.bench.bench_train --json "$OUT/bench_train.json"
step bench_ring python3 -m posttrain.bench.bench_ring --json "$OUT/bench_ring.json"
echo "=== done in $((SECONDS - T0)) s of the ${BUDGET_S} s budget"
exit $status
