"""core/checkpoint.py: logits parity with transformers both ways, sharding, and the promised errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain.core.checkpoint import CheckpointError, load_hf, save_hf
from posttrain.core.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
CASES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "llama-tied": ("LlamaForCausalLM", "LlamaConfig", {"tie_word_embeddings": True}),
    "llama3.1-rope-scaling": ("LlamaForCausalLM", "LlamaConfig", {"rope_scaling": LLAMA3_SCALING}),
    "llama3.2-tied-scaled": ("LlamaForCausalLM", "LlamaConfig",
                             {"rope_scaling": LLAMA3_SCALING, "tie_word_embeddings": True}),
    "qwen2-bias": ("Qwen2ForCausalLM", "Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 24}),
}


def hf_model(case: str, seed: int = 0):
    cls_name, cfg_name, extra = CASES[case]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=5000.0,  # not the default, so a misread theta shows in the logits
        max_position_embeddings=256, rms_norm_eps=1e-5, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).float().eval()
    with torch.no_grad():  # HF zero-initialises biases and sets norms to one: randomise so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers_both_ways(case, tmp_path):
    ref = hf_model(case)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.config.tie_word_embeddings == ref.config.tie_word_embeddings
    ids = torch.randint(0, 101, (2, 48))  # past original_max_position_embeddings, where llama3 scaling bites
    with torch.no_grad():
        want = ref(ids).logits
        err = (ours(ids) - want).abs().max().item()
    assert err < 1e-4, err

    save_hf(ours, tmp_path / "ours")
    back = type(ref).from_pretrained(tmp_path / "ours").float().eval()
    with torch.no_grad():
        err_back = (back(ids).logits - want).abs().max().item()
    assert err_back < 1e-4, err_back


def test_sharded_round_trip_and_index(tmp_path):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                                num_kv_heads=2, architecture="Qwen2ForCausalLM", qkv_bias=True))
    m.init_weights(seed=1)
    save_hf(m, tmp_path / "ck", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / "ck" / f).is_file() for f in files)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in m.parameters())
    loaded = load_hf(tmp_path / "ck")
    for (n, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    # transformers reads the sharded directory too
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").float()
    ids = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        assert (hf(ids).logits - loaded(ids)).abs().max().item() < 1e-4


def test_load_dtype_and_device(tmp_path):
    hf_model("qwen3-qk-norm").save_pretrained(tmp_path / "hf")
    m = load_hf(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    save_hf(m, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == "qwen3"


def test_save_is_atomic_and_replaces(tmp_path):
    m = Transformer(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                                num_kv_heads=1))
    m.init_weights(seed=0)
    dest = tmp_path / "ck"
    save_hf(m, dest)
    first = load_file(dest / "model.safetensors")
    m.init_weights(seed=1)
    # A failing save (a bad state dict) leaves the previous checkpoint intact and no temporary directory behind.
    with pytest.raises(CheckpointError, match="missing"):
        save_hf(m, dest, state_dict={"norm.weight": torch.ones(32)})
    assert torch.equal(load_file(dest / "model.safetensors")["model.norm.weight"], first["model.norm.weight"])
    save_hf(m, dest)
    second = load_file(dest / "model.safetensors")
    assert not torch.equal(first["model.embed_tokens.weight"], second["model.embed_tokens.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_tokenizer_files_are_copied(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    m = Transformer(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                                num_kv_heads=1))
    save_hf(m, tmp_path / "ck", tokenizer_dir=tok)
    assert (tmp_path / "ck" / "tokenizer_config.json").read_text() == "{}"


# ---------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture
def saved(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor(saved):
    sd = load_file(saved / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        load_hf(saved)


def test_unused_tensor(saved):
    sd = load_file(saved / "model.safetensors")
    sd["model.layers.0.self_attn.rope_bias"] = torch.zeros(3)
    save_file(sd, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unused tensors.*rope_bias"):
        load_hf(saved)


def test_wrong_shape(saved):
    sd = load_file(saved / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(65)
    save_file(sd, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \[65\], the config implies \[64\]"):
        load_hf(saved)


def test_unknown_architecture(saved):
    _edit_config(saved, architectures=["MistralForCausalLM"])
    with pytest.raises(CheckpointError, match="MistralForCausalLM.*supported: LlamaForCausalLM, Qwen2ForCausalLM"):
        load_hf(saved)


def test_malformed_config_json(saved):
    (saved / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n "hidden_size": 64,,}')
    with pytest.raises(CheckpointError, match=r"config.json: malformed JSON at line 2"):
        load_hf(saved)


def test_missing_config_key(saved):
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing required key 'num_hidden_layers'"):
        load_hf(saved)


@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("use_sliding_window", True, "use_sliding_window=True is not supported"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_type='yarn' is not supported"),
    ("attention_bias", True, "attention_bias=True is not supported"),
])
def test_unsupported_config_field(saved, field, value, match):
    _edit_config(saved, **{field: value})
    with pytest.raises(CheckpointError, match=match):
        load_hf(saved)


def test_no_weights(tmp_path, saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf(saved)
