"""KV-cached batched sampling for RL rollouts and evals: `generate(model, prompts, ...) -> list[Completion]`.

What it is for: the GRPO trainer's group rollouts (n samples per prompt, tokens + log-probs + finish reason) and the
SFT trainer's greedy held-out evals, colocated with training: same process, same weights, no second engine. What it
is not: a server (no continuous batching, no paged KV, no prefix cache across calls, no speculative decoding).

Design decisions (each one chosen for a measurable reason):

- **Cache.** One static cache k, v [layers, R, L, kv_heads, head_dim] per batch, viewed out of one flat buffer per
  model that only grows, so repeated calls (every GRPO step) reuse it without allocating; `free_cache(model)` hands
  it back (e.g. before a memory-hungry training step). Row r of a batch is row r of the cache.
- **Right padding with per-row positions**, not left padding. Prompts keep their natural positions 0..len-1, so RoPE
  and the model need no pad offsets and the cache needs no attention-mask bookkeeping beyond "slot <= position".
  Pad tokens of a shorter prompt write slots >= its length; every such slot is rewritten by a decode step before a
  query can see it. Per-row lengths live on the device as the `positions` tensor. Waste is bounded by **bucketing**:
  prompts are sorted by length (longest first), so each prefill chunk and each batch pads only to a similar length;
  the original order is restored in the output.
- **Group sampling.** Rows are laid out prompt-major: the n samples of batch prompt q are rows q*n .. q*n+n-1. The
  prefill runs once per prompt into rows q*n (a strided cache view), then one broadcast copy fills the other n-1
  rows (only the first S slots), and the prompt's last-position logits are repeated n times for the first token.
- **No host sync per token.** The decode step keeps everything on the device: tokens, positions, a `done` mask and
  a step counter are tensors the step updates in place, sampled tokens and log-probs go into [R, T] output buffers
  at column `step`. The host looks at the device only every `sync_every` steps ("all done?", and stop strings).
  Rows that finished keep running until the whole batch is done (cheaper than compacting the batch); their extra
  tokens are cut off on the host.
- **Attention window.** The step attends over the first W slots of the cache, W = the largest live position rounded
  up to 64, not the whole cache: early steps do not read empty slots (a handful of shapes, one CUDA graph each).
- **Sampling.** Temperature (0 = greedy argmax), then top-k, top-p, min-p as masks on the logits (the order
  transformers applies them), then **inverse-CDF sampling with one counter-based uniform per row**:
  u = hash(seed, prompt_index, sample_index, step), token = first index where cumsum(probs) > u * total. This is an
  exact draw from the filtered distribution (as a Gumbel or exponential race is), but it needs one random number per
  row instead of V, and its noise is a pure function of (seed, prompt_index, sample_index, step).
  **Promise:** with a fixed seed, the completion of (prompt_index i, sample j) does not depend on which other
  prompts are in the call, on the batch size, on `max_batch_tokens` splitting, or on CUDA graphs vs eager, up to
  float differences in the model's logits for that row (which can flip a draw only when u lands within float
  rounding of a CDF boundary). `seed=None` draws a seed from torch's global generator.
- **Stops.** Stop tokens (default: the tokenizer's EOS + generation-config eos ids) set `done` on the device. Stop
  strings are checked on the host at sync points, on the decoded text of each live row, searching only the text
  added since the last check (a stop string may span tokens); a match sets that row's `done`. A final pass finds the
  first token whose prefix text contains a stop string: `tokens` end with that token (nothing after it is returned),
  `text` ends just before the stop string. For a stop token, `tokens` end with it (the trainer trains on EOS) and
  `text` leaves it out.
- **CUDA graphs.** On CUDA the decode step (model forward + sampling + bookkeeping) is captured once per (rows
  bucket, cache length, window, sampling parameters) and replayed; static inputs are the state tensors above and
  the cache. Batch rows are bucketed (powers of two up to 32, then multiples of 32) so a few graphs serve all
  requests; pad rows start done. Prefill runs eagerly. On CPU, or with `use_cuda_graphs=False`, the identical step
  function runs eagerly. Graphs are dropped when the cache is reallocated or the weights move (data_ptr check).
- **FSDP2.** `full_weights(model)` unshards every FSDP module once (all-gather per module), turns off resharding
  after forward, and reshards on exit, so a rollout of T steps costs one all-gather per module instead of T.
  `generate` enters it by itself for an FSDP model. Graphs are off by default for FSDP models (FSDP's forward
  hooks run host-side logic every call).
- **Memory budget.** `max_batch_tokens` bounds rows x cache length per batch (default: all prompts in one batch on
  CPU; 40% of free device memory on CUDA). Larger requests run as several batches, whole prompt groups at a time.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.model import KVCache

_WINDOW = 64  # cache length and attention window granularity (slots)
_PREFILL_TOKENS = 8192  # padded tokens per prefill forward: bounds activation memory, not correctness


@dataclass
class Completion:
    """One sampled continuation. `tokens`, `logprobs` and `raw_logprobs` are aligned, one entry per token.

    logprobs: log-prob of each token under the distribution it was drawn from (after temperature, top-k, top-p,
        min-p, renormalised); 0.0 for greedy (a point mass). Use it for importance weights of the sampler itself.
    raw_logprobs: log-softmax of the model's logits at temperature 1 without filtering: the GRPO trainer's old_logp
        when rollout and training temperatures match (what a teacher-forced forward of prompt + tokens computes).
    finish_reason: "stop" (a stop token, the last entry of `tokens`, or a stop string) or "length".
    text: the decoded completion without the stop token / stop string (None when no tokenizer was given).
    """

    prompt_index: int
    sample_index: int
    tokens: list[int]
    logprobs: list[float]
    raw_logprobs: list[float]
    finish_reason: str
    text: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"generate: top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"generate: top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"generate: min_p must be in [0, 1) (0 = off), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ------------------------------------------------------------------------------------------------ sampling math

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values < 2**32 (products wrap; the mask keeps 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def counter_uniform(seed: torch.Tensor, prompt_index: torch.Tensor, sample_index: torch.Tensor,
                    step: torch.Tensor) -> torch.Tensor:
    """u in (0, 1), float32 [B]: a pure function of (seed [1], prompt_index [B], sample_index [B], step [1]).

    24 bits, the resolution of the float32 CDF it is compared against.
    """
    h = (seed & _M32) ^ 0x9E3779B9
    for c in (seed >> 32, prompt_index, sample_index, step):
        h = _mix32(((h * 0x01000193) & _M32) ^ (c & _M32))  # FNV-style multiply so the order of inputs matters
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [B, V] fp32 -> scores [B, V]: / temperature, then -inf outside top-k, top-p and min-p (in that order).

    top-p keeps the smallest prefix of tokens (by descending probability) whose mass reaches top_p: a token is kept
    when the mass strictly above it is < top_p. Ties at a threshold are kept.
    """
    scores = logits / params.temperature
    V = scores.shape[-1]
    top = None
    if 0 < params.top_k < V:
        top = scores.topk(params.top_k, dim=-1).values  # [B, k], sorted descending
        scores = scores.masked_fill(scores < top[:, -1:], float("-inf"))
    if params.top_p < 1.0:
        ordered = top if top is not None else scores.sort(dim=-1, descending=True).values
        probs = ordered.softmax(-1)
        above = probs.cumsum(-1) - probs  # mass strictly above each token
        n_keep = (above < params.top_p).sum(-1, keepdim=True).clamp_(min=1)
        scores = scores.masked_fill(scores < ordered.gather(-1, n_keep - 1), float("-inf"))
    if params.min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return scores


