"""Compile every Triton kernel in kernels/ for NVIDIA GPUs on a machine without one, exactly as the wrappers launch
them, and report registers, spills, shared memory and the widest global load/store of each compiled variant.

    python -m posttrain.bench.aot [--arch 80 90] [--json PATH]        (with TRITON_INTERPRET unset)

For: CI and CPU-only machines, to catch before a GPU run what a GPU run would reveal first -- a kernel that does not
compile for sm_80 / sm_90, needs more shared memory than the card has, spills registers, or lost its vector loads.
tests/test_aot.py runs it for both architectures. Not for: timing (nothing runs), or correctness (tests/ compares
every kernel with its plain-torch reference under the interpreter).

How. A stand-in Triton driver (`CompileOnlyDriver`) reports a CUDA target of the chosen architecture and is made
active for the duration of `compile_only(arch)`. The launch cases below call the real Python wrappers with meta
tensors -- shapes and dtypes without data, so the benchmark shapes (T = 16384, V = 151936) cost no memory and no
FLOPs -- and, while the stand-in is active, `kernels._utils.use_triton` sends meta tensors down the Triton path.
Each `kernel[grid](...)` then goes through Triton's own JIT: argument specialisation (16-divisibility and
alignment of every int and pointer, as the wrapper's tensors give them), constexprs, block sizes and num_warps
exactly as the wrapper chose them, then ptxas from the triton wheel. The launch itself stops at the stand-in's
launcher, which records it. Registers and local memory (spills: Triton counts local bytes / 4 as n_spills) come
from `cuobjdump --dump-resource-usage` on the cubin, shared memory from the compiled metadata (checked against the
card's limit by Triton itself), the widest global load and store from the PTX (ptxas keeps PTX vector widths).

Adding a kernel (e.g. a new kernels/*.py): write a function that calls its Python wrapper with `meta(...)` tensors
at the shapes and dtypes it must compile for (every branch of the wrapper that picks a different constexpr, block
size or num_warps), and append `LaunchCase("<wrapper> <what>", fn)` to CASES. tests/test_aot.py fails for a
@triton.jit kernel in kernels/ that no case launches, and for any compile error or spill.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import posttrain.kernels._utils as _utils
from posttrain.core.sampler import SamplingParams
from posttrain.kernels.grpo import grpo_loss, linear_grpo_loss
from posttrain.kernels.logprob import IGNORE_INDEX, linear_logprob, logprob_backward
from posttrain.kernels.norm import rms_norm
from posttrain.kernels.rope import rope_kv_write
from posttrain.kernels.sample import fused_sample, fused_sample_step
from posttrain.kernels.swiglu import swiglu

ARCHS = (80, 90)
# Per-block shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100 163 KB, H100 227 KB.
MAX_SHARED = {80: 166912, 90: 232448}
SMS = {80: 108, 90: 132}


def unavailable() -> str | None:
    """Why kernels cannot be compiled for NVIDIA here (no triton, no NVIDIA backend or tools), or None."""
    if not _utils.HAS_TRITON:
        return "triton is not installed"
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        return f"triton {triton.__version__} has no NVIDIA backend (backends: {sorted(triton.backends.backends)})"
    for tool in ("ptxas", "cuobjdump"):
        if not os.path.exists(_tool(tool)):
            return f"triton {triton.__version__} ships no {tool} ({_tool(tool)})"
    return None


def _tool(name: str) -> str:
    import triton.backends.nvidia

    return os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", name)


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor with a shape and no data, for launch cases."""
    return torch.empty(shape, dtype=dtype, device="meta")


