"""mSFT: overfitting-aware multi-task mixture search (arXiv 2603.21606). The method: its config, the decision rule
(pure), the snapshots it keeps, and the stage driver. Baselines: train/msft/baselines.py; the comparison harness
(`python -m posttrain.train.msft`): train/msft/study.py; measured studies: docs/msft.md.

The method. Sub-datasets D_1..D_N each have a train and a held-out split. A stage trains the pooled, shuffled
examples of the active sub-datasets with a fresh optimizer for C epochs of the active mixture (`msft.budget_epochs`,
the method's one hyperparameter), evaluating every held-out split at c = 0, Δ, 2Δ, ..., C (`msft.eval_every`).
`decide` finds each active task's peak c_i* (first argmax) and the earliest one, j. If j peaked before C, j is
excluded and the weights and data position roll back to c_j* (the work after it is discarded); otherwise training
continues from θ_C with the same mixture. Stop when every task is excluded or after `msft.max_stages` stages. The
output is the snapshot with the best overall (micro-averaged) held-out accuracy seen in any stage.

Snapshots live in an in-memory ring (core/ring.py): θ_c is kept while it is some active task's best so far (strict
improvement) or the best overall, so at most N + 1 are live; the ring is sized for that.

Deviations from the reference, each a config switch with the reference as default unless said:
  - the peak signal: held-out accuracy (reference), or held-out loss (`msft.signal = "loss"`), or accuracy with a
    margin (`msft.margin > 0`: a later point is a new peak only if it beats the current peak by more than margin);
  - what counts as having peaked: the reference counts any first argmax before C, so a saturated task whose scores
    only wobble (1.00, 0.99, 1.00, ...) "peaks" at c = 0; with `msft.min_fall > 0` a task has peaked only if its
    score at C is more than min_fall below its peak (in the signal's units), so a peak must be followed by a fall
    larger than evaluation noise. SRO's roll-out uses the same test;
  - `msft.skip_flat`: a task whose score is the same at every point of a stage has not started learning, so it is
    no peak candidate (the reference takes its first argmax, c = 0);
  - the optimizer is the config's [optim] (reference: Adam, lr 1e-5, constant, no warm-up), recreated fresh at
    every stage;
  - the data position rolls back with the weights (the reference re-shuffles; here the stream is deterministic and
    resumable, and the examples seen after c_j* are seen again, by the remaining tasks' draws);
  - evaluation points are the first optimizer step at or after each multiple of Δ (so c is a little past kΔ).

Reads top to bottom: config -> `decide` (pure) -> evaluations and snapshots (`Tracker`) -> the stage driver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from posttrain.core.distributed import reshard
from posttrain.core.ring import CheckpointRing, snapshot_bytes
from posttrain.train.runtime import RunConfig, Runtime, global_sum, log
from posttrain.train.sft import loader_step, make_loader

METHODS = ("msft", "sft", "early_stop", "sro", "temperature", "dynamix")


@dataclass
class MSFTSection:
    budget_epochs: float = 1.0  # C: one roll-out window, in epochs of the active mixture
    eval_every: float = 0.25  # Δ, in epochs of the active mixture
    max_stages: int = 10
    signal: str = "accuracy"  # "accuracy" (reference) | "loss" (lower held-out NLL is better)
    margin: float = 0.0  # > 0: a later point is a new peak only if it beats the current one by more than this
    # True: a task whose score is the same at every point of a stage (not learning yet, e.g. 0 accuracy from
    # scratch) is no peak candidate in that stage. The reference (False) takes its first argmax, c = 0.
    skip_flat: bool = False
    # > 0: a task has peaked only if its score at C is more than this below its peak (the reference, 0, counts any
    # first argmax before C, so a saturated task peaks on noise). In the signal's units (accuracy: 0.05 = 5 points).
    min_fall: float = 0.0
    methods: list[str] = field(default_factory=lambda: ["msft", "sft"])
    temperature: float = 2.0  # the temperature baseline's τ
    # DynamixSFT (train/msft/baselines.py; the paper's own values were not reachable, docs/msft.md)
    dynamix_every: int = 20  # K: optimizer steps between two updates of the mixture weights
    dynamix_eta: float = 3.0  # inverse temperature of the prior-scaled Boltzmann distribution (0: the prior)
    dynamix_discount: float = 0.9  # accumulated reward R <- discount * R + r (1: the plain sum, unbounded)
    dynamix_prior_tau: float = 1.0  # the prior: the mixture's own weights ^ (1/τ) (1: SFT's mixture)
    dynamix_val_rows: int = 8  # held-out rows per sub-dataset in the look-ahead's loss (rotating through the split)
    ring_gb: float = 0.0  # ring capacity; 0: room for N + 2 snapshots of this rank's weights
    # A pretrained base: an SFT config each run first trains into <out_dir>/base (train.seed and data.seed are the
    # run's; kept, and reused while <out_dir>/base/hf exists); every method then starts from <out_dir>/base/hf.
    base_config: str = ""
    base_overrides: list[str] = field(default_factory=list)  # its --section.key=value flags
    seeds: list[int] = field(default_factory=list)  # several: the whole comparison per seed (train.seed = data.seed
    #                                                 = s, out_dir/seed<s>), then mean ± std over seeds

    def __post_init__(self) -> None:
        if self.signal not in ("accuracy", "loss"):
            raise ValueError(f"msft.signal: {self.signal!r} is not 'accuracy' or 'loss'")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"msft.methods: unknown {bad}; use some of {', '.join(METHODS)}")
        if self.budget_epochs <= 0 or not 0 < self.eval_every <= self.budget_epochs:
            raise ValueError(f"msft: need 0 < eval_every ({self.eval_every}) <= budget_epochs "
                             f"({self.budget_epochs})")
        if self.margin < 0 or self.min_fall < 0:
            raise ValueError(f"msft.margin ({self.margin}) and msft.min_fall ({self.min_fall}) must be >= 0")
        if self.dynamix_every < 1 or self.dynamix_val_rows < 1:
            raise ValueError(f"msft.dynamix_every ({self.dynamix_every}) and msft.dynamix_val_rows "
                             f"({self.dynamix_val_rows}) must be >= 1")
        if self.dynamix_eta < 0 or not 0 <= self.dynamix_discount <= 1 or self.dynamix_prior_tau <= 0:
            raise ValueError(f"msft: need dynamix_eta >= 0 ({self.dynamix_eta}), 0 <= dynamix_discount <= 1 "
                             f"({self.dynamix_discount}) and dynamix_prior_tau > 0 ({self.dynamix_prior_tau})")


@dataclass
class MSFTConfig(RunConfig):
    msft: MSFTSection = field(default_factory=MSFTSection)
    out_dir: str = "runs/msft"


# -------------------------------------------------------------------------------------------------- the decision


def peak_index(scores: Sequence[float], margin: float = 0.0) -> int:
    """The first argmax of `scores`; with margin > 0, a later point is a new peak only if it beats the current
    peak's score by more than `margin`."""
    best = 0
    for k in range(1, len(scores)):
        if scores[k] > scores[best] + margin:
            best = k
    return best


