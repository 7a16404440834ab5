"""Built-in verifiable text tasks for the embedded tiny default (SFT mixture search and RLVR on a CPU).

Each task has a train split, a disjoint held-out split (both deterministic given a seed) and an exact-match checker,
so the same data serves SFT (`prompt` -> `response`), held-out loss, generation-based accuracy and RL rewards.
Prompts are a task word and a short payload ("reverse 50721" -> "12705"), tens of tokens at most, so a
few-million-parameter transformer trained from scratch on two CPU cores can learn most of them in minutes. Every
payload is digits: the tiny tokenizer (`tiny_tokenizer()`) makes each digit one token and only merges letters, so
copying, reversing and adding work on one token per character (a merged "12" would make reversal a lookup table).

The tasks differ on purpose in learning speed and training-set size, so that multi-task SFT mixture search (mSFT)
sees sub-datasets whose held-out scores peak at different times:

  task      example                    train  designed for
  copy      copy 50721 -> 50721         1000  fast once an induction head forms; then saturates and stays
  reverse   reverse 50721 -> 12705      1000  medium: copy plus position arithmetic, so after copy
  sort      sort 31415 -> 11345         1000  early: counting digits needs no induction; partial credit comes first
  add       add 123+45 -> 168           2000  slow: carries; the biggest set so it keeps improving late
  mod       mod 4821%7 -> 5             1000  slowest: long division in the head; may stay near chance (1/7) on CPU
  majority  majority 1011001 -> 1         40  overfits first: a tiny fixed set with 10 of 40 training labels
                                              flipped; held-out labels are clean, so held-out loss and accuracy improve
                                              while the rule is learned, then degrade as the flipped labels are
                                              memorised (the classic early-stopping curve)

Measured (the tiny model of configs/tiny_sft.toml shape, 3.2M params, 1024-token micro-batches, AdamW lr 2e-3, seed
0, 3 epochs = 419 steps, ~6.5 min on a shared 2-core CPU), held-out exact match at 1 / 2 / 3 epochs: sort
0.20 / 0.30 / 0.41, copy 0.00 / 0.01 / 0.01, reverse 0.01 / 0.01 / 0.03, add 0.00 throughout, mod at chance
(0.13 / 0.15 / 0.16); majority 0.56 / 0.58 / 0.23 with held-out loss lowest at 1.25 epochs (0.33) and 1.21 at 3
epochs: the early peak mSFT should find. So within minutes on a CPU the order is majority (peaks and overfits),
sort (learns), then the rest; copy/reverse need longer runs for their induction heads to form.

Rows are dicts {"prompt", "response", "task", "answer"}: `response` is the SFT target, `answer` the verifiable truth
that `check` compares against (they differ only on majority's flipped training rows, so an RL reward on training
prompts is never computed against a deliberately wrong label). Held-out rows always have response == answer.

The tiny tokenizer ships as files under train/data/tiny_tokenizer/ (built once by `python -m train.synthetic
--write-tokenizer train/data/tiny_tokenizer`) rather than trained at start-up: BPE training takes well under a
second, but its merges could change with the `tokenizers` version, and a checkpoint's token ids must not.

Not here: general-purpose data loading, packing and mixture sampling (train/data.py).
"""

from __future__ import annotations

import argparse
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.tokenizer import Tokenizer, train_bpe_tokenizer

TASKS = ("copy", "reverse", "sort", "add", "mod", "majority")
DEFAULT_TRAIN_SIZES = {"copy": 1000, "reverse": 1000, "sort": 1000, "add": 2000, "mod": 1000, "majority": 40}
DEFAULT_HELDOUT_SIZES = {"copy": 128, "reverse": 128, "sort": 128, "add": 128, "mod": 128, "majority": 64}

MOD_DIVISOR = 7
MAJORITY_BITS = 7  # odd, so there is never a tie
MAJORITY_FLIP_FRACTION = 0.25


def check(response: str, answer: str) -> bool:
    """Exact match, tolerant of surrounding whitespace only ("  168\\n" matches "168"; "0168" and "16 8" do not)."""
    return response.strip() == answer.strip()


@dataclass
class TaskData:
    """One task: rows of {"prompt", "response", "task", "answer"} for each split, and its checker."""

    name: str
    train: list[dict]
    heldout: list[dict]
    check: Callable[[str, str], bool]


