"""kernels/grpo.py against its plain-torch reference: every loss type and option, metrics, d loss / d logp, fused."""

import functools
import itertools
import json
import math

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import posttrain.kernels.grpo as grpo
import posttrain.kernels.logprob as logprob_module
from posttrain.kernels.grpo import grpo_loss, grpo_loss_reference, linear_grpo_loss
from posttrain.kernels.logprob import linear_logprob_reference, padded_width
from tests.conftest import both_paths as shared_both_paths

# The Triton path runs on DEV: compiled on a CUDA machine (where conftest leaves TRITON_INTERPRET unset, so a CPU
# tensor would take the torch fallback), the interpreter on a CPU one.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def to_dev(data):
    logp, *rest = data
    return (logp.detach().to(DEV).requires_grad_(), *(t.to(DEV) for t in rest))


# fn() through the GRPO kernel and through its fallback, each asserted to have run (tests/conftest.py)
both_paths = functools.partial(shared_both_paths, module=grpo, fallback="_grpo_rows_torch")


def batch(B=5, L=13, dtype=torch.float64, seed=0, adv_2d=False):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, L, generator=g, dtype=torch.float64) * 2).to(dtype)
    old = (logp.double() + torch.randn(B, L, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    ref = (logp.double() + torch.randn(B, L, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    old[0, :4] = logp[0, :4]  # ratio exactly 1: the tie of the min, gradient split half/half
    shape = (B, L) if adv_2d else (B,)
    adv = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    adv[1] = 0.0  # advantages of both signs and zero
    if B > 4:  # ratios above delta = 4 under a negative advantage: the two-sided clip bites (token, sequence)
        old[3, :3] = logp[3, :3] - 2.0
        old[4] = logp[4] - 1.6
        adv[3:5] = -0.7
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[2] = False  # a fully masked sequence
    return logp.requires_grad_(), old, ref, adv, mask


def compare(kw, data, tol):
    logp, old, ref, adv, mask = data
    loss, metrics = grpo_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    ref_loss, ref_metrics = grpo_loss_reference(logp, old, adv, mask, ref_logp=ref, **kw)
    (ref_grad,) = torch.autograd.grad(ref_loss, logp)
    assert metrics.keys() == ref_metrics.keys()
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=tol, atol=tol)
    for k in metrics:
        torch.testing.assert_close(metrics[k].double(), ref_metrics[k].double(), rtol=tol, atol=tol, msg=k)
    return loss, metrics


GRID = list(
    itertools.product(
        ["grpo", "bnpo", "dr_grpo", "dapo"], ["token", "sequence"], [0.0, 0.04], [(0.2, 0.2), (0.2, 0.28)], [None, 4.0]
    )
)


@pytest.mark.parametrize("loss_type,sampling,beta,eps,delta", GRID)
def test_grid_against_reference(loss_type, sampling, beta, eps, delta):
    kw = dict(
        beta=beta, eps_low=eps[0], eps_high=eps[1], delta=delta, loss_type=loss_type,
        importance_sampling=sampling, max_completion_length=20,
    )  # fmt: skip
    # Python floats (eps, beta) reach the kernel as fp32: 1e-7 in float64 rather than 1e-12.
    loss, metrics = compare(kw, to_dev(batch(adv_2d=delta is None)), 1e-7)
    assert torch.isfinite(loss)


def test_metrics_are_masked_and_nontrivial():
    logp, old, ref, adv, mask = batch(B=8, L=16)
    big = logp.detach() + 0.5  # ratios far outside [0.8, 1.2] on every token
    _, metrics = grpo_loss(logp, big, adv, mask, ref_logp=ref)
    _, m2 = grpo_loss(logp, logp.detach() - 0.5, adv, mask, ref_logp=ref)
    adv_tok = adv.unsqueeze(1).expand_as(mask)
    active = mask.double()
    want_low = ((adv_tok < 0).double() * active).sum() / active.sum()
    want_high = ((adv_tok > 0).double() * active).sum() / active.sum()
    torch.testing.assert_close(metrics["clip_low"].double(), want_low)
    torch.testing.assert_close(m2["clip_high"].double(), want_high)
    torch.testing.assert_close(metrics["ratio"].double(), torch.tensor(torch.e**-0.5, dtype=torch.float64))
    assert metrics["clip_high"] == 0 and m2["clip_low"] == 0


def test_fp32_inputs_against_fp64_reference():
    logp, old, ref, adv, mask = batch(dtype=torch.float32)
    loss, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.04, loss_type="grpo")
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.dtype == grad.dtype == torch.float32
    l64 = logp.detach().double().requires_grad_()
    ref_loss, _ = grpo_loss_reference(l64, old.double(), adv.double(), mask, ref_logp=ref.double(), beta=0.04,
                                      loss_type="grpo")  # fmt: skip
    (ref_grad,) = torch.autograd.grad(ref_loss, l64)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_fully_masked_batch_is_zero_not_nan():
    logp, old, ref, adv, mask = batch()
    for loss_type in grpo.LOSS_TYPES:
        loss, metrics = grpo_loss(logp, old, adv, torch.zeros_like(mask), ref_logp=ref, beta=0.1, loss_type=loss_type)
        (grad,) = torch.autograd.grad(loss, logp)
        assert loss == 0 and (grad == 0).all() and all(v == 0 for v in metrics.values())


def test_dapo_global_token_count_splits_micro_batches():
    logp, old, ref, adv, mask = batch(B=6, L=11)
    full, _ = grpo_loss(logp, old, adv, mask, loss_type="dapo")
    n = mask.sum()
    parts = [grpo_loss(logp[s], old[s], adv[s], mask[s], loss_type="dapo", num_tokens=n)[0] for s in (slice(0, 2), slice(2, 6))]
    torch.testing.assert_close(sum(parts), full)
    (g_full,) = torch.autograd.grad(full, logp)
    (g_parts,) = torch.autograd.grad(sum(parts), logp)
    torch.testing.assert_close(g_parts, g_full)


def test_torch_fallback_matches_triton(monkeypatch):
    logp, old, ref, adv, mask = to_dev(batch(adv_2d=True))
    for sampling in ("token", "sequence"):
        kw = dict(ref_logp=ref, beta=0.04, eps_high=0.28, delta=4.0, importance_sampling=sampling, loss_type="grpo")

        def run():
            loss, metrics = grpo_loss(logp, old, adv, mask, **kw)
            return loss, torch.autograd.grad(loss, logp)[0], metrics

        (l_t, g_t, m_t), (l_f, g_f, m_f) = both_paths(monkeypatch, run)
        torch.testing.assert_close(l_t, l_f)
        torch.testing.assert_close(g_t, g_f)
        for k in m_t:
            torch.testing.assert_close(m_t[k], m_f[k])


def test_both_paths_refuses_to_compare_the_fallback_with_itself(monkeypatch):
    """Where Triton cannot run on the inputs (CPU tensors on a CUDA machine, or no interpreter), both_paths fails
    instead of comparing the fallback with itself."""
    logp, old, _, adv, mask = batch()
    monkeypatch.setattr(grpo, "use_triton", lambda t: False)
    with pytest.raises(AssertionError, match="the Triton path did not run"):
        both_paths(monkeypatch, lambda: grpo_loss(logp, old, adv, mask)[0])


@pytest.mark.parametrize("sampling", ["token", "sequence"])
def test_gradcheck_fp64(sampling):
    logp, old, ref, adv, mask = batch(B=3, L=5)
    old = old + 0.05  # keep ratios away from the kinks of min/clamp, where finite differences are meaningless
    fn = lambda x: grpo_loss(x, old, adv, mask, ref_logp=ref, beta=0.04, importance_sampling=sampling)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logp,), eps=1e-6, atol=1e-6)


