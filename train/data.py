"""Multi-task SFT data: sub-datasets from files -> chat-rendered token streams -> packed, fixed-shape micro-batches.

What it is for:
  - Reading sub-datasets from JSONL, Parquet or `datasets` save_to_disk folders (core/records.py; `{"prompt",
    "response"}` rows with an optional "system", or `{"messages"}` rows, or other columns through a per-sub-dataset
    layout such as GSM8K's or MATH's), one sub-dataset per source or per `task` field, each with a train and a
    held-out split; every malformed row is an error naming file, line or row, and what is wrong.
  - Rendering each row with the tokenizer's chat template; the loss covers assistant tokens only (their content and
    end-of-turn token). Rows longer than `seq_len` follow an explicit truncation policy, with counts reported.
  - A mixture sampler over the sub-datasets (proportional to size by default, or explicit weights) that can drop a
    sub-dataset (mSFT) or change the weights (DynamixSFT) on the fly, and whose order is deterministic given the seed
    and resumable from a small state.
  - Greedy packing into micro-batches of a fixed [B, S] shape (B = max_tokens // seq_len), documents never crossing,
    positions restarting at 0 per document (the model derives its block-diagonal attention from the restarts).
  - Held-out evaluation: packed batches per sub-dataset (held-out loss) and the raw prompts with their expected
    answers (generation-based exact match).

What it is not: a streaming loader for corpora that do not fit in host memory (every split is tokenized up front,
which suits SFT mixtures of up to a few million rows), the training loop, or the generation/eval code.

Definitions the trainer relies on:
  - Epoch: one pass's worth of draws over the *active* mixture, i.e. sum of the active sub-datasets' training sizes.
    `progress` is a float in epochs; it counts documents placed in batches handed out, and after a sub-dataset is
    excluded it keeps counting against the smaller mixture, so "every quarter epoch" stays meaningful in mSFT.
  - Draws: each document picks its sub-dataset at random with probability proportional to the weights (the sizes
    by default), then takes the next example of that sub-dataset's own shuffled order (a fresh permutation per pass
    over it). So within a sub-dataset no example repeats before all have been seen.
  - Distributed: every rank builds the same sampler and packs the same global stream of micro-batches; one call to
    `next_batch()` packs `world_size` consecutive micro-batches and rank r tensorizes and returns the r-th. Ranks thus
    get disjoint slices of one global batch, hold identical loader state, and any rank's `state_dict()` resumes all.
    Under HSDP (core/distributed.py) every rank is still a data-parallel rank, so each replica group sees its own
    slices and all of them form the one global batch: rank r = replica * shard + shard rank takes the r-th.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.core.records import DataError, Layout, find_sources, layout, read_records, source_files, source_name
from posttrain.eval.checkers import DEFAULT_CHECKER, validate as validate_checker
from posttrain.train.synthetic import task_set_tasks

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
TRUNCATION_POLICIES = ("error", "truncate_left_prompt", "drop")


# ----------------------------------------------------------------------------------------------------------------
# Rows: reading and validating


@dataclass
class Row:
    """One conversation to train on or evaluate: messages end with the assistant turn that is the response.

    `answer` is what `checker` (eval/checkers.py) compares a generation against: the row's "answer" field when it
    has one, else (for checkers that allow it) the final assistant content. `checker` is the row's "checker" field,
    else the sub-dataset's default from the config, else "exact". `where` ("file:line", "file row i" or
    "source[i]") is for error messages.
    """

    task: str
    messages: list[dict[str, str]]
    answer: str
    where: str
    checker: str = DEFAULT_CHECKER


def _type_name(x: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(x), type(x).__name__)


def _need_str(obj: dict, key: str, where: str, *, nonempty: bool = True) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: key '{key}' must be a string, got {_type_name(value)}")
    if nonempty and not value.strip():
        raise DataError(f"{where}: empty {key}; give it text or remove the row")
    return value


def parse_row(obj: Any, where: str, default_task: str | None = None,
              checkers: dict[str, str] | None = None) -> Row:
    """Validate one decoded JSONL row and turn it into a Row (the prompt/response form becomes messages).
    `checkers` maps a sub-dataset to its default checker (a row's own "checker" field wins)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {_type_name(obj)}")
    task = default_task
    if "task" in obj:
        task = _need_str(obj, "task", where)
    if task is None:
        raise DataError(f"{where}: missing key 'task' (in-memory rows must name their sub-dataset)")

    if "messages" in obj:
        if "prompt" in obj or "response" in obj:
            raise DataError(f"{where}: has both 'messages' and 'prompt'/'response'; keep one form")
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            got = "an empty array" if raw == [] else _type_name(raw)
            raise DataError(f"{where}: key 'messages' must be a non-empty array, got {got}")
        messages = []
        for j, m in enumerate(raw):
            if not isinstance(m, dict):
                raise DataError(f"{where}: messages[{j}] must be an object with 'role' and 'content', "
                                f"got {_type_name(m)}")
            for key in ("role", "content"):
                if key not in m:
                    raise DataError(f"{where}: messages[{j}] is missing key '{key}'")
                if not isinstance(m[key], str):
                    raise DataError(f"{where}: messages[{j}].{key} must be a string, got {_type_name(m[key])}")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{j}] has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
            messages.append({"role": m["role"], "content": m["content"]})
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (the response to train on), got "
                            f"role {messages[-1]['role']!r}")
        if not messages[-1]["content"].strip():
            raise DataError(f"{where}: empty response (the last assistant message has no text)")
        if "system" in obj:
            if messages[0]["role"] == "system":
                raise DataError(f"{where}: has both a 'system' key and a system message; keep one")
            messages.insert(0, {"role": "system", "content": _need_str(obj, "system", where)})
    else:
        for key in ("prompt", "response"):
            if key not in obj:
                raise DataError(f"{where}: missing key '{key}' (a row is {{\"prompt\", \"response\"}} with an "
                                f"optional \"system\", or {{\"messages\"}}; for other columns set the "
                                f"sub-dataset's layout in data.columns)")
        messages = [{"role": "user", "content": _need_str(obj, "prompt", where)},
                    {"role": "assistant", "content": _need_str(obj, "response", where)}]
        if "system" in obj:
            messages.insert(0, {"role": "system", "content": _need_str(obj, "system", where)})

    checker = _need_str(obj, "checker", where) if "checker" in obj else (checkers or {}).get(task, DEFAULT_CHECKER)
    answer = _need_str(obj, "answer", where) if "answer" in obj else None
    try:
        validate_checker(checker, answer, where)
    except ValueError as e:
        raise DataError(str(e)) from None
    return Row(task, messages, messages[-1]["content"] if answer is None else answer, where, checker)


