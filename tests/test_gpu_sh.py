"""bench/gpu.sh's logic on CPU, with a stand-in `python3` that records each step instead of running it: posttrain is
importable from the script's namespace view with no install, each step gets the budget left minus the later steps'
cold budgets (so a fast step's savings go to the next), benchmarks are told their share, a step that overruns is
stopped at its share and the others still run, and the cold budgets fit one 10-minute call with margin. (No GPU
timing is claimed here: the cold budgets in the script are estimates.)"""

import os
import re
import stat
import subprocess
import sys

from tests.conftest import REPO

STEPS = ["gpu_tests", "sft_cuda", "bench_logprob", "bench_grpo", "bench_grpo_step", "bench_sampler", "bench_train",
         "bench_ring"]

FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "CALL|$PYTHONPATH|${BENCH_BUDGET_S:-}|$*" >> "$FAKE_LOG"
if [[ "$1" == "-" ]]; then  # the version probe: posttrain must import from the view, with any install hidden
  cat > /dev/null
  exec "$REAL_PYTHON" -c '
import sys
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in str(getattr(f, "__module__", ""))]
sys.path = [p for p in sys.path if "__editable__" not in p]
import posttrain.core.ring as ring
print("posttrain from", ring.__file__)
'
fi
if [[ "$1 $2" == "-m pytest" && -n "${FAKE_SLEEP:-}" ]]; then sleep "$FAKE_SLEEP"; fi
exit 0
"""


def _cold_budgets() -> dict[str, int]:
    text = (REPO / "bench" / "gpu.sh").read_text()
    table = re.search(r"declare -A COLD=\((.*?)\)\n", text, re.S).group(1)
    return {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", table)}


def _run(tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
                "REAL_PYTHON": sys.executable, "OUT": str(tmp_path / "out"), **env}
    full_env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh")], cwd=tmp_path, env=full_env, capture_output=True,
                          text=True, timeout=120)
    calls = [line.split("|", 3) for line in log.read_text().splitlines()]
    return proc, calls


def test_gpu_sh_budget_view_and_remaining_time(tmp_path):
    cold = _cold_budgets()
    assert list(cold) == STEPS and sum(cold.values()) <= 540  # one 10-minute call keeps >= 60 s of margin
    assert re.search(r'^BUDGET_S="\$\{GPU_SH_BUDGET_S:-540\}"$', (REPO / "bench/gpu.sh").read_text(), re.M)

    proc, calls = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^posttrain from /tmp/.*/posttrain/core/ring\.py$", proc.stdout, re.M), proc.stdout
    probe, *steps = calls
    view = probe[1].split(":")[0]
    assert probe[3] == "-" and probe[1].split(":")[1] == str(REPO)  # the view, then the repository (tests.*)
    assert not os.path.exists(view)  # removed on exit
    assert len(steps) == len(STEPS)
    for name, (_, path, budget, args) in zip(STEPS, steps):
        got = re.search(rf"^=== {name}: (\d+) s of the 540 s budget left; this step gets (\d+) s \(cold budget "
                        rf"{cold[name]} s\)$", proc.stdout, re.M)
        assert got, (name, proc.stdout)
        left, share = int(got.group(1)), int(got.group(2))
        later = sum(cold[n] for n in STEPS[STEPS.index(name) + 1:])
        assert share == left - later >= cold[name]  # instant steps: every later step gets the time saved
        assert int(budget) == share - 10 and path.split(":")[0] == view
    assert steps[0][3].startswith("-m pytest -q -m gpu") and "posttrain.train.sft" in steps[1][3]
    assert "posttrain.bench.bench_ring --json" in steps[-1][3]
    assert (tmp_path / "out" / "gpu.log").read_text().count("=== ") >= 2 * len(STEPS)


def test_a_step_past_its_share_is_stopped_and_the_rest_still_run(tmp_path):
    cold = _cold_budgets()
    # A budget that leaves the first step 11 s (under 10 s a step is skipped); it would run 60 s.
    proc, calls = _run(tmp_path, GPU_SH_BUDGET_S=str(sum(cold.values()) - cold["gpu_tests"] + 11), FAKE_SLEEP="60")
    assert proc.returncode == 1
    assert re.search(r"this step gets 11 s .*\n!!! gpu_tests failed \(rc=124: stopped at its 11 s\)", proc.stdout)
    # Every later step ran, each with its cold budget (less the second or two the stopped step overran by).
    assert len(calls) == 1 + len(STEPS)
    for name in STEPS[1:]:
        share = int(re.search(rf"^=== {name}: .* this step gets (\d+) s", proc.stdout, re.M).group(1))
        assert share >= cold[name] - 3, (name, share)
    assert int(re.search(r"^=== done in (\d+) s of the \d+ s budget$", proc.stdout, re.M).group(1)) < 11 + 10
