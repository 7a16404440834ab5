"""Benchmark: log-prob of target tokens through the lm-head, forward + backward (the SFT loss), ours vs anchors.

    python -m posttrain.bench.bench_logprob [--smoke] [--json PATH]

Anchors in the same run: eager (`(h @ W.T).float().log_softmax(-1).gather`), torch.compile of it, and Liger-Kernel's
LigerFusedLinearCrossEntropyLoss(reduction="none") when importable. On CUDA: median of 10 timed iterations after 3
warmups (CUDA events), peak memory from torch.cuda.max_memory_allocated (inputs included), effective TFLOP/s counting
the 3 GEMMs of 2*T*V*H FLOP that forward + backward need, against a bf16 8192^3 matmul measured in the same run.
On CPU: small shapes, ratios to eager only (CPU times say nothing about the GPU). Results go to a table and JSON;
the JSON is rewritten after every row so a timeout still leaves what was measured.
"""

import time

import torch

from posttrain.bench.common import budget_s, peak_gb, print_table, start, time_fn
from posttrain.kernels._utils import fp32_out_mm_available
from posttrain.kernels.logprob import default_chunk_size, linear_logprob, linear_logprob_reference

BUDGET_S = budget_s(80.0)  # bench/gpu.sh: its step's share less 10 s


def make_inputs(T: int, H: int, V: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(T, H, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(V, H, device=device, dtype=torch.float32, generator=g) / H**0.5).to(dtype)
    targets = torch.randint(0, V, (T,), device=device, generator=g)
    targets[::50] = -100
    return hidden, weight.requires_grad_(), targets


def liger_fn():
    """A (hidden, weight, targets) -> logp [T] function through Liger's fused linear CE, or None with the reason."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        return None, f"liger_kernel not importable ({e.__class__.__name__})"
    ce = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return (lambda h, w, t: -ce(w, h, t)), None


def run_case(report, T, H, V, dtype, device, impls, warmup, iters, roof, chunk=None, label=None):
    hidden, weight, targets = make_inputs(T, H, V, dtype, device)
    with torch.no_grad():
        want = linear_logprob_reference(hidden, weight, targets)
    flop = 3 * 2 * T * V * H
    eager_ms = None
    for name, fn in impls:
        row = {"impl": label or name, "T": T, "H": H, "V": V, "dtype": str(dtype).replace("torch.", "")}
        if name == "ours":
            row["chunk"] = chunk or default_chunk_size(T, dtype)

        def step():
            hidden.grad = weight.grad = None
            out = fn(hidden, weight, targets)
            out.sum().backward()
            return out

        try:
            out = step()
            row["max_abs_err"] = (out.detach().float() - want.float()).abs().max().item()
            row["peak_gb"] = peak_gb(step)
            row["ms"] = time_fn(step, warmup, iters)
        except torch.OutOfMemoryError:
            row["note"] = "out of memory"
            hidden.grad = weight.grad = None
            torch.cuda.empty_cache()
            report.add(row)
            continue
        if name == "eager":
            eager_ms = row["ms"]
        if torch.cuda.is_available():
            row["tflops"] = flop / row["ms"] / 1e9
            row["pct_of_matmul"] = 100 * row["tflops"] / roof if roof else None
        elif eager_ms:
            row["x_eager_time"] = row["ms"] / eager_ms
        report.add(row)
    del hidden, weight, targets, want


def main(argv: list[str] | None = None) -> None:
    t_start = time.perf_counter()
    args, cuda, report = start("logprob", __doc__, argv)
    device = "cuda" if cuda else "cpu"
    roof = report.meta["matmul_tflops_bf16"]
    # grad_weight accumulation: one fp32-output GEMM per chunk, or a bf16 GEMM + fp32 add (slower, rounds partials)
    report.meta["addmm_fp32_out"] = fp32_out_mm_available(device, torch.bfloat16)

    ours = ("ours", lambda h, w, t: linear_logprob(h, w, t))
    eager = ("eager", lambda h, w, t: linear_logprob_reference(h, w, t))
    if not cuda:
        # CPU: the same code path the tests use (interpreter when TRITON_INTERPRET=1, else the torch fallback).
        T, H, V, iters = (64, 32, 512, 2) if args.smoke else (1024, 64, 8192, 5)
        impls = [eager, ours]
        if not args.smoke:
            impls.append(("compile", torch.compile(linear_logprob_reference)))
        run_case(report, T, H, V, torch.float32, device, impls, warmup=1, iters=iters, roof=None)
    else:
        compiled = ("compile", torch.compile(linear_logprob_reference, dynamic=False))
        impls = [eager, ours]
        lf, why = liger_fn()
        if lf is None:
            print(f"  (Liger anchor skipped: {why})")
            report.meta["liger"] = why
        main_impls = impls + ([("liger", lf)] if lf else [])
        # The headline shape first, then the chunk sweep, the other shapes, and torch.compile last
        # (its compile time is the one cost we cannot bound).
        run_case(report, 16384, 1536, 151936, torch.bfloat16, device, main_impls, 3, 10, roof)
        for chunk in (1024, 4096, 8192):  # the default (2048) ran above
            fn = ("ours", lambda h, w, t, c=chunk: linear_logprob(h, w, t, chunk_size=c))
            run_case(report, 16384, 1536, 151936, torch.bfloat16, device, [fn], 2, 8, roof, chunk=chunk)
        # Per-token weights (same values, gradient scaled by w_t): the recompute path of the backward.
        w_tok = torch.linspace(0, 1, 16384, device="cuda")
        weighted = ("ours", lambda h, w, t: (lp := linear_logprob(h, w, t)) * w_tok + lp.detach() * (1 - w_tok))
        run_case(report, 16384, 1536, 151936, torch.bfloat16, device, [weighted], 2, 8, roof, label="ours-weighted-g")
        for T, H, V in ((4096, 1536, 151936), (4096, 4096, 128256), (16384, 4096, 128256), (32768, 1536, 151936)):
            if time.perf_counter() - t_start > BUDGET_S - 40:
                print(f"  (skipping T={T}, H={H}: keeping {40} s of the {BUDGET_S:.0f} s budget for torch.compile)")
                continue
            run_case(report, T, H, V, torch.bfloat16, device, impls, 2, 8, roof)
        run_case(report, 16384, 1536, 151936, torch.bfloat16, device, [compiled], 2, 8, roof)
    print()
    cols = ["impl", "T", "H", "V", "chunk", "ms", "x_eager_time", "peak_gb", "tflops", "pct_of_matmul", "max_abs_err"]
    print_table(report.rows, [c for c in cols if any(c in r for r in report.rows)])
    print(f"# took {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
