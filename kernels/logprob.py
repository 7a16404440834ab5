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

Row pass. One program per token streams its logits row in blocks of 4096 and keeps, per lane, a running maximum and
sum (and sum p*z for entropy) with one exp per element; the lanes are reduced once after the loop, so no
block-wide reduction (and no barrier) sits inside it. The buffer's rows are padded to a multiple of 16 elements
(151937 -> 151952; GEMMs write it with ld = the padded stride) and the kernel loads and stores the padding too,
masking values rather than addresses, so row starts, strides and loop bounds stay divisible by 16 and Triton
keeps 16-byte vector loads and stores at any vocabulary size (`python -m posttrain.bench.aot` shows the widths).

Targets. An id that is neither ignore_index nor in [0, V) never reads outside its row: the kernel reads column 0
instead, writes NaN as that token's log-prob and gradient row (so an unchecked result is loud, never plausible),
and sets a one-element device flag. The flag is read where the call pays for a host sync anyway, and then a
ValueError names the first bad id, its position and V (the plain-torch fallback does the same, same message):
on CPU at once; on CUDA with gradients in backward, in the same device-to-host read as the uniform-gradient check
(so the SFT step pays no extra sync); on CUDA without gradients at the end of the call (one 4-byte read).

Entropy (`return_entropy=True`) is differentiable: dH/dz_k = -p_k (log p_k + H) / temperature, taken by the
recompute path. Ignored tokens (target == ignore_index) get logp 0, entropy 0 and zero gradient.

