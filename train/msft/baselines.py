"""mSFT's baselines, run in the same harness at mSFT's token budget (train/msft/study.py runs them).

Every one starts from the same θ0 and is reported with its tokens and FLOPs. The budget they share is mSFT's training
tokens, its discarded work included; DynamixSFT's look-ahead compute comes on top, reported apart.
  sft          standard SFT for the tokens mSFT spent; the best checkpoint by overall held-out accuracy;
  early_stop   per-task early stopping on the SFT run's curves: each task's accuracy at its own best checkpoint
               (an oracle needing N models; no extra training);
  sro          SRO SFT: one roll-out of C epochs records every c_i* (none for a task that has not peaked by
               `decide`'s test); a re-run excludes each task at its first evaluation at or after its recorded peak
               (after an exclusion the epochs of the smaller mixture drift from the roll-out's, so this can be up
               to Δ late); the best checkpoint by overall held-out accuracy;
  temperature  SFT with mixture weights proportional to size^(1/τ) (`msft.temperature`), equal tokens;
  dynamix      DynamixSFT (arXiv 2508.12116): SFT at equal training tokens whose mixture weights a multi-armed bandit
               sets, one arm per sub-dataset (`Dynamix`).

DynamixSFT here. Every `msft.dynamix_every` (K) steps, before the step, every arm is probed by a 1-step look-ahead:
one real training step (train_step: the run's loss, clipping, AdamW state and current lr, grad_accum micro-batches)
on a batch of that sub-dataset alone, from its own stream (seed data.seed + 7919: the training stream is
untouched); its reward is the relative fall of the held-out loss, (L - L') / L, L being the mean over sub-datasets
of each one's response-token NLL on `msft.dynamix_val_rows` held-out rows each (a sample rotating through the
splits); then the weights, the optimizer state (a CheckpointRing slot), the counters and the schedule position are
put back bit-exactly. Rewards accumulate, R <- discount R + r, and the weights become the prior-scaled Boltzmann
distribution p_i ∝ prior_i exp(η R_i), the prior being the mixture SFT trains on (^(1/τ) with
`msft.dynamix_prior_tau`); a sub-dataset outside the mixture gets 0. The look-ahead's compute (probe steps, and 1 + N
forwards of the sample per update) is the result's "lookahead", not counted in "tokens". Gaps: only the paper's
abstract was reachable, so K = 20, η = 3, discount 0.9 and 8 rows per sub-dataset are this harness's choices, not the
paper's values (docs/msft.md: why these), and whether the paper probes every arm at every update (done here: full
information) could not be checked; the reward is relative (divided by L) so that η does not depend on a loss scale
that falls during training; the bandit acts at step granularity (weights fixed for K steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from posttrain.core.distributed import forget_forwards
from posttrain.core.ring import CheckpointRing, snapshot_bytes
from posttrain.train.data import PackedBatch, pack_rows
from posttrain.train.msft.method import (
    MSFTConfig,
    Tracker,
    close_run,
    open_run,
    peaked_at,
    signal_of,
    summarize,
    train_until,
)
from posttrain.train.runtime import Runtime, global_sum, log, to_device, token_logprobs
from posttrain.train.sft import loader_step, train_step

def run_sft_budget(rt: Runtime, loader: Any, ring: CheckpointRing, method: str, tokens: float,
                   exclude_at: dict[str, float] | None = None,
                   step: Callable[[Callable[[], float]], dict[str, float]] | None = None) -> dict[str, Any]:
    """Plain SFT until `tokens` input tokens (all ranks); with `exclude_at` (SRO) each task is excluded when the
    mixture's progress reaches its recorded peak; `step` replaces the plain training step (DynamixSFT's)."""
    tracker = Tracker(rt, ring, loader, method)
    pending = dict(sorted((exclude_at or {}).items(), key=lambda kv: (kv[1], kv[0])))

    def evaluate() -> None:
        tracker.evaluate(c=loader.progress)
        for task, at in list(pending.items()):
            if loader.progress >= at and len(loader.active_tasks) > 1:
                loader.exclude(task)
                del pending[task]
                log(rt.d, f"{method}: exclude {task} at epoch {loader.progress:.3f} (its peak: {at:.3f})")

    tracker.evaluate(c=0.0)
    train_until(rt, loader, lambda: rt.counters.tokens / tokens if tokens > 0 else 1.0, evaluate,
                 lambda: loader.progress, rt.cfg.msft.eval_every, step)
    return summarize(rt, ring, tracker, method)


def early_stop(sft: dict[str, Any]) -> dict[str, Any]:
    """Per-task early stopping on an SFT run's curve: each task at its own best evaluation (no training)."""
    tasks = list(sft["curve"][0]["eval"])
    best = {t: max(p["eval"][t]["accuracy"] for p in sft["curve"]) for t in tasks}
    return {"method": "early_stop", "selected": {"accuracy": best, "overall": None, "note": "one checkpoint per task"},
            "tokens": sft["tokens"], "flops": sft["flops"], "curve": []}