def test_errors_name_the_problem():
    logp, old, ref, adv, mask = batch()
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        grpo_loss(logp, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        grpo_loss(logp, old, adv, mask, importance_sampling="seq")


# ---------------------------------------------------------------------------------------------------------------
# By hand: the loss written from the papers' definitions, independently of kernels/grpo.py
# ---------------------------------------------------------------------------------------------------------------
#
# PPO's clipped surrogate as GRPO / DAPO (decoupled eps_low, eps_high) and INTELLECT-2 (two-sided delta) use it,
# per token, with r the importance ratio and A the advantage:
#     loss_t = -min(r1 A, clip(r, 1 - eps_low, 1 + eps_high) A),  r1 = min(r, delta)
# Written out case by case (delta > 1 + eps_high), with its slope d loss_t / d r:
#     A > 0, r > 1 + eps_high:   -(1 + eps_high) A    slope 0      (the gain is capped)
#     A < 0, r < 1 - eps_low:    -(1 - eps_low) A     slope 0      (the loss of probability is capped)
#     A < 0, r > delta:          -delta A             slope 0      (the two-sided clip)
#     otherwise:                 -r A                 slope -A     (no clip in force)
# The KL penalty is the k3 estimator of KL(pi || pi_ref) on samples of pi: with d = ref_logp - logp,
#     kl_t = exp(d) - d - 1 >= 0,    d kl_t / d logp_t = 1 - exp(d).
# Token level: r_t = exp(logp_t - old_t), d r_t / d logp_t = r_t. Sequence level (GSPO): one ratio per sequence,
#     s_b = exp(sum_t m_t (logp_t - old_t) / n_b),  n_b = sum_t m_t,  d s_b / d logp_t = s_b m_t / n_b.
# loss = sum_t W_t (loss_t + beta kl_t), W_t = m_t w_b: "grpo" w_b = 1 / (n_b B), "bnpo" 1 / N, "dr_grpo"
# 1 / (B max_completion_length), "dapo" 1 / num_tokens (N when not given); N = sum_b n_b.

LO, HI = 0.8, 1.28  # eps_low = 0.2, eps_high = 0.28: asymmetric, so a swap of the two shows
LOGP = [[-1.0, -2.0, -0.5, -1.5], [-0.7, -1.2, -2.5, -0.3]]
MASK = [[1, 1, 1, 1], [1, 1, 1, 0]]  # the last token is masked: its extreme ratio and KL must not count
REF_MINUS_LOGP = [[0.3, -0.2, 0.5, -0.4], [0.1, -0.6, 0.25, 1.5]]
# Token level: ratios below, inside, inside (above 1 + eps_low = 1.2), above the range; the tie r = 1; masked 3.
TOKEN_LOG_RATIOS = [[math.log(r) for r in row] for row in ([0.6, 0.9, 1.25, 1.6], [0.75, 1.0, 1.6, 3.0])]
# Sequence level: per-token log-ratios around log 0.7 (below the range) and log 1.6 (above it, and above delta =
# 1.5). Without the 1 / n_b the sequence ratios would be 0.7^4 and 1.6^3 (1.6^3 e^2 with the masked token).
SEQ_LOG_RATIOS = [[math.log(0.7) + x for x in (0.1, -0.3, 0.2, 0.0)],
                  [math.log(1.6) + x for x in (0.2, -0.2, 0.0)] + [2.0]]


def by_hand(log_ratio, ref_minus_logp, adv, *, level, beta, delta, loss_type, max_len, num_tokens, lo=LO, hi=HI):
    """Loss, d loss / d logp [2][4] and metrics of the formulas above, in Python floats, token by token."""
    B, L = 2, 4
    n = [sum(row) for row in MASK]
    N = sum(n)
    w = {"grpo": [1 / (n[b] * B) for b in range(B)], "bnpo": [1 / N] * B, "dr_grpo": [1 / (B * max_len)] * B,
         "dapo": [1 / (num_tokens or N)] * B}[loss_type]
    loss, grad = 0.0, [[0.0] * L for _ in range(B)]
    low = high = ratio_sum = kl_sum = 0.0
    for b in range(B):
        a = adv[b]
        s = math.exp(sum(MASK[b][t] * log_ratio[b][t] for t in range(L)) / n[b])
        seq_slope = 0.0  # sequence level: sum_t W_t d loss_t / d s_b
        for t in range(L):
            m = MASK[b][t]
            r = math.exp(log_ratio[b][t]) if level == "token" else s
            if a > 0 and r > hi:
                value, slope = -hi * a, 0.0
            elif a < 0 and r < lo:
                value, slope = -lo * a, 0.0
            elif a < 0 and delta is not None and r > delta:
                value, slope = -delta * a, 0.0
            else:
                value, slope = -r * a, -a
            d = ref_minus_logp[b][t]
            kl = math.exp(d) - d - 1
            loss += m * w[b] * (value + beta * kl)
            grad[b][t] = m * w[b] * (beta * (1 - math.exp(d)) + (slope * r if level == "token" else 0.0))
            seq_slope += m * w[b] * slope
            low += m * (r < lo and a < 0)
            high += m * (r > hi and a > 0)
            ratio_sum += m * r
            kl_sum += m * kl
        if level == "sequence":
            for t in range(L):
                grad[b][t] += seq_slope * s * MASK[b][t] / n[b]
    metrics = {"clip_low": low / N, "clip_high": high / N, "clip_region": (low + high) / N, "ratio": ratio_sum / N,
               "kl": kl_sum / N}
    return loss, grad, metrics


HAND_CASES = list(itertools.product(["grpo", "bnpo", "dr_grpo", "dapo"], ["token", "sequence"], [1, -1],
                                    [(0.0, None), (0.1, None), (0.1, 1.5)]))


@pytest.mark.parametrize("loss_type,level,sign,beta_delta", HAND_CASES)
def test_loss_and_gradient_by_hand(monkeypatch, loss_type, level, sign, beta_delta):
    """A 2 x 4 batch with ratios below, inside and above the clip range (and above delta) under both advantage
    signs, a masked token, KL on and off, every loss type, token and sequence level: the Triton kernel, the
    torch fallback and grpo_loss_reference all equal the case-by-case formulas above."""
    beta, delta = beta_delta
    adv = [1.0 * sign, -0.5 * sign]
    log_ratio = TOKEN_LOG_RATIOS if level == "token" else SEQ_LOG_RATIOS
    num_tokens = 12.0 if loss_type == "dapo" else None  # not N = 7: the global count of a split batch
    want = by_hand(log_ratio, REF_MINUS_LOGP, adv, level=level, beta=beta, delta=delta, loss_type=loss_type,
                   max_len=6, num_tokens=num_tokens)
    f64 = dict(dtype=torch.float64, device=DEV)
    logp = torch.tensor(LOGP, **f64, requires_grad=True)
    old = logp.detach() - torch.tensor(log_ratio, **f64)
    ref = logp.detach() + torch.tensor(REF_MINUS_LOGP, **f64)
    advantages, mask = torch.tensor(adv, **f64), torch.tensor(MASK, device=DEV, dtype=torch.bool)
    kw = dict(ref_logp=ref, beta=beta, eps_low=1 - LO, eps_high=HI - 1, delta=delta, loss_type=loss_type,
              importance_sampling=level, max_completion_length=6, num_tokens=num_tokens)
    check_three_paths(monkeypatch, want, logp, old, advantages, mask, kw)


def check_three_paths(monkeypatch, want, logp, old, advantages, mask, kw):
    """The Triton kernel, the torch fallback and grpo_loss_reference against by_hand's (loss, grad, metrics)."""
    def run(fn):
        loss, metrics = fn(logp, old, advantages, mask, **kw)
        (grad,) = torch.autograd.grad(loss, logp)
        return float(loss.detach()), grad.cpu().tolist(), {k: float(v) for k, v in metrics.items()}

    kernel, fallback = both_paths(monkeypatch, lambda: run(grpo_loss))
    # eps, beta and delta reach the kernel as fp32: agreement to ~1e-7 relative, not to 1e-15.
    for name, (loss, grad, metrics) in (("kernel", kernel), ("fallback", fallback),
                                        ("reference", run(grpo_loss_reference))):
        assert loss == pytest.approx(want[0], rel=1e-6, abs=1e-9), name
        assert grad == [pytest.approx(row, rel=1e-6, abs=1e-9) for row in want[1]], name
        assert metrics == pytest.approx(want[2], rel=1e-6, abs=1e-9), name


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("delta", [None, 1.0])
def test_ratio_exactly_on_the_clip_edges(monkeypatch, level, sign, delta):
    """eps_low = eps_high = 0 and old = logp: every ratio is exactly 1 = 1 - eps_low = 1 + eps_high (= delta), the
    one place where `<` and `<=` differ that inputs reach exactly. The table above holds there (no case's strict
    inequality is met, so slope -A), which is torch's autograd convention: clamp passes the gradient at its edges
    and a tie of the min splits it half and half between two equal slopes."""
    adv = [1.0 * sign, -0.5 * sign]
    zeros = [[0.0] * 4 for _ in range(2)]
    want = by_hand(zeros, REF_MINUS_LOGP, adv, level=level, beta=0.1, delta=delta, loss_type="grpo", max_len=6,
                   num_tokens=None, lo=1.0, hi=1.0)
    f64 = dict(dtype=torch.float64, device=DEV)
    logp = torch.tensor(LOGP, **f64, requires_grad=True)
    kw = dict(ref_logp=logp.detach() + torch.tensor(REF_MINUS_LOGP, **f64), beta=0.1, eps_low=0.0, eps_high=0.0,
              delta=delta, loss_type="grpo", importance_sampling=level)
    check_three_paths(monkeypatch, want, logp, logp.detach().clone(), torch.tensor(adv, **f64),
                      torch.tensor(MASK, device=DEV, dtype=torch.bool), kw)


def test_a_kl_weight_of_one_by_hand(monkeypatch):
    """beta = 1, the one weight at which a reference that skipped the KL for some beta other than 0 would still
    agree with itself: the three paths against by_hand."""
    adv = [1.0, -0.5]
    want = by_hand(TOKEN_LOG_RATIOS, REF_MINUS_LOGP, adv, level="token", beta=1.0, delta=None, loss_type="grpo",
                   max_len=6, num_tokens=None)
    f64 = dict(dtype=torch.float64, device=DEV)
    logp = torch.tensor(LOGP, **f64, requires_grad=True)
    kw = dict(ref_logp=logp.detach() + torch.tensor(REF_MINUS_LOGP, **f64), beta=1.0, eps_low=1 - LO, eps_high=HI - 1,
              loss_type="grpo")
    check_three_paths(monkeypatch, want, logp, logp.detach() - torch.tensor(TOKEN_LOG_RATIOS, **f64),
                      torch.tensor(adv, **f64), torch.tensor(MASK, device=DEV, dtype=torch.bool), kw)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_num_tokens_counts_for_dapo_only(monkeypatch, loss_type):
    """num_tokens (DAPO's global token count) changes nothing of the other loss types, as a number or a tensor."""
    logp, old, ref, adv, mask = to_dev(batch())
    want, _ = grpo_loss_reference(logp, old, adv, mask, loss_type=loss_type)
    for n in (40.0, torch.tensor(40.0, dtype=torch.float64, device=DEV)):
        kernel, fallback = both_paths(monkeypatch, lambda: grpo_loss(logp, old, adv, mask, loss_type=loss_type,
                                                                     num_tokens=n)[0])
        for got in (kernel, fallback):
            torch.testing.assert_close(got, want)


def test_the_hand_gradient_is_the_derivative_of_the_hand_loss():
    """by_hand's gradient against central differences of its own loss (every point is 0.05 or more from a kink):
    the derivation is checked on its own before it checks the kernel. Moving logp_bt moves the log-ratio with it
    and ref - logp against it."""
    h = 1e-6
    for level, sign, delta in itertools.product(["token", "sequence"], [1, -1], [None, 1.5]):
        log_ratio = TOKEN_LOG_RATIOS if level == "token" else SEQ_LOG_RATIOS
        kw = dict(level=level, beta=0.1, delta=delta, loss_type="grpo", max_len=6, num_tokens=None)
        adv = [1.0 * sign, -0.5 * sign]
        _, grad, _ = by_hand(log_ratio, REF_MINUS_LOGP, adv, **kw)
        assert any(abs(g) > 1e-3 for row in grad for g in row)
        for b, t in itertools.product(range(2), range(4)):
            def moved(x, step):
                return [[v + step if (i, j) == (b, t) else v for j, v in enumerate(row)] for i, row in enumerate(x)]

            up = by_hand(moved(log_ratio, h), moved(REF_MINUS_LOGP, -h), adv, **kw)[0]
            down = by_hand(moved(log_ratio, -h), moved(REF_MINUS_LOGP, h), adv, **kw)[0]
            assert (up - down) / (2 * h) == pytest.approx(grad[b][t], abs=1e-8), (level, sign, delta, b, t)


# ---------------------------------------------------------------------------------------------------------------
# linear_grpo_loss: from hidden states
# ---------------------------------------------------------------------------------------------------------------


def linear_batch(B=4, L=7, H=8, V=37, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, L), generator=g)
    targets[0, :2] = -100
    _, _, _, adv, mask = batch(B, L)
    with torch.no_grad():  # old and ref near the policy, so ratios straddle the clip range
        base = linear_logprob_reference(hidden.double(), weight.double(), targets, temperature=0.7)
    old = base + 0.15 * torch.randn(B, L, generator=g, dtype=torch.float64)
    ref = base + 0.15 * torch.randn(B, L, generator=g, dtype=torch.float64)
    return hidden, weight, targets, old, ref, adv, mask


