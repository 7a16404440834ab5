"""RL with verifiable rewards (GRPO and its variants), one process or many (torchrun), CPU or GPU.

    python -m posttrain.train.grpo --config configs/tiny_grpo.toml [--section.key=value ...]
    torchrun --standalone --nproc_per_node=2 -m posttrain.train.grpo --config configs/tiny_grpo.toml

One step, top to bottom (`grpo_step`):
  1. prompts   the next `grpo.prompts_per_step` prompts of the global stream (a seeded permutation per epoch of the
               prompt pool: a JSONL or Parquet file or a save_to_disk folder `grpo.prompts`, read through the
               layout `grpo.prompts_columns`, else the training rows of [data] without their response),
               the same on every rank; rendered with the chat template. They are cut into `rollout_shards` equal
               contiguous shards (default: one per rank); each rank rolls out its own shard.
  2. rollout   G = `grpo.group_size` completions per prompt from the current policy (core/sampler.generate, the
               in-process sampler), seeded by (train.seed, global step, shard): ranks never draw the same noise, a
               resumed run draws what the uninterrupted one drew, and one process with rollout_shards = 2 draws
               exactly what 2 ranks draw (the test of the distributed path).
     personas  with `persona.mode = "permix"` (PerMix-RLVR), each prompt of the step is then asked under a persona
               drawn by train/persona_mix.PersonaMixer from `persona.ratios` and seeded by (train.seed, global step):
               no persona, a training persona of `persona.pool` that is not role-play (task-aligned, neutral,
               unhelpful) on the verifiable prompt, or a role-play request (a role-play persona, on a prompt of
               `persona.roleplay_prompts` when given, else on the verifiable prompt). The persona's text replaces
               the prompt's system message. `mode = "none"` (default) is plain RLVR: prompts as they are.
  3. rewards   in a background thread, overlapping step 4: each row's task checker (eval/checkers.check_rows; math
               through eval.verify's worker pool), an optional format reward (a regex the whole response must
               match), optional reward functions ("module:function" -> weight, called per completion as
               fn(prompt, response, answer) -> float), persona fidelity (the fraction of the persona's checkable
               constraints met, eval/personas.fidelity, at `persona.fidelity_weight`; only for personas that have
               constraints) and DAPO's soft overlong penalty, combined by train/rl.py. Under a persona the checker
               sees the response without the persona's opening, closing and catchphrases (personas.strip_style);
               a role-play request without an answer gets no correctness reward and does not count in accuracy. A
               checker or reward function that raises or runs past `reward_timeout_s` gives 0 for the items it did
               not score and is counted (metrics `reward_errors`, `reward_timeouts`), never fatal.
  4. log-probs old log-probs are the sampler's `raw_logprobs` (same weights, temperature 1), or recomputed with the
               no-grad fused path (`old_logprobs = "recompute"`; always when `entropy`): then the mean absolute gap
               between the two is logged. Reference log-probs only when beta > 0, from a frozen copy of the initial
               weights, sharded like the policy.
  5. advantages gathered rewards [P, G] of the global batch -> train/rl.group_advantages (+ optional batch whitening),
               the same numbers on every rank; this rank keeps its rows.
  6. update    `iterations` (mu) passes over the rollouts, each in `mini_batches` optimizer steps; a mini-batch is
               split into micro-batches of `micro_batch_seqs` sequences, sorted by length so padding stays small
               (sequences are not packed: the loss is per sequence). The loss is kernels/grpo.linear_grpo_loss on the
               completion positions' hidden states, run inside the lm-head module call (`model(..., head_loss=)`,
               so FSDP2 gathers the head weight): no [T, V] logits. Every loss type, clipping and importance-sampling
               level of the kernel is available.

Loss scaling across micro-batches and ranks (FSDP2 averages gradients over ranks, so each rank's loss is scaled by
world_size where a global sum is meant): "grpo" and "dr_grpo" are means over the sequences of the global mini-batch
(each micro-batch's kernel loss is scaled by its share of them), "dapo" divides the token sum by the global active
token count (passed as the kernel's num_tokens), "bnpo" averages the per-micro-batch token means (so it depends on
the micro-batch layout, as it does in TRL). Training log-probs use `grpo.temperature` (1 by default), the
distribution the rollouts were drawn from.

Every optimizer step is one global step of the runtime (train/runtime.py), so one rollout advances the step by
iterations * mini_batches; schedule, logging, checkpoint and stop points must be multiples of that. Checkpoints fall
between rollouts and hold the prompt stream's position, the counters and the evaluation history; the rollout RNG is
(seed, step, shard), so it resumes with them. Held-out evaluation (greedy, each row's checker) every
`grpo.eval_every_steps` steps and at the end; HF export at the end.

Not here: the RL formulas (train/rl.py), the kernels (kernels/grpo.py, kernels/logprob.py), sampling
(core/sampler.py), checkpoints and the loop (train/runtime.py).
"""

from __future__ import annotations

