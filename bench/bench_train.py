"""Benchmark: one full training step (forward + backward + AdamW), ours vs Hugging Face transformers, same run.

    python -m posttrain.bench.bench_train [--smoke] [--skip-compile] [--json PATH]

GPU (default when CUDA is present): a Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied, qkv bias), 8 x 2048 random tokens per step as plain causal rows, bf16 compute.
  hf            transformers Qwen2ForCausalLM (SDPA attention) as HF Trainer runs it with bf16=True: fp32 weights,
                forward under torch.autocast(bf16), `model(input_ids, labels=input_ids).loss`, fused AdamW
  ours          core.distributed: FSDP2 (world size 1), bf16 params with fp32 reduce, fp32 masters, fused log-prob
                loss (logits never built), fused AdamW; the loss convention of train/sft.py
  ours+ac       the same with activation checkpointing of every block
  ours+compile  the same with torch.compile per block; last, and cut off when it would overrun the time budget
Both sides clip the gradient norm to 1.0 (Trainer's default) and take the same AdamW step (lr 3e-4, no weight decay).
Ours starts from HF's initial weights, so the first losses must agree: a check that both sides do the same work.

Per variant: median step time of 5 steps after 2 warm-ups (CUDA events), tokens/s, MFU (tokens/s x
`ModelConfig.flops_per_token(2048)` / the dense bf16 peak in train/sft.py, 989 TFLOP/s on H100 and H200), the peak of
torch.cuda.max_memory_allocated over the whole variant (build, warm-up, timed steps), with the previous variant's model
and optimizer freed first. The issue's target: >= 1.5x HF tokens/s at <= 30 GB peak.
CPU (no CUDA, or --smoke): the tiny model shape, float32, a few steps; compare ratios only.
Timing, table and JSON helpers are bench/bench_logprob.py's; the JSON is rewritten after every variant.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import signal
import time
import traceback
from typing import Callable, Iterator

import torch

from posttrain.bench.common import Report, budget_s, environment, hf_transformers, print_table, time_fn
from posttrain.core.checkpoint import hf_name
from posttrain.core.distributed import (Dist, ParallelConfig, build_optimizer, clip_grad_norm_, close_distributed,
                              init_distributed, shard_model)
from posttrain.core.model import ModelConfig, Transformer
from posttrain.train.runtime import peak_flops as dense_bf16_peak

# The budget is counted from main(), after the imports (~3 s here, more on a cold machine), and teardown follows it:
# bench/gpu.sh passes its step's share less 10 s, so a variant cut at the budget still gets its row written.
BUDGET_S = budget_s(75.0)
LR, MAX_GRAD_NORM = 3e-4, 1.0
TARGET_SPEEDUP, TARGET_PEAK_GB = 1.5, 30.0

QWEN2_05B = ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                        num_kv_heads=2, tie_word_embeddings=True, qkv_bias=True, rope_theta=1000000.0,
                        max_position_embeddings=32768, architecture="Qwen2ForCausalLM")
TINY = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=2,
                   tie_word_embeddings=True, qkv_bias=True, max_position_embeddings=512,
                   architecture="Qwen2ForCausalLM")


class OutOfTime(BaseException):
    """The time budget ran out inside a variant. A BaseException so that torch.compile's error handling, which
    catches Exception (and may fall back to eager), lets it through."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise OutOfTime in the main thread after `seconds` (SIGALRM; checked whenever Python code runs)."""

    def expire(signum, frame):
        raise OutOfTime(f"time budget of {BUDGET_S:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------------------- the two sides


def hf_config(cfg: ModelConfig):
    transformers = hf_transformers()

    return transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="sdpa",
        use_cache=False)  # training: no KV cache, as Trainer recipes set it


