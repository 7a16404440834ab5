"""Helpers shared by the Triton kernels in this package: where Triton can run, and fp32-accumulating matmuls.

Not a kernel library: just the two decisions every kernel wrapper makes the same way (plus the switch that
bench/aot.py uses to compile every launch ahead of time).
"""

import functools
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # e.g. macOS, where the `triton` wheel does not exist
    HAS_TRITON = False


def interpreter_on() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1, read at import of triton)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# True only inside bench.aot.compile_only(), which owns it: launches compile for a stand-in GPU and return, and
# the wrappers are called with meta tensors (shapes without data), which must then take the Triton path.
_COMPILE_ONLY = False


def use_triton(t: torch.Tensor) -> bool:
    """Triton can run on `t`: compiled on a CUDA tensor, or interpreted on a CPU tensor under TRITON_INTERPRET=1.

    When neither holds (a CPU user without the interpreter), callers fall back to a chunked plain-torch path.
    """
    if not HAS_TRITON:
        return False
    if _COMPILE_ONLY:
        return t.device.type == "meta"
    return t.is_cuda or (t.device.type == "cpu" and interpreter_on())


@functools.lru_cache(maxsize=None)
def _has_fp32_out_mm(device_type: str, dtype: torch.dtype) -> bool:
    # torch >= 2.8 exposes cuBLAS's low-precision-in / fp32-out GEMM as `addmm(..., out_dtype=)`, CUDA only.
    # Probe once per (device, dtype) instead of parsing versions.
    if dtype == torch.float32 or dtype == torch.float64:
        return False
    try:  # the layout used: a transposed [V, C] operand, overwrite (beta=0) then accumulate
        a = torch.ones(3, 2, device=device_type, dtype=dtype).t()
        b = torch.ones(3, 4, device=device_type, dtype=dtype)
        out = torch.full((2, 4), float("nan"), device=device_type, dtype=torch.float32)
        torch.addmm(out, a, b, out_dtype=torch.float32, beta=0, out=out)
        torch.addmm(out, a, b, out_dtype=torch.float32, beta=1, out=out)
        return bool((out == 6.0).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def fp32_out_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether addmm_acc_ accumulates `dtype` operands with one fp32-output GEMM on this device type; without it
    each chunk's partial grad_weight is rounded to `dtype` before the fp32 add (benchmarks record which ran)."""
    return _has_fp32_out_mm(device_type, dtype)


def addmm_acc_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc (+)= a @ b, with `acc` in a wider dtype than a and b (fp32 for bf16/fp16 operands).

    One GEMM with an fp32 epilogue where cuBLAS offers it; otherwise a GEMM in the operands' dtype plus an add
    (one [M, N] temporary). `first` overwrites acc, so acc can start as torch.empty (no memset pass).
    """
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, beta=0 if first else 1, out=acc)
    elif _has_fp32_out_mm(a.device.type, a.dtype) and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=0 if first else 1, out=acc)
    elif first:
        acc.copy_(a @ b)
    else:
        acc.add_(a @ b)
