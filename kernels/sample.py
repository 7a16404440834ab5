"""Sampling one token per logits row: temperature, top-k, top-p, min-p, the draw and its log-probs.

For: the sampler's decode step (core/sampler.py), which hands over the lm-head's logits rows [B, V] in the model's
dtype and one uniform per row. Not for: training log-probs (kernels/logprob.py never builds logits), beam search.

Two implementations with one contract, `sample(logits, params, u) -> tokens [B], logprobs [B], raw_logprobs [B]`:

- `sample_reference`: plain torch on fp32 logits; the definition. Filters as masks on the logits in the order
  transformers applies them (top-k, top-p, min-p), then an inverse-CDF draw in vocabulary order:
  token = the first index whose cumulative filtered probability exceeds u * total. It serves CPU without the
  interpreter (tiny vocabularies, where sorting is cheap) and is what the tests compare the kernel with.
- `fused_sample`: one Triton program per row that reads the row a few times and never sorts or writes [B, V]:
    pass 1   max, min, and the online logsumexp at temperature 1 and at the sampling temperature;
    top-k    the k-th largest value by bisection on the order-preserving integer key of the values (a bf16 row
             has 2**16 distinct keys, so at most 17 counting passes; fp32 at most 33), stopping early as soon as
             exactly k values lie at or above the probe;
    top-p    the smallest kept value v whose strictly-larger mass is < top_p: bisection on the same keys, each
             probe one pass summing exp over the row;
    min-p    elementwise (p >= min_p * p_max is exp(y - y_max) >= min_p), no search;
    draw     blocks in vocabulary order until the cumulative mass passes u * total (one pass at most, half on
             average), then the in-block prefix sum finds the token.
  Keys come from the raw logits, so temperature (a monotone map) never changes which values a threshold keeps.
  The plain temperature-1 or temperature-only case is pass 1 plus the draw.

Filter semantics (both implementations): ties at a threshold are kept; top-p keeps a token when the filtered mass
strictly above it is < top_p, measured over every token top-k kept (ties at the k-th value included); the maximum
always survives every filter, so the filtered distribution is never empty. The two agree token for token for the
same uniforms except when u * total falls within float rounding of a CDF boundary (the sums run in a different
order), and log-probs agree to ~1e-6.
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.kernels._utils import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl


def _is_plain(params: Any) -> bool:
    return params.temperature == 1.0 and params.top_k == 0 and params.top_p == 1.0 and params.min_p == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, params: Any) -> torch.Tensor:
    """logits [B, V] fp32 -> scores [B, V]: / temperature, then -inf outside top-k, top-p and min-p (in that order).

    params: anything with temperature, top_k, top_p, min_p (core.sampler.SamplingParams).
    """
    scores = logits / params.temperature
    V = scores.shape[-1]
    if 0 < params.top_k < V:
        kth = scores.topk(params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered = scores.sort(dim=-1, descending=True).values  # masked entries sort last with probability 0
        probs = ordered.softmax(-1)
        above = probs.cumsum(-1) - probs  # mass strictly above each token
        n_keep = (above < params.top_p).sum(-1, keepdim=True).clamp_(min=1)
        scores = scores.masked_fill(scores < ordered.gather(-1, n_keep - 1), float("-inf"))
    if params.min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return scores


def sample_reference(logits: torch.Tensor, params: Any, u: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype; computed in fp32), u [B] uniforms in (0, 1) (unused when greedy)
    -> tokens [B] int64, logprobs [B] fp32 (0 for greedy), raw_logprobs [B] fp32. No host syncs."""
    logits = logits.float()
    raw_lse = logits.logsumexp(-1)
    if params.temperature == 0.0:  # greedy: the first maximum, a point mass
        tokens = logits.argmax(-1)
        logprobs = torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    else:
        plain = _is_plain(params)
        scores = logits if plain else filter_logits(logits, params)
        lse = raw_lse if plain else scores.logsumexp(-1)
        cdf = (scores - lse[:, None]).exp_().cumsum_(-1)  # [B, V]; in place: one [B, V] temporary
        total = cdf[:, -1:]
        # x < total strictly, so the first index with cdf > x always has probability > 0.
        x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cdf, x, right=True).clamp_(max=logits.shape[-1] - 1)[:, 0]
        logprobs = scores.gather(-1, tokens[:, None])[:, 0] - lse
    raw = logits.gather(-1, tokens[:, None])[:, 0] - raw_lse
    return tokens, logprobs, raw


# ----------------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------------

# Low bits of the fp32 pattern that are always zero for a row of this dtype: bisection skips them.
_KEY_SHIFT = {torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}