def is_flat(scores: Sequence[float]) -> bool:
    """The same score at every point: a task that has not started learning (skip_flat's test)."""
    return min(scores) == max(scores)


def peaked_at(scores: Sequence[float], *, margin: float = 0.0, skip_flat: bool = False,
              min_fall: float = 0.0) -> int | None:
    """The index of a task's peak in one window when it peaked there, else None. The peak is `peak_index`; it
    counts when it is before the window's last point, and, with skip_flat, when the scores are not all equal, and,
    with min_fall > 0, when the last score is more than min_fall below it."""
    if skip_flat and is_flat(scores):
        return None
    k = peak_index(scores, margin)
    if k == len(scores) - 1 or (min_fall > 0 and not scores[k] - scores[-1] > min_fall):
        return None
    return k


def check_curves(who: str, points: Sequence[float], scores: dict[str, Sequence[float]]) -> None:
    """Every task's curve has one score per evaluation point."""
    for task, s in scores.items():
        if len(s) != len(points):
            raise ValueError(f"{who}: task {task!r} has {len(s)} scores for {len(points)} points")


def decide(points: Sequence[float], scores: dict[str, Sequence[float]], active: Sequence[str], *,
           margin: float = 0.0, skip_flat: bool = False, min_fall: float = 0.0) -> tuple[str | None, float]:
    """One stage's decision. points: the evaluation points in epochs [0, Δ, ..., C]; scores[task]: the held-out
    scores there (higher is better); active: the tasks still trained. Returns (None, C) when no active task peaked
    before C, else (j, c_j*): the active task whose peak is earliest (ties by name) and its peak. What counts as a
    peak (margin, skip_flat, min_fall): `peaked_at`."""
    if not active:
        raise ValueError("decide: no active task")
    check_curves("decide", points, {task: scores[task] for task in active})
    peaks = {task: peaked_at(scores[task], margin=margin, skip_flat=skip_flat, min_fall=min_fall)
             for task in active}
    candidates = [task for task in active if peaks[task] is not None]
    if not candidates:
        return None, points[-1]
    j = min(candidates, key=lambda task: (peaks[task], task))
    return j, points[peaks[j]]


