"""kernels/logprob.py against its plain-torch reference: values, every gradient path, odd shapes, masks, strides."""

import functools
import json

import pytest
import torch

import posttrain.kernels._utils as kernel_utils
import posttrain.kernels.logprob as lp
from posttrain.kernels.logprob import linear_logprob, linear_logprob_reference
from tests.conftest import both_paths as shared_both_paths

SHAPES = [(1, 8, 17), (37, 24, 129), (64, 32, 1000)]
# The Triton path runs on DEV: compiled on a CUDA machine (where conftest leaves TRITON_INTERPRET unset, so a CPU
# tensor would take the torch fallback), the interpreter on a CPU one.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(T, H, V, dtype=torch.float64, seed=0, ignore_every=4, device=DEV):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype).to(device)
    targets = torch.randint(0, V, (T,), generator=g).to(device)
    if ignore_every:
        targets[1::ignore_every] = -100
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def grads(out, loss_fn, hidden, weight):
    return torch.autograd.grad(loss_fn(out), (hidden, weight))


def close(a, b, tol):
    assert torch.allclose(a.double(), b.double(), rtol=tol, atol=tol), f"max |diff| {(a.double() - b.double()).abs().max():.3g}"


@pytest.mark.parametrize("T,H,V", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_values_and_grads_fp64(T, H, V, temperature):
    hidden, weight, targets = make(T, H, V)
    kw = dict(temperature=temperature, return_entropy=True)
    logp, ent = linear_logprob(hidden, weight, targets, chunk_size=16, **kw)
    ref_logp, ref_ent = linear_logprob_reference(hidden, weight, targets, **kw)
    # Python floats reach Triton kernels as fp32 (1/temperature), hence 1e-7 rather than 1e-12.
    close(logp, ref_logp, 1e-7)
    close(ent, ref_ent, 1e-7)
    assert logp.dtype == torch.float64
    # sum (uniform upstream grad: the precomputed path) and a weighted sum (recompute path)
    w = torch.randn(T, dtype=torch.float64, device=DEV)
    for loss_fn in (lambda o: -o[0].sum() / T, lambda o: (o[0] * w).sum(), lambda o: o[0].sum() + (o[1] * w).sum()):
        got = grads(linear_logprob(hidden, weight, targets, chunk_size=16, **kw), loss_fn, hidden, weight)
        want = grads(linear_logprob_reference(hidden, weight, targets, **kw), loss_fn, hidden, weight)
        for a, b in zip(got, want):
            close(a, b, 1e-7)


def test_ignored_tokens_have_zero_logp_and_grad():
    hidden, weight, targets = make(9, 8, 33, ignore_every=2)
    logp, ent = linear_logprob(hidden, weight, targets, return_entropy=True)
    ignored = targets == -100
    assert ignored.any() and (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (logp[~ignored] < 0).all()
    (gh,) = torch.autograd.grad((logp * torch.arange(9.0, device=DEV)).sum(), hidden)
    assert (gh[ignored] == 0).all() and (gh[~ignored] != 0).any()


def test_all_tokens_ignored():
    hidden, weight, targets = make(5, 8, 17)
    targets[:] = -100
    logp = linear_logprob(hidden, weight, targets)
    gh, gw = torch.autograd.grad(logp.sum(), (hidden, weight))
    assert (logp == 0).all() and (gh == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
def test_chunk_sizes_agree(chunk):
    hidden, weight, targets = make(23, 16, 65)
    out = linear_logprob(hidden, weight, targets, chunk_size=chunk)
    got = grads(out, lambda o: o.sum(), hidden, weight)
    want = grads(linear_logprob_reference(hidden, weight, targets), lambda o: o.sum(), hidden, weight)
    close(out, linear_logprob_reference(hidden, weight, targets), 1e-7)
    for a, b in zip(got, want):
        close(a, b, 1e-7)


def test_fp32_inputs():
    hidden, weight, targets = make(37, 24, 129, dtype=torch.float32)
    logp = linear_logprob(hidden, weight, targets, temperature=0.7)
    assert logp.dtype == torch.float32
    ref = linear_logprob_reference(hidden.double(), weight.double(), targets, temperature=0.7)
    close(logp, ref, 1e-5)
    got = grads(logp, lambda o: o.mean(), hidden, weight)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = grads(linear_logprob_reference(h64, w64, targets, temperature=0.7), lambda o: o.mean(), h64, w64)
    for a, b in zip(got, want):
        close(a, b, 1e-5)


def test_bf16_within_bf16_tolerance_of_fp32_reference():
    hidden, weight, targets = make(37, 24, 129, dtype=torch.bfloat16)
    logp, ent = linear_logprob(hidden, weight, targets, temperature=1.3, return_entropy=True)
    assert logp.dtype == torch.float32
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref, ref_ent = linear_logprob_reference(h32, w32, targets, temperature=1.3, return_entropy=True)
    close(logp, ref, 3e-2)
    close(ent, ref_ent, 3e-2)
    got = grads(logp, lambda o: o.sum(), hidden, weight)
    want = grads(ref, lambda o: o.sum(), h32, w32)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b).norm() / b.norm() < 2e-2


def test_non_contiguous_inputs_and_leading_dims():
    base_h = torch.randn(24, 2, 3, 9, dtype=torch.float64, device=DEV, requires_grad=True)
    hidden = base_h[:, 1].permute(1, 0, 2)  # [3, 24, 9], a strided view
    leaf_w = torch.randn(9, 80, dtype=torch.float64, device=DEV, requires_grad=True)
    weight = leaf_w.t()[::2]  # [40, 9], row stride 2, column stride 80
    targets = torch.randint(0, 40, (24, 3), device=DEV).t()  # [3, 24], transposed
    targets[0, ::5] = -100
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not targets.is_contiguous()
    logp = linear_logprob(hidden, weight, targets, chunk_size=10)
    assert logp.shape == (3, 24)
    ref = linear_logprob_reference(hidden, weight, targets)
    close(logp, ref, 1e-7)
    w = torch.randn(3, 24, dtype=torch.float64, device=DEV)
    got = torch.autograd.grad((logp * w).sum(), (base_h, leaf_w))
    want = torch.autograd.grad((ref * w).sum(), (base_h, leaf_w))
    for a, b in zip(got, want):
        close(a, b, 1e-7)


def test_frozen_weight_or_hidden():
    hidden, weight, targets = make(11, 8, 40)
    frozen_w = weight.detach()
    (gh,) = torch.autograd.grad(linear_logprob(hidden, frozen_w, targets).sum(), hidden)
    (want,) = torch.autograd.grad(linear_logprob_reference(hidden, frozen_w, targets).sum(), hidden)
    close(gh, want, 1e-7)
    frozen_h = hidden.detach()
    (gw,) = torch.autograd.grad(linear_logprob(frozen_h, weight, targets).sum(), weight)
    (want,) = torch.autograd.grad(linear_logprob_reference(frozen_h, weight, targets).sum(), weight)
    close(gw, want, 1e-7)


def test_second_backward_with_retain_graph_recomputes():
    hidden, weight, targets = make(13, 8, 40)
    logp = linear_logprob(hidden, weight, targets, chunk_size=4)
    loss = logp.sum()
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))
    want = grads(linear_logprob_reference(hidden, weight, targets), lambda o: o.sum(), hidden, weight)
    for a, b, c in zip(first, second, want):
        close(a, c, 1e-7)
        close(b, c, 1e-7)