def read_rows(path: str | Path, checkers: dict[str, str] | None = None,
              lay: Layout | None = None) -> dict[str, list[Row]]:
    """Rows of one source (a JSONL or Parquet file, or a save_to_disk folder; core/records.py), read through the
    layout `lay` when given, grouped by sub-dataset: the row's `task` field, else the source's name. Any bad row
    raises DataError naming the file and line or row. An empty source is an error (empty sub-dataset)."""
    path, name = Path(path), source_name(path)
    groups: dict[str, list[Row]] = {}
    for _, where, obj in read_records(path, lay):
        row = parse_row(obj, where, default_task=name, checkers=checkers)
        groups.setdefault(row.task, []).append(row)
    if not groups:
        raise DataError(f"{path}: sub-dataset '{name}' is empty (no rows); fill it or remove it")
    return groups


def rows_from_records(records: Iterable[dict], source: str, default_task: str | None = None,
                      checkers: dict[str, str] | None = None) -> dict[str, list[Row]]:
    """In-memory rows (e.g. train.synthetic) through the same validation, grouped by their `task` field."""
    groups: dict[str, list[Row]] = {}
    for i, obj in enumerate(records):
        row = parse_row(obj, f"{source}[{i}]", default_task, checkers)
        groups.setdefault(row.task, []).append(row)
    return groups


def _merge(into: dict[str, list[Row]], more: dict[str, list[Row]]) -> None:
    for task, rows in more.items():
        into.setdefault(task, []).extend(rows)