# ----------------------------------------------------------------------------------------------------------------
# The stand-in driver
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One compiled kernel: what Triton built for one specialisation, and the cases that launched it."""

    kernel: str
    arch: int
    num_warps: int
    shared: int
    constexprs: dict
    cases: list[str] = field(default_factory=list)
    regs: int = -1
    local: int = -1  # bytes of local memory per thread: spilled registers (and local arrays, which we never use)
    load_bits: int = 0  # widest global load / store in the PTX
    store_bits: int = 0

    def row(self) -> dict:
        return {
            "kernel": self.kernel, "arch": f"sm_{self.arch}", "num_warps": self.num_warps, "regs": self.regs,
            "spill_bytes": self.local, "smem_bytes": self.shared, "ld_bits": self.load_bits,
            "st_bits": self.store_bits, "constexprs": self.constexprs, "cases": self.cases,
        }  # fmt: skip


def _widest(ptx: str, op: str) -> int:
    """Widest global access of `op` ("ld" or "st") in bits: ld.global.v4.b32 -> 128, ld.global.b16 -> 16."""
    best = 0
    for mods in re.findall(rf"\b{op}\.global((?:\.[\w:]+)+)", ptx):
        lanes, bits = 1, 0
        for m in mods.split("."):
            if m in ("v2", "v4", "v8"):
                lanes = int(m[1:])
            elif re.fullmatch(r"[bsuf]\d+", m):
                bits = int(m[1:])
        best = max(best, lanes * bits)
    return best


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes per thread) of a one-kernel cubin, through the cuobjdump that ships with triton."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, check=True, timeout=120).stdout  # fmt: skip
    m = re.search(r"REG:(\d+) .*LOCAL:(\d+)", usage)
    if not m:
        raise RuntimeError(f"bench.aot: cannot read cuobjdump's resource usage:\n{usage}")
    return int(m.group(1)), int(m.group(2))


if _utils.HAS_TRITON:
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.cache import get_cache_manager

    class CompileOnlyDriver(DriverBase):
        """A Triton driver for a GPU that is not there: reports `arch`, compiles, records launches, runs nothing.

        The device index is the architecture number, so Triton's per-device kernel caches keep the targets apart.
        """

        def __init__(self, arch: int):
            self.arch = arch
            self.case = "?"
            self.variants: list[Variant] = []
            self.utils = self  # Triton asks driver.utils for device properties and binary loading
            driver = self

            class Launcher:  # Triton builds one per compiled kernel, just before load_binary
                def __init__(self, src, metadata):
                    consts = {src.fn.arg_names[path[0]]: v for path, v in src.constants.items() if len(path) == 1}
                    self.variant = Variant(src.fn.__name__, driver.arch, metadata.num_warps, metadata.shared,
                                           {k: _short(v) for k, v in consts.items()})  # fmt: skip
                    driver.variants.append(self.variant)
                    ptx = get_cache_manager(metadata.hash).get_file(f"{metadata.name}.ptx")  # Triton keeps every stage
                    if ptx:
                        with open(ptx) as f:
                            text = f.read()
                        self.variant.load_bits, self.variant.store_bits = _widest(text, "ld"), _widest(text, "st")

                def __call__(self, *args):
                    if driver.case not in self.variant.cases:
                        self.variant.cases.append(driver.case)

            self.launcher_cls = Launcher

        @staticmethod
        def is_active() -> bool:
            return False  # never picked by Triton on its own

        def get_current_target(self):
            return GPUTarget("cuda", self.arch, 32)

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_current_device(self) -> int:
            return self.arch

        def set_current_device(self, device) -> None:
            pass

        def get_current_stream(self, device=None) -> int:
            return 0

        def get_device_capability(self, device=None) -> tuple[int, int]:
            return divmod(self.arch, 10)

        def map_python_to_cpp_type(self, ty: str) -> str:
            return ty

        def get_benchmarker(self):
            raise RuntimeError("bench.aot: the compile-only driver runs nothing")

        def get_device_interface(self):
            raise RuntimeError("bench.aot: the compile-only driver has no device")

        def get_empty_cache_for_benchmark(self):
            raise RuntimeError("bench.aot: the compile-only driver runs nothing")

        def clear_cache(self, cache) -> None:
            pass

        # driver.utils
        def get_device_properties(self, device) -> dict:
            return {"max_shared_mem": MAX_SHARED[self.arch], "multiprocessor_count": SMS[self.arch],
                    "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0,
                    "mem_bus_width": 0}  # fmt: skip

        def load_binary(self, name, cubin, shared, device):
            v = self.variants[-1]
            v.regs, v.local = _resources(cubin)
            return v, name, v.regs, v.local // 4, 1024  # (module, function): any non-None handle, loaded once


def _short(v) -> object:
    s = str(v)
    return s.replace("triton.language.", "tl.") if not isinstance(v, (int, float, bool)) else v


@contextlib.contextmanager
def compile_only(arch: int):
    """Make Triton compile for sm_<arch> and not launch, and send meta tensors down the wrappers' Triton path."""
    if _utils.interpreter_on():
        raise RuntimeError("bench.aot: TRITON_INTERPRET=1 is set; the interpreter never compiles. Unset it.")
    why = unavailable()
    if why:
        raise RuntimeError(f"bench.aot: {why}")
    import triton

    drv = CompileOnlyDriver(arch)
    triton.runtime.driver.set_active(drv)
    _utils._COMPILE_ONLY = True
    try:
        yield drv
    finally:
        _utils._COMPILE_ONLY = False
        triton.runtime.driver._active = None  # back to the default driver, picked lazily as before


# ----------------------------------------------------------------------------------------------------------------
# Launch cases: the wrappers at the shapes and dtypes they must compile for
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LaunchCase:
    name: str
    fn: Callable[[], None]


DTYPES = (torch.bfloat16, torch.float16, torch.float32)
VOCABS = (32000, 128256, 151936, 151937)  # Llama 2, Llama 3, Qwen 2.5, and an odd one
T_SFT, H_SFT = 16384, 1536  # the log-prob benchmark's shape


