"""bench/aot.py: every Triton kernel compiles for sm_80 and sm_90 as the wrappers launch it, without a GPU.

The compile runs in a child process: the suite runs under TRITON_INTERPRET=1, and Triton picks the interpreter once,
when it is imported. The child compiles into a fresh cache, so the time printed is what CI pays.
"""

import json
import os
import resource
import subprocess
import sys
import time

import pytest

from posttrain.bench import aot
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(aot.unavailable() is not None, reason=f"bench.aot: {aot.unavailable()}")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "posttrain.bench.aot", "--arch", "80", "90", "--json", str(tmp / "aot.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    took, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    print(proc.stdout[-20000:])
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime  # the wall time depends on the machine's load
    print(f"bench.aot took {took:.1f} s wall, {cpu:.1f} s CPU (both architectures, one process each)")
    assert (tmp / "aot.json").exists(), proc.stderr[-4000:]
    return proc, json.loads((tmp / "aot.json").read_text())


@pytest.mark.slow
def test_every_kernel_compiles_for_both_archs_without_spills(compiled):
    proc, out = compiled
    rows = out["rows"]
    assert not out["kernels_without_case"], f"add launch cases to bench/aot.py for {out['kernels_without_case']}"
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    kernels = {r["kernel"] for r in rows}
    assert {"_logprob_rows_kernel", "_grpo_rows_kernel"} <= kernels
    for arch in ("sm_80", "sm_90"):  # every kernel compiled for each architecture
        assert {r["kernel"] for r in rows if r["arch"] == arch} == kernels
    spills = [(r["kernel"], r["arch"], r["cases"][0], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spills, spills
    assert all(0 < r["regs"] <= 255 and r["smem_bytes"] <= aot.MAX_SHARED[int(r["arch"][3:])] for r in rows)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_every_wrapper_branch_is_compiled(compiled):
    """The row pass in each of its modes and dtypes, at an odd vocabulary too; GRPO with and without its options."""
    _, out = compiled
    rows = [r for r in out["rows"] if r["arch"] == "sm_90"]
    modes = {(c["STATS"], c["ENTROPY"], c["GRAD"], c["ENTROPY_GRAD"]) for r in rows for c in [r["constexprs"]]
             if r["kernel"] == "_logprob_rows_kernel"}  # fmt: skip
    T, F = True, False
    assert modes == {(T, F, T, F), (T, T, T, F), (T, F, F, F), (T, T, F, F), (F, F, T, F), (F, F, T, T)}
    cases = {c for r in rows for c in r["cases"]}
    for dtype in ("bfloat16", "float16", "float32"):
        assert any(f"linear_logprob fwd {dtype}" in c for c in cases), dtype
    assert any("linear_logprob fwd bfloat16" in c and "V=151937" in c for c in cases)
    grpo = {(c["SEQUENCE"], c["HAS_REF"], c["HAS_DELTA"], c["BLOCK_L"]) for r in rows for c in [r["constexprs"]]
            if r["kernel"] == "_grpo_rows_kernel"}  # fmt: skip
    assert {(s, ref, ref, b) for s in (T, F) for ref in (T, F) for b in (512, 1024)} <= grpo


@pytest.mark.slow
def test_row_pass_keeps_vector_loads_at_every_vocab(compiled):
    """151937 is not a multiple of 16: without the padded row stride the row pass compiled to 16-bit loads."""
    _, out = compiled
    rows = [r for r in out["rows"] if r["kernel"] == "_logprob_rows_kernel"]
    odd = [r for r in rows if any("V=151937" in c for c in r["cases"])]
    assert odd and rows
    narrow = [(r["arch"], r["cases"][0], r["ld_bits"]) for r in rows if r["ld_bits"] < 128]
    assert not narrow, narrow
    writes = [r for r in rows if r["constexprs"]["GRAD"]]
    assert writes and all(r["st_bits"] == 128 for r in writes)


def test_widest_access_parser():
    ptx = """
    @%p1 ld.global.L1::evict_last.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.b16 %rs1, [ %rd2 + 0 ];
    @%p2 st.global.v2.b32 [ %rd3 + 0 ], { %r5, %r6 };
    """
    assert aot._widest(ptx, "ld") == 128 and aot._widest(ptx, "st") == 64
    assert aot._widest("ld.global.b16 %rs1, [ %rd2 + 0 ];", "ld") == 16


def test_refuses_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "from posttrain.bench import aot\nwith aot.compile_only(90): pass"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1 is set" in proc.stderr