def split_heldout(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Carve a held-out split off one sub-dataset: a seeded shuffle, then round(fraction * n) rows (at least 1)."""
    if len(rows) < 2:
        raise DataError(f"sub-dataset '{rows[0].task}' has {len(rows)} row; it needs at least 2 to carve a held-out "
                        f"split from; add rows or give it a held-out file")
    order = list(range(len(rows)))
    random.Random(f"{seed}:{rows[0].task}").shuffle(order)
    n_heldout = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    held = sorted(order[:n_heldout])
    keep = sorted(order[n_heldout:])
    return [rows[i] for i in keep], [rows[i] for i in held]


def load_split_dir(root: str | Path, heldout_fraction: float | None = None, seed: int = 0,
                   checkers: dict[str, str] | None = None, columns: Mapping[str, Any] | None = None,
                   ) -> tuple[dict[str, list[Row]], dict[str, list[Row]]]:
    """Read the sources of root/train/ and root/heldout/ (the layout `train.synthetic.write_jsonl` writes): per
    sub-dataset a `<name>.jsonl` or `<name>.parquet` file, or a save_to_disk folder `<name>/` (or a folder of
    Parquet shards).

    Without root/heldout/, `heldout_fraction` carves a held-out split off each training sub-dataset (seeded).
    `checkers` gives sub-datasets a default checker, `columns` their column layout (core/records.layout: "gsm8k",
    "math", "messages" or a table {row key: column}), each keyed by source name; a name either lists that is not a
    sub-dataset is an error. Returns (train, heldout), each {sub-dataset name: rows}, with the same names in both.
    """
    root = Path(root)
    train_dir, heldout_dir = root / "train", root / "heldout"
    sources = find_sources(train_dir)
    if not sources:
        raise DataError(f"{train_dir}: no data; put one source per sub-dataset there (<name>.jsonl, <name>.parquet "
                        f"or a save_to_disk folder <name>/)")
    heldout_sources = find_sources(heldout_dir) if heldout_dir.is_dir() else {}
    unknown = sorted(set(columns or {}) - set(sources) - set(heldout_sources))
    if unknown:
        raise DataError(f"data.columns names sub-datasets {unknown} that {root} does not have; it has "
                        f"{sorted(sources)}")
    layouts = {name: layout(spec) for name, spec in (columns or {}).items()}
    train: dict[str, list[Row]] = {}
    for name, src in sources.items():
        _merge(train, read_rows(src, checkers, layouts.get(name)))
    if heldout_dir.is_dir():
        heldout: dict[str, list[Row]] = {}
        for name, src in heldout_sources.items():
            _merge(heldout, read_rows(src, checkers, layouts.get(name)))
    elif heldout_fraction is not None:
        heldout = {}
        for task in list(train):
            train[task], heldout[task] = split_heldout(train[task], heldout_fraction, seed)
    else:
        raise DataError(f"{heldout_dir}: missing; add held-out files with the training files' names, or set a "
                        f"held-out fraction to carve them from the training split")
    missing = sorted(set(train) - set(heldout))
    extra = sorted(set(heldout) - set(train))
    if missing or extra:
        raise DataError(f"{root}: train and held-out sub-datasets differ (no held-out rows for {missing}, no training "
                        f"rows for {extra}); every sub-dataset needs both splits")
    check_checker_names(checkers, train, str(root))
    return train, heldout


def check_checker_names(checkers: dict[str, str] | None, tasks: Iterable[str], source: str) -> None:
    """Per-sub-dataset checker defaults must name sub-datasets that exist (a typo would silently fall back)."""
    unknown = sorted(set(checkers or {}) - set(tasks))
    if unknown:
        raise DataError(f"data.checkers names sub-datasets {unknown} that {source} does not have; it has "
                        f"{sorted(tasks)}")


def synthetic_rows(seed: int = 0, train_sizes: dict[str, int] | None = None,
                   heldout_sizes: dict[str, int] | None = None,
                   task_set: str = "default") -> tuple[dict[str, list[Row]], dict[str, list[Row]]]:
    """A built-in task set (train/synthetic.py) as (train, heldout) rows, without going through files.
    `train_sizes` / `heldout_sizes` override the set's sizes per task."""
    train, heldout = {}, {}
    for name, task in task_set_tasks(task_set, seed, train_sizes, heldout_sizes).items():
        _merge(train, rows_from_records(task.train, f"synthetic:{name}/train"))
        _merge(heldout, rows_from_records(task.heldout, f"synthetic:{name}/heldout"))
    return train, heldout


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing: chat template, loss mask, truncation


@dataclass
class TokenizedSplit:
    """One sub-dataset's split as one flat token stream: document i is ids[offsets[i]:offsets[i+1]].

    `loss` marks the tokens the model is trained to produce (assistant content and end-of-turn). `kept` are the
    indices into the split's rows that survived the truncation policy (held-out rows keep their order).
    """

    name: str
    ids: np.ndarray  # int32 [T]
    loss: np.ndarray  # bool [T]
    offsets: np.ndarray  # int64 [N + 1]
    kept: list[int]
    truncated: int
    dropped: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.loss[a:b]


def tokenize_split(name: str, rows: list[Row], tokenizer: Any, seq_len: int, truncation: str = "error",
                   split: str = "train") -> TokenizedSplit:
    """Render each row with `tokenizer.render_with_assistant_mask` and apply the truncation policy to rows longer
    than `seq_len` tokens:
      "error"                 raise, naming the row and its length;
      "truncate_left_prompt"  drop tokens from the start of the conversation (system and user text first) until it
                              fits; a row whose response alone leaves no room for a single prompt token is dropped;
      "drop"                  leave the row out.
    Truncated and dropped rows are counted; a split left with no rows is an error naming the sub-dataset.
    """
    if truncation not in TRUNCATION_POLICIES:
        raise DataError(f"unknown truncation policy {truncation!r}; use one of {', '.join(TRUNCATION_POLICIES)}")
    if not rows:
        raise DataError(f"sub-dataset '{name}' has no {split} rows")
    docs_ids, docs_loss, kept = [], [], []
    truncated = dropped = 0
    for i, row in enumerate(rows):
        ids, mask = tokenizer.render_with_assistant_mask(row.messages)
        ids, loss = np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)
        if not loss.any():
            raise DataError(f"{row.where}: the chat template produced no assistant tokens for this row; check that "
                            f"the tokenizer's template renders assistant turns")
        if len(ids) > seq_len:
            if truncation == "error":
                raise DataError(f"{row.where}: sub-dataset '{row.task}' row renders to {len(ids)} tokens, more than "
                                f"seq_len={seq_len}; raise seq_len, shorten the row, or set the truncation policy "
                                f"to 'truncate_left_prompt' or 'drop'")
            cut = len(ids) - seq_len
            if truncation == "drop" or cut >= int(np.argmax(loss)):  # argmax: the first trained token
                dropped += 1
                continue
            ids, loss = ids[cut:], loss[cut:]
            truncated += 1
        docs_ids.append(ids)
        docs_loss.append(loss)
        kept.append(i)
    if not kept:
        raise DataError(f"sub-dataset '{name}': all {len(rows)} {split} rows are longer than seq_len={seq_len} and "
                        f"were dropped; raise seq_len or use truncation='truncate_left_prompt'")
    offsets = np.zeros(len(docs_ids) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs_ids], out=offsets[1:])
    return TokenizedSplit(name, np.concatenate(docs_ids), np.concatenate(docs_loss), offsets, kept, truncated, dropped)


# ----------------------------------------------------------------------------------------------------------------
# The batch the trainer and the model consume