if HAS_TRITON:

    @triton.jit
    def _key(x, SHIFT: tl.constexpr):
        """fp32 -> int64, order-preserving (-0.0 counts as +0.0, as a float comparison does)."""
        x = tl.where(x == 0.0, 0.0, x)
        b = x.to(tl.int32, bitcast=True)
        b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)  # negative floats: larger magnitude -> smaller integer
        return (b >> SHIFT).to(tl.int64)

    @triton.jit
    def _count_ge(base, V, t, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        n = tl.zeros((), dtype=tl.int64)
        for start in range(0, V, BLOCK):
            inb = start + offs < V
            x = tl.load(base + start + offs, mask=inb, other=0.0).to(tl.float32)
            n += tl.sum(((_key(x, SHIFT) >= t) & inb).to(tl.int64), 0)
        return n

    @triton.jit
    def _mass_gt(base, V, t, m_y, temperature, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        """sum of exp(x / temperature - m_y) over the row's values whose key is > t."""
        offs = tl.arange(0, BLOCK)
        s = tl.zeros((), dtype=tl.float32)
        for start in range(0, V, BLOCK):
            inb = start + offs < V
            x = tl.load(base + start + offs, mask=inb, other=0.0).to(tl.float32)
            e = tl.exp(tl.div_rn(x, temperature) - m_y)
            s += tl.sum(tl.where((_key(x, SHIFT) > t) & inb, e, 0.0), 0)
        return s

    @triton.jit
    def _kept_weights(x, inb, thr, m_y, temperature, min_p, MIN_P: tl.constexpr, SHIFT: tl.constexpr):
        """Unnormalised filtered probabilities exp(y - m_y) of a block, 0 outside the filters."""
        e = tl.exp(tl.div_rn(x, temperature) - m_y)
        keep = inb & (_key(x, SHIFT) >= thr)
        if MIN_P:
            keep = keep & (e >= min_p)
        return tl.where(keep, e, 0.0)

    @triton.jit
    def _sample_kernel(logits_ptr, stride, u_ptr, u_stride, tok_ptr, lp_ptr, raw_ptr, out_stride, V, temperature,
                       top_k, top_p, min_p, step_ptr, cur_ptr, pos_ptr, done_ptr, stop_ptr, n_stop, T,
                       GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr,
                       RECORD: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.zeros((), dtype=tl.int64)  # RECORD: the row's step, its output column and uniform
        if RECORD:
            col = tl.load(step_ptr + row).to(tl.int64)
        base = logits_ptr + row * stride
        offs = tl.arange(0, BLOCK)

        # Pass 1: max (and its first index), min, logsumexp at temperature 1 and at `temperature`, online.
        m = tl.full((), float("-inf"), tl.float32)
        lo_x = tl.full((), float("inf"), tl.float32)
        s = tl.zeros((), dtype=tl.float32)
        s_y = tl.zeros((), dtype=tl.float32)
        arg = tl.zeros((), dtype=tl.int64)
        for start in range(0, V, BLOCK):
            inb = start + offs < V
            x = tl.load(base + start + offs, mask=inb, other=float("-inf")).to(tl.float32)
            bm = tl.max(x, 0)
            if bm > m:  # strictly: an earlier block keeps a tie, so the argmax is the first maximum
                arg = start + tl.argmax(x, 0).to(tl.int64)
            new_m = tl.maximum(m, bm)
            live = x > float("-inf")  # -inf logits (and padding lanes) weigh 0, even while the max is still -inf
            first = m == float("-inf")
            s = tl.where(first, 0.0, s * tl.exp(m - new_m)) + tl.sum(tl.where(live, tl.exp(x - new_m), 0.0), 0)
            if not GREEDY:
                new_m_y = tl.div_rn(new_m, temperature)
                s_y = tl.where(first, 0.0, s_y * tl.exp(tl.div_rn(m, temperature) - new_m_y)) + \
                    tl.sum(tl.where(live, tl.exp(tl.div_rn(x, temperature) - new_m_y), 0.0), 0)
            m = new_m
            lo_x = tl.minimum(lo_x, tl.min(tl.where(inb, x, float("inf")), 0))
        raw_lse = m + tl.log(s)

        if GREEDY:
            tok = arg
            lp = tl.zeros((), dtype=tl.float32)
            x_tok = m
        else:
            m_y = tl.div_rn(m, temperature)
            hi_key = _key(m, SHIFT)
            thr = _key(lo_x, SHIFT)  # keep everything
            if TOP_K:  # the largest t with count(key >= t) >= k: the k-th largest key
                lo = thr
                hi = hi_key
                while lo < hi:
                    mid = lo + (hi - lo + 1) // 2
                    c = _count_ge(base, V, mid, SHIFT, BLOCK)
                    if c == top_k:  # exactly the top k: the set is found, whatever key the k-th one has
                        lo = mid
                        hi = mid
                    elif c > top_k:
                        lo = mid
                    else:
                        hi = mid - 1
                thr = lo
            if TOP_P:  # the smallest t >= thr with mass(key > t) < top_p * mass(key >= thr): a present value
                target = top_p * _mass_gt(base, V, thr - 1, m_y, temperature, SHIFT, BLOCK)
                lo = thr
                hi = hi_key
                while lo < hi:
                    mid = lo + (hi - lo) // 2
                    if _mass_gt(base, V, mid, m_y, temperature, SHIFT, BLOCK) < target:
                        hi = mid
                    else:
                        lo = mid + 1
                thr = lo
            if TOP_K or TOP_P or MIN_P:
                z = tl.zeros((), dtype=tl.float32)
                for start in range(0, V, BLOCK):
                    inb = start + offs < V
                    x = tl.load(base + start + offs, mask=inb, other=0.0).to(tl.float32)
                    w = _kept_weights(x, inb, thr, m_y, temperature, min_p, MIN_P, SHIFT)
                    z += tl.sum(w, 0)
            else:
                z = s_y
            # Draw: the first kept index whose running mass exceeds u * z, scanning blocks in vocabulary order.
            goal = tl.load(u_ptr + row * u_stride + col) * z
            acc = tl.zeros((), dtype=tl.float32)
            tok = tl.full((), -1, tl.int64)
            last = tl.zeros((), dtype=tl.int64)  # the last kept index: the answer if rounding leaves goal uncrossed
            start = 0
            while (start < V) & (tok < 0):
                idx = start + offs
                inb = idx < V
                x = tl.load(base + idx, mask=inb, other=0.0).to(tl.float32)
                w = _kept_weights(x, inb, thr, m_y, temperature, min_p, MIN_P, SHIFT)
                c = acc + tl.cumsum(w, 0)
                hit = (c > goal) & (w > 0.0)
                if tl.sum(hit.to(tl.int32), 0) > 0:
                    tok = tl.min(tl.where(hit, idx, V), 0).to(tl.int64)
                last = tl.maximum(last, tl.max(tl.where(w > 0.0, idx, 0), 0).to(tl.int64))
                acc += tl.sum(w, 0)
                start += BLOCK
            tok = tl.where(tok < 0, last, tok)
            x_tok = tl.load(base + tok).to(tl.float32)
            lp = tl.div_rn(x_tok, temperature) - m_y - tl.log(z)
        out = row * out_stride + col
        tl.store(tok_ptr + out, tok)
        tl.store(lp_ptr + out, lp)
        tl.store(raw_ptr + out, x_tok - raw_lse)
        if RECORD:  # the decode step's bookkeeping, as sample_step_reference
            done = tl.load(done_ptr + row) != 0
            live = (~done).to(tl.int64)
            tl.store(cur_ptr + row, tok)
            tl.store(pos_ptr + row, tl.load(pos_ptr + row) + live)
            tl.store(step_ptr + row, col + live)
            hit = col + live >= T
            for i in range(0, n_stop):
                hit = hit | (tl.load(stop_ptr + i) == tok)
            tl.store(done_ptr + row, (done | hit).to(tl.int1))


def _check(logits: torch.Tensor) -> None:
    if logits.dtype not in _KEY_SHIFT:
        raise ValueError(f"fused_sample: logits dtype {logits.dtype} not supported (bf16, fp16 or fp32)")
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"fused_sample: logits must be [B, V] with contiguous rows, got {tuple(logits.shape)} "
                         f"strides {logits.stride()}")


def fused_sample(logits: torch.Tensor, params: Any, u: torch.Tensor | None, *, block: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernel: logits [B, V] bf16 / fp16 / fp32 (rows contiguous), u [B] fp32 -> as sample_reference.

    One launch, no [B, V] temporaries, no host syncs (CUDA-graph safe). `block`: vocabulary tile (tests use a
    small one to exercise several tiles at a tiny V).
    """
    _check(logits)
    B, V = logits.shape
    greedy = params.temperature == 0.0
    if not greedy and (u is None or u.shape != (B,)):
        raise ValueError(f"fused_sample: need u [B={B}] uniforms for sampling, got "
                         f"{None if u is None else tuple(u.shape)}")
    dev = logits.device
    tokens = torch.empty(B, dtype=torch.long, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    raw = torch.empty(B, dtype=torch.float32, device=dev)
    uu = u.float().contiguous() if u is not None else logprobs  # unread when greedy
    _launch(logits, params, uu, 1, tokens, logprobs, raw, 1, None, block)
    return tokens, logprobs, raw


def _launch(logits: torch.Tensor, params: Any, u: torch.Tensor, u_stride: int, tokens: torch.Tensor,
            logprobs: torch.Tensor, raw: torch.Tensor, out_stride: int, record: tuple | None, block: int | None
            ) -> None:
    B, V = logits.shape
    greedy = params.temperature == 0.0
    if block is None:
        block = min(triton.next_power_of_2(V), 4096)
    step, cur, pos, done, stop_ids, T = record if record is not None else (tokens,) * 5 + (0,)
    _sample_kernel[(B,)](
        logits, logits.stride(0), u, u_stride, tokens, logprobs, raw, out_stride, V,
        float(params.temperature) or 1.0, int(params.top_k), float(params.top_p), float(params.min_p),
        step, cur, pos, done, stop_ids, stop_ids.numel() if record is not None else 0, T,
        GREEDY=greedy, TOP_K=not greedy and 0 < params.top_k < V, TOP_P=not greedy and params.top_p < 1.0,
        MIN_P=not greedy and params.min_p > 0.0, RECORD=record is not None, SHIFT=_KEY_SHIFT[logits.dtype],
        BLOCK=block, num_warps=4)


def sample(logits: torch.Tensor, params: Any, u: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampler's entry point: the fused kernel on CUDA, the reference elsewhere. Not the interpreter: it runs
    each row program in Python, far too slow for a decode loop; tests call `fused_sample` directly."""
    return (fused_sample if _fused_ok(logits) else sample_reference)(logits, params, u)


def _fused_ok(logits: torch.Tensor) -> bool:
    return HAS_TRITON and logits.is_cuda and logits.dtype in _KEY_SHIFT and logits.stride(-1) == 1


# ----------------------------------------------------------------------------------------------------------------
# Sample and record: the whole tail of a decode step
# ----------------------------------------------------------------------------------------------------------------


def sample_step_reference(logits: torch.Tensor, params: Any, u: torch.Tensor, step: torch.Tensor,
                          out_tokens: torch.Tensor, out_logprobs: torch.Tensor, out_raw: torch.Tensor,
                          tokens: torch.Tensor, positions: torch.Tensor, done: torch.Tensor,
                          stop_ids: torch.Tensor) -> None:
    """Sample row r with u[r, step[r]], write the token and log-probs at column step[r] of out_* [R, T + 1], then
    advance the rows that were live (positions, step) and mark done the rows that drew a stop id or reached T.

    logits [R, V]; u [R, T + 1] fp32; step, tokens, positions [R] int64; done [R] bool; stop_ids [n] int64.
    Done rows compute too (cheaper than compacting) but only rewrite their own next, unread, column.
    """
    uu = None if params.temperature == 0.0 else u.gather(1, step[:, None])[:, 0]
    tok, lp, raw = sample(logits, params, uu)
    col = step[:, None]
    out_tokens.scatter_(1, col, tok[:, None])
    out_logprobs.scatter_(1, col, lp[:, None])
    out_raw.scatter_(1, col, raw[:, None])
    live = ~done
    tokens.copy_(tok)
    positions.add_(live)
    step.add_(live)
    done |= (tok[:, None] == stop_ids).any(-1) | (step >= u.shape[1] - 1)


def fused_sample_step(logits: torch.Tensor, params: Any, u: torch.Tensor, step: torch.Tensor,
                      out_tokens: torch.Tensor, out_logprobs: torch.Tensor, out_raw: torch.Tensor,
                      tokens: torch.Tensor, positions: torch.Tensor, done: torch.Tensor, stop_ids: torch.Tensor,
                      *, block: int | None = None) -> None:
    """As sample_step_reference in one launch (the decode step's only kernel outside the model)."""
    _check(logits)
    for name, t in (("u", u), ("out_tokens", out_tokens), ("out_logprobs", out_logprobs), ("out_raw", out_raw)):
        if t.stride(1) != 1 or t.stride(0) != u.shape[1] or t.shape[0] != logits.shape[0]:
            raise ValueError(f"fused_sample_step: {name} must be a contiguous [R, T + 1] buffer, got "
                             f"{tuple(t.shape)} strides {t.stride()}")
    _launch(logits, params, u, u.stride(0), out_tokens, out_logprobs, out_raw, out_tokens.stride(0),
            (step, tokens, positions, done, stop_ids, u.shape[1] - 1), block)


def sample_step(logits: torch.Tensor, params: Any, u: torch.Tensor, step: torch.Tensor, out_tokens: torch.Tensor,
                out_logprobs: torch.Tensor, out_raw: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                done: torch.Tensor, stop_ids: torch.Tensor) -> None:
    """The sampler's decode-step tail: fused on CUDA, the reference elsewhere (see `sample`)."""
    fn = fused_sample_step if _fused_ok(logits) else sample_step_reference
    fn(logits, params, u, step, out_tokens, out_logprobs, out_raw, tokens, positions, done, stop_ids)
