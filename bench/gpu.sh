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
# Wheels carried to the offline machine (e.g. liger-kernel) live in ./wheels when present.
if [ -d wheels ]; then python3 -m pip install --no-deps --no-index --quiet wheels/*.whl || true; fi
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, platform
import triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PY
status=0
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name"; local t0=$SECONDS
  timeout "$t" "$@" > >(tee "$OUT/$name.log") 2>&1 || { echo "!!! $name failed (rc=$?)"; status=1; }
  echo "=== $name took $((SECONDS - t0)) s"
}
step gpu_tests 120 python3 -m pytest -q -m gpu tests
step bench_logprob 90 python3 -m bench.bench_logprob --json "$OUT/bench_logprob.json"
step bench_grpo 60 python3 -m bench.bench_grpo --json "$OUT/bench_grpo.json"
step bench_sampler 120 python3 -m bench.bench_sampler --json "$OUT/bench_sampler.json"
step bench_train 90 python3 -m bench.bench_train --json "$OUT/bench_train.json"
exit $status
