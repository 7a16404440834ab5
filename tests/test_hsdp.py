"""HSDP (parallel.replicate x parallel.shard, core/distributed.py) on 4 gloo ranks as 2 replicas x 2 shards, each
path against one process: sharded HF load and export, clipping, the weights digest, the sampler, the ring; SFT losses
and DCP resume across layouts (2x2 -> 1x4 -> 1 process); two simulated nodes (two torchrun agents, a c10d
rendezvous on 127.0.0.1, a shared out_dir and tokenization cache) running SFT and GRPO."""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file

from posttrain.core.checkpoint import load_hf, save_hf
from posttrain.core.distributed import ParallelConfig, build_optimizer
from posttrain.core.model import ModelConfig, Transformer
from tests.test_distributed import CFG, _free_port
from tests.test_sampler_fsdp import PROMPTS
from tests.test_sft import REPO, SMALL, losses, run_sft

# ------------------------------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("world,replicate,shard,message", [
    (4, 3, 0, "parallel.replicate=3 does not divide the world size 4"),
    (4, 2, 3, r"parallel.replicate=2 x parallel.shard=3 = 6 ranks, but the world size is 4; set parallel.shard=2"),
    (1, 2, 0, "parallel.replicate=2 does not divide the world size 1"),
])
def test_a_layout_that_does_not_fit_the_world_names_both_numbers(world, replicate, shard, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(replicate=replicate, shard=shard).mesh_shape(world)


def test_layout_defaults():
    assert ParallelConfig().mesh_shape(4) == (1, 4)
    assert ParallelConfig(replicate=2).mesh_shape(4) == (2, 2)
    assert ParallelConfig(replicate=2, shard=2).mesh_shape(4) == (2, 2)
    assert ParallelConfig(replicate=4).mesh_shape(4) == (4, 1)
    with pytest.raises(ValueError, match="parallel.replicate=0 must be >= 1"):
        ParallelConfig(replicate=0)


# ------------------------------------------------------------------------------- core paths on 2 x 2 ranks


def spawn_hsdp(fn, world: int, replicate: int, *args) -> None:
    mp.start_processes(_entry, args=(fn, world, replicate, _free_port(), *args), nprocs=world, start_method="spawn")


def _entry(rank, fn, world, replicate, port, *args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    from posttrain.core.distributed import close_distributed, init_distributed

    d = init_distributed(0, device="cpu", parallel=ParallelConfig(param_dtype="float32", replicate=replicate))
    try:
        fn(d, *args)
    finally:
        close_distributed()


def _source(path: Path) -> Transformer:
    """A checkpoint whose every tensor is distinct, written in several files (slices cross them)."""
    m = Transformer(ModelConfig(**CFG, tie_word_embeddings=False, architecture="Qwen2ForCausalLM", qkv_bias=True))
    m.init_weights(seed=1)
    for layer in m.layers:
        layer.self_attn.q_proj.bias.data.normal_(generator=torch.Generator().manual_seed(2))
        layer.input_layernorm.weight.data.normal_(generator=torch.Generator().manual_seed(3))
    save_hf(m, path, max_shard_bytes=30_000)
    return m


IDS = torch.arange(48).view(4, 12) % 61  # one row per rank


def _core_paths(d, src: str, out: str) -> None:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from posttrain.core.distributed import Checkpointer, build_model, build_optimizer, clip_grad_norm_, export_hf
    from posttrain.core.ring import CheckpointRing
    from posttrain.core.sampler import generate
    from posttrain.train.msft.method import weights_digest

    pc = ParallelConfig(param_dtype="float32", replicate=2)
    model = build_model(ModelConfig(), d, pc, init_from=src)
    w = model.layers[0].mlp.up_proj.weight
    assert (d.replicate, d.shard) == (2, 2) and tuple(d.mesh.mesh_dim_names) == ("replicate", "shard")
    assert isinstance(w, DTensor) and w.placements == (Replicate(), Shard(0)) and w.to_local().shape[0] == 48 // 2
    export_hf(model, f"{out}/hf", d)
    result = {"digest": weights_digest(SimpleNamespace(model=model, d=d))}
    result["greedy"] = [c.tokens for c in generate(model, PROMPTS, max_new_tokens=12, temperature=0.0)]
    kw = dict(max_new_tokens=12, n=2, seed=3, temperature=1.0)
    result["sampled"] = [c.tokens for c in generate(model, PROMPTS, replica=False, **kw)]
    result["sampled_replica"] = [c.tokens for c in generate(model, PROMPTS, replica=True, **kw)]

    (model(IDS[d.rank: d.rank + 1]).float().pow(2).mean() * d.world_size).backward()  # FSDP2 averages over ranks
    result["norm"] = clip_grad_norm_(model.parameters(), 0.01)
    result["after"] = clip_grad_norm_(model.parameters(), 0.0)

    opt = build_optimizer(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt.step()
    opt.zero_grad()
    ring = CheckpointRing(1 << 30)
    ring.snapshot("s", model, opt)
    before = [p.detach().to_local().clone() for p in model.parameters()]
    model(IDS[d.rank: d.rank + 1]).float().pow(2).mean().backward()
    opt.step()
    ring.restore("s", model, opt)
    result["restored"] = all(torch.equal(a, p.detach().to_local()) for a, p in zip(before, model.parameters()))
    result["local"] = before
    # Ranks 2-3 stand for a second node whose checkpoint.dir is a local directory of the same name, not rank 0's.
    try:
        Checkpointer(f"{out}/ckpt_node{d.rank // 2}", d).save(1, model, opt, {})
    except RuntimeError as e:
        result["unshared"] = str(e)
    torch.save(result, f"{out}/rank{d.rank}.pt")


def test_hsdp_2x2_core_paths_equal_one_process(tmp_path):
    """Sharded HF load (each rank reads its rows of the shard dimension) and export (byte-identical), the sampler
    (greedy on the gathered weights, seeded sampling with and without the rollout replica), gradient clipping (the
    norm over the shard dimension, not counted once per replica), mSFT's weights digest and the ring's per-rank
    restore on 2 replicas x 2 shards, against one process on the unsharded model; and a checkpoint directory that
    the second "node" (ranks 2-3) does not share is an error on every rank."""
    ref = _source(tmp_path / "src")
    spawn_hsdp(_core_paths, 4, 2, str(tmp_path / "src"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]

    src_map = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as out:
        assert sorted(out.keys()) == sorted(src_map)
        for name, file in src_map.items():
            with safe_open(tmp_path / "src" / file, "pt") as f:
                assert f.get_tensor(name).numpy().tobytes() == out.get_tensor(name).numpy().tobytes(), name

    want_digest = sum(float(p.detach().double().pow(2).sum()) for p in ref.parameters())
    from posttrain.core.sampler import generate

    one = load_hf(tmp_path / "src")
    greedy = [c.tokens for c in generate(one, PROMPTS, max_new_tokens=12, temperature=0.0)]
    sampled = [c.tokens for c in generate(one, PROMPTS, max_new_tokens=12, n=2, seed=3, temperature=1.0)]
    (one(IDS).float().pow(2).mean(dim=(1, 2)).sum()).backward()
    want_norm = torch.nn.utils.clip_grad_norm_(one.parameters(), 0.01)
    for r, got in enumerate(ranks):
        assert got["digest"] == pytest.approx(want_digest, rel=1e-12), r
        assert got["greedy"] == greedy and got["sampled"] == sampled and got["sampled_replica"] == sampled, r
        assert torch.allclose(got["norm"], want_norm, rtol=1e-5), (r, got["norm"], want_norm)
        assert abs(got["after"].item() - 0.01) < 1e-5 and got["restored"], r
        msg = got["unshared"]  # every rank stops, none waits for the others
        assert "2 of 4 ranks do not see the checkpoint directory rank 0 created" in msg, msg
        assert f"(rank {r} {'does' if r < 2 else 'does not'})" in msg and "shared by every node" in msg, msg
    assert not list((tmp_path / "ckpt_node1").glob("**/*.distcp"))  # nothing written where rank 0 cannot see it
    # Ranks r and r + 2 are the two replicas of one shard: equal local shards; ranks 0 and 1 hold different rows.
    for a, b in ((0, 2), (1, 3)):
        assert all(torch.equal(x, y) for x, y in zip(ranks[a]["local"], ranks[b]["local"]))
    assert not torch.equal(ranks[0]["local"][0], ranks[1]["local"][0])


# ----------------------------------------------------------------------------- two simulated nodes, resharded


def _close(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(b) == sorted(a), (sorted(a), sorted(b))
    for s in a:  # the 2-rank test's tolerance (tests/test_sft.py)
        assert abs(a[s] - b[s]) < 1e-5 * abs(a[s]), (s, a[s], b[s])


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "hf" / "model.safetensors"), load_file(b / "hf" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4, msg=k)


def two_nodes(out: Path, module: str, config: str, *flags: str, node_env: tuple[dict, dict] = ({}, {}),
              timeout: int = 600) -> str:
    """`module` on two torchrun agents (2 ranks each, `node_env` added to each one's environment) that meet by a
    c10d rendezvous on 127.0.0.1, as two nodes would; returns both agents' stdout. Output goes to files, not pipes:
    an agent blocked on a full pipe would stall the other one's collectives."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the torch fallback is fast on CPU
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{_free_port()}", f"--rdzv_id={uuid.uuid4().hex[:8]}", "-m", module,
           "--config", str(REPO / config), f"--out_dir={out}", *flags]
    logs = [(open(out.parent / f"{out.name}.node{i}.out", "w+"), open(out.parent / f"{out.name}.node{i}.err", "w+"))
            for i in range(2)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**env, **extra}, stdout=o, stderr=e, text=True,
                              start_new_session=True) for (o, e), extra in zip(logs, node_env)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    texts = []
    for (o, e), code in zip(logs, codes):
        o.seek(0), e.seek(0)
        text, err = o.read(), e.read()
        assert code == 0, text[-3000:] + err[-3000:]
        texts.append(text)
    return "\n".join(texts)


@pytest.mark.slow
def test_two_nodes_run_sft_whose_checkpoint_resumes_at_1x4_and_in_one_process_then_grpo(tmp_path):
    """Two torchrun agents of 2 ranks each (HSDP: replicate across the "nodes", shard within) train SFT steps 1-3
    on a JSONL mixture with a shared out_dir and tokenization cache: the cache entry is built once (not once per
    node), and only global rank 0 writes the metrics log and marks the checkpoint. From that 2 x 2 DCP checkpoint,
    1 x 4 ranks run step 4 and one process step 5 (a chain), and one process runs steps 4-5 directly. Every loss and
    the final weights equal one process's with the same global batch (4 micro-batches per step). Then GRPO from
    one SFT export, on two nodes and in one process: same rollouts, losses, metrics and weights; here each node
    has a cache directory of its own (no shared filesystem for it), so each node's local rank 0 tokenizes."""
    from posttrain.train.synthetic import write_jsonl
    from tests.test_grpo_trainer import KEYS, RUN, run_grpo

    tasks = ("copy", "reverse", "sort", "add", "mod", "majority")
    write_jsonl(tmp_path / "mix", seed=0, train_sizes={t: 40 for t in tasks}, heldout_sizes={t: 4 for t in tasks})
    cache = tmp_path / "cache"
    # A constant schedule after warmup: runs of 3, 4 and 5 steps schedule their common steps alike. 128 positions:
    # room for GRPO's prompts and completions.
    sft = [*SMALL, "--model.max_position_embeddings=128", f"--data.path={tmp_path / 'mix'}",
           "--optim.schedule=constant", f"--data.cache_dir={cache}"]
    nodes, chain, direct, one = (tmp_path / n for n in ("nodes", "chain", "direct", "one"))
    out = two_nodes(nodes, "posttrain.train.sft", "configs/tiny_sft.toml", *sft, "--train.max_steps=3",
                    "--parallel.replicate=2")
    assert out.count("HSDP: 2 replicas x 2 shards") == 1 and "done: 3 steps" in out  # global rank 0 logs
    assert out.count(f"tokenized {tmp_path / 'mix'} into") == 1, out  # built once for both nodes
    assert len(list(cache.iterdir())) == 1 and (next(cache.iterdir()) / "meta.json").is_file()
    rows = [json.loads(line) for line in (nodes / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # one writer
    assert os.listdir(nodes / "checkpoints") == ["step_00000003"] and (nodes / "hf" / "config.json").is_file()

    run_sft(one, *sft, "--data.cache_dir=off", "--train.max_steps=5", "--optim.grad_accum=4")
    shutil.copytree(nodes, chain)
    shutil.copytree(nodes, direct)
    proc = run_sft(chain, *sft, "--train.max_steps=4", nproc=4)
    assert "resumed from" in proc.stdout and "step_00000003" in proc.stdout and "HSDP" not in proc.stdout
    proc = run_sft(chain, *sft, "--train.max_steps=5", "--optim.grad_accum=4")
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout
    proc = run_sft(direct, *sft, "--train.max_steps=5", "--optim.grad_accum=4")
    assert "resumed from" in proc.stdout and "step_00000003" in proc.stdout
    a = losses(one)
    assert sorted(a) == [1, 2, 3, 4, 5] and a[5] < a[1]
    _close(a, losses(chain))
    _close(a, losses(direct))
    _same_weights(one, chain)
    _same_weights(one, direct)

    data = [f"--data.path={tmp_path / 'mix'}", "--train.max_steps=4"]
    ref = run_grpo(tmp_path / "grpo_one", one / "hf", *data, "--data.cache_dir=off", "--grpo.rollout_shards=4")
    caches = [tmp_path / f"cache_node{i}" for i in range(2)]
    out = two_nodes(tmp_path / "grpo_nodes", "posttrain.train.grpo", "configs/tiny_grpo.toml",
                    f"--init.hf_checkpoint={one / 'hf'}", *RUN, *data, "--grpo.rollout_shards=0",  # a shard per rank
                    "--parallel.replicate=2", node_env=tuple({"POSTTRAIN_CACHE": str(c)} for c in caches))
    assert "HSDP: 2 replicas x 2 shards" in out
    builders = sorted(line.split(":")[0] for line in out.splitlines() if f"tokenized {tmp_path / 'mix'} into" in line)
    assert builders == ["rank 0", "rank 2"], out  # rank 0 first, then the other node's local rank 0
    assert all(len(list(c.iterdir())) == 1 for c in caches)
    rows = [json.loads(line) for line in (tmp_path / "grpo_nodes" / "metrics.jsonl").read_text().splitlines()]
    got = [r for r in rows if "reward_mean" in r]
    assert [m["step"] for m in ref] == [m["step"] for m in got] == [2, 4]
    for x, y in zip(ref, got):
        assert x["completion_len"] == y["completion_len"] and x["reward_std"] > 0
        for key in KEYS:
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7), key
    _same_weights(tmp_path / "grpo_one", tmp_path / "grpo_nodes")


# ----------------------------------------------------------------------------- pure replication (shard = 1)


def _replicated(d, src: str, out: str) -> None:
    from torch.distributed.tensor import DTensor

    from posttrain.core.distributed import build_model, clip_grad_norm_
    from posttrain.train.msft.method import weights_digest

    model = build_model(ModelConfig(), d, ParallelConfig(param_dtype="float32", replicate=2), init_from=src)
    w = model.layers[0].mlp.up_proj.weight
    assert (d.replicate, d.shard) == (2, 1) and isinstance(w, DTensor) and w.to_local().shape[0] == 48, w.shape
    result = {"placements": str(w.placements), "digest": weights_digest(SimpleNamespace(model=model, d=d))}
    (model(IDS[2 * d.rank: 2 * d.rank + 2]).float().pow(2).mean(dim=(1, 2)).sum() * d.world_size).backward()
    result["norm"] = clip_grad_norm_(model.parameters(), 1e9)
    opt = build_optimizer(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt.step()
    result["weights"] = [p.detach().full_tensor().clone() for p in model.parameters()]
    torch.save(result, f"{out}/rank{d.rank}.pt")


def test_pure_replication_equals_one_process(tmp_path):
    """parallel.replicate = world size (2 replicas x 1 shard, DDP-like): every rank holds whole parameters, the
    gradient is the mean over replicas (clip norm as one process computes it on the whole batch), and one AdamW
    step gives one process's weights."""
    ref = _source(tmp_path / "src")
    spawn_hsdp(_replicated, 2, 2, str(tmp_path / "src"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one = load_hf(tmp_path / "src")
    one(IDS).float().pow(2).mean(dim=(1, 2)).sum().backward()  # the ranks' losses (x2) averaged over 2 replicas
    want_norm = torch.nn.utils.clip_grad_norm_(one.parameters(), 1e9)
    build_optimizer(one, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1).step()
    want_digest = sum(float(p.detach().double().pow(2).sum()) for p in ref.parameters())
    for r, got in enumerate(ranks):
        assert got["placements"] == "(Replicate(), Shard(dim=0))", got["placements"]  # a shard dimension of size 1
        assert got["digest"] == pytest.approx(want_digest, rel=1e-12), r
        assert torch.allclose(got["norm"], want_norm, rtol=1e-5), (r, got["norm"], want_norm)
        for a, b in zip(got["weights"], one.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["weights"], ranks[1]["weights"]))  # replicas agree
