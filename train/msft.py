"""mSFT: overfitting-aware multi-task mixture search (arXiv 2603.21606), with its baselines in the same harness.

    python -m posttrain.train.msft --config configs/tiny_msft.toml                       mSFT, then the SFT baseline
    python -m posttrain.train.msft --config configs/tiny_msft.toml --msft.methods='["msft", "sft", "sro", "temperature"]'
    python -m posttrain.train.msft --config configs/tiny_msft.toml --msft.methods='["msft", "sft", "dynamix"]'

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
  - the optimizer is the config's [optim] (reference: Adam, lr 1e-5, constant, no warm-up; configs/tiny_msft.toml
    uses AdamW at a higher constant lr, as a model trained from scratch needs), recreated fresh at every stage;
  - the data position rolls back with the weights (the reference re-shuffles; here the stream is deterministic and
    resumable, and the examples seen after c_j* are seen again, by the remaining tasks' draws);
  - evaluation points are the first optimizer step at or after each multiple of Δ (so c is a little past kΔ).

Baselines (`msft.methods`), every one from the same θ0, reported with its tokens and FLOPs. The budget they share
is mSFT's training tokens (its discarded work included); DynamixSFT's look-ahead compute comes on top, reported
apart (see dynamix):
  sft          standard SFT for the tokens mSFT spent (its discarded work included); the best checkpoint by overall
               held-out accuracy;
  early_stop   per-task early stopping on the SFT run's curves: each task's accuracy at its own best checkpoint
               (an oracle needing N models; no extra training);
  sro          SRO SFT: one roll-out of C epochs records every c_i* (none for a task still at its best at C: it
               has not peaked); a re-run excludes each task at its first evaluation at or after its recorded peak
               (after an exclusion the epochs of the smaller mixture drift from the roll-out's, so this can be up
               to Δ late); the best checkpoint by overall held-out accuracy;
  temperature  SFT with mixture weights proportional to size^(1/τ) (`msft.temperature`), equal tokens.
  dynamix      DynamixSFT (arXiv 2508.12116): SFT at equal training tokens whose mixture weights a multi-armed bandit
               sets, one arm per sub-dataset (`Dynamix`). Every `msft.dynamix_every` (K) steps, before the step, every
               arm is probed by a 1-step look-ahead: one real training step (train_step: the run's loss, clipping, AdamW
               state and current lr, grad_accum micro-batches) on a batch of that sub-dataset alone, from its own stream
               (seed data.seed + 7919: the training stream is untouched); its reward is the relative fall of the
               held-out loss, (L - L') / L, L being the mean over sub-datasets of each one's response-token NLL on
               `msft.dynamix_val_rows` held-out rows each (a sample rotating through the splits); then the weights, the
               optimizer state (a CheckpointRing slot), the counters and the schedule position are put back bit-exactly.
               Rewards accumulate, R <- discount R + r, and the weights become the prior-scaled Boltzmann distribution
               p_i ∝ prior_i exp(η R_i), the prior being the mixture SFT trains on (^(1/τ) with
               `msft.dynamix_prior_tau`); a sub-dataset outside the mixture gets 0. The look-ahead's compute (probe
               steps, and 1 + N forwards of the sample per update) is the result's "lookahead" (tokens, FLOPs, and their
               ratio to the training FLOPs: N probe steps per K training steps, plus the forwards), printed under the
               table and not counted in "tokens". The weights at the start and after every update are the result's
               "bandit" trajectory, plotted in a panel of their own. Deviations and gaps: only the paper's abstract was
               reachable from here, so K = 20, η = 3, discount 0.9 and 8 rows per sub-dataset are this harness's
               choices, not the paper's values (on the tiny default, seed 0, one probe's relative reward swings by up to
               ±0.3, and with discount 1 and η = 10 the weights drifted to 0.003-4.7x their prior, which is no soft
               anchor; with η = 3 and discount 0.9, a bounded recency-weighted sum, they stayed within 0.18-2.2x; that
               run, one seed and no study, 2026-11-29: average held-out accuracy 0.695 against SFT's 0.732 and mSFT's
               0.584 at the same 0.97M training tokens, plus 0.46M look-ahead tokens, 36% of its training FLOPs), and
               whether the paper probes every arm at every update (done here: full information, N probe steps per
               update) or only the arms it samples could not be checked; the reward is relative (divided by L) so that η
               does not depend on a loss scale that falls during training; the validation data are the harness's
               held-out splits, which also select every method's checkpoint (as they drive mSFT's decisions); the bandit
               acts at step granularity (weights fixed for K steps).

Whether a mixture gives mSFT something to find is read, not judged by eye: every comparison with the SFT baseline
prints the shape of SFT's curves (plain SFT of the whole mixture; `mixture_shape`, kept in the report as
"sft_shape" and per seed in a study's study.json): each task's peak (first argmax) and the mean of its evaluations
after it, which tasks overfit (at least two evaluations after the peak, averaging at least 10 points below it: a
fall that lasts, not one dip), how many of those peak at least 0.5 epoch apart, and how many tasks are still
improving when the first has overfitted. The embedded mixture was meant for three staggered overfitting tasks and
two improving ones (what it has: below).

On the embedded default mSFT loses, and why. `configs/tiny_msft.toml` (the tiny model from scratch on the "msft"
mixture of train/synthetic.py, C = 1.5 epochs, Δ = 0.25, 4 stages, AdamW 3e-3 constant), seeds 0, 1, 2, every
method at mSFT's tokens (~0.96M), held-out accuracy of each method's selected snapshot, mean ± std (2026-11-29, torch
2.13.0+cpu, OMP_NUM_THREADS=1; `--msft.methods='["msft", "sft", "early_stop", "sro", "temperature"]'
--msft.seeds='[0, 1, 2]'`):

  method      copy  first  last  reverse  sort  vote  average
  msft        0.50  0.51   0.36  0.84     0.12  0.75  0.515 ± 0.061
  sft         0.86  0.55   0.88  0.95     0.31  0.78  0.721 ± 0.012
  sro         0.53  0.46   0.60  0.82     0.19  0.79  0.564 ± 0.115
  temperature 0.93  0.67   0.90  0.98     0.65  0.82  0.824 ± 0.011  (τ = 2; added later through result reuse)
  early_stop  0.87  0.68   0.90  0.98     0.32  0.89  0.772 ± 0.045  (an oracle: one checkpoint per task)

(The paper: mSFT 63.7 vs SFT 61.9, over 6 pretrained models x 10 benchmarks.) Three causes, each visible in the
reports (per-seed report.json and msft.png):
  1. Excluded tasks are forgotten. A task that leaves the mixture falls to ~0 held-out accuracy within 0.5-1 epoch
     of further training (at the end of stage 4 every excluded noisy task is at 0.00-0.19 in every seed): a model
     trained from scratch on these tasks keeps no skill it is not trained on, while the paper fine-tunes pretrained
     models whose excluded skills persist. mSFT's output is one snapshot, so the best overall one comes early
     (stage 2-3, before the clean tasks are learned: copy 0.38-0.66 against SFT's 0.79-0.92).
  2. Roll-backs discard 41-55% of mSFT's tokens (each exclusion throws away 0.25-1.5 of its stage's 1.5 epochs),
     and the baselines get mSFT's total, discarded work included, so SFT trains about twice the useful tokens.
  3. The noisy tasks' falls are not lasting (train/synthetic.py's tables): under plain SFT they fluctuate by 20-40
     points around a level that does not decline, so excluding a task at its peak buys little, and single-evaluation
     first-argmax also "peaks" saturated clean tasks (reverse at 0.98-1.0 was excluded in stage 4 of seeds 0 and 1).
SRO shares cause 1 (the tasks it excludes at their roll-out peaks are forgotten too; its best snapshot comes at 1.75-
4.26 epochs) and gets closer to SFT when it excludes only one task (seed 0: 0.697 vs 0.732). Temperature sampling
is the best method here (0.836, 0.818, 0.817; above even the per-task oracle on SFT's curves): the configured mixture
draws the three small noisy sets about 10 and 4 times per epoch on purpose, and weights proportional to the square
roots of the sizes draw them 1.7-2.4x less often and sort about twice as often (sort 0.65 against 0.31).
The fall test of the pretrained study below (`--msft.min_fall=0.05`) changes little here (2026-12-06, seeds 0, 1, 2,
msft, sft, early_stop): mSFT 0.525 ± 0.051 (0.584, 0.500, 0.492) against SFT 0.721 ± 0.012 at its tokens. Only
vote, first and last are excluded now and 17-50% of the tokens are discarded, but cause 1 stays: the excluded tasks
are forgotten, so the best overall snapshot comes in stage 2 or 3.

From a pretrained base mSFT trails SFT a little, and temperature sampling and SRO are ahead of both.
`configs/tiny_msft_pretrained.toml` (`msft.base_config`): each seed first trains the tiny model for 2 epochs on clean
rows of copy, reverse, sort and vote ("msft-base", no prompt shared with the fine-tuning set), then fine-tunes it on
"msft-flaws" (vote, which the base knows, and first and last, which it was never asked for, each with a systematic label
flaw whose held-out fall lasts; train/synthetic.py has SFT's curves), AdamW 3e-4 constant, C = 1.0 epoch, Δ = 0.25, 4
stages; every method from that base at mSFT's tokens (0.58-0.73M), seeds 0, 1, 2, mean ± std (2026-12-06, torch
2.13.0+cpu, OMP_NUM_THREADS=1; `python -m posttrain.train.msft --config configs/tiny_msft_pretrained.toml --msft.methods='[...all
six...]' --msft.seeds='[0, 1, 2]'`):

  method       copy  first  last  reverse  sort  vote  average
  msft         0.89  0.85   0.85  1.00     0.46  0.80  0.808 ± 0.072   (0.844, 0.725, 0.856)
  sft          0.94  0.80   0.82  0.99     0.66  0.74  0.825 ± 0.055   (0.844, 0.763, 0.868)
  sro          0.88  0.83   0.89  0.97     0.54  0.99  0.849 ± 0.090   (0.909, 0.746, 0.892)
  temperature  0.95  0.79   0.83  1.00     0.85  0.74  0.859 ± 0.081   (0.908, 0.766, 0.904; τ = 2)
  dynamix      0.92  0.87   0.87  0.99     0.61  0.76  0.839 ± 0.084   (+ 0.28-0.33M look-ahead tokens, 34-35% FLOPs)
  early_stop   0.95  0.87   0.87  1.00     0.78  0.99  0.908 ± 0.045   (an oracle: one checkpoint per task)

mSFT is 1.7 points behind SFT (0.0, -3.8 and -1.2 in seeds 0, 1, 2; the paper's average gain is +1.8), and the
reports show why. Its output is an early snapshot: the best overall held-out accuracy of all its stages comes in stage
1 (seeds 0 and 1: at c = 1.00, where seed 0's is SFT's own best, and at 0.75) or stage 2 (seed 2, at 0.75), because
each later stage loses more on the tasks it has excluded than it gains on the rest:
  1. A task excluded while it is still being learned is forgotten. First and last reach 0.75-0.85 within a stage, are
     excluded at that peak (first in stage 2 of seed 0, last in stage 2 of seed 2), and fall to 0.15-0.27 over the
     next stage of training on the rest; vote, which the base knows, keeps 0.87-1.00 once excluded in seed 0 but
     drifts to 0.76-0.88 in seed 2.
  2. Vote peaks at c = 0 (it falls from the first step), so its exclusion in stage 1 of seeds 0 and 2 rolls back to
     the base and discards the whole first window; with every other roll-back, 62-69% of mSFT's tokens are discarded,
     and sort, which needs them, ends at 0.46 (SFT 0.66).
  3. The first argmax also "peaks" saturated clean tasks: reverse (0.98-1.00 within 0.25-0.75 epoch) is excluded in
     stage 1 of seed 1, stage 4 of seed 0 and stage 3 of seed 2, then drifts (to 0.54 by the end of seed 1).
What it is for works: vote is excluded at its peak in every seed, and the output keeps it at 0.68-0.87 where SFT's best
snapshot has 0.63-0.87. SRO, which excludes vote at its roll-out peak (c = 0-0.25) and then trains the rest without a
roll-back, keeps vote at 0.98-0.99 and is ahead of SFT in seeds 0 and 2 (+6.5, +2.4) and behind in seed 1 (-1.7, where
its roll-out also excluded reverse and first, and sort stays at 0.22). Temperature sampling (weights proportional to
the square roots of the sizes) draws vote 2.2x less often and sort twice as often as the configured mixture, so sort
learns most (0.85): the best method but the oracle, within one standard deviation of the rest. The per-task oracle
(0.908) shows what excluding each task at its own peak could buy, if excluded tasks kept their skill.

The fall test (`msft.min_fall = 0.05`, a deviation: a task has peaked only if its accuracy at C is more than 5 points
below its peak, about twice the standard error of the difference of two evaluations of 500 rows; chosen before the runs
on the set's first version, not tuned) stops the exclusions of saturated tasks and leaves mSFT level with SFT
(2026-12-06, seeds 0, 1, 2, `--msft.min_fall=0.05 --msft.methods='["msft", "sft", "early_stop", "sro"]'`, bases and
settings as above; every method at mSFT's tokens, 0.73M):

  method       copy  first  last  reverse  sort  vote  average
  msft         0.90  0.85   0.87  0.99     0.50  0.90  0.833 ± 0.030   (0.844, 0.799, 0.856)
  sft          0.95  0.83   0.80  0.99     0.67  0.74  0.828 ± 0.049   (0.844, 0.773, 0.868)
  sro          0.90  0.81   0.90  1.00     0.55  0.99  0.856 ± 0.082   (0.915, 0.763, 0.892)
  early_stop   0.96  0.88   0.87  1.00     0.80  0.99  0.916 ± 0.036   (an oracle: one checkpoint per task)

mSFT now excludes only flawed tasks (vote in stage 1 of every seed, at c = 0-0.25, then first or last in stage 2;
nothing passes the test in its later stages), discards 34-53% of its tokens (62-69% under the reference rule), and is
+0.0, +2.6 and -1.2 points against SFT in seeds 0, 1, 2. Causes 1 and 2 remain: its output is the stage-1 snapshot in
seed 0 (SFT's own best) and comes in stage 2 or 3 in the others, and sort trails (0.50 against 0.67). SRO with the same
test is ahead of SFT in seeds 0 and 2 (+7.1, +2.4) and behind in seed 1 (-1.0: its roll-out also excluded first at
0.75, which then falls to 0.67). Within these longer windows (3.52-3.53 epochs) SFT's curves meet the three-peak
criterion in every seed (vote, last and first overfit at 0, 1.00 and 2.25 epochs; at 0.25, 1.00 and 3.26; at 0, 1.26
and 2.25). The test reads one evaluation, the last of the window, so one dip at C counts as a fall. Reading the mean of
the evaluations after the peak instead (as `mixture_shape` does over a whole SFT curve) is no clear improvement:
replayed on the first version's fall-test study (12 stages with their recorded curves, min_fall 0.05), it changes 2
decisions, both ways. It misses vote's steady fall in stage 1 of seed 0 (1.00 -> 0.97, 0.95, 0.94, 0.93: the mean after
is under 5 points below, the end 7) and counts the swings of first and last in stage 2 of seed 2 (first 0.90 at 0.51,
then 0.81 and 0.87; last 0.89, then 0.68 and 0.86), so it is not built.

The set's second version (last's trigger on digits 1 and 2, sharing digit 2 with first's: both flaws learned together in
one seed of three) gave the same ranking (its tables: train/msft.py at commit 7a6a7b4): mSFT 0.832 ± 0.059, SFT 0.843 ±
0.055, SRO 0.845, temperature 0.878, DynamixSFT 0.842, the oracle 0.921; with the fall test, mSFT 0.845 ± 0.050 against
SFT 0.844 ± 0.053 and SRO 0.892 ± 0.045, SRO ahead of SFT in every seed.

The set's first version (parity flaws, first and last peaking together and falling 7-12 points; train/synthetic.py) gave
the same ranking (its table: train/msft.py at commit 103c9fa): mSFT 0.827 ± 0.089, SFT 0.828 ± 0.061, SRO 0.830,
temperature 0.859, DynamixSFT 0.835, the oracle 0.903. The fall test helped mSFT there, within noise: no saturated
clean task was excluded, 40-68% of the tokens were discarded (67-80% under the reference rule), and mSFT reached 0.854
± 0.079 against SFT's 0.840 ± 0.040 at its tokens (SRO 0.852, the oracle 0.910): the paper's direction, within one
standard deviation. What still cost it there: the tasks excluded earlier drift while the rest trains (vote 0.99 ->
0.12 by the end of stage 4 in seed 1).

An earlier version of this set (its base knew all six tasks; AdamW 1e-3) had mSFT 0.875 ± 0.011 against SFT 0.856 ±
0.012 (SRO 0.871, temperature 0.872, DynamixSFT 0.858, the oracle 0.938), but for a reason that says little about the
method: every flawed task was at its best at c = 0, so mSFT rolled back to c = 0 at each exclusion and never kept a step
trained on a flaw (its table: train/msft.py at commit 39007b9).

Does this set have the shape mSFT is built for? Over 5 epochs of plain SFT, yes, in every seed (`mixture_shape` on
train/synthetic.py's tables: vote, last and first overfit at 0, 1.00 and 2.25 epochs; at 0.25, 1.00 and 4.50; at 0, 1.26
and 2.25; seed 1's third is a late swing of a first that plateaus from 0.75 epoch on). Within the study's windows
(mSFT's tokens: 3.52, 2.83 and 3.23 epochs; the same runs' beginnings) only in seed 0: in seed 1 first overfits at 0.75
(0.85, then 0.74 on average), 0.25 epoch before last; in seed 2 first's evaluations after its peak at 2.25 average 9
points below it; in the fall-test study's windows (3.52-3.53 epochs), in every seed. So mSFT now meets a mixture with
three staggered lasting falls, and still does not gain: what limits it here is what its exclusions cost (forgetting,
discarded windows, saturated tasks read as peaks), not a missing signal. The set's second version met the criterion over
5 epochs in seeds 0 and 1 (first and last learned their flaws together in seed 2), the first version in none of its 6
study seeds (at most two staggered overfitting tasks, vote and last; one seed first read as meeting it had first's peak
one evaluation before the end of its window, 0.85 then 0.71, inside the 10-20 point swings its curve had before: hence
`min_after`).

Reads top to bottom: config -> `decide` (pure) -> the mSFT driver -> baselines -> report and plot -> main.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from posttrain.core.config import flatten
from posttrain.core.distributed import reshard
from posttrain.core.ring import CheckpointRing
from posttrain.train.data import PackedBatch, data_digest, pack_rows
from posttrain.train.runtime import RunConfig, Runtime, entry_point, global_sum, log, seed_config, token_logprobs
from posttrain.train.sft import loader_step, make_loader, train_once, train_step

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
    # DynamixSFT (run_dynamix; the paper's own values were not reachable here, see the docstring)
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


# ---------------------------------------------------------------------------------------------- the decision


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


# ---------------------------------------------------------------------------------------------- evaluation


def micro_accuracy(rt: Runtime, results: dict[str, dict[str, float]]) -> float:
    """Held-out accuracy over all evaluated examples of every task (tasks weigh by their held-out sizes)."""
    sizes = {t: len(rt.data.heldout_rows[t]) for t in results}
    if rt.cfg.eval.max_examples:
        sizes = {t: min(n, rt.cfg.eval.max_examples) for t, n in sizes.items()}
    return sum(results[t]["accuracy"] * sizes[t] for t in results) / max(sum(sizes.values()), 1)


def weights_digest(rt: Runtime) -> float:
    """Sum of squares of every weight (float64, all ranks): recorded at each evaluation, compared after each
    restore, so the report shows that a roll-back restored exactly the snapshot it names."""
    reshard(rt.model)
    local = sum(float(p.detach().to_local().double().pow(2).sum()) for p in rt.model.parameters())
    return global_sum(rt.d, local)[0]


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


# ---------------------------------------------------------------------------------------------- the runs


def _open(cfg: MSFTConfig, name: str, method: str) -> tuple[Runtime, Any, CheckpointRing]:
    """A fresh run from θ0 under <out_dir>/<name> (no resume, no export): runtime, loader, ring. The temperature
    baseline's mixture weights come from the sub-dataset sizes."""
    sub = replace(cfg, out_dir=str(Path(cfg.out_dir) / name))
    sub.checkpoint = replace(cfg.checkpoint, resume=False, export_hf=False)
    rt = Runtime(sub)
    if method == "temperature":
        rt.cfg.data = replace(sub.data, weights=temperature_weights(
            {t: len(rt.data.train[t]) for t in rt.data.tasks}, cfg.msft.temperature))
    loader = make_loader(rt)
    rt.resume(loader)  # a fresh start (resume=False): opens the metrics log
    return rt, loader, _ring(rt)