# --------------------------------------------------------------------------------------------------- evaluations


def micro_accuracy(rt: Runtime, results: dict[str, dict[str, float]]) -> float:
    """Held-out accuracy over all evaluated examples of every task (tasks weigh by their held-out sizes)."""
    sizes = {t: len(rt.data.heldout_rows[t]) for t in results}
    if rt.cfg.eval.max_examples:
        sizes = {t: min(n, rt.cfg.eval.max_examples) for t, n in sizes.items()}
    return sum(results[t]["accuracy"] * sizes[t] for t in results) / max(sum(sizes.values()), 1)


def weights_digest(rt: Runtime) -> float:
    """Sum of squares of every weight (float64, over the shards of one copy of the model: HSDP's replicas hold the
    same shards): recorded at each evaluation and checked after each restore (`restore_evaluated`). One host read."""
    reshard(rt.model)
    local = torch.stack([p.detach().to_local().double().pow(2).sum() for p in rt.model.parameters()]).sum()
    return global_sum(rt.d, local.item(), group=rt.d.shard_group)[0]


def restore_evaluated(rt: Runtime, ring: CheckpointRing, key: str) -> tuple[dict[str, Any], float]:
    """Restore snapshot `key` (weights) and check that they are the weights evaluated at its point: (meta, digest).
    A different digest means the snapshot does not hold what was evaluated (say, a copy that raced the next
    optimizer step), and everything decided from it would be wrong: that raises rather than being only recorded."""
    meta = ring.restore(key, rt.model)
    got, want = weights_digest(rt), meta["point"]["weights"]
    if got != want:
        raise RuntimeError(f"CheckpointRing: snapshot {key!r} restored weights whose sum of squares is {got!r}, but "
                           f"the weights evaluated at its point (step {meta['point']['step']}) had {want!r}: the "
                           f"snapshot does not hold the evaluated weights")
    return meta, got


def signal_of(cfg: MSFTConfig, result: dict[str, float]) -> float:
    return -result["loss"] if cfg.msft.signal == "loss" else result["accuracy"]