def sample_tokens(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V] fp32, u [B] uniforms (unused when greedy) -> tokens [B], logprobs [B], raw_logprobs [B].

    No host syncs (safe inside a CUDA graph).
    """
    raw_lse = logits.logsumexp(-1)
    if params.greedy:
        tokens = logits.argmax(-1)
        logprobs = torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    else:
        plain = params.temperature == 1.0 and params.top_k == 0 and params.top_p == 1.0 and params.min_p == 0.0
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


# ------------------------------------------------------------------------------------------------- FSDP2 weights

_UNSHARDED: weakref.WeakSet = weakref.WeakSet()  # models inside full_weights(), so generate does not nest it


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _param_groups(module: nn.Module) -> list[Any]:
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.9 (several groups per module)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)  # torch 2.6 - 2.8
        groups = [] if group is None else [group]
    return list(groups)


@contextlib.contextmanager
def full_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Make an FSDP2-sharded model's weights whole for a whole rollout; a no-op for an unsharded model.

    Every FSDP module (each `fully_shard`-ed block and the root) all-gathers its parameters once on entry
    (`unshard`, issued asynchronously for all modules, then waited), resharding after forward is switched off so
    the T forwards of a rollout reuse the gathered weights, and on exit every module reshards and gets its former
    reshard-after-forward setting back. Peak memory: one full copy of the weights in param_dtype per rank.
    Collective: every rank must enter and leave together (as for any FSDP forward).
    """
    modules = _fsdp_modules(model)
    if not modules or model in _UNSHARDED:
        yield model
        return
    if modules[0] is model:
        # The root decides at its lazy init (first forward or backward) to keep its parameters gathered after forward;
        # take that decision now, or a rollout before the first training forward would save the undecided setting
        # and restore it afterwards, and the root would reshard after every training forward.
        model._get_fsdp_state()._lazy_init()
    # Set and restore each param group's post-forward mesh (None = keep unsharded after forward) directly: the public
    # setter `set_reshard_after_forward` is newer than torch 2.6, has no getter, and on torch >= 2.8 it also switches
    # off the root's lazy decision above for good.
    saved = [(g, g.post_forward_mesh_info) for m in modules for g in _param_groups(m)]
    try:
        for g, _ in saved:
            g.post_forward_mesh_info = None
        handles = [m.unshard(async_op=True) for m in modules]
        for h in handles:
            if h is not None:
                h.wait()
        _UNSHARDED.add(model)
        yield model
    finally:
        _UNSHARDED.discard(model)
        for m in modules:
            m.reshard()
        for g, info in saved:
            g.post_forward_mesh_info = info