def temperature_weights(sizes: dict[str, int], tau: float) -> dict[str, float]:
    return {t: n ** (1.0 / tau) for t, n in sizes.items()}


def temperature_mixture(cfg: MSFTConfig) -> Callable[[Runtime], dict[str, float]]:
    """open_run's `mixture` for the temperature baseline: weights ∝ size^(1/τ), τ = msft.temperature."""
    return lambda rt: temperature_weights({t: len(rt.data.train[t]) for t in rt.data.tasks}, cfg.msft.temperature)


def sro_rollout_peaks(cfg: MSFTConfig) -> tuple[dict[str, float], float]:
    """SRO's roll-out: plain SFT for C epochs from θ0, recording each task's first-argmax peak (in epochs of the
    mixture). A task that has not peaked by `decide`'s test (`peaked_at`: e.g. still at its best at the roll-out's
    last point) gets no recorded peak and is never excluded. Returns the peaks and the tokens the roll-out cost
    (they count in SRO's budget)."""
    rt, loader, ring = open_run(cfg, "sro_rollout")
    tracker = Tracker(rt, ring, loader, "sro_rollout")
    tracker.evaluate()
    train_until(rt, loader, lambda: loader.progress / cfg.msft.budget_epochs + 1e-9,
                 lambda: tracker.evaluate(c=loader.progress), lambda: loader.progress, cfg.msft.eval_every)
    points = [p["epoch"] for p in tracker.curve]
    peaks = {}
    for t in rt.data.tasks:
        k = peaked_at([signal_of(cfg, p["eval"][t]) for p in tracker.curve], margin=cfg.msft.margin,
                      skip_flat=cfg.msft.skip_flat, min_fall=cfg.msft.min_fall)  # as in decide
        if k is not None:
            peaks[t] = points[k]
    tokens = rt.counters.tokens
    close_run(rt, loader, ring)
    return peaks, tokens


# ---------------------------------------------------------------------------------------------------- DynamixSFT


def dynamix_update(prior: dict[str, float], reward_sum: dict[str, float], rewards: dict[str, float], *,
                   eta: float, discount: float = 1.0) -> tuple[dict[str, float], dict[str, float]]:
    """One bandit update: accumulate each arm's reward, R_i <- discount * R_i + r_i, and return (R, p) with p the
    prior-scaled Boltzmann distribution p_i = prior_i exp(η R_i) / Σ_j prior_j exp(η R_j). The prior (relative
    weights, any scale) anchors p: p = prior while the accumulated rewards are equal or η = 0, and two arms' odds
    move from their prior odds by exp(η (R_i - R_j)). An arm with prior 0 gets probability 0 (and no reward); any
    other keeps a probability above 0 (its exponent is held within 700 of the largest, so it cannot underflow)."""
    if any(not (w >= 0 and math.isfinite(w)) for w in prior.values()):
        raise ValueError(f"dynamix_update: prior weights must be finite and >= 0, got {prior}")
    live = [t for t, w in prior.items() if w > 0]
    if not live:
        raise ValueError(f"dynamix_update: every prior weight is 0: {prior}")
    acc = {t: discount * reward_sum.get(t, 0.0) + rewards.get(t, 0.0) for t in live}
    logits = {t: math.log(prior[t]) + eta * acc[t] for t in live}
    top = max(logits.values())
    z = {t: math.exp(max(v - top, -700.0)) for t, v in logits.items()}
    total = sum(z.values())
    return acc, {t: z[t] / total if t in z else 0.0 for t in prior}


