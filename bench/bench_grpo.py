"""Benchmark: one GRPO policy-loss step from hidden states (forward + backward), ours vs anchors.

    python -m posttrain.bench.bench_grpo [--smoke] [--json PATH]

The step: lm-head log-probs of B x L completion tokens, the clipped GRPO/DAPO loss with old and reference log-probs
given (beta = 0.04), gradients to hidden and weight. Ours is `linear_grpo_loss` (no logits); the anchors are eager
(`linear_logprob_reference` then `grpo_loss_reference`), torch.compile of the same, and Liger-Kernel's
LigerFusedLinearGRPOLoss when importable. Also the loss on given log-probs alone (`grpo_loss` vs its reference).
Timing, memory and JSON as in bench/bench_logprob.py. On CPU: small shapes and ratios only.
"""

import time

import torch

from posttrain.bench.common import budget_s, peak_gb, print_table, start, time_fn
from posttrain.kernels._utils import fp32_out_mm_available
from posttrain.kernels.grpo import grpo_loss, grpo_loss_reference, linear_grpo_loss
from posttrain.kernels.logprob import default_chunk_size, linear_logprob_reference

BUDGET_S = budget_s(50.0)  # bench/gpu.sh: its step's share less 10 s
KW = dict(beta=0.04, eps_low=0.2, eps_high=0.28, loss_type="dapo")


def make_inputs(B, L, H, V, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(B, L, H, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(V, H, device=device, generator=g) / H**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, L), device=device, generator=g)
    with torch.no_grad():
        base = linear_logprob_reference(hidden, weight, targets)
    old = base + 0.1 * torch.randn(B, L, device=device, generator=g)
    ref = base + 0.1 * torch.randn(B, L, device=device, generator=g)
    adv = torch.randn(B, device=device, generator=g)
    mask = torch.rand(B, L, device=device, generator=g) > 0.1
    return hidden, weight, targets, old, ref, adv, mask


def eager_step(hidden, weight, targets, old, ref, adv, mask):
    logp = linear_logprob_reference(hidden, weight, targets)
    return grpo_loss_reference(logp, old, adv, mask, ref_logp=ref, **KW)[0]


def ours_step(hidden, weight, targets, old, ref, adv, mask, chunk_size=None):
    return linear_grpo_loss(hidden, weight, targets, old, adv, mask, ref_logp=ref, chunk_size=chunk_size, **KW)[0]


def liger_step():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        return None, f"liger_kernel not importable ({e.__class__.__name__})"
    try:
        loss_fn = LigerFusedLinearGRPOLoss(
            beta=KW["beta"], epsilon_low=KW["eps_low"], epsilon_high=KW["eps_high"], loss_type=KW["loss_type"]
        )
    except TypeError as e:
        return None, f"LigerFusedLinearGRPOLoss signature differs ({e})"

    def step(hidden, weight, targets, old, ref, adv, mask):
        return loss_fn(hidden, weight, targets, mask.float(), adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]

    return step, None


def run_case(report, B, L, H, V, dtype, device, impls, warmup, iters, roof, chunk=None, want=None):
    inputs = make_inputs(B, L, H, V, dtype, device)
    hidden, weight = inputs[0], inputs[1]
    if want is None:
        with torch.no_grad():
            want = eager_step(*inputs).float().item()
    flop = 3 * 2 * B * L * V * H
    eager_ms = None
    for name, fn in impls:
        row = {"impl": name, "B": B, "L": L, "H": H, "V": V, "dtype": str(dtype).replace("torch.", "")}
        if name == "ours":
            row["chunk"] = chunk or default_chunk_size(B * L, dtype)

        def step():
            hidden.grad = weight.grad = None
            loss = fn(*inputs)
            loss.backward()
            return loss

        try:
            got = step().detach().float().item()
            if want == want:  # NaN: no reference at this shape
                row["max_abs_err"] = abs(got - want)
            row["peak_gb"] = peak_gb(step)
            row["ms"] = time_fn(step, warmup, iters)
        except torch.OutOfMemoryError:
            row["note"] = "out of memory"
        except Exception as e:  # an anchor's API drift must not hide our numbers
            if name == "ours":
                raise
            row["note"] = f"failed: {e.__class__.__name__}: {str(e)[:120]}"
        hidden.grad = weight.grad = None
        if "ms" in row:
            if name == "eager":
                eager_ms = row["ms"]
            if torch.cuda.is_available():
                row["tflops"] = flop / row["ms"] / 1e9
                row["pct_of_matmul"] = 100 * row["tflops"] / roof if roof else None
            elif eager_ms:
                row["x_eager_time"] = row["ms"] / eager_ms
        report.add(row)


