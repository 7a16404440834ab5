"""core.sampler under FSDP2: full_weights() unshards once for the rollout, greedy output equals the unsharded model's,
and the parameters are sharded again afterwards. Two ranks over gloo on CPU, float32."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from posttrain.core.distributed import close_distributed

PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]


def sharded_tiny_model(world: int, device: str = "cpu", **fsdp_kw):
    """tests/test_sampler's tiny model, fully_shard-ed per block and at the root over a 1-D mesh of `world` ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.test_sampler import tiny_model

    model = tiny_model().to(device)
    mesh = init_device_mesh(device, (world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh, **fsdp_kw)
    fully_shard(model, mesh=mesh, **fsdp_kw)
    return model


def _worker(rank: int, world: int, store_path: str, expected: list) -> None:
    from torch.distributed.tensor import DTensor

    from posttrain.core.distributed import full_weights
    from posttrain.core.sampler import generate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        model = sharded_tiny_model(world)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        with full_weights(model):
            assert not any(isinstance(p, DTensor) for p in model.parameters())
            out = generate(model, PROMPTS, max_new_tokens=20, temperature=0.0)
            # No reshard after any of the 20 forwards: the weights stayed whole, gathered once.
            assert not any(isinstance(p, DTensor) for p in model.parameters())
        assert [c.tokens for c in out] == expected
        assert all(isinstance(p, DTensor) for p in model.parameters())  # sharded again
        # generate enters full_weights by itself for an FSDP model, and leaves it sharded.
        assert [c.tokens for c in generate(model, PROMPTS, max_new_tokens=20, temperature=0.0)] == expected
        assert all(isinstance(p, DTensor) for p in model.parameters())
    finally:
        close_distributed()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
def test_fsdp2_greedy_generate_equals_unsharded():
    from posttrain.core.sampler import generate
    from tests.test_sampler import tiny_model

    expected = [c.tokens for c in generate(tiny_model(), PROMPTS, max_new_tokens=20, temperature=0.0)]
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "store"), expected), nprocs=2, join=True)


def _worker_torch26(rank: int, store_path: str) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from posttrain.core.sampler import generate

    torch.set_num_threads(1)
    # torch 2.6 has no FSDPModule.set_reshard_after_forward: full_weights must not need it.
    if hasattr(FSDPModule, "set_reshard_after_forward"):
        delattr(FSDPModule, "set_reshard_after_forward")
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 1), rank=0, world_size=1)
    try:
        model = sharded_tiny_model(1)
        generate(model, PROMPTS, max_new_tokens=3, temperature=0.0)  # a rollout before the first training forward
        assert all(isinstance(p, DTensor) for p in model.parameters())
        model(torch.tensor([PROMPTS[1]])).sum().backward()
        # ... leaves the root's setting as its lazy init decides it: gathered after forward until backward.
        model.zero_grad()
        out = model(torch.tensor([PROMPTS[1]]))
        assert not isinstance(model.embed_tokens.weight, DTensor)
        assert isinstance(model.layers[0].mlp.up_proj.weight, DTensor)
        out.sum().backward()
    finally:
        close_distributed()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
def test_full_weights_without_setter_and_before_first_forward():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker_torch26, args=(os.path.join(d, "store"),), nprocs=1, join=True)


def _worker_replica(rank: int, world: int, store_path: str) -> None:
    from torch.distributed.tensor import DTensor

    from posttrain.core.sampler import free_cache, generate, replica_bytes, rollout_replica, sampler_stats

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        model = sharded_tiny_model(world)
        kw = dict(max_new_tokens=12, n=2, seed=3, temperature=1.0, top_p=0.9)

        def same(a, b):
            assert [c.tokens for c in a] == [c.tokens for c in b]
            for x, y in zip(a, b):
                assert x.raw_logprobs == pytest.approx(y.raw_logprobs, abs=1e-5)

        gathered = generate(model, PROMPTS, replica=False, **kw)
        same(generate(model, PROMPTS, replica=True, **kw), gathered)
        rep = rollout_replica(model)
        assert not any(isinstance(p, DTensor) for p in rep.parameters())
        assert all(isinstance(p, DTensor) for p in model.parameters())  # the model stays sharded
        ptrs = [p.data_ptr() for p in rep.parameters()]
        size = sum(p.numel() * p.element_size() for p in rep.parameters())
        assert replica_bytes(model) == size and sampler_stats(model)["replica_bytes"] == size

        # A training step moves the weights; the replica follows at the next rollout, in the same storage.
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model(torch.tensor([PROMPTS[1]])).logsumexp(-1).mean().backward()
        opt.step()
        after = generate(model, PROMPTS, replica=False, **kw)
        assert [c.tokens for c in after] != [c.tokens for c in gathered]
        same(generate(model, PROMPTS, replica=True, **kw), after)
        assert [p.data_ptr() for p in rollout_replica(model).parameters()] == ptrs
        free_cache(model)
        assert replica_bytes(model) == 0
    finally:
        close_distributed()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
