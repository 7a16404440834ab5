"""KV-cached batched sampling for RL rollouts and evals: `generate(model, prompts, ...) -> list[Completion]`.

What it is for: the GRPO trainer's group rollouts (n samples per prompt, tokens + log-probs + finish reason) and the
SFT trainer's greedy held-out evals, colocated with training: same process, same weights, no second engine. What it
is not: a server (no paged KV, no prefix cache across calls, no speculative decoding; refilling rows happens within
one call).

Design decisions (each one chosen for a measurable reason):

- **Cache.** One static cache k, v [layers, R, L, kv_heads, head_dim] per call shape, viewed out of one flat buffer
  per model that only grows, so repeated calls (every GRPO step) reuse it without allocating; `free_cache(model)`
  hands it back (e.g. before a memory-hungry training step). L = the longest prompt + max_new_tokens, rounded up to
  one of a few lengths (`cache_length`: whole windows, then 4 per doubling), so calls share states and graphs.
- **Rows hold sequences; finished rows are refilled.** A sequence is one (prompt, sample) pair. Each of the R rows
  holds one sequence at a time; when rows finish, pending sequences start in them at the next look at the device
  (`refill=True`, continuous batching within the call), so a batch with a long tail does not decode dead rows until
  its longest row ends. `refill=False` starts new sequences only once every row is free (whole batches). R is every
  sequence when the memory budget allows, else as many as `max_batch_tokens` holds.
- **Right padding with per-row positions**, not left padding. Prompts keep their natural positions 0..len-1, so RoPE
  and the model need no pad offsets. Prompts are sorted by length (longest first), so each prefill chunk pads only
  to a similar length; the original order is restored in the output.
- **Prefill** runs once per distinct prompt of a fill, into the first row that takes one of its samples (the cache
  write goes through a row index, so rows need not be adjacent); one indexed copy gives the prompt's slots to its
  other rows. A forward holds at most _PREFILL_TOKENS tokens: prompts up to that length go several to a forward
  (padded to the longest), each attending only over its own keys (causal SDPA, no mask over the cache length, no
  cache read). A longer prompt is split into chunks of _PREFILL_TOKENS (the last one shorter), one forward each:
  chunk 0 as above; chunk k > 0 writes its keys at its positions and attends over its row's cache slots
  [0, start + len) with an explicit offset-causal mask [len, start + len] (core.model explains why not is_causal),
  so its logits are the one-forward logits up to float rounding. A refill while other rows decode prefills at most
  one forward per look (a long prompt: one chunk per look, its rows waiting, done, until the last chunk is in), so
  decoding rows wait for one chunk at most (`refill_stall_tokens` in `sampler_stats`).
- **No host sync per token.** The decode step keeps everything on the device: tokens, positions, a `done` mask and
  a per-row step counter are tensors the step updates in place; sampled tokens and log-probs go into [R, T + 1]
  output buffers at each row's own column. Finished rows keep computing (cheaper than compacting) but advance
  nothing. The host looks every `sync_every` steps: stop strings, finished rows out, pending sequences in.
- **Attention window.** The step attends over the first W slots of the cache, W = the largest live position rounded
  up to 64, not the whole cache: early steps do not read empty slots (a handful of shapes, one CUDA graph each).
  The SDPA backend of prefill and decode is pinned per kind of call and logged (core.model.sdpa), with fallback.
- **Sampling** (kernels/sample.py): temperature (0 = greedy argmax), then top-k, top-p, min-p (the order
  transformers applies them), then **inverse-CDF sampling with one uniform per row and step**: token = the first
  index where the cumulative filtered probability exceeds u * total, an exact draw from the filtered distribution
  with one random number per row instead of V. On CUDA one Triton kernel per step does all of it on the model-dtype
  logits without sorting the vocabulary; elsewhere the plain-torch reference does (same draws for the same u).
  u = counter_uniform(seed, prompt_index, sample_index, step), a hash, evaluated for every (sequence, step) once per
  call; a step gathers its column.
  **Promise:** with a fixed seed, the completion of (prompt_index i, sample j) does not depend on which other
  prompts are in the call, on the batch size, on `max_batch_tokens`, on refilling, or on CUDA graphs vs eager, up
  to float differences in the model's logits for that row (which can flip a draw only when u lands within float
  rounding of a CDF boundary). `seed=None` draws a seed from torch's global generator.
- **Stops.** Stop tokens (default: the tokenizer's EOS + generation-config eos ids) set `done` on the device. Stop
  strings are checked on the host at sync points, on the decoded text of each live row, searching only the text
  added since the last check (a stop string may span tokens); a match sets that row's `done`. A final pass finds the
  first token whose prefix text contains a stop string: `tokens` end with that token (nothing after it is returned),
  `text` ends just before the stop string. For a stop token, `tokens` end with it (the trainer trains on EOS) and
  `text` leaves it out.
- **CUDA graphs.** On CUDA the decode step (model forward + sampling + bookkeeping) is captured once per (rows
  bucket, cache length, window, sampling parameters, fused or plain path, number of stop ids: `graph_key`) and
  replayed; static inputs are the state tensors above and the cache (the stop ids are read by value, padded to a
  power-of-two length, so a different stop list reuses the graph). Rows are bucketed (powers of two up to 32, then
  multiples of 32); spare rows stay free. A state keeps `graph_capacity(L)` graphs (every window of a call, twice),
  least recently used evicted; captures, capture seconds and evictions are counted in `sampler_stats`. A capture
  uses capture_begin/end, not `torch.cuda.graph`, whose entry empties the caching allocator (the training step's
  cached blocks). Prefill runs eagerly. On CPU, or with `use_cuda_graphs=False`, the identical step function runs
  eagerly. Graphs are dropped when the cache is reallocated or the weights move (data_ptr check).
- **FSDP2.** FSDP's forward hooks run host-side logic every call and its gathered weights move, so a sharded model
  cannot be graph-captured. On CUDA `generate` decodes an FSDP model on its `rollout_replica`: a plain copy whose
  parameters keep their storage and are refreshed in place from the gathered shards at the start of every call, so
  graphs captured once stay valid across training steps (memory: one copy of the weights per rank, reported as
  `replica_bytes` in `sampler_stats`, freed by `free_cache`). Without the replica (`replica=False`, the default on
  CPU), `full_weights(model)` unshards every FSDP module once (all-gather per module), turns off resharding after
  forward, and reshards on exit, so a rollout of T steps costs one all-gather per module instead of T; graphs are
  off then.
- **Memory budget.** `max_batch_tokens` bounds rows x cache length (default: every sequence a row on CPU; on CUDA
  `kv_budget_slots`: the cache held already plus 40% of the memory left after the training peak, counting memory
  PyTorch's allocator holds free; the cache, replica and graph pool stay resident through the policy update).
"""

