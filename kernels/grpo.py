"""GRPO-family policy loss (GRPO, DAPO, Dr. GRPO, BNPO, GSPO) as one Triton pass over tokens, and fused from hidden.

For: the RL trainer's policy-gradient loss given per-token log-probs of the current policy (`grpo_loss`), or given
the final hidden states and the lm-head (`linear_grpo_loss`, which never materializes logits). Not for: advantage
estimation (train/ owns that) or sampling.

The math, per token t of sequence b (mask m, advantage A, the formulas TRL documents):
    log_iw = logp - old_logp                                  importance_sampling="token"
           = sum_t m (logp - old_logp) / max(sum_t m, 1)      importance_sampling="sequence" (GSPO), per sequence
    r = exp(log_iw);  r1 = min(r, delta) if delta else r      (delta: the two-sided clip of INTELLECT-2 / TRL)
    loss_t = -min(r1 A, clamp(r, 1 - eps_low, 1 + eps_high) A) + beta * (exp(ref - logp) - (ref - logp) - 1)
    loss = sum_t W_t loss_t with W_t = m_t * scale_b:
        "grpo"    scale_b = 1 / (max(n_b, 1) * B)         mean over each sequence, then over sequences
        "bnpo"    scale_b = 1 / max(N, 1)                 mean over all active tokens of the micro-batch
        "dr_grpo" scale_b = 1 / (B * max_completion_length)
        "dapo"    scale_b = 1 / num_tokens                num_tokens defaults to N; pass the global count (see below)
Gradients (only to logp) follow torch's autograd of that formula exactly, ties of the min split half/half.

The kernel (one program per sequence) computes loss, metrics and dloss/dlogp in the forward; backward is a scalar
scaling. Metrics are means over active tokens (0 when there are none, where TRL would give NaN): clip_low
(r < 1 - eps_low and A < 0), clip_high (r > 1 + eps_high and A > 0), clip_region (either), ratio (r, before the
delta clip), kl (the k3 term, present when ref_logp is given).

DAPO across micro-batches and ranks: the loss is a token-level sum divided by num_tokens; pass num_tokens = (active
tokens over all micro-batches of the step and all ranks) / world_size when DDP/FSDP average gradients over ranks.
"""

import torch

from posttrain.kernels._utils import HAS_TRITON, addmm_acc_, use_triton
from posttrain.kernels.logprob import (
    IGNORE_INDEX, _rows, check_inputs, default_chunk_size, logits_buffer, new_bad_flag, scale_cast,
    check_targets as check_target_ids,
)  # fmt: skip