@pytest.mark.parametrize("sampling", ["token", "sequence"])
@pytest.mark.parametrize("chunk", [3, 14, 100])  # under one sequence, two sequences, everything
def test_linear_against_composed_reference(sampling, chunk):
    hidden, weight, targets, old, ref, adv, mask = linear_batch()
    kw = dict(ref_logp=ref, beta=0.04, eps_high=0.28, delta=4.0, loss_type="grpo", importance_sampling=sampling)
    loss, metrics = linear_grpo_loss(hidden, weight, targets, old, adv, mask, temperature=0.7, chunk_size=chunk, **kw)
    got = torch.autograd.grad(loss * 1.7, (hidden, weight))
    logp = linear_logprob_reference(hidden, weight, targets, temperature=0.7)
    ref_loss, ref_metrics = grpo_loss_reference(logp, old, adv, mask & (targets != -100), **kw)
    want = torch.autograd.grad(ref_loss * 1.7, (hidden, weight))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=1e-7)
    for a, b in zip(got, want):
        assert b.abs().max() > 1e-3  # some tokens are unclipped, so the test can fail
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
    if sampling == "token":  # sequence-mean ratios of this batch all stay inside the clip range
        assert 0 < metrics["clip_region"] < 1
    for k in ref_metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=1e-7, atol=1e-7)


