"""Sampler throughput: core.sampler.generate vs Hugging Face transformers `generate`, same weights, same run.

GPU (default when CUDA is present): a Qwen2-0.5B-shaped random model (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied), bf16, 64-token prompts, 256 new tokens, temperature 1, stop disabled.
Rows, each ours vs its anchors:
  - batch 64: HF generate (the anchor: 3,410 tok/s on an H100), ours with the fused decode kernels and CUDA graphs,
    ours through the plain decode path (fused_kernels=False: the op-by-op step), and ours on the same model wrapped
    in FSDP2 (one rank; the path the trainers take: it decodes on the rollout replica);
  - batch 256: ours and HF;
  - a long-tail batch: 256 sequences (64 prompts x 4 samples) in 64 rows, stop tokens making lengths roughly
    geometric (mean ~64, cap 256), with and without refilling finished rows; tokens/s counts returned tokens.
Each row reports kernels per decode step (counted: aten ops that launch work, through a dispatch hook, plus Triton
launches; per layer and outside the layers), bytes one decode step must move (weights, the KV slots its rows read,
the logits written and read by the sampler), and tokens/s against the roofline those bytes give at the device copy
bandwidth measured in this run (not a constant: the card may be an H100 or an H200).
Targets: >= 60,000 tok/s at batch 64, >= 50% of the roofline at batch 256, FSDP2 within 10% of the plain model.
CPU (no CUDA, or --smoke): the tiny model, small shapes, ratios only (the fused kernels are counted under
TRITON_INTERPRET=1 but not timed: CPU decodes through the plain path).

    python -m posttrain.bench.bench_sampler [--smoke] [--json PATH]
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import posttrain.core.sampler as S
from posttrain.bench.common import budget_s, environment, hf_transformers, start, sync, time_fn
from posttrain.core.checkpoint import DTYPES, our_name
from posttrain.core.distributed import ParallelConfig, close_distributed, parallelize
from posttrain.core.model import ModelConfig, Transformer
from posttrain.core.sampler import SamplingParams, generate, sampler_stats
from posttrain.kernels._utils import use_triton
from posttrain.kernels.sample import fused_sample_step, sample_step_reference

BUDGET_S = budget_s(65.0)  # later rows are skipped (and said so) past it; gpu.sh: its step's share less 10 s


# ------------------------------------------------------------------------------------------------ kernel counting

_NOT_KERNELS = {"aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default",
                "aten.lift_fresh.default", "aten._unsafe_view.default"}


@contextlib.contextmanager
def counting_kernels():
    """Yields a list that fills with what runs: aten ops that launch work (views and allocations are not kernels;
    a GEMM with bias is one addmm), and Triton launches ("triton:<kernel>"), which the dispatcher does not see."""
    import triton.runtime.jit as jit
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    ops: list[str] = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and str(func) not in _NOT_KERNELS:
                ops.append(str(func))
            return func(*args, **(kwargs or {}))

    classes = [jit.JITFunction]
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    saved = [(c, c.__dict__["run"]) for c in classes if "run" in c.__dict__]

    def patched(run):
        def counted(fn, *args, **kwargs):
            ops.append("triton:" + getattr(fn, "fn", fn).__name__)
            with _disable_current_modes():
                return run(fn, *args, **kwargs)
        return counted

    for c, run in saved:
        c.run = patched(run)
    try:
        with Mode():
            yield ops
    finally:
        for c, run in saved:
            c.run = run


def decode_step_kernels(cfg: ModelConfig, dtype: torch.dtype, device: str, fused: bool, rows: int = 8
                        ) -> tuple[int, int, list[str]]:
    """(kernels per layer, kernels outside the layers, the ops of a 2-layer step) of one decode step at top-p
    sampling, from the difference between 2- and 3-layer models of cfg's widths. fused: the fused kernels
    (Transformer.decode_fused and the sampling kernel's bookkeeping), as CUDA runs them; else the plain path."""
    counts = {}
    for layers in (2, 3):
        small = ModelConfig(**{**cfg.to_dict(), "num_layers": layers})
        with torch.device(device):
            model = Transformer(small).to(dtype).eval()
        model.init_weights(0)
        run = S._Run(model, S._engine(model), [[1, 2, 3]], [0], rows, rows, 64, 4, SamplingParams(top_p=0.9),
                     (5,), (), None, 0, False, torch.device(device), dtype, fused=fused)
        run.fill(list(range(rows)), None)
        step = S.sample_step
        S.sample_step = fused_sample_step if fused else sample_step_reference
        try:
            with torch.no_grad():
                S._decode_step(model, run.st, 64)  # warm-up: rope table and attention backend chosen once
                with counting_kernels() as ops:
                    S._decode_step(model, run.st, 64)
        finally:
            S.sample_step = step
            S.free_cache(model)
        counts[layers] = ops
    per_layer = len(counts[3]) - len(counts[2])
    return per_layer, len(counts[2]) - 2 * per_layer, counts[2]


# ------------------------------------------------------------------------------------------------ models, timing


def build(cfg: ModelConfig, dtype: torch.dtype, device: str):
    """A random HF Qwen2 model and ours with the same weights."""
    transformers = hf_transformers()

    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="sdpa", torch_dtype=dtype)
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.Qwen2ForCausalLM(hf_cfg).to(dtype).eval()
        ours = Transformer(cfg).to(dtype).eval()
    state = {our_name(k): v for k, v in hf.state_dict().items() if our_name(k) is not None}
    ours.load_state_dict(state, strict=False)
    ours.tie_weights()
    return hf, ours


