"""core/ring.py: bit-exact snapshot/restore of weights and optimizer state, errors, buffer reuse, FSDP2 shards on
2 gloo ranks, and a snapshot that later training does not disturb. The asynchronous (CUDA) path's ordering runs here
through a stand-in copy engine whose copies finish as late as the ordering allows; its CUDA calls (record_stream,
page-locking) through stand-ins of torch.cuda's. (The CUDA path itself: bench/bench_ring.py and the gpu-marked
test below.)"""

import mmap

import pytest
import torch

import posttrain.core.ring as ring_mod
from posttrain.core.model import ModelConfig, Transformer
from posttrain.core.ring import CheckpointRing, RingFull, format_bytes, pin_host, snapshot_bytes, unpin_host
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
    nbytes = snapshot_bytes(model)
    ring = CheckpointRing(2 * nbytes)
    ring.snapshot("x", model)
    ring.snapshot("y", model)
    with pytest.raises(KeyError, match=r"no snapshot 'z'; held: \['x', 'y'\]"):
        ring.restore("z", model)
    size, held = format_bytes(nbytes), format_bytes(2 * nbytes)
    with pytest.raises(RingFull, match=rf"snapshot 'w' needs {size}, but {held} of {held} are held by "
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


def test_small_sizes_are_never_shown_as_zero():
    assert [format_bytes(n) for n in (0, 1, 1023, 1024, 1536, 122_400_000, 3 << 30)] == \
        ["0 B", "1 B", "1023 B", "1.0 KiB", "1.5 KiB", "116.7 MiB", "3.0 GiB"]
    layer = torch.nn.Linear(2, 2)  # two tensors of 16 and 8 bytes: one 256-byte aligned place each
    with pytest.raises(RingFull, match=r"needs 512 B, but 0 B of 100 B are held by \[\]"):
        CheckpointRing(100).snapshot("a", layer)


# ---------------------------------------------------------------------------------- the asynchronous path


class LateCopies:
    """Stands in for core.ring.CudaCopies. A queued copy runs as late as stream order allows: only when something
    waits for it (the compute stream: `wait`; the host: `synchronize`; a later copy queued behind it), so a write
    that was not ordered after it changes what it copies, as it may on a GPU."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, list]] = []  # (event, pairs) not yet run, in stream order
        self.events = 0
        self.waits = 0  # how often the compute stream was made to wait
        self.pins: list[int] = []  # bytes of each arena pinned
        self.unpinned: list[int] = []  # handles unpinned

    def copy(self, pairs, after=None):
        if after is not None:
            self._run(after)
        self.events += 1
        self.queue.append((self.events, pairs))
        return self.events

    def _run(self, event: int) -> None:
        while self.queue and self.queue[0][0] <= event:
            for dst, src in self.queue.pop(0)[1]:
                dst.copy_(src)

    def wait(self, event: int) -> None:
        self.waits += 1
        self._run(event)

    def synchronize(self, event: int) -> None:
        self._run(event)

    def pin(self, nbytes: int):
        self.pins.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8), len(self.pins) - 1

    def unpin(self, handle: int) -> None:
        self.unpinned.append(handle)


@pytest.fixture
def late(monkeypatch):
    """The engines the rings of a test get, one each (as each ring has its own side stream on CUDA)."""
    engines: list[LateCopies] = []

    def make(device):
        engines.append(LateCopies())
        return engines[-1]

    monkeypatch.setattr(ring_mod, "_async_copies", make)
    yield engines
    ring_mod._IN_FLIGHT.clear()  # nothing of this test's stand-in may reach the next test's optimizer steps


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=1e-2), lambda ps: torch.optim.SGD(ps, lr=0.5)])
def test_a_snapshot_taken_without_an_optimizer_is_complete_before_any_optimizer_step(late, make):
    """mSFT's evaluation points snapshot the weights alone, then the next stage steps a new optimizer: that step
    must wait for the copy, or the snapshot holds weights that were never evaluated."""
    model = _model()
    want = _weights(model)
    ring = CheckpointRing(1 << 30)
    ring.snapshot("best", model)  # no optimizer passed
    (engine,) = late
    assert engine.queue and engine.waits == 0  # in flight
    _train(model, make(model.parameters()), 2, seed=1)  # an optimizer made after the snapshot
    assert engine.waits == 1  # the first step fenced; the second had nothing to wait for
    assert not torch.equal(next(model.parameters()), want[0])
    ring.restore("best", model)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), want))


def test_a_restore_waits_for_every_rings_snapshots_in_flight(late):
    """Dynamix's probe ring restores while the Tracker's ring may still be copying: the restore's writes must come
    after that copy, whichever ring it belongs to."""
    model = _model()
    probe, tracker = CheckpointRing(1 << 30), CheckpointRing(1 << 30)
    probe.snapshot("probe", model)
    probe.wait()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # nothing in flight: the writer needs no fence
    evaluated = _weights(model)
    tracker.snapshot("best", model)  # in flight
    probe.restore("probe", model)  # overwrites what "best" is copying
    tracker.restore("best", model)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), evaluated))


def test_fence_makes_the_current_stream_wait_once_per_copy_in_flight(late):
    model = _model()
    ring = CheckpointRing(1 << 30)
    ring.snapshot("a", model)
    ring.snapshot("b", model)
    (engine,) = late
    ring.fence()
    assert engine.waits == 2 and not engine.queue
    ring.fence()
    assert engine.waits == 2


def test_one_arena_per_slot_sized_exactly_and_given_back_by_clear(late):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 1, seed=1)
    ring = CheckpointRing(1 << 30)
    ring.snapshot("a", model, opt)
    (late,) = late
    tensors = [p.detach() for p in model.parameters()] + [v for p in model.parameters()
                                                          for _, v in sorted(opt.state[p].items())]
    exact = sum(-(-t.numel() * t.element_size() // 256) * 256 for t in tensors)
    assert late.pins == [exact] == [snapshot_bytes(model, opt)] and ring.nbytes == exact
    slot = ring._slots["a"]
    base = slot.arena.untyped_storage().data_ptr()
    assert all(b.untyped_storage().data_ptr() == base for b in slot.buffers)  # views of the one arena
    ring.snapshot("b", model)
    ring.drop("b")
    ring.snapshot("c", model)  # the dropped arena serves the new key: no third pin
    assert len(late.pins) == 2
    ring.clear()
    assert sorted(late.unpinned) == [0, 1] and ring.nbytes == 0 and not late.queue


class FakeCudart:
    def __init__(self, fail: bool = False) -> None:
        self.fail, self.registered = fail, {}

    def cudaHostRegister(self, address, size, flags):
        if self.fail:
            return 712
        self.registered[address] = size
        return 0

    def cudaHostUnregister(self, address):
        return 0 if self.registered.pop(address, None) is not None else 713

    def cudaGetErrorString(self, err):
        return {712: "part or all of the requested memory range is already mapped"}.get(int(err), "?")


def test_pin_host_registers_whole_pages_of_its_own_allocation(monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    page = mmap.PAGESIZE
    arena, address = pin_host(3 * page + 5)
    size = cudart.registered[address]
    assert arena.numel() == 3 * page + 5 and arena.data_ptr() == address
    assert address % page == 0 and size == 4 * page  # whole pages, no more than the arena needs
    storage = arena.untyped_storage()
    assert storage.data_ptr() <= address and address + size <= storage.data_ptr() + storage.nbytes()
    unpin_host(address)
    assert not cudart.registered
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(fail=True))
    with pytest.raises(RuntimeError, match="cudaHostRegister.*already mapped"):
        pin_host(10)


class CudaLike(torch.Tensor):
    """A tensor that says it is on CUDA and records record_stream calls (no GPU here)."""

    recorded: list = []

    @property
    def is_cuda(self):
        return True

    def record_stream(self, stream):
        CudaLike.recorded.append(stream)


def test_record_stream_only_on_cuda_tensors(monkeypatch):
    """A non-fused, non-capturable Adam keeps state['step'] on the CPU, where record_stream raises."""
    class Stream:
        def wait_stream(self, other):
            pass

        def wait_event(self, event):
            pass

    class Event:
        def record(self, stream):
            pass

    import contextlib

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    copies = ring_mod.CudaCopies(torch.device("cuda"))
    weight = torch.Tensor._make_subclass(CudaLike, torch.randn(3))
    step = torch.tensor(4.0)  # Adam's step count on the CPU
    bufs = [torch.empty(3), torch.empty(())]
    CudaLike.recorded = []
    copies.copy(list(zip(bufs, [weight, step])))
    assert CudaLike.recorded == [copies.side] and torch.equal(bufs[0], weight) and bufs[1] == 4.0


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