import importlib
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from posttrain.core.distributed import build_model, clip_grad_norm_, forget_forwards
from posttrain.core.records import layout, read_records, source_name
from posttrain.core.sampler import generate
from posttrain.eval.checkers import check_rows, validate
from posttrain.eval.personas import CATEGORIES, NO_PERSONA, Persona, fidelity, resolve_pool, strip_style
from posttrain.kernels.grpo import linear_grpo_loss
from posttrain.kernels.logprob import linear_logprob
from posttrain.train.data import Row, load_split_dir, synthetic_rows
from posttrain.train.persona_mix import Draw, PersonaMixer
from posttrain.train.rl import ADVANTAGES, batch_normalize, combine_rewards, group_advantages, zero_variance_groups
from posttrain.train.runtime import RunConfig, Runtime, entry_point, global_sum, log, to_device
from posttrain.train.sft import train_once

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class GRPOSection:
    # -- prompts and rollouts
    prompts: str = ""  # JSONL or Parquet prompt file or a save_to_disk folder (rows: prompt or messages, answer,
    #                    checker, task); empty: [data]'s rows
    prompts_columns: str | dict[str, str] = ""  # its column layout: "gsm8k", "math", {row key = column} (see [data])
    tasks: list[str] = field(default_factory=list)  # sub-datasets to draw prompts from (default: all)
    prompts_per_step: int = 16  # global, over all ranks
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 16  # completion length limit (also dr_grpo's max_completion_length)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    rollout_shards: int = 0  # 0: one per rank; a one-process run with N reproduces N ranks' rollouts
    # -- rewards
    correct_weight: float = 1.0  # the task checker's verdict
    format_weight: float = 0.0
    format_regex: str = ""  # the whole response must match (re.fullmatch, DOTALL) for the format reward
    reward_fns: dict[str, float] = field(default_factory=dict)  # "module:function" -> weight
    reward_timeout_s: float = 10.0  # per reward source per step; what is unscored then gets 0
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last this many tokens (0: off)
    overlong_penalty: float = 1.0
    # -- advantages and loss
    advantage: str = "grpo"  # "grpo" | "dr_grpo" | "rloo"
    batch_norm: bool = False  # whiten advantages over the global batch after the group step
    loss_type: str = "dapo"  # "grpo" | "bnpo" | "dr_grpo" | "dapo"
    importance_sampling: str = "token"  # "token" | "sequence" (GSPO)
    eps_low: float = 0.2
    eps_high: float = 0.28
    delta: float = 0.0  # > 0: two-sided clip of the ratio at delta (INTELLECT-2); 0: off
    beta: float = 0.0  # KL coefficient (k3) to the frozen initial policy; > 0 builds the reference model
    old_logprobs: str = "sampler"  # "sampler" (raw_logprobs of the rollout) | "recompute" (no-grad fused forward)
    mask_truncated: bool = False  # completions cut at max_new_tokens contribute no loss (DAPO's overlong filter)
    entropy: bool = False  # log the policy's entropy at the sampled tokens (costs a no-grad forward)
    # -- optimisation
    iterations: int = 1  # mu: passes over each step's rollouts
    mini_batches: int = 1  # optimizer steps per pass (each over 1/mini_batches of the prompts)
    micro_batch_seqs: int = 64  # sequences per forward/backward, per rank
    # -- evaluation and bootstrap
    eval_every_steps: int = 0  # greedy held-out evaluation period in global steps (0: eval.every_epochs of prompts)
    eval_tasks: list[str] = field(default_factory=list)  # default: grpo.tasks, else every sub-dataset
    sft_config: str = ""  # when init.hf_checkpoint (<dir>/hf) is missing, run this SFT config into <dir> first
    sft_overrides: list[str] = field(default_factory=list)  # its --section.key=value flags, e.g. ["--train.epochs=2"]

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ValueError(f"grpo.{key}: {what}")

        need(self.advantage in ADVANTAGES, "advantage", f"{self.advantage!r} is not one of {', '.join(ADVANTAGES)}")
        need(self.loss_type in LOSS_TYPES, "loss_type", f"{self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        need(self.importance_sampling in ("token", "sequence"), "importance_sampling",
             f"{self.importance_sampling!r} is not 'token' or 'sequence'")
        need(self.old_logprobs in ("sampler", "recompute"), "old_logprobs",
             f"{self.old_logprobs!r} is not 'sampler' or 'recompute'")
        for key in ("prompts_per_step", "group_size", "max_new_tokens", "iterations", "mini_batches",
                    "micro_batch_seqs"):
            need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        need(self.group_size >= 2 or self.advantage != "rloo", "group_size", "'rloo' needs at least 2")
        need(self.temperature > 0, "temperature", "must be > 0 (greedy rollouts have no group variance)")
        need(self.old_logprobs == "recompute" or self.temperature == 1.0, "old_logprobs",
             "the sampler's raw_logprobs are at temperature 1; use 'recompute' with grpo.temperature != 1")
        need(0 <= self.overlong_buffer <= self.max_new_tokens, "overlong_buffer",
             f"must be in [0, max_new_tokens={self.max_new_tokens}]")
        need(self.beta >= 0 and self.delta >= 0, "beta", "beta and delta must be >= 0")
        if self.format_regex:
            try:
                re.compile(self.format_regex)
            except re.error as e:
                raise ValueError(f"grpo.format_regex: invalid regular expression: {e}") from None
        for name in self.reward_fns:
            need(name.count(":") == 1, "reward_fns", f"{name!r} is not 'module:function'")
        try:
            layout(self.prompts_columns)
        except ValueError as e:
            raise ValueError(f"grpo.prompts_columns: {e}") from None

    @property
    def updates_per_step(self) -> int:
        return self.iterations * self.mini_batches


@dataclass
class PersonaSection:
    """PerMix-RLVR: which personas the prompts are asked under (module docstring, step 1)."""

    mode: str = "none"  # "none": plain RLVR | "permix": every prompt under a persona drawn by `ratios`
    pool: str = ""  # training personas: a built-in pool of eval/data/personas/ ("math-train") or a pool file
    # Share of the prompts per kind (normalised): no persona / a training persona that is not role-play, on the
    # verifiable prompt / a role-play request. Half the prompts carry a robustness persona because robustness to
    # unhelpful personas is what plain RLVR does not train; a quarter stay plain so the no-persona accuracy keeps
    # its signal; a quarter are role-play so fidelity is rewarded as often as it can be lost.
    ratios: dict[str, float] = field(default_factory=lambda: {"none": 0.25, "persona": 0.5, "roleplay": 0.25})
    fidelity_weight: float = 1.0  # reward weight of fidelity (fraction of the persona's constraints met, in [0, 1])
    roleplay_prompts: str = ""  # a prompt file of role-play requests ("prompt"/"messages", "answer" optional);
    #                             empty: the verifiable prompts

    def __post_init__(self) -> None:
        if self.mode not in ("none", "permix"):
            raise ValueError(f"persona.mode: {self.mode!r} is not 'none' or 'permix'")
        if self.mode == "permix" and not self.pool:
            raise ValueError("persona.pool: mode 'permix' needs a training persona pool (a built-in name such as "
                             "'math-train' or 'synthetic-train', or a JSONL file)")
        if not self.fidelity_weight >= 0:
            raise ValueError(f"persona.fidelity_weight must be >= 0, got {self.fidelity_weight}")


@dataclass
class GRPOConfig(RunConfig):
    grpo: GRPOSection = field(default_factory=GRPOSection)
    persona: PersonaSection = field(default_factory=PersonaSection)
    out_dir: str = "runs/grpo"


# ------------------------------------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    task: str
    messages: list[dict[str, str]]  # ends with the user's turn
    answer: str
    checker: str
    where: str  # file:line, for messages about it
    ids: list[int] = field(default_factory=list)  # chat-template tokens with the generation prompt
    persona: Persona | None = None  # PerMix: the persona it is asked under (NO_PERSONA for a plain draw)
    verifiable: bool = True  # False: a role-play request without an answer (fidelity is its only reward)