class Tracker:
    """Evaluations of one run: records them (runtime history + metrics), keeps the best-overall snapshot in the
    ring, and, for mSFT, each active task's best-so-far snapshot. Snapshot keys are never reused."""

    def __init__(self, rt: Runtime, ring: CheckpointRing, loader: Any, method: str) -> None:
        self.rt, self.ring, self.loader, self.method = rt, ring, loader, method
        self.best_overall: tuple[float, str] | None = None  # (micro accuracy, key)
        self.task_best: dict[str, tuple[float, str]] = {}  # active task -> (score, key), this stage
        self.curve: list[dict[str, Any]] = []  # every evaluation: tokens, flops, epoch, stage, c, results
        self._n = 0

    def evaluate(self, *, stage: int = 0, c: float = 0.0, active: Sequence[str] = (),
                 results: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
        rt = self.rt
        results = results if results is not None else rt.evaluate()
        overall = micro_accuracy(rt, results)
        point = {"tokens": rt.counters.tokens, "flops": rt.counters.flops, "step": rt.counters.step,
                 "epoch": self.loader.progress, "stage": stage, "c": c, "overall": overall, "eval": results,
                 "weights": weights_digest(rt)}
        self.curve.append(point)
        rt.record_eval(self.loader.progress, results, method=self.method, stage=stage, c=c, overall=overall)
        improved = [t for t in active if t not in self.task_best or
                    signal_of(rt.cfg, results[t]) > self.task_best[t][0]]
        better = self.best_overall is None or overall > self.best_overall[0]
        if improved or better:
            key = f"{self.method}/{self._n}"
            self._n += 1
            self.ring.snapshot(key, rt.model, meta={"data": self.loader.state_dict(), "point": point})
            for t in improved:
                self.task_best[t] = (signal_of(rt.cfg, results[t]), key)
            if better:
                self.best_overall = (overall, key)
            self._gc()
        point["snapshot"] = improved or better
        return point

    def _gc(self) -> None:
        """Drop snapshots that are no active task's best and not the best overall."""
        live = {k for _, k in self.task_best.values()} | ({self.best_overall[1]} if self.best_overall else set())
        for key in self.ring.keys():
            if key.startswith(f"{self.method}/") and key not in live:
                self.ring.drop(key)

    def new_stage(self) -> None:
        self.task_best = {}
        self._gc()


# ---------------------------------------------------------------------------------------------------- the stages


def open_run(cfg: MSFTConfig, name: str,
             mixture: Callable[[Runtime], dict[str, float]] | None = None) -> tuple[Runtime, Any, CheckpointRing]:
    """A fresh run from θ0 under <out_dir>/<name> (no resume, no export): runtime, loader, ring. `mixture`, given the
    runtime, returns the loader's mixture weights (the temperature baseline's come from the sub-dataset sizes)."""
    sub = replace(cfg, out_dir=str(Path(cfg.out_dir) / name))
    sub.checkpoint = replace(cfg.checkpoint, resume=False, export_hf=False)
    rt = Runtime(sub)
    if mixture is not None:
        rt.cfg.data = replace(sub.data, weights=mixture(rt))
    loader = make_loader(rt)
    rt.resume(loader)  # a fresh start (resume=False): opens the metrics log
    return rt, loader, new_ring(rt)


def close_run(rt: Runtime, loader: Any, ring: CheckpointRing) -> None:
    rt.finish(loader, finished=True)
    loader.close()
    ring.clear()


def new_ring(rt: Runtime) -> CheckpointRing:
    gb = rt.cfg.msft.ring_gb
    capacity = int(gb * 2**30) if gb > 0 else snapshot_bytes(rt.model) * (len(rt.data.tasks) + 2)
    return CheckpointRing(capacity, device="cpu")


def train_until(rt: Runtime, loader: Any, frac: Callable[[], float], evaluate: Callable[[], Any],
                 progress: Callable[[], float], every: float,
                 step: Callable[[Callable[[], float]], dict[str, float]] | None = None) -> None:
    """Steps of SFT on `loader` (or `step`, Runtime.loop's step function) until `frac()` (also the lr schedule's
    position) reaches 1; `evaluate()` at every `every` epochs of `progress()` and at the end (the caller evaluates
    the start)."""
    rt.loop(step or loader_step(rt, loader), progress=progress, frac=frac, evaluate=evaluate, every_epochs=every)


def run_msft(rt: Runtime, loader: Any, ring: CheckpointRing) -> dict[str, Any]:
    m = rt.cfg.msft
    tracker = Tracker(rt, ring, loader, "msft")
    active = list(loader.active_tasks)
    stages: list[dict[str, Any]] = []
    carry: dict[str, Any] | None = None  # the evaluation of the next stage's c = 0 (roll-back point or θ_C)
    while active and len(stages) < m.max_stages:
        stage = len(stages) + 1
        rt.new_optimizer()
        tracker.new_stage()
        start, first = loader.progress, len(tracker.curve)
        rel = lambda: loader.progress - start  # noqa: E731
        ev = lambda results=None: tracker.evaluate(stage=stage, c=rel(), active=active, results=results)  # noqa
        ev(carry)
        train_until(rt, loader, lambda: rel() / m.budget_epochs + 1e-9, ev, rel, m.eval_every)
        curve = tracker.curve[first:]
        points = [p["c"] for p in curve]
        scores = {t: [signal_of(rt.cfg, p["eval"][t]) for p in curve] for t in rt.data.tasks}
        excluded, c_star = decide(points, scores, active, margin=m.margin, skip_flat=m.skip_flat,
                                  min_fall=m.min_fall)
        peaks = {t: points[peak_index(scores[t], m.margin)] for t in active}
        record = {"stage": stage, "active": list(active), "points": points, "peaks": peaks, "excluded": excluded,
                  "rollback_to": c_star, "tokens_end": rt.counters.tokens}
        if excluded is None:
            carry = curve[-1]["eval"]  # θ_C is the next stage's c = 0: evaluated already
            record["discarded_tokens"] = 0.0
        else:
            key = tracker.task_best[excluded][1]
            meta, record["restored_weights"] = restore_evaluated(rt, ring, key)
            record["point_weights"] = meta["point"]["weights"]
            loader.load_state_dict(meta["data"])
            record["restored_epoch"] = loader.progress  # the data position restored: the snapshot point's "epoch"
            if len(active) > 1:  # the last task is not excluded from the loader: the run ends here
                loader.exclude(excluded)
            active.remove(excluded)
            carry = meta["point"]["eval"]
            record["discarded_tokens"] = rt.counters.tokens - meta["point"]["tokens"]
            record["rollback_step"] = meta["point"]["step"]
            rt.metrics.event(rt.counters.step, "msft/exclude", stage=stage, task=excluded, peak_c=c_star)
            rt.metrics.event(rt.counters.step, "msft/rollback", stage=stage, to_c=c_star,
                             to_step=record["rollback_step"], discarded_tokens=record["discarded_tokens"])
        stages.append(record)
        log(rt.d, f"mSFT stage {stage}: peaks {({t: round(c, 3) for t, c in peaks.items()})} -> "
                  + (f"exclude {excluded}, roll back to c = {c_star:.3f}" if excluded else "no peak before C"))
    return summarize(rt, ring, tracker, "msft", stages=stages)


def summarize(rt: Runtime, ring: CheckpointRing, tracker: Tracker, method: str, **extra: Any) -> dict[str, Any]:
    """Restore the best-overall snapshot and summarise the run."""
    overall, key = tracker.best_overall
    meta, restored = restore_evaluated(rt, ring, key)
    point = meta["point"]
    return {"method": method, "selected": {"step": point["step"], "epoch": point["epoch"], "stage": point["stage"],
                                           "c": point["c"], "overall": overall, "weights": point["weights"],
                                           "restored_weights": restored,
                                           "accuracy": {t: r["accuracy"] for t, r in point["eval"].items()}},
            "tokens": rt.counters.tokens, "flops": rt.counters.flops, "optimizer_steps": rt.counters.optimizer_steps,
            "curve": tracker.curve, **extra}
