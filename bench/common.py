"""What every benchmark here shares: timing, peak memory, the measured matmul roofline, environment, table, JSON.

Timing is the median of timed iterations after warmups (CUDA events on GPU, perf_counter on CPU). Not a framework:
each bench_*.py still reads top to bottom and decides its own shapes and anchors.
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch


def budget_s(default: float) -> float:
    """Seconds a benchmark may run before it skips its remaining rows: what bench/gpu.sh gives its step less a margin
    for imports and teardown ($BENCH_BUDGET_S), else `default` (a run by hand)."""
    return float(os.environ.get("BENCH_BUDGET_S") or default)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_gb(fn) -> float | None:
    """Peak allocated GB while fn() runs, inputs included (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() / 1e9


def matmul_tflops() -> float | None:
    """Measured bf16 8192^3 matmul rate, the roofline the effective TFLOP/s are compared with."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_fn(lambda: a @ a, warmup=3, iters=10)
    return 2 * 8192**3 / ms / 1e9


def hf_transformers():
    """The transformers module, for an HF anchor (imported only by the benchmarks that compare with it)."""
    import transformers

    return transformers


def environment(cuda: bool) -> dict:
    """Where the numbers come from. `cuda`: whether this run measures on the GPU (a --smoke run on a GPU machine
    measures on the CPU and must say so)."""
    import triton

    dev = torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    return {
        "device": dev,
        "mode": "gpu" if cuda else "cpu-ratios",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def print_table(rows: list[dict], cols: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


class Report:
    """Rows of one benchmark run, written to JSON after every row."""

    def __init__(self, path: str | None, meta: dict):
        self.path, self.meta, self.rows = path, meta, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if self.path:
            with open(self.path, "w") as f:
                json.dump({**self.meta, "rows": self.rows}, f, indent=1)


def start(name: str, doc: str, argv: list[str] | None) -> tuple[argparse.Namespace, bool, Report]:
    """The command line the kernel benchmarks share (`--smoke`: tiny CPU shapes for CI; `--json PATH`), whether this
    run measures on CUDA, and the report, with the header printed. On CUDA the meta holds the measured matmul rate."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few iterations (CI)")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    meta = {"bench": name, **environment(cuda), "matmul_tflops_bf16": matmul_tflops() if cuda else None}
    print(f"# bench_{name} on {meta['device']}, torch {meta['torch']}, triton {meta['triton']}")
    return args, cuda, Report(args.json, meta)