def test_linear_bf16_and_no_grad():
    hidden, weight, targets, old, ref, adv, mask = linear_batch(dtype=torch.bfloat16)
    loss, _ = linear_grpo_loss(hidden, weight, targets, old, adv, mask, loss_type="bnpo")
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert gh.dtype == gw.dtype == torch.bfloat16
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref_loss, _ = grpo_loss_reference(linear_logprob_reference(h32, w32, targets), old.float(), adv.float(),
                                      mask & (targets != -100), loss_type="bnpo")  # fmt: skip
    want = torch.autograd.grad(ref_loss, (h32, w32))
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for a, b in zip((gh, gw), want):
        assert b.norm() > 0 and (a.float() - b).norm() / b.norm() < 3e-2
    with torch.no_grad():
        nl, _ = linear_grpo_loss(hidden, weight, targets, old, adv, mask, loss_type="bnpo")
    assert nl.grad_fn is None and nl == loss


def test_bench_smoke(tmp_path):
    from posttrain.bench import bench_grpo

    out = tmp_path / "grpo.json"
    bench_grpo.main(["--smoke", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"ours", "eager"}
    assert all(r["max_abs_err"] < 1e-3 for r in rows if r["impl"] == "ours")


def cuda_policy(B, L, H, V, logprob=linear_logprob_reference):
    """bf16 hidden [B, L, H] and weight [V, H] needing grad, targets, their log-probs and old log-probs near them."""
    torch.manual_seed(0)
    hidden = torch.randn(B, L, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, H, device="cuda") / H**0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (B, L), device="cuda")
    with torch.no_grad():
        base = logprob(hidden, weight, targets)
    return hidden, weight, targets, base, base + 0.1 * torch.randn_like(base)


