"""One decoder-only transformer for the Llama-3 (3, 3.1, 3.2), Qwen2/2.5 and Qwen3 families.

The three families differ only in switches on one architecture: RMSNorm -> grouped-query attention with RoPE ->
RMSNorm -> SwiGLU MLP, pre-norm residual blocks. Qwen2 adds a bias to the q/k/v projections, Qwen3 an RMSNorm on
each query and key head before RoPE, Llama-3.1+ rescales RoPE frequencies ("llama3" scaling). Module and parameter
names follow Hugging Face's, minus the leading "model.", so checkpoint conversion (core/checkpoint.py) is a rename.

What this file is for:
  - `Transformer(cfg)(input_ids [B, S]) -> logits [B, S, V]`, like any causal LM.
  - `return_hidden=True` gives the final normed hidden states [B, S, H] instead: the fused log-prob kernel
    (kernels/logprob.py) takes hidden [T, H] and `model.lm_head.weight`, so training never builds logits.
  - Packed sequences: pass `position_ids` [B, S] that restart at 0 at each document; tokens attend only within
    their own document (flash-attn varlen on CUDA when installed, otherwise SDPA with a block-diagonal causal mask).
  - The KV-cache seam: pass a `KVCache` and `position_ids`; each layer writes its keys/values at those positions
    and attends to cache slots 0..position (or, for a cache flagged `prefill`, only to the forward's own keys). A
    cache flagged `fused` sends one-token decode forwards through `decode_fused` (Triton kernels: norm + residual,
    RoPE + KV write, SwiGLU). The sampler (core/sampler.py) owns the decoding loop; this file only reads and writes
    the buffers.
  - `init_weights()` for training from scratch, and meta-device construction (`with torch.device("meta")`), then
    `to_empty(...)` and loading or `init_weights()` (FSDP2 shards before materialising).

What it is not: a generation loop, a tokenizer, or a parallelism wrapper (see core/sampler.py, core/tokenizer.py,
core/distributed.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from posttrain.kernels.logprob import linear_logprob
from posttrain.kernels.norm import rms_norm
from posttrain.kernels.rope import rope_kv_write
from posttrain.kernels.swiglu import swiglu

try:  # optional: flash-attn's varlen kernel for packed sequences on CUDA
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    HAS_FLASH_ATTN = True
except Exception:  # ImportError, or a broken CUDA build: SDPA serves then
    HAS_FLASH_ATTN = False


ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Hyper-parameters of one model. Field names are ours; core/checkpoint.py maps them to config.json."""

    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    # None, or the Llama-3 scaling {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}: the only scaling the three families ship with.
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2/2.5
    qk_norm: bool = False  # Qwen3
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    architecture: str = "LlamaForCausalLM"  # which HF class save_hf writes
    init_std: float = 0.02
    extra_hf_config: dict[str, Any] = field(default_factory=dict)  # bos/eos ids etc., carried through save_hf

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"model.architecture: unknown {self.architecture!r}; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ValueError(
                    f"model.rope_scaling: rope_type {kind!r} is not supported; supported: 'llama3', 'default' or none"
                )

    def num_params(self, *, embeddings: bool = True) -> int:
        H, I, D = self.hidden_size, self.intermediate_size, self.head_dim
        attn = H * D * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += D * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * D
        block = attn + 3 * H * I + 2 * H
        n = self.num_layers * block + H
        if embeddings:
            n += self.vocab_size * H * (1 if self.tie_word_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), matmuls and attention scores included."""
        n = self.num_params(embeddings=False) + self.vocab_size * self.hidden_size  # lm-head matmul counts
        attn = 2 * self.num_layers * seq_len * self.num_heads * self.head_dim  # QK^T and PV, causal half
        return 6 * n + 6 * attn

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as the reference implementations do (bit-for-bit parity).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32, with Llama-3 scaling applied when configured.

    Computed on the fly (D/2 numbers) rather than kept as a buffer, so meta-device construction, `.to(dtype)` and
    FSDP never touch it and it is always fp32.
    """
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D))
    s = cfg.rope_scaling
    if s is not None and s.get("rope_type", s.get("type")) == "llama3":
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(cfg: ModelConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, S] -> cos, sin [B, S, D] (the half-split layout: both halves share frequencies)."""
    inv_freq = rope_inv_freq(cfg, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, S, D/2], fp32 for long positions
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, D]; cos, sin [B, S, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys and values, k and v: [layers, B, max_len, kv_heads, head_dim].

    A plain container (the sampler sizes it, reuses it and copies rows between slots); the model writes
    `k[layer, b, position_ids[b, s]]` during its forward and reads slots 0..position for each query.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    row_index: torch.Tensor | None = None  # [B] long: cache row of each batch row; None = row b is row b
    prefill: bool = False  # the forward holds whole prompts from position 0: attend over its own keys only
    fused: bool = False  # decode through the fused kernels (Transformer.decode_fused)

    @classmethod
    def wrap(cls, k: torch.Tensor, v: torch.Tensor, row_index: torch.Tensor | None = None,
             prefill: bool = False, fused: bool = False) -> KVCache:
        """A cache over existing buffers k, v [layers, rows, max_len, kv_heads, head_dim], e.g. strided views of a
        larger cache (every `n`-th row, the first `L` slots) or a flat buffer reshaped; writes go to their storage.
        row_index [B]: batch row b of a forward writes cache row row_index[b] (a prefill into scattered rows).
        prefill: the forward's rows are whole prompts from position 0, so it attends over its own keys only (causal,
        no mask over the cache length, no cache read); without it a forward attends over cache slots 0..position
        (decode, or a chunk that continues cached tokens).
        fused: a one-token decode forward runs Transformer.decode_fused (fewer kernels, same numbers)."""
        if k.shape != v.shape or k.dim() != 5:
            raise ValueError(f"KVCache.wrap: k and v must both be [layers, B, max_len, kv_heads, head_dim], got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        view = object.__new__(cls)
        view.k, view.v, view.row_index, view.prefill, view.fused = k, v, row_index, prefill, fused
        return view

    def rows(self, start: int, n: int) -> KVCache:
        """A cache over rows [start, start + n) that shares storage with this one (a view, not a copy)."""
        return KVCache.wrap(self.k[:, start : start + n], self.v[:, start : start + n])

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


# -------------------------------------------------------------------------------------- attention backend choice

# Backends tried, in order, for the KV-cache forwards (training keeps SDPA's own choice: its numerics are pinned).
# Decode and continuing chunks carry a mask, which rules CUDA flash out; prefill is plain causal. "DEFAULT" = no
# pinning, SDPA's own per-call choice: on CPU that is its flash kernel whenever the inputs allow, else math, and
# pinning it there would only add the context switch's host time (~25 us per call, 5% of a tiny model's decode step)
# for the same kernel.
SDPA_PREFERENCE: dict[tuple[str, str], list[str]] = {
    ("cuda", "prefill"): ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"],
    ("cuda", "decode"): ["EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"],
    ("cpu", "prefill"): ["DEFAULT"],
    ("cpu", "decode"): ["DEFAULT"],
    # A prompt chunk continuing cached tokens (the sampler's chunked prefill of a long prompt): masked, like decode.
    ("cuda", "chunk"): ["EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"],
    ("cpu", "chunk"): ["DEFAULT"],
}
_SDPA_CHOSEN: dict[tuple, str] = {}  # (phase, device type, dtype, masked, gqa) -> the backend that ran; see sdpa()


def sdpa_backends() -> dict[tuple, str]:
    """The SDPA backend each cached-forward kind runs: {(phase, device, dtype, masked, gqa): backend name}."""
    return dict(_SDPA_CHOSEN)


def sdpa(phase: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
         is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention pinned to one backend per kind of call, chosen on first use and logged.

    The first call of a kind tries SDPA_PREFERENCE in order; a backend that refuses (RuntimeError) is skipped with
    a warning, and the first that runs is kept. A kept backend that later refuses a new shape is dropped and the
    choice is made again, so a refusal never crashes a rollout. Runs eagerly before any CUDA graph captures it.
    """
    key = (phase, q.device.type, q.dtype, attn_mask is not None, enable_gqa)
    kw = dict(attn_mask=attn_mask, is_causal=is_causal)
    if enable_gqa:
        kw["enable_gqa"] = True
    chosen = _SDPA_CHOSEN.get(key)
    if chosen == "DEFAULT":
        return F.scaled_dot_product_attention(q, k, v, **kw)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if chosen is not None:
        try:
            with sdpa_kernel([getattr(SDPBackend, chosen)]):
                return F.scaled_dot_product_attention(q, k, v, **kw)
        except RuntimeError as e:
            warnings.warn(f"sdpa: backend {chosen} refused {phase} q{tuple(q.shape)} k{tuple(k.shape)} "
                          f"({str(e).splitlines()[0]}); choosing again", stacklevel=2)
            del _SDPA_CHOSEN[key]
    names = SDPA_PREFERENCE.get((q.device.type, phase), ["MATH"])
    for name in names:
        try:
            with warnings.catch_warnings():  # SDPA explains each refusal as a UserWarning; one line below is enough
                warnings.simplefilter("ignore")
                with contextlib.nullcontext() if name == "DEFAULT" else sdpa_kernel([getattr(SDPBackend, name)]):
                    out = F.scaled_dot_product_attention(q, k, v, **kw)
        except RuntimeError as e:
            if name == names[-1]:
                raise
            warnings.warn(f"sdpa: backend {name} refused {phase} q{tuple(q.shape)} k{tuple(k.shape)} "
                          f"({str(e).splitlines()[0]}); falling back to the next of {names}", stacklevel=2)
            continue
        _SDPA_CHOSEN[key] = name
        log.info("sdpa: %s on %s %s (masked=%s, gqa=%s) runs %s", phase, q.device.type, q.dtype,
                 attn_mask is not None, enable_gqa, name)
        return out
    raise AssertionError("unreachable")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        H, D = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, D
        self.q_proj = nn.Linear(H, cfg.num_heads * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(H, cfg.num_kv_heads * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(H, cfg.num_kv_heads * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * D, H, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionLayout,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            cache_k, cache_v = cache  # [rows, max_len, kv_heads, D]
            cache_k[attn.cache_rows, attn.position_ids] = k
            cache_v[attn.cache_rows, attn.position_ids] = v
            if attn.prefill:  # whole prompts from position 0: causal over the chunk's own keys, no cache read
                out = sdpa("prefill", q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                           enable_gqa=self.num_heads != self.num_kv_heads)
                return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))
            if S > 1:  # a chunk continuing cached tokens: attend over this row's cache slots 0..position
                # The offset-causal mask [B, 1, S, max_len] is explicit, not is_causal: with fewer queries than keys,
                # SDPA's is_causal is the top-left triangle (query i sees keys 0..i), while a chunk at offset `start`
                # needs query i to see keys 0..start+i (bottom-right), and flash-attn's own kernels align the other
                # way; a mask means the same on every backend. Masked kernels take no enable_gqa, so the rows' keys
                # and values are gathered and expanded to the query heads (head h reads kv head h // G), once per
                # layer: [B, max_len, heads, D], a chunk's cost, not a decode step's.
                rows, G = attn.cache_rows[:, 0], self.num_heads // self.num_kv_heads
                ck, cv = cache_k[rows], cache_v[rows]  # [B, max_len, kv_heads, D]
                if G > 1:
                    ck, cv = ck.repeat_interleave(G, dim=2), cv.repeat_interleave(G, dim=2)
                out = sdpa("chunk", q.transpose(1, 2), ck.transpose(1, 2), cv.transpose(1, 2), attn_mask=attn.mask)
                return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))
            # Decode: attend over the cache. Grouped heads without copying K/V: the G query heads that share a kv
            # head become G*S query rows of that kv head, so SDPA sees kv_heads "heads" and reads the cache in place
            # (masked SDPA kernels do not take enable_gqa, and repeat_interleave would copy the cache every step).
            G, KV, D = self.num_heads // self.num_kv_heads, self.num_kv_heads, self.head_dim
            q = q.view(B, S, KV, G, D).permute(0, 2, 3, 1, 4).reshape(B, KV, G * S, D)
            out = sdpa("decode", q, cache_k.transpose(1, 2), cache_v.transpose(1, 2),
                       attn_mask=attn.mask)  # mask [B, 1, G*S, max_len], S = 1
            out = out.view(B, KV, G, S, D).permute(0, 3, 1, 2, 4)  # [B, S, kv_heads, G, D]: head = kv * G + g
            return self.o_proj(out.reshape(B, S, self.num_heads * D))

        if attn.cu_seqlens is not None:  # flash-attn varlen over packed documents, [T, heads, D] layout
            out = flash_attn_varlen_func(
                q.reshape(B * S, self.num_heads, self.head_dim),
                k.reshape(B * S, self.num_kv_heads, self.head_dim),
                v.reshape(B * S, self.num_kv_heads, self.head_dim),
                attn.cu_seqlens, attn.cu_seqlens, attn.max_seqlen, attn.max_seqlen, causal=True,
            )
        elif attn.use_flash:
            out = flash_attn_func(q, k, v, causal=True)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, D]
            if attn.mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                # Masked SDPA kernels do not take grouped heads, so expand K/V (a view-and-copy of S x kv rows).
                rep = self.num_heads // self.num_kv_heads
                if rep > 1:
                    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask)
            out = out.transpose(1, 2)
        return self.o_proj(out.reshape(B, S, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LMHead(nn.Linear):
    """The output projection. Called with `targets`, it returns their log-probs through the fused kernel instead
    of logits, so [T, V] logits never exist in training. It stays a module call either way so that FSDP2 gathers
    its weight (its hooks fire on `__call__`, not on reading `.weight`)."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None,
                temperature: float = 1.0, head_loss: Callable[[torch.Tensor, torch.Tensor], Any] | None = None) -> Any:
        if head_loss is not None:  # e.g. the GRPO loss from hidden states (train/grpo.py), with the gathered weight
            return head_loss(hidden, self.weight)
        if targets is None:
            return super().forward(hidden)

        shape = targets.shape
        logp = linear_logprob(hidden.reshape(-1, hidden.shape[-1]), self.weight, targets.reshape(-1),
                              temperature=temperature)
        # A fresh tensor, not a view: FSDP2 hooks backward onto module outputs, which in-place ops on views would lose.
        return logp.view(shape).clone()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        # Set by core.distributed.parallelize. The recomputed region is inside forward, so FSDP2's hooks on this
        # module's __call__ run once per step, not again during recomputation (and parameter names do not change).
        self.activation_checkpointing = False

    def forward(self, x, cos, sin, attn, cache=None) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled() and cache is None:
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, attn, use_reentrant=False)
        return self._forward(x, cos, sin, attn, cache)

    def _forward(self, x, cos, sin, attn, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class AttentionLayout:
    """How the tokens of one forward may attend, decided once per forward and shared by every layer."""

    position_ids: torch.Tensor  # [B, S]
    # bool [B, 1, S, S_kv], True = may attend; None = plain causal. With a cache: additive float [B, 1, G, max_len]
    # for one-token decode, [B, 1, S, max_len] for a multi-token chunk continuing cached tokens.
    mask: torch.Tensor | None = None
    use_flash: bool = False  # flash_attn_func, causal, no packing
    cu_seqlens: torch.Tensor | None = None  # int32 [docs + 1], flash-attn varlen over packed documents
    max_seqlen: int = 0
    cache_rows: torch.Tensor | None = None  # [B, 1] with a cache: the cache row each batch row writes
    prefill: bool = False  # with a cache flagged prefill: whole prompts from position 0, attending over own keys


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [B, S] restarting at 0 per document -> bool [B, 1, S, S]: causal and within one document."""
    doc = (position_ids == 0).cumsum(-1)  # [B, S] document index per token
    S = position_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Document boundaries of the flattened [B*S] token stream for flash-attn varlen (one host sync)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    if starts.numel() == 0 or starts[0] != 0:  # a row that does not start a document still starts a sequence
        starts = torch.cat([starts.new_zeros(1), starts])
    # Every row boundary is a sequence boundary too, even when a document were to continue across rows.
    row_starts = torch.arange(0, flat.numel(), position_ids.shape[1], device=flat.device)
    starts = torch.unique(torch.cat([starts, row_starts]))
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


# ----------------------------------------------------------------------------------------------------- the model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the lm-head when configured. Call again after `to_empty`, which replaces
        parameters one module at a time and so unties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise for training from scratch: N(0, std) matrices, output projections scaled by 1/sqrt(2 L)
        (each residual branch adds variance), zero biases, unit norms. Deterministic given `seed`, on any device."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, out_std, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)

    def attention_layout(self, position_ids: torch.Tensor | None, B: int, S: int, device, dtype,
                         cache: KVCache | None) -> AttentionLayout:
        if cache is not None:
            if position_ids is None:
                raise ValueError("forward with kv_cache needs position_ids [B, S]: the cache slots to write")
            rows = cache.row_index if cache.row_index is not None else torch.arange(B, device=device)
            if cache.prefill:
                # Whole prompts starting at position 0 (right-padded): each token needs only the chunk's own earlier
                # keys, so no mask over the cache length and no cache read.
                return AttentionLayout(position_ids, cache_rows=rows[:, None], prefill=True)
            # Decode, or a chunk continuing cached tokens: a query at position p sees cache slots 0..p of its own
            # row. Slots beyond p may hold stale values from an earlier request or padding; the mask hides them until
            # a later step overwrites them.
            slots = torch.arange(cache.max_len, device=device)
            mask = slots[None, None, :] <= position_ids[:, :, None]  # [B, S, max_len]
            # An additive float mask built once here, not a bool mask that SDPA would convert again in every layer.
            bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
            if S > 1:  # a continuing chunk: one mask row per token, shared by every head: [B, 1, S, max_len]
                return AttentionLayout(position_ids, mask=bias[:, None], cache_rows=rows[:, None])
            # Decode: one row per query head in a kv group, as the decode branch of Attention lays queries out.
            G = self.config.num_heads // self.config.num_kv_heads
            bias = bias[:, None, None].expand(B, 1, G, S, cache.max_len).reshape(B, 1, G * S, cache.max_len)
            return AttentionLayout(position_ids, mask=bias, cache_rows=rows[:, None])
        flash = HAS_FLASH_ATTN and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        if position_ids is None:
            position_ids = torch.arange(S, device=device).expand(B, S)
            return AttentionLayout(position_ids, use_flash=flash)
        if flash:
            cu, max_len = cu_seqlens_from_positions(position_ids)
            return AttentionLayout(position_ids, cu_seqlens=cu, max_seqlen=max_len)
        return AttentionLayout(position_ids, mask=document_mask(position_ids))

    def rope_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cos, sin [max_position_embeddings, D/2] fp32 of position * inv_freq (exactly what rope_cos_sin computes
        per forward), and slots = arange(max_position_embeddings): computed once per device for decode_fused.
        A cache owned by the model (not a buffer: no state-dict entry, nothing for FSDP or `.to(dtype)` to touch)."""
        cached = self.__dict__.setdefault("_rope_tables", {})
        if device not in cached:
            pos = torch.arange(self.config.max_position_embeddings, device=device)
            freqs = pos.float()[:, None] * rope_inv_freq(self.config, device)
            cached[device] = (freqs.cos(), freqs.sin(), pos)
        return cached[device]

    def decode_fused(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step through the fused kernels: tokens, positions [B] -> final normed hidden [B, H].

        Per layer 12 kernels: 2 norms with the residual add fused (kernels/norm.py), the q/k/v GEMMs (biases in
        the GEMM epilogue), RoPE + KV-cache write (kernels/rope.py), attention, o_proj, gate and up GEMMs, SwiGLU
        (kernels/swiglu.py), down_proj. Outside the layers: the embedding, the mask (2 kernels) and the first norm.
        The same arithmetic as the plain forward in the same order, so the same numbers up to the fp32 rounding of
        the norm's mean. Where Triton cannot run, each kernel's plain-torch reference runs instead.
        """
        cfg = self.config
        B, W = tokens.shape[0], cache.max_len
        HQ, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        rows = cache.row_index if cache.row_index is not None else torch.arange(B, device=tokens.device)
        cos, sin, slots = self.rope_table(tokens.device)
        x = self.embed_tokens(tokens)  # [B, H]
        # Additive mask: slots 0..position of each row. [B, 1, G, W] as a view; one kv head's G query heads share it.
        mask = torch.zeros(B, W, dtype=x.dtype, device=x.device).masked_fill_(slots[:W] > positions[:, None],
                                                                               float("-inf"))
        mask = mask[:, None, None].expand(B, 1, HQ // KV, W)
        h, res = rms_norm(x, self.layers[0].input_layernorm.weight, cfg.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            a, mlp = layer.self_attn, layer.mlp
            q = a.q_proj(h).view(B, HQ, D)
            k = a.k_proj(h).view(B, KV, D)
            v = a.v_proj(h).view(B, KV, D)
            if a.q_norm is not None:
                q, k = a.q_norm(q), a.k_norm(k)
            ck, cv = cache.k[i], cache.v[i]  # [R, W, KV, D]
            rope_kv_write(q, k, v, ck, cv, positions, rows, cos, sin)
            out = sdpa("decode", q.view(B, KV, HQ // KV, D), ck.transpose(1, 2), cv.transpose(1, 2), attn_mask=mask)
            h, res = rms_norm(a.o_proj(out.reshape(B, HQ * D)), layer.post_attention_layernorm.weight,
                              cfg.rms_norm_eps, res)
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h, res = rms_norm(mlp.down_proj(swiglu(mlp.gate_proj(h), mlp.up_proj(h))), nxt.weight,
                              cfg.rms_norm_eps, res)
        return h

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
        targets: torch.Tensor | None = None,
        temperature: float = 1.0,
        head_loss: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> Any:
        """input_ids [B, S] -> logits [B, S, V] (or final normed hidden [B, S, H] with return_hidden=True).

        targets [B, S] (token ids, -100 = ignore): return their log-probs [B, S] float32 under logits/temperature
        instead, computed by the fused kernel (0 where ignored). This is the training path.

        head_loss(hidden [B, S, H], weight [V, H]) -> anything: return what it returns instead, called inside the
        lm-head module call, so under FSDP2 `weight` is the gathered one and its gradient is reduce-scattered (reading
        `model.lm_head.weight` outside that call would see a shard). For losses other than log-probs of targets
        (kernels/grpo.linear_grpo_loss); its tensors must be fresh (not views of `hidden`) for FSDP2's backward hooks.

        position_ids [B, S]: per-token positions; a 0 starts a new document (packed sequences). With `kv_cache`
        they are also the cache slots this forward writes; row b of the batch is row b of the cache (use
        `KVCache.rows(start, n)` to run a forward over a block of cache rows).
        """
        B, S = input_ids.shape
        if kv_cache is not None and kv_cache.fused and S == 1 and not kv_cache.prefill and targets is None:
            if position_ids is None:
                raise ValueError("forward with kv_cache needs position_ids [B, S]: the cache slots to write")
            hidden = self.decode_fused(input_ids[:, 0], position_ids[:, 0], kv_cache)[:, None]
            return hidden if return_hidden else self.lm_head(hidden)
        x = self.embed_tokens(input_ids)
        attn = self.attention_layout(position_ids, B, S, x.device, x.dtype, kv_cache)
        cos, sin = rope_cos_sin(self.config, attn.position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            cache = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i])
            x = layer(x, cos, sin, attn, cache)
        x = self.norm(x)
        if return_hidden:
            return x
        if head_loss is not None:
            return self.lm_head(x, head_loss=head_loss)
        if targets is not None:
            return self.lm_head(x, targets, temperature)
        return self.lm_head(x)
