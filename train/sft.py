"""Supervised fine-tuning on a multi-task mixture, one process or many (torchrun), CPU or GPU.

    python -m train.sft --config configs/tiny_sft.toml [--section.key=value ...]
    torchrun --nproc_per_node=2 -m train.sft --config configs/tiny_sft.toml

Reads top to bottom: config -> setup (process group, tokenizer, data, sharded model, optimizer, checkpoints) ->
loop (a global batch of micro-batches -> loss through the fused log-prob kernel -> clip -> AdamW) with held-out
evaluation every `eval.every_epochs` (per sub-dataset loss and greedy exact-match accuracy) -> final HF export.
The pieces mSFT (train/msft.py) reuses are plain functions: `setup`, `train_step`, `evaluate`.

Loss: the sum of response-token log-probs over the whole global batch (all micro-batches, all ranks) divided by
its token count, so gradient accumulation and world size never change the gradient. FSDP2 averages gradients over
ranks, so each rank's loss is scaled by world_size before backward.

A step whose loss or gradient norm is not finite is skipped (no optimizer update), counted and logged;
`train.max_bad_steps` consecutive ones stop the run with an error.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.config import flatten, parse_args
from core.distributed import (
    Checkpointer,
    Dist,
    ParallelConfig,
    build_model,
    build_optimizer,
    clip_grad_norm_,
    export_hf,
    init_distributed,
)
from core.model import ModelConfig, Transformer
from core.tokenizer import Tokenizer
from train.data import PackedBatch, SFTData, load_split_dir, synthetic_rows

# Dense bf16 peak FLOP/s for MFU, by device name substring (spec sheets, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


@dataclass
class InitConfig:
    hf_checkpoint: str = ""  # an HF checkpoint directory to fine-tune; empty: train [model] from scratch
    tokenizer: str = ""  # a tokenizer directory; empty: the checkpoint's, or the embedded tiny tokenizer


@dataclass
class DataConfig:
    path: str = ""  # directory with train/*.jsonl (+ heldout/*.jsonl); empty: the built-in synthetic tasks
    heldout_fraction: float = 0.05  # carved from each training file when there is no heldout/ directory
    seq_len: int = 256  # packed row length
    max_tokens: int = 4096  # tokens per micro-batch per rank (rows = max_tokens // seq_len)
    truncation: str = "error"  # "error" | "truncate_left_prompt" | "drop", for rows longer than seq_len
    # sub-dataset -> mixture weight; default: by size (built-in tasks: train/synthetic.DEFAULT_MIXTURE_WEIGHTS)
    weights: dict[str, float] = field(default_factory=dict)
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    schedule: str = "cosine"  # "cosine" | "constant" (both after linear warmup)
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule: {self.schedule!r} is not 'cosine' or 'constant'")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")


@dataclass
class TrainConfig:
    epochs: float = 1.0  # passes over the active mixture (train/data.py defines an epoch)
    max_steps: int = 0  # > 0: stop (and schedule) by optimizer steps instead of epochs
    seed: int = 0
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    stop_at_step: int = 0  # > 0: checkpoint and exit after this step, schedule untouched (time-sliced jobs)
    log_every: int = 10


@dataclass
class EvalConfig:
    every_epochs: float = 0.25  # held-out evaluation period (0: only at the end)
    at_start: bool = True  # also evaluate before the first step (mSFT's peak may be at the start)
    generate: bool = True  # exact-match accuracy by greedy generation (besides held-out loss)
    max_examples: int = 64  # held-out rows per sub-dataset for generation (0: all)
    max_new_tokens: int = 32


@dataclass
class CheckpointConfig:
    dir: str = ""  # default: <out_dir>/checkpoints
    every_steps: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in dir, if any
    export_hf: bool = True  # write <out_dir>/hf at the end


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    out_dir: str = "runs/sft"
    device: str = ""  # "" picks cuda when available, else cpu


# ------------------------------------------------------------------------------------------------------ setup


@dataclass
class Run:
    """Everything a training loop holds; built by `setup`."""

    cfg: SFTConfig
    d: Dist
    tokenizer: Tokenizer
    data: SFTData
    model: Transformer
    optimizer: torch.optim.Optimizer
    loader: Any  # train.data.MixtureLoader
    checkpointer: Checkpointer
    metrics: MetricsLog
    step: int = 0
    bad_steps: int = 0  # consecutive
    skipped_steps: int = 0  # total


def load_tokenizer(cfg: SFTConfig) -> Tokenizer:
    path = cfg.init.tokenizer or cfg.init.hf_checkpoint
    if path:
        return Tokenizer.from_dir(path)
    from train.synthetic import tiny_tokenizer

    return tiny_tokenizer()


def load_data(cfg: SFTConfig, tokenizer: Tokenizer) -> SFTData:
    if cfg.data.path:
        train, heldout = load_split_dir(cfg.data.path, cfg.data.heldout_fraction, cfg.data.seed)
    else:
        train, heldout = synthetic_rows(cfg.data.seed)
    return SFTData(train, heldout, tokenizer, seq_len=cfg.data.seq_len, truncation=cfg.data.truncation)


def setup(cfg: SFTConfig) -> Run:
    d = init_distributed(cfg.train.seed, device=cfg.device or None)
    tokenizer = load_tokenizer(cfg)
    if not cfg.init.hf_checkpoint and cfg.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens ({tokenizer.source}); raise model.vocab_size")
    data = load_data(cfg, tokenizer)
    model = build_model(cfg.model, d, cfg.parallel, init_from=cfg.init.hf_checkpoint or None, seed=cfg.train.seed)
    cfg.model = model.config  # a checkpoint's config wins; record what was built
    # Checked here, on every rank alike: a prompt the sampler refused on one rank only would hang the others.
    longest = cfg.data.seq_len + (cfg.eval.max_new_tokens if cfg.eval.generate else 0)
    if longest > model.config.max_position_embeddings:
        raise ValueError(f"data.seq_len ({cfg.data.seq_len}) + eval.max_new_tokens ({cfg.eval.max_new_tokens}) exceeds "
                         f"the model's max_position_embeddings ({model.config.max_position_embeddings}); lower them")
    o = cfg.optim
    optimizer = build_optimizer(model, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    weights = cfg.data.weights or None
    if weights is None and not cfg.data.path:
        from train.synthetic import DEFAULT_MIXTURE_WEIGHTS as weights
    loader = data.loader(max_tokens=cfg.data.max_tokens, seed=cfg.data.seed, weights=weights, rank=d.rank,
                         world_size=d.world_size)
    out = Path(cfg.out_dir)
    checkpointer = Checkpointer(cfg.checkpoint.dir or out / "checkpoints", d, keep_last=cfg.checkpoint.keep_last)
    resume_step = checkpointer.latest() if cfg.checkpoint.resume else None
    # A resumed run appends to its metrics; a fresh one starts them anew.
    metrics = MetricsLog(out, d.is_main, append=resume_step is not None)
    run = Run(cfg, d, tokenizer, data, model, optimizer, loader, checkpointer, metrics)
    if resume_step is not None:
        state = checkpointer.load(resume_step, model, optimizer)
        loader.load_state_dict(state["data"])
        run.step, run.skipped_steps = state["step"], state.get("skipped_steps", 0)
        log(d, f"resumed from {checkpointer.root}/step_{resume_step:08d} (epoch {loader.progress:.3f})")
    return run


def save_checkpoint(run: Run) -> None:
    state = {"data": run.loader.state_dict(), "skipped_steps": run.skipped_steps, "config": flatten(run.cfg)}
    run.checkpointer.save(run.step, run.model, run.optimizer, state)


# ---------------------------------------------------------------------------------------------------- training


def lr_at(o: OptimConfig, step: int, frac: float) -> float:
    """Linear warmup over `warmup_steps`, then constant or cosine to lr * min_lr_ratio as `frac` goes 0 -> 1."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    frac = min(max(frac, 0.0), 1.0)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def token_logprobs(model: Transformer, batch: PackedBatch) -> torch.Tensor:
    """log p(target) per position [B, S] through the fused kernel (0 where targets == -100)."""
    return model(batch.input_ids, batch.position_ids, targets=batch.targets)