def test_rollout_replica_equals_gathered_model_and_follows_training():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker_replica, args=(2, os.path.join(d, "store")), nprocs=2, join=True)


def _worker_replica_graphs(rank: int, store_path: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from posttrain.core.sampler import generate, sampler_stats
    from tests.test_sampler import tiny_model

    dist.init_process_group("nccl", store=dist.FileStore(store_path, 1), rank=0, world_size=1)
    try:
        model = tiny_model().cuda()
        expected = [c.tokens for c in generate(model.to(torch.bfloat16), PROMPTS, max_new_tokens=20, temperature=0.0)]
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        sharded = sharded_tiny_model(1, "cuda", mp_policy=mp_policy)
        for _ in range(2):  # the second call reuses the replica's storage and the graphs captured by the first
            out = generate(sharded, PROMPTS, max_new_tokens=20, temperature=0.0)
        stats = sampler_stats(sharded)
        assert stats["replica_bytes"] > 0 and stats["graph_captures"] >= 1
        captures = stats["graph_captures"]
        generate(sharded, PROMPTS, max_new_tokens=20, temperature=0.0)
        assert sampler_stats(sharded)["graph_captures"] == captures
        assert sum(a.tokens == b for a, b in zip(out, expected)) >= len(PROMPTS) - 1  # bf16 near-ties
    finally:
        close_distributed()


@pytest.mark.gpu
def test_gpu_fsdp2_rollouts_use_graphs_through_the_replica():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker_replica_graphs, args=(os.path.join(d, "store"),), nprocs=1, join=True)


def _worker_uneven_rollouts(rank: int, world: int, store_path: str, expected: dict) -> None:
    import datetime

    from posttrain.core.distributed import fsdp_modules, fsdp_param_groups
    from posttrain.core.sampler import generate

    torch.set_num_threads(1)
    # A bounded wait: a rank left in a collective the other never issues fails the test instead of hanging it.
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = sharded_tiny_model(world)
        batch = torch.tensor([PROMPTS[1]])
        for step in range(2):
            # Each rank decodes its own share for its own number of steps (ranks' rows finish at different times).
            generate(model, PROMPTS[rank:rank + 1], max_new_tokens=2 + 5 * rank + step, temperature=0.0)
            for m in fsdp_modules(model):  # the rollout's forwards leave nothing for the next backward to read
                assert all(not g._post_forward_indices and not g.comm_ctx.post_forward_order
                           for g in fsdp_param_groups(m))
            model.zero_grad()
            model(batch).logsumexp(-1).mean().backward()
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.grad.full_tensor(), expected[name], rtol=1e-5, atol=1e-6)
    finally:
        close_distributed()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
def test_training_after_rollouts_of_different_lengths_per_rank():
    """Rollouts whose decode steps differ per rank, then a training step: FSDP2 records every forward for the next
    backward's prefetches, and records left by rollout forwards made the ranks prefetch different modules in that
    backward (an all-gather on one rank against a reduce-scatter on the other: a hang, seen on torch 2.11)."""
    from tests.test_sampler import tiny_model

    ref = tiny_model()
    ref(torch.tensor([PROMPTS[1]])).logsumexp(-1).mean().backward()
    expected = {n: p.grad.clone() for n, p in ref.named_parameters()}
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker_uneven_rollouts, args=(2, os.path.join(d, "store"), expected), nprocs=2, join=True)
