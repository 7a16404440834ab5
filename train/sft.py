"""Supervised fine-tuning on a multi-task mixture, one process or many (torchrun), CPU or GPU.

    python -m posttrain.train.sft --config configs/tiny_sft.toml [--section.key=value ...]
    torchrun --nproc_per_node=2 -m posttrain.train.sft --config configs/tiny_sft.toml

Reads top to bottom: the runtime (train/runtime.py: process group, tokenizer, data, sharded model, optimizer,
checkpoints) -> a mixture loader over the training splits -> the loop (a global batch of micro-batches -> loss
through the fused log-prob kernel -> clip -> AdamW), with held-out evaluation every `eval.every_epochs` (per
sub-dataset loss, and accuracy by each sub-dataset's checker) -> final checkpoint and HF export. `run(cfg)` returns
the summary and leaves the process group up, so several runs can share a process; `main()` is the entry point.

Loss: the sum of response-token log-probs over the whole global batch (all micro-batches, all ranks) divided by
its token count, so gradient accumulation and world size never change the gradient. FSDP2 averages gradients over
ranks, so each rank's loss is scaled by world_size before backward.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from posttrain.core.config import load_config
from posttrain.core.distributed import clip_grad_norm_
from posttrain.train.data import MixtureLoader, PackedBatch
from posttrain.train.runtime import RunConfig, Runtime, entry_point, log, to_device, token_logprobs
from posttrain.train.synthetic import task_set


@dataclass
class SFTConfig(RunConfig):
    out_dir: str = "runs/sft"


def make_loader(rt: Runtime) -> MixtureLoader:
    """The training mixture: the configured weights, else the built-in tasks' own, else proportional to size."""
    c = rt.cfg.data
    weights = c.weights or None
    if weights is None and not c.path:
        weights = task_set(c.synthetic).weights
    return rt.data.loader(max_tokens=c.max_tokens, seed=c.seed, weights=weights, rank=rt.d.rank,
                          world_size=rt.d.world_size, prefetch=c.prefetch)


def train_step(rt: Runtime, batches: list[PackedBatch], lr: float) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches of a global batch. Returns global metrics.

    The host never waits for the device inside the step: batches go up from pinned memory asynchronously, the token
    counts are all-reduced and used (the loss scale) on the device, a non-finite step is skipped on the device
    (Runtime.optimizer_step), and the metrics are read once, at the end, in one transfer."""
    model, d = rt.model, rt.d
    counts = torch.stack([torch.tensor(float(sum(b.num_loss_tokens for b in batches)), dtype=torch.float64),
                          sum((b.task_ids >= 0).sum() for b in batches).double()])  # this rank's, on the host
    counts = to_device(counts, d.device)
    dist.all_reduce(counts)
    n_tokens = counts[0].clamp(min=1.0)
    scale = (d.world_size / n_tokens).float()  # FSDP2 averages over ranks; we want the global token mean
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    for i, batch in enumerate(batches):
        model.set_requires_gradient_sync(i == len(batches) - 1)  # reduce-scatter once per step
        logp = token_logprobs(model, to_device(batch, d.device))
        loss = -logp.sum()
        (loss * scale).backward()
        loss_sum += loss.detach().double()
    grad_norm = clip_grad_norm_(model.parameters(), rt.cfg.optim.max_grad_norm)
    dist.all_reduce(loss_sum)
    loss = loss_sum / n_tokens
    step = rt.optimizer_step(lr, torch.isfinite(loss) & torch.isfinite(grad_norm))
    loss, grad_norm, n_tokens, n_input = torch.stack([loss, grad_norm.double(), counts[0], counts[1]]).tolist()
    applied = rt.book_step(step, loss, grad_norm, tokens=n_input, loss_tokens=n_tokens)
    return {"loss": loss, "grad_norm": grad_norm, "loss_tokens": n_tokens, "input_tokens": n_input,
            "skipped": float(not applied)}


def loader_step(rt: Runtime, loader: MixtureLoader) -> Callable[[Callable[[], float]], dict[str, float]]:
    """The step `Runtime.loop` drives: `optim.grad_accum` micro-batches from `loader`, then `train_step` at the
    scheduled learning rate (read after the batches are drawn)."""
    def step(lr: Callable[[], float]) -> dict[str, float]:
        batches = [loader.next_batch() for _ in range(rt.cfg.optim.grad_accum)]
        return train_step(rt, batches, lr())

    return step


def run(cfg: SFTConfig) -> dict[str, Any]:
    rt = Runtime(cfg)
    loader = make_loader(rt)
    resumed = rt.resume(loader)
    d = rt.d
    log(d, f"world size {d.world_size} on {d.device}; {rt.model.config.num_params() / 1e6:.2f}M parameters; "
           f"tasks {rt.data.tasks}\n{rt.data.report()}")

    try:
        finished = rt.loop(loader_step(rt, loader), progress=lambda: loader.progress,
                           frac=lambda: rt.frac_of(loader.progress),
                           evaluate=lambda: rt.record_eval(loader.progress, rt.evaluate()),
                           at_start=cfg.eval.at_start and resumed is None, save=lambda: rt.save(loader))
        return rt.finish(loader, finished=finished)
    finally:
        loader.close()


def train_once(config: str | Path, overrides: Sequence[str], out_dir: str | Path, *, who: str) -> Path:
    """<out_dir>/hf: the HF export of the SFT config `config` (with its `overrides` flags) trained into `out_dir`,
    or kept as it is when <out_dir>/hf/config.json exists (delete it to retrain). The stages that start from an SFT
    checkpoint of their own (GRPO's bootstrap, PerMix's SFT stage, mSFT's pretrained base) train it through this."""
    hf = Path(out_dir) / "hf"
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if (hf / "config.json").is_file():
        if main_rank:
            print(f"{who}: reusing the SFT checkpoint {hf} (delete it to retrain)", flush=True)
        return hf

    if main_rank:
        print(f"{who}: training {config} into {out_dir}", flush=True)
    run(load_config(SFTConfig, config, [*overrides, f"--out_dir={out_dir}", "--checkpoint.export_hf=true"]))
    return hf


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return entry_point(run, SFTConfig, argv)


if __name__ == "__main__":
    main()