def _logprob_cases() -> list[LaunchCase]:
    cases = []
    for dtype in DTYPES:
        for V in VOCABS if dtype == torch.bfloat16 else VOCABS[:-1]:  # the odd V in the training dtype (CI time)
            tag = f"{str(dtype)[6:]} T={T_SFT} V={V}"

            def fwd(dtype=dtype, V=V):  # every forward variant: with / without grad, with / without entropy
                h, w, t = meta(T_SFT, H_SFT, dtype=dtype), meta(V, H_SFT, dtype=dtype), meta(T_SFT, dtype=torch.int64)
                for grad in (True, False):
                    with torch.set_grad_enabled(grad):
                        linear_logprob(h.requires_grad_(grad), w, t)
                        linear_logprob(h, w, t, temperature=0.7, return_entropy=True)

            def bwd(dtype=dtype, V=V):  # the recompute backward (weighted tokens; entropy gradient)
                h, w, t = meta(T_SFT, H_SFT, dtype=dtype), meta(V, H_SFT, dtype=dtype), meta(T_SFT, dtype=torch.int64)
                lse, ent, g = meta(T_SFT), meta(T_SFT), meta(T_SFT)
                chunk = 4096 // dtype.itemsize
                for g_ent in (None, meta(T_SFT)):
                    logprob_backward(h, w, t, lse, ent, g, g_ent, 1.0, chunk, IGNORE_INDEX, grad_hidden=True,
                                     grad_weight=True)  # fmt: skip

            cases += [LaunchCase(f"linear_logprob fwd {tag}", fwd), LaunchCase(f"linear_logprob bwd {tag}", bwd)]
    return cases


def _grpo_cases() -> list[LaunchCase]:
    cases = []
    H, V = 1536, 151936
    for B, L in ((16, 512), (4, 4096), (1, 16384)):  # the benchmark's step, a long and a very long completion
        for sampling in ("token", "sequence"):
            for with_ref, delta in ((True, 4.0), (False, None)):

                def fn(B=B, L=L, sampling=sampling, with_ref=with_ref, delta=delta):
                    h = meta(B, L, H, dtype=torch.bfloat16).requires_grad_()
                    w = meta(V, H, dtype=torch.bfloat16).requires_grad_()
                    bl = meta(B, L)
                    kw = dict(ref_logp=meta(B, L) if with_ref else None, beta=0.04 if with_ref else 0.0,
                              delta=delta, importance_sampling=sampling)  # fmt: skip
                    linear_grpo_loss(h, w, meta(B, L, dtype=torch.int64), bl, meta(B), meta(B, L, dtype=torch.bool),
                                     **kw)  # fmt: skip
                    grpo_loss(meta(B, L).requires_grad_(), bl, meta(B, L), meta(B, L, dtype=torch.bool), **kw)

                name = f"grpo B={B} L={L} {sampling}{' ref delta' if with_ref else ''}"
                cases.append(LaunchCase(name, fn))
    return cases


def _sample_cases() -> list[LaunchCase]:
    """kernels/sample.py as the sampler launches it on CUDA: one row per sequence, the logits in the model dtype,
    each filter combination a constexpr variant; bare sampling (fused_sample) and the decode step's tail with its
    bookkeeping (fused_sample_step, [R, T + 1] buffers)."""
    variants = {"greedy": SamplingParams(temperature=0.0), "plain": SamplingParams(),
                "top_p": SamplingParams(top_p=0.9),
                "all": SamplingParams(temperature=0.8, top_k=200, top_p=0.95, min_p=0.05)}  # every branch at once
    cases = []
    for dtype, V, names in ((torch.bfloat16, 151936, ("greedy", "plain", "all")), (torch.bfloat16, 151937, ("all",)),
                            (torch.float16, 128256, ("top_p",)), (torch.float32, 32000, ("all",))):
        for name in names:
            params = variants[name]

            def fn(dtype=dtype, V=V, params=params):
                R, T = 256, 256
                fused_sample(meta(R, V, dtype=dtype), params, meta(R))
                fused_sample_step(meta(R, V, dtype=dtype), params, meta(R, T + 1), meta(R, dtype=torch.int64),
                                  meta(R, T + 1, dtype=torch.int64), meta(R, T + 1), meta(R, T + 1),
                                  meta(R, dtype=torch.int64), meta(R, dtype=torch.int64), meta(R, dtype=torch.bool),
                                  meta(8, dtype=torch.int64))  # fmt: skip

            cases.append(LaunchCase(f"sample {str(dtype)[6:]} V={V} {name}", fn))
    return cases