def global_sum(d: Dist, *values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def train_step(run: Run, batches: list[PackedBatch], lr: float) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches of a global batch. Returns global metrics."""
    model, d = run.model, run.d
    n_tokens, n_input = global_sum(d, sum(b.num_loss_tokens for b in batches),
                                   sum(int((b.task_ids >= 0).sum()) for b in batches))
    scale = d.world_size / max(n_tokens, 1.0)  # FSDP2 averages over ranks; we want the global token mean
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    for i, batch in enumerate(batches):
        model.set_requires_gradient_sync(i == len(batches) - 1)  # reduce-scatter once per step
        logp = token_logprobs(model, batch.to(d.device))
        loss = -logp.sum()
        (loss * scale).backward()
        loss_sum += loss.detach().double()
    grad_norm = clip_grad_norm_(model.parameters(), run.cfg.optim.max_grad_norm).item()
    (total_loss,) = global_sum(d, loss_sum.item())
    loss = total_loss / max(n_tokens, 1.0)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.optimizer.step()
        run.bad_steps = 0
    else:
        run.bad_steps += 1
        run.skipped_steps += 1
        log(d, f"step {run.step}: non-finite loss {loss} or grad norm {grad_norm}; step skipped "
               f"({run.bad_steps} in a row, {run.skipped_steps} in total)")
        if run.bad_steps >= run.cfg.train.max_bad_steps:
            raise FloatingPointError(
                f"{run.bad_steps} consecutive steps with non-finite loss or gradients (last: loss {loss}, grad norm "
                f"{grad_norm}) at step {run.step}; lower optim.lr, check the data, or use parallel.param_dtype="
                f"'float32'")
    run.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": grad_norm, "loss_tokens": n_tokens, "input_tokens": n_input,
            "skipped": float(not finite)}


# -------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_loss(run: Run, task: str) -> float:
    """Mean response-token NLL on `task`'s held-out split (collective: every rank runs the same batches)."""
    total = count = 0.0
    for batch in run.data.heldout_batches(task, max_tokens=run.cfg.data.max_tokens, rank=run.d.rank,
                                          world_size=run.d.world_size):
        logp = token_logprobs(run.model, batch.to(run.d.device))
        total += -logp.sum().item()
        count += batch.num_loss_tokens
    total, count = global_sum(run.d, total, count)
    return total / max(count, 1.0)


@torch.no_grad()
def exact_match(run: Run, task: str) -> float:
    """Greedy-generation exact-match accuracy on `task`'s held-out rows (each rank generates its share)."""
    from core.sampler import full_weights, generate
    from train.synthetic import check

    examples = run.data.heldout_examples(task, rank=run.d.rank, world_size=run.d.world_size)
    limit = run.cfg.eval.max_examples
    if limit:
        examples = examples[: -(-limit // run.d.world_size)]
    prompts = [run.tokenizer.apply_chat_template(e.prompt, add_generation_prompt=True, tokenize=True)
               for e in examples]
    correct = 0
    with full_weights(run.model):
        if prompts:
            outs = generate(run.model, prompts, max_new_tokens=run.cfg.eval.max_new_tokens, temperature=0.0,
                            stop_token_ids=run.tokenizer.stop_ids, tokenizer=run.tokenizer)
            for out in outs:
                text = run.tokenizer.decode(out.tokens, skip_special_tokens=True)
                correct += check(text, examples[out.prompt_index].answer)
    correct, n = global_sum(run.d, correct, len(prompts))
    return correct / max(n, 1.0)


def evaluate(run: Run, tasks: list[str] | None = None) -> dict[str, dict[str, float]]:
    """{task: {"loss": held-out NLL, "accuracy": exact match}} for every (or the given) sub-dataset."""
    run.model.eval()
    out = {}
    for task in tasks or run.data.tasks:
        out[task] = {"loss": heldout_loss(run, task)}
        if run.cfg.eval.generate:
            out[task]["accuracy"] = exact_match(run, task)
    if run.cfg.eval.generate:
        from core.sampler import free_cache

        free_cache(run.model)  # evals are occasional: give the KV cache's memory back to training
    run.model.train()
    return out


# ------------------------------------------------------------------------------------------------------ logging


class MetricsLog:
    """JSONL metrics (and TensorBoard when installed), written by rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool, *, append: bool) -> None:
        self.enabled = enabled
        self.file = self.tb = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(out_dir / "metrics.jsonl", "a" if append else "w")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                pass

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in flatten_metrics(record).items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def flatten_metrics(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(flatten_metrics(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[prefix + k] = v
    return out


def log(d: Dist, message: str) -> None:
    if d.is_main:
        print(message, flush=True)


def format_eval(results: dict[str, dict[str, float]]) -> str:
    return "  ".join(f"{t}: loss {r['loss']:.3f}" + (f" acc {r['accuracy']:.2f}" if "accuracy" in r else "")
                     for t, r in results.items())


def next_multiple(epoch: float, every: float) -> float:
    """The first multiple of `every` epochs after `epoch` (never, when every <= 0)."""
    return (math.floor(epoch / every) + 1) * every if every > 0 else math.inf


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# --------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(SFTConfig, argv)
    run = setup(cfg)
    d, t = run.d, cfg.train
    log(d, f"world size {d.world_size} on {d.device}; {run.model.config.num_params() / 1e6:.2f}M parameters; "
           f"tasks {run.data.tasks}\n{run.data.report()}")

    def frac() -> float:  # how far through training, 0 -> 1: drives the schedule and the stopping rule
        return run.step / t.max_steps if t.max_steps > 0 else run.loader.progress / t.epochs

    every = cfg.eval.every_epochs
    history: list[dict[str, Any]] = []

    def eval_now() -> float:
        """Evaluate, record, and return the epoch at which the next evaluation is due."""
        epoch = run.loader.progress
        results = evaluate(run)
        history.append({"step": run.step, "epoch": epoch, "eval": results})
        run.metrics.write(run.step, {"epoch": epoch, "eval": results})
        log(d, f"eval @ step {run.step} (epoch {epoch:.2f})  {format_eval(results)}")
        return next_multiple(epoch, every)

    next_eval = next_multiple(run.loader.progress, every)
    if cfg.eval.at_start and run.step == 0:
        next_eval = eval_now()

    flops_tok = run.model.config.flops_per_token(cfg.data.seq_len)
    peak = peak_flops(d.device)
    pbar = None
    if d.is_main and sys.stderr.isatty():
        from tqdm import tqdm

        pbar = tqdm(total=t.max_steps or None, initial=run.step, unit="step", dynamic_ncols=True)
    window_tokens, window_t0 = 0.0, time.perf_counter()
    while frac() < 1.0:
        batches = [run.loader.next_batch() for _ in range(cfg.optim.grad_accum)]
        m = train_step(run, batches, lr_at(cfg.optim, run.step, frac()))
        run.step += 1
        window_tokens += m["input_tokens"]
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{m['loss']:.3f}", epoch=f"{run.loader.progress:.2f}")
        if run.step % t.log_every == 0:
            dt = time.perf_counter() - window_t0
            tps = window_tokens / dt
            record = {"epoch": run.loader.progress, "lr": run.optimizer.param_groups[0]["lr"], **m,
                      "tokens_per_s": tps, "skipped_total": run.skipped_steps}
            if peak:
                record["mfu"] = tps * flops_tok / (peak * d.world_size)
            run.metrics.write(run.step, record)
            if pbar is None:
                log(d, f"step {run.step:5d}  epoch {run.loader.progress:.3f}  loss {m['loss']:.4f}  "
                       f"gnorm {m['grad_norm']:.3f}  lr {record['lr']:.2e}  {tps:,.0f} tok/s"
                       + (f"  MFU {record['mfu']:.1%}" if peak else ""))
            window_tokens, window_t0 = 0.0, time.perf_counter()
        if run.loader.progress >= next_eval or frac() >= 1.0:
            next_eval = eval_now()
        if cfg.checkpoint.every_steps and run.step % cfg.checkpoint.every_steps == 0:
            save_checkpoint(run)
        if run.step == t.stop_at_step:
            break
    if pbar is not None:
        pbar.close()
    if run.checkpointer.latest() != run.step:
        save_checkpoint(run)
    out = Path(cfg.out_dir)
    finished = frac() >= 1.0
    if cfg.checkpoint.export_hf and finished:
        tok_dir = out / "tokenizer"
        if d.is_main:
            run.tokenizer.save(tok_dir)
        export_hf(run.model, out / "hf", d, tokenizer_dir=tok_dir)
        log(d, f"exported {out / 'hf'} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    log(d, f"{'done' if finished else 'stopped'}: {run.step} steps, {run.skipped_steps} skipped")
    run.metrics.close()
    summary = {"steps": run.step, "skipped_steps": run.skipped_steps, "history": history}
    if d.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
