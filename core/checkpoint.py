"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded with an index).

`load_hf(path)` builds a `Transformer` on the meta device, materialises it empty in the target dtype and device,
then copies one tensor at a time from `safe_open` (no whole-file copies in RAM), checking every name and shape.
`save_hf(model, path)` writes what `transformers.AutoModelForCausalLM.from_pretrained` and vLLM read, atomically.

This is the single-process path. core/distributed.py reuses `read_hf_config`, `hf_weight_map` and the name
mapping here to load only each rank's shard into an FSDP2 model.

Parameter names are Hugging Face's without the leading "model." (see core/model.py), so the mapping is a prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from posttrain.core.model import ARCHITECTURES, ModelConfig, Transformer

MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json",
)
# Keys some checkpoints carry that hold nothing a forward needs (old transformers saved RoPE buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# config.json fields carried through unchanged so a round trip keeps token ids and generation defaults.
CARRIED_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as one of the supported models; the message names the file and the key."""


# --------------------------------------------------------------------------------------------------- names


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face tensor name."""
    return name if name.startswith("lm_head.") else "model." + name


def our_name(name: str) -> str | None:
    """A Hugging Face tensor name -> ours, or None for a name outside the model (e.g. a vision tower)."""
    if name.startswith("lm_head."):
        return name
    if name.startswith("model."):
        return name[len("model.") :]
    return None


# -------------------------------------------------------------------------------------------------- config


def read_hf_config(path: str | os.PathLike) -> tuple[ModelConfig, torch.dtype | None]:
    """config.json of a checkpoint directory -> (ModelConfig, the dtype it declares or None)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: not found (a Hugging Face checkpoint directory has a config.json)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    return config_from_hf(raw, source=str(file)), DTYPES.get(raw.get("dtype") or raw.get("torch_dtype") or "")


def config_from_hf(raw: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Translate a transformers config dict, refusing any setting this model would silently get wrong."""
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{source}: architectures {archs!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        if key not in raw:
            raise CheckpointError(f"{source}: missing required key {key!r} for {arch}")
        return raw[key]

    def refuse(key: str, value: Any, supported: str) -> None:
        raise CheckpointError(f"{source}: {key}={value!r} is not supported (supported: {supported})")

    if raw.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", raw["hidden_act"], "'silu'")
    if raw.get("mlp_bias", False):
        refuse("mlp_bias", True, "false")
    if arch != "Qwen2ForCausalLM" and raw.get("attention_bias", False):
        refuse("attention_bias", True, f"false for {arch}")
    if raw.get("use_sliding_window", False):
        refuse("use_sliding_window", True, "false (full attention in every layer)")
    layer_types = raw.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        refuse("layer_types", sorted(set(layer_types)), "'full_attention' only")

    # transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; 4.x wrote rope_theta and rope_scaling.
    rope = raw.get("rope_parameters") or {}
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            refuse("rope_scaling.rope_type", kind, "'llama3', 'default' or none")
        else:
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in keys if k not in scaling]
            if missing:
                raise CheckpointError(f"{source}: rope scaling 'llama3' lacks {', '.join(missing)}")
            scaling = {"rope_type": "llama3", **{k: scaling[k] for k in keys}}

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    try:
        return ModelConfig(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            qkv_bias=arch == "Qwen2ForCausalLM",
            qk_norm=arch == "Qwen3ForCausalLM",
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            architecture=arch,
            extra_hf_config={k: raw[k] for k in CARRIED_FIELDS if raw.get(k) is not None},
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """ModelConfig -> a config.json dict in the 4.x layout, which transformers 4.x and 5.x and vLLM all read."""
    out: dict[str, Any] = {
        "architectures": [cfg.architecture],
        "model_type": MODEL_TYPES[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.qkv_bias if cfg.architecture == "Qwen2ForCausalLM" else False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **cfg.extra_hf_config,
    }
    if cfg.architecture != "LlamaForCausalLM":
        out["use_sliding_window"] = False
    return out


# ------------------------------------------------------------------------------------------------- weights


def hf_weight_map(path: str | os.PathLike) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it (single file or sharded with an index)."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (need a 'weight_map' object): {e}") from None
        files = {f: path / f for f in set(weight_map.values())}
        for f in files.values():
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name}, which is not in {path}")
        return {name: files[f] for name, f in weight_map.items()}
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")


