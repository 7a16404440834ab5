"""Benchmark: one full GRPO step (rollout, reward, update) of train/grpo.py's pieces, and its update phase vs a plain
PyTorch update with materialized logits in the same run.

    python -m posttrain.bench.bench_grpo_step [--smoke] [--json PATH]

GPU: the Qwen2-0.5B shape (random weights, bf16 FSDP2 on one rank, as the trainer runs), 32 prompts of 64-128 tokens,
G = 8, 256 new tokens (no stop token, so every completion is 256 tokens: the worst case of a step). CPU (--smoke, or
no GPU): the tiny shape, ratios only. Phases, each timed once after a warm-up step:
  rollout   core.sampler.generate of the 256 completions from the current policy (KV cache, CUDA graphs on GPU)
  reward    a stand-in scored from the tokens (a hash), then train/rl.group_advantages: the checkers' own cost is
            bench/bench_verify.py's subject
  update    ours: train/grpo.accumulate_gradients (fused linear_grpo_loss through model(head_loss=), no logits) + clip +
            AdamW; plain: the same micro-batches through model(ids) -> [B, S, V] logits -> log_softmax -> gather ->
            kernels/grpo.grpo_loss_reference -> backward, + clip + AdamW. Both from the same weights and samples; their
            gradient norms must agree.
Reported: seconds per phase, rollout tokens/s, update tokens/s and peak memory (GPU), and update plain / ours.
"""

from __future__ import annotations

import time

import torch

from posttrain.bench.common import peak_gb, print_table, start, sync
from posttrain.core.distributed import (ParallelConfig, build_model, build_optimizer, clip_grad_norm_,
                                        close_distributed, init_distributed)
from posttrain.core.model import ModelConfig
from posttrain.core.sampler import generate
from posttrain.kernels.grpo import grpo_loss_reference
from posttrain.train.grpo import GRPOSection, Prompt, Sample, accumulate_gradients, make_micro_batch, micro_batches
from posttrain.train.rl import group_advantages

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                 num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=4096)
TINY = dict(vocab_size=512, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6, num_kv_heads=2,
            tie_word_embeddings=True, max_position_embeddings=512)


def plain_update(model, samples, g: GRPOSection, device, num_tokens: float) -> float:
    """The same loss as accumulate_gradients (loss_type dapo) through materialized logits and the reference loss."""
    total = 0.0
    for mb in micro_batches(samples, g.micro_batch_seqs):
        b = make_micro_batch(mb, 0, device, mask_truncated=False)
        logits = model(b.input_ids)  # [B, S, V]
        rows = torch.arange(len(mb), device=device)[:, None]
        logp = torch.log_softmax(logits[rows, b.index].float(), -1)
        logp = logp.gather(-1, b.targets.clamp(min=0)[..., None])[..., 0]
        loss, _ = grpo_loss_reference(logp, b.old_logp, b.advantages, b.mask * (b.targets != -100),
                                      eps_low=g.eps_low, eps_high=g.eps_high, loss_type="dapo", num_tokens=num_tokens)
        loss.backward()
        total += float(loss.detach())
    return total


