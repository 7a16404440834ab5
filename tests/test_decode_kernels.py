"""kernels/norm.py, kernels/rope.py, kernels/swiglu.py: each decode-step kernel against its plain-torch reference
(interpreter on CPU), at odd sizes, in fp32 (to float rounding) and bf16 (to one rounding step of the dtype)."""

import pytest
import torch

from posttrain.kernels._utils import use_triton
from posttrain.kernels.norm import rms_norm, rms_norm_reference
from posttrain.kernels.rope import rope_kv_write, rope_kv_write_reference
from posttrain.kernels.swiglu import swiglu, swiglu_reference

pytestmark = pytest.mark.skipif(not use_triton(torch.empty(0)) and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# bf16: within one rounding step. The Triton 3.9 interpreter casts fp32 -> bf16 by truncation, not to nearest as
# torch and the GPU do, so bf16 results differ by an ulp here; their exactness is a GPU test.
TOL = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2}
EXACT = torch.cuda.is_available()


def close(a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert (a.float() - b.float()).abs().max() <= TOL[dtype] * max(1.0, b.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 72, generator=g).to(dtype).to(DEV)  # H = 72: a power-of-two tile with a masked tail
    w = (1 + 0.1 * torch.randn(72, generator=g)).to(dtype).to(DEV)
    res = torch.randn(5, 3, 72, generator=g).to(dtype).to(DEV) if with_residual else None
    out, s = rms_norm(x, w, 1e-6, res)
    ref_out, ref_s = rms_norm_reference(x, w, 1e-6, res)
    if dtype == torch.float32 or EXACT:
        assert torch.equal(s, ref_s)  # the residual sum rounds exactly as torch's add
    close(s, ref_s, dtype)
    close(out, ref_out, dtype)
    if not with_residual:
        assert s is x  # no copy of the input


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kv_write(dtype):
    g = torch.Generator().manual_seed(1)
    T, HQ, KV, D, R, L, P = 5, 6, 2, 20, 7, 33, 40  # D/2 = 10: a masked tile
    q = torch.randn(T, HQ, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(T, KV, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(T, KV, D, generator=g).to(dtype).to(DEV)
    positions = torch.tensor([0, 31, 7, 12, 3], device=DEV)
    rows = torch.tensor([6, 0, 2, 3, 5], device=DEV)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.arange(P).float()[:, None] * inv_freq
    cos, sin = freqs.cos().to(DEV), freqs.sin().to(DEV)
    caches = [torch.randn(2, R, L, KV, D, generator=g).to(dtype).to(DEV) for _ in range(2)]
    # A view of one layer of a bigger cache, as the model passes it.
    outs = []
    for fn in (rope_kv_write, rope_kv_write_reference):
        qq, ck, cv = q.clone(), caches[0].clone()[1], caches[1].clone()[1]
        fn(qq, k, v, ck, cv, positions, rows, cos, sin)
        outs.append((qq, ck, cv))
    (q1, k1, v1), (q2, k2, v2) = outs
    close(q1, q2, dtype)
    close(k1, k2, dtype)
    assert torch.equal(v1, v2)  # a copy
    untouched = torch.ones(R, L, dtype=torch.bool)
    untouched[rows.cpu(), positions.cpu()] = False
    assert torch.equal(k1[untouched.to(DEV)], caches[0][1][untouched.to(DEV)])  # nothing else written
    # The model's own rotation (core.model.apply_rope) agrees with the reference's.
    from posttrain.core.model import apply_rope

    c = torch.cat([cos[positions]] * 2, -1).to(dtype)[:, None]
    s = torch.cat([sin[positions]] * 2, -1).to(dtype)[:, None]
    assert torch.equal(apply_rope(q[:, None], c, s)[:, 0], q2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(dtype):
    g = torch.Generator().manual_seed(2)
    gate = (3 * torch.randn(3, 301, generator=g)).to(dtype).to(DEV)
    up = torch.randn(3, 301, generator=g).to(dtype).to(DEV)
    close(swiglu(gate, up, block=128), swiglu_reference(gate, up), dtype)


@pytest.mark.gpu
def test_gpu_bf16_kernels_round_like_torch():
    """Compiled on the GPU (round-to-nearest casts, unlike the interpreter), in bf16 at the Qwen2-0.5B widths: the
    residual sum, the RoPE rotation and the KV write equal torch bit for bit; the norm and SwiGLU within one ulp."""
    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, I, HQ, KV, D = 64, 896, 4864, 14, 2, 64
    x, res = (torch.randn(T, H, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    w = 1 + 0.1 * torch.randn(H, device="cuda", generator=g, dtype=torch.bfloat16)
    (out, s), (ref_out, ref_s) = rms_norm(x, w, 1e-6, res), rms_norm_reference(x, w, 1e-6, res)
    assert torch.equal(s, ref_s)
    assert ((out.float() - ref_out.float()).abs() <= ref_out.float().abs() * 2**-7 + 1e-6).all()
    gate, up = (torch.randn(T, I, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    a, b = swiglu(gate, up), swiglu_reference(gate, up)
    assert ((a.float() - b.float()).abs() <= b.float().abs() * 2**-7 + 1e-6).all()
    q = torch.randn(T, HQ, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(T, KV, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    positions = torch.randint(0, 4096, (T,), device="cuda", generator=g)
    rows = torch.randperm(T, device="cuda", generator=g)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    freqs = torch.arange(4096, device="cuda").float()[:, None] * inv_freq
    outs = []
    for fn in (rope_kv_write, rope_kv_write_reference):
        qq, ck, cv = q.clone(), *(torch.zeros(T, 4096, KV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        fn(qq, k, v, ck, cv, positions, rows, freqs.cos(), freqs.sin())
        outs.append((qq, ck, cv))
    for x1, x2 in zip(*outs):
        assert torch.equal(x1, x2)