# Each generator draws one (prompt, answer) pair from its task's input space using the given random stream.


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 8)))


def _gen_copy(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return f"copy {s}", s


def _gen_reverse(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return f"reverse {s}", s[::-1]


def _gen_sort(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return f"sort {s}", "".join(sorted(s))


def _gen_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"add {a}+{b}", str(a + b)


def _gen_mod(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(10, 9999)
    return f"mod {n}%{MOD_DIVISOR}", str(n % MOD_DIVISOR)


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy": _gen_copy,
    "reverse": _gen_reverse,
    "sort": _gen_sort,
    "add": _gen_add,
    "mod": _gen_mod,
}
# How many distinct prompts each task can produce: a request beyond it could never be met with unique rows.
_SPACE = {
    "copy": sum(10**n for n in range(3, 9)),
    "reverse": sum(10**n for n in range(3, 9)),
    "sort": sum(10**n for n in range(3, 9)),
    "add": 1000 * 1000, "mod": 9990, "majority": 2**MAJORITY_BITS}


def _row(task: str, prompt: str, response: str, answer: str) -> dict:
    return {"prompt": prompt, "response": response, "task": task, "answer": answer}


def _sample_unique(task: str, rng: random.Random, n: int, taken: set[str]) -> list[tuple[str, str]]:
    out = []
    while len(out) < n:
        prompt, answer = _GENERATORS[task](rng)
        if prompt not in taken:
            taken.add(prompt)
            out.append((prompt, answer))
    return out


def _build_majority(seed: int, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(f"{seed}:majority")
    bits = [format(i, f"0{MAJORITY_BITS}b") for i in range(2**MAJORITY_BITS)]
    rng.shuffle(bits)

    def truth(s: str) -> str:
        return "1" if s.count("1") * 2 > len(s) else "0"

    heldout = [_row("majority", f"majority {s}", truth(s), truth(s)) for s in bits[:n_heldout]]
    train_bits = bits[n_heldout : n_heldout + n_train]
    flipped = set(rng.sample(range(n_train), round(MAJORITY_FLIP_FRACTION * n_train)))
    train = []
    for i, s in enumerate(train_bits):
        label = truth(s)
        response = ("0" if label == "1" else "1") if i in flipped else label
        train.append(_row("majority", f"majority {s}", response, label))
    return train, heldout


def build_tasks(
    seed: int = 0,
    train_sizes: dict[str, int] | None = None,
    heldout_sizes: dict[str, int] | None = None,
    tasks: tuple[str, ...] | list[str] = TASKS,
) -> dict[str, TaskData]:
    """The built-in tasks, deterministic given `seed` (same rows on every machine and Python >= 3.10).

    `train_sizes` / `heldout_sizes` override the defaults per task. Held-out rows are drawn first from each task's
    own random stream, so they do not change when only the training size changes; training rows never repeat a
    held-out prompt or each other.
    """
    train_sizes = {**DEFAULT_TRAIN_SIZES, **(train_sizes or {})}
    heldout_sizes = {**DEFAULT_HELDOUT_SIZES, **(heldout_sizes or {})}
    out = {}
    for task in tasks:
        if task not in _SPACE:
            raise ValueError(f"build_tasks: unknown task {task!r}; the built-in tasks are {', '.join(TASKS)}")
        n_train, n_heldout = train_sizes[task], heldout_sizes[task]
        if n_train < 1 or n_heldout < 1 or n_train + n_heldout > _SPACE[task]:
            raise ValueError(
                f"build_tasks: task {task!r} asked for {n_train} train + {n_heldout} held-out rows; each must be >= 1"
                f" and together at most {_SPACE[task]} (the number of distinct prompts); lower the sizes"
            )
        if task == "majority":
            train, heldout = _build_majority(seed, n_train, n_heldout)
        else:
            rng = random.Random(f"{seed}:{task}")
            taken: set[str] = set()
            heldout = [_row(task, p, a, a) for p, a in _sample_unique(task, rng, n_heldout, taken)]
            train = [_row(task, p, a, a) for p, a in _sample_unique(task, rng, n_train, taken)]
        out[task] = TaskData(task, train, heldout, check)
    return out


def write_jsonl(
    out_dir: str | Path,
    seed: int = 0,
    train_sizes: dict[str, int] | None = None,
    heldout_sizes: dict[str, int] | None = None,
) -> dict[str, Path]:
    """Write the built-in tasks as out_dir/{train,heldout}/<task>.jsonl (the layout train/data.py reads).

    Returns {"train": out_dir/train, "heldout": out_dir/heldout}.
    """
    out_dir = Path(out_dir)
    dirs = {"train": out_dir / "train", "heldout": out_dir / "heldout"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for name, task in build_tasks(seed, train_sizes, heldout_sizes).items():
        for split, rows in (("train", task.train), ("heldout", task.heldout)):
            with open(dirs[split] / f"{name}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
    return dirs


# ----------------------------------------------------------------------------------------------------------------
# The embedded tiny tokenizer

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "tiny_tokenizer"
TINY_VOCAB_SIZE = 512

# Plain English for the BPE merges of everyday words, so persona system prompts (PerMix) cost a token per word or so
# rather than one per byte. Written for this file; digits stay single tokens whatever the corpus holds.
_ENGLISH = """\
You are a helpful assistant. Answer the question with the number only. Think step by step and then give the answer.
You are a pirate captain who speaks with a rough voice and loves the sea. You are a patient teacher who explains
each idea slowly and kindly. You are a cheerful robot from the future. You are a grumpy old librarian who wants
quiet. You are a famous chef and you talk about food all the time. You are a calm doctor who cares for people.
You are a young student who is curious about the world and asks many questions. You are a detective who notices
every small detail. You are a poet who answers in short lines. You are an engineer who likes exact numbers.
Stay in character, keep your answers short and correct, and do not change who you are when the user asks you to.
"""


def _tokenizer_corpus() -> list[str]:
    """Texts the tiny BPE trains on: role names, the task prompts and responses of seed 0, and `_ENGLISH`.

    Conversations are given as their parts, not rendered: the trainer does not treat special-token strings as
    special, so rendered templates would spend merges on pieces of "<|im_start|>".
    """
    texts = _ENGLISH.split("\n")
    for task in build_tasks(seed=0).values():
        texts += [row["prompt"] for row in task.train] + [row["response"] for row in task.train]
    # Role names once per conversation, as the template writes them, so each becomes a single token.
    return texts + ["system", "user", "assistant"] * (len(texts) // 2)


def build_tiny_tokenizer(out_dir: str | Path | None = None) -> Tokenizer:
    """Train the embedded tokenizer (byte-level BPE, 512 ids, ChatML template, digits one token each).

    Deterministic for a given `tokenizers` version; writes the directory to `out_dir` when given.
    """
    return train_bpe_tokenizer(_tokenizer_corpus(), vocab_size=TINY_VOCAB_SIZE, out_dir=out_dir)


_TINY_TOKENIZER: Tokenizer | None = None


def tiny_tokenizer() -> Tokenizer:
    """The embedded default tokenizer, loaded once from train/data/tiny_tokenizer/."""
    global _TINY_TOKENIZER
    if _TINY_TOKENIZER is None:
        if not (TINY_TOKENIZER_DIR / "tokenizer.json").exists():
            raise FileNotFoundError(
                f"{TINY_TOKENIZER_DIR}/tokenizer.json: missing; the package was installed without its data files. "
                f"Reinstall from the repository (pip install -e .) or rebuild it with "
                f"python -m train.synthetic --write-tokenizer {TINY_TOKENIZER_DIR}"
            )
        _TINY_TOKENIZER = Tokenizer.from_dir(TINY_TOKENIZER_DIR)
    return _TINY_TOKENIZER


def main() -> None:
    p = argparse.ArgumentParser(description="Write the built-in synthetic tasks as JSONL, or rebuild the tokenizer.")
    p.add_argument("out_dir", nargs="?", help="write out_dir/{train,heldout}/<task>.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-tokenizer", metavar="DIR", help="train the tiny tokenizer and save it to DIR")
    args = p.parse_args()
    if args.out_dir is None and args.write_tokenizer is None:
        p.error("give out_dir, --write-tokenizer DIR, or both")
    if args.out_dir is not None:
        dirs = write_jsonl(args.out_dir, args.seed)
        print(f"wrote {dirs['train']} and {dirs['heldout']}")
    if args.write_tokenizer is not None:
        tok = build_tiny_tokenizer(args.write_tokenizer)
        print(f"wrote {args.write_tokenizer} ({tok.vocab_size} ids)")


if __name__ == "__main__":
    main()