def _close(rt: Runtime, loader: Any, ring: CheckpointRing) -> None:
    rt.finish(loader, finished=True)
    loader.close()
    ring.clear()


def _ring(rt: Runtime) -> CheckpointRing:
    reshard(rt.model)
    per = _local_bytes(list(rt.model.parameters()))
    gb = rt.cfg.msft.ring_gb
    capacity = int(gb * 2**30) if gb > 0 else per * (len(rt.data.tasks) + 2)
    return CheckpointRing(capacity, device="cpu")


def _train_until(rt: Runtime, loader: Any, frac: Callable[[], float], evaluate: Callable[[], Any],
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
        _train_until(rt, loader, lambda: rel() / m.budget_epochs + 1e-9, ev, rel, m.eval_every)
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
            meta = ring.restore(key, rt.model)
            record["restored_weights"], record["point_weights"] = weights_digest(rt), meta["point"]["weights"]
            loader.load_state_dict(meta["data"])
            if len(active) > 1:  # the last task is not excluded from the loader: the run ends here
                loader.exclude(excluded)
            active.remove(excluded)
            carry = meta["point"]["eval"]
            record["discarded_tokens"] = rt.counters.tokens - meta["point"]["tokens"]
            record["rollback_step"] = meta["point"]["step"]
        stages.append(record)
        log(rt.d, f"mSFT stage {stage}: peaks {({t: round(c, 3) for t, c in peaks.items()})} -> "
                  + (f"exclude {excluded}, roll back to c = {c_star:.3f}" if excluded else "no peak before C"))
    return _result(rt, ring, tracker, "msft", stages=stages)


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
    _train_until(rt, loader, lambda: rt.counters.tokens / tokens if tokens > 0 else 1.0, evaluate,
                 lambda: loader.progress, rt.cfg.msft.eval_every, step)
    return _result(rt, ring, tracker, method)


def _result(rt: Runtime, ring: CheckpointRing, tracker: Tracker, method: str, **extra: Any) -> dict[str, Any]:
    """Restore the best-overall snapshot and summarise the run."""
    overall, key = tracker.best_overall
    point = ring.restore(key, rt.model)["point"]
    return {"method": method, "selected": {"step": point["step"], "epoch": point["epoch"], "stage": point["stage"],
                                           "c": point["c"], "overall": overall, "weights": point["weights"],
                                           "restored_weights": weights_digest(rt),
                                           "accuracy": {t: r["accuracy"] for t, r in point["eval"].items()}},
            "tokens": rt.counters.tokens, "flops": rt.counters.flops, "optimizer_steps": rt.counters.optimizer_steps,
            "curve": tracker.curve, **extra}


def early_stop(sft: dict[str, Any]) -> dict[str, Any]:
    """Per-task early stopping on an SFT run's curve: each task at its own best evaluation (no training)."""
    tasks = list(sft["curve"][0]["eval"])
    best = {t: max(p["eval"][t]["accuracy"] for p in sft["curve"]) for t in tasks}
    return {"method": "early_stop", "selected": {"accuracy": best, "overall": None, "note": "one checkpoint per task"},
            "tokens": sft["tokens"], "flops": sft["flops"], "curve": []}


def temperature_weights(sizes: dict[str, int], tau: float) -> dict[str, float]:
    return {t: n ** (1.0 / tau) for t, n in sizes.items()}


# ---------------------------------------------------------------------------------------------- DynamixSFT


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
        b = batch.to(rt.d.device)
        logp = token_logprobs(rt.model, b)
        scored = b.targets != -100
        for i in range(n):  # masked sums, not bincount: its CUDA kernel adds in no fixed order
            mine = scored & (b.task_ids == i)
            sums[i] += -logp[mine].double().sum()
            sums[n + i] += mine.sum()
        sums[2 * n] += (b.task_ids >= 0).sum()
    from posttrain.core.distributed import forget_forwards

    forget_forwards(rt.model)  # no backward follows these forwards
    totals = global_sum(rt.d, *sums.tolist())
    losses = [totals[i] / max(totals[n + i], 1.0) for i, t in enumerate(rt.data.tasks) if t in tasks]
    return sum(losses) / len(losses), totals[2 * n]


def _local_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of this rank's part of each tensor (a DTensor's local shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


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
        reshard(rt.model)
        state = [v for st in rt.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        need = _local_bytes(list(rt.model.parameters()) + state)
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
        ring.snapshot("probe", rt.model, optimizer)
        ring.fence()  # on CUDA the copy is asynchronous: the probe step must not write the weights before it ends
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


# ---------------------------------------------------------------------------------------------- one command


def run(cfg: MSFTConfig) -> dict[str, Any]:
    """One comparison (`run_one`), or one per seed of `msft.seeds` and their mean ± std (written to
    <out_dir>/study.json and printed)."""
    if not cfg.msft.seeds:
        return run_one(cfg)
    reports, shapes = {}, {}
    for seed in cfg.msft.seeds:
        sub = seed_config(cfg, seed, "msft")
        done = finished_report(sub)
        if done is not None:  # an interrupted study resumes; seeds may also run as separate processes first
            if _is_main():
                print(f"seed {seed}: reusing {sub.out_dir}/report.json (same config)", flush=True)
        report = done or run_one(sub)
        reports[seed] = report["summary"]
        shapes[seed] = sft_shape(report.get("runs", {}))  # from the curves: reports from before it have them too
    study = aggregate(reports)
    if _is_main():
        (Path(cfg.out_dir) / "study.json").write_text(json.dumps({"seeds": reports, "mean_std": study,
                                                                  "sft_shape": shapes}, indent=1))
        print(format_study(study, cfg.msft.seeds), flush=True)
        for seed, shape in shapes.items():
            if shape:
                print(f"seed {seed}, the SFT baseline's curves:\n{format_shape(shape)}", flush=True)
    return study


def _is_main() -> bool:
    """Rank 0 (the process group may not exist yet when every seed's report is reused)."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


# Parameters only one method reads: another method's result does not depend on them.
METHOD_PARAMS = {"temperature": ("temperature",),
                 "dynamix": ("dynamix_every", "dynamix_eta", "dynamix_discount", "dynamix_prior_tau",
                             "dynamix_val_rows")}


def study_key(cfg: MSFTConfig, method: str | None = None) -> dict[str, Any]:
    """What makes two runs the same experiment: the whole config but where it writes (init.hf_checkpoint too when
    msft.base_config derives it from out_dir), and a digest of the rows it reads (train.data.data_digest). For one
    method's result (`method`), also not which methods or seeds the comparison has, nor the parameters only other
    methods read, so a comparison that adds a method (or changes τ) reuses the other methods' results."""
    skip = {"out_dir", "checkpoint.dir"} | ({"init.hf_checkpoint"} if cfg.msft.base_config else set())
    if method is not None:
        skip |= {"msft.methods", "msft.seeds"}
        skip |= {f"msft.{p}" for m, params in METHOD_PARAMS.items() if m != method for p in params}
    key = {k: v for k, v in flatten(cfg).items() if k not in skip}
    key["data.digest"] = data_digest(cfg.data.path, cfg.data.synthetic, cfg.data.seed)  # the rows, not their name
    return key


def saved_by(cfg: MSFTConfig, path: Path, method: str | None = None) -> dict[str, Any] | None:
    """The JSON at `path` when this exact config wrote it (its "key" is this config's study_key, of `method` for
    one method's result; a config change means a new run). Every rank reads it: out_dir must be visible to all of
    them, as it is on one node."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("key") == json.loads(json.dumps(study_key(cfg, method))) else None


def with_base(cfg: MSFTConfig, *, train: bool = True) -> MSFTConfig:
    """`cfg` starting from its pretrained base (msft.base_config): init.hf_checkpoint = <out_dir>/base/hf, which
    is trained first when missing (`train`), with the run's seeds. Unchanged without a base_config."""
    m = cfg.msft
    if not m.base_config:
        return cfg
    if cfg.init.hf_checkpoint:
        raise ValueError(f"msft.base_config ({m.base_config}) trains the base the run starts from; "
                         f"init.hf_checkpoint ({cfg.init.hf_checkpoint}) names another: give one of them")
    base = Path(cfg.out_dir) / "base"
    if train:
        train_once(m.base_config, [*m.base_overrides, f"--train.seed={cfg.train.seed}", f"--data.seed={cfg.data.seed}"],
                   base, who="msft")
    return replace(cfg, init=replace(cfg.init, hf_checkpoint=str(base / "hf")))


def finished_report(cfg: MSFTConfig) -> dict[str, Any] | None:
    """<out_dir>/report.json when it was written by this exact config (the base's path, which with_base derives
    from out_dir, is not in the key)."""
    return saved_by(cfg, Path(cfg.out_dir) / "report.json")


def aggregate(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """{method: {task or "average"/"tokens": (mean, std over seeds)}} from per-seed summaries."""
    import statistics

    out: dict[str, Any] = {}
    for method in next(iter(reports.values())):
        rows = [r[method] for r in reports.values()]
        keys = list(rows[0]["accuracy"])
        values = {k: [row["accuracy"][k] for row in rows] for k in keys}
        values["average"] = [row["average"] for row in rows]
        values["tokens"] = [row["tokens"] for row in rows]
        if all("lookahead" in row for row in rows):  # DynamixSFT's compute besides its training tokens
            values["lookahead_tokens"] = [row["lookahead"]["tokens"] for row in rows]
        out[method] = {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in values.items()}
    return out


def format_study(study: dict[str, Any], seeds: Sequence[int]) -> str:
    keys = [k for k in next(iter(study.values())) if k != "tokens"]
    head = f"{'method':<12}" + "".join(f"{k:>14}" for k in keys) + f"{'tokens':>16}"
    lines = [f"mean ± std over seeds {list(seeds)}", head, "-" * len(head)]
    for method, row in study.items():
        lines.append(f"{method:<12}" + "".join(f"{row[k][0]:>8.3f}±{row[k][1]:.3f}" for k in keys)
                     + f"{row['tokens'][0]:>16,.0f}")
    for method, row in study.items():
        if "lookahead_tokens" in row:
            lines.append(f"{method}: + {row['lookahead_tokens'][0]:,.0f} look-ahead tokens (mean), not in its tokens")
    return "\n".join(lines)


def run_one(cfg: MSFTConfig) -> dict[str, Any]:
    """Every method of `msft.methods` from the same θ0 (the base, with msft.base_config), one after another in
    this process; returns the report."""
    cfg = with_base(cfg)
    results: dict[str, dict[str, Any]] = {}
    out = Path(cfg.out_dir)
    budget: float | None = None  # the tokens mSFT spent: every other method's budget
    order = [m for m in METHODS if m in cfg.msft.methods]
    if "msft" not in order:
        raise ValueError("msft.methods must include 'msft': it sets the token budget of the others")
    if not cfg.eval.generate:
        raise ValueError("msft needs eval.generate = true: held-out accuracy picks every method's best-overall "
                         "snapshot (msft.signal = 'loss' changes only how peaks are read)")
    if cfg.msft.signal == "loss" and not cfg.eval.loss:
        raise ValueError("msft.signal = 'loss' reads held-out loss: set eval.loss = true")
    for method in order:
        if method == "early_stop":
            continue
        saved = saved_by(cfg, out / method / "result.json", method)
        if saved is not None:  # an interrupted comparison resumes after its last finished method
            results[method] = saved["result"]
            budget = saved["result"]["tokens"] if method == "msft" else budget
            if _is_main():
                print(f"{method}: reusing {out / method / 'result.json'} (same config)", flush=True)
            continue
        if method == "sro":  # its roll-out first, so that two models are never held at once
            sro_peaks, rollout_tokens = _rollout_peaks(cfg)
        rt, loader, ring = _open(cfg, method, method)
        log(rt.d, f"=== {method} ===")
        if method == "msft":
            results[method] = run_msft(rt, loader, ring)
            budget = results[method]["tokens"]
        elif method == "sro":
            results[method] = run_sft_budget(rt, loader, ring, method, budget - rollout_tokens, exclude_at=sro_peaks)
            results[method].update(recorded_peaks=sro_peaks, rollout_tokens=rollout_tokens)
            results[method]["tokens"] += rollout_tokens
        elif method == "dynamix":
            results[method] = run_dynamix(rt, loader, ring, budget)
        else:
            results[method] = run_sft_budget(rt, loader, ring, method, budget)
        if method == "msft" and cfg.checkpoint.export_hf:
            rt.export(out / "hf")
        _close(rt, loader, ring)
        if _is_main():
            (out / method).mkdir(parents=True, exist_ok=True)
            (out / method / "result.json").write_text(json.dumps({"key": study_key(cfg, method),
                                                                  "result": results[method]}))
    if "early_stop" in cfg.msft.methods and "sft" in results:
        results["early_stop"] = early_stop(results["sft"])
    report = make_report(cfg, results)
    if _is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        print(format_table(report), flush=True)
        if report["sft_shape"]:
            print(f"the SFT baseline's curves:\n{format_shape(report['sft_shape'])}", flush=True)
        plot(report, out / "msft.png")
    return report


def _rollout_peaks(cfg: MSFTConfig) -> tuple[dict[str, float], float]:
    """SRO's roll-out: plain SFT for C epochs from θ0, recording each task's first-argmax peak (in epochs of the
    mixture). A task that has not peaked by `decide`'s test (`peaked_at`: e.g. still at its best at the roll-out's
    last point) gets no recorded peak and is never excluded. Returns the peaks and the tokens the roll-out cost
    (they count in SRO's budget)."""
    rt, loader, ring = _open(cfg, "sro_rollout", "sro")
    tracker = Tracker(rt, ring, loader, "sro_rollout")
    tracker.evaluate()
    _train_until(rt, loader, lambda: loader.progress / cfg.msft.budget_epochs + 1e-9,
                 lambda: tracker.evaluate(c=loader.progress), lambda: loader.progress, cfg.msft.eval_every)
    points = [p["epoch"] for p in tracker.curve]
    peaks = {}
    for t in rt.data.tasks:
        k = peaked_at([signal_of(cfg, p["eval"][t]) for p in tracker.curve], margin=cfg.msft.margin,
                      skip_flat=cfg.msft.skip_flat, min_fall=cfg.msft.min_fall)  # as in decide
        if k is not None:
            peaks[t] = points[k]
    tokens = rt.counters.tokens
    _close(rt, loader, ring)
    return peaks, tokens


# ---------------------------------------------------------------------------------------------- report


def mixture_shape(points: Sequence[float], scores: dict[str, Sequence[float]], *, min_fall: float = 0.10,
                  min_gap: float = 0.5, min_after: int = 2, slack: float = 0.02) -> dict[str, Any]:
    """Whether a mixture gives mSFT something to find, read off one plain-SFT curve (points: epochs; scores[task]:
    held-out accuracy there). Per task: its peak (first argmax: epoch and score), the mean and the last of the
    evaluations after it, and whether it overfit: at least `min_after` evaluations follow the peak and they average
    at least `min_fall` below it (a fall that lasts, not one dip: a single evaluation after the peak cannot tell
    the two apart). Then "staggered": the most
    overfitting tasks whose peaks are pairwise at least `min_gap` epochs apart (earliest first; taking the earliest
    peak and then each next one far enough from the last taken is optimal), less `slack` because evaluation points
    are a little past each multiple of Δ; and "improving": the tasks whose own peak comes after the first overfit
    peak (still improving when the first task has overfitted). `meets` is the criterion the mSFT mixture was
    designed for: at least three staggered and at least two improving."""
    check_curves("mixture_shape", points, scores)
    if min_after < 1:
        raise ValueError(f"mixture_shape: min_after={min_after}: a fall needs at least one evaluation after the peak")
    tasks: dict[str, dict[str, Any]] = {}
    for task, s in scores.items():
        k = peak_index(s)
        after = list(s[k + 1:])
        mean_after = sum(after) / len(after) if after else None
        tasks[task] = {"peak_epoch": points[k], "peak": s[k], "mean_after": mean_after, "last": s[-1],
                       "overfit": len(after) >= min_after and s[k] - mean_after >= min_fall - 1e-9}
    staggered: list[str] = []
    for task in sorted((t for t in tasks if tasks[t]["overfit"]), key=lambda t: (tasks[t]["peak_epoch"], t)):
        if not staggered or tasks[task]["peak_epoch"] - tasks[staggered[-1]]["peak_epoch"] >= min_gap - slack:
            staggered.append(task)
    improving = [t for t in tasks if tasks[t]["peak_epoch"] > tasks[staggered[0]]["peak_epoch"]] if staggered else []
    return {"epochs": points[-1], "min_fall": min_fall, "min_gap": min_gap, "min_after": min_after, "tasks": tasks,
            "staggered": staggered, "improving": improving, "meets": len(staggered) >= 3 and len(improving) >= 2}


def format_shape(shape: dict[str, Any]) -> str:
    """Three lines: the curve's length, each task's peak and its fall, and the verdict."""
    parts = []
    for t, p in sorted(shape["tasks"].items(), key=lambda kv: (kv[1]["peak_epoch"], kv[0])):
        fall = f" -> {p['mean_after']:.2f}" if p["mean_after"] is not None else ""
        parts.append(f"{t} {p['peak']:.2f}@{p['peak_epoch']:.2f}{fall}{' overfit' if p['overfit'] else ''}")
    staggered = ", ".join(f"{t}@{shape['tasks'][t]['peak_epoch']:.2f}" for t in shape["staggered"]) or "none"
    return (f"  plain SFT of the whole mixture for {shape['epochs']:.2f} epochs\n"
            f"  peak@epoch -> mean after it: {'; '.join(parts)}\n"
            f"  overfit (>= {shape['min_after']} evaluations after the peak, averaging >= "
            f"{shape['min_fall']:.2f} below it) at times >= {shape['min_gap']} epoch "
            f"apart: {staggered}; still improving then: {len(shape['improving'])}; "
            f"{'meets' if shape['meets'] else 'misses'} the mSFT mixture criterion (3 staggered, 2 improving)")


def sft_shape(results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """mixture_shape of the SFT baseline's curve (plain SFT of the whole mixture), when it ran."""
    if "sft" not in results or not results["sft"]["curve"]:
        return None
    curve = results["sft"]["curve"]
    return mixture_shape([p["epoch"] for p in curve],
                         {t: [p["eval"][t]["accuracy"] for p in curve] for t in curve[0]["eval"]})


def make_report(cfg: MSFTConfig, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = {}
    for method, r in results.items():
        acc = r["selected"]["accuracy"]
        rows[method] = {"accuracy": acc, "average": sum(acc.values()) / len(acc), "overall": r["selected"]["overall"],
                        "tokens": r["tokens"], "flops": r["flops"]}
        if "lookahead" in r:  # compute spent besides the training tokens (DynamixSFT's probes)
            rows[method]["lookahead"] = {k: r["lookahead"][k] for k in ("tokens", "flops", "flops_vs_training")}
    return {"config": {"budget_epochs": cfg.msft.budget_epochs, "eval_every": cfg.msft.eval_every,
                       "signal": cfg.msft.signal, "margin": cfg.msft.margin, "min_fall": cfg.msft.min_fall,
                       "seed": cfg.train.seed, "init": cfg.init.hf_checkpoint or "random"},
            "key": study_key(cfg), "summary": rows, "sft_shape": sft_shape(results), "runs": results}


def format_table(report: dict[str, Any]) -> str:
    rows = report["summary"]
    tasks = list(next(iter(rows.values()))["accuracy"])
    head = f"{'method':<12}" + "".join(f"{t:>9}" for t in tasks) + f"{'average':>9}{'tokens':>12}"
    lines = [head, "-" * len(head)]
    for method, r in rows.items():
        lines.append(f"{method:<12}" + "".join(f"{r['accuracy'][t]:>9.3f}" for t in tasks)
                     + f"{r['average']:>9.3f}{r['tokens']:>12,.0f}")
    for method, r in rows.items():
        if "lookahead" in r:
            la = r["lookahead"]
            lines.append(f"{method}: + {la['tokens']:,.0f} look-ahead tokens, {la['flops']:.3g} FLOPs "
                         f"({la['flops_vs_training']:.0%} of its training FLOPs), not in its tokens")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Per-task held-out accuracy over compute (tokens), one panel per trained method; mSFT's exclusions and
    roll-backs marked. Needs matplotlib (pip install -e '.[plot]'); without it, says so and returns."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot at {path} (pip install -e '.[plot]')", flush=True)
        return
    runs = [r for r in report["runs"].values() if r["curve"]]
    bandits = [r for r in runs if r.get("bandit")]  # DynamixSFT: one more panel, its mixture weights
    panels = len(runs) + len(bandits)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], runs):
        tasks = list(r["curve"][0]["eval"])
        for i, t in enumerate(tasks):
            color = f"C{i}"
            segments: list[list[tuple[float, float]]] = [[]]
            for p in r["curve"]:
                if segments[-1] and p["c"] == 0.0 and p["stage"] > 1:
                    segments.append([])  # a new stage starts from the roll-back point
                segments[-1].append((p["tokens"], p["eval"][t]["accuracy"]))
            for k, seg in enumerate(segments):
                ax.plot(*zip(*seg), color=color, label=t if k == 0 else None, lw=1.4)
        for s in r.get("stages", []):
            if s["excluded"]:
                ax.axvline(s["tokens_end"], color="grey", ls=":", lw=0.8)
                ax.annotate(f"−{s['excluded']}", (s["tokens_end"], 1.0), fontsize=8, rotation=90, va="top")
        ax.set_title(f"{r['method']} (selected: overall {r['selected']['overall']:.3f})")
        ax.set_xlabel("tokens trained (discarded included)")
        ax.grid(alpha=0.3)
    for ax, r in zip(axes[0][len(runs):], bandits):
        points = r["bandit"]["trajectory"]
        for i, t in enumerate(points[0]["weights"]):
            ax.step([p["tokens"] for p in points] + [r["tokens"]],
                    [p["weights"][t] for p in points] + [points[-1]["weights"][t]], where="post", color=f"C{i}")
        ax.set_title(f"{r['method']}: mixture weights (bandit)")
        ax.set_xlabel("tokens trained")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return entry_point(run, MSFTConfig, argv)


if __name__ == "__main__":
    main()