def hf_variant(cfg: ModelConfig, input_ids: torch.Tensor, autocast: bool, losses: list[torch.Tensor]):
    """HF Trainer's bf16=True recipe: fp32 weights, autocast forward, backward outside it, clip, AdamW.
    Returns (step function, a CPU copy of the initial weights by HF name)."""
    transformers = hf_transformers()

    device = input_ids.device
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(hf_config(cfg))  # float32: the default dtype
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"bench_train: HF model uses {model.config._attn_implementation!r} attention, not 'sdpa'")
    model.train()
    initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=device.type == "cuda" or None)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=input_ids, labels=input_ids).loss  # shifts labels, mean over B*(S-1) tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    return step, initial


def build_ours(cfg: ModelConfig, d: Dist, pcfg: ParallelConfig, weights: dict[str, torch.Tensor]) -> Transformer:
    """Sharded like build_model, filled from `weights` (full tensors by HF name). Starting from HF's initial weights
    makes the first losses comparable, and skips build_model's from-scratch CPU init (~10 s at this shape on 2 cores)
    per variant."""
    return shard_model(cfg, d, pcfg, lambda name, start, end: weights[hf_name(name)][start:end])


def ours_variant(cfg: ModelConfig, d: Dist, pcfg: ParallelConfig, weights: dict[str, torch.Tensor],
                 input_ids: torch.Tensor, losses: list[torch.Tensor]) -> Callable[[], None]:
    """Ours as train/sft.py steps it: -sum(log p) / tokens (x world size 1), backward, clip, AdamW."""
    model = build_ours(cfg, d, pcfg, weights)
    model.train()
    optimizer = build_optimizer(model, lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]  # the same B*(S-1) predictions HF's labels=input_ids makes
    num_tokens = int((targets != -100).sum())

    def step() -> None:
        logp = model(input_ids, targets=targets)  # [B, S] fp32, 0 where ignored
        loss = -logp.sum() * (d.world_size / num_tokens)
        loss.backward()
        clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    return step


# --------------------------------------------------------------------------------------------------------- running