def fsdp_wrap(model: Transformer, device: str) -> Transformer:
    """A copy of `model` under FSDP2 on a one-rank process group, sharded by core.distributed.parallelize (in the
    model's own dtype: no mixed precision)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    wrapped = copy.deepcopy(model)
    dtype = next(name for name, d in DTYPES.items() if d == next(model.parameters()).dtype)
    return parallelize(wrapped, init_device_mesh(device, (1,)), ParallelConfig(param_dtype=dtype, reduce_dtype=dtype))


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, read + write counted (the roofline's rate)."""
    n = (1 << 30) // 2 if device == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    ms = time_fn(lambda: b.copy_(a), warmup=3, iters=10)
    return 2 * a.numel() * a.element_size() / (ms / 1e3)


def step_bytes(cfg: ModelConfig, dtype: torch.dtype, rows: int, prompt: int, new: int) -> float:
    """Bytes one decode step moves at least, averaged over a generation: the weights once (lm-head included,
    embedding rows not), the KV slots its rows attend over, and the [rows, V] logits written once and read by the
    sampler twice (statistics pass, draw pass)."""
    b = dtype.itemsize
    weights = cfg.num_params(embeddings=False) * b + cfg.vocab_size * cfg.hidden_size * b
    kv = rows * (prompt + new / 2) * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * b
    return weights + kv + 3 * rows * cfg.vocab_size * b


def time_ours(model, prompts, new_tokens, **kw) -> tuple[float, list]:
    kw = dict(dict(max_new_tokens=new_tokens, temperature=1.0, seed=0, stop_token_ids=()), **kw)
    sync()
    t0 = time.perf_counter()
    out = generate(model, prompts, **kw)
    sync()
    return time.perf_counter() - t0, out


