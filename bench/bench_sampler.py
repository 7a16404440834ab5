"""Sampler throughput: core.sampler.generate vs Hugging Face transformers `generate`, same weights, same run.

GPU (default when CUDA is present): a Qwen2-0.5B-shaped random model (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied), bf16, 64-token prompts, 256 new tokens, stop disabled; batch 64 (ours and
HF) and batch 256 (ours and HF), with tokens/s as a fraction of the memory-bandwidth roofline (weights + the KV
each step needs, read once per decode step, at 3.0 TB/s, the device copy rate measured on the H100).
CPU (no CUDA, or --smoke): the tiny model, small shapes, ratios only.

    python -m bench.bench_sampler [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import Report, environment
from core.checkpoint import our_name
from core.model import ModelConfig, Transformer
from core.sampler import generate

HBM_BYTES_PER_S = 3.0e12  # measured device copy rate on the lent H100 (NOTES.md)


def build(cfg: ModelConfig, dtype: torch.dtype, device: str):
    """A random HF Qwen2 model and ours with the same weights."""
    import transformers

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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ours(model, prompts, new_tokens, device) -> float:
    kw = dict(max_new_tokens=new_tokens, temperature=1.0, seed=0, stop_token_ids=())
    sync(device)
    t0 = time.perf_counter()
    out = generate(model, prompts, **kw)
    sync(device)
    assert all(len(c.tokens) == new_tokens for c in out)
    return time.perf_counter() - t0


@torch.no_grad()
def time_hf(hf, prompts, new_tokens, device) -> float:
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0,
              top_p=1.0, pad_token_id=0, eos_token_id=None)
    sync(device)
    t0 = time.perf_counter()
    out = hf.generate(ids, **kw)
    sync(device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t0


def best_times(hf, ours, prompts, new_tokens, device, reps, with_hf) -> tuple[float, float]:
    """Interleaved runs, best of `reps` each, after one warm-up each (cache allocation, CUDA graph capture): on a
    shared machine the load drifts, and interleaving exposes both sides to the same drift."""
    t_ours, t_hf = [], []
    for _ in range(reps + 1):
        t_ours.append(time_ours(ours, prompts, new_tokens, device))
        if with_hf:
            t_hf.append(time_hf(hf, prompts, new_tokens, device))
    return min(t_ours[1:]), (min(t_hf[1:]) if with_hf else float("nan"))


def roofline_tokens_per_s(cfg: ModelConfig, dtype: torch.dtype, batch: int, prompt: int, new: int) -> float:
    """Tokens/s if each decode step only read, once, the weights (lm-head included, embedding rows not) and the
    KV slots its rows need (their average over the generation), at HBM_BYTES_PER_S."""
    b = dtype.itemsize
    weights = cfg.num_params(embeddings=False) * b + cfg.vocab_size * cfg.hidden_size * b
    avg_slots = prompt + new / 2
    kv = batch * avg_slots * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * b
    return batch / ((weights + kv) / HBM_BYTES_PER_S)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, tiny shapes (CI)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.smoke
    device = "cuda" if gpu else "cpu"
    if gpu:
        cfg = ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                          num_kv_heads=2, tie_word_embeddings=True, qkv_bias=True, rope_theta=1000000.0,
                          max_position_embeddings=32768, architecture="Qwen2ForCausalLM")
        dtype, prompt_len, new_tokens = torch.bfloat16, 64, 256
        cases = [(64, True), (256, True)]
        reps = 1
    else:  # the tiny model (configs/tiny.toml shape), ratios only
        # One thread for both sides: matmuls this small gain nothing from a second thread, and on a shared 2-core
        # machine OpenMP barriers waiting for a busy core dominated every op (run-to-run swings of 10x).
        torch.set_num_threads(1)
        cfg = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                          num_kv_heads=2, tie_word_embeddings=True, qkv_bias=True, max_position_embeddings=512,
                          architecture="Qwen2ForCausalLM")
        dtype, prompt_len, new_tokens = torch.float32, 16, 32 if args.smoke else 64
        cases = [(8, True)] if args.smoke else [(8, True), (32, True)]
        reps = 1 if args.smoke else 3
    meta = {"bench": "sampler", **environment(gpu), "dtype": str(dtype), "layers": cfg.num_layers,
            "vocab": cfg.vocab_size}
    report = Report(args.json, meta)  # JSON rewritten after every row: a timeout keeps what was measured
    hf, ours = build(cfg, dtype, device)
    g = torch.Generator().manual_seed(0)
    # Sanity before timing: same weights, so greedy continuations should agree (bf16 near-ties may split a row).
    check = torch.randint(0, cfg.vocab_size, (8, prompt_len), generator=g)
    with torch.no_grad():
        ref = hf.generate(check.to(device), max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)
    mine = generate(ours, check.tolist(), max_new_tokens=32, temperature=0.0, stop_token_ids=())
    agree = sum(c.tokens == r for c, r in zip(mine, ref[:, prompt_len:].tolist()))
    report.meta["greedy_rows_equal_hf"] = agree
    for batch, with_hf in cases:
        prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
        t_ours, t_hf = best_times(hf, ours, prompts, new_tokens, device, reps, with_hf)
        tok = batch * new_tokens
        row = {"batch": batch, "prompt": prompt_len, "new_tokens": new_tokens,
               "ours_tokens_per_s": tok / t_ours, "hf_tokens_per_s": tok / t_hf, "speedup_vs_hf": t_hf / t_ours}
        if gpu:
            row["roofline_tokens_per_s"] = roofline_tokens_per_s(cfg, dtype, batch, prompt_len, new_tokens)
            row["fraction_of_roofline"] = row["ours_tokens_per_s"] / row["roofline_tokens_per_s"]
        report.add(row)

    rows = report.rows
    print(f"sampler: {meta['device']}, torch {meta['torch']}, {dtype}, {cfg.num_layers} layers, vocab {cfg.vocab_size}")
    head = f"{'batch':>6} {'ours tokens/s':>14} {'HF tokens/s':>12} {'speedup':>8}"
    print(head + (f" {'roofline':>10} {'of roofline':>11}" if gpu else ""))
    for r in rows:
        line = f"{r['batch']:>6} {r['ours_tokens_per_s']:>14.0f} {r['hf_tokens_per_s']:>12.0f} {r['speedup_vs_hf']:>7.2f}x"
        if gpu:
            line += f" {r['roofline_tokens_per_s']:>10.0f} {r['fraction_of_roofline']:>10.1%}"
        print(line)
    print(f"greedy agreement with HF generate: {agree}/8 rows identical over 32 tokens")
    if not gpu:
        print("(CPU: compare the speedup ratio only; absolute tokens/s mean little here)")


if __name__ == "__main__":
    main()