# ------------------------------------------------------------------------------------------------ decode engine


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _bucket_rows(r: int) -> int:
    return 1 << (r - 1).bit_length() if r <= 32 else _round_up(r, 32)


@dataclass
class _State:
    """Device-side state of one batch; the decode step reads and updates it in place (CUDA graph static inputs)."""

    k: torch.Tensor  # [layers, R, L, kv_heads, D]
    v: torch.Tensor
    tokens: torch.Tensor  # [R] last sampled token
    positions: torch.Tensor  # [R] position (= cache slot) of `tokens`
    done: torch.Tensor  # [R] bool
    step: torch.Tensor  # [1] index of the next output column
    seed: torch.Tensor  # [1] int64
    prompt_index: torch.Tensor  # [R] noise keys
    sample_index: torch.Tensor  # [R]
    stop_ids: torch.Tensor  # [n_stop] (-1 = none)
    out_tokens: torch.Tensor  # [R, T]
    out_logprobs: torch.Tensor  # [R, T] fp32
    out_raw: torch.Tensor  # [R, T] fp32
    params: SamplingParams = field(default_factory=SamplingParams)
    graphs: dict = field(default_factory=dict)  # (window, params, n_stop) -> CUDAGraph


def _record(logits: torch.Tensor, st: _State) -> None:
    """Sample from logits [R, V] fp32 and advance the state; the tail of both prefill and every decode step."""
    u = None if st.params.greedy else counter_uniform(st.seed, st.prompt_index, st.sample_index, st.step)
    tokens, logprobs, raw = sample_tokens(logits, st.params, u)
    st.out_tokens.index_copy_(1, st.step, tokens[:, None])
    st.out_logprobs.index_copy_(1, st.step, logprobs[:, None])
    st.out_raw.index_copy_(1, st.step, raw[:, None])
    st.tokens.copy_(tokens)
    st.done |= (tokens[:, None] == st.stop_ids).any(-1)
    st.step.add_(1)