def main(argv: list[str] | None = None) -> None:
    args, cuda, report = start("grpo_step", __doc__, argv)
    device = "cuda" if cuda else "cpu"
    shape, (P, G, T, lo, hi, mbs) = (QWEN2_05B, (32, 8, 256, 64, 128, 16)) if cuda else (TINY, (4, 4, 16, 8, 16, 8))
    d = init_distributed(0, device=device)
    dtype = "bfloat16" if cuda else "float32"
    model = build_model(ModelConfig(**shape), d, ParallelConfig(param_dtype=dtype, reduce_dtype="float32"))
    opt = build_optimizer(model, lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0)
    g = GRPOSection(group_size=G, max_new_tokens=T, micro_batch_seqs=mbs, loss_type="dapo")
    gen = torch.Generator().manual_seed(0)
    V = shape["vocab_size"]

    def prompt_ids() -> list[int]:  # a length, then that many tokens: one prompt at a time from one generator
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        return torch.randint(0, V, (n,), generator=gen).tolist()

    prompts = [Prompt("bench", [], "", "exact", f"p{i}", prompt_ids()) for i in range(P)]

    def step(seed: int, plain: bool) -> dict:
        out = {}
        sync()
        t0 = time.perf_counter()
        model.eval()
        comps = generate(model, [p.ids for p in prompts], n=G, max_new_tokens=T, seed=seed, stop_token_ids=())
        sync()
        out["rollout_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        samples = [Sample(c.prompt_index, prompts[c.prompt_index], c.tokens, c.raw_logprobs,
                          c.finish_reason == "length", "") for c in comps]
        rewards = torch.tensor([float(hash(tuple(s.tokens[:4])) % 2) for s in samples]).view(P, G)
        for s, a in zip(samples, group_advantages(rewards, mode="grpo").view(-1).tolist()):
            s.advantage = a
        out["reward_s"] = time.perf_counter() - t0
        n_tokens = float(sum(len(s.tokens) for s in samples))
        n_input = sum(len(s.prompt.ids) + len(s.tokens) - 1 for s in samples)
        model.train()

        def ours() -> None:
            out["loss"] = accumulate_gradients(model, samples, g, 0, d.device, world_size=1, num_sequences=len(samples),
                                               num_tokens=n_tokens)[0]

        def reference() -> None:
            out["loss_plain"] = plain_update(model, samples, g, d.device, n_tokens)

        for name, fn in ((("plain", reference),) if plain else ()) + (("ours", ours),):
            sync()
            t0 = time.perf_counter()
            mem = peak_gb(fn) if cuda else fn()
            out[f"grad_norm_{name}"] = float(clip_grad_norm_(model.parameters(), 1.0))
            if name == "plain":
                opt.zero_grad(set_to_none=True)  # the plain update measures, ours is the step taken
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()
            out[f"update_{name}_s"] = time.perf_counter() - t0
            if mem is not None:
                out[f"update_{name}_peak_gb"] = mem
        out["rollout_tokens_per_s"] = n_tokens / out["rollout_s"]
        out["update_tokens_per_s"] = n_input / out["update_ours_s"]
        return out

    step(seed=1, plain=False)  # warm-up: caches, CUDA graphs, kernels
    # The plain update runs first and only measures (its gradients are dropped); ours then steps from the same weights.
    res = step(seed=2, plain=True)
    row = {"shape": "qwen2-0.5b" if cuda else "tiny", "P": P, "G": G, "new_tokens": T, **res,
           "step_s": res["rollout_s"] + res["reward_s"] + res["update_ours_s"],
           "update_plain_over_ours": res["update_plain_s"] / res["update_ours_s"]}
    # On-policy the loss is ~ -mean(A) ~ 0, so the gradient norms are what must agree.
    rel = abs(res["grad_norm_ours"] - res["grad_norm_plain"]) / max(res["grad_norm_plain"], 1e-12)
    row["grad_norm_rel_diff"] = rel
    report.add(row)
    print_table(report.rows, ["shape", "rollout_s", "reward_s", "update_ours_s", "update_plain_s",
                              "update_plain_over_ours", "rollout_tokens_per_s", "update_tokens_per_s",
                              "update_ours_peak_gb", "update_plain_peak_gb", "grad_norm_rel_diff"])
    if rel > (2e-2 if cuda else 1e-4):
        raise SystemExit(f"bench_grpo_step: fused and plain gradient norms differ ({res['grad_norm_ours']} vs "
                         f"{res['grad_norm_plain']})")


if __name__ == "__main__":
    try:
        main()
    finally:
        close_distributed()  # the one-rank group main() made; close_distributed says why not destroy alone