@pytest.mark.gpu
@pytest.mark.parametrize("sampling", ["token", "sequence"])
def test_cuda_linear_grpo_real_shape(sampling):
    B, L, H, V = 16, 512, 1536, 151936
    hidden, weight, targets, base, old = cuda_policy(B, L, H, V)
    ref = base + 0.1 * torch.randn_like(base)
    adv = torch.randn(B, device="cuda")
    mask = torch.rand(B, L, device="cuda") > 0.2
    kw = dict(ref_logp=ref, beta=0.04, eps_high=0.28, importance_sampling=sampling)
    loss, metrics = linear_grpo_loss(hidden, weight, targets, old, adv, mask, **kw)
    got = torch.autograd.grad(loss, (hidden, weight))
    ref_loss, ref_metrics = grpo_loss_reference(linear_logprob_reference(hidden, weight, targets), old, adv, mask, **kw)
    want = torch.autograd.grad(ref_loss, (hidden, weight))
    assert abs(loss.item() - ref_loss.item()) < 1e-2 * max(1.0, abs(ref_loss.item()))
    for k in ref_metrics:
        assert abs(metrics[k].item() - ref_metrics[k].item()) < 2e-2, k
    for a, b in zip(got, want):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 3e-2


@pytest.mark.gpu
def test_cuda_grpo_loss_matches_reference():
    torch.manual_seed(0)
    logp, old, ref, adv, mask = (t.cuda() for t in batch(B=64, L=1000, dtype=torch.float32, adv_2d=True))
    logp = logp.detach().requires_grad_()
    for sampling in ("token", "sequence"):
        compare(dict(beta=0.04, delta=4.0, eps_high=0.28, loss_type="grpo", importance_sampling=sampling),
                (logp, old, ref, adv, mask), 1e-4)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# linear_grpo_loss: long sequences, bounded memory, bad targets
