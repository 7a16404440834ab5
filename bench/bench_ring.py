"""The in-memory checkpoint ring (core/ring.py) vs torch.save / torch.load to local disk, in one run.

    python -m posttrain.bench.bench_ring [--smoke] [--json out.json]

Rows, for 1 GB and 3 GB of weights (fp32 parameters of a stand-in model, one flat tensor per 64 MiB chunk, like a
model's parameter list):
  - ring snapshot and restore: GB/s (host wall time from the call to the copy's completion event);
  - torch.save to a local file (fsync'd) and torch.load back: GB/s, the anchor;
  - the step-time overhead of an asynchronous snapshot: a compute-bound "training step" (matmuls writing the
    weights afterwards, as an optimizer step does) timed alone and with a snapshot issued just before it.
Targets on an H100/H200 (pinned device-host copies measured 55 GB/s): >= 40 GB/s snapshot and restore, <= 3%
step-time overhead. On CPU (--smoke, or no GPU) the copies are memcpy and only the ratio to torch.save means
anything.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
from torch import nn

from posttrain.bench.common import print_table, start, sync, time_fn
from posttrain.core.ring import CheckpointRing

class Weights(nn.Module):
    """`nbytes` of fp32 weights as a list of parameters of 64 MiB each (at most 1/16 of the total, for small runs)."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        super().__init__()
        chunk = min(16 << 20, max(1, nbytes // 64))
        n = max(1, nbytes // (chunk * 4))
        self.chunks = nn.ParameterList(nn.Parameter(torch.randn(chunk, device=device)) for _ in range(n))


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def bench_size(gb: float, device: torch.device, tmp: str) -> dict:
    model = Weights(int(gb * 1e9), device)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    ring = CheckpointRing(nbytes + (1 << 20))
    ring.snapshot("w", model)  # allocate (and pin) the buffers once: the ring reuses them
    ring.wait()
    t0 = time.perf_counter()
    ring.snapshot("w", model)
    ring.wait()
    snap = time.perf_counter() - t0
    t0 = time.perf_counter()
    ring.restore("w", model)
    sync()
    rest = time.perf_counter() - t0
    path = os.path.join(tmp, "w.pt")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(model.state_dict(), f)
        f.flush()
        os.fsync(f.fileno())
    save = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state)
    sync()
    load = time.perf_counter() - t0
    os.remove(path)
    ring.clear()
    return {"size_gb": nbytes / 1e9, "snapshot_gbps": gbps(nbytes, snap), "restore_gbps": gbps(nbytes, rest),
            "torch_save_gbps": gbps(nbytes, save), "torch_load_gbps": gbps(nbytes, load),
            "snapshot_vs_save": save / snap, "restore_vs_load": load / rest}


def bench_overhead(gb: float, device: torch.device, smoke: bool) -> dict:
    """A stand-in training step: matmuls, then an in-place update of every weight (the optimizer's writes)."""
    model = Weights(int(gb * 1e9), device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    n = 512 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)

    def step() -> None:
        for _ in range(4 if smoke else 16):
            a @ a
        for p in model.parameters():
            p.grad = p.detach()  # a stand-in gradient, as large as the weights
        opt.step()

    ring = CheckpointRing(gb * 2e9)
    ring.snapshot("w", model, opt)
    ring.wait()
    plain = time_fn(step, warmup=2, iters=5)

    def snap_step() -> None:
        ring.snapshot("w", model, opt)  # asynchronous on CUDA; the optimizer step waits for the copy on the GPU
        step()

    with_snap = time_fn(snap_step, warmup=2, iters=5)
    return {"size_gb": gb, "step_ms": plain, "step_with_snapshot_ms": with_snap, "overhead": with_snap / plain - 1}


def main(argv: list[str] | None = None) -> None:
    args, cuda, report = start("ring", __doc__, argv)
    device = torch.device("cuda" if cuda else "cpu")
    sizes = [0.02, 0.06] if args.smoke else [1.0, 3.0]
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for gb in sizes:
            row = bench_size(gb, device, tmp)
            report.add(row)
            rows.append(row)
    print_table(rows, ["size_gb", "snapshot_gbps", "restore_gbps", "torch_save_gbps", "torch_load_gbps",
                       "snapshot_vs_save", "restore_vs_load"])
    over = bench_overhead(sizes[0], device, args.smoke)
    report.add(over)
    print_table([over], ["size_gb", "step_ms", "step_with_snapshot_ms", "overhead"])


if __name__ == "__main__":
    main()
