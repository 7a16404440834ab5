"""The training runtime every stage shares: config sections, setup, bookkeeping, the loop, evaluation, checkpoints.

A stage (train/sft.py, train/msft/, train/grpo.py) is its data plus its step function; everything else is here:

    rt = Runtime(cfg)                   process group (joined, never destroyed here), tokenizer, sharded model,
                                        optimizer, checkpointer, metrics log
    data = load_data(cfg, rt)           the sub-datasets, tokenized (once per node for JSONL mixtures)
    rt.resume(loader)                   the newest complete checkpoint, chosen by rank 0 for every rank
    rt.loop(step_fn, progress=...)      steps until the stage's end, evaluating every `eval.every_epochs`
    rt.finish(export=True)              last checkpoint, HF export, summary; the process group stays up

so two runs (or two stages, or mSFT's baselines) can share one process: only an entry point's `main()` tears the
process group down.

Bookkeeping that survives roll-backs (mSFT restores weights and the data position to an earlier point):
  - `counters.step` is the global step: every optimizer step ever attempted, monotone. Metrics and checkpoints are
    named by it, so a checkpoint written after a roll-back never collides with one written before it.
  - the compute counters (`optimizer_steps`, `tokens`, `flops`, ...) count every step taken, discarded ones too.
  - the data position lives in the loader and is what a roll-back restores.
  - `sched_step` counts steps since the optimizer was (re)created: `new_optimizer()` re-arms the warmup.
  - the evaluation history is saved with every checkpoint and restored on resume.

Not here: what a step computes (the stages), how data is packed (train/data.py), FSDP2 itself (core/distributed.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from posttrain.core.config import flatten, parse_args
from posttrain.core.distributed import (
    Checkpointer,
    Dist,
    ParallelConfig,
    build_model,
    build_optimizer,
    close_distributed,
    export_hf,
    forget_forwards,
    full_weights,
    init_distributed,
)
from posttrain.core.model import ModelConfig, Transformer
from posttrain.core.records import layout
from posttrain.core.sampler import free_cache, generate
from posttrain.core.tokenizer import Tokenizer
from posttrain.eval.checkers import CHECKERS, check_rows
from posttrain.train.data import DataError, PackedBatch, SFTData, check_checker_names, mixture_cache_key, synthetic_rows
from posttrain.train.metrics import LogConfig, MetricsLog
from posttrain.train.synthetic import tiny_tokenizer

# Dense bf16 peak FLOP/s for MFU, by device name substring (spec sheets, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


# ------------------------------------------------------------------------------------------------ config sections


@dataclass
class InitConfig:
    hf_checkpoint: str = ""  # an HF checkpoint directory to fine-tune; empty: train [model] from scratch
    tokenizer: str = ""  # a tokenizer directory; empty: the checkpoint's, or the embedded tiny tokenizer


@dataclass
class DataConfig:
    path: str = ""  # directory with train/<name>.jsonl|.parquet|save_to_disk folder (+ heldout/ alike); empty: built-in
    synthetic: str = "default"  # which built-in task set (train/synthetic.TASK_SETS) when path is empty
    heldout_fraction: float = 0.05  # carved from each training file when there is no heldout/ directory
    seq_len: int = 256  # packed row length
    max_tokens: int = 4096  # tokens per micro-batch per rank (rows = max_tokens // seq_len)
    truncation: str = "error"  # "error" | "truncate_left_prompt" | "drop", for rows longer than seq_len
    # sub-dataset -> mixture weight; default: by size (built-in tasks: their task set's weights)
    weights: dict[str, float] = field(default_factory=dict)
    # sub-dataset -> default checker ("exact", "math", "choice", "synthetic"); a row's own "checker" field wins
    checkers: dict[str, str] = field(default_factory=dict)
    # sub-dataset -> column layout: "gsm8k", "math", "messages" or {row key = column} (core/records.py)
    columns: dict[str, Any] = field(default_factory=dict)
    cache_dir: str = ""  # tokenized mixtures are cached here (default: runtime.default_cache_dir()); "off": none
    prefetch: bool = True  # pack the next micro-batch in a background thread while the current step runs
    seed: int = 0

    def __post_init__(self) -> None:
        for task, name in self.checkers.items():
            if name not in CHECKERS:
                raise ValueError(f"data.checkers.{task}: unknown checker {name!r}; use one of {', '.join(CHECKERS)}")
        for task, spec in self.columns.items():
            try:
                layout(spec)
            except DataError as e:
                raise ValueError(f"data.columns.{task}: {e}") from None


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
    stop_at_step: int = 0  # > 0: checkpoint and return after this global step, schedule untouched (time slices)
    log_every: int = 10


@dataclass
class EvalConfig:
    every_epochs: float = 0.25  # held-out evaluation period (0: only at the end)
    at_start: bool = True  # also evaluate before the first step (mSFT's peak may be at the start)
    generate: bool = True  # accuracy by greedy generation and each task's checker (besides held-out loss)
    loss: bool = True  # held-out NLL (a forward over every held-out row: ~40% of an evaluation's time on the
    #                    tiny default; a run that reads only accuracy can skip it)
    max_examples: int = 64  # held-out rows per sub-dataset for generation (0: all)
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if not self.loss and not self.generate:
            raise ValueError("eval.loss = false and eval.generate = false: every evaluation would be empty (no "
                             "held-out loss, no accuracy); set one of them to true")


@dataclass
class CheckpointConfig:
    dir: str = ""  # default: <out_dir>/checkpoints
    every_steps: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in dir, if any
    export_hf: bool = True  # write <out_dir>/hf at the end


@dataclass
class RunConfig:
    """The sections every stage has; a stage's config subclasses it and adds its own."""

    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)  # metrics.jsonl always; TensorBoard, W&B (train/metrics.py)
    out_dir: str = "runs/run"
    device: str = ""  # "" picks cuda when available, else cpu