def test_no_grad_path_skips_backward_state(monkeypatch):
    hidden, weight, targets = make(10, 8, 40)
    calls = []
    real = lp.logprob_forward
    monkeypatch.setattr(lp, "logprob_forward", lambda *a, **k: calls.append(k) or real(*a, **k))
    with torch.no_grad():
        logp = linear_logprob(hidden, weight, targets)
    assert logp.grad_fn is None and not calls[0]["grad_hidden"] and not calls[0]["grad_weight"]
    close(logp, linear_logprob_reference(hidden, weight, targets), 1e-7)


def test_uniform_value():
    active = torch.tensor([True, False, True])
    assert lp.uniform_value(torch.tensor([2.0, 5.0, 2.0]), active) == (2.0, False)
    assert lp.uniform_value(torch.tensor([2.0, 5.0, 3.0]), active) == (None, False)
    assert lp.uniform_value(torch.tensor([2.0, 5.0, 3.0]), torch.zeros(3, dtype=torch.bool)) == (0.0, False)
    flag = torch.ones(1, dtype=torch.int32)
    assert lp.uniform_value(torch.tensor([2.0, 5.0, 3.0]), active, flag) == (None, True)


def test_scale_cast_is_mul_then_round():
    acc = torch.randn(64, 8) * 100
    c = torch.tensor(0.37)
    want = (acc * c).to(torch.bfloat16)
    assert torch.equal(lp.scale_cast(acc.clone(), c, torch.bfloat16), want)
    got = lp.scale_cast(acc, c, torch.float32)  # no cast: in place
    assert got.data_ptr() == acc.data_ptr() and torch.equal(got.to(torch.bfloat16), want)