def lookahead_sample(rt: Runtime, tasks: Sequence[str], first: int, rows: int) -> list[PackedBatch]:
    """This rank's micro-batches of one look-ahead sample: held-out documents first .. first + rows - 1 (wrapping
    around) of each task, laid next-fit into rows of seq_len, B rows per micro-batch as in training. Micro-batch k
    of the global list goes to rank k mod world_size, and every rank gets the same count (all-padding ones fill
    up), since a sharded forward is collective; so the sample does not depend on the world size."""
    data, d = rt.data, rt.d
    per_micro = rt.cfg.data.max_tokens // data.seq_len
    lines: list[list[tuple[int, int]]] = []
    room = 0
    for task in tasks:
        ti, split = data.tasks.index(task), data.heldout[task]
        for k in range(min(rows, len(split))):
            i = (first + k) % len(split)
            if split.length(i) > room:
                lines.append([])
                room = data.seq_len
            lines[-1].append((ti, i))
            room -= split.length(i)
    micro = [lines[j:j + per_micro] for j in range(0, len(lines), per_micro)]
    splits = [data.heldout[t] for t in data.tasks]
    out = []
    for k in range(-(-len(micro) // d.world_size)):
        j = k * d.world_size + d.rank
        mine = micro[j] if j < len(micro) else []
        out.append(pack_rows(mine + [[] for _ in range(per_micro - len(mine))], splits, data.seq_len, data.pad_id,
                             data.tasks))
    return out


@torch.no_grad()
def lookahead_loss(rt: Runtime, batches: Sequence[PackedBatch], tasks: Sequence[str]) -> tuple[float, float]:
    """The look-ahead's held-out loss: the mean over `tasks` of each one's mean response-token NLL on the sample
    (global sums, so every rank gets the same number), and the sample's input tokens (all ranks)."""
    n = len(rt.data.tasks)
    sums = torch.zeros(2 * n + 1, dtype=torch.float64, device=rt.d.device)
    for batch in batches:
        b = to_device(batch, rt.d.device)
        logp = token_logprobs(rt.model, b).double()
        scored = b.targets != -100
        # Masked sums: not bincount (its CUDA kernel adds in no fixed order), nor logp[mine] (a boolean index waits
        # for the device to count the selected tokens: a host sync per task per batch).
        for i in range(n):
            mine = scored & (b.task_ids == i)
            sums[i] -= torch.where(mine, logp, 0.0).sum()
            sums[n + i] += mine.sum()
        sums[2 * n] += (b.task_ids >= 0).sum()
    forget_forwards(rt.model)  # no backward follows these forwards
    totals = global_sum(rt.d, *sums.tolist())
    losses = [totals[i] / max(totals[n + i], 1.0) for i, t in enumerate(rt.data.tasks) if t in tasks]
    return sum(losses) / len(losses), totals[2 * n]


class Dynamix:
    """DynamixSFT's bandit inside a plain SFT run (see the module docstring): `step` is Runtime.loop's step
    function; every `msft.dynamix_every` steps, before the step, `update` probes every arm with a 1-step look-ahead
    and re-weights the training loader. Every rank makes the same decisions: rewards come from global sums."""

    PROBE_SEED = 7919  # the probe streams' seed offset from data.seed: other draws than the training stream's

    def __init__(self, rt: Runtime, loader: Any) -> None:
        m, c = rt.cfg.msft, rt.cfg.data
        self.rt, self.loader, self.m = rt, loader, m
        self.arms = list(loader.active_tasks)
        base = dict(zip(loader.tasks, loader.sampler.weights))  # the mixture SFT would train on
        prior = {t: base[t] ** (1.0 / m.dynamix_prior_tau) if t in self.arms else 0.0 for t in loader.tasks}
        self.prior = {t: w / sum(prior.values()) for t, w in prior.items()}
        self.reward_sum = {t: 0.0 for t in self.arms}
        self.weights = dict(self.prior)
        loader.set_weights({t: w for t, w in self.weights.items() if w > 0})
        self.probes = {t: rt.data.loader(max_tokens=c.max_tokens, seed=c.seed + self.PROBE_SEED, weights={t: 1.0},
                                         rank=rt.d.rank, world_size=rt.d.world_size) for t in self.arms}
        self.train = loader_step(rt, loader)
        self.ring: CheckpointRing | None = None
        self.start = rt.counters.step
        self.compute = {"updates": 0, "probe_tokens": 0.0, "probe_flops": 0.0, "eval_tokens": 0.0,
                        "eval_flops": 0.0}
        self.trajectory = [self._record(None, {})]

    def _record(self, loss: float | None, rewards: dict[str, float]) -> dict[str, Any]:
        rt = self.rt
        return {"update": self.compute["updates"], "step": rt.counters.step, "tokens": rt.counters.tokens,
                "epoch": self.loader.progress, "loss": loss, "rewards": rewards, "reward_sum": dict(self.reward_sum),
                "weights": dict(self.weights)}

    def step(self, lr: Callable[[], float]) -> dict[str, float]:
        done = self.rt.counters.step - self.start
        if done and done % self.m.dynamix_every == 0:
            self.update(lr())
        return self.train(lr)

    def _probe_ring(self) -> CheckpointRing:
        """A ring with room for one snapshot of this rank's weights and optimizer state (remade if the state grew:
        AdamW creates its moments at the first step)."""
        rt = self.rt
        need = snapshot_bytes(rt.model, rt.optimizer)
        if self.ring is None or self.ring.capacity < need:
            if self.ring is not None:
                self.ring.clear()
            self.ring = CheckpointRing(need, device="cpu")
        return self.ring

    def update(self, lr: float) -> None:
        """Probe every arm: one real training step (train_step: the loss, clipping, optimizer and lr of training) on
        a batch of that arm alone, the held-out loss after it, then weights, optimizer state, counters and schedule
        position put back exactly as they were. Then the bandit update, and the loader's new weights."""
        rt, m = self.rt, self.m
        sample = lookahead_sample(rt, self.arms, self.compute["updates"] * m.dynamix_val_rows, m.dynamix_val_rows)
        before, sample_tokens = lookahead_loss(rt, sample, self.arms)
        ring = self._probe_ring()
        optimizer = rt.optimizer if rt.optimizer.state else None  # a fresh AdamW has no state to snapshot yet
        lrs = [g["lr"] for g in rt.optimizer.param_groups]
        ring.snapshot("probe", rt.model, optimizer)  # the probe step's optimizer waits for the copy (core/ring.py)
        kept = replace(rt.counters)
        sched_step, bad_steps = rt.sched_step, rt.bad_steps
        rewards, probe_tokens = {}, 0.0
        for task in self.arms:
            batches = [self.probes[task].next_batch() for _ in range(rt.cfg.optim.grad_accum)]
            probe_tokens += train_step(rt, batches, lr)["input_tokens"]
            after, _ = lookahead_loss(rt, sample, self.arms)
            ring.restore("probe", rt.model, optimizer)
            if optimizer is None:
                rt.optimizer.state.clear()
            for group, value in zip(rt.optimizer.param_groups, lrs):
                group["lr"] = value
            vars(rt.counters).update(vars(kept))  # in place: Runtime.loop holds this object
            rt.sched_step, rt.bad_steps = sched_step, bad_steps
            reward = (before - after) / max(before, 1e-12)
            rewards[task] = reward if math.isfinite(reward) else 0.0  # a diverged probe says nothing useful
        self.reward_sum, self.weights = dynamix_update(self.prior, self.reward_sum, rewards, eta=m.dynamix_eta,
                                                       discount=m.dynamix_discount)
        self.loader.set_weights({t: w for t, w in self.weights.items() if w > 0})
        c = self.compute
        c["updates"] += 1
        c["probe_tokens"] += probe_tokens
        c["probe_flops"] += probe_tokens * rt.flops_per_token
        c["eval_tokens"] += sample_tokens * (len(self.arms) + 1)
        c["eval_flops"] += sample_tokens * (len(self.arms) + 1) * rt.flops_per_token / 3  # forward only
        self.trajectory.append(self._record(before, rewards))
        log(rt.d, f"dynamix update {c['updates']} @ step {rt.counters.step}: held-out loss {before:.4f}, weights "
                  + "  ".join(f"{t} {w:.3f}" for t, w in self.weights.items()))

    def close(self) -> None:
        for probe in self.probes.values():
            probe.close()
        if self.ring is not None:
            self.ring.clear()


def run_dynamix(rt: Runtime, loader: Any, ring: CheckpointRing, tokens: float) -> dict[str, Any]:
    """DynamixSFT for `tokens` training tokens: SFT whose mixture weights the bandit sets. Its result adds the
    bandit's trajectory (prior, then every update's rewards and weights) and the look-ahead's compute, which is
    not in "tokens"/"flops" (those are the training's, the budget every method shares)."""
    bandit = Dynamix(rt, loader)
    try:
        result = run_sft_budget(rt, loader, ring, "dynamix", tokens, step=bandit.step)
    finally:
        bandit.close()
    extra = bandit.compute["probe_flops"] + bandit.compute["eval_flops"]
    lookahead = {**bandit.compute, "tokens": bandit.compute["probe_tokens"] + bandit.compute["eval_tokens"],
                 "flops": extra, "flops_vs_training": extra / max(result["flops"], 1.0)}
    m = rt.cfg.msft
    bandit_info = {"prior": bandit.prior, "every": m.dynamix_every, "eta": m.dynamix_eta,
                   "discount": m.dynamix_discount, "trajectory": bandit.trajectory}
    return {**result, "bandit": bandit_info, "lookahead": lookahead}
