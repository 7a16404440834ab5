"""core/ring.py: bit-exact snapshot/restore of weights and optimizer state, errors, buffer reuse, FSDP2 shards on
2 gloo ranks, and a snapshot that later training does not disturb. (The CUDA path is in bench/bench_ring.py and the
gpu-marked test below.)"""

import pytest
import torch

from posttrain.core.model import ModelConfig, Transformer
from posttrain.core.ring import CheckpointRing, RingFull
from tests.test_distributed import spawn

CFG = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, CFG["vocab_size"], (2, 9), generator=g)
        logits = model(ids[:, :-1])  # plain logits: the fused kernel would run in Triton's (slow) interpreter here
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()


def _state(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in model.parameters()]
    return params, state, [dict(g, params=None) for g in opt.param_groups]


def _assert_equal(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    for sa, sb in zip(a[1], b[1]):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a[2] == b[2]


def _model():
    model = Transformer(ModelConfig(**CFG))
    model.init_weights(seed=0)
    return model


def test_snapshot_restore_is_bit_exact_and_later_training_does_not_touch_it():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 3, seed=1)
    ring = CheckpointRing(1 << 30)
    before = _state(model, opt)
    ring.snapshot("a", model, opt, meta={"epoch": 0.5, "data": [1, 2]})
    _train(model, opt, 3, seed=2)
    for g in opt.param_groups:
        g["lr"] = 5.0
    after = _state(model, opt)
    assert not torch.equal(after[0][0], before[0][0])
    assert ring.restore("a", model, opt) == {"epoch": 0.5, "data": [1, 2]}
    _assert_equal(_state(model, opt), before)
    # and training on from the restored point repeats what followed the snapshot exactly
    _train(model, opt, 3, seed=2)
    for g in opt.param_groups:
        g["lr"] = 5.0
    _assert_equal(_state(model, opt), after)


def test_restore_into_a_fresh_optimizer_and_weights_only():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 2, seed=1)
    ring = CheckpointRing(1 << 30)
    ring.snapshot("with", model, opt)
    ring.snapshot("weights", model)
    want = _state(model, opt)
    _train(model, opt, 2, seed=3)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ring.restore("with", model, fresh)
    _assert_equal(_state(model, fresh), want)
    _train(model, opt, 1, seed=4)
    ring.restore("weights", model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), want[0]))
    with pytest.raises(ValueError, match="holds no optimizer state"):
        ring.restore("weights", model, fresh)


def test_errors_name_the_key_the_keys_held_and_the_sizes():
    model = _model()
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    ring = CheckpointRing(2 * nbytes)
    ring.snapshot("x", model)
    ring.snapshot("y", model)
    with pytest.raises(KeyError, match=r"no snapshot 'z'; held: \['x', 'y'\]"):
        ring.restore("z", model)
    with pytest.raises(RingFull, match=r"snapshot 'w' needs 0\.\d+ MiB, but 0\.\d+ MiB of 0\.\d+ MiB are held by "
                                       r"\['x', 'y'\]; drop a snapshot or raise capacity_bytes"):
        ring.snapshot("w", model)
    assert ring.keys() == ["x", "y"]  # nothing was evicted
    other = Transformer(ModelConfig(**{**CFG, "hidden_size": 16}))
    with pytest.raises(ValueError, match="another model"):
        ring.restore("x", other)


def test_buffers_are_reused_never_grown():
    model = _model()
    ring = CheckpointRing(1 << 30)
    ring.snapshot("a", model)
    size = ring.nbytes
    buffers = [b.data_ptr() for b in ring._slots["a"].buffers]
    ring.snapshot("a", model)  # overwrite in place
    ring.drop("a")
    ring.snapshot("b", model)  # the dropped slot's buffers serve the new key
    assert ring.nbytes == size and [b.data_ptr() for b in ring._slots["b"].buffers] == buffers
    with pytest.raises(KeyError, match="no snapshot 'a'"):
        ring.drop("a")


def _fsdp_ranks(d, out):
    from posttrain.core.distributed import ParallelConfig, build_model, build_optimizer

    model = build_model(ModelConfig(**CFG), d, ParallelConfig(param_dtype="float32"), seed=0)
    opt = build_optimizer(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    _train(model, opt, 2, seed=1)
    ring = CheckpointRing(1 << 30)
    before = _state(model, opt)
    ring.snapshot("s", model, opt, meta=d.rank)
    # Only this rank's shards are held: about half of the full model each.
    full = sum(p.numel() * 4 for p in model.parameters())
    held = sum(p.to_local().numel() * 4 for p in model.parameters())
    assert held < 0.75 * full
    _train(model, opt, 2, seed=2)
    assert ring.restore("s", model, opt) == d.rank
    _assert_equal(_state(model, opt), before)
    torch.save([p.full_tensor() for p in model.parameters()], f"{out}/rank{d.rank}.pt")


def test_two_gloo_ranks_restore_their_own_shards(tmp_path):
    spawn(_fsdp_ranks, 2, str(tmp_path))
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
def test_cuda_async_snapshot_is_not_disturbed_by_the_next_steps():
    model = _model().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    _train_cuda = lambda n, s: [_step_cuda(model, opt, s + i) for i in range(n)]
    _train_cuda(2, 0)
    want = _state(model, opt)
    ring = CheckpointRing(1 << 30)
    ring.snapshot("a", model, opt)  # returns before the copy is done
    _train_cuda(3, 10)  # the optimizer's pre-step hook orders its writes after the copy
    ring.restore("a", model, opt)
    torch.cuda.synchronize()
    _assert_equal(_state(model, opt), want)
    assert ring._slots["a"].buffers[0].is_pinned()


def _step_cuda(model, opt, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, CFG["vocab_size"], (2, 9), generator=g, device="cuda")
    (-model(ids[:, :-1], targets=ids[:, 1:]).mean()).backward()
    opt.step()
    opt.zero_grad()


def _after_eval(d, out):
    """After a forward without backward FSDP2 keeps the root's parameters gathered, and after a rollout the final
    norm + lm-head group is left gathered; the ring must still snapshot and restore the shards the optimizer
    updates."""
    from posttrain.core.distributed import ParallelConfig, build_model, build_optimizer

    from posttrain.core.distributed import full_weights
    from posttrain.core.sampler import generate

    model = build_model(ModelConfig(**CFG), d, ParallelConfig(param_dtype="float32"), seed=0)
    opt = build_optimizer(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))  # an evaluation: the root stays gathered
        with full_weights(model):  # and a rollout, which reads the lm-head outside its module call
            generate(model, [[1, 2, 3]], max_new_tokens=3, temperature=0.0)
    ring = CheckpointRing(1 << 30)
    ring.snapshot("s", model)
    want = [p.detach().full_tensor().clone() for p in model.parameters()]
    _train(model, opt, 2, seed=3)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    ring.restore("s", model)
    _train(model, opt, 0, seed=0)
    got = [p.detach().full_tensor() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_snapshot_after_an_evaluation_forward_takes_the_shards(tmp_path):
    spawn(_after_eval, 2, str(tmp_path))


def test_bench_smoke(tmp_path):
    import json

    from posttrain.bench import bench_ring

    out = tmp_path / "ring.json"
    bench_ring.main(["--smoke", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 and all(r["snapshot_gbps"] > 0 and r["torch_save_gbps"] > 0 for r in rows[:2])
    assert rows[2]["step_ms"] > 0 and "overhead" in rows[2]