def measure(name: str, make_step: Callable[[list[torch.Tensor]], Callable[[], None]], report: Report,
            device: torch.device, tokens: int, flops_per_token: float, peak_flops: float | None,
            warmup: int, iters: int, budget_left: float, baseline: dict | None = None) -> dict:
    """Build one variant, time it, free it; add its row (with a note instead of numbers when it failed), with
    ratios to `baseline` (HF's row) when both were measured."""
    free_memory(device)
    row: dict = {"impl": name}
    if device.type == "cuda":
        row["start_gb"] = torch.cuda.memory_allocated() / 1e9  # should be ~0: the previous variant is gone
    losses: list[torch.Tensor] = []
    try:
        with deadline(budget_left):
            step = make_step(losses)
            ms = time_fn(step, warmup, iters)
    except OutOfTime as e:
        row["note"] = f"stopped: {e}"
    except torch.OutOfMemoryError:
        row["note"] = "out of memory"
    except Exception as e:  # a broken variant (e.g. a compile error) must not lose the others' numbers
        traceback.print_exc()
        row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    else:
        row["ms"] = ms
        row["tokens_per_s"] = tokens / (ms / 1e3)
        if peak_flops:
            row["mfu"] = row["tokens_per_s"] * flops_per_token / peak_flops
        values = [float(x) for x in losses]
        row["first_loss"], row["last_loss"] = values[0], values[-1]
        if baseline is not None and "tokens_per_s" in baseline:
            row["x_hf_tokens_per_s"] = row["tokens_per_s"] / baseline["tokens_per_s"]
            row["first_loss_minus_hf"] = row["first_loss"] - baseline["first_loss"]
    if device.type == "cuda":
        torch.cuda.synchronize()
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    step = losses = None
    free_memory(device)
    report.add(row)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, a few steps on CPU (CI)")
    ap.add_argument("--skip-compile", action="store_true", help="leave out the ours+compile variant")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        cfg, (B, S), dtype, warmup, iters = QWEN2_05B, (8, 2048), "bfloat16", 2, 5
    else:
        # One thread: on a shared 2-core machine OpenMP barriers waiting for a busy core swing timings by 10x.
        torch.set_num_threads(1)
        cfg, (B, S), dtype, warmup, iters = TINY, ((2, 64) if args.smoke else (4, 256)), "float32", 1, 3
    d = init_distributed(seed=0, device="cuda" if cuda else "cpu")
    device = d.device
    meta = {"bench": "train", **environment(cuda), "batch": B, "seq_len": S,
            "compute_dtype": dtype, "model": cfg.to_dict(), "lr": LR, "max_grad_norm": MAX_GRAD_NORM,
            "hf_recipe": "fp32 weights, torch.autocast(bf16) forward, fused AdamW (HF Trainer, bf16=True)" if cuda
            else "fp32 weights, no autocast, AdamW"}
    peak_flops = meta["peak_flops"] = dense_bf16_peak(device)  # 989e12 on H100 and H200, None on CPU
    print(f"# bench_train on {meta['device']}, torch {meta['torch']}, triton {meta['triton']}; {B} x {S} tokens, "
          f"{dtype}, {cfg.num_params() / 1e6:.0f}M parameters")
    report = Report(args.json, meta)

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(device)
    flops_per_token = cfg.flops_per_token(S)
    common = dict(report=report, device=device, tokens=B * S, flops_per_token=flops_per_token,
                  peak_flops=peak_flops, warmup=warmup, iters=iters)

    def budget_left() -> float:
        return BUDGET_S - (time.perf_counter() - t_start)

    weights: dict[str, torch.Tensor] = {}

    def make_hf(losses):
        step, initial = hf_variant(cfg, input_ids, autocast=cuda, losses=losses)
        weights.update(initial)
        return step

    variants = [("ours", ParallelConfig(param_dtype=dtype, reduce_dtype="float32"))]
    if not args.smoke:
        variants.append(("ours+ac", ParallelConfig(param_dtype=dtype, activation_checkpointing=True)))
        if not args.skip_compile:  # last: its compile time is the one cost we cannot bound
            variants.append(("ours+compile", ParallelConfig(param_dtype=dtype, compile=True)))

    hf_row = measure("hf", make_hf, budget_left=budget_left(), **common)
    for name, pcfg in variants:
        if not weights:  # HF failed before its weights existed: ours has nothing to start from
            report.add({"impl": name, "note": "skipped: the HF variant failed before building its weights"})
            continue
        if budget_left() < 5:
            report.add({"impl": name, "note": f"skipped: under 5 s of the {BUDGET_S:.0f} s budget left"})
            continue
        measure(name, lambda losses, p=pcfg: ours_variant(cfg, d, p, weights, input_ids, losses),
                budget_left=budget_left(), baseline=hf_row, **common)

    print()
    cols = ["impl", "ms", "tokens_per_s", "x_hf_tokens_per_s", "mfu", "peak_gb", "start_gb", "first_loss",
            "first_loss_minus_hf", "last_loss", "note"]
    print_table(report.rows, [c for c in cols if any(c in r for r in report.rows)])
    if cuda:
        met = [r["impl"] for r in report.rows if r["impl"] != "hf" and r.get("x_hf_tokens_per_s", 0) >= TARGET_SPEEDUP
               and r.get("peak_gb", math.inf) <= TARGET_PEAK_GB]
        print(f"target (>= {TARGET_SPEEDUP}x HF tokens/s at <= {TARGET_PEAK_GB:.0f} GB peak): "
              + (f"met by {', '.join(met)}" if met else "not met"))
    else:
        print("(CPU: compare x_hf_tokens_per_s only; absolute numbers say nothing about the GPU)")
    print(f"# took {time.perf_counter() - t_start:.1f} s")
    broken = [r["impl"] for r in report.rows if r.get("note", "").startswith("failed")]
    return 1 if broken else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    finally:
        close_distributed()  # the one-rank group main() made, also when main() raised; close_distributed says why
