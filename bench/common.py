"""What every benchmark here shares: timing, peak memory, the measured matmul roofline, environment, table, JSON.

Timing is the median of timed iterations after warmups (CUDA events on GPU, perf_counter on CPU). Not a framework:
each bench_*.py still reads top to bottom and decides its own shapes and anchors.
"""

import json
import platform
import statistics
import time

import torch


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


def environment() -> dict:
    import triton

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    return {
        "device": dev,
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
