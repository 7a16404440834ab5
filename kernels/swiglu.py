"""SwiGLU's elementwise part, silu(gate) * up, as one kernel (torch runs two, with a [T, I] temporary between).

For: core/model.py's KV-cache decode path. Not for: training (the model's MLP module is the autograd path; this
has no backward). Numerics follow torch's in every dtype: silu computed in fp32 and rounded to the input dtype,
then the product rounded once more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.kernels._utils import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., I] -> silu(gate) * up [..., I]."""
    return F.silu(gate) * up


if HAS_TRITON:

    @triton.jit
    def _swiglu_kernel(g_ptr, u_ptr, out_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(out_ptr + offs, (s * u).to(dt), mask=m)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, block: int = 1024) -> torch.Tensor:
    """As swiglu_reference, one launch where Triton runs (contiguous inputs of one dtype), else the reference."""
    if not use_triton(gate) or gate.dtype != up.dtype or not (gate.is_contiguous() and up.is_contiguous()):
        return swiglu_reference(gate, up)
    out = torch.empty_like(gate)
    N = gate.numel()
    _swiglu_kernel[(triton.cdiv(N, block),)](gate, up, out, N, BLOCK=block, num_warps=4)
    return out