# ---------------------------------------------------------------------------------------------------------------
# Out-of-range targets, odd vocabulary sizes, the row pass's online logsumexp
# ---------------------------------------------------------------------------------------------------------------


# fn() through the log-prob kernel and through its fallback, each asserted to have run (tests/conftest.py)
both_paths = functools.partial(shared_both_paths, module=lp, fallback="_rows_torch")


def test_both_paths_refuses_to_compare_the_fallback_with_itself(monkeypatch):
    """Where Triton cannot run on the inputs (CPU tensors on a CUDA machine, or no interpreter), both_paths fails
    instead of comparing the fallback with itself."""
    hidden, weight, targets = make(5, 8, 17)
    monkeypatch.setattr(lp, "use_triton", lambda t: False)
    with pytest.raises(AssertionError, match="the Triton path did not run"):
        both_paths(monkeypatch, lambda: linear_logprob(hidden, weight, targets))


@pytest.mark.parametrize("offset", [-1, 0, 5])  # target ids -1, V, V + 5
@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_out_of_range_target_raises_on_both_paths(monkeypatch, offset, ignored, grad):
    V = 33
    hidden, weight, targets = make(6, 8, V, ignore_every=2 if ignored else 0)
    bad = -1 if offset == -1 else V + offset
    targets[3] = bad  # an odd position: never an ignored one
    targets = targets.view(2, 3)
    h = hidden.view(2, 3, 8)
    msg = rf"linear_logprob: target id {bad} at targets\[1, 0\] is out of range for a vocabulary of V={V}"

    def call():
        with torch.set_grad_enabled(grad):
            with pytest.raises(ValueError, match=msg):
                out = linear_logprob(h, weight, targets, chunk_size=4)
                out.sum().backward()  # (CPU checks in the forward, so backward is never reached)

    both_paths(monkeypatch, call)