# ---------------------------------------------------------------------------------------------------------------


class PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active and still alive (every aten op is seen, factory
    functions included): the extra memory a call needs beyond its inputs, measured rather than estimated."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                st = t.untyped_storage()
                self.live.setdefault(st.data_ptr(), (StorageWeakRef(st), st.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


@pytest.mark.parametrize("sampling", ["token", "sequence"])
def test_linear_long_sequences_in_pieces_match_reference_in_bounded_memory(sampling):
    """Sequences 6x longer than the chunk: values and gradients equal the composed reference, and the extra
    memory of forward + backward stays under one chunk of logits plus the gradient buffers -- less than the
    single [L, V] buffer that holding a whole sequence per chunk needs."""
    B, L, H, V, chunk = 3, 96, 8, 301, 16
    hidden, weight, targets, old, ref, adv, mask = linear_batch(B, L, H, V)
    kw = dict(ref_logp=ref, beta=0.04, eps_high=0.28, loss_type="grpo", importance_sampling=sampling)
    with PeakBytes() as mem:
        loss, metrics = linear_grpo_loss(hidden, weight, targets, old, adv, mask, temperature=0.7, chunk_size=chunk,
                                         **kw)  # fmt: skip
        got = torch.autograd.grad(loss, (hidden, weight))
    logp = linear_logprob_reference(hidden, weight, targets, temperature=0.7)
    ref_loss, ref_metrics = grpo_loss_reference(logp, old, adv, mask & (targets != -100), **kw)
    want = torch.autograd.grad(ref_loss, (hidden, weight))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=1e-7)
    for a, b in zip(got, want):
        assert b.abs().max() > 1e-6
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
    for k in ref_metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=1e-7, atol=1e-7)
    f64 = 8
    chunk_logits = chunk * padded_width(V) * f64
    grads = (V * H + 2 * B * L * H) * f64  # fp64 grad_weight accumulator, grad_hidden and its [B, L, H] view
    per_token = 20 * B * L * f64  # [B, L] arrays: lse, logp, grad_logp, targets, the prepared old/ref/mask/adv...
    bound = chunk_logits + grads + per_token + 8192  # + [B, 7] stats and scalars
    assert mem.peak <= bound, (mem.peak, bound)
    assert bound < L * padded_width(V) * f64  # one whole sequence of logits would not fit: the test can fail