def run_loss_only(report, B, L, device, warmup, iters):
    """grpo_loss on given log-probs: the Triton per-token pass vs the reference's autograd."""
    g = torch.Generator(device=device).manual_seed(1)
    logp = (-torch.rand(B, L, device=device, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(B, L, device=device, generator=g)
    ref = logp.detach() + 0.1 * torch.randn(B, L, device=device, generator=g)
    adv = torch.randn(B, device=device, generator=g)
    mask = torch.rand(B, L, device=device, generator=g) > 0.1
    want = grpo_loss_reference(logp, old, adv, mask, ref_logp=ref, **KW)[0].item()
    eager_ms = None
    for name, fn in (("loss-only eager", grpo_loss_reference), ("loss-only ours", grpo_loss)):

        def step():
            logp.grad = None
            loss = fn(logp, old, adv, mask, ref_logp=ref, **KW)[0]
            loss.backward()
            return loss

        row = {"impl": name, "B": B, "L": L, "max_abs_err": abs(step().item() - want)}
        row["ms"] = time_fn(step, warmup, iters)
        eager_ms = eager_ms or row["ms"]
        row["x_eager_time"] = row["ms"] / eager_ms
        report.add(row)


def main(argv: list[str] | None = None) -> None:
    t_start = time.perf_counter()
    args, cuda, report = start("grpo", __doc__, argv)
    device = "cuda" if cuda else "cpu"
    roof = report.meta["matmul_tflops_bf16"]
    report.meta["addmm_fp32_out"] = fp32_out_mm_available(device, torch.bfloat16)  # see bench_logprob
    impls = [("eager", eager_step), ("ours", ours_step)]
    if not cuda:
        B, L, H, V, iters = (2, 16, 32, 512, 2) if args.smoke else (8, 128, 64, 8192, 5)
        run_case(report, B, L, H, V, torch.float32, device, impls, 1, iters, None)
        run_loss_only(report, B, L, device, 1, iters)
    else:
        lf, why = liger_step()
        if lf is None:
            print(f"  (Liger anchor skipped: {why})")
            report.meta["liger"] = why
        main_impls = impls + ([("liger", lf)] if lf else [])
        run_case(report, 16, 512, 1536, 151936, torch.bfloat16, device, main_impls, 3, 10, roof)
        run_loss_only(report, 16, 512, device, 3, 10)
        for chunk in (1024, 4096):  # the default (2048) ran above
            fn = ("ours", lambda *a, c=chunk: ours_step(*a, chunk_size=c))
            run_case(report, 16, 512, 1536, 151936, torch.bfloat16, device, [fn], 2, 8, roof, chunk=chunk)
        # One 16384-token completion: chunks cut the sequence, so peak memory stays that of L = 512 (<= 2 GB extra).
        # No eager anchor (its [L, V] fp32 logits alone are 10 GB); the loss is not compared.
        if time.perf_counter() - t_start < BUDGET_S - 35:
            run_case(report, 1, 16384, 1536, 151936, torch.bfloat16, device, [impls[1]], 1, 5, roof, want=float("nan"))
        if time.perf_counter() - t_start < BUDGET_S - 35:
            run_case(report, 16, 512, 4096, 128256, torch.bfloat16, device, impls, 2, 8, roof)
        else:
            print(f"  (skipping the Llama-3-8B shape: {BUDGET_S:.0f} s budget)")
        # torch.compile last: its compile time is the one cost we cannot bound.
        compiled = ("compile", torch.compile(eager_step, dynamic=False))
        run_case(report, 16, 512, 1536, 151936, torch.bfloat16, device, [compiled], 2, 8, roof)
    print()
    cols = ["impl", "B", "L", "H", "V", "chunk", "ms", "x_eager_time", "peak_gb", "tflops", "pct_of_matmul",
            "max_abs_err", "note"]  # fmt: skip
    print_table(report.rows, [c for c in cols if any(c in r for r in report.rows)])
    print(f"# took {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