def test_bad_rows_agree_and_stay_in_their_row(monkeypatch):
    """The row pass on bad ids directly (no check): NaN log-prob and gradient row, the flag set, every other row
    and every lse exact, on both paths. A bad id is read as column 0 of its own row, so a poisoned column 0 in
    the bad rows, and poisoned memory around the chunk, must not leak into anything."""
    V, C = 37, 6
    g = torch.Generator().manual_seed(3)
    vals = torch.randn(C, V, generator=g, dtype=torch.float64)
    targets = torch.tensor([-1, 5, V, -100, V + 5, 0])
    bad_rows = torch.tensor([True, False, True, False, True, False])

    def run():
        store = torch.full((C + 2, V), float("nan"), dtype=torch.float64, device=DEV)  # NaN around the chunk
        logits = store[1 : C + 1]
        logits.copy_(vals)
        lse, logp, ent = (torch.empty(C, dtype=torch.float64, device=DEV) for _ in range(3))
        flag = lp.new_bad_flag(torch.device(DEV))
        ones = torch.ones(C, dtype=torch.float64, device=DEV)
        lp._rows(logits, targets.to(DEV), lse, logp, ent, ones, None, flag, 1.0, -100, stats=True, grad=True)
        return lse.cpu(), logp.cpu(), ent.cpu(), logits.cpu(), flag.cpu()

    (lse, logp, ent, d, flag), fallback = both_paths(monkeypatch, run)
    ref = vals.log_softmax(-1)
    assert flag.item() == 1 and fallback[4].item() == 1
    close(lse, vals.logsumexp(-1), 1e-12)
    assert logp[bad_rows].isnan().all() and d[bad_rows].isnan().all()
    good = ~bad_rows & (targets != -100)
    close(logp[good], ref[good].gather(1, targets[good, None]).squeeze(1), 1e-12)
    assert logp[3] == 0 and (d[3] == 0).all()
    close(ent, torch.where(targets != -100, -(ref.exp() * ref).sum(-1), 0.0), 1e-12)
    onehot = torch.nn.functional.one_hot(targets[good], V).double()
    close(d[good], onehot - ref[good].exp(), 1e-12)
    for a, b in zip((lse, logp, ent, d), fallback):
        assert torch.equal(a.isnan(), b.isnan())
        close(a.nan_to_num(), b.nan_to_num(), 1e-12)


@pytest.mark.parametrize("V", [5, 17, 4099])  # under one vector, under one block, past one block of 4096
def test_odd_vocab_pads_rows_and_ignores_the_padding(monkeypatch, V):
    C = 3
    buf = lp.logits_buffer(C, V, torch.float32, torch.device(DEV))
    wide = lp.padded_width(V)
    assert wide % 16 == 0 and wide - V < 16 and buf.stride(0) == wide and lp._load_width(buf) == wide
    buf.as_strided((C, wide), (wide, 1)).fill_(float("inf"))  # the padding holds anything; inf must not matter
    vals = torch.randn(C, V, generator=torch.Generator().manual_seed(V)) * 4
    buf.copy_(vals)
    targets = torch.tensor([0, V - 1, -100])
    lse, logp, ent = (torch.empty(C, device=DEV) for _ in range(3))
    flag = lp.new_bad_flag(torch.device(DEV))
    calls = []
    real = lp._rows_torch
    monkeypatch.setattr(lp, "_rows_torch", lambda *a: calls.append(1) or real(*a))
    lp._rows(buf, targets.to(DEV), lse, logp, ent, torch.ones(C, device=DEV), None, flag, 1 / 0.7, -100, stats=True,
             grad=True)
    assert not calls  # the Triton row pass ran
    buf, lse, logp, ent = buf.cpu(), lse.cpu(), logp.cpu(), ent.cpu()
    ref = (vals.double() / 0.7).log_softmax(-1)
    close(lse, (vals.double() / 0.7).logsumexp(-1), 1e-5)
    close(logp[:2], ref[[0, 1], [0, V - 1]], 1e-5)
    close(ent[:2], -(ref.exp() * ref).sum(-1)[:2], 1e-5)
    onehot = torch.nn.functional.one_hot(targets[:2], V).double()
    close(buf[:2], (onehot - ref[:2].exp()) / 0.7, 1e-5)
    assert flag.item() == 0


def test_load_width_stays_inside_storage():
    full = torch.empty(4, 48)
    assert lp._load_width(full[:, :37]) == 48  # every row owns its padding
    assert lp._load_width(torch.empty(3 * 48 + 37).as_strided((4, 37), (48, 1))) == 37  # the last not
    assert lp._load_width(torch.empty(4, 37)) == 37  # contiguous rows: no padding
    assert lp._load_width(torch.empty(4, 48)) == 48