@pytest.mark.parametrize("bad", [-1, 37, 42])
def test_linear_out_of_range_target_raises(monkeypatch, bad):
    hidden, weight, targets, old, ref, adv, mask = (t.to(DEV) for t in linear_batch())
    targets[2, 5] = bad

    def call():
        with pytest.raises(ValueError, match=rf"linear_grpo_loss: target id {bad} at targets\[2, 5\] .* V=37"):
            linear_grpo_loss(hidden, weight, targets, old, adv, mask)

    both_paths(monkeypatch, call, module=logprob_module, fallback="_rows_torch")


def test_pieces_cover_every_token_once():
    for B, L, chunk in [(3, 512, 2048), (2, 5000, 2048), (1, 16384, 2048), (4, 7, 3), (5, 7, 14), (2, 2049, 2048)]:
        pieces, n = grpo._pieces(B, L, chunk)
        seen = torch.zeros(B, L, dtype=torch.int64)
        for b0, b1, s, e in pieces:
            assert (b1 - b0 - 1) * L + e - s <= max(chunk, L if L <= chunk else 0)
            assert b1 - b0 == 1 or (s, e) == (0, L)
            seen[b0:b1, s:e] += 1
            if L > chunk and chunk >= 16:
                assert s % 16 == 0
        assert (seen == 1).all() and (n == 1) == (L <= chunk)