def _decode_cases() -> list[LaunchCase]:
    """kernels/norm.py, rope.py, swiglu.py in Transformer.decode_fused: 256 rows, Qwen2-0.5B widths (hidden 896,
    14 x 64 heads, 2 kv heads, intermediate 4864) and Llama-3-8B's (4096, 32 x 128, 8, 14336)."""
    cases = []
    for H, HQ, KV, D, I, dtypes in ((896, 14, 2, 64, 4864, (torch.bfloat16, torch.float32)),
                                     (4096, 32, 8, 128, 14336, (torch.bfloat16,))):
        for dtype in dtypes:

            def fn(H=H, HQ=HQ, KV=KV, D=D, I=I, dtype=dtype):
                B, L, P = 256, 2048, 32768
                x = meta(B, H, dtype=dtype)
                rms_norm(x, meta(H, dtype=dtype), 1e-6)
                rms_norm(x, meta(H, dtype=dtype), 1e-6, meta(B, H, dtype=dtype))
                cache = meta(B, L, KV, D, dtype=dtype)
                rope_kv_write(meta(B, HQ, D, dtype=dtype), meta(B, KV, D, dtype=dtype), meta(B, KV, D, dtype=dtype),
                              cache, meta(B, L, KV, D, dtype=dtype), meta(B, dtype=torch.int64),
                              meta(B, dtype=torch.int64), meta(P, D // 2), meta(P, D // 2))  # fmt: skip
                swiglu(meta(B, I, dtype=dtype), meta(B, I, dtype=dtype))

            cases.append(LaunchCase(f"decode kernels {str(dtype)[6:]} H={H} heads={HQ}/{KV}x{D} I={I}", fn))
    return cases


def all_cases() -> list[LaunchCase]:
    """Every launch case; one list entry (a function) per kernel file. Append new kernels' cases here."""
    return _logprob_cases() + _grpo_cases() + _sample_cases() + _decode_cases()


def compile_all(arch: int, cases: list[LaunchCase] | None = None) -> list[Variant]:
    """Run every case under the stand-in driver for sm_<arch>; the compiled variants with the cases behind each."""
    with compile_only(arch) as drv:
        for case in cases if cases is not None else all_cases():
            drv.case = case.name
            try:
                case.fn()
            except Exception as e:
                raise RuntimeError(f"bench.aot: launch case {case.name!r} failed for sm_{arch}: {e}") from e
    return drv.variants


# ----------------------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    cols = ["kernel", "arch", "num_warps", "regs", "spill_bytes", "smem_bytes", "ld_bits", "st_bits", "constexprs",
            "first case"]  # fmt: skip

    def cell(r, c):
        if c == "constexprs":
            return " ".join(f"{k}={v}" for k, v in r[c].items())
        if c == "first case":
            return r["cases"][0] + (f" (+{len(r['cases']) - 1})" if len(r["cases"]) > 1 else "")
        return str(r[c])

    table = [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(x.ljust(w) for x, w in zip(t, widths)))


def launched_kernels() -> set[str]:
    """Names of the @triton.jit kernels in kernels/*.py that a wrapper launches (a jit function whose name appears
    in another one's source is a device helper, compiled into its caller)."""
    from triton.runtime.jit import JITFunction

    fns = {}
    for path in sorted(Path(_utils.__file__).parent.glob("*.py")):
        if path.stem == "_utils":
            continue
        m = importlib.import_module(f"posttrain.kernels.{path.stem}")
        fns.update({f.__name__: f for f in vars(m).values() if isinstance(f, JITFunction)})
    return {n for n in fns if not any(re.search(rf"\b{n}\(", f.src) for o, f in fns.items() if o != n)}


def _rows_for(arch: int) -> list[dict]:
    return [v.row() for v in compile_all(arch)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(MAX_SHARED))
    ap.add_argument("--json", default=None, help="write every compiled variant here")
    args = ap.parse_args(argv)
    why = unavailable()
    if why:
        print(f"bench.aot: skipped: {why}")
        return 0
    import triton

    t0 = time.perf_counter()
    # One process per architecture (compiles are single-threaded); spawn, so each imports triton afresh.
    with ProcessPoolExecutor(len(args.arch), mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = [r for rs in pool.map(_rows_for, args.arch) for r in rs]
    took = time.perf_counter() - t0
    print_table(rows)
    bad = [r for r in rows if r["spill_bytes"] != 0]
    missing = sorted(launched_kernels() - {r["kernel"] for r in rows})
    print(f"# {len(rows)} variants from {len(all_cases())} launch cases, triton {triton.__version__}, "
          f"torch {torch.__version__}, {took:.1f} s; {len(bad)} with spills")  # fmt: skip
    if missing:
        print(f"# kernels no launch case compiles: {missing} (add their cases to bench/aot.py, see its docstring)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__, "seconds": took, "rows": rows,
                       "kernels_without_case": missing}, f, indent=1)  # fmt: skip
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
