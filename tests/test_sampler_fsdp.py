"""core.sampler under FSDP2: full_weights() unshards once for the rollout, greedy output equals the unsharded model's,
and the parameters are sharded again afterwards. Two ranks over gloo on CPU, float32."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]


def _worker(rank: int, world: int, store_path: str, expected: list) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from core.sampler import full_weights, generate
    from tests.test_sampler import tiny_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        model = tiny_model()
        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
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
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
def test_fsdp2_greedy_generate_equals_unsharded():
    from core.sampler import generate
    from tests.test_sampler import tiny_model

    expected = [c.tokens for c in generate(tiny_model(), PROMPTS, max_new_tokens=20, temperature=0.0)]
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "store"), expected), nprocs=2, join=True)
