"""Log-probabilities (and entropy) of target tokens through the lm-head, without ever materializing [T, V] logits.

For: SFT (`-linear_logprob(...).sum() / n`), and old/reference log-probs in RL (under `torch.no_grad()`).
For the GRPO policy loss use `kernels.grpo.linear_grpo_loss`, which reuses the pieces below and knows its upstream
gradient during the forward. Not for: sampling (the sampler needs whole logits rows), or a [T, V] logits output.

Design (cuBLAS chunk matmul + Triton row pass; chunks over tokens):

    for each chunk of C tokens:
        logits = hidden[c] @ weight.T                 [C, V] in the input dtype (bf16 on GPU), one reused buffer
        Triton row pass, one program per token:       online logsumexp, target logit, entropy -> [C] fp32
        if grads are wanted, the same pass rewrites the buffer in place with
            dlogits = (onehot(target) - softmax) / temperature            (zero rows for ignored tokens)
        grad_hidden[c]  = dlogits @ weight            [C, H], exact per token (scaled by g_t in backward)
        grad_weight    += dlogits.T @ hidden[c]       [V, H], fp32 accumulator (cuBLAS fp32 epilogue when offered)

Gradient in forward. The upstream gradient g_t = dL/dlogp_t only arrives in backward, but dlogits is linear in it:
grad_hidden_t = g_t * (D_t @ W) is separable per token, so the forward stores D @ W exactly. grad_weight =
sum_t g_t D_t^T h_t is not separable; the forward stores sum_t D_t^T h_t, which is exact when g_t is the same on
every non-ignored token -- the SFT case (sum or mean of log-probs). Backward checks that (one scalar sync): if it
holds, grads cost two scalings; otherwise (weighted tokens, entropy gradient, a second backward) it recomputes the
chunk logits and the grad_weight GEMM. So the common case costs 3 GEMMs of 2*T*V*H FLOP (the floor) instead of 4,
at the price of an fp32 [V, H] buffer held from forward to backward.

Chunk size. The buffer is C*V*2 bytes in bf16; the fp32 grad_weight accumulator is read and written once per chunk
(8*V*H bytes), so fewer chunks mean less traffic but more memory. The default, 2048 tokens for 2-byte dtypes and
1024 for 4-byte (about 0.6 GB at V=151936), keeps the GEMM M dimension large enough for full cuBLAS rate and the
accumulator traffic at about a third of the grad_weight GEMM time (arithmetic intensity 2C/8 FLOP/B = 512 vs the
H100 ridge of ~260). Not yet measured on a GPU (bench/bench_logprob.py sweeps it).

Entropy (`return_entropy=True`) is differentiable: dH/dz_k = -p_k (log p_k + H) / temperature, taken by the
recompute path. Ignored tokens (target == ignore_index) get logp 0, entropy 0 and zero gradient.

Fallback: when Triton cannot run (CPU without TRITON_INTERPRET=1, or no triton installed) the same chunked loop runs
with a plain-torch row pass, so memory stays bounded; it is slower but gives the same numbers.
"""

import torch

from kernels._utils import HAS_TRITON, addmm_acc_, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

IGNORE_INDEX = -100


