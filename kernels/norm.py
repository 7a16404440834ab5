"""RMSNorm with the residual add fused in, for the decode step (one kernel instead of seven).

For: core/model.py's KV-cache decode path, where every layer does `x = x + branch; h = norm(x)` on a few rows and
kernel launches, not bytes, set the time. Not for: training (the model's RMSNorm module stays the autograd path
whose numerics the SFT tests pin; this has no backward).

Numerics follow the model's RMSNorm step by step in every dtype: the sum x + residual rounds to the input dtype
(exactly torch's add), the mean of squares is fp32 (summed in another order, so equal to fp32 rounding), the
normalised row is rounded to the input dtype before the weight multiplies it, and that product rounds once more.
"""

from __future__ import annotations

import torch

from posttrain.kernels._utils import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (+ residual [T, H]) -> (weight * norm(s), s) with s = x + residual (s = x without one)."""
    s = x if residual is None else x + residual
    f = s.float()
    normed = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(s.dtype), s


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, H, eps, HAS_RES: tl.constexpr,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < H
        s = tl.load(x_ptr + row * H + offs, mask=m, other=0.0)
        if HAS_RES:
            s = (s.to(tl.float32) + tl.load(res_ptr + row * H + offs, mask=m, other=0.0).to(tl.float32))
            s = s.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * H + offs, s, mask=m)
        f = s.to(tl.float32)
        r = 1.0 / tl.sqrt_rn(tl.sum(f * f, 0) / H + eps)
        n = (f * r).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * H + offs, (w * n).to(out_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """As rms_norm_reference, one Triton launch (one program per row) where Triton runs, else the reference.

    x, residual [..., H] contiguous, same dtype; weight [H] in that dtype (the model's parameter).
    """
    if not use_triton(x) or weight.dtype != x.dtype:
        return rms_norm_reference(x, weight, eps, residual)
    H = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    s = x if residual is None else torch.empty_like(x)
    res = x if residual is None else residual.contiguous()
    _rms_norm_kernel[(x.numel() // H,)](x, res, weight, out, s, H, float(eps), HAS_RES=residual is not None,
                                        BLOCK=triton.next_power_of_2(H), num_warps=4 if H <= 4096 else 8)
    return out, s