def _decode_step(model: nn.Module, st: _State, window: int) -> None:
    """One token for every row: the function CUDA graphs capture and CPU runs as is."""
    cache = KVCache.wrap(st.k[:, :, :window], st.v[:, :, :window])
    logits = model(st.tokens[:, None], st.positions[:, None], kv_cache=cache)[:, 0].float()
    st.positions.add_(1)
    _record(logits, st)


class _Engine:
    """Per-model owner of the flat cache buffers and the decode states (and their CUDA graphs)."""

    def __init__(self) -> None:
        self.flat_k: torch.Tensor | None = None
        self.flat_v: torch.Tensor | None = None
        self.states: dict[tuple, _State] = {}
        self.weights_key: tuple = ()
        self.pool: Any = None
        self.stats = {"prefill_forwards": 0, "prefill_tokens": 0, "decode_steps": 0, "graph_captures": 0}

    def state(self, cfg: Any, R: int, L: int, T: int, dtype: torch.dtype, device: torch.device) -> _State:
        shape = (cfg.num_layers, R, L, cfg.num_kv_heads, cfg.head_dim)
        numel = math.prod(shape)
        flat = self.flat_k
        if flat is None or flat.numel() < numel or flat.dtype != dtype or flat.device != device:
            self.flat_k = self.flat_v = None  # free the old pair before allocating the new one
            self.states.clear()
            # Zeros, not empty: masked slots get weight 0, and 0 * NaN garbage in V would still be NaN.
            self.flat_k = torch.zeros(numel, dtype=dtype, device=device)
            self.flat_v = torch.zeros(numel, dtype=dtype, device=device)
        key = (R, L, T)
        if key not in self.states:
            z = lambda *s, dt=torch.long: torch.zeros(s, dtype=dt, device=device)  # noqa: E731
            self.states[key] = _State(
                k=self.flat_k[:numel].view(shape), v=self.flat_v[:numel].view(shape),
                tokens=z(R), positions=z(R), done=z(R, dt=torch.bool), step=z(1), seed=z(1),
                prompt_index=z(R), sample_index=z(R), stop_ids=z(1), out_tokens=z(R, T),
                out_logprobs=z(R, T, dt=torch.float32), out_raw=z(R, T, dt=torch.float32))
        return self.states[key]

    def check_weights(self, model: nn.Module) -> None:
        key = tuple(p.data_ptr() for p in model.parameters())
        if key != self.weights_key:  # weights reallocated (load, to(), FSDP unshard): captured graphs are stale
            for st in self.states.values():
                st.graphs.clear()
            self.weights_key = key

    def step(self, model: nn.Module, st: _State, window: int, use_graphs: bool) -> None:
        self.stats["decode_steps"] += 1
        if not use_graphs:
            _decode_step(model, st, window)
            return
        key = (window, st.params, st.stop_ids.numel())
        graph = st.graphs.get(key)
        if graph is None:
            graph = st.graphs[key] = self.capture(model, st, window)
        graph.replay()

    def capture(self, model: nn.Module, st: _State, window: int) -> torch.cuda.CUDAGraph:
        """Capture the decode step; the warm-up runs execute it, so the small state is restored after each one
        (the cache slots and output columns they write are rewritten by the real step before anything reads them)."""
        saved = [t.clone() for t in (st.tokens, st.positions, st.done, st.step)]

        def restore() -> None:
            for t, s in zip((st.tokens, st.positions, st.done, st.step), saved):
                t.copy_(s)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                _decode_step(model, st, window)
                restore()
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            _decode_step(model, st, window)
        self.stats["graph_captures"] += 1
        return graph


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Engine (its cache and graphs)


