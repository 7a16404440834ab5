"""RoPE on a decode step's queries and keys, fused with the KV-cache write (one kernel instead of about twelve).

For: core/model.py's KV-cache decode path: q [T, heads, D] is rotated in place; k [T, kv_heads, D] is rotated and
written, with v, into cache[row[t], position[t]]. Not for: training or prefill (the model's apply_rope serves them;
this has no backward).

cos/sin come from a table [P, D/2] fp32 of cos(position * inv_freq) that the caller computes once with torch (the
same fp32 values the model's rope_cos_sin computes every forward), so the rotation matches apply_rope's rounding
steps in every dtype: cos/sin rounded to the input dtype, each product rounded, then the sum.
"""

from __future__ import annotations

import torch

from posttrain.kernels._utils import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def rope_kv_write_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                            cache_v: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor) -> None:
    """q [T, Hq, D], k, v [T, KV, D]; cache_k, cache_v [R, L, KV, D]; positions, rows [T]; cos, sin [P, D/2] fp32."""
    c = torch.cat([cos[positions]] * 2, -1).to(q.dtype)[:, None]  # [T, 1, D]
    s = torch.cat([sin[positions]] * 2, -1).to(q.dtype)[:, None]

    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    q.copy_(rot(q))
    cache_k[rows, positions] = rot(k)
    cache_v[rows, positions] = v


if HAS_TRITON:

    @triton.jit
    def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, ck_ptr, cv_ptr, pos_ptr, row_ptr, cos_ptr, sin_ptr,
                        q_stride, k_stride, v_stride, c_row, c_pos, HQ, HALF, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        m = offs < HALF
        pos = tl.load(pos_ptr + t).to(tl.int64)
        c = tl.load(cos_ptr + pos * HALF + offs, mask=m, other=0.0)
        s = tl.load(sin_ptr + pos * HALF + offs, mask=m, other=0.0)
        dt = q_ptr.dtype.element_ty
        c = c.to(dt).to(tl.float32)
        s = s.to(dt).to(tl.float32)
        if h < HQ:
            base = q_ptr + t * q_stride + h * 2 * HALF
            x1 = tl.load(base + offs, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(base + HALF + offs, mask=m, other=0.0).to(tl.float32)
            o1 = (x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)
            o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
            tl.store(base + offs, o1.to(dt), mask=m)
            tl.store(base + HALF + offs, o2.to(dt), mask=m)
        else:
            g = h - HQ
            row = tl.load(row_ptr + t).to(tl.int64)
            src = k_ptr + t * k_stride + g * 2 * HALF
            x1 = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF + offs, mask=m, other=0.0).to(tl.float32)
            o1 = (x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)
            o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
            dst = row * c_row + pos * c_pos + g * 2 * HALF
            tl.store(ck_ptr + dst + offs, o1.to(dt), mask=m)
            tl.store(ck_ptr + dst + HALF + offs, o2.to(dt), mask=m)
            vsrc = v_ptr + t * v_stride + g * 2 * HALF
            tl.store(cv_ptr + dst + offs, tl.load(vsrc + offs, mask=m), mask=m)
            tl.store(cv_ptr + dst + HALF + offs, tl.load(vsrc + HALF + offs, mask=m), mask=m)


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                  positions: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """As rope_kv_write_reference, one launch of (T, heads + kv_heads) programs where Triton runs.

    The head dimension of q, k, v must be contiguous (projections viewed as [T, heads, D] are), and the cache's
    [kv_heads, D] inner block too (the sampler's caches are views of one contiguous buffer).
    """
    T, HQ, D = q.shape
    KV = k.shape[1]
    ok = (use_triton(q) and q.stride(2) == 1 and q.stride(1) == D and k.stride(2) == 1 and k.stride(1) == D
          and v.stride(2) == 1 and v.stride(1) == D and cache_k.stride()[2:] == (D, 1)
          and cache_v.stride() == cache_k.stride() and k.dtype == q.dtype == cache_k.dtype)
    if not ok:
        rope_kv_write_reference(q, k, v, cache_k, cache_v, positions, rows, cos, sin)
        return
    half = D // 2
    _rope_kv_kernel[(T, HQ + KV)](
        q, k, v, cache_k, cache_v, positions, rows, cos, sin, q.stride(0), k.stride(0), v.stride(0),
        cache_k.stride(0), cache_k.stride(1), HQ, half, BLOCK=triton.next_power_of_2(half), num_warps=1)