@pytest.mark.gpu
def test_cuda_linear_grpo_long_sequence_bounded_memory():
    """L = 16384, V = 151936, bf16: chunks within the sequence keep the extra memory of forward + backward <= 2 GB."""
    B, L, H, V = 1, 16384, 1536, 151936
    hidden, weight, targets, base, old = cuda_policy(B, L, H, V, logprob_module.linear_logprob)
    adv, mask = torch.ones(B, device="cuda"), torch.rand(B, L, device="cuda") > 0.1
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, _ = linear_grpo_loss(hidden, weight, targets, old, adv, mask)
    grads = torch.autograd.grad(loss, (hidden, weight))
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 2e9, f"{extra / 1e9:.2f} GB"
    ref_loss, _ = grpo_loss_reference(base.float(), old, adv, mask)
    assert abs(loss.item() - ref_loss.item()) < 1e-2 * max(1.0, abs(ref_loss.item()))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
def test_cuda_out_of_range_target_raises():
    """CUDA: without grad at the call; with grad the forward gives NaN and backward raises (its one host read)."""
    hidden = torch.randn(64, 32, device="cuda").requires_grad_()
    weight = torch.randn(100, 32, device="cuda").requires_grad_()
    targets = torch.randint(0, 100, (64,), device="cuda")
    targets[7] = 100
    with torch.no_grad(), pytest.raises(ValueError, match=r"target id 100 at targets\[7\] .* V=100"):
        logprob_module.linear_logprob(hidden, weight, targets)
    logp = logprob_module.linear_logprob(hidden, weight, targets)
    assert logp[7].isnan() and torch.isfinite(logp[:7]).all()
    with pytest.raises(ValueError, match=r"target id 100 at targets\[7\] .* V=100"):
        logp.sum().backward()
