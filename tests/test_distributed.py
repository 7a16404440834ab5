"""core/distributed.py across 2 gloo ranks: sharded HF loading, reproducible from-scratch init, export, clipping."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from posttrain.core.checkpoint import CheckpointError, save_hf
from posttrain.core.model import ModelConfig, Transformer

CFG = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args) -> None:
    port = _free_port()
    mp.start_processes(_entry, args=(fn, world_size, port, *args), nprocs=world_size, start_method="spawn")


def _entry(rank, fn, world_size, port, *args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    from posttrain.core.distributed import close_distributed, init_distributed

    d = init_distributed(0, device="cpu")
    try:
        fn(d, *args)
    finally:
        close_distributed()


def _load_and_export(d, src: str, dst: str, tied: bool) -> None:
    from posttrain.core.distributed import ParallelConfig, build_model, export_hf
    from torch.distributed.tensor import DTensor

    model = build_model(ModelConfig(), d, ParallelConfig(param_dtype="float32"), init_from=src)
    assert model.config.tie_word_embeddings == tied
    # Each rank holds only its rows: a DTensor whose local shard is at most ceil(rows / 2) rows.
    w = model.layers[0].mlp.up_proj.weight
    assert isinstance(w, DTensor) and w.to_local().shape[0] == 48 // 2
    export_hf(model, dst, d)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_sharded_load_then_export_is_byte_identical(tmp_path, tied):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**CFG, tie_word_embeddings=tied, architecture="Qwen2ForCausalLM", qkv_bias=True))
    m.init_weights(seed=1)
    for layer in m.layers:  # non-zero biases, non-unit norms: every tensor distinct
        layer.self_attn.q_proj.bias.data.normal_()
        layer.input_layernorm.weight.data.normal_()
    save_hf(m, tmp_path / "src", max_shard_bytes=30_000)  # several shards: slices cross files
    spawn(_load_and_export, 2, str(tmp_path / "src"), str(tmp_path / "dst"), tied)
    src_map = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(tmp_path / "dst" / "model.safetensors", "pt") as out:
        assert sorted(out.keys()) == sorted(src_map)
        for name, file in src_map.items():
            with safe_open(tmp_path / "src" / file, "pt") as f:
                a, b = f.get_tensor(name), out.get_tensor(name)
            assert a.dtype == b.dtype and a.numpy().tobytes() == b.numpy().tobytes(), name


def _init_matches(d, out: str) -> None:
    from posttrain.core.distributed import ParallelConfig, build_model, full_state_dict

    cfg = ModelConfig(**CFG)
    model = build_model(cfg, d, ParallelConfig(param_dtype="float32"), seed=7)
    sd = full_state_dict(model)
    if d.is_main:
        torch.save(sd, out)


@pytest.mark.slow
def test_from_scratch_init_is_independent_of_world_size(tmp_path):
    spawn(_init_matches, 2, str(tmp_path / "sd.pt"))
    sd = torch.load(tmp_path / "sd.pt")
    ref = Transformer(ModelConfig(**CFG))
    ref.init_weights(seed=7)
    for name, p in ref.state_dict().items():
        assert torch.equal(sd[name], p), name


def _clip(d, out: str) -> None:
    from posttrain.core.distributed import ParallelConfig, build_model, clip_grad_norm_

    model = build_model(ModelConfig(**CFG), d, ParallelConfig(param_dtype="float32"), seed=3)
    ids = torch.arange(24).view(2, 12) % 61
    mine = ids[d.rank : d.rank + 1]
    (model(mine).float().pow(2).mean() * 2).backward()  # x world_size: FSDP averages, we want the sum
    norm = clip_grad_norm_(model.parameters(), 0.01)
    after = clip_grad_norm_(model.parameters(), 0.0)
    if d.is_main:
        torch.save({"norm": norm, "after": after}, out)


@pytest.mark.slow
def test_clip_grad_norm_on_dtensors_matches_single_process(tmp_path):
    spawn(_clip, 2, str(tmp_path / "n.pt"))
    got = torch.load(tmp_path / "n.pt")
    ref = Transformer(ModelConfig(**CFG))
    ref.init_weights(seed=3)
    ids = torch.arange(24).view(2, 12) % 61
    (ref(ids).float().pow(2).mean(dim=(1, 2)).sum()).backward()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
    assert torch.allclose(got["norm"], want, rtol=1e-5), (got["norm"], want)
    assert abs(got["after"].item() - 0.01) < 1e-5  # clipped to max_norm


def _nonfinite(d, out: str) -> None:
    from posttrain.core.distributed import ParallelConfig, build_model, clip_grad_norm_

    model = build_model(ModelConfig(**CFG), d, ParallelConfig(param_dtype="float32"), seed=3)
    before = [p.detach().to_local().clone() for p in model.parameters()]
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    if d.rank == 1:  # one bad rank poisons the global norm on every rank
        next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
    norm = clip_grad_norm_(model.parameters(), 1.0)
    unchanged = all(torch.equal(a, p.detach().to_local()) for a, p in zip(before, model.parameters()))
    torch.save({"finite": bool(torch.isfinite(norm)), "unchanged": unchanged}, f"{out}.{d.rank}")


def test_nonfinite_gradient_is_seen_by_every_rank(tmp_path):
    spawn(_nonfinite, 2, str(tmp_path / "r"))
    for r in range(2):
        got = torch.load(f"{tmp_path / 'r'}.{r}")
        assert got == {"finite": False, "unchanged": True}


def _root_stays_gathered(d, tied: bool) -> None:
    from posttrain.core.distributed import ParallelConfig, build_model
    from torch.distributed.tensor import DTensor

    model = build_model(ModelConfig(**CFG, tie_word_embeddings=tied), d, ParallelConfig(param_dtype="float32"))
    for _ in range(2):  # the second step runs after the root's lazy init
        out = model(torch.arange(8).view(1, 8))
        # Root parameters (embedding, tied lm-head) are used again at once by backward: no reshard, no re-gather.
        assert not isinstance(model.embed_tokens.weight, DTensor)
        assert isinstance(model.layers[0].mlp.up_proj.weight, DTensor)  # blocks still reshard
        out.sum().backward()
        assert isinstance(model.embed_tokens.weight, DTensor)  # resharded after backward


@pytest.mark.parametrize("tied", [False, True])
def test_root_keeps_parameters_gathered_after_forward(tied):
    # torch >= 2.8 honours an explicit reshard_after_forward=True on the root (2.6-2.7 ignored it).
    spawn(_root_stays_gathered, 1, tied)


def test_build_model_rejects_bad_checkpoint_before_sharding(tmp_path):
    from posttrain.core.distributed import Dist, ParallelConfig, build_model

    m = Transformer(ModelConfig(**CFG))
    save_hf(m, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    d = Dist(0, 1, 0, torch.device("cpu"), mesh=None)  # never reaches the mesh: the check comes first
    with pytest.raises(CheckpointError, match=r"ck/model.safetensors: tensor model.layers.0.mlp.\w+_proj.weight has shape \[\d+, \d+\], the config implies \[(50, 32|32, 50)\]"):
        build_model(ModelConfig(), d, ParallelConfig(), init_from=tmp_path / "ck")


@pytest.mark.parametrize("version,refused", [("2.6.0+cu124", True), ("2.6.1", True), ("2.7.1+cpu", False),
                                             ("2.13.0+cpu", False), ("2.10.0", False)])
def test_cpu_training_refuses_torch_26_with_the_reason(monkeypatch, version, refused):
    """torch 2.6's FSDP2 cannot all-gather on CPU (core/distributed.check_cpu_fsdp): a clear error at start, not an
    AttributeError from inside the first forward."""
    from posttrain.core.distributed import check_cpu_fsdp

    monkeypatch.setattr(torch, "__version__", version)
    if refused:
        with pytest.raises(RuntimeError, match=r"training on CPU needs torch >= 2.7 \(this is torch 2\.6"):
            check_cpu_fsdp()
    else:
        check_cpu_fsdp()


def _summing_fsdp(d, out: str) -> None:
    import posttrain.core.distributed as D
    assert D._reduced_gradient(d.mesh) == 1.0  # this torch averages (the check passed in init_distributed too)
    D._reduced_gradient = lambda mesh: 2.0  # as torch 2.7.1's FSDP2 over gloo: a sum where the mean is meant
    try:
        D.check_gradient_average(d.mesh)
    except RuntimeError as e:
        torch.save(str(e), f"{out}.{d.rank}")


def test_cpu_training_refuses_an_fsdp2_that_sums_gradients_over_ranks(tmp_path):
    spawn(_summing_fsdp, 2, str(tmp_path / "e"))
    for r in range(2):
        msg = torch.load(f"{tmp_path / 'e'}.{r}")
        assert "reduces gradients to 2 times their mean on 2 ranks, not their mean" in msg, msg