from __future__ import annotations

import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from posttrain.core.distributed import fsdp_modules, full_weights
from posttrain.core.model import KVCache
from posttrain.kernels.sample import filter_logits, sample, sample_reference, sample_step  # noqa: F401 (filter_logits: public)

_WINDOW = 64  # cache length and attention window granularity (slots)
_PREFILL_TOKENS = 8192  # tokens per prefill forward (padded; a long prompt's chunk): bounds memory and refill stalls


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


sample_tokens = sample_reference  # the plain-torch sampler (kernels/sample.py), under its historical name


def uniform_table(seed: int, prompt_index: torch.Tensor, sample_index: torch.Tensor, steps: int) -> torch.Tensor:
    """u [B, steps] float32: counter_uniform for every (row, step) of a call, drawn once before decoding starts,
    so a decode step reads one column instead of hashing (about 60 elementwise kernels per step)."""
    seed_t = torch.tensor([seed], device=prompt_index.device)
    step = torch.arange(steps, device=prompt_index.device)[None, :]
    return counter_uniform(seed_t, prompt_index[:, None], sample_index[:, None], step)


# ------------------------------------------------------------------------------------------------- rollout replica

_REPLICAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # sharded model -> its rollout replica


@torch.no_grad()
def rollout_replica(model: nn.Module) -> nn.Module:
    """A plain, unsharded copy of an FSDP2-sharded model for rollouts, its weights refreshed in place from the
    gathered shards on every call; the model itself when it is not sharded.

    Why: FSDP's forward hooks run host-side logic on every call, so a sharded model cannot be captured in CUDA
    graphs, and its gathered parameters get new storage at each unshard. The replica is an ordinary module whose
    parameters keep their storage across refreshes, so the decode graphs captured for it stay valid across training
    steps. Cost: one more copy of the weights in the unsharded dtype per rank, kept between rollouts (see
    `replica_bytes`); `free_cache(model)` drops it. It is built in that dtype directly (a meta-device skeleton, then
    each parameter allocated once), never at the default fp32 first: that would cost 4 more bytes per parameter at
    the first rollout (about 32 GB for an 8B model). The refresh gathers the weights (`full_weights`): collective,
    every rank calls it together, and for its duration a second full copy exists.
    """
    if not fsdp_modules(model):
        return model
    replica = _REPLICAS.get(model)
    with full_weights(model):
        full = dict(model.named_parameters())
        if replica is None:
            replica = _replica_skeleton(model)
            _materialize(replica, full, next(iter(full.values())).device)
            _REPLICAS[model] = replica
        for name, p in replica.named_parameters():
            p.copy_(full[name])
    return replica