@torch.no_grad()
def time_hf(hf, prompts, new_tokens, device) -> float:
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0,
              top_p=1.0, pad_token_id=0, eos_token_id=None)
    sync()
    t0 = time.perf_counter()
    out = hf.generate(ids, **kw)
    sync()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    args, gpu, report = start("sampler", __doc__, argv)
    t_start = time.perf_counter()
    device = "cuda" if gpu else "cpu"
    if gpu:
        cfg = ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                          num_kv_heads=2, tie_word_embeddings=True, qkv_bias=True, rope_theta=1000000.0,
                          max_position_embeddings=32768, architecture="Qwen2ForCausalLM")
        dtype, prompt_len, new_tokens, batches, tail = torch.bfloat16, 64, 256, (64, 256), (64, 4, 64)
    else:  # the tiny model (configs/tiny.toml shape), ratios only
        # One thread for both sides: matmuls this small gain nothing from a second thread, and on a shared 2-core
        # machine OpenMP barriers waiting for a busy core dominated every op (run-to-run swings of 10x).
        torch.set_num_threads(1)
        report.meta.update(environment(False))
        cfg = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                          num_kv_heads=2, tie_word_embeddings=True, qkv_bias=True, max_position_embeddings=512,
                          architecture="Qwen2ForCausalLM")
        dtype, prompt_len, new_tokens = torch.float32, 16, 32 if args.smoke else 64
        batches, tail = ((8,), (8, 4, 8)) if args.smoke else ((8, 32), (16, 4, 16))
    report.meta.update(dtype=str(dtype), layers=cfg.num_layers, vocab=cfg.vocab_size, prompt=prompt_len,
                       new_tokens=new_tokens)

    # Kernels per decode step, both paths (the fused one only where Triton runs: CUDA, or the interpreter).
    kernels = {"plain": decode_step_kernels(cfg, dtype, device, fused=False)[:2]}
    if use_triton(torch.empty(0, device=device)):
        kernels["fused"] = decode_step_kernels(cfg, dtype, device, fused=True)[:2]
    for path, (per_layer, outside) in kernels.items():
        report.meta[f"kernels_{path}"] = {"per_layer": per_layer, "outside_layers": outside,
                                          "per_step": per_layer * cfg.num_layers + outside}
    fused_default = gpu  # what generate does on this device
    step_path = "fused" if fused_default else "plain"

    bw = copy_bandwidth(device)
    report.meta["copy_bytes_per_s"] = bw
    hf, ours = build(cfg, dtype, device)
    g = torch.Generator().manual_seed(0)
    check = torch.randint(0, cfg.vocab_size, (8, prompt_len), generator=g)
    with torch.no_grad():  # same weights: greedy continuations should agree (bf16 near-ties may split a row)
        ref = hf.generate(check.to(device), max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)
    mine = generate(ours, check.tolist(), max_new_tokens=32, temperature=0.0, stop_token_ids=())
    report.meta["greedy_rows_equal_hf"] = sum(c.tokens == r for c, r in zip(mine, ref[:, prompt_len:].tolist()))

    def row(case: str, batch: int, seconds: float, tokens: int, steps: float | None, path: str, **extra) -> None:
        r = {"case": case, "batch": batch, "tokens_per_s": tokens / seconds}
        if path in kernels:
            per_layer, outside = kernels[path]
            r["kernels_per_step"] = per_layer * cfg.num_layers + outside
        nbytes = step_bytes(cfg, dtype, batch, prompt_len, new_tokens)
        r["mb_per_step"] = nbytes / 1e6
        r["roofline_tokens_per_s"] = batch / (nbytes / bw)
        r["of_roofline"] = r["tokens_per_s"] / r["roofline_tokens_per_s"]
        if steps is not None:
            r["decode_steps"] = steps
        report.add({**r, **extra})

    def over_budget(what: str) -> bool:
        if time.perf_counter() - t_start < BUDGET_S:
            return False
        print(f"  (skipped past the {BUDGET_S:.0f} s budget: {what})")
        report.meta.setdefault("skipped", []).append(what)
        return True

    hf_rates: dict[int, float] = {}
    for batch in batches:
        prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
        tok = batch * new_tokens
        if over_budget(f"batch {batch}"):
            break
        time_ours(ours, prompts, new_tokens)  # warm-up: cache, graph captures
        before = sampler_stats(ours)["decode_steps"]
        t, _ = time_ours(ours, prompts, new_tokens)
        row("ours", batch, t, tok, sampler_stats(ours)["decode_steps"] - before, step_path)
        if gpu and batch == batches[0] and not over_budget("plain decode path"):
            time_ours(ours, prompts, new_tokens, fused_kernels=False)
            t_plain, _ = time_ours(ours, prompts, new_tokens, fused_kernels=False)
            row("ours, plain decode path", batch, t_plain, tok, None, "plain", fused_speedup=t_plain / t)
        if batch == batches[0] and not over_budget("FSDP2"):
            wrapped = fsdp_wrap(ours, device)
            time_ours(wrapped, prompts, new_tokens)
            t_fsdp, _ = time_ours(wrapped, prompts, new_tokens)
            row("ours, FSDP2 model", batch, t_fsdp, tok, None, step_path, vs_plain_model=t / t_fsdp,
                replica_mb=sampler_stats(wrapped)["replica_bytes"] / 1e6)
            del wrapped
        if not over_budget(f"HF batch {batch}"):
            time_hf(hf, prompts[:2], 4, device)  # warm-up
            t_hf = time_hf(hf, prompts, new_tokens, device)
            hf_rates[batch] = tok / t_hf
            row("HF generate", batch, t_hf, tok, None, "", ours_speedup=t_hf / t)

    # Long tail: stop ids V/64 token ids, so on the near-uniform random model each step ends ~1/64 of the rows.
    P, n, rows = tail
    prompts = torch.randint(0, cfg.vocab_size, (P, prompt_len), generator=g).tolist()
    stops = list(range(0, cfg.vocab_size, 64))
    L = -(-(prompt_len + new_tokens) // 64) * 64
    results = {}
    for refill in (False, True):
        if over_budget(f"long tail refill={refill}"):
            break
        kw = dict(n=n, stop_token_ids=stops, max_batch_tokens=rows * L, refill=refill)
        time_ours(ours, prompts, new_tokens, **kw)
        before = sampler_stats(ours)["decode_steps"]
        t, out = time_ours(ours, prompts, new_tokens, **kw)
        results[refill] = (t, [c.tokens for c in out])
        row(f"long tail, refill={refill}", rows, t, sum(len(c.tokens) for c in out),
            sampler_stats(ours)["decode_steps"] - before, step_path,
            mean_len=sum(len(c.tokens) for c in out) / len(out), max_len=max(len(c.tokens) for c in out))
    if len(results) == 2:
        report.meta["refill_speedup"] = results[False][0] / results[True][0]
        report.meta["refill_same_completions"] = results[False][1] == results[True][1]

    print(f"\nsampler: {report.meta['device']}, torch {report.meta['torch']}, {dtype}, {cfg.num_layers} layers, "
          f"vocab {cfg.vocab_size}, prompt {prompt_len} + {new_tokens} new; copy bandwidth {bw / 1e9:.0f} GB/s")
    for path, (per_layer, outside) in kernels.items():
        print(f"kernels per decode step, {path} path: {per_layer} per layer + {outside} outside = "
              f"{per_layer * cfg.num_layers + outside}")
    head = f"{'case':<28} {'batch':>5} {'tokens/s':>10} {'MB/step':>8} {'roofline':>10} {'of roof':>7} {'steps':>6}"
    print(head)
    for r in report.rows:
        print(f"{r['case']:<28} {r['batch']:>5} {r['tokens_per_s']:>10.0f} {r['mb_per_step']:>8.1f} "
              f"{r['roofline_tokens_per_s']:>10.0f} {r['of_roofline']:>6.1%} {r.get('decode_steps', '-'):>6}")
    for b, rate in hf_rates.items():
        ours_rate = next(r["tokens_per_s"] for r in report.rows if r["case"] == "ours" and r["batch"] == b)
        print(f"batch {b}: ours / HF generate = {ours_rate / rate:.2f}x")
    if "refill_speedup" in report.meta:
        print(f"long tail: refill {report.meta['refill_speedup']:.2f}x faster, same completions: "
              f"{report.meta['refill_same_completions']}")
    print(f"greedy agreement with HF generate: {report.meta['greedy_rows_equal_hf']}/8 rows identical over 32 tokens")
    if not gpu:
        print("(CPU: compare ratios only; absolute tokens/s and the roofline mean little here)")


if __name__ == "__main__":
    try:
        main()
    finally:
        close_distributed()  # the one-rank group main() made; close_distributed says why not destroy alone