# ------------------------------------------------------------------------------------------------ small helpers


def lr_at(o: OptimConfig, step: int, frac: float) -> float:
    """Linear warmup over `warmup_steps`, then constant or cosine to lr * min_lr_ratio as `frac` goes 0 -> 1.
    `step` counts from the optimizer's creation (Runtime.sched_step), so a fresh optimizer warms up again."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    frac = min(max(frac, 0.0), 1.0)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def global_sum(d: Dist, *values: float, group: dist.ProcessGroup | None = None) -> list[float]:
    """All-reduce a few floats (float64) over the ranks (or over `group`, e.g. `d.shard_group` for a sum over the
    shards of the model, which HSDP's replicas hold alike); collective."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def to_device(x: Any, device: torch.device) -> Any:
    """A host tensor, or a dataclass of them (a PackedBatch), on `device` without a host sync: on CUDA each tensor is
    staged in pinned memory and copied asynchronously, so the host goes on queueing work; a blocking copy from
    pageable memory would wait until the GPU has run everything queued before it. None stays None."""
    if x is None:
        return None
    if dataclasses.is_dataclass(x):
        return dataclasses.replace(x, **{f.name: to_device(getattr(x, f.name), device) for f in dataclasses.fields(x)
                                         if isinstance(getattr(x, f.name), torch.Tensor)})
    pinned = x.pin_memory() if device.type == "cuda" and x.device.type == "cpu" else x
    return pinned.to(device, non_blocking=True)


def broadcast(d: Dist, value: Any) -> Any:
    """Rank 0's `value` on every rank (a small picklable object); collective."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def next_multiple(epoch: float, every: float) -> float:
    """The first multiple of `every` epochs after `epoch` (never, when every <= 0)."""
    return (math.floor(epoch / every) + 1) * every if every > 0 else math.inf


def log(d: Dist, message: str) -> None:
    if d.is_main:
        print(message, flush=True)


def format_eval(results: dict[str, dict[str, float]]) -> str:
    return "  ".join(f"{t}:" + (f" loss {r['loss']:.3f}" if "loss" in r else "")
                     + (f" acc {r['accuracy']:.2f}" if "accuracy" in r else "") for t, r in results.items())


@dataclass
class Counters:
    """Monotone over a run, whatever is rolled back; saved in checkpoints. Compute counts every step taken,
    including work a roll-back later discards (mSFT reports both)."""

    step: int = 0  # global step: optimizer steps attempted (names metrics and checkpoints)
    optimizer_steps: int = 0  # updates applied (steps with a finite loss and gradient)
    skipped_steps: int = 0  # non-finite steps, never applied
    tokens: float = 0.0  # input tokens (padding excluded), all ranks
    loss_tokens: float = 0.0  # tokens with a training target, all ranks
    flops: float = 0.0  # training FLOPs, model.config.flops_per_token * tokens


class Meter:
    """Tokens/s and MFU over the steps since the last `read()`."""

    def __init__(self, d: Dist, flops_per_token: float) -> None:
        self.flops_per_token, self.peak = flops_per_token, peak_flops(d.device)
        self.world_size = d.world_size
        self.tokens, self.t0 = 0.0, time.perf_counter()

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def read(self) -> dict[str, float]:
        tps = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        out = {"tokens_per_s": tps}
        if self.peak:
            out["mfu"] = tps * self.flops_per_token / (self.peak * self.world_size)
        self.tokens, self.t0 = 0.0, time.perf_counter()
        return out


# ------------------------------------------------------------------------------------------------------ data


def load_tokenizer(cfg: RunConfig) -> Tokenizer:
    path = cfg.init.tokenizer or cfg.init.hf_checkpoint
    if path:
        return Tokenizer.from_dir(path)

    return tiny_tokenizer()


def load_data(cfg: RunConfig, d: Dist, tokenizer: Tokenizer) -> SFTData:
    """The sub-datasets of `cfg.data`, tokenized. A mixture of files is tokenized once: rank 0 keys the cache by
    content and tells every rank, builds the entry if it is missing (the others wait), then each node's local rank 0
    that still does not see it (a node without the shared filesystem) builds its own, and every rank memory-maps it.
    So nodes sharing a cache directory never build the same entry twice, and a build that fails stops every rank. The
    built-in tasks are small and built in memory on every rank."""
    c = cfg.data
    if not c.path:
        if c.columns:
            raise DataError(f"data.columns {sorted(c.columns)}: column layouts apply to the files of data.path; the "
                            f"built-in tasks have none")
        train, heldout = synthetic_rows(c.seed, task_set=c.synthetic)
        check_checker_names(c.checkers, train, "the built-in tasks")
        for rows in (*train.values(), *heldout.values()):  # the config's defaults do not override a row's own
            for row in rows:
                row.checker = c.checkers.get(row.task, row.checker)
        return SFTData(train, heldout, tokenizer, seq_len=c.seq_len, truncation=c.truncation)

    def build() -> SFTData:
        return SFTData.from_dir(c.path, tokenizer, seq_len=c.seq_len, truncation=c.truncation,
                                heldout_fraction=c.heldout_fraction, seed=c.seed, checkers=c.checkers,
                                columns=c.columns)

    if c.cache_dir == "off":
        return build()
    key = error = None
    if d.is_main:
        try:  # a bad source is found here on rank 0: every rank must hear of it, not wait in the broadcast
            key = mixture_cache_key(c.path, tokenizer, seq_len=c.seq_len, truncation=c.truncation,
                                    heldout_fraction=c.heldout_fraction, seed=c.seed, checkers=c.checkers,
                                    columns=c.columns)
        except DataError as e:
            error = str(e)
    key, error = broadcast(d, (key, error))
    if error is not None:
        raise DataError(error)
    entry = Path(c.cache_dir or default_cache_dir()) / key
    hit = (entry / "meta.json").is_file()
    for builders in ("rank 0", "local rank 0"):  # a second round only for nodes that cannot see rank 0's entry
        build_here = d.is_main if builders == "rank 0" else d.local_rank == 0
        error = None
        if build_here and not (entry / "meta.json").is_file():
            try:
                build().save_cache(entry)  # atomic: a temporary directory renamed into place
                print(f"rank {d.rank}: tokenized {c.path} into {entry}", flush=True)
            except Exception as e:  # raised after the all-reduce below, so no rank is left waiting
                error = e
        (failed,) = global_sum(d, float(error is not None))  # also the barrier after the build
        if error is not None:
            raise error
        if failed:
            raise DataError(f"{entry}: building the tokenization cache entry failed on {failed:.0f} rank(s) "
                            f"({builders}; its error is in that rank's output)")
    if not (entry / "meta.json").is_file():
        raise DataError(f"{entry}: the tokenization cache entry is missing on rank {d.rank} after local rank 0 "
                        f"of its node built it: is the cache directory writable and the same path on every rank?")
    log(d, f"{c.path}: tokenized mixture {'read from' if hit else 'written to'} {entry}")
    return SFTData.load_cache(entry)


def default_cache_dir() -> Path:
    """Where tokenized mixtures are cached: $POSTTRAIN_CACHE, else $XDG_CACHE_HOME/posttrain/tokenized, else
    ~/.cache/posttrain/tokenized (shared by the ranks of a node, and by nodes when the home directory is)."""
    if os.environ.get("POSTTRAIN_CACHE"):
        return Path(os.environ["POSTTRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "posttrain" / "tokenized"


# ----------------------------------------------------------------------------------------------------- runtime


class Runtime:
    """What every stage holds: built by the constructor, driven by the stage (see the module docstring)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.d = d = init_distributed(cfg.train.seed, device=cfg.device or None, parallel=cfg.parallel)
        if d.replicate > 1:
            log(d, f"HSDP: {d.replicate} replicas x {d.shard} shards (ranks {d.shard} apart hold the same shards)")
        self.tokenizer = load_tokenizer(cfg)
        if not cfg.init.hf_checkpoint and cfg.model.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                             f"{self.tokenizer.vocab_size} tokens ({self.tokenizer.source}); raise model.vocab_size")
        self.data = load_data(cfg, d, self.tokenizer)
        self.model: Transformer = build_model(cfg.model, d, cfg.parallel, init_from=cfg.init.hf_checkpoint or None,
                                              seed=cfg.train.seed)
        cfg.model = self.model.config  # a checkpoint's config wins; record what was built
        # Checked here, on every rank alike: a prompt the sampler refused on one rank only would hang the others.
        longest = cfg.data.seq_len + (cfg.eval.max_new_tokens if cfg.eval.generate else 0)
        if longest > self.model.config.max_position_embeddings:
            raise ValueError(f"data.seq_len ({cfg.data.seq_len}) + eval.max_new_tokens ({cfg.eval.max_new_tokens}) "
                             f"exceeds the model's max_position_embeddings "
                             f"({self.model.config.max_position_embeddings}); lower them")
        self.optimizer = self.new_optimizer()
        self.out = Path(cfg.out_dir)
        self.checkpointer = Checkpointer(cfg.checkpoint.dir or self.out / "checkpoints", d,
                                         keep_last=cfg.checkpoint.keep_last)
        self.counters = Counters()
        self.history: list[dict[str, Any]] = []  # one entry per evaluation: step, epoch, results
        self.bad_steps = 0  # consecutive non-finite steps
        self.flops_per_token = self.model.config.flops_per_token(cfg.data.seq_len)
        self.metrics: MetricsLog | None = None  # opened by resume(): appended to when resuming

    # -- optimizer -------------------------------------------------------------------------------------------

    def new_optimizer(self, **overrides: Any) -> torch.optim.Optimizer:
        """A fresh optimizer (the config's, with `overrides` of lr/betas/weight_decay); re-arms the warmup."""
        o = self.cfg.optim
        kw = {"lr": o.lr, "betas": tuple(o.betas), "weight_decay": o.weight_decay, **overrides}
        self.optimizer = build_optimizer(self.model, **kw)
        self.sched_step = 0
        return self.optimizer

    def lr(self, frac: float) -> float:
        return lr_at(self.cfg.optim, self.sched_step, frac)

    def optimizer_step(self, lr: float, finite: torch.Tensor) -> int:
        """Apply the step whose gradients are in place unless `finite` (a 0-d bool tensor on the device: loss and
        gradient norm finite) is False, zero the gradients, advance the global and schedule steps; returns the
        global step taken. No host read where the optimizer can skip by itself: fused AdamW (the default on CUDA)
        reads `found_inf` on the device, the mechanism torch.amp's GradScaler uses. Any other optimizer reads
        `finite` here (free on CPU). `book_step` counts the outcome once the step's metrics are read."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = (~finite).to(torch.float32)  # 1: skip (parameters and state untouched)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif bool(finite):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        step = self.counters.step
        self.counters.step += 1
        self.sched_step += 1
        return step

    def book_step(self, step: int, loss: float, grad_norm: float, *, tokens: float, loss_tokens: float) -> bool:
        """Count global step `step` (taken by `optimizer_step`) from its metrics read on the host: applied when loss
        and gradient norm are finite, else skipped (`train.max_bad_steps` skipped in a row raise); tokens, FLOPs.
        Returns whether it was applied."""
        c = self.counters
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.bad_steps = 0
            c.optimizer_steps += 1
        else:
            self.bad_steps += 1
            c.skipped_steps += 1
            log(self.d, f"step {step}: non-finite loss {loss} or grad norm {grad_norm}; step skipped "
                        f"({self.bad_steps} in a row, {c.skipped_steps} in total)")
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                raise FloatingPointError(
                    f"{self.bad_steps} consecutive steps with non-finite loss or gradients (last: loss {loss}, grad "
                    f"norm {grad_norm}) at step {step}; lower optim.lr, check the data, or use parallel.param_dtype="
                    f"'float32'")
        c.tokens += tokens
        c.loss_tokens += loss_tokens
        c.flops += tokens * self.flops_per_token
        return finite

    # -- checkpoints -----------------------------------------------------------------------------------------

    def state(self, loader: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"data": loader.state_dict(), "counters": asdict(self.counters), "sched_step": self.sched_step,
                "history": self.history, "config": flatten(self.cfg), **(extra or {})}

    def save(self, loader: Any, extra: dict[str, Any] | None = None) -> None:
        """A resumable checkpoint named by the global step (collective)."""
        self.checkpointer.save(self.counters.step, self.model, self.optimizer, self.state(loader, extra))

    def resume(self, loader: Any) -> dict[str, Any] | None:
        """Continue from the newest complete checkpoint, if any and if `checkpoint.resume`: weights, optimizer,
        RNG, counters, history and the loader's position. Rank 0 chooses the checkpoint for every rank (a rank
        that saw a different directory listing would otherwise load another step and hang the others).
        Returns the saved state (a stage reads its own keys from it), or None for a fresh start."""
        latest = self.checkpointer.latest() if self.cfg.checkpoint.resume and self.d.is_main else None
        step = broadcast(self.d, latest)
        opened: Exception | None = None
        try:
            self.metrics = MetricsLog(self.out, self.d.is_main, append=step is not None, cfg=self.cfg.log,
                                      config=flatten(self.cfg))
        except Exception as e:  # rank 0 alone opens it (W&B's login can fail there): no rank may wait for it
            opened = e
        if broadcast(self.d, None if opened is None else repr(opened)) is not None:
            raise opened or RuntimeError("rank 0 could not open the metrics log (its error is in its output)")
        if step is None:
            return None
        state = self.checkpointer.load(step, self.model, self.optimizer)
        loader.load_state_dict(state["data"])
        known = {f.name for f in fields(Counters)}
        self.counters = Counters(**{k: v for k, v in state.get("counters", {}).items() if k in known})
        self.counters.step = state["step"]
        self.sched_step = state.get("sched_step", state["step"])
        self.history = state.get("history", [])
        log(self.d, f"resumed from {self.checkpointer.root}/step_{step:08d} (epoch {loader.progress:.3f})")
        return state

    # -- evaluation ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def heldout_loss(self, task: str) -> float:
        """Mean response-token NLL on `task`'s held-out split (collective: every rank runs the same batches)."""
        total = torch.zeros((), dtype=torch.float64, device=self.d.device)  # read once, after the last batch
        count = 0.0
        for batch in self.data.heldout_batches(task, max_tokens=self.cfg.data.max_tokens, rank=self.d.rank,
                                               world_size=self.d.world_size):
            logp = token_logprobs(self.model, to_device(batch, self.d.device))
            total += -logp.sum().double()
            count += batch.num_loss_tokens
        total, count = global_sum(self.d, total.item(), count)
        return total / max(count, 1.0)

    @torch.no_grad()
    def accuracy(self, task: str) -> float:
        """Greedy-generation accuracy on `task`'s held-out rows, each checked by its row's checker (each rank
        generates its share)."""
        examples = self.data.heldout_examples(task, rank=self.d.rank, world_size=self.d.world_size)
        limit = self.cfg.eval.max_examples
        if limit:
            examples = examples[: -(-limit // self.d.world_size)]
        prompts = [self.tokenizer.apply_chat_template(e.prompt, add_generation_prompt=True, tokenize=True)
                   for e in examples]
        correct = 0
        with full_weights(self.model):
            if prompts:
                outs = generate(self.model, prompts, max_new_tokens=self.cfg.eval.max_new_tokens, temperature=0.0,
                                stop_token_ids=self.tokenizer.stop_ids, tokenizer=self.tokenizer)
                texts = [""] * len(prompts)
                for out in outs:
                    texts[out.prompt_index] = self.tokenizer.decode(out.tokens, skip_special_tokens=True)
                correct = sum(check_rows([e.checker for e in examples], texts, [e.answer for e in examples]))
        correct, n = global_sum(self.d, correct, len(prompts))
        return correct / max(n, 1.0)

    def evaluate(self, tasks: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """{task: {"loss": held-out NLL, "accuracy": checker accuracy}} for every (or the given) sub-dataset."""
        self.model.eval()
        out = {}
        for task in tasks or self.data.tasks:
            out[task] = {"loss": self.heldout_loss(task)} if self.cfg.eval.loss else {}
            if self.cfg.eval.generate:
                out[task]["accuracy"] = self.accuracy(task)
        if self.cfg.eval.generate:
            free_cache(self.model)  # evals are occasional: give the KV cache's memory back to training

        forget_forwards(self.model)  # no backward follows the held-out loss's forwards
        self.model.train()
        return out

    def record_eval(self, epoch: float, results: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Append an evaluation to the history and the metrics, and print it."""
        entry = {"step": self.counters.step, "epoch": epoch, "eval": results, **extra}
        self.history.append(entry)
        self.metrics.write(self.counters.step, {"epoch": epoch, "eval": results, **extra})
        log(self.d, f"eval @ step {self.counters.step} (epoch {epoch:.2f})  {format_eval(results)}")
        return entry

    # -- the loop --------------------------------------------------------------------------------------------

    def loop(self, step_fn: Callable[[Callable[[], float]], dict[str, float]], *, progress: Callable[[], float],
             frac: Callable[[], float], evaluate: Callable[[], Any] | None = None,
             every_epochs: float | None = None, at_start: bool = False,
             save: Callable[[], None] | None = None) -> bool:
        """Call `step_fn(lr)` until `frac()` reaches 1 (True) or the global step reaches `train.stop_at_step`
        (False). `lr()` is the scheduled learning rate; a step calls it after drawing its data, so the schedule sees
        the position including this step's batches. `step_fn` runs its optimizer steps through `optimizer_step` and
        `book_step` and returns its metrics (at least "loss", "grad_norm" and "input_tokens"). `evaluate()` runs
        before the first step when `at_start` (a stage passes False when it resumes mid-run, so a resumed run
        evaluates where the uninterrupted one did), whenever
        `progress()` passes a multiple of `every_epochs` (default: `eval.every_epochs`), and at the end. `save()`
        writes a checkpoint every `checkpoint.every_steps` global steps."""
        cfg, c = self.cfg, self.counters
        every = cfg.eval.every_epochs if every_epochs is None else every_epochs
        next_eval = next_multiple(progress(), every)
        if evaluate is not None and at_start:
            evaluate()
        meter = Meter(self.d, self.flops_per_token)
        pbar = None
        if self.d.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            pbar = tqdm(total=cfg.train.max_steps or None, initial=c.step, unit="step", dynamic_ncols=True)
        try:
            while frac() < 1.0:
                m = step_fn(lambda: self.lr(frac()))
                meter.add(m["input_tokens"])
                if pbar is not None:
                    pbar.update(1)
                    pbar.set_postfix(loss=f"{m['loss']:.3f}", epoch=f"{progress():.2f}")
                if c.step % cfg.train.log_every == 0:
                    record = {"epoch": progress(), "lr": self.optimizer.param_groups[0]["lr"], **m, **meter.read(),
                              "skipped_total": c.skipped_steps}
                    self.metrics.write(c.step, record)
                    if pbar is None:
                        log(self.d, f"step {c.step:5d}  epoch {progress():.3f}  loss {m['loss']:.4f}  "
                                    f"gnorm {m['grad_norm']:.3f}  lr {record['lr']:.2e}  "
                                    f"{record['tokens_per_s']:,.0f} tok/s"
                                    + (f"  MFU {record['mfu']:.1%}" if "mfu" in record else ""))
                if evaluate is not None and (progress() >= next_eval or frac() >= 1.0):
                    evaluate()
                    next_eval = next_multiple(progress(), every)
                if save is not None and cfg.checkpoint.every_steps and c.step % cfg.checkpoint.every_steps == 0:
                    save()
                if c.step == cfg.train.stop_at_step:
                    return False
        finally:
            if pbar is not None:
                pbar.close()
        return True

    def frac_of(self, progress: float, epochs: float | None = None) -> float:
        """How far through the run, 0 -> 1: by global steps when `train.max_steps` is set, else by epochs."""
        t = self.cfg.train
        return self.counters.step / t.max_steps if t.max_steps > 0 else progress / (epochs or t.epochs)

    # -- the end ---------------------------------------------------------------------------------------------

    def export(self, path: str | os.PathLike | None = None) -> Path:
        """A Hugging Face checkpoint (weights, config, tokenizer) of the current weights (collective)."""
        path = Path(path or self.out / "hf")
        tok_dir = self.out / "tokenizer"
        if self.d.is_main:
            self.tokenizer.save(tok_dir)
        export_hf(self.model, path, self.d, tokenizer_dir=tok_dir)
        log(self.d, f"exported {path} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
        return path

    def finish(self, loader: Any, *, finished: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """End a run: a last checkpoint (unless one exists at this step), the HF export when the run finished and
        `checkpoint.export_hf`, the summary (also written to <out_dir>/summary.json), metrics closed. The process
        group stays up for the caller."""
        c = self.counters
        if broadcast(self.d, self.checkpointer.latest() if self.d.is_main else None) != c.step:
            self.save(loader, extra)
        if self.cfg.checkpoint.export_hf and finished:
            self.export()
        log(self.d, f"{'done' if finished else 'stopped'}: {c.step} steps, {c.skipped_steps} skipped")
        summary = {"steps": c.step, "skipped_steps": c.skipped_steps, "finished": finished,
                   "counters": asdict(c), "history": self.history, **(extra or {})}
        if self.d.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        if self.metrics is not None:
            self.metrics.close()
        dist.barrier()
        return summary


def token_logprobs(model: Transformer, batch: PackedBatch) -> torch.Tensor:
    """log p(target) per position [B, S] through the fused kernel (0 where targets == -100)."""
    return model(batch.input_ids, batch.position_ids, targets=batch.targets)


def seed_config(cfg: Any, seed: int, section: str) -> Any:
    """One seed of a multi-seed study: train.seed = data.seed = seed, written to <out_dir>/seed<seed>, with the
    stage's own `<section>.seeds` emptied so that the copy is a single run."""
    return replace(cfg, out_dir=str(Path(cfg.out_dir) / f"seed{seed}"), train=replace(cfg.train, seed=seed),
                   data=replace(cfg.data, seed=seed), **{section: replace(getattr(cfg, section), seeds=[])})


def entry_point(run: Callable[[Any], Any], config_cls: type, argv: Sequence[str] | None = None) -> Any:
    """`python -m posttrain.train.<stage>`: parse the config, run the stage, tear down the process group this process
    made."""
    cfg = parse_args(config_cls, argv)
    try:
        return run(cfg)
    finally:
        close_distributed()