def _engine(model: nn.Module) -> _Engine:
    if model not in _ENGINES:
        _ENGINES[model] = _Engine()
    return _ENGINES[model]


def free_cache(model: nn.Module) -> None:
    """Drop the KV cache and CUDA graphs `generate` keeps for `model` between calls."""
    _ENGINES.pop(model, None)


def sampler_stats(model: nn.Module) -> dict[str, int]:
    """Counters since the model's first `generate`: prefill forwards and tokens, decode steps, graph captures."""
    return dict(_engine(model).stats)


# ------------------------------------------------------------------------------------------------- stop strings


def _find_stop_string(tokenizer: Any, tokens: list[int], stops: Sequence[str], start_char: int = 0
                      ) -> tuple[tuple[int, str] | None, int]:
    """Search the decoded `tokens` for a stop string at or after `start_char`. Returns ((m, text), length): m is
    the first token count whose decoded prefix contains a stop string, text what precedes that stop string (None
    when there is no stop string), and the length of the decoded text."""
    text = tokenizer.decode(tokens)
    if not any(text.find(s, start_char) >= 0 for s in stops):
        return None, len(text)
    lo, hi = 1, len(tokens)  # smallest m with a stop string in decode(tokens[:m]): monotone in m
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in tokenizer.decode(tokens[:mid]) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    prefix = tokenizer.decode(tokens[:lo])
    return (lo, prefix[: min(i for s in stops if (i := prefix.find(s)) >= 0)]), len(text)


# ---------------------------------------------------------------------------------------------------- generate