Fallback: when Triton cannot run (CPU without TRITON_INTERPRET=1, or no triton installed) the same chunked loop runs
with a plain-torch row pass, so memory stays bounded; it is slower but gives the same numbers.
"""

import torch

from posttrain.kernels._utils import HAS_TRITON, addmm_acc_, use_triton

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
        bad_ptr,  # [1] int32: set to 1 when a target is neither ignore_index nor in [0, V)
        V,
        V_LOAD,  # columns loaded and stored: V rounded up to 16 when the row stride leaves room (vector access)
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
        in_range = (target >= 0) & (target < V)
        bad = active & ((target < 0) | (target >= V))
        tl.store(bad_ptr, 1, mask=bad)  # racing writers all write 1
        target = tl.where(in_range, target, 0)  # a bad id never reads outside its row
        cols = tl.arange(0, BLOCK_V)

        if STATS:
            # Online logsumexp over z = logits / T, kept per lane and reduced once after the loop (no block-wide
            # reduction, so no barrier, inside it). One exp per element: exp(-|z - m|) is exp(z - m) when z is
            # not a new maximum of its lane, and the rescale exp(m - z) of the lane's sums when it is.
            m = tl.full([BLOCK_V], float("-inf"), ACC)
            s = tl.zeros([BLOCK_V], ACC)
            if ENTROPY:
                t = tl.zeros([BLOCK_V], ACC)  # sum exp(z - m) * z per lane
            for start in range(0, V_LOAD, BLOCK_V):
                c = start + cols
                live = c < V  # columns V..V_LOAD are row padding and hold anything
                z = tl.where(live, tl.load(row_ptr + c, mask=c < V_LOAD, other=0.0), 0.0).to(ACC) * inv_temp
                d = z - m  # +inf on a lane's first value (m = -inf): e = 0 and s becomes 1
                e = tl.where(live, tl.exp(-tl.abs(d)), 0.0)
                new_max = live & (d > 0)
                s = tl.where(new_max, s * e + 1.0, s + e)
                if ENTROPY:
                    t = tl.where(new_max, t * e + z, t + e * z)
                m = tl.where(new_max, z, m)
            m_row = tl.max(m, 0)
            rescale = tl.exp(m - m_row)  # 0 on lanes that never saw a column (their s and t are 0)
            s_row = tl.sum(s * rescale, 0)
            lse = m_row + tl.log(s_row)
            z_target = tl.load(row_ptr + target).to(ACC) * inv_temp
            tl.store(lse_ptr + row, lse)
            logp = tl.where(bad, float("nan"), z_target - lse)
            tl.store(logp_ptr + row, tl.where(active, logp, 0.0))
            if ENTROPY:
                ent = lse - tl.sum(t * rescale, 0) / s_row  # H = lse - sum_k p_k z_k
                tl.store(ent_ptr + row, tl.where(active, ent, 0.0))
        else:
            lse = tl.load(lse_ptr + row)
            if ENTROPY_GRAD:
                ent = tl.load(ent_ptr + row)

        if GRAD:
            g = tl.where(active, tl.load(g_ptr + row).to(ACC), 0.0)
            g = tl.where(bad, float("nan"), g)  # a bad row's gradient is NaN, never a silently wrong number
            if ENTROPY_GRAD:
                ge = tl.where(active, tl.load(ge_ptr + row).to(ACC), 0.0)
            for start in range(0, V_LOAD, BLOCK_V):
                c = start + cols
                mask = c < V_LOAD  # padding columns get (finite, unused) values too: no GEMM reads them
                z = tl.where(c < V, tl.load(row_ptr + c, mask=mask, other=0.0), 0.0).to(ACC) * inv_temp
                p = tl.exp(z - lse)
                d = g * (tl.where(c == target, 1.0, 0.0) - p)
                if ENTROPY_GRAD:
                    d -= ge * p * (z - lse + ent)  # dH/dz_k = -p_k (log p_k + H)
                tl.store(row_ptr + c, (d * inv_temp).to(logits_ptr.dtype.element_ty), mask=mask)


def _rows_torch(logits, targets, lse, logp, ent, g, ge, bad, inv_temp, ignore_index, stats, grad, entropy_grad):
    """The row pass in plain torch, on one chunk (an fp32 [C, V] temporary): the fallback without Triton.
    Same contract as the kernel, bad targets included (NaN log-prob and gradient row, `bad` set)."""
    V = logits.shape[1]
    z = logits.to(lse.dtype) * inv_temp
    active = targets != ignore_index
    in_range = (targets >= 0) & (targets < V)
    is_bad = active & ~in_range
    bad |= is_bad.any()
    target = torch.where(in_range, targets, 0).unsqueeze(1)
    if stats:
        lse.copy_(torch.logsumexp(z, -1))
        logp_ = torch.where(is_bad, float("nan"), z.gather(1, target).squeeze(1) - lse)
        logp.copy_(torch.where(active, logp_, 0.0))
        if ent is not None:
            p = torch.exp(z - lse.unsqueeze(1))
            ent.copy_(torch.where(active, lse - (p * z).sum(-1), 0.0))
    if grad:
        p = torch.exp(z - lse.unsqueeze(1))
        gg = torch.where(is_bad, float("nan"), torch.where(active, g.to(z.dtype), 0.0)).unsqueeze(1)
        d = (-p * gg).scatter_add_(1, target, gg)
        if entropy_grad:
            ge_ = torch.where(active, ge.to(z.dtype), 0.0).unsqueeze(1)
            d -= ge_ * p * (z - lse.unsqueeze(1) + ent.unsqueeze(1))
        logits.copy_(d * inv_temp)


VECTOR = 16  # elements: row strides and loop bounds divisible by 16 let Triton emit 16-byte loads and stores


def padded_width(V: int) -> int:
    """Row stride of a logits buffer of V columns: V rounded up to a multiple of 16 elements, so that every row
    starts 16-byte aligned and the row pass keeps vector loads at any vocabulary size (151937 gives 151952)."""
    return -(-V // VECTOR) * VECTOR


def logits_buffer(rows: int, V: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised [rows, V] buffer whose rows are padded_width(V) apart (GEMMs write it through ld = stride)."""
    return torch.empty(rows, padded_width(V), dtype=dtype, device=device)[:, :V]


def _load_width(logits: torch.Tensor) -> int:
    """Columns the kernel may load and store: the padded width when every row, the last included, owns it."""
    n, V = logits.shape
    wide = padded_width(V)
    if wide == V or logits.stride(1) != 1 or logits.stride(0) < wide:
        return V
    end = logits.storage_offset() + (n - 1) * logits.stride(0) + wide
    return wide if end * logits.element_size() <= logits.untyped_storage().nbytes() else V


