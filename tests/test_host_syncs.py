"""The training loops' host syncs: a GRPO update and an SFT step read the device once, at their end, in one transfer.

On CUDA a host read (Tensor.item / tolist / float / bool / int / cpu, a boolean index) waits until the GPU has run
everything queued before it, and a blocking copy from pageable memory does too, so one per micro-batch drains the
GPU between micro-batches. No GPU here: the calls are counted where they are made, by patching Tensor's methods,
on the real update code (one gloo rank, FSDP2, the CUDA default's fused AdamW, which runs on CPU too).
"""

import collections
import contextlib
import sys
from pathlib import Path

import torch

from tests.test_distributed import spawn

ROOT = Path(__file__).resolve().parent.parent
READS = ("item", "tolist", "__float__", "__bool__", "__int__", "cpu", "numpy")
SMALL = ["--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_layers=2", "--model.num_heads=4",
         "--model.num_kv_heads=2", "--model.max_position_embeddings=128", "--data.seq_len=64",
         "--data.max_tokens=256", "--device=cpu", "--init.hf_checkpoint=", "--optim.warmup_steps=0"]


def _project_folder(frame) -> str | None:
    """The project folder (core, kernels, train, ...) of the code running in `frame`, None outside the project."""
    path = Path(frame.f_code.co_filename).resolve()
    return path.relative_to(ROOT).parts[0] if path.is_relative_to(ROOT) and path.parts[-2] != "tests" else None


@contextlib.contextmanager
def host_syncs():
    """Counts, per project folder, the calls from the project's code that would make the host wait for a GPU:
    {folder: Counter(name)}; "to" counts Tensor.to onto a device without non_blocking=True."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    originals = {name: getattr(torch.Tensor, name) for name in (*READS, "to")}

    def counted(name):
        def call(self, *args, **kwargs):
            folder = _project_folder(sys._getframe(1))
            if folder is not None:
                if name != "to":
                    counts[folder][name] += 1
                elif not kwargs.get("non_blocking", False) and (
                        "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)):
                    counts[folder]["to"] += 1
            return originals[name](self, *args, **kwargs)
        return call

    for name in originals:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _runtime(config_cls, out: str, *flags: str):
    from posttrain.core.config import load_config
    from posttrain.train.runtime import Runtime

    rt = Runtime(load_config(config_cls, None, [*SMALL, f"--out_dir={out}", *flags]))
    # What build_optimizer makes on CUDA: fused AdamW, which skips a non-finite step on the device.
    rt.optimizer = torch.optim.AdamW(rt.model.parameters(), lr=1e-3, fused=True)
    return rt


def _grpo_update(d, out):
    from posttrain.train.grpo import GRPOConfig, Prompt, Sample, policy_updates

    rt = _runtime(GRPOConfig, out, "--grpo.micro_batch_seqs=3", "--grpo.iterations=2", "--grpo.beta=0.0",
                  "--grpo.mask_truncated=true")
    g = torch.Generator().manual_seed(0)
    V = rt.model.config.vocab_size

    def sample(i: int) -> Sample:
        n = 2 + i % 5
        p = Prompt("t", [], "1", "exact", f"p{i}", ids=torch.randint(1, V, (3 + i % 4,), generator=g).tolist())
        s = Sample(i // 4, p, torch.randint(1, V, (n,), generator=g).tolist(), (-torch.rand(n, generator=g)).tolist(),
                   truncated=i % 7 == 0, text="")
        s.advantage = float(torch.randn((), generator=g))
        return s

    minis = [[sample(8 * j + i) for i in range(8)] for j in range(2)]  # 2 mini-batches of 8: 3 micro-batches each
    before = [p.detach().to_local().clone() for p in rt.model.parameters()]
    with host_syncs() as counts:
        updates = policy_updates(rt, minis, lambda: 1e-3)
    assert dict(counts) == {"train": {"tolist": 1}}, dict(counts)  # the metrics of the 4 steps, read once
    assert len(updates) == 4 and rt.counters.step == 4 and rt.counters.optimizer_steps == 4
    assert all(u["loss_tokens"] > 0 and u["input_tokens"] > 0 and u["grad_norm"] > 0 for u in updates)
    assert not any(torch.equal(a, b.detach().to_local()) for a, b in zip(before, rt.model.parameters()))


def test_a_grpo_update_reads_the_device_once_at_its_end(tmp_path):
    spawn(_grpo_update, 1, str(tmp_path))


def _sft_step(d, out):
    from posttrain.train.sft import SFTConfig, make_loader, train_step

    rt = _runtime(SFTConfig, out, "--data.prefetch=false")
    loader = make_loader(rt)
    batches = [loader.next_batch() for _ in range(3)]
    with host_syncs() as counts:
        m = train_step(rt, batches, 1e-3)
    # The training loop reads once, at the end. kernels/logprob.py keeps its documented reads, one per micro-batch
    # each: the out-of-range target flag in forward (CPU; on CUDA it rides with the next one) and the
    # uniform-gradient check in backward, which picks its 3-GEMM path (left as it is: see its module docstring).
    kernel = counts.pop("kernels", collections.Counter())
    assert dict(counts) == {"train": {"tolist": 1}}, dict(counts)
    assert kernel == {"item": len(batches), "tolist": len(batches)}, kernel
    assert m["skipped"] == 0.0 and m["loss_tokens"] == sum(b.num_loss_tokens for b in batches)
    assert rt.counters.optimizer_steps == 1 and rt.counters.tokens == m["input_tokens"]

    # A non-finite step is skipped on the device (fused AdamW's found_inf) and booked from the same one read.
    state = [p.detach().to_local().clone() for p in rt.model.parameters()]
    steps = {k: v["step"].clone() for k, v in rt.optimizer.state.items()}
    with torch.no_grad():
        rt.model.norm.weight.to_local().fill_(float("nan"))
    state[[n for n, _ in rt.model.named_parameters()].index("norm.weight")].fill_(float("nan"))
    with host_syncs() as counts:
        m = train_step(rt, batches, 1e-3)
    counts.pop("kernels", None)
    assert dict(counts) == {"train": {"tolist": 1}} and m["skipped"] == 1.0
    assert rt.counters.skipped_steps == 1 and rt.bad_steps == 1 and rt.counters.step == 2
    for a, b in zip(state, rt.model.parameters()):
        torch.testing.assert_close(a, b.detach().to_local(), rtol=0, atol=0, equal_nan=True)
    assert all(torch.equal(v["step"], steps[k]) for k, v in rt.optimizer.state.items())


def test_an_sft_step_reads_the_device_once_at_its_end(tmp_path):
    spawn(_sft_step, 1, str(tmp_path))