if HAS_TRITON:
    import triton
    import triton.language as tl

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
METRICS = ("clip_low", "clip_high", "clip_region", "ratio", "kl")
# Per-sequence sums the kernel writes, in this order, in rows of 8 (32 bytes: a chunk's rows start aligned wherever
# it starts, so Triton compiles one variant, not one per alignment class).
_LOSS, _LOW, _HIGH, _REGION, _RATIO, _KL, _COUNT = range(7)
_STATS = 8


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def grpo_loss_reference(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling: str = "token",
    max_completion_length: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The formulas of the module docstring in plain torch, differentiated by autograd. What the tests trust."""
    _check(logp, old_logp, advantages, mask, ref_logp, beta, loss_type, importance_sampling, "grpo_loss_reference")
    B, L = logp.shape
    mask = mask.to(logp.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    adv = adv.to(logp.dtype).expand(B, L)
    log_ratio = logp - old_logp
    if importance_sampling == "token":
        log_iw = log_ratio
    else:
        log_iw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand(B, L)
    coef_1 = torch.exp(log_iw)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    coef_1c = torch.clamp(coef_1, max=delta) if delta is not None else coef_1
    per_token_loss = -torch.min(coef_1c * adv, coef_2 * adv)
    kl = None
    if ref_logp is not None:
        diff = ref_logp - logp
        kl = torch.exp(diff) - diff - 1
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (B * (max_completion_length or L))
    else:
        loss = (per_token_loss * mask).sum() / (mask.sum().clamp(min=1.0) if num_tokens is None else num_tokens)

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return (x.to(mask.dtype) * mask).sum().detach() / mask.sum().clamp(min=1.0)

    with torch.no_grad():
        low = (coef_1 < 1 - eps_low) & (adv < 0)
        high = (coef_1 > 1 + eps_high) & (adv > 0)
        metrics = {
            "clip_low": masked_mean(low),
            "clip_high": masked_mean(high),
            "clip_region": masked_mean(low | high),
            "ratio": masked_mean(coef_1),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl)
    return loss, metrics


def _check(logp, old_logp, advantages, mask, ref_logp, beta, loss_type, importance_sampling, where):
    if logp.dim() != 2:
        raise ValueError(f"{where}: logp must be [B, L], got {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{where}: {name} {tuple(t.shape)} must match logp {tuple(logp.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"{where}: advantages {tuple(advantages.shape)} must be [B] or [B, L] = {tuple(logp.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{where}: loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if importance_sampling not in ("token", "sequence"):
        raise ValueError(f"{where}: importance_sampling={importance_sampling!r}; use 'token' or 'sequence'")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"{where}: beta={beta} needs ref_logp (or set beta=0.0)")


# ----------------------------------------------------------------------------------------------------------------
# Per-sequence pass: Triton kernel and its plain-torch twin (the fallback)
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _token_terms(r, adv, eps_low, eps_high, delta, HAS_DELTA: tl.constexpr):
        """Policy part of loss_t and d loss_t / d r, as torch's autograd of -min(r1 A, clamp(r) A) gives it."""
        lo = 1 - eps_low
        hi = 1 + eps_high
        r2 = tl.minimum(tl.maximum(r, lo), hi)
        d2 = tl.where((r >= lo) & (r <= hi), adv, 0.0)
        if HAS_DELTA:
            r1 = tl.minimum(r, delta)
            d1 = tl.where(r <= delta, adv, 0.0)
        else:
            r1 = r
            d1 = adv
        l1 = r1 * adv
        l2 = r2 * adv
        dmin = tl.where(l1 < l2, d1, tl.where(l1 > l2, d2, 0.5 * (d1 + d2)))
        return -tl.minimum(l1, l2), -dmin

    @triton.jit
    def _grpo_rows_kernel(
        logp_ptr, old_ptr, ref_ptr, mask_ptr,  # [B, L], rows `L` apart (contiguous)
        adv_ptr, stride_adv_b, stride_adv_l,  # [B, L] view, stride_adv_l = 0 for per-sequence advantages
        scale_ptr, stride_scale,  # [B] aggregation weight of each sequence's tokens (16-byte stride, see _prepare)
        grad_ptr,  # [B, L] out: d loss / d logp
        stats_ptr,  # [B, 8] out: per-sequence sums (loss, low, high, region, ratio, kl, count; one unused)
        L, beta, eps_low, eps_high, delta,
        SEQUENCE: tl.constexpr, HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr,
        ACC: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        row = b * L
        scale = tl.load(scale_ptr + b * stride_scale).to(ACC)
        cols = tl.arange(0, BLOCK_L)
        zero = tl.zeros([BLOCK_L], ACC)

        if SEQUENCE:  # the sequence's mean log-ratio comes first
            num = zero
            den = zero
            for start in range(0, L, BLOCK_L):
                c = start + cols
                inb = c < L
                m = tl.load(mask_ptr + row + c, mask=inb, other=0.0).to(ACC)
                lr = tl.load(logp_ptr + row + c, mask=inb, other=0.0).to(ACC) - tl.load(
                    old_ptr + row + c, mask=inb, other=0.0
                ).to(ACC)
                num += tl.where(m != 0, m * lr, 0.0)
                den += m
            n_seq = tl.maximum(tl.sum(den, 0), 1.0)
            r_seq = tl.exp(tl.sum(num, 0) / n_seq)

        loss_acc = zero
        low_acc = zero
        high_acc = zero
        region_acc = zero
        ratio_acc = zero
        kl_acc = zero
        count_acc = zero
        dr_acc = zero  # SEQUENCE: sum_t W_t d loss_t / d r
        for start in range(0, L, BLOCK_L):
            c = start + cols
            inb = c < L
            m = tl.load(mask_ptr + row + c, mask=inb, other=0.0).to(ACC)
            lp = tl.load(logp_ptr + row + c, mask=inb, other=0.0).to(ACC)
            adv = tl.load(adv_ptr + b * stride_adv_b + c * stride_adv_l, mask=inb, other=0.0).to(ACC)
            if SEQUENCE:
                r = zero + r_seq
            else:
                r = tl.exp(lp - tl.load(old_ptr + row + c, mask=inb, other=0.0).to(ACC))
            loss_t, dloss_dr = _token_terms(r, adv, eps_low, eps_high, delta, HAS_DELTA)
            dloss_dlp = zero
            if HAS_REF:
                diff = tl.load(ref_ptr + row + c, mask=inb, other=0.0).to(ACC) - lp
                e_diff = tl.exp(diff)
                kl = e_diff - diff - 1.0
                loss_t += beta * kl
                dloss_dlp = beta * (1.0 - e_diff)
                kl_acc += tl.where(m != 0, m * kl, 0.0)
            w = m * scale
            if SEQUENCE:
                dr_acc += tl.where(m != 0, w * dloss_dr, 0.0)
            else:
                dloss_dlp += dloss_dr * r
                tl.store(grad_ptr + row + c, tl.where(m != 0, w * dloss_dlp, 0.0), mask=inb)
            low = (r < 1 - eps_low) & (adv < 0)
            high = (r > 1 + eps_high) & (adv > 0)
            loss_acc += tl.where(m != 0, w * loss_t, 0.0)
            low_acc += tl.where(low, m, 0.0)
            high_acc += tl.where(high, m, 0.0)
            region_acc += tl.where(low | high, m, 0.0)
            ratio_acc += tl.where(m != 0, m * r, 0.0)
            count_acc += m

        if SEQUENCE:  # d log_iw / d logp_t = m_t / n: the shared ratio term, plus each token's own KL term
            coef = tl.sum(dr_acc, 0) * r_seq / n_seq
            for start in range(0, L, BLOCK_L):
                c = start + cols
                inb = c < L
                m = tl.load(mask_ptr + row + c, mask=inb, other=0.0).to(ACC)
                g = coef * m
                if HAS_REF:
                    lp = tl.load(logp_ptr + row + c, mask=inb, other=0.0).to(ACC)
                    diff = tl.load(ref_ptr + row + c, mask=inb, other=0.0).to(ACC) - lp
                    g += tl.where(m != 0, m * scale * beta * (1.0 - tl.exp(diff)), 0.0)
                tl.store(grad_ptr + row + c, g, mask=inb)

        out = stats_ptr + b * 8
        tl.store(out + 0, tl.sum(loss_acc, 0))
        tl.store(out + 1, tl.sum(low_acc, 0))
        tl.store(out + 2, tl.sum(high_acc, 0))
        tl.store(out + 3, tl.sum(region_acc, 0))
        tl.store(out + 4, tl.sum(ratio_acc, 0))
        tl.store(out + 5, tl.sum(kl_acc, 0))
        tl.store(out + 6, tl.sum(count_acc, 0))


def _grpo_rows_torch(logp, old, ref, mask, adv, scale, beta, eps_low, eps_high, delta, sequence):
    """The kernel's math vectorized in torch (no autograd): grad [B, L] and stats [B, 7]."""
    B, L = logp.shape
    active = mask != 0
    lr = logp - old
    if sequence:
        n_seq = mask.sum(-1).clamp(min=1.0)
        r = torch.exp(torch.where(active, mask * lr, 0.0).sum(-1) / n_seq).unsqueeze(1).expand(B, L)
    else:
        r = torch.exp(lr)
    lo, hi = 1 - eps_low, 1 + eps_high
    r2 = r.clamp(lo, hi)
    d2 = torch.where((r >= lo) & (r <= hi), adv, 0.0)
    r1 = r.clamp(max=delta) if delta is not None else r
    d1 = torch.where(r <= delta, adv, 0.0) if delta is not None else adv
    l1, l2 = r1 * adv, r2 * adv
    loss_t = -torch.minimum(l1, l2)
    dloss_dr = -torch.where(l1 < l2, d1, torch.where(l1 > l2, d2, 0.5 * (d1 + d2)))
    dloss_dlp = torch.zeros_like(logp)
    kl = torch.zeros_like(logp)
    if ref is not None:
        diff = ref - logp
        kl = torch.exp(diff) - diff - 1
        loss_t = loss_t + beta * kl
        dloss_dlp = beta * (1 - torch.exp(diff))
    w = mask * scale.unsqueeze(1)
    if sequence:
        coef = torch.where(active, w * dloss_dr, 0.0).sum(-1) * r[:, 0] / n_seq
        grad = torch.where(active, w * dloss_dlp, 0.0) + coef.unsqueeze(1) * mask
    else:
        grad = torch.where(active, w * (dloss_dlp + dloss_dr * r), 0.0)
    low = (r < lo) & (adv < 0)
    high = (r > hi) & (adv > 0)
    zero = torch.zeros_like(mask)
    stats = torch.stack(
        [
            torch.where(active, w * loss_t, zero).sum(-1),
            torch.where(low, mask, zero).sum(-1),
            torch.where(high, mask, zero).sum(-1),
            torch.where(low | high, mask, zero).sum(-1),
            torch.where(active, mask * r, zero).sum(-1),
            torch.where(active, mask * kl, zero).sum(-1),
            mask.sum(-1),
        ],
        dim=1,
    )
    return grad, stats


def _grpo_rows(logp, old, ref, mask, adv, scale, grad, stats, beta, eps_low, eps_high, delta, sequence):
    """Fill grad [B, L] and stats [B, 8] for the sequences given (all [B, L] inputs contiguous, in ACC dtype; a
    [1, n] piece of a longer row also works, as a sequence of n tokens whose scale is the whole sequence's)."""
    if not use_triton(logp):
        g, s = _grpo_rows_torch(logp, old, ref, mask, adv, scale, beta, eps_low, eps_high, delta, sequence)
        grad.copy_(g)
        stats[:, :7].copy_(s)
        return
    B, L = logp.shape
    _grpo_rows_kernel[(B,)](
        logp, old, ref if ref is not None else logp, mask,
        adv, adv.stride(0), adv.stride(1), scale, scale.stride(0), grad, stats,
        L, float(beta), float(eps_low), float(eps_high), float(delta if delta is not None else 0.0),
        SEQUENCE=sequence, HAS_REF=ref is not None, HAS_DELTA=delta is not None,
        ACC=tl.float64 if logp.dtype == torch.float64 else tl.float32,
        BLOCK_L=min(1024, triton.next_power_of_2(L)),
    )  # fmt: skip


def _row_scale(mask, loss_type, max_completion_length, num_tokens) -> torch.Tensor:
    """[B] weight of each sequence's active tokens in the loss (see the module docstring). No host sync."""
    B, L = mask.shape
    if loss_type == "grpo":
        return 1.0 / (mask.sum(-1).clamp(min=1.0) * B)
    if loss_type == "dr_grpo":
        return mask.new_full((B,), 1.0 / (B * (max_completion_length or L)))
    if loss_type == "dapo" and isinstance(num_tokens, torch.Tensor):
        return (1.0 / num_tokens.to(mask.dtype)).expand(B).contiguous()
    if loss_type == "dapo" and num_tokens is not None:  # a fill: a Python number sent as a tensor is a blocking copy
        return mask.new_full((B,), num_tokens).reciprocal_()
    return (1.0 / mask.sum().clamp(min=1.0)).expand(B).contiguous()


def _metrics(stats_sum: torch.Tensor, has_ref: bool) -> dict[str, torch.Tensor]:
    count = stats_sum[_COUNT].clamp(min=1.0)
    out = {
        "clip_low": stats_sum[_LOW] / count,
        "clip_high": stats_sum[_HIGH] / count,
        "clip_region": stats_sum[_REGION] / count,
        "ratio": stats_sum[_RATIO] / count,
    }
    if has_ref:
        out["kl"] = stats_sum[_KL] / count
    return out


def _prepare(acc, old_logp, advantages, mask, ref_logp, loss_type, max_completion_length, num_tokens):
    B, L = old_logp.shape
    old = old_logp.to(acc).contiguous()
    ref = None if ref_logp is None else ref_logp.to(acc).contiguous()
    m = mask.to(acc).contiguous()
    adv = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).to(acc).expand(B, L)
    # [B] with a 16-byte stride: a chunk's slice of it starts aligned wherever it starts (one compiled variant)
    scale = torch.zeros(B, 4, dtype=acc, device=m.device)[:, 0].copy_(
        _row_scale(m, loss_type, max_completion_length, num_tokens)
    )
    return old, ref, m, adv, scale


class _GRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, mask, adv, scale, beta, eps_low, eps_high, delta, sequence):
        acc = old.dtype
        lp = logp.to(acc).contiguous()
        grad = torch.empty_like(lp)
        stats = torch.empty(lp.shape[0], _STATS, dtype=acc, device=lp.device)
        _grpo_rows(lp, old, ref, mask, adv, scale, grad, stats, beta, eps_low, eps_high, delta, sequence)
        ctx.save_for_backward(grad)
        ctx.logp_dtype = logp.dtype
        stats_sum = stats[:, :7].sum(0)
        ctx.mark_non_differentiable(stats_sum)
        return stats_sum[_LOSS].clone(), stats_sum

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        (grad,) = ctx.saved_tensors
        return (grad * g_loss).to(ctx.logp_dtype), None, None, None, None, None, None, None, None, None, None


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling: str = "token",
    max_completion_length: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss from per-token log-probs. logp, old_logp, mask, ref_logp: [B, L]; advantages: [B] or [B, L].

    Returns (loss scalar, metrics dict of 0-d tensors); the gradient flows to logp only. See the module docstring
    for the formulas, loss types and num_tokens (DAPO's global token count).
    """
    _check(logp, old_logp, advantages, mask, ref_logp, beta, loss_type, importance_sampling, "grpo_loss")
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    old, ref, m, adv, scale = _prepare(
        acc, old_logp, advantages, mask, ref_logp, loss_type, max_completion_length, num_tokens
    )
    loss, stats_sum = _GRPOLoss.apply(
        logp, old, ref, m, adv, scale, beta, eps_low, eps_high, delta, importance_sampling == "sequence"
    )
    return loss, _metrics(stats_sum, ref_logp is not None)


# ----------------------------------------------------------------------------------------------------------------
# Fused from hidden states
# ----------------------------------------------------------------------------------------------------------------


def _pieces(B: int, L: int, chunk: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """Chunks of the [B, L] tokens as (b0, b1, s, e): sequences b0..b1-1, positions s..e-1 of each. Whole sequences
    (max(1, chunk // L) of them) when a sequence fits in a chunk; otherwise every sequence is cut into n pieces of
    at most `chunk` tokens (sizes a multiple of 16, so every piece starts 64-byte aligned in the fp32 [B, L]
    arrays). Returns the chunks and n (1 for whole sequences)."""
    if L <= chunk:
        rows = chunk // L
        return [(b0, min(b0 + rows, B), 0, L) for b0 in range(0, B, rows)], 1
    per = -(-L // -(-L // chunk))  # L over the fewest pieces, evened out
    size = min(chunk, -(-per // 16) * 16)
    n = -(-L // size)
    return [(b, b + 1, s, min(s + size, L)) for b in range(B) for s in range(0, L, size)], n


class _LinearGRPOLoss(torch.autograd.Function):
    """Chunks of tokens: GEMM -> lse/logp -> GRPO grads of the chunk -> dlogits in place -> grad GEMMs.

    The loss is a scalar, so its upstream gradient is one number and every gradient is exact in the forward.
    A chunk holds whole sequences, or a piece of one when a sequence is longer than the chunk, so memory stays
    at one [chunk, V] buffer at any sequence length. Per-token ratios need only the chunk's tokens: 3 GEMMs per
    token. The sequence-level (GSPO) ratio needs every log-prob of the sequence before any gradient: with pieces,
    a first pass computes the log-probs and a second recomputes the logits for the gradients (4 GEMMs per token).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, old, ref, mask, adv, scale, bad, params):
        beta, eps_low, eps_high, delta, sequence, inv_temp, chunk, ignore_index, grad_on = params
        B, L, H = hidden.shape
        V = weight.shape[0]
        acc = old.dtype
        dev = hidden.device
        h = hidden.reshape(B * L, H)
        t = targets.reshape(B * L)
        # Not ctx.needs_input_grad: it stays True under torch.no_grad(), where no gradient work should be done.
        need_h, need_w = hidden.requires_grad and grad_on, weight.requires_grad and grad_on
        pieces, n_split = _pieces(B, L, chunk)
        two_pass = sequence and n_split > 1
        lse = torch.empty(B * L, dtype=acc, device=dev)
        logp = torch.empty(B, L, dtype=acc, device=dev)
        grad_logp = torch.empty(B, L, dtype=acc, device=dev)
        stats = torch.empty(B if two_pass else B * n_split, _STATS, dtype=acc, device=dev)  # per sequence or piece
        gh = torch.empty(B * L, H, dtype=hidden.dtype, device=dev) if need_h else None
        gw = torch.empty(V, H, dtype=acc, device=dev) if need_w else None
        buf = logits_buffer(max((b1 - b0 - 1) * L + e - s for b0, b1, s, e in pieces), V, hidden.dtype, dev)

        def logits_of(lo, hi):
            logits = buf[: hi - lo]
            torch.mm(h[lo:hi], weight.t(), out=logits)
            return logits

        def grads_of(logits, lo, hi, first):  # dlogits in place, then the two gradient GEMMs
            _rows(
                logits, t[lo:hi], lse[lo:hi], None, None, grad_logp.view(-1)[lo:hi], None, bad, inv_temp,
                ignore_index, stats=False, grad=True,
            )  # fmt: skip
            if need_h:
                torch.mm(logits, weight, out=gh[lo:hi])
            if need_w:
                addmm_acc_(gw, logits.t(), h[lo:hi], first=first)

        for i, (b0, b1, s, e) in enumerate(pieces):
            lo, hi = b0 * L + s, (b1 - 1) * L + e  # the chunk's rows of h, t and the flat [B * L] arrays
            logits = logits_of(lo, hi)
            lp = logp.view(-1)[lo:hi]
            _rows(
                logits, t[lo:hi], lse[lo:hi], lp, None, None, None, bad, inv_temp, ignore_index, stats=True, grad=False
            )
            if two_pass:
                continue
            k = b0 * n_split + i % n_split if n_split > 1 else b0
            _grpo_rows(
                logp[b0:b1, s:e], old[b0:b1, s:e], None if ref is None else ref[b0:b1, s:e], mask[b0:b1, s:e],
                adv[b0:b1, s:e], scale[b0:b1], grad_logp[b0:b1, s:e], stats[k : k + b1 - b0], beta, eps_low,
                eps_high, delta, sequence,
            )  # fmt: skip
            if need_h or need_w:
                grads_of(logits, lo, hi, first=i == 0)
        if two_pass:
            _grpo_rows(logp, old, ref, mask, adv, scale, grad_logp, stats, beta, eps_low, eps_high, delta, sequence)
            for i, (b0, b1, s, e) in enumerate(pieces if need_h or need_w else ()):
                lo, hi = b0 * L + s, (b1 - 1) * L + e
                grads_of(logits_of(lo, hi), lo, hi, first=i == 0)
        ctx.gh, ctx.gw = gh, gw
        ctx.shapes = (hidden.shape, weight.dtype)
        stats_sum = stats[:, :7].sum(0)
        ctx.mark_non_differentiable(stats_sum)
        return stats_sum[_LOSS].clone(), stats_sum

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        if ctx.gh is None and ctx.gw is None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            raise RuntimeError("linear_grpo_loss: backward ran twice; call it again instead of retain_graph=True")
        hidden_shape, wdtype = ctx.shapes
        gh, gw = ctx.gh, ctx.gw
        ctx.gh = ctx.gw = None  # scaled in place: hand the buffers out
        grad_h = None if gh is None else gh.mul_(g_loss).view(hidden_shape)
        grad_w = None if gw is None else scale_cast(gw, g_loss, wdtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling: str = "token",
    max_completion_length: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    check_targets: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """grpo_loss(linear_logprob(hidden, weight, targets, temperature), ...) without materializing logits.

    hidden: [B, L, H] (the policy's final hidden states at the positions predicting targets), weight: [V, H],
    targets/old_logp/mask/ref_logp: [B, L], advantages: [B] or [B, L]. Tokens whose target is ignore_index count as
    masked; a target outside [0, V) raises ValueError (read at the end of the call: one 4-byte host read, its only
    sync). check_targets=False skips that read, for a caller that has checked its targets (a training loop that
    reads nothing back per micro-batch): a bad target then gives a NaN loss, never a plausible number. Chunks hold
    whole sequences (max(1, chunk_size // L) of them), or pieces of one sequence when L > chunk_size, so extra memory
    is one [chunk, V] logits buffer plus the fp32 [V, H] grad_weight accumulator at any L (about 1.6 GB at
    V = 151936, H = 1536, bf16). Gradients flow to hidden and weight.
    """
    check_inputs(hidden, weight, targets, "linear_grpo_loss")
    if hidden.dim() != 3:
        raise ValueError(f"linear_grpo_loss: hidden must be [B, L, H], got {tuple(hidden.shape)}")
    B, L, _ = hidden.shape
    probe = old_logp  # shapes of the [B, L] inputs are checked against old_logp
    _check(probe, old_logp, advantages, mask, ref_logp, beta, loss_type, importance_sampling, "linear_grpo_loss")
    if targets.shape != probe.shape:
        raise ValueError(f"linear_grpo_loss: targets {tuple(targets.shape)} must be [B, L] = {tuple(probe.shape)}")
    t = targets.to(torch.int64).contiguous()
    mask = mask * (t != ignore_index)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    old, ref, m, adv, scale = _prepare(
        acc, old_logp, advantages, mask, ref_logp, loss_type, max_completion_length, num_tokens
    )
    chunk = chunk_size or default_chunk_size(B * L, hidden.dtype)
    params = (beta, eps_low, eps_high, delta, importance_sampling == "sequence", 1.0 / temperature, chunk,
              ignore_index, torch.is_grad_enabled())  # fmt: skip
    h = hidden if hidden.is_contiguous() else hidden.contiguous()
    bad = new_bad_flag(h.device)
    loss, stats_sum = _LinearGRPOLoss.apply(h, weight, t, old, ref, m, adv.contiguous(), scale, bad, params)
    if check_targets:  # no host read of its own to share: one 4-byte read, the call's only sync (kernels/logprob.py)
        check_target_ids(bad, None, t, weight.shape[0], ignore_index, "linear_grpo_loss")
    return loss, _metrics(stats_sum, ref_logp is not None)