@pytest.mark.parametrize("order", ["ascending", "descending", "spike_last", "flat"])
def test_row_pass_online_logsumexp(monkeypatch, order):
    """Per-lane running max and sum: a new maximum on every step, never after the first, one at the very end, and
    ties everywhere; with a spread of 200 that overflows exp without the max shift. Three blocks of 4096."""
    V = 3 * 4096 - 5
    x = torch.linspace(-100.0, 100.0, V, dtype=torch.float64)
    row = {"ascending": x, "descending": x.flip(0), "spike_last": torch.cat([x[:-1] * 0, x[-1:]]),
           "flat": torch.zeros(V, dtype=torch.float64)}[order]  # fmt: skip
    logits = row.unsqueeze(0).to(DEV)
    lse, logp, ent = (torch.empty(1, dtype=torch.float64, device=DEV) for _ in range(3))
    target = torch.tensor([V // 2], device=DEV)
    flag = lp.new_bad_flag(torch.device(DEV))
    calls = []
    real = lp._rows_torch
    monkeypatch.setattr(lp, "_rows_torch", lambda *a: calls.append(1) or real(*a))
    lp._rows(logits, target, lse, logp, ent, None, None, flag, 1.0, -100, stats=True, grad=False)
    assert not calls  # the Triton row pass ran
    lse, logp, ent = lse.cpu(), logp.cpu(), ent.cpu()
    ref = row.log_softmax(-1)
    close(lse, row.logsumexp(-1, keepdim=True), 1e-10)
    close(logp, ref[V // 2 : V // 2 + 1], 1e-10)
    close(ent, -(ref.exp() * ref).sum(-1, keepdim=True), 1e-9)


def test_torch_fallback_matches_triton(monkeypatch):
    hidden, weight, targets = make(37, 24, 129, dtype=torch.float32)
    w = torch.randn(37, device=DEV)
    fn = lambda o: (o[0] * w).sum() + o[1].sum()  # noqa: E731  weighted + entropy: the recompute path

    def run():
        out = linear_logprob(hidden, weight, targets, temperature=0.7, return_entropy=True, chunk_size=8)
        return out + grads(out, fn, hidden, weight)

    for a, b in zip(*both_paths(monkeypatch, run)):
        close(a, b, 1e-4)


def test_gradcheck_fp64():
    hidden, weight, targets = make(6, 4, 11, ignore_every=3)
    fn = lambda h, w: linear_logprob(h, w, targets, temperature=0.7, return_entropy=True, chunk_size=4)  # noqa: E731
    # Triton receives 1/temperature as fp32, so the function is smooth but not identical to the fp64 reference.
    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-5)


def test_addmm_acc_fallback_accumulates_in_fp32():
    a = torch.randn(6, 5, dtype=torch.bfloat16)
    b = torch.randn(5, 4, dtype=torch.bfloat16)
    acc = torch.empty(6, 4)
    kernel_utils.addmm_acc_(acc, a, b, first=True)
    kernel_utils.addmm_acc_(acc, a, b, first=False)
    close(acc, 2 * (a.float() @ b.float()), 2e-2)


def test_errors_name_the_problem():
    hidden, weight, targets = make(4, 8, 17)
    with pytest.raises(ValueError, match="weight \\[V, H\\]"):
        linear_logprob(hidden, weight.t(), targets)
    with pytest.raises(TypeError, match="cast one"):
        linear_logprob(hidden, weight.float(), targets)
    with pytest.raises(ValueError, match="leading shape"):
        linear_logprob(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="temperature"):
        linear_logprob(hidden, weight, targets, temperature=0.0)


def test_bench_smoke(tmp_path):
    from posttrain.bench import bench_logprob

    out = tmp_path / "logprob.json"
    bench_logprob.main(["--smoke", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"ours", "eager"}
    assert all(r["max_abs_err"] < 1e-3 for r in rows if r["impl"] == "ours")


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,V", [(4096, 1536, 151936), (1000, 4096, 128256)])
def test_cuda_bf16_real_shapes(T, H, V):
    torch.manual_seed(0)
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, H, device="cuda") / H**0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (T,), device="cuda")
    targets[::7] = -100
    logp, ent = linear_logprob(hidden, weight, targets, temperature=0.9, return_entropy=True)
    ref, ref_ent = linear_logprob_reference(hidden, weight, targets, temperature=0.9, return_entropy=True)
    # Chunked vs whole GEMMs may round the bf16 logits differently (one bf16 ulp of a logit).
    assert (logp - ref).abs().max() < 5e-2 and (logp - ref).abs().mean() < 5e-3
    assert (ent - ref_ent).abs().max() < 5e-2
    for loss_fn in (lambda o: -o.sum() / T, lambda o: (o * torch.linspace(0, 1, T, device="cuda")).sum()):
        got = torch.autograd.grad(loss_fn(linear_logprob(hidden, weight, targets, temperature=0.9)), (hidden, weight))
        want = torch.autograd.grad(loss_fn(ref), (hidden, weight), retain_graph=True)
        for a, b in zip(got, want):
            assert a.dtype == torch.bfloat16
            assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2


_FAR_ROWS = """
import torch
from posttrain.kernels.logprob import _rows
V, stride = 40, 2**30 + 64  # stride fits int32 (so Triton types it i32), row 2 * stride does not
big = torch.empty(2 * stride + V, dtype=torch.float16)  # 4.3 GB of address space; only the 3 rows are touched
logits = big.as_strided((3, V), (stride, 1))
vals = torch.randn(3, V, generator=torch.Generator().manual_seed(0)).half()
logits.copy_(vals)
targets = torch.tensor([3, 17, 39])
lse, logp = torch.empty(3), torch.empty(3)
_rows(logits, targets, lse, logp, None, torch.ones(3), None, torch.zeros(1, dtype=torch.int32), 1.0, -100, stats=True,
      grad=True)
ref = vals.float().log_softmax(-1)
assert torch.allclose(logp, ref.gather(1, targets[:, None]).squeeze(1), atol=1e-5), (logp, ref)
dlogits = torch.nn.functional.one_hot(targets, V).float() - ref.exp()
assert (logits.float() - dlogits).abs().max() < 1e-3
print("ok")
"""


def test_row_offsets_past_int32():
    """Row offsets are int64: a chunk of 16384 rows of V = 151936 spans 2.5e9 elements. The interpreter wraps int32
    arithmetic like the GPU does, so a row 2^31 elements in must be read and written where it is. In a child
    process: an int32 offset would segfault there instead of failing this test."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _FAR_ROWS], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


@pytest.mark.gpu
def test_cuda_chunk_past_int32_elements():
    """One chunk of T * V > 2^31 logits (T = 16384, V = 151936): the compiled row pass must address every row."""
    T, H, V = 16384, 64, 151936
    torch.manual_seed(0)
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, H, device="cuda") / H**0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (T,), device="cuda")
    logp = linear_logprob(hidden, weight, targets, chunk_size=T)
    (grad_h,) = torch.autograd.grad(-logp.sum(), (hidden,))
    tail = slice(T - 64, T)  # rows whose offsets pass 2^31; the reference on them alone stays small
    h = hidden[tail].detach().requires_grad_()
    ref = linear_logprob_reference(h, weight.detach(), targets[tail])
    (want_h,) = torch.autograd.grad(-ref.sum(), (h,))
    assert (logp[tail] - ref).abs().max() < 5e-2
    assert ((grad_h[tail].float() - want_h.float()).norm() / want_h.float().norm()).item() < 2e-2