def _replica_skeleton(model: nn.Module) -> nn.Module:
    """`model`'s class and config on the meta device (no memory), for `_materialize`."""
    with torch.device("meta"):
        replica = type(model)(model.config)
    if any(True for _ in replica.buffers()):  # they would need values; the model computes RoPE on the fly instead
        raise NotImplementedError(f"rollout_replica: {type(replica).__name__} has buffers; copy them to the replica")
    return replica.eval().requires_grad_(False)


def _materialize(replica: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give each parameter of `replica` uninitialised storage on `device` in the dtype of its gathered counterpart
    `full[name]`: one allocation per parameter (a tied one once, and tied it stays), dropping each meta placeholder
    as it goes. Not `to_empty`: it allocates at the placeholder's dtype (the default fp32) and unties."""
    made: dict[int, nn.Parameter] = {}
    for name in [n for n, _ in replica.named_parameters(remove_duplicate=False)]:
        owner, _, leaf = name.rpartition(".")
        module = replica.get_submodule(owner)
        old = getattr(module, leaf)
        if id(old) not in made:  # a tied parameter's later names find it here (placeholders live until replaced)
            dtype = full[name].dtype
            made[id(old)] = nn.Parameter(torch.empty(old.shape, dtype=dtype, device=device), requires_grad=False)
        setattr(module, leaf, made[id(old)])
        del old


def replica_bytes(model: nn.Module) -> int:
    """Bytes held by `model`'s rollout replica (0 when it has none)."""
    replica = _REPLICAS.get(model)
    return 0 if replica is None else sum(p.numel() * p.element_size() for p in replica.parameters())


# ------------------------------------------------------------------------------------------------ decode engine


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _bucket_rows(r: int) -> int:
    return 1 << (r - 1).bit_length() if r <= 32 else _round_up(r, 32)


@dataclass
class _State:
    """Device-side state of R rows; the decode step reads and updates it in place (CUDA graph static inputs).

    Each row holds one sequence (a prompt's sample) at a time; a free row has done = True and position 0.
    """

    k: torch.Tensor  # [layers, R, L, kv_heads, D]
    v: torch.Tensor
    tokens: torch.Tensor  # [R] last sampled token
    positions: torch.Tensor  # [R] position (= cache slot) of `tokens`
    done: torch.Tensor  # [R] bool
    step: torch.Tensor  # [R] tokens the row's sequence has so far = its next output column
    u: torch.Tensor  # [R, T + 1] fp32: the row's sequence's uniforms, one per step (column T: never used)
    stop_ids: torch.Tensor  # [n_stop] (-1 = none)
    out_tokens: torch.Tensor  # [R, T + 1]: column T takes the writes of rows that ended by length
    out_logprobs: torch.Tensor  # [R, T + 1] fp32
    out_raw: torch.Tensor  # [R, T + 1] fp32
    params: SamplingParams = field(default_factory=SamplingParams)
    fused: bool = False  # the model's fused decode kernels (kernels/norm.py, rope.py, swiglu.py); on for CUDA
    graphs: OrderedDict = field(default_factory=OrderedDict)  # (window, params, n_stop) -> CUDAGraph, LRU order


def _decode_step(model: nn.Module, st: _State, window: int) -> None:
    """One token for every live row: the function CUDA graphs capture and CPU runs as is. Done rows compute too
    (cheaper than compacting) but neither advance nor write anywhere that is read."""
    cache = KVCache.wrap(st.k[:, :, :window], st.v[:, :, :window], fused=st.fused)
    logits = model(st.tokens[:, None], st.positions[:, None], kv_cache=cache)[:, 0]  # [R, V] in the model dtype
    sample_step(logits, st.params, st.u, st.step, st.out_tokens, st.out_logprobs, st.out_raw, st.tokens,
                st.positions, st.done, st.stop_ids)


def cache_length(tokens: int, limit: int) -> int:
    """Cache slots per row (L) for a call whose longest sequence is `tokens` (longest prompt + max_new_tokens):
    whole windows, and beyond 8 windows one of 4 lengths per doubling (512, 640, 768, 896, 1024, 1280, ...), so
    calls whose longest prompts differ share a decode state and its graphs (the cost: at most 25% more slots than
    the call needs); at most `limit` (the model's max_position_embeddings), rounded up to a window."""
    n = -(-tokens // _WINDOW)
    step = 1 << max(0, (n - 1).bit_length() - 3)
    return min(_round_up(n, step), -(-limit // _WINDOW)) * _WINDOW


def graph_key(window: int, params: SamplingParams, fused: bool, n_stop: int) -> tuple:
    """What a captured decode step depends on besides its state's shapes (R, L, T): the attention window, the
    sampling parameters (constants in the captured kernels), the fused or plain decode path, and the padded number
    of stop ids (their values are read from a static tensor)."""
    return (window, params, fused, n_stop)


def graph_capacity(L: int) -> int:
    """Graphs a decode state of cache length L keeps, least recently used evicted: every window of a call over the
    whole cache (L / _WINDOW of them), for two sampling setups in turn. A call walks its windows in order, so an LRU
    smaller than that misses on every window of every call, and each miss is a capture (eager warm-up steps, a
    synchronize, a graph instantiation). The graphs share one memory pool, so more of them cost little memory."""
    return 2 * (L // _WINDOW)


def kv_budget_slots(*, free: int, reserved: int, allocated: int, peak: int, held: int, slot_bytes: int,
                    fraction: float = 0.4) -> int:
    """Cache slots (rows x cache length) a call may use on CUDA, from the device's memory in bytes: `free` (outside
    PyTorch, cudaMemGetInfo), `reserved` and `allocated` (PyTorch's caching allocator: reserved - allocated is
    cached and free for our tensors too), `peak` (the most ever allocated: a training step since went back down
    from there, and will need it again while the cache stays resident), `held` (this model's cache already: reused).

    The cache, the rollout replica and the graph pool stay resident through the policy update (captured graphs need
    fixed addresses), so the headroom is what is left after the training peak: free + reserved - peak; the cache
    may take `fraction` of it (before the first training step the peak does not know the step yet: the rest is
    left for it)."""
    headroom = max(free + reserved - max(peak, allocated), 0)
    return (held + int(fraction * headroom)) // slot_bytes


class _Engine:
    """Per-model owner of the flat cache buffers and the decode states (and their CUDA graphs)."""

    def __init__(self) -> None:
        self.flat_k: torch.Tensor | None = None
        self.flat_v: torch.Tensor | None = None
        self.states: dict[tuple, _State] = {}
        self.weights_key: tuple = ()
        self.pool: Any = None
        self.stats: dict[str, float] = {"prefill_forwards": 0, "prefill_tokens": 0, "decode_steps": 0,
                                        "refilled_rows": 0, "refill_stall_tokens": 0, "graph_captures": 0,
                                        "graph_capture_s": 0.0, "graphs_evicted": 0, "replica_bytes": 0}

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
                tokens=z(R), positions=z(R), done=z(R, dt=torch.bool), step=z(R), u=z(R, T + 1, dt=torch.float32),
                stop_ids=z(1), out_tokens=z(R, T + 1), out_logprobs=z(R, T + 1, dt=torch.float32),
                out_raw=z(R, T + 1, dt=torch.float32))
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
        key = graph_key(window, st.params, st.fused, st.stop_ids.numel())
        graph = st.graphs.get(key)
        if graph is None:
            if len(st.graphs) >= graph_capacity(st.k.shape[2]):
                st.graphs.popitem(last=False)
                self.stats["graphs_evicted"] += 1
            t0 = time.perf_counter()
            graph = st.graphs[key] = self.capture(model, st, window)
            self.stats["graph_captures"] += 1
            self.stats["graph_capture_s"] += time.perf_counter() - t0
        st.graphs.move_to_end(key)
        graph.replay()

    def capture(self, model: nn.Module, st: _State, window: int) -> torch.cuda.CUDAGraph:
        """Capture the decode step; the warm-up runs execute it, so the small state is restored after each one
        (the cache slots and output columns they write are rewritten by the real step before anything reads them)."""
        small = (st.tokens, st.positions, st.done, st.step)
        saved = [t.clone() for t in small]

        def restore() -> None:
            for t, s in zip(small, saved):
                t.copy_(s)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                _decode_step(model, st, window)
                restore()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # capture_begin/end rather than `with torch.cuda.graph(...)`, whose entry also empties the caching allocator
        # (and the pinned host cache): that would hand the training step's cached blocks back to the driver.
        torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=self.pool)
            try:
                _decode_step(model, st, window)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()  # so the caller's capture time is the whole of it
        return graph


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Engine (its cache and graphs)


def _engine(model: nn.Module) -> _Engine:
    if model not in _ENGINES:
        _ENGINES[model] = _Engine()
    return _ENGINES[model]


def free_cache(model: nn.Module) -> None:
    """Drop the KV cache, CUDA graphs and rollout replica `generate` keeps for `model` between calls."""
    _ENGINES.pop(model, None)
    _REPLICAS.pop(model, None)


def sampler_stats(model: nn.Module) -> dict[str, float]:
    """Counters since the model's first `generate`: prefill forwards and tokens, decode steps, rows refilled while
    others decoded, the most prompt tokens (padded) prefilled at one look while rows were decoding (how long a
    refill stalls them; at most _PREFILL_TOKENS), graph captures, seconds spent capturing, graphs evicted from the
    LRU; and the bytes of the rollout replica held now (FSDP2 models)."""
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
    refill: bool = True,
    fused_kernels: bool | None = None,
    replica: bool | None = None,
) -> list[Completion]:
    """Sample `n` continuations of each prompt (token-id lists) with a KV cache; returns len(prompts) * n
    Completions ordered by (prompt_index, sample_index).

    stop_token_ids: None = the tokenizer's `stop_ids` (EOS + generation-config eos ids) when a tokenizer is given,
        else none; () = no stop tokens. stop_strings need `tokenizer`.
    max_batch_tokens: bounds rows x cache length (None: every sequence gets a row on CPU; `kv_budget_slots` of
        the device's memory on CUDA). refill: when the rows cannot hold every sequence, start pending sequences in
        rows as they finish (True), or only once every row has finished (False: whole batches, the dead rows of a
        long tail decode until the batch's longest row ends). Either way each completion is the same (see the promise).
    fused_kernels: decode through the model's fused kernels (Transformer.decode_fused); None = on for CUDA. On CPU
        they run under TRITON_INTERPRET=1 only (tests), else as their plain-torch references.
    replica: for an FSDP2-sharded model, decode on its `rollout_replica` (refreshed from the shards first), which
        CUDA graphs can capture; None = on for CUDA. Off: decode on the gathered model itself (`full_weights`).
    use_cuda_graphs: None = on for CUDA unless the forwards run on an FSDP-sharded model. sync_every: decode steps between looks at
        the device (all-done check, refills, stop strings).
    The cache and graphs stay allocated for the next call (see `free_cache`).
    """
    _validate(model, prompts, max_new_tokens, n, stop_strings, tokenizer)
    params = SamplingParams(float(temperature), int(top_k), float(top_p), float(min_p))
    if stop_token_ids is None:
        stop_token_ids = tuple(tokenizer.stop_ids) if tokenizer is not None else ()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    sharded = bool(fsdp_modules(model))
    if replica is None:
        replica = sharded and model.embed_tokens.weight.device.type == "cuda"
    net = rollout_replica(model) if replica else model  # what the forwards run on
    with full_weights(net):  # a no-op for an unsharded model or replica
        device = net.embed_tokens.weight.device
        if use_cuda_graphs is None:
            use_cuda_graphs = device.type == "cuda" and not fsdp_modules(net)
        use_cuda_graphs = bool(use_cuda_graphs) and device.type == "cuda"
        eng = _engine(model)
        eng.check_weights(net)
        eng.stats["replica_bytes"] = replica_bytes(model)
        cfg, dtype = net.config, net.embed_tokens.weight.dtype
        if max_batch_tokens is None and device.type == "cuda":
            slot_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
            held = 0 if eng.flat_k is None or eng.flat_k.dtype != dtype else 2 * eng.flat_k.numel() * dtype.itemsize
            max_batch_tokens = kv_budget_slots(
                free=torch.cuda.mem_get_info(device)[0], reserved=torch.cuda.memory_reserved(device),
                allocated=torch.cuda.memory_allocated(device), peak=torch.cuda.max_memory_allocated(device),
                held=held, slot_bytes=slot_bytes)

        T = max_new_tokens
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: tight prefill chunks
        longest = len(prompts[order[0]])
        L = cache_length(longest + T, cfg.max_position_embeddings)
        N = len(prompts) * n
        R = N
        if max_batch_tokens is not None:
            R = min(N, max_batch_tokens // L)
            if R == 0:
                raise ValueError(
                    f"generate: max_batch_tokens={max_batch_tokens} cannot hold one sequence of a prompt of "
                    f"{longest} tokens + {T} new tokens; need >= {L}")
        if use_cuda_graphs:  # few graph shapes; keep within the budget
            Rb = _bucket_rows(R)
            R = Rb if max_batch_tokens is None or Rb * L <= max_batch_tokens else R
        run = _Run(net, eng, [list(prompts[i]) for i in order], order, n, R, L, T, params, tuple(stop_token_ids),
                   tuple(stop_strings), tokenizer, seed, use_cuda_graphs, device, dtype,
                   device.type == "cuda" if fused_kernels is None else bool(fused_kernels))
        completions = run.loop(sync_every, refill)
    out: list[Completion | None] = [None] * N
    for c in completions:
        out[c.prompt_index * n + c.sample_index] = c
    return out  # type: ignore[return-value]


@dataclass
class _LongPrefill:
    """A prompt longer than _PREFILL_TOKENS, prefilled one chunk at a time into the row of take[0]."""

    q: int  # the prompt (index into the sorted prompts)
    take: list[tuple[int, int]]  # (row, sequence): the rows that start once its last chunk is in
    start: int = 0  # slots prefilled so far = the next chunk's first position


class _Run:
    """One `generate` call's host side: which sequence each row holds, refills, stop strings, harvesting.

    Sequences are (prompt, sample) pairs in prompt-major order over the prompts sorted longest first, so the n
    samples of a prompt usually start together and share one prefill. The device state is `_State`; the host keeps
    per row the sequence, the decode-step count when it started (for the attention window) and stop-string progress.
    """

    def __init__(self, model: nn.Module, eng: _Engine, prompts: list[list[int]], prompt_ids: list[int], n: int,
                 R: int, L: int, T: int, params: SamplingParams, stop_ids: tuple[int, ...], stops: tuple[str, ...],
                 tokenizer: Any, seed: int, use_graphs: bool, device: torch.device, dtype: torch.dtype,
                 fused: bool = False) -> None:
        self.model, self.eng, self.prompts, self.prompt_ids, self.n = model, eng, prompts, prompt_ids, n
        self.R, self.T, self.params, self.stop_ids, self.stops = R, T, params, stop_ids, stops
        self.tokenizer, self.use_graphs, self.device = tokenizer, use_graphs, device
        self.L = L
        self.N = len(prompts) * n
        st = self.st = eng.state(model.config, R, L, T, dtype, device)
        st.params = params
        st.fused = fused
        # Padded with -1 (never a token) to a power of two >= 8, so a changed stop list reuses the graphs unless its
        # length crosses a bucket.
        size = max(8, 1 << (len(stop_ids) - 1).bit_length()) if stop_ids else 8
        ids = torch.tensor(tuple(stop_ids) + (-1,) * (size - len(stop_ids)), device=device)
        if st.stop_ids.shape != ids.shape:
            st.stop_ids = ids  # a new static tensor: graphs read it, and are keyed by its size
            st.graphs.clear()
        st.stop_ids.copy_(ids)
        st.done.fill_(True)  # every row free
        st.positions.zero_()
        st.step.zero_()
        self.u = None  # [N, T + 1]: every sequence's uniforms, drawn once for the call
        if not params.greedy:
            seq = torch.arange(self.N, device=device)
            pid = torch.tensor(prompt_ids, device=device)[seq // n]
            self.u = uniform_table(seed, pid, seq % n, T + 1)
        self.row_seq: list[int | None] = [None] * R  # sequence held by each row
        self.row_base = [0] * R  # prompt length minus the decode-step count at the row's start: window bound
        self.scanned: list[int | None] = [0] * R  # see _check_stop_strings
        self.stopped: dict[int, tuple[int, str]] = {}  # row -> (tokens kept, text) from a stop string
        self.next_seq = 0
        self.pending: list[_LongPrefill] = []  # long prompts whose chunked prefill is under way (refill only)
        self.reserved: set[int] = set()  # their rows: neither free nor decoding
        self.look_tokens = 0  # prompt tokens prefilled at the current look
        self.t = 0  # decode steps run in this call
        self.result: list[Completion] = []

    def loop(self, sync_every: int, refill: bool) -> list[Completion]:
        self.fill(list(range(self.R)), budget=None)
        while True:
            if self.stops:
                self._check_stop_strings()
            done = self.st.done.tolist()
            finished = [r for r in range(self.R) if done[r] and self.row_seq[r] is not None]
            if finished:
                self.harvest(finished)
            live = [r for r in range(self.R) if self.row_seq[r] is not None]
            # While rows decode, a look prefills one chunk at most, so they wait for one chunk at most; with none
            # decoding there is nothing to stall, and everything pending is prefilled at once.
            budget = _PREFILL_TOKENS if live else None
            self.look_tokens = 0
            if self.pending:  # a long prompt's next chunk first; new prompts once it is in
                self.advance(budget)
            if not self.pending and (budget is None or self.look_tokens == 0):
                free = [r for r in range(self.R) if self.row_seq[r] is None]
                if self.next_seq < self.N and free and (refill or len(free) == self.R):
                    self.fill(free, budget)
            if live:
                self.eng.stats["refill_stall_tokens"] = max(self.eng.stats["refill_stall_tokens"], self.look_tokens)
            live = [r for r in range(self.R) if self.row_seq[r] is not None]
            if not live:
                break
            base = max(self.row_base[r] for r in live)
            # A waiting long prompt's rows write at its next chunk's start (see `advance`), inside the window: a
            # live row's prompt is at least as long (longest first); the max keeps it so under any order.
            floor = max((job.start for job in self.pending), default=0)
            for _ in range(sync_every):
                window = min(self.L, _round_up(max(base + self.t, floor) + 1, _WINDOW))  # fed positions <= base + t
                self.eng.step(self.model, self.st, window, self.use_graphs)
                self.t += 1
        return self.result

    def fill(self, free: list[int], budget: int | None) -> None:
        """Start pending sequences in `free` rows: prefill each distinct prompt once (into its first row), copy its
        slots to its other rows, sample every row's first token. `budget`: padded prefill tokens at this look (None:
        as many forwards of _PREFILL_TOKENS as it takes). A prompt longer than _PREFILL_TOKENS is prefilled in
        chunks (`advance`); under a budget it is taken alone and only its first chunk runs now."""
        C, n = _PREFILL_TOKENS, self.n
        take: list[tuple[int, int]] = []  # (row, sequence)
        width = 0
        while free[len(take):] and self.next_seq < self.N:
            s = self.next_seq
            q = s // n
            if budget is not None and (not take or take[-1][1] // n != q):
                width = max(width, min(len(self.prompts[q]), C))  # a long prompt costs one chunk per look
                if take and width * (len({x // n for _, x in take}) + 1) > budget:
                    break
            take.append((free[len(take)], s))
            self.next_seq += 1
        short = [(r, s) for r, s in take if len(self.prompts[s // n]) <= C]
        if short:
            self._start(short, self._prefill_short(short))
        for r, s in take:
            if len(self.prompts[s // n]) > C:
                if not self.pending or self.pending[-1].q != s // n:
                    self.pending.append(_LongPrefill(s // n, []))
                self.pending[-1].take.append((r, s))
                self.reserved.add(r)
        self.advance(budget)

    def _prefill_short(self, take: list[tuple[int, int]]) -> torch.Tensor:
        """Prefill the prompts of `take` (each at most _PREFILL_TOKENS) in forwards of at most _PREFILL_TOKENS
        padded tokens; returns the logits of each row's first token, fp32 [len(take), V]."""
        st, dev, n = self.st, self.device, self.n
        groups: dict[int, list[int]] = {}  # prompt -> rows
        for r, s in take:
            groups.setdefault(s // n, []).append(r)
        qs = list(groups)
        first_logits = torch.empty(len(take), self.model.config.vocab_size, dtype=torch.float32, device=dev)
        row_of = {r: i for i, (r, _) in enumerate(take)}
        i = 0
        while i < len(qs):  # chunks of similar length (sorted longest first), each prompt once
            S = len(self.prompts[qs[i]])
            j = min(len(qs), i + max(1, _PREFILL_TOKENS // S))
            chunk = qs[i:j]
            ids = torch.zeros(len(chunk), S, dtype=torch.long)
            for c, q in enumerate(chunk):
                ids[c, : len(self.prompts[q])] = torch.tensor(self.prompts[q])
            ids = ids.to(dev)
            lengths = torch.tensor([len(self.prompts[q]) for q in chunk], device=dev)
            heads = torch.tensor([groups[q][0] for q in chunk], device=dev)
            pos = torch.arange(S, device=dev).expand(len(chunk), S)
            hidden = self.model(ids, pos, kv_cache=KVCache.wrap(st.k, st.v, heads, prefill=True),
                                return_hidden=True)  # [q, S, H]
            last = self.model.lm_head(hidden[torch.arange(len(chunk), device=dev), lengths - 1]).float()  # [q, V]
            at = [(row_of[r], c) for c, q in enumerate(chunk) for r in groups[q]]
            first_logits[torch.tensor([a for a, _ in at], device=dev)] = last[torch.tensor([c for _, c in at],
                                                                                           device=dev)]
            self._copy_slots([(groups[q][0], r) for q in chunk for r in groups[q][1:]], S)
            self._count_prefill(ids.numel())
            i = j
        return first_logits

    def advance(self, budget: int | None) -> None:
        """Prefill the next chunk of the pending long prompt (budget: one chunk, however large the budget; None:
        every chunk of every pending prompt), and start its rows once its last chunk is in.

        Chunk 0 attends causally over its own keys (a cache flagged prefill); chunk k > 0 writes its keys at its
        positions and attends over the row's cache slots [0, end) with an offset-causal mask (core.model, the
        continuing-chunk branch). Between looks the row's prompt is incomplete: it stays done (decode steps skip
        it) at the position of its next chunk's first slot, the one slot its decode writes touch and one the next
        chunk rewrites before anything reads it (and the attention window covers it, see `loop`).
        """
        st, dev = self.st, self.device
        while self.pending:
            job = self.pending[0]
            prompt, head = self.prompts[job.q], job.take[0][0]
            start, end = job.start, min(job.start + _PREFILL_TOKENS, len(prompt))
            ids = torch.tensor([prompt[start:end]], device=dev)
            pos = torch.arange(start, end, device=dev)[None]
            if start == 0:
                cache = KVCache.wrap(st.k, st.v, torch.tensor([head], device=dev), prefill=True)
            else:  # the head row's first `end` slots: keys [0, end), no mask or read beyond them
                cache = KVCache.wrap(st.k[:, head : head + 1, :end], st.v[:, head : head + 1, :end])
            hidden = self.model(ids, pos, kv_cache=cache, return_hidden=True)  # [1, end - start, H]
            self._count_prefill(ids.numel())
            job.start = end
            rows = [r for r, _ in job.take]
            if end < len(prompt):
                st.positions[torch.tensor(rows, device=dev)] = end
            else:
                last = self.model.lm_head(hidden[:, -1]).float()  # [1, V]
                self.pending.pop(0)
                self.reserved.difference_update(rows)
                self._copy_slots([(head, r) for r in rows[1:]], len(prompt))
                self._start(job.take, last.repeat(len(rows), 1))
            if budget is not None:
                return

    def _copy_slots(self, pairs: list[tuple[int, int]], S: int) -> None:
        """Copy cache slots [0, S) from row a to row b for each (a, b): a prompt's other samples share its prefill."""
        if pairs:
            src = torch.tensor([a for a, _ in pairs], device=self.device)
            dst = torch.tensor([b for _, b in pairs], device=self.device)
            for cache in (self.st.k, self.st.v):
                cache[:, dst, :S] = cache[:, src, :S]

    def _count_prefill(self, tokens: int) -> None:
        self.eng.stats["prefill_forwards"] += 1
        self.eng.stats["prefill_tokens"] += tokens
        self.look_tokens += tokens

    def _start(self, take: list[tuple[int, int]], first_logits: torch.Tensor) -> None:
        """Rows of `take` (row, sequence), their prompts prefilled, begin decoding: sample each row's first token
        from first_logits [len(take), V] fp32."""
        st, dev, n = self.st, self.device, self.n
        rows = torch.tensor([r for r, _ in take], device=dev)
        seqs = torch.tensor([s for _, s in take], device=dev)
        u0 = None
        if self.u is not None:
            st.u[rows] = self.u[seqs]
            u0 = self.u[seqs, 0]
        tokens, logprobs, raw = sample(first_logits, self.params, u0)
        st.out_tokens[rows, 0], st.out_logprobs[rows, 0], st.out_raw[rows, 0] = tokens, logprobs, raw
        st.tokens[rows] = tokens
        st.positions[rows] = torch.tensor([len(self.prompts[s // n]) for _, s in take], device=dev)
        st.step[rows] = 1
        st.done[rows] = (tokens[:, None] == st.stop_ids).any(-1) | (self.T == 1)
        if self.t > 0:
            self.eng.stats["refilled_rows"] += len(take)
        for r, s in take:
            self.row_seq[r] = s
            self.row_base[r] = len(self.prompts[s // n]) - self.t
            self.scanned[r] = 0
            self.stopped.pop(r, None)

    def harvest(self, rows: list[int]) -> None:
        """Turn finished rows into Completions and free them (position 0: a free row's writes stay in range)."""
        st, n = self.st, self.n
        idx = torch.tensor(rows, device=self.device)
        counts = st.step[idx].tolist()
        tokens, logprobs, raw = st.out_tokens[idx].tolist(), st.out_logprobs[idx].tolist(), st.out_raw[idx].tolist()
        st.positions[idx] = 0
        stop_set = set(self.stop_ids)
        for i, r in enumerate(rows):
            s = self.row_seq[r]
            toks = tokens[i][: counts[i]]
            end = next((k + 1 for k, x in enumerate(toks) if x in stop_set), None)
            reason = "stop" if end is not None else "length"
            text = None
            if end is not None:
                toks = toks[:end]
            if r in self.stopped and self.stopped[r][0] <= len(toks):
                keep, text = self.stopped[r]
                toks, reason = toks[:keep], "stop"
            elif self.tokenizer is not None:
                text = self.tokenizer.decode(toks[:-1] if reason == "stop" else toks)
            m = len(toks)
            self.result.append(Completion(self.prompt_ids[s // n], s % n, toks, logprobs[i][:m], raw[i][:m], reason,
                                          text))
            self.row_seq[r] = None

    def _check_stop_strings(self) -> None:
        """Search the text each live row added since the last check; mark rows that produced a stop string done.

        scanned[r]: characters of row r's text already searched, None once the row is finished (nothing to look at).
        """
        st = self.st
        rows = [r for r in range(self.R) if self.row_seq[r] is not None and self.scanned[r] is not None]
        if not rows:
            return
        idx = torch.tensor(rows, device=self.device)
        done, counts, tokens = st.done[idx].tolist(), st.step[idx].tolist(), st.out_tokens[idx].tolist()
        stop_set, longest, newly = set(self.stop_ids), max(len(s) for s in self.stops), []
        for i, r in enumerate(rows):
            toks = tokens[i][: counts[i]]
            if done[i]:  # ended by a stop token or length: search only up to it, one last time
                toks = toks[: next((k + 1 for k, x in enumerate(toks) if x in stop_set), len(toks))]
            # Back up by the longest stop string (it may span the boundary) and a few characters (a multi-byte
            # character split across tokens decodes differently once complete).
            hit, self.scanned[r] = _find_stop_string(self.tokenizer, toks, self.stops,
                                                     max(0, self.scanned[r] - longest - 4))
            if hit is not None:
                self.stopped[r] = hit
                newly.append(r)
            if hit is not None or done[i]:
                self.scanned[r] = None
        if newly:
            st.done[torch.tensor(newly, device=self.device)] = True