def default_chunk_size(num_tokens: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: 2048 for 2-byte dtypes, 1024 for 4-byte, 512 for 8-byte; never more than needed."""
    chunk = 4096 // torch.empty((), dtype=dtype).element_size()
    return max(1, min(chunk, num_tokens))


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: materializes logits [T, V] in fp32 (fp64 for fp64 inputs). What the tests compare against."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden @ weight.t()).to(acc) / temperature  # [..., V]
    logprobs = logits.log_softmax(-1)
    active = targets != ignore_index
    safe = torch.where(active, targets, 0)
    logp = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(active, logp, 0.0)
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, torch.where(active, entropy, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Row pass: Triton kernel and its plain-torch twin (the fallback)
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _logprob_rows_kernel(
        logits_ptr,  # [C, V] chunk logits, rows `stride_row` apart; overwritten with dlogits when GRAD
        stride_row,
        targets_ptr,  # [C] int64
        lse_ptr,  # [C] ACC: written when STATS, read otherwise
        logp_ptr,  # [C] ACC: written when STATS
        ent_ptr,  # [C] ACC: written when STATS and ENTROPY, read when ENTROPY_GRAD and not STATS
        g_ptr,  # [C] upstream dL/dlogp, read when GRAD
        ge_ptr,  # [C] upstream dL/dentropy, read when ENTROPY_GRAD
        V,
        inv_temp,
        ignore_index,
        STATS: tl.constexpr,
        ENTROPY: tl.constexpr,
        GRAD: tl.constexpr,
        ENTROPY_GRAD: tl.constexpr,
        ACC: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs (gradcheck)
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row)
        active = target != ignore_index
        target = tl.where(active, target, 0)
        cols = tl.arange(0, BLOCK_V)

        if STATS:
            # Online logsumexp over z = logits / T. The first block is peeled so the running max starts finite
            # (column 0 always exists) and every loop-carried value has the dtype of a reduction.
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(ACC) * inv_temp
            m = tl.max(z, 0)
            e = tl.exp(z - m)
            s = tl.sum(e, 0)
            if ENTROPY:
                t = tl.sum(e * tl.where(mask, z, 0.0), 0)  # sum exp(z - m) * z, without 0 * -inf
            for start in range(BLOCK_V, V, BLOCK_V):
                c = start + cols
                mask = c < V
                z = tl.load(row_ptr + c, mask=mask, other=float("-inf")).to(ACC) * inv_temp
                m_new = tl.maximum(m, tl.max(z, 0))
                scale = tl.exp(m - m_new)
                e = tl.exp(z - m_new)
                s = s * scale + tl.sum(e, 0)
                if ENTROPY:
                    t = t * scale + tl.sum(e * tl.where(mask, z, 0.0), 0)
                m = m_new
            lse = m + tl.log(s)
            z_target = tl.load(row_ptr + target).to(ACC) * inv_temp
            tl.store(lse_ptr + row, lse)
            tl.store(logp_ptr + row, tl.where(active, z_target - lse, 0.0))
            if ENTROPY:
                ent = lse - t / s  # H = lse - sum_k p_k z_k
                tl.store(ent_ptr + row, tl.where(active, ent, 0.0))
        else:
            lse = tl.load(lse_ptr + row)
            if ENTROPY_GRAD:
                ent = tl.load(ent_ptr + row)

        if GRAD:
            g = tl.where(active, tl.load(g_ptr + row).to(ACC), 0.0)
            if ENTROPY_GRAD:
                ge = tl.where(active, tl.load(ge_ptr + row).to(ACC), 0.0)
            for start in range(0, V, BLOCK_V):
                c = start + cols
                mask = c < V
                z = tl.load(row_ptr + c, mask=mask, other=0.0).to(ACC) * inv_temp
                p = tl.exp(z - lse)
                d = g * (tl.where(c == target, 1.0, 0.0) - p)
                if ENTROPY_GRAD:
                    d -= ge * p * (z - lse + ent)  # dH/dz_k = -p_k (log p_k + H)
                tl.store(row_ptr + c, (d * inv_temp).to(logits_ptr.dtype.element_ty), mask=mask)


def _rows_torch(logits, targets, lse, logp, ent, g, ge, inv_temp, ignore_index, stats, grad, entropy_grad):
    """The row pass in plain torch, on one chunk (an fp32 [C, V] temporary): the fallback without Triton."""
    z = logits.to(lse.dtype) * inv_temp
    active = targets != ignore_index
    target = torch.where(active, targets, 0).unsqueeze(1)
    if stats:
        lse.copy_(torch.logsumexp(z, -1))
        logp.copy_(torch.where(active, z.gather(1, target).squeeze(1) - lse, 0.0))
        if ent is not None:
            p = torch.exp(z - lse.unsqueeze(1))
            ent.copy_(torch.where(active, lse - (p * z).sum(-1), 0.0))
    if grad:
        p = torch.exp(z - lse.unsqueeze(1))
        gg = torch.where(active, g.to(z.dtype), 0.0).unsqueeze(1)
        d = (-p * gg).scatter_add_(1, target, gg)
        if entropy_grad:
            ge_ = torch.where(active, ge.to(z.dtype), 0.0).unsqueeze(1)
            d -= ge_ * p * (z - lse.unsqueeze(1) + ent.unsqueeze(1))
        logits.copy_(d * inv_temp)


def _rows(logits, targets, lse, logp, ent, g, ge, inv_temp, ignore_index, *, stats, grad, entropy_grad=False):
    """One pass over the rows of a chunk's logits [C, V]: stats (lse, logp, entropy) and/or dlogits in place."""
    if not use_triton(logits):
        _rows_torch(logits, targets, lse, logp, ent, g, ge, inv_temp, ignore_index, stats, grad, entropy_grad)
        return
    n, V = logits.shape
    block_v = min(4096, triton.next_power_of_2(V))
    dummy = lse  # unused pointers still need a tensor
    _logprob_rows_kernel[(n,)](
        logits, logits.stride(0), targets, lse,
        logp if logp is not None else dummy, ent if ent is not None else dummy,
        g if g is not None else dummy, ge if ge is not None else dummy,
        V, inv_temp, ignore_index,
        STATS=stats, ENTROPY=ent is not None and stats, GRAD=grad, ENTROPY_GRAD=entropy_grad,
        ACC=tl.float64 if lse.dtype == torch.float64 else tl.float32,
        BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Chunked drivers
# ----------------------------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def logprob_forward(
    hidden: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [T] int64, contiguous
    inv_temp: float,
    chunk: int,
    ignore_index: int,
    *,
    entropy: bool,
    grad_hidden: bool,
    grad_weight: bool,
):
    """logp [T], lse [T], entropy [T] or None; plus D @ W [T, H] and sum D^T h [V, H] (D = dlogits for g = 1)
    when asked. The chunk loop shared by the autograd Function and the no-grad path."""
    T, H = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    lse = torch.empty(T, dtype=acc, device=dev)
    logp = torch.empty(T, dtype=acc, device=dev)
    ent = torch.empty(T, dtype=acc, device=dev) if entropy else None
    grad = grad_hidden or grad_weight
    gh = torch.empty(T, H, dtype=hidden.dtype, device=dev) if grad_hidden else None
    gw = torch.empty(V, H, dtype=acc, device=dev) if grad_weight else None
    ones = torch.ones(min(chunk, T), dtype=acc, device=dev) if grad else None
    buf = torch.empty(min(chunk, T), V, dtype=hidden.dtype, device=dev)
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        logits = buf[: e - s]
        torch.mm(hidden[s:e], weight.t(), out=logits)
        _rows(
            logits, targets[s:e], lse[s:e], logp[s:e], None if ent is None else ent[s:e],
            None if ones is None else ones[: e - s], None, inv_temp, ignore_index, stats=True, grad=grad,
        )  # fmt: skip
        if grad_hidden:
            torch.mm(logits, weight, out=gh[s:e])
        if grad_weight:
            addmm_acc_(gw, logits.t(), hidden[s:e], first=s == 0)
    return logp, lse, ent, gh, gw


def logprob_backward(
    hidden: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [T]
    lse: torch.Tensor,  # [T] from the forward
    ent: torch.Tensor | None,  # [T] from the forward, needed when g_ent is given
    g: torch.Tensor | None,  # [T] dL/dlogp
    g_ent: torch.Tensor | None,  # [T] dL/dentropy
    inv_temp: float,
    chunk: int,
    ignore_index: int,
    *,
    grad_hidden: bool,
    grad_weight: bool,
):
    """Recompute the chunk logits and return (grad_hidden [T, H] or None, grad_weight [V, H] in fp32 or None)."""
    T, H = hidden.shape
    V = weight.shape[0]
    acc = lse.dtype
    dev = hidden.device
    if g is None:
        g = torch.zeros(T, dtype=acc, device=dev)
    g = g.to(acc).contiguous()
    g_ent = None if g_ent is None else g_ent.to(acc).contiguous()
    gh = torch.empty(T, H, dtype=hidden.dtype, device=dev) if grad_hidden else None
    gw = torch.empty(V, H, dtype=acc, device=dev) if grad_weight else None
    buf = torch.empty(min(chunk, T), V, dtype=hidden.dtype, device=dev)
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        logits = buf[: e - s]
        torch.mm(hidden[s:e], weight.t(), out=logits)
        _rows(
            logits, targets[s:e], lse[s:e], None, None if ent is None else ent[s:e], g[s:e],
            None if g_ent is None else g_ent[s:e], inv_temp, ignore_index,
            stats=False, grad=True, entropy_grad=g_ent is not None,
        )  # fmt: skip
        if grad_hidden:
            torch.mm(logits, weight, out=gh[s:e])
        if grad_weight:
            addmm_acc_(gw, logits.t(), hidden[s:e], first=s == 0)
    return gh, gw


def uniform_value(g: torch.Tensor, active: torch.Tensor) -> torch.Tensor | None:
    """The common value of g over the active tokens as a 0-d tensor, or None when they differ (one host sync).
    With no active token every value will do; 0 is returned."""
    hi = torch.where(active, g, float("-inf")).amax()
    lo = torch.where(active, g, float("inf")).amin()
    if bool(hi > lo):
        return None
    return torch.where(hi < lo, 0.0, hi)


class _LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, chunk, ignore_index, return_entropy):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        logp, lse, ent, gh, gw = logprob_forward(
            hidden, weight, targets, inv_temp, chunk, ignore_index,
            entropy=return_entropy, grad_hidden=need_h, grad_weight=need_w,
        )  # fmt: skip
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.gh, ctx.gw = gh, gw  # precomputed for g = 1; consumed by the first backward
        ctx.args = (inv_temp, chunk, ignore_index)
        ctx.set_materialize_grads(False)
        if return_entropy:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        inv_temp, chunk, ignore_index = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh, gw = ctx.gh, ctx.gw
        ctx.gh = ctx.gw = None  # scaled in place below, so a second backward (retain_graph) must recompute
        grad_h = grad_w = None
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None, None
        if g_ent is None:  # precomputed D @ W and D^T h apply: scale them
            if need_h and gh is not None:
                grad_h = gh.mul_(g_logp.unsqueeze(1))
                need_h = False
            if need_w and gw is not None:
                c = uniform_value(g_logp, targets != ignore_index)
                if c is not None:
                    grad_w = gw.mul_(c).to(weight.dtype)
                    need_w = False
            del gh, gw
        if need_h or need_w:
            rh, rw = logprob_backward(
                hidden, weight, targets, lse, ent, g_logp, g_ent, inv_temp, chunk, ignore_index,
                grad_hidden=need_h, grad_weight=need_w,
            )  # fmt: skip
            grad_h = rh if need_h else grad_h
            grad_w = rw.to(weight.dtype) if need_w else grad_w
        return grad_h, grad_w, None, None, None, None, None


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, where: str) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{where}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match; "
            "expected hidden [..., H] and weight [V, H] (the lm-head weight, not its transpose)"
        )
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"{where}: targets {tuple(targets.shape)} must be hidden's leading shape {tuple(hidden.shape[:-1])}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{where}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one to the other")
    if targets.dtype.is_floating_point:
        raise TypeError(f"{where}: targets must be integer token ids, got {targets.dtype}")


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight.T / temperature)[target] for every token, without the [T, V] logits.

    hidden: [T, H] (or [..., H]), weight: [V, H], targets: [T] (or [...]) token ids in [0, V) or ignore_index.
    Returns logp [T] float32 (float64 for float64 inputs), and entropy [T] when return_entropy. Ignored tokens
    get 0. Differentiable in hidden and weight; cheapest when the caller reduces logp with one weight for all
    tokens (sum / mean), see the module docstring. Under no_grad (or with inputs that need no grad) only the
    forward GEMM runs.
    """
    check_inputs(hidden, weight, targets, "linear_logprob")
    if temperature <= 0:
        raise ValueError(f"linear_logprob: temperature must be > 0, got {temperature}")
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(torch.int64).contiguous()
    T = h.shape[0]
    chunk = chunk_size or default_chunk_size(T, hidden.dtype)
    inv_temp = 1.0 / temperature
    if T == 0:
        out = h.new_zeros(0, dtype=_acc_dtype(hidden.dtype)).reshape(lead)
        return (out, out.clone()) if return_entropy else out
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        out = _LinearLogprob.apply(h, weight, t, inv_temp, chunk, ignore_index, return_entropy)
    else:
        logp, _, ent, _, _ = logprob_forward(
            h, weight, t, inv_temp, chunk, ignore_index, entropy=return_entropy, grad_hidden=False, grad_weight=False
        )
        out = (logp, ent) if return_entropy else logp
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)