def _validate(model: nn.Module, prompts: Any, max_new_tokens: int, n: int, stop_strings: Sequence[str],
              tokenizer: Any) -> None:
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("generate: prompts is empty; pass a non-empty list of token-id lists")
    if max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if n < 1:
        raise ValueError(f"generate: n (samples per prompt) must be >= 1, got {n}")
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need a tokenizer to decode text; pass tokenizer=...")
    cfg = model.config
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompts[{i}] is empty; every prompt needs at least one token (e.g. BOS)")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"generate: prompts[{i}] has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                f"model's max_position_embeddings={cfg.max_position_embeddings}; truncate the prompt or lower "
                f"max_new_tokens")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"generate: prompts[{i}] has token ids outside [0, {cfg.vocab_size})")


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    n: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    stop_token_ids: Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    seed: int | None = None,
    max_batch_tokens: int | None = None,
    use_cuda_graphs: bool | None = None,
    sync_every: int = 8,
) -> list[Completion]:
    """Sample `n` continuations of each prompt (token-id lists) with a KV cache; returns len(prompts) * n
    Completions ordered by (prompt_index, sample_index).

    stop_token_ids: None = the tokenizer's `stop_ids` (EOS + generation-config eos ids) when a tokenizer is given,
        else none; () = no stop tokens. stop_strings need `tokenizer`.
    use_cuda_graphs: None = on for CUDA unless the model is FSDP-sharded. sync_every: decode steps between looks at
        the device (all-done check, stop strings).
    The cache and graphs stay allocated for the next call (see `free_cache`).
    """
    _validate(model, prompts, max_new_tokens, n, stop_strings, tokenizer)
    params = SamplingParams(float(temperature), int(top_k), float(top_p), float(min_p))
    if stop_token_ids is None:
        stop_token_ids = tuple(tokenizer.stop_ids) if tokenizer is not None else ()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    with full_weights(model):
        device = model.embed_tokens.weight.device
        if use_cuda_graphs is None:
            use_cuda_graphs = device.type == "cuda" and not _fsdp_modules(model)
        use_cuda_graphs = bool(use_cuda_graphs) and device.type == "cuda"
        eng = _engine(model)
        eng.check_weights(model)
        cfg, dtype = model.config, model.embed_tokens.weight.dtype
        if max_batch_tokens is None and device.type == "cuda":
            slot_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
            max_batch_tokens = int(0.4 * torch.cuda.mem_get_info(device)[0] / slot_bytes)

        T = max_new_tokens
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: tight buckets
        out: list[Completion | None] = [None] * (len(prompts) * n)
        start = 0
        while start < len(order):
            L = _round_up(len(prompts[order[start]]) + T, _WINDOW)
            L = min(L, _round_up(cfg.max_position_embeddings, _WINDOW))
            if max_batch_tokens is None:
                count = len(order) - start
            else:
                count = min(len(order) - start, max_batch_tokens // (L * n))
                if count == 0:
                    raise ValueError(
                        f"generate: max_batch_tokens={max_batch_tokens} cannot hold the {n} samples of one prompt "
                        f"of {len(prompts[order[start]])} tokens + {T} new tokens; need >= {n * L}")
            batch = order[start : start + count]
            rows = len(batch) * n
            R = rows
            if use_cuda_graphs:  # few graph shapes; keep within the budget
                R = _bucket_rows(rows)
                if max_batch_tokens is not None and R * L > max_batch_tokens:
                    R = rows
            for c in _run_batch(model, eng, [list(prompts[i]) for i in batch], batch, n, R, L, T, params,
                                tuple(stop_token_ids), tuple(stop_strings), tokenizer, seed, use_cuda_graphs,
                                sync_every, device, dtype):
                out[c.prompt_index * n + c.sample_index] = c
            start += count
    return out  # type: ignore[return-value]


def _run_batch(model: nn.Module, eng: _Engine, prompts: list[list[int]], prompt_ids: list[int], n: int, R: int,
               L: int, T: int, params: SamplingParams, stop_ids: tuple[int, ...], stops: tuple[str, ...],
               tokenizer: Any, seed: int, use_graphs: bool, sync_every: int, device: torch.device,
               dtype: torch.dtype) -> list[Completion]:
    """Prefill `prompts` (sorted longest first) once each, then decode all R rows for up to T tokens."""
    P, rows = len(prompts), len(prompts) * n
    st = eng.state(model.config, R, L, T, dtype, device)
    st.params = params
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    st.prompt_index.zero_()
    st.prompt_index[:rows] = torch.tensor(prompt_ids, device=device).repeat_interleave(n)
    st.sample_index.zero_()
    st.sample_index[:rows] = torch.arange(n, device=device).repeat(P)
    st.seed.fill_(seed)
    ids = torch.tensor(stop_ids if stop_ids else (-1,), device=device)
    if st.stop_ids.shape != ids.shape:
        st.stop_ids = ids  # a new static tensor: graphs are keyed by its size
        st.graphs.clear()
    st.stop_ids.copy_(ids)
    st.positions.zero_()
    st.positions[:rows] = lengths.repeat_interleave(n)
    st.tokens.zero_()
    st.done.zero_()
    st.done[rows:] = True  # bucket padding rows
    st.step.zero_()

    # Prefill: right-padded chunks of similar length, each prompt once, into cache rows q*n (strided view).
    logits = torch.zeros(R, model.config.vocab_size, dtype=torch.float32, device=device)
    q0 = 0
    while q0 < P:
        S = len(prompts[q0])
        q1 = min(P, q0 + max(1, _PREFILL_TOKENS // S))
        ids = torch.zeros(q1 - q0, S, dtype=torch.long)
        for j, p in enumerate(prompts[q0:q1]):
            ids[j, : len(p)] = torch.tensor(p)
        ids = ids.to(device)
        pos = torch.arange(S, device=device).expand(q1 - q0, S)
        view = KVCache.wrap(st.k[:, q0 * n : q1 * n : n], st.v[:, q0 * n : q1 * n : n])
        hidden = model(ids, pos, kv_cache=view, return_hidden=True)  # [q, S, H]
        last = hidden[torch.arange(q1 - q0, device=device), lengths[q0:q1] - 1]
        logits[q0 * n : q1 * n] = model.lm_head(last).float().repeat_interleave(n, dim=0)
        if n > 1:  # the other n - 1 samples of each prompt get a copy of its prefilled slots
            for c in (st.k, st.v):
                group = c[:, q0 * n : q1 * n, :S].unflatten(1, (q1 - q0, n))
                group[:, :, 1:] = group[:, :, :1]
        eng.stats["prefill_forwards"] += 1
        eng.stats["prefill_tokens"] += ids.numel()
        q0 = q1
    _record(logits, st)
    del logits

    # Decode: the device runs ahead; the host looks every `sync_every` steps.
    max_len = len(prompts[0])
    scanned: list[int | None] = [0] * rows  # see _check_stop_strings
    stopped: dict[int, tuple[int, str]] = {}  # row -> (tokens kept, text) from a stop string
    t = 1
    while True:
        if stops:
            _check_stop_strings(st, tokenizer, stops, stop_ids, t, rows, scanned, stopped)
        if t >= T or bool(st.done[:rows].all()):
            break
        for _ in range(min(sync_every, T - t)):
            window = min(L, _round_up(max_len + t, _WINDOW))  # input positions <= max_len + t - 1
            eng.step(model, st, window, use_graphs)
            t += 1

    tokens, logprobs, raw = st.out_tokens[:rows, :t].tolist(), st.out_logprobs[:rows, :t].tolist(), \
        st.out_raw[:rows, :t].tolist()
    stop_set = set(stop_ids)
    result = []
    for r in range(rows):
        toks = tokens[r]
        end = next((i + 1 for i, x in enumerate(toks) if x in stop_set), None)
        reason = "stop" if end is not None else "length"
        text = None
        if end is not None:
            toks = toks[:end]
        if r in stopped and stopped[r][0] <= len(toks):
            keep, text = stopped[r]
            toks, reason = toks[:keep], "stop"
        elif tokenizer is not None:
            text = tokenizer.decode(toks[:-1] if reason == "stop" else toks)
        m = len(toks)
        result.append(Completion(prompt_ids[r // n], r % n, toks, logprobs[r][:m], raw[r][:m], reason, text))
    return result


def _check_stop_strings(st: _State, tokenizer: Any, stops: tuple[str, ...], stop_ids: tuple[int, ...], t: int,
                        rows: int, scanned: list[int | None], stopped: dict[int, tuple[int, str]]) -> None:
    """Search the text each live row added since the last check; mark rows that produced a stop string done.

    scanned[r]: characters of row r's text already searched, None once the row is finished (nothing left to look at).
    """
    done = st.done[:rows].tolist()
    tokens = st.out_tokens[:rows, :t].tolist()
    stop_set, longest, newly = set(stop_ids), max(len(s) for s in stops), []
    for r in range(rows):
        if scanned[r] is None:
            continue
        toks = tokens[r]
        if done[r]:  # ended by a stop token: search only up to it, one last time
            toks = toks[: next((i + 1 for i, x in enumerate(toks) if x in stop_set), len(toks))]
        # Back up by the longest stop string (it may span the boundary) and a few characters (a multi-byte
        # character split across tokens decodes differently once complete).
        hit, scanned[r] = _find_stop_string(tokenizer, toks, stops, max(0, scanned[r] - longest - 4))
        if hit is not None:
            stopped[r] = hit
            newly.append(r)
        if hit is not None or done[r]:
            scanned[r] = None
    if newly:
        st.done[torch.tensor(newly, device=st.done.device)] = True