def expected_tensors(model: Transformer) -> dict[str, tuple[int, ...]]:
    """Our name -> shape, for every distinct tensor a checkpoint must provide (a tied lm-head is not one)."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}  # named_parameters skips the tied alias


def check_tensor_names(model: Transformer, weight_map: Mapping[str, Path], source: str) -> dict[str, str]:
    """Match checkpoint names to model parameters: ours -> HF name. Raises on anything missing or unused."""
    expected = expected_tensors(model)
    found: dict[str, str] = {}
    unused = []
    for name in weight_map:
        ours = our_name(name)
        if ours in expected:
            found[ours] = name
        elif name.endswith(IGNORED_SUFFIXES) or (ours == "lm_head.weight" and model.config.tie_word_embeddings):
            continue  # a tied checkpoint may still store the lm-head copy; transformers ignores it too
        else:
            unused.append(name)
    missing = [hf_name(n) for n in expected if n not in found]
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unused:
            parts.append(f"unused tensors {unused[:8]}{' ...' if len(unused) > 8 else ''}")
        raise CheckpointError(f"{source}: {'; '.join(parts)} (config says {model.config.architecture})")
    return found


def load_hf(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Transformer:
    """Read a Llama/Qwen2/Qwen3 Hugging Face checkpoint directory into a Transformer on `device`.

    dtype: None keeps the dtype config.json declares (float32 if it declares none).
    """
    path = Path(path)
    cfg, declared = read_hf_config(path)
    dtype = dtype or declared or torch.float32
    weight_map = hf_weight_map(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    names = check_tensor_names(model, weight_map, str(path))  # before allocating anything
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for ours, name in names.items():
        by_file.setdefault(weight_map[name], []).append(ours)
    with torch.no_grad():
        for file, ours_names in by_file.items():
            with safe_open(file, framework="pt", device=str(device)) as f:
                for ours in ours_names:
                    name = names[ours]
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(params[ours].shape):
                        raise CheckpointError(
                            f"{file}: tensor {name} has shape {list(shape)}, the config implies "
                            f"{list(params[ours].shape)}"
                        )
                    params[ours].copy_(f.get_tensor(name))
    return model


def save_hf(
    model: Transformer,
    path: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 2**30,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` as a Hugging Face checkpoint directory at `path`, atomically (temp dir, then rename).

    state_dict: full (unsharded) tensors to write instead of the model's own, e.g. gathered from FSDP2 ranks;
    `model` then only provides the config. dtype: cast tensors on the way out (default: as they are).
    Shards above `max_shard_bytes` per file, with a model.safetensors.index.json, as transformers does.
    """
    path = Path(path)
    cfg = model.config
    sd = dict(state_dict) if state_dict is not None else dict(model.state_dict())
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    expected = expected_tensors(model)
    if set(sd) != set(expected):
        raise CheckpointError(
            f"save_hf: state dict names differ from the model's: missing {sorted(set(expected) - set(sd))[:8]}, "
            f"unexpected {sorted(set(sd) - set(expected))[:8]}"
        )
    tensors = {}
    for ours, t in sd.items():
        t = t.detach().to("cpu", dtype=dtype or t.dtype).contiguous()
        tensors[hf_name(ours)] = t
    out_dtype = next(iter(tensors.values())).dtype

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, out_dtype), indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
        # Swap in: an existing directory is moved aside first and removed only once the new one is in place.
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / path.name)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