@dataclass
class PackedBatch:
    """A micro-batch of packed documents, shapes static: [B, S] with B * S <= max_tokens.

    input_ids     [B, S]  token ids; padding is pad_id
    position_ids  [B, S]  restart at 0 at each document (the model's document boundaries); the padding after the last
                          document of a row is one more document, positions 0, 1, ...
    targets       [B, S]  already shifted: targets[b, t] = input_ids[b, t + 1] when that token is a trained (assistant)
                          token of the same document, else -100
    task_ids      [B, S]  sub-dataset index per position (into `tasks`), -1 on padding
    num_loss_tokens       number of targets != -100 in this micro-batch (this rank's only)
    tasks                 index -> sub-dataset name
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    task_ids: torch.Tensor
    num_loss_tokens: int
    tasks: list[str]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        return PackedBatch(*(t.to(device, non_blocking=non_blocking) for t in
                             (self.input_ids, self.position_ids, self.targets, self.task_ids)),
                           self.num_loss_tokens, self.tasks)


def pack_rows(rows: Sequence[Sequence[tuple[int, int]]], splits: Sequence[TokenizedSplit], seq_len: int,
              pad_id: int, tasks: list[str]) -> PackedBatch:
    """Tensorize packed rows: rows[b] lists the (task index, document index) pairs laid out left to right in row b.
    `splits[task index]` holds the documents; every row must fit in seq_len."""
    B, S = len(rows), seq_len
    input_ids = np.full((B, S), pad_id, dtype=np.int64)
    position_ids = np.empty((B, S), dtype=np.int64)
    targets = np.full((B, S), IGNORE_INDEX, dtype=np.int64)
    task_ids = np.full((B, S), -1, dtype=np.int64)
    ramp = np.arange(S, dtype=np.int64)
    for b, row in enumerate(rows):
        c = 0
        for t, i in row:
            ids, loss = splits[t].doc(i)
            n = len(ids)
            input_ids[b, c:c + n] = ids
            position_ids[b, c:c + n] = ramp[:n]
            # The target at t is the token at t+1, kept only where that token is trained; the last token of a
            # document has no target, so nothing is ever predicted across a document boundary.
            targets[b, c:c + n - 1] = np.where(loss[1:], ids[1:], IGNORE_INDEX)
            task_ids[b, c:c + n] = t
            c += n
        if c > S:
            raise ValueError(f"pack_rows: row {b} holds {c} tokens, more than seq_len={S}")
        position_ids[b, c:] = ramp[:S - c]
    return PackedBatch(torch.from_numpy(input_ids), torch.from_numpy(position_ids), torch.from_numpy(targets),
                       torch.from_numpy(task_ids), int((targets != IGNORE_INDEX).sum()), tasks)


# ----------------------------------------------------------------------------------------------------------------
# The mixture sampler


class MixtureSampler:
    """Deterministic, resumable draws of (sub-dataset, example) over a mixture, with on-the-fly exclusion.

    Draw k takes uniform k of a seeded stream (generated in blocks, so any position is cheap to regenerate) and maps
    it through the cumulative weights of the active sub-datasets; the sub-dataset then yields the next index of its
    permutation for the current pass, seeded by (seed, sub-dataset, pass). The whole state is a few integers per
    sub-dataset, and excluding a sub-dataset only changes how later uniforms are mapped, so a run that excludes
    at draw k is reproduced exactly by resuming from a state saved at any point and excluding at the same k.
    """

    BLOCK = 4096

    def __init__(self, sizes: dict[str, int], seed: int, weights: dict[str, float] | None = None) -> None:
        if seed < 0:
            raise ValueError(f"MixtureSampler: seed must be >= 0, got {seed}")
        self.names = list(sizes)
        self.sizes = [int(sizes[n]) for n in self.names]
        if any(s < 1 for s in self.sizes):
            raise DataError(f"MixtureSampler: every sub-dataset needs at least one row, got sizes {dict(sizes)}")
        if weights is None:
            self.weights = [float(s) for s in self.sizes]
        else:
            self.weights = self._weight_list(weights)
        self.seed = seed
        self.initial_weights = list(self.weights)  # what a resume must match; set_weights changes self.weights
        self.active = [w > 0 for w in self.weights]
        if not any(self.active):
            raise DataError(f"mixture weights {weights} give every sub-dataset weight 0")
        self.draws = 0
        self.passes = [0] * len(self.names)
        self.cursor = [0] * len(self.names)
        self.epoch_base = 0.0  # progress at the last change of the active set
        self.draws_at_change = 0
        # Caches of pure functions of (seed, block) and (seed, sub-dataset, pass); shared by clones (read-mostly).
        self._blocks: dict[int, np.ndarray] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._refresh()

    def _refresh(self) -> None:
        w = np.array([wi if a else 0.0 for wi, a in zip(self.weights, self.active)])
        self._cum = np.cumsum(w) / w.sum()
        self._active_size = sum(s for s, a in zip(self.sizes, self.active) if a)
        # Where a uniform lands on an inactive sub-dataset (float rounding at the top of the cumulative sum only),
        # step down to the nearest active one below it, as a scalar `while not active[t]: t -= 1` would.
        self._fix = []
        for t in range(len(self.names)):
            while not self.active[t]:
                t -= 1
            self._fix.append(t % len(self.names))
        self._fix_arr = np.array(self._fix)

    def clone(self) -> "MixtureSampler":
        """An independent copy of the position (for planning ahead without moving this one)."""
        other = object.__new__(MixtureSampler)
        other.__dict__.update(self.__dict__)
        other.passes, other.cursor, other.active = list(self.passes), list(self.cursor), list(self.active)
        return other

    @property
    def progress(self) -> float:
        """Epochs drawn so far, an epoch being sum of the active sub-datasets' sizes in draws."""
        return self.epoch_base + (self.draws - self.draws_at_change) / self._active_size

    def _block(self, block: int) -> np.ndarray:
        u = self._blocks.get(block)
        if u is None:
            if len(self._blocks) > 64:
                self._blocks.clear()
            u = self._blocks[block] = np.random.default_rng([self.seed, 0, block]).random(self.BLOCK)
        return u

    def _uniforms(self, k: int, n: int) -> np.ndarray:
        """Uniforms k .. k+n-1 of the stream."""
        first, last = k // self.BLOCK, (k + n - 1) // self.BLOCK
        u = np.concatenate([self._block(b) for b in range(first, last + 1)]) if n else np.empty(0)
        off = k - first * self.BLOCK
        return u[off:off + n]

    def _perm(self, t: int, p: int) -> np.ndarray:
        """Sub-dataset t's example order in its pass p."""
        perm = self._perms.get((t, p))
        if perm is None:
            if len(self._perms) > 4 * len(self.names) + 64:
                self._perms.clear()
            perm = self._perms[(t, p)] = np.random.default_rng([self.seed, 1, t, p]).permutation(self.sizes[t])
        return perm

    def lookahead(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n draws as (sub-dataset indices [n], example indices [n]), without drawing them.
        Vectorised: a few numpy passes over n, whatever the mixture."""
        u = self._uniforms(self.draws, n)
        t = self._fix_arr[np.minimum(np.searchsorted(self._cum, u, side="right"), len(self.names) - 1)]
        idx = np.empty(n, dtype=np.int64)
        for task in np.unique(t):
            where = np.flatnonzero(t == task)
            pos = self.cursor[task] + np.arange(len(where))
            size = self.sizes[task]
            passes = pos // size
            for dp in np.unique(passes):
                sel = passes == dp
                idx[where[sel]] = self._perm(int(task), self.passes[task] + int(dp))[pos[sel] % size]
        return t, idx

    def advance_many(self, tasks: np.ndarray) -> None:
        """Draw the next len(tasks) examples, `tasks` being their sub-dataset indices (from lookahead)."""
        counts = np.bincount(tasks, minlength=len(self.names)) if len(tasks) else np.zeros(len(self.names), int)
        for t, c in enumerate(counts.tolist()):
            if c:
                total = self.cursor[t] + c
                self.passes[t] += total // self.sizes[t]
                self.cursor[t] = total % self.sizes[t]
        self.draws += len(tasks)

    def peek(self) -> tuple[int, int]:
        """The next (sub-dataset index, example index), without drawing it."""
        t, i = self.lookahead(1)
        return int(t[0]), int(i[0])

    def advance(self, t: int) -> None:
        """Draw the peeked example (`t` is its sub-dataset index)."""
        self.advance_many(np.array([t]))

    def next(self) -> tuple[int, int]:
        """Draw the next (sub-dataset index, example index)."""
        t, i = self.peek()
        self.advance(t)
        return t, i

    def _set_active(self, name: str, active: bool) -> None:
        if name not in self.names:
            raise DataError(f"unknown sub-dataset {name!r}; the mixture has {self.names}")
        t = self.names.index(name)
        if active and self.weights[t] == 0:
            raise DataError(f"cannot include {name!r}: its mixture weight is 0")
        if not active and sum(self.active) == 1 and self.active[t]:
            raise DataError(f"cannot exclude {name!r}: it is the last active sub-dataset")
        if self.active[t] == active:
            return
        self.epoch_base = self.progress
        self.draws_at_change = self.draws
        self.active[t] = active
        self._refresh()

    def exclude(self, name: str) -> None:
        """Stop drawing from `name` from the next draw on; its position is kept in case it is included again."""
        self._set_active(name, False)

    def include(self, name: str) -> None:
        self._set_active(name, True)

    def _weight_list(self, weights: dict[str, float]) -> list[float]:
        """{name: weight} -> one weight per sub-dataset in order (0 for one left out); unknown names and weights
        that are negative or not finite are errors."""
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise DataError(f"mixture weights name unknown sub-datasets {unknown}; known: {self.names}")
        out = [float(weights.get(n, 0.0)) for n in self.names]
        if any(not (w >= 0 and np.isfinite(w)) for w in out):
            raise DataError(f"mixture weights must be finite and >= 0, got {weights}")
        return out

    def set_weights(self, weights: dict[str, float]) -> None:
        """Draw with these relative weights from the next draw on (a bandit over the mixture, DynamixSFT in
        train/msft/). Like exclude, it changes only how later uniforms are mapped, so the stream stays
        deterministic and resumable; the active set and the epoch (sizes of the active sub-datasets) are unchanged.
        A sub-dataset left out gets 0, which only an inactive one may have (exclude the others instead)."""
        new = self._weight_list(weights)
        zero = [n for n, w, a in zip(self.names, new, self.active) if a and w == 0]
        if zero:
            raise DataError(f"set_weights gives active sub-datasets {zero} weight 0; exclude them instead")
        self.weights = new
        self._refresh()

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "sizes": list(self.sizes), "weights": list(self.initial_weights),
                "current_weights": list(self.weights), "seed": self.seed, "draws": self.draws,
                "passes": list(self.passes), "cursor": list(self.cursor), "active": list(self.active),
                "epoch_base": self.epoch_base, "draws_at_change": self.draws_at_change}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"names": self.names, "sizes": self.sizes, "weights": self.initial_weights, "seed": self.seed}
        for key, value in mine.items():
            if state[key] != value:
                raise DataError(f"data state was saved with {key}={state[key]}, but this mixture has "
                                f"{key}={value}; resume with the same data, seed and weights")
        self.draws, self.epoch_base = state["draws"], state["epoch_base"]
        self.draws_at_change = state["draws_at_change"]
        self.passes, self.cursor, self.active = list(state["passes"]), list(state["cursor"]), list(state["active"])
        self.weights = list(state.get("current_weights", state["weights"]))  # older states: never changed
        self._refresh()


# ----------------------------------------------------------------------------------------------------------------
# The training loader: sampler + greedy packing, one micro-batch per rank per call


class MixtureLoader:
    """Packs the sampler's documents into [B, S] micro-batches, B = max_tokens // seq_len (see the module docstring
    for the distributed contract). Each document goes into the first row of the current micro-batch with room for it;
    the first document that fits nowhere closes the micro-batch and opens the next one.

    Two levels, so that a rank's cost stays flat as world_size grows:
      - the global plan, computed alike on every rank from document lengths only: the next draws of the whole
        global round in a few vectorised numpy passes (`MixtureSampler.lookahead`), then the first-fit boundaries
        over a list of small ints (no tokens are touched);
      - rank-local packing: only this rank's micro-batch is laid out row by row and tensorized (the token copies,
        the per-document work that used to be done for every rank's micro-batch on every rank).
    With `prefetch`, the next call's micro-batch is prepared in a background thread while the caller trains on this
    one; the loader's state stays "after the last micro-batch handed out" (the thread works on a clone of the
    position), and exclude/include/set_weights/load_state_dict discard whatever was prepared ahead.
    """

    def __init__(self, splits: dict[str, TokenizedSplit], *, seq_len: int, max_tokens: int, pad_id: int, seed: int,
                 weights: dict[str, float] | None = None, rank: int = 0, world_size: int = 1,
                 prefetch: bool = False) -> None:
        if max_tokens < seq_len:
            raise ValueError(f"max_tokens={max_tokens} is less than seq_len={seq_len}: a micro-batch must hold one row")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
        longest = max(int(np.diff(s.offsets).max()) for s in splits.values())
        if longest > seq_len:
            raise ValueError(f"a document has {longest} tokens, more than seq_len={seq_len}; tokenize with the same "
                             f"seq_len")
        self.tasks = list(splits)
        self.splits = [splits[n] for n in self.tasks]
        self._lengths = [np.diff(s.offsets) for s in self.splits]
        self._shortest = min(int(n.min()) for n in self._lengths)
        self.seq_len, self.rows, self.pad_id = seq_len, max_tokens // seq_len, pad_id
        self.rank, self.world_size = rank, world_size
        self.sampler = MixtureSampler({n: len(s) for n, s in splits.items()}, seed, weights)
        self._docs_per_micro = 4.0 * self.rows  # running estimate, sizes the lookahead
        self._executor = None
        self._pending = None  # Future of (PackedBatch, sampler after it)
        if prefetch:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack")

    # -- the global plan: first-fit boundaries over document lengths -------------------------------------------

    def _first_fit(self, lens: list[int], j: int) -> tuple[list[list[int]], int] | None:
        """First-fit from document j: the positions in each row, and the first position that fits nowhere (None
        when `lens` runs out first: look further ahead)."""
        rows: list[list[int]] = [[] for _ in range(self.rows)]
        room = [self.seq_len] * self.rows
        first, shortest = 0, self._shortest  # rows before `first` have less room than any document: skip them
        while j < len(lens):
            n = lens[j]
            for b in range(first, self.rows):
                if room[b] >= n:
                    rows[b].append(j)
                    room[b] -= n
                    while first < self.rows and room[first] < shortest:
                        first += 1
                    break
            else:
                return rows, j
            j += 1
        return None

    def _plan(self, sampler: MixtureSampler) -> list[list[tuple[int, int]]]:
        """Advance `sampler` past the next global round (world_size micro-batches) and return this rank's rows as
        (sub-dataset index, document index) pairs."""
        n = int(self._docs_per_micro * self.world_size * 1.25) + 16
        while True:
            tasks, idx = sampler.lookahead(n)
            lens = np.empty(n, dtype=np.int64)
            for t in np.unique(tasks):
                sel = tasks == t
                lens[sel] = self._lengths[t][idx[sel]]
            lens_list, j, mine = lens.tolist(), 0, None
            for r in range(self.world_size):
                fit = self._first_fit(lens_list, j)
                if fit is None:
                    break
                rows, j = fit
                if r == self.rank:
                    mine = [[(int(tasks[k]), int(idx[k])) for k in row] for row in rows]
            else:
                self._docs_per_micro = 0.9 * self._docs_per_micro + 0.1 * j / self.world_size
                sampler.advance_many(tasks[:j])
                return mine
            n *= 2

    def _prepare(self, sampler: MixtureSampler) -> tuple[PackedBatch, MixtureSampler]:
        rows = self._plan(sampler)
        return pack_rows(rows, self.splits, self.seq_len, self.pad_id, self.tasks), sampler

    def _discard_prefetch(self) -> None:
        if self._pending is not None:
            self._pending.result()  # let it finish; its result describes a future that is no longer wanted
            self._pending = None

    def next_batch(self) -> PackedBatch:
        """This rank's micro-batch of the next global batch (world_size micro-batches)."""
        if self._pending is not None:
            batch, self.sampler = self._pending.result()
        else:
            batch, self.sampler = self._prepare(self.sampler.clone())
        self._pending = None
        if self._executor is not None:
            self._pending = self._executor.submit(self._prepare, self.sampler.clone())
        return batch

    def __iter__(self) -> Iterator[PackedBatch]:
        while True:
            yield self.next_batch()

    def close(self) -> None:
        """Stop the prefetch thread (idempotent)."""
        self._discard_prefetch()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def progress(self) -> float:
        """Epochs of the active mixture handed out so far (documents in returned micro-batches, all ranks)."""
        return self.sampler.progress

    @property
    def active_tasks(self) -> list[str]:
        return [n for n, a in zip(self.tasks, self.sampler.active) if a]

    def exclude(self, name: str) -> None:
        """Stop drawing sub-dataset `name`, effective from the next micro-batch (deterministic and resumable)."""
        self._discard_prefetch()
        self.sampler.exclude(name)

    def include(self, name: str) -> None:
        self._discard_prefetch()
        self.sampler.include(name)

    def set_weights(self, weights: dict[str, float]) -> None:
        """New mixture weights from the next micro-batch on (MixtureSampler.set_weights; resumable like exclude)."""
        self._discard_prefetch()
        self.sampler.set_weights(weights)

    def state_dict(self) -> dict[str, Any]:
        """Position after the last returned micro-batch; the same on every rank. Small and JSON-serialisable."""
        return {"sampler": self.sampler.state_dict(), "seq_len": self.seq_len, "rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seq_len"], state["rows"]) != (self.seq_len, self.rows):
            raise DataError(f"data state was saved with seq_len={state['seq_len']}, rows={state['rows']}, but this "
                            f"loader has seq_len={self.seq_len}, rows={self.rows}; resume with the same packing")
        self._discard_prefetch()
        self.sampler.load_state_dict(state["sampler"])