def read_prompts(path: str | Path, checkers: dict[str, str] | None = None, *, require_answer: bool = True,
                 columns: str | dict[str, str] = "") -> list[Prompt]:
    """A prompt file (JSONL, Parquet or a save_to_disk folder; core/records.py), read through the layout `columns`:
    rows {"prompt": str | "messages": [...], "answer", "checker"?, "task"?, "system"?}. A trailing assistant message
    is dropped (SFT files serve as prompt files). Errors name the file and line or row. Without `require_answer`
    (role-play requests) a row may have no answer: it is then not verifiable."""
    path = Path(path)
    out = []
    for _, where, obj in read_records(path, layout(columns)):
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object")
        task = str(obj.get("task", source_name(path)))
        if "messages" in obj:
            messages = [dict(m) for m in obj["messages"]]
            if messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            if not messages or messages[-1].get("role") != "user":
                raise ValueError(f"{where}: 'messages' must end with the user's turn (or that + a response)")
        elif isinstance(obj.get("prompt"), str):
            messages = [{"role": "user", "content": obj["prompt"]}]
        else:
            raise ValueError(f"{where}: a prompt row needs 'prompt' (a string) or 'messages'")
        if "system" in obj:
            messages.insert(0, {"role": "system", "content": str(obj["system"])})
        checker = obj.get("checker") or (checkers or {}).get(task, "exact")
        answer = obj.get("answer")
        if answer is None and not require_answer:
            out.append(Prompt(task, messages, "", checker, where, verifiable=False))
            continue
        validate(checker, answer, where)
        if answer is None:
            raise ValueError(f"{where}: an RL prompt needs an 'answer' (the gold its checker compares against)")
        out.append(Prompt(task, messages, str(answer), checker, where))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def prompt_pool(cfg: GRPOConfig, rt: Runtime) -> list[Prompt]:
    """The prompts to train on (grpo.tasks of them), tokenized; prompts too long for the model are dropped and
    counted (every rank drops the same ones)."""
    g, c = cfg.grpo, cfg.data
    if g.prompts:
        prompts = read_prompts(g.prompts, c.checkers, columns=g.prompts_columns)
    else:
        if c.path:  # data.checkers are applied as the sub-datasets' defaults while reading
            rows: dict[str, list[Row]] = load_split_dir(c.path, c.heldout_fraction, c.seed, c.checkers,
                                                        c.columns)[0]
        else:  # the built-in tasks: data.checkers override, as in train/runtime.load_data
            rows = synthetic_rows(c.seed, task_set=c.synthetic)[0]
            for task_rows in rows.values():
                for r in task_rows:
                    r.checker = c.checkers.get(r.task, r.checker)
        prompts = [Prompt(r.task, r.messages[:-1], r.answer, r.checker, r.where) for task in sorted(rows)
                   for r in rows[task]]
    if g.tasks:
        unknown = sorted(set(g.tasks) - {p.task for p in prompts})
        if unknown:
            raise ValueError(f"grpo.tasks: {unknown} are not in the prompt pool ({sorted({p.task for p in prompts})})")
        prompts = [p for p in prompts if p.task in g.tasks]
    limit = rt.model.config.max_position_embeddings - g.max_new_tokens
    kept = []
    for p in prompts:
        p.ids = rt.tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True)
        if len(p.ids) <= limit:
            kept.append(p)
    if len(kept) < len(prompts):
        log(rt.d, f"grpo: dropped {len(prompts) - len(kept)} prompts longer than max_position_embeddings - "
                  f"max_new_tokens = {limit} tokens")
    if len(kept) < g.prompts_per_step:
        raise ValueError(f"grpo: {len(kept)} usable prompts, fewer than grpo.prompts_per_step={g.prompts_per_step}")
    return kept