def _rows(logits, targets, lse, logp, ent, g, ge, bad, inv_temp, ignore_index, *, stats, grad, entropy_grad=False):
    """One pass over the rows of a chunk's logits [C, V]: stats (lse, logp, entropy) and/or dlogits in place.
    `bad` ([1] int32) is set when a target is neither ignore_index nor in [0, V); see check_targets."""
    if not use_triton(logits):
        _rows_torch(logits, targets, lse, logp, ent, g, ge, bad, inv_temp, ignore_index, stats, grad, entropy_grad)
        return
    n, V = logits.shape
    block_v = min(4096, triton.next_power_of_2(V))
    dummy = lse  # unused pointers still need a tensor
    _logprob_rows_kernel[(n,)](
        logits, logits.stride(0), targets, lse,
        logp if logp is not None else dummy, ent if ent is not None else dummy,
        g if g is not None else dummy, ge if ge is not None else dummy, bad,
        V, _load_width(logits), inv_temp, ignore_index,
        STATS=stats, ENTROPY=ent is not None and stats, GRAD=grad, ENTROPY_GRAD=entropy_grad,
        ACC=tl.float64 if lse.dtype == torch.float64 else tl.float32,
        BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )  # fmt: skip


def new_bad_flag(device: torch.device) -> torch.Tensor:
    """The [1] int32 flag a row pass sets on an out-of-range target (one per call, shared by its chunks)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def check_targets(bad: torch.Tensor, flagged: bool | None, targets: torch.Tensor, V: int, ignore_index: int,
                  where: str) -> None:
    """Raise ValueError naming the first out-of-range target id, where it is, and V, if the row pass flagged one.

    `flagged`: the flag's value when the caller already read it (in the same transfer as another scalar);
    None reads it here, one host sync on CUDA. Meta tensors (bench.aot) carry no values and are not checked.
    """
    if bad.is_meta:
        return
    if flagged is None:
        flagged = bool(bad.item())
    if not flagged:
        return
    wrong = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    flat = wrong.reshape(-1).nonzero()
    first = int(flat[0])
    where_in = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), targets.shape))
    raise ValueError(
        f"{where}: target id {int(targets.reshape(-1)[first])} at targets{list(where_in)} is out of range for a "
        f"vocabulary of V={V} ({len(flat)} such token(s)); ids must be in [0, {V}) or equal ignore_index="
        f"{ignore_index}"
    )


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
    bad: torch.Tensor,  # [1] int32 flag, see check_targets
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
    buf = logits_buffer(min(chunk, T), V, hidden.dtype, dev)
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        logits = buf[: e - s]
        torch.mm(hidden[s:e], weight.t(), out=logits)
        _rows(
            logits, targets[s:e], lse[s:e], logp[s:e], None if ent is None else ent[s:e],
            None if ones is None else ones[: e - s], None, bad, inv_temp, ignore_index, stats=True, grad=grad,
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
    buf = logits_buffer(min(chunk, T), V, hidden.dtype, dev)
    bad = new_bad_flag(dev)  # the forward already checked the targets
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        logits = buf[: e - s]
        torch.mm(hidden[s:e], weight.t(), out=logits)
        _rows(
            logits, targets[s:e], lse[s:e], None, None if ent is None else ent[s:e], g[s:e],
            None if g_ent is None else g_ent[s:e], bad, inv_temp, ignore_index,
            stats=False, grad=True, entropy_grad=g_ent is not None,
        )  # fmt: skip
        if grad_hidden:
            torch.mm(logits, weight, out=gh[s:e])
        if grad_weight:
            addmm_acc_(gw, logits.t(), hidden[s:e], first=s == 0)
    return gh, gw


def uniform_value(g: torch.Tensor, active: torch.Tensor, bad: torch.Tensor | None = None):
    """(c, flagged): c is the common value of g over the active tokens as a 0-d tensor, or None when they differ;
    with no active token every value will do and 0 is returned. `flagged` is the value of the [1] flag `bad`
    (False without one), read in the same device-to-host transfer: one host sync for both."""
    hi = torch.where(active, g, float("-inf")).amax()
    lo = torch.where(active, g, float("inf")).amin()
    flag = torch.zeros((), dtype=g.dtype, device=g.device) if bad is None else bad[0].to(g.dtype)
    differ, flagged = torch.stack([(hi > lo).to(g.dtype), flag]).tolist()
    if differ:
        return None, bool(flagged)
    return torch.where(hi < lo, 0.0, hi), bool(flagged)


def scale_cast(acc: torch.Tensor, c: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """acc * c in `dtype`, in one pass: reads the fp32 accumulator once and writes the cast result (6 bytes per
    element for bf16, where acc.mul_(c).to(bf16) moves 4 + 4 + 4 + 2). In place when no cast is needed."""
    if dtype == acc.dtype:
        return acc.mul_(c)
    return torch.mul(acc, c, out=torch.empty(acc.shape, dtype=dtype, device=acc.device))


class _LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bad, inv_temp, chunk, ignore_index, return_entropy, lead):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        logp, lse, ent, gh, gw = logprob_forward(
            hidden, weight, targets, inv_temp, chunk, ignore_index, bad,
            entropy=return_entropy, grad_hidden=need_h, grad_weight=need_w,
        )  # fmt: skip
        ctx.bad = bad if hidden.is_cuda else None  # CUDA: checked by backward (see linear_logprob)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.gh, ctx.gw = gh, gw  # precomputed for g = 1; consumed by the first backward
        ctx.args = (inv_temp, chunk, ignore_index, lead)
        ctx.set_materialize_grads(False)
        if return_entropy:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        inv_temp, chunk, ignore_index, lead = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh, gw, bad = ctx.gh, ctx.gw, ctx.bad
        ctx.gh = ctx.gw = ctx.bad = None  # scaled in place below, so a second backward (retain_graph) must recompute
        grad_h = grad_w = None
        flagged = None
        nones = (None,) * 7
        if g_logp is None and g_ent is None:
            return None, None, *nones
        if g_ent is None:  # precomputed D @ W and D^T h apply: scale them
            if need_w and gw is not None:
                c, flagged = uniform_value(g_logp, targets != ignore_index, bad)
                if c is not None and not flagged:
                    grad_w = scale_cast(gw, c, weight.dtype)
                    need_w = False
            if need_h and gh is not None:
                grad_h = gh.mul_(g_logp.unsqueeze(1))
                need_h = False
            del gh, gw
        if bad is not None:
            check_targets(bad, flagged, targets.view(lead), weight.shape[0], ignore_index, "linear_logprob")
        if need_h or need_w:
            rh, rw = logprob_backward(
                hidden, weight, targets, lse, ent, g_logp, g_ent, inv_temp, chunk, ignore_index,
                grad_hidden=need_h, grad_weight=need_w,
            )  # fmt: skip
            grad_h = rh if need_h else grad_h
            grad_w = rw.to(weight.dtype) if need_w else grad_w
        return grad_h, grad_w, *nones


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, where: str) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{where}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match; "
            "expected hidden [..., H] and weight [V, H] (the lm-head weight, not its transpose)"
        )
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"{where}: targets {tuple(targets.shape)} must be hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
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
    get 0; a target outside [0, V) raises ValueError (on CUDA with gradients: in backward, see the module
    docstring). Differentiable in hidden and weight; cheapest when the caller reduces logp with one weight for all
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
    bad = new_bad_flag(h.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        out = _LinearLogprob.apply(h, weight, t, bad, inv_temp, chunk, ignore_index, return_entropy, lead)
        deferred = h.is_cuda  # the backward's host read covers the flag
    else:
        logp, _, ent, _, _ = logprob_forward(
            h, weight, t, inv_temp, chunk, ignore_index, bad, entropy=return_entropy, grad_hidden=False,
            grad_weight=False,
        )  # fmt: skip
        out = (logp, ent) if return_entropy else logp
        deferred = False
    if not deferred:
        check_targets(bad, None, t.view(lead), weight.shape[0], ignore_index, "linear_logprob")
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)