# ----------------------------------------------------------------------------------------------------------------
# Everything together: the splits of a mixture, tokenized once


@dataclass
class HeldoutExample:
    """A held-out row for generation-based eval: render `prompt` with add_generation_prompt and check the
    generation against `answer` with `checker` (eval/checkers.py)."""

    task: str
    prompt: list[dict[str, str]]
    answer: str
    checker: str = DEFAULT_CHECKER


class SFTData:
    """The train and held-out splits of every sub-dataset, tokenized with one tokenizer and seq_len.

    Sub-datasets are indexed in sorted name order, so task ids do not depend on file listing order.
    """

    def __init__(self, train: dict[str, list[Row]], heldout: dict[str, list[Row]], tokenizer: Any, *,
                 seq_len: int, truncation: str = "error") -> None:
        if set(train) != set(heldout):
            raise DataError(f"train and held-out sub-datasets differ: {sorted(train)} vs {sorted(heldout)}")
        if tokenizer.pad_id is None:
            raise DataError(f"{tokenizer.source}: the tokenizer has no pad token; set pad_token in "
                            f"tokenizer_config.json (any token works: padding never has a target)")
        self.tasks = sorted(train)
        self.seq_len, self.pad_id = seq_len, tokenizer.pad_id
        self.train = {n: tokenize_split(n, train[n], tokenizer, seq_len, truncation, "train") for n in self.tasks}
        self.heldout = {n: tokenize_split(n, heldout[n], tokenizer, seq_len, truncation, "held-out")
                        for n in self.tasks}
        self.heldout_rows = {n: [heldout[n][i] for i in self.heldout[n].kept] for n in self.tasks}

    @classmethod
    def from_dir(cls, root: str | Path, tokenizer: Any, *, seq_len: int, truncation: str = "error",
                 heldout_fraction: float | None = None, seed: int = 0, checkers: dict[str, str] | None = None,
                 columns: Mapping[str, Any] | None = None) -> "SFTData":
        train, heldout = load_split_dir(root, heldout_fraction, seed, checkers, columns)
        return cls(train, heldout, tokenizer, seq_len=seq_len, truncation=truncation)

    # -- the on-disk cache: tokenize a large mixture once per node ----------------------------------------------

    CACHE_VERSION = 1

    def save_cache(self, path: str | Path) -> None:
        """Write the tokenized splits and the held-out rows under `path`, atomically (a temporary directory renamed
        into place: readers never see half a cache; of two writers racing, the first rename wins)."""
        path = Path(path)
        if path.exists():
            return
        tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=False)
        meta: dict[str, Any] = {"version": self.CACHE_VERSION, "tasks": self.tasks, "seq_len": self.seq_len,
                                "pad_id": self.pad_id, "splits": {}}
        for i, name in enumerate(self.tasks):
            for split, ts in (("train", self.train[name]), ("heldout", self.heldout[name])):
                for field in ("ids", "loss", "offsets"):
                    np.save(tmp / f"{i}.{split}.{field}.npy", getattr(ts, field))
                meta["splits"][f"{i}.{split}"] = {"kept": ts.kept, "truncated": ts.truncated, "dropped": ts.dropped}
        rows = {n: [[r.messages, r.answer, r.where, r.checker] for r in self.heldout_rows[n]] for n in self.tasks}
        (tmp / "heldout_rows.json").write_text(json.dumps(rows))
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, path)
        except OSError:  # another process renamed its copy first
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load_cache(cls, path: str | Path) -> "SFTData":
        """A cache written by save_cache; token arrays are memory-mapped (shared by the ranks of a node)."""
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("version") != cls.CACHE_VERSION:
            raise DataError(f"{path}: tokenization cache version {meta.get('version')}, expected {cls.CACHE_VERSION}; "
                            f"delete it to rebuild")
        rows = json.loads((path / "heldout_rows.json").read_text())
        self = object.__new__(cls)
        self.tasks, self.seq_len, self.pad_id = meta["tasks"], meta["seq_len"], meta["pad_id"]
        self.train, self.heldout = {}, {}
        for i, name in enumerate(self.tasks):
            for split, out in (("train", self.train), ("heldout", self.heldout)):
                arrays = [np.load(path / f"{i}.{split}.{f}.npy", mmap_mode="r") for f in ("ids", "loss", "offsets")]
                m = meta["splits"][f"{i}.{split}"]
                out[name] = TokenizedSplit(name, *arrays, m["kept"], m["truncated"], m["dropped"])
        self.heldout_rows = {n: [Row(n, msgs, answer, where, checker) for msgs, answer, where, checker in rows[n]]
                             for n in self.tasks}
        return self

    def report(self) -> str:
        """One line per sub-dataset: sizes, tokens and what the truncation policy did."""
        lines = []
        for n in self.tasks:
            tr, ho = self.train[n], self.heldout[n]
            lines.append(f"{n}: train {len(tr)} rows {len(tr.ids)} tokens ({tr.truncated} truncated, {tr.dropped} "
                         f"dropped); held-out {len(ho)} rows ({ho.truncated} truncated, {ho.dropped} dropped)")
        return "\n".join(lines)

    def loader(self, *, max_tokens: int, seed: int, weights: dict[str, float] | None = None, rank: int = 0,
               world_size: int = 1, prefetch: bool = False) -> MixtureLoader:
        return MixtureLoader(self.train, seq_len=self.seq_len, max_tokens=max_tokens, pad_id=self.pad_id, seed=seed,
                             weights=weights, rank=rank, world_size=world_size, prefetch=prefetch)

    def heldout_batches(self, task: str, *, max_tokens: int, rank: int = 0,
                        world_size: int = 1) -> Iterator[PackedBatch]:
        """`task`'s held-out documents in order, packed like training batches. Every rank yields the same number of
        batches (trailing all-padding batches with num_loss_tokens == 0 where the split runs out), so sharded models
        whose forward is collective do not hang: sum losses and token counts, then all-reduce once."""
        if task not in self.heldout:
            raise DataError(f"unknown sub-dataset {task!r}; the mixture has {self.tasks}")
        split, t, rows_per_batch = self.heldout[task], self.tasks.index(task), max_tokens // self.seq_len
        if rows_per_batch < 1:
            raise ValueError(f"max_tokens={max_tokens} is less than seq_len={self.seq_len}")
        splits = [self.heldout[n] for n in self.tasks]
        batches: list[list[list[tuple[int, int]]]] = []
        rows: list[list[tuple[int, int]]] = [[] for _ in range(rows_per_batch)]
        room = [self.seq_len] * rows_per_batch
        for i in range(len(split)):
            n = split.length(i)
            b = next((b for b in range(rows_per_batch) if room[b] >= n), None)
            if b is None:
                batches.append(rows)
                rows, room = [[] for _ in range(rows_per_batch)], [self.seq_len] * rows_per_batch
                b = 0
            rows[b].append((t, i))
            room[b] -= n
        batches.append(rows)
        per_rank = -(-len(batches) // world_size)
        empty = [[] for _ in range(rows_per_batch)]
        for k in range(per_rank):
            j = k * world_size + rank
            yield pack_rows(batches[j] if j < len(batches) else empty, splits, self.seq_len, self.pad_id, self.tasks)

    def heldout_examples(self, task: str, *, rank: int = 0, world_size: int = 1) -> list[HeldoutExample]:
        """`task`'s held-out rows as (prompt messages, expected answer); rank r gets rows r, r + world_size, ...
        (counts differ by at most one between ranks)."""
        if task not in self.heldout_rows:
            raise DataError(f"unknown sub-dataset {task!r}; the mixture has {self.tasks}")
        return [HeldoutExample(task, row.messages[:-1], row.answer, row.checker)
                for row in self.heldout_rows[task][rank::world_size]]


def mixture_cache_key(root: str | Path, tokenizer: Any, *, seq_len: int, truncation: str,
                      heldout_fraction: float | None, seed: int, checkers: dict[str, str] | None,
                      columns: Mapping[str, Any] | None = None) -> str:
    """The cache key of a mixture directory: a digest of every data file's content (not its date), the
    tokenizer's fingerprint and every option that changes the tokenized result (column layouts included)."""
    root = Path(root)
    h = hashlib.blake2b(digest_size=16)
    carve = not (root / "heldout").is_dir()
    layouts = {name: layout(spec) for name, spec in (columns or {}).items()}
    options = {"version": SFTData.CACHE_VERSION, "tokenizer": tokenizer.fingerprint(), "seq_len": seq_len,
               "truncation": truncation, "checkers": sorted((checkers or {}).items()),
               "carve": [heldout_fraction, seed] if carve else None}
    if layouts:  # absent when unset, so the keys of existing JSONL caches stay what they were
        options["columns"] = sorted((n, lay.keys, lay.final_answer) for n, lay in layouts.items() if lay)
    h.update(json.dumps(options, sort_keys=True).encode())
    _hash_mixture_files(root, h)
    return h.hexdigest()


def _mixture_files(root: Path) -> list[Path]:
    """The files a mixture directory's rows are read from: train/ then heldout/, each in sub-dataset name order."""
    return [f for split in ("train", "heldout") for src in find_sources(root / split).values()
            for f in source_files(src)]


def _hash_mixture_files(root: Path, h: Any) -> None:
    """Every data file of a mixture directory into `h`: its path in the mixture and its content."""
    for f in _mixture_files(root):
        h.update(f"{f.relative_to(root)}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")


def data_digest(path: str, synthetic: str, seed: int) -> str:
    """What a data config reads, as a digest: every data file of the mixture at `path` (content, not dates), or,
    without a path, the rows of the built-in task set `synthetic` for `seed`. A result saved under a key made of
    the config alone would outlive a change to the data (new files in place, or train/synthetic.py's tasks); one
    keyed by this is recomputed. Computed once per process for the same data: the files' sizes and dates are part
    of the cache key, so a file changed in place is read again."""
    files = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _mixture_files(Path(path))) if path else ()
    return _data_digest(path, synthetic, seed, files)


@functools.lru_cache(maxsize=16)
def _data_digest(path: str, synthetic: str, seed: int, files: tuple) -> str:
    h = hashlib.blake2b(digest_size=16)
    if path:
        _hash_mixture_files(Path(path), h)
    else:
        for name, task in task_set_tasks(synthetic, seed).items():
            h.update(json.dumps([name, task.train, task.heldout], sort_keys=True).encode())
    return h.hexdigest()