class PromptStream:
    """The global prompt order: a fresh seeded permutation of the pool per epoch; every rank draws the same
    batches (ranks then keep their shard). `progress` is in epochs of the pool."""

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
        self.prompts, self.seed = prompts, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def next_batch(self, n: int) -> list[Prompt]:
        out = []
        while len(out) < n:
            if self.pos == len(self.prompts):
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(n - len(out), len(self.prompts) - self.pos)
            out += [self.prompts[i] for i in self._perm[self.pos: self.pos + take]]
            self.pos += take
        return out

    @property
    def progress(self) -> float:
        return self.epoch + self.pos / len(self.prompts)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "size": len(self.prompts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("size") != len(self.prompts) or state.get("seed") != self.seed:
            raise ValueError(f"checkpoint: the prompt stream was {state.get('size')} prompts with seed "
                             f"{state.get('seed')}, now {len(self.prompts)} with seed {self.seed}; resume with the "
                             f"same prompts and data.seed, or set checkpoint.resume=false")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation(self.epoch)


# ------------------------------------------------------------------------------------------------------ rollouts


@dataclass
class Sample:
    """One completion and everything the update needs about it."""

    group: int  # global prompt index within the step
    prompt: Prompt
    tokens: list[int]  # completion tokens (ending with the stop token when it stopped)
    sampler_logp: list[float]  # the sampler's raw_logprobs
    truncated: bool
    text: str
    reward: float = 0.0
    correct: bool = False
    fidelity: float | None = None  # the persona's constraints met (None: no persona constraints)
    advantage: float = 0.0
    old_logp: torch.Tensor | None = None  # [len(tokens)] float32
    ref_logp: torch.Tensor | None = None


def rollout_seed(seed: int, step: int, shard: int) -> int:
    """The sampler seed of one shard's rollout at one global step (< 2**62, as the sampler wants)."""
    return int(np.random.SeedSequence([seed, step, shard]).generate_state(1, np.uint64)[0]) >> 2


def local_shards(g: GRPOSection, d: Any) -> tuple[list[int], int]:
    """(the shards this rank rolls out, the number of shards)."""
    n = g.rollout_shards or d.world_size
    if d.world_size > 1 and n != d.world_size:
        raise ValueError(f"grpo.rollout_shards={n} with {d.world_size} ranks: leave it 0 (one shard per rank)")
    if g.prompts_per_step % n or (g.prompts_per_step // n) % g.mini_batches:
        raise ValueError(f"grpo.prompts_per_step={g.prompts_per_step} must split into {n} shards of whole "
                         f"mini-batches (grpo.mini_batches={g.mini_batches})")
    return ([d.rank] if d.world_size > 1 else list(range(n))), n


def rollout(rt: Runtime, prompts: list[Prompt], step: int) -> list[Sample]:
    """G completions of each prompt of this rank's shards, in (prompt, sample) order."""
    g = rt.cfg.grpo
    shards, n = local_shards(g, rt.d)
    per = len(prompts) // n
    samples = []
    for s in shards:
        mine = prompts[s * per: (s + 1) * per]
        outs = generate(rt.model, [p.ids for p in mine], n=g.group_size, max_new_tokens=g.max_new_tokens,
                        temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, tokenizer=rt.tokenizer,
                        seed=rollout_seed(rt.cfg.train.seed, step, s))
        samples += [Sample(s * per + o.prompt_index, mine[o.prompt_index], list(o.tokens), list(o.raw_logprobs),
                           o.finish_reason == "length", o.text or "") for o in outs]
    return samples


# ------------------------------------------------------------------------------------------------------- rewards


def guarded(fn: Callable[[], Any], timeout_s: float) -> Any:
    """fn() in a daemon thread; raises TimeoutError after timeout_s (the thread is abandoned, and a daemon so it
    cannot keep the process alive) and re-raises what fn raised."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name="grpo-reward")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"no result within {timeout_s} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def load_reward_fn(name: str) -> Callable[[str, str, str], float]:
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"grpo.reward_fns: cannot load {name!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"grpo.reward_fns: {name!r} is not callable")
    return fn


def checked_text(s: Sample) -> str:
    """What the task checker sees: the response, without its persona's style phrases when it has a persona."""
    return strip_style(s.prompt.persona, s.text) if s.prompt.persona is not None else s.text


class Rewards:
    """Scores completions (the module docstring's step 3). Failures are counted in `errors` / `timeouts` (totals
    over the run) and warned about on rank 0; the items they hit score 0."""

    def __init__(self, g: GRPOSection, is_main: bool = True, *, fidelity_weight: float = 0.0) -> None:
        self.g, self.is_main, self.fidelity_weight = g, is_main, fidelity_weight
        self.fns = [(load_reward_fn(name), w) for name, w in g.reward_fns.items()]
        self.format = re.compile(g.format_regex, re.S) if g.format_regex else None
        self.errors = self.timeouts = 0

    def _warn(self, what: str, n: int, e: BaseException) -> None:
        if self.is_main:
            print(f"grpo: warning: {what} failed on {n} item(s), scored 0: {type(e).__name__}: {e}", flush=True)

    def correct(self, samples: Sequence[Sample]) -> list[bool]:
        """Each verifiable row's checker (False for the others); a raising checker is retried per item, a
        timed-out call scores its items 0."""
        if not all(s.prompt.verifiable for s in samples):
            idx = [i for i, s in enumerate(samples) if s.prompt.verifiable]
            out = [False] * len(samples)
            for i, ok in zip(idx, self.correct([samples[i] for i in idx]) if idx else []):
                out[i] = ok
            return out
        checkers, texts, answers = ([s.prompt.checker for s in samples], [checked_text(s) for s in samples],
                                    [s.prompt.answer for s in samples])
        try:
            return list(guarded(lambda: check_rows(checkers, texts, answers), self.g.reward_timeout_s))
        except TimeoutError as e:
            self.timeouts += len(samples)
            self._warn("the task checker", len(samples), e)
            return [False] * len(samples)
        except Exception as e:
            self._warn("the task checker (retrying per item)", len(samples), e)
        out = []
        for c, t, a in zip(checkers, texts, answers):
            try:
                out.append(bool(guarded(lambda: check_rows([c], [t], [a])[0], self.g.reward_timeout_s)))
            except TimeoutError:
                self.timeouts += 1
                out.append(False)
            except Exception:
                self.errors += 1
                out.append(False)
        return out

    def extra(self, fn: Callable[[str, str, str], float], samples: Sequence[Sample]) -> list[float]:
        """One reward function over the items, with one deadline for all of them."""
        scores: list[float | None] = [None] * len(samples)
        failed: list[BaseException] = []

        def score_all() -> None:
            for i, s in enumerate(samples):
                try:
                    v = float(fn(s.prompt.messages[-1]["content"], s.text, s.prompt.answer))
                    if not math.isfinite(v):
                        raise ValueError(f"non-finite reward {v}")
                    scores[i] = v
                except Exception as e:
                    scores[i] = math.nan
                    failed.append(e)

        try:
            guarded(score_all, self.g.reward_timeout_s)
        except TimeoutError as e:
            late = sum(v is None for v in scores)
            self.timeouts += late
            self._warn(f"reward function {getattr(fn, '__name__', fn)}", late, e)
        if failed:
            self.errors += len(failed)
            self._warn(f"reward function {getattr(fn, '__name__', fn)}", len(failed), failed[0])
        return [0.0 if v is None or math.isnan(v) else v for v in scores]

    def __call__(self, samples: Sequence[Sample]) -> float:
        """Set each sample's `correct` and `reward`; returns the seconds spent."""
        t0 = time.perf_counter()
        g = self.g
        correct = self.correct(samples)
        fmt = torch.tensor([bool(self.format.fullmatch(s.text)) for s in samples]) if self.format else None
        columns = [self.extra(fn, samples) for fn, _ in self.fns]
        weights = [w for _, w in self.fns]
        fids = [fidelity(s.prompt.persona, s.text) if s.prompt.persona is not None else None for s in samples]
        if any(f is not None for f in fids):  # fidelity is one more weighted reward column (0 without constraints)
            columns.append([0.0 if f is None else f for f in fids])
            weights.append(self.fidelity_weight)
        extra = torch.tensor(columns, dtype=torch.float64).T if columns else None
        rewards = combine_rewards(
            torch.tensor(correct), correct_weight=g.correct_weight, format_ok=fmt, format_weight=g.format_weight,
            extra=extra, extra_weights=torch.tensor(weights, dtype=torch.float64),
            lengths=torch.tensor([len(s.tokens) for s in samples]), max_len=g.max_new_tokens,
            overlong_buffer=g.overlong_buffer, overlong_factor=g.overlong_penalty)
        for s, ok, r, f in zip(samples, correct, rewards.tolist(), fids):
            s.correct, s.reward, s.fidelity = ok, r, f
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- batches and loss


@dataclass
class MicroBatch:
    """Sequences right-padded to one length; the completion positions gathered by `index`."""

    input_ids: torch.Tensor  # [B, S] prompt + completion[:-1], pad after
    index: torch.Tensor  # [B, C] the positions whose hidden state predicts completion token j
    targets: torch.Tensor  # [B, C] completion tokens, -100 past each completion's end
    mask: torch.Tensor  # [B, C] float: tokens in the loss
    old_logp: torch.Tensor  # [B, C]
    ref_logp: torch.Tensor | None
    advantages: torch.Tensor  # [B]
    num_input_tokens: int

    def head(self, fn: Callable[..., Any]) -> Callable[[torch.Tensor, torch.Tensor], Any]:
        """head_loss for the model: fn(hidden at the completion positions [B, C, H], weight)."""
        rows = torch.arange(self.index.shape[0], device=self.index.device)[:, None]
        return lambda hidden, weight: fn(hidden[rows, self.index], weight)  # advanced indexing: a fresh tensor


def make_micro_batch(samples: Sequence[Sample], pad_id: int, device: torch.device, *,
                     mask_truncated: bool) -> MicroBatch:
    B = len(samples)
    S = max(len(s.prompt.ids) + len(s.tokens) - 1 for s in samples)
    C = max(len(s.tokens) for s in samples)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    index = torch.zeros(B, C, dtype=torch.long)
    targets = torch.full((B, C), -100, dtype=torch.long)
    mask = torch.zeros(B, C)
    old = torch.zeros(B, C)
    ref = torch.zeros(B, C) if samples[0].ref_logp is not None else None
    for b, s in enumerate(samples):
        p, c = len(s.prompt.ids), len(s.tokens)
        seq = s.prompt.ids + s.tokens[:-1]
        ids[b, : len(seq)] = torch.tensor(seq)
        index[b] = torch.arange(p - 1, p - 1 + C).clamp(max=S - 1)
        targets[b, :c] = torch.tensor(s.tokens)
        mask[b, :c] = 0.0 if (mask_truncated and s.truncated) else 1.0
        old[b, :c] = s.old_logp if s.old_logp is not None else torch.tensor(s.sampler_logp)
        if ref is not None:
            ref[b, :c] = s.ref_logp
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    return MicroBatch(*(to_device(t, device) for t in (ids, index, targets, mask, old, ref, adv)),
                      sum(len(s.prompt.ids) + len(s.tokens) - 1 for s in samples))


def micro_batches(samples: Sequence[Sample], size: int) -> list[list[Sample]]:
    """Longest first, `size` sequences each: neighbours have similar lengths, so padding stays small."""
    order = sorted(samples, key=lambda s: -(len(s.prompt.ids) + len(s.tokens)))
    return [order[i: i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, samples: Sequence[Sample], g: GRPOSection, pad_id: int,
                      device: torch.device, *, entropy: bool = False) -> tuple[list[torch.Tensor], float, float]:
    """Per-sample log-probs of the completion tokens through the no-grad fused path (in `samples` order), and the
    summed entropy and token count when `entropy`. Collective under FSDP2 (every rank has as many micro-batches)."""
    out: dict[int, torch.Tensor] = {}
    ent_sum = count = 0.0
    for mb in micro_batches(samples, g.micro_batch_seqs):
        batch = make_micro_batch(mb, pad_id, device, mask_truncated=False)
        res = model(batch.input_ids, head_loss=batch.head(
            lambda h, w: linear_logprob(h, w, batch.targets, temperature=g.temperature, return_entropy=entropy)))
        logp, ent = res if entropy else (res, None)
        if ent is not None:
            ent_sum += float((ent * batch.mask).sum())
            count += float(batch.mask.sum())
        for b, s in enumerate(mb):
            out[id(s)] = logp[b, : len(s.tokens)].float().cpu()

    forget_forwards(model)  # no backward follows these forwards
    return [out[id(s)] for s in samples], ent_sum, count


def check_completion_tokens(samples: Sequence[Sample], vocab_size: int) -> None:
    """Every completion token is an id of the model's vocabulary: checked here, on the host, so the loss kernel
    need not read its out-of-range flag back (a host sync per micro-batch)."""
    for s in samples:
        if s.tokens and (min(s.tokens) < 0 or max(s.tokens) >= vocab_size):
            bad = next(t for t in s.tokens if not 0 <= t < vocab_size)
            raise ValueError(f"grpo: a completion of prompt {s.prompt.where} (sample of group {s.group}) has token id "
                             f"{bad}, outside the model's vocabulary [0, {vocab_size})")


def accumulate_gradients(model: torch.nn.Module, samples: Sequence[Sample], g: GRPOSection, pad_id: int,
                         device: torch.device, *, world_size: int, num_sequences: float,
                         num_tokens: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Backward of the policy loss over this rank's `samples` of a global mini-batch of `num_sequences` sequences and
    `num_tokens` active tokens (both over all ranks; num_tokens may be a 0-d tensor on the device), micro-batch by
    micro-batch (gradients accumulate in .grad). Returns this rank's share of the loss and the token sums of
    (clip_low, clip_high, ratio, kl, active tokens), both on the device (nothing is read back), and the input tokens
    it ran."""
    check_completion_tokens(samples, model.config.vocab_size)
    mbs = micro_batches(samples, g.micro_batch_seqs)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    stats = torch.zeros(5, dtype=torch.float64, device=device)
    n_input = 0
    for i, mb in enumerate(mbs):
        batch = make_micro_batch(mb, pad_id, device, mask_truncated=g.mask_truncated)
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(i == len(mbs) - 1)  # reduce-scatter once per step
        if g.loss_type in ("grpo", "dr_grpo"):  # the micro-batch's share of the global mini-batch's sequences
            scale = len(mb) * world_size / num_sequences
        elif g.loss_type == "bnpo":
            scale = 1.0 / len(mbs)
        else:  # dapo: the kernel divides by the global token count already
            scale = 1.0
        loss, m = model(batch.input_ids, head_loss=batch.head(lambda h, w: linear_grpo_loss(
            h, w, batch.targets, batch.old_logp, batch.advantages, batch.mask, ref_logp=batch.ref_logp,
            beta=g.beta, eps_low=g.eps_low, eps_high=g.eps_high, delta=g.delta or None, loss_type=g.loss_type,
            importance_sampling=g.importance_sampling, max_completion_length=g.max_new_tokens,
            num_tokens=num_tokens / world_size, temperature=g.temperature, check_targets=False)))
        (loss * scale).backward()
        loss_sum += loss.detach().double() * scale
        active = (batch.mask * (batch.targets != -100)).sum().double()
        zero = active.new_zeros(())
        stats += torch.stack([m["clip_low"].double(), m["clip_high"].double(), m["ratio"].double(),
                              m.get("kl", zero).double(), active.new_ones(())]) * active
        n_input += batch.num_input_tokens
    return loss_sum, stats, n_input


# The global metrics of one optimizer step, in the order `policy_update` returns them.
UPDATE_METRICS = ("loss", "grad_norm", "input_tokens", "loss_tokens", "clip_low", "clip_high", "ratio", "kl")


def policy_update(rt: Runtime, samples: Sequence[Sample], lr: float, *, num_sequences: float,
                  num_tokens: torch.Tensor, num_input: torch.Tensor) -> tuple[int, torch.Tensor]:
    """One optimizer step over this rank's part of a global mini-batch (see accumulate_gradients); num_tokens and
    num_input are the mini-batch's global active and input tokens, 0-d float64 tensors on the device. Returns the
    global step taken and its global metrics (UPDATE_METRICS), float64 [8] on the device: nothing is read back."""
    d, model = rt.d, rt.model
    loss_sum, stats, _ = accumulate_gradients(
        model, samples, rt.cfg.grpo, rt.tokenizer.pad_id, d.device, world_size=d.world_size,
        num_sequences=num_sequences, num_tokens=num_tokens)
    grad_norm = clip_grad_norm_(model.parameters(), rt.cfg.optim.max_grad_norm).double()
    sums = torch.cat([loss_sum.view(1), stats])
    dist.all_reduce(sums)
    loss = sums[0] / d.world_size  # each rank's loss was scaled for FSDP2's average over ranks
    active = sums[5].clamp(min=1.0)
    step = rt.optimizer_step(lr, torch.isfinite(loss) & torch.isfinite(grad_norm))
    return step, torch.stack([loss, grad_norm, num_input, num_tokens, *(sums[1:5] / active)])


def policy_updates(rt: Runtime, minis: Sequence[Sequence[Sample]], lr: Callable[[], float]) -> list[dict[str, float]]:
    """`grpo.iterations` passes over the mini-batches `minis` (this rank's part of each), one optimizer step per
    mini-batch; returns every step's global metrics. The host reads nothing from the device until all the steps are
    queued, then reads every step's metrics in one transfer, so the GPU never drains between micro-batches. The
    mini-batches' global token counts are all-reduced first (on the device: the loss scales use them there)."""
    g, d = rt.cfg.grpo, rt.d
    counts = torch.tensor([[sum(0 if (g.mask_truncated and s.truncated) else len(s.tokens) for s in mb),
                            sum(len(s.prompt.ids) + len(s.tokens) - 1 for s in mb)] for mb in minis],
                          dtype=torch.float64)  # [mini-batch, (active tokens, input tokens)] of this rank
    counts = to_device(counts, d.device)
    dist.all_reduce(counts)
    taken = []
    for _ in range(g.iterations):
        for j, mb in enumerate(minis):
            taken.append(policy_update(rt, mb, lr(), num_sequences=len(mb) * d.world_size, num_tokens=counts[j, 0],
                                       num_input=counts[j, 1]))
    values = torch.stack([row for _, row in taken]).tolist()  # the one host read of the whole update
    out = []
    for (step, _), row in zip(taken, values):
        m = dict(zip(UPDATE_METRICS, row))
        applied = rt.book_step(step, m["loss"], m["grad_norm"], tokens=m["input_tokens"],
                               loss_tokens=m["loss_tokens"])
        out.append({**m, "skipped": float(not applied)})
    return out


def gather_rows(d: Any, rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's [n, k] float64 rows in rank order (same n on every rank)."""
    if d.world_size == 1:
        return rows
    parts = [torch.empty_like(rows) for _ in range(d.world_size)]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------------ personas


def with_persona(p: Prompt, persona: Persona, tokenizer: Any) -> Prompt:
    """`p` asked under `persona`: its system message replaced by the persona's text (none for NO_PERSONA: the
    prompt's own system message stays then), tokenized."""
    messages = p.messages
    if persona.text:
        messages = [{"role": "system", "content": persona.text}] + [m for m in messages if m["role"] != "system"]
    ids = p.ids if messages is p.messages else tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                              tokenize=True)
    return Prompt(p.task, messages, p.answer, p.checker, p.where, ids, persona, p.verifiable)


class PerMix:
    """The persona side of a PerMix-RLVR step: the training pool, the mixer and the role-play requests."""

    def __init__(self, cfg: GRPOConfig, rt: Runtime, prompts: list[Prompt]) -> None:
        c = cfg.persona
        self.tokenizer, self.seed = rt.tokenizer, cfg.train.seed
        self.pool = resolve_pool(c.pool)
        self.mixer = PersonaMixer(self.pool, c.ratios, cfg.train.seed, where="persona")
        self.roleplay: list[Prompt] = []
        if c.roleplay_prompts:
            self.roleplay = read_prompts(c.roleplay_prompts, cfg.data.checkers, require_answer=False)
            for p in self.roleplay:
                p.ids = rt.tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True)
        # Every prompt must fit under every persona: checked once here on the longest prompts, not mid-run.
        limit = rt.model.config.max_position_embeddings - cfg.grpo.max_new_tokens
        for source in (prompts, self.roleplay):
            if not source:
                continue
            longest = max(source, key=lambda q: len(q.ids))
            for persona in self.pool:
                n = len(with_persona(longest, persona, rt.tokenizer).ids)
                if n > limit:
                    raise ValueError(f"persona.pool: persona {persona.id!r} makes prompt {longest.where} {n} tokens, "
                                     f"more than max_position_embeddings - grpo.max_new_tokens = {limit}; shorten "
                                     f"the persona or the prompts")

    def apply(self, prompts: list[Prompt], step: int) -> list[Prompt]:
        """The step's prompts under the mixer's draws for this global step (the same on every rank)."""
        draws: list[Draw] = self.mixer.draws(step, len(prompts))
        pick = np.random.default_rng([self.seed, step, 0x2F1]).integers(0, max(len(self.roleplay), 1), len(prompts))
        out = []
        for p, d, j in zip(prompts, draws, pick):
            base = self.roleplay[j] if d.kind == "roleplay" and self.roleplay else p
            out.append(with_persona(base, d.persona, self.tokenizer))
        return out


def category_metrics(categories: torch.Tensor, rewards: torch.Tensor, correct: torch.Tensor,
                     verifiable: torch.Tensor, fids: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per persona category (indices into CATEGORIES) over the step's completions [N]: the share of completions,
    mean reward, accuracy over the verifiable ones and fidelity over those with constraints (NaN in `fids`: none);
    a statistic with no completion to average is left out."""
    out = {}
    for k, name in enumerate(CATEGORIES):
        m = categories == k
        if not m.any():
            continue
        row = {"share": float(m.double().mean()), "reward": float(rewards[m].mean())}
        v = m & verifiable
        if v.any():
            row["accuracy"] = float(correct[v].mean())
        f = m & ~torch.isnan(fids)
        if f.any():
            row["fidelity"] = float(fids[f].mean())
        out[name] = row
    return out


# -------------------------------------------------------------------------------------------------------- a step


class GRPO:
    """The stage's state between steps: runtime, prompt stream, rewards, reference model, the reward thread."""

    def __init__(self, rt: Runtime) -> None:
        cfg = rt.cfg
        self.rt, self.g = rt, cfg.grpo
        self.prompts = PromptStream(prompt_pool(cfg, rt), cfg.data.seed)
        self.permix = PerMix(cfg, rt, self.prompts.prompts) if cfg.persona.mode == "permix" else None
        self.rewards = Rewards(self.g, rt.d.is_main, fidelity_weight=cfg.persona.fidelity_weight)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpo-rewards")
        self.ref = None
        if self.g.beta > 0:  # the frozen initial policy, sharded like the policy
            self.ref = build_model(cfg.model, rt.d, cfg.parallel, init_from=cfg.init.hf_checkpoint or None,
                                   seed=cfg.train.seed).requires_grad_(False).eval()
        local_shards(self.g, rt.d)  # config errors before the first rollout

    def step(self, lr: Callable[[], float]) -> dict[str, float]:
        rt, g, d = self.rt, self.g, self.rt.d
        t0 = time.perf_counter()
        prompts = self.prompts.next_batch(g.prompts_per_step)
        if self.permix is not None:
            prompts = self.permix.apply(prompts, rt.counters.step)
        rt.model.eval()
        samples = rollout(rt, prompts, rt.counters.step)
        t_rollout = time.perf_counter() - t0

        reward_job = self.pool.submit(self.rewards, samples)  # overlaps the log-prob forwards below
        t1 = time.perf_counter()
        gap, entropy = math.nan, math.nan
        if g.old_logprobs == "recompute" or g.entropy:
            logps, ent_sum, ent_n = sequence_logprobs(rt.model, samples, g, rt.tokenizer.pad_id, d.device,
                                                      entropy=g.entropy)
            diff = sum(float((lp - torch.tensor(s.sampler_logp)).abs().sum()) for lp, s in zip(logps, samples))
            diff, n_tok, ent_sum, ent_n = global_sum(d, diff, sum(len(s.tokens) for s in samples), ent_sum, ent_n)
            gap = diff / max(n_tok, 1.0)
            entropy = ent_sum / ent_n if g.entropy else math.nan
            if g.old_logprobs == "recompute":
                for s, lp in zip(samples, logps):
                    s.old_logp = lp
        if self.ref is not None:
            for s, lp in zip(samples, sequence_logprobs(self.ref, samples, g, rt.tokenizer.pad_id, d.device)[0]):
                s.ref_logp = lp
        t_logp = time.perf_counter() - t1
        t2 = time.perf_counter()
        t_reward = reward_job.result()
        t_reward_wait = time.perf_counter() - t2

        # Advantages over the global batch, the same on every rank.
        mine = torch.tensor([[s.reward, float(s.correct), len(s.tokens), float(s.truncated),
                              CATEGORIES.index((s.prompt.persona or NO_PERSONA).category), float(s.prompt.verifiable),
                              math.nan if s.fidelity is None else s.fidelity] for s in samples], dtype=torch.float64)
        every = gather_rows(d, mine)
        rewards = every[:, 0].view(g.prompts_per_step, g.group_size)
        adv = group_advantages(rewards, mode=g.advantage)
        if g.batch_norm:
            adv = batch_normalize(adv)
        first = samples[0].group * g.group_size
        for k, s in enumerate(samples):
            s.advantage = float(adv.view(-1)[first + k])

        # Policy updates: `iterations` passes, `mini_batches` optimizer steps each.
        rt.model.train()
        t3 = time.perf_counter()
        shards, n_shards = local_shards(g, d)
        per_shard = len(samples) // len(shards)
        part = per_shard // g.mini_batches
        minis = [[s for k in range(len(shards)) for s in samples[k * per_shard + j * part:][:part]]
                 for j in range(g.mini_batches)]  # mini-batch j: part j of every shard
        updates = policy_updates(rt, minis, lr)
        t_update = time.perf_counter() - t3

        lengths, trunc = every[:, 2], every[:, 3]
        m = {key: sum(u[key] for u in updates) / len(updates) for key in ("loss", "clip_low", "clip_high", "ratio",
                                                                           "kl", "skipped")}
        m.update({
            "grad_norm": updates[-1]["grad_norm"],
            "input_tokens": sum(u["input_tokens"] for u in updates),
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "accuracy": float(every[every[:, 5] > 0, 1].mean()) if bool((every[:, 5] > 0).any()) else math.nan,
            "zero_std_groups": zero_variance_groups(rewards) / g.prompts_per_step,
            "completion_len": float(lengths.mean()), "truncated": float(trunc.mean()),
            "rollout_tokens_per_s": float(lengths.sum()) / max(t_rollout, 1e-9),
            "reward_errors": self.rewards.errors, "reward_timeouts": self.rewards.timeouts,
            "time": {"rollout": t_rollout, "reward": t_reward, "reward_wait": t_reward_wait, "logprobs": t_logp,
                     "update": t_update, "step": time.perf_counter() - t0},
        })
        if self.permix is not None:
            m["persona"] = category_metrics(every[:, 4].long(), every[:, 0], every[:, 1], every[:, 5] > 0, every[:, 6])
        if not math.isnan(gap):
            m["logprob_gap"] = gap
        if not math.isnan(entropy):
            m["entropy"] = entropy
        if rt.counters.step % rt.cfg.train.log_every < g.updates_per_step:
            t = m["time"]
            log(d, f"grpo step {rt.counters.step}: reward {m['reward_mean']:.3f}±{m['reward_std']:.3f} acc "
                   f"{m['accuracy']:.3f} zero-std {m['zero_std_groups']:.2f} clip {m['clip_low']:.3f}/"
                   f"{m['clip_high']:.3f} kl {m['kl']:.4f} len {m['completion_len']:.1f} trunc {m['truncated']:.2f}"
                   + (f" gap {gap:.2e}" if not math.isnan(gap) else "")
                   + (f" entropy {entropy:.3f}" if not math.isnan(entropy) else "")
                   + "".join(f" | {c} r {v['reward']:.2f}" + (f" acc {v['accuracy']:.2f}" if "accuracy" in v else "")
                             + (f" fid {v['fidelity']:.2f}" if "fidelity" in v else "")
                             for c, v in m.get("persona", {}).items())
                   + f" | rollout {t['rollout']:.2f}s reward {t['reward']:.2f}s (exposed {t['reward_wait']:.2f}s) "
                     f"logp {t['logprobs']:.2f}s update {t['update']:.2f}s")
        return m

    def close(self) -> None:
        self.pool.shutdown(wait=False)


# --------------------------------------------------------------------------------------------------------- a run


def check_step_multiples(cfg: GRPOConfig) -> None:
    k = cfg.grpo.updates_per_step
    if k == 1:
        return
    for key, v in (("train.max_steps", cfg.train.max_steps), ("train.log_every", cfg.train.log_every),
                   ("train.stop_at_step", cfg.train.stop_at_step), ("checkpoint.every_steps",
                   cfg.checkpoint.every_steps), ("grpo.eval_every_steps", cfg.grpo.eval_every_steps)):
        if v % k:
            raise ValueError(f"{key}={v} must be a multiple of grpo.iterations * grpo.mini_batches = {k} (one "
                             f"rollout takes that many global steps)")


def bootstrap_sft(cfg: GRPOConfig) -> None:
    """Run grpo.sft_config first when init.hf_checkpoint (its <out_dir>/hf) does not exist yet."""
    path = cfg.init.hf_checkpoint
    if not path or (Path(path) / "config.json").is_file():
        return
    if not cfg.grpo.sft_config:
        raise FileNotFoundError(f"init.hf_checkpoint: {path} has no config.json; train it first (or set "
                                f"grpo.sft_config to run that SFT config into it)")
    if Path(path).name != "hf":
        raise ValueError(f"init.hf_checkpoint: {path} must be <dir>/hf for grpo.sft_config to write it")

    train_once(cfg.grpo.sft_config, cfg.grpo.sft_overrides, Path(path).parent, who="grpo")


def saved_state(cfg: GRPOConfig, trainer: GRPO) -> dict[str, Any]:
    """What a checkpoint (and the summary) records of the stage besides the runtime's state: the rollout seed and
    shards, the reward failure counts, and which method ran (persona.mode: plain RLVR or PerMix-RLVR)."""
    return {"grpo": {"seed": cfg.train.seed, "shards": local_shards(cfg.grpo, trainer.rt.d)[1],
                     "reward_errors": trainer.rewards.errors, "reward_timeouts": trainer.rewards.timeouts,
                     "persona_mode": cfg.persona.mode}}


def check_resumed_mode(resumed: dict[str, Any], cfg: GRPOConfig, where: str) -> None:
    """Refuse to resume a checkpoint of one method (persona.mode) as the other: their prompts differ from the first
    step, so the run would be neither. Older checkpoints carry the mode only in their flattened config."""
    mode = resumed.get("grpo", {}).get("persona_mode", resumed.get("config", {}).get("persona.mode"))
    if mode is not None and mode != cfg.persona.mode:
        raise ValueError(f"{where}: the checkpoint was written with persona.mode = {mode!r}, this run has "
                         f"persona.mode = {cfg.persona.mode!r}; resume with the same mode, or use another out_dir "
                         f"(or checkpoint.resume = false)")


def run(cfg: GRPOConfig) -> dict[str, Any]:
    check_step_multiples(cfg)
    bootstrap_sft(cfg)
    rt = Runtime(cfg)
    g = cfg.grpo
    trainer = GRPO(rt)
    resumed = rt.resume(trainer.prompts)
    if resumed is not None:
        check_resumed_mode(resumed, cfg, str(rt.checkpointer.root))
        saved = resumed.get("grpo", {})
        if saved.get("seed") != cfg.train.seed or saved.get("shards") != local_shards(g, rt.d)[1]:
            log(rt.d, f"grpo: warning: the checkpoint's rollouts used seed {saved.get('seed')} and "
                      f"{saved.get('shards')} shards; this run uses {cfg.train.seed} and {local_shards(g, rt.d)[1]}")
        trainer.rewards.errors = saved.get("reward_errors", 0)
        trainer.rewards.timeouts = saved.get("reward_timeouts", 0)
    log(rt.d, f"world size {rt.d.world_size} on {rt.d.device}; {rt.model.config.num_params() / 1e6:.2f}M "
              f"parameters; {len(trainer.prompts.prompts)} prompts; {g.prompts_per_step} x {g.group_size} "
              f"completions per step")
    tasks = g.eval_tasks or g.tasks or None

    def evaluate() -> None:
        rt.record_eval(trainer.prompts.progress, rt.evaluate(tasks))

    def step(lr: Callable[[], float]) -> dict[str, float]:
        m = trainer.step(lr)
        e, c = g.eval_every_steps, rt.counters.step
        if e and c // e > (c - g.updates_per_step) // e and rt.frac_of(trainer.prompts.progress) < 1.0:
            evaluate()  # the loop evaluates at the end itself
        return m

    extra = lambda: saved_state(cfg, trainer)  # noqa: E731
    try:
        finished = rt.loop(step, progress=lambda: trainer.prompts.progress,
                           frac=lambda: rt.frac_of(trainer.prompts.progress),
                           evaluate=evaluate, every_epochs=0 if g.eval_every_steps else None,
                           at_start=cfg.eval.at_start and resumed is None,
                           save=lambda: rt.save(trainer.prompts, extra()))
        return rt.finish(trainer.prompts, finished=finished, extra=extra())
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return entry_point(run, GRPOConfig, argv)


if __name__ == "__main__":
    main()
