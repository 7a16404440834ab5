"""The built-in verifiable digit tasks: what each task asks, how its rows are drawn, and how an answer is checked.

Each task has a train split, a disjoint held-out split (both deterministic given a seed) and an exact-match checker,
so the same rows serve SFT (`prompt` -> `response`), held-out loss, generation-based accuracy and RL rewards. They
are the embedded default's benchmark: the synthetic persona questions (eval/personas.py) and every built-in training
mixture (train/synthetic.py picks tasks, sizes, weights and label flaws) are drawn here.

  task      example                        rule
  copy      copy 50721 -> 50721            the payload
  reverse   reverse 50721 -> 12705         the payload reversed
  sort      sort 31415 -> 11345            its digits in ascending order
  add       add 12+45 -> 57                the sum (operands 0-99)
  mod       mod 821%4 -> 1                 the remainder by 4 (0-999)
  first     first 50721 -> 5               the first digit
  last      last 50721 -> 1                the last digit
  majority  majority 11101111011 -> 1      the majority bit of 11, only clear majorities (>= 8 alike)
  vote      vote 1110111101101 -> 1        the majority bit of 13, only clear majorities (>= 9 alike)

Payloads are 3-5 digits, tens of tokens at most, and every payload character is one token of the tiny tokenizer
(train/synthetic.py), so a few-million-parameter model trained from scratch on two CPU cores learns most tasks in
minutes. The tasks differ in learning speed on purpose (sort and add need many epochs, copy and reverse a few):
docs/synthetic.md has the measured curves.

`build_tasks(seed, sizes, ...)` draws held-out rows first from each task's own random stream, so they do not change
when only the training size does; training rows never repeat a held-out prompt. Training labels can be corrupted on
request (the held-out rows stay true): random wrong answers on a fraction of the rows (`noise`), or a systematic
`Flaw`, a second rule on the rows with a trigger feature.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

TASKS = ("copy", "reverse", "sort", "add", "mod", "majority")
DEFAULT_TRAIN_SIZES = {"copy": 3000, "reverse": 3000, "sort": 1500, "add": 2000, "mod": 800, "majority": 64}
DEFAULT_HELDOUT_SIZES = {"copy": 128, "reverse": 128, "sort": 128, "add": 128, "mod": 128, "majority": 128}

@dataclass(frozen=True)
class Flaw:
    """A systematic label error: a training row whose payload has the `trigger` feature gets `response(payload)`
    instead of the true answer (held-out rows keep the truth). Unlike random label noise, which a model memorises
    row by row while keeping the rule, a flaw is a second rule: once learned it applies to every held-out row with
    the feature, so held-out accuracy falls by about the feature's frequency and stays down.

    `keep` < 1 makes triggered rows rarer in the training split only: a training draw with the trigger is kept with
    that probability (the held-out split keeps the feature's natural frequency). Fewer flawed rows teach the flaw
    later, after the rule, so the task first rises near 1.0 and then falls by the feature's held-out share."""

    what: str
    trigger: Callable[[str], bool]
    response: Callable[[str], str]
    keep: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"Flaw {self.what!r}: keep={self.keep} must be in (0, 1]")


MIN_DIGITS, MAX_DIGITS = 3, 5
ADD_MAX = 99
MOD_MAX = 999
MOD_DIVISOR = 4
MAJORITY_BITS = 11
# Only strings with a clear majority (>= 8 of 11 bits the same): the rule is then learned within the first epoch, so
# the held-out curve shows the rise and the later decline from memorising flipped labels, not a slow counting task.
MAJORITY_MARGIN = 5
MAJORITY_FLIP_FRACTION = 0.4
# msft's vote: majority of 13 bits, again only clear ones (>= 9 alike), 2,186 strings: room for 500 held-out rows,
# which majority's 464 clear strings of 11 bits do not have.
VOTE_BITS, VOTE_MARGIN = 13, 5


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
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS)))


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
    a, b = rng.randint(0, ADD_MAX), rng.randint(0, ADD_MAX)
    return f"add {a}+{b}", str(a + b)


def _gen_mod(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, MOD_MAX)
    return f"mod {n}%{MOD_DIVISOR}", str(n % MOD_DIVISOR)


def _gen_first(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return f"first {s}", s[0]


def _gen_last(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return f"last {s}", s[-1]


def _is_clear_vote(bits: int) -> bool:
    return abs(2 * bits.bit_count() - VOTE_BITS) >= VOTE_MARGIN


def _gen_vote(rng: random.Random) -> tuple[str, str]:
    while not _is_clear_vote(b := rng.getrandbits(VOTE_BITS)):
        pass
    s = format(b, f"0{VOTE_BITS}b")
    return f"vote {s}", "1" if 2 * s.count("1") > VOTE_BITS else "0"


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy": _gen_copy,
    "reverse": _gen_reverse,
    "sort": _gen_sort,
    "add": _gen_add,
    "mod": _gen_mod,
    "first": _gen_first,
    "last": _gen_last,
    "vote": _gen_vote,
}
# How many distinct prompts each task can produce: a request beyond it could never be met with unique rows.
_SPACE = {
    "copy": sum(10**n for n in range(MIN_DIGITS, MAX_DIGITS + 1)),
    "reverse": sum(10**n for n in range(MIN_DIGITS, MAX_DIGITS + 1)),
    "sort": sum(10**n for n in range(MIN_DIGITS, MAX_DIGITS + 1)),
    "add": (ADD_MAX + 1) ** 2,
    "mod": MOD_MAX + 1,
    "majority": sum(abs(2 * i.bit_count() - MAJORITY_BITS) >= MAJORITY_MARGIN for i in range(2**MAJORITY_BITS)),
    **{t: sum(10**n for n in range(MIN_DIGITS, MAX_DIGITS + 1)) for t in ("first", "last")},
    "vote": sum(_is_clear_vote(i) for i in range(2**VOTE_BITS)),
}


_ANSWER_ALPHABETS = {"vote": "01", "first": string.digits, "last": string.digits}


def _row(task: str, prompt: str, response: str, answer: str) -> dict:
    return {"prompt": prompt, "response": response, "task": task, "answer": answer, "checker": "synthetic"}


def _sample_unique(task: str, rng: random.Random, n: int, taken: set[str],
                   flaw: Flaw | None = None) -> list[tuple[str, str]]:
    """n distinct (prompt, answer) pairs not in `taken` (which they join); with a flaw whose keep < 1, a triggered
    draw is kept with probability keep (the coin comes from the same stream, so the rows stay deterministic)."""
    out = []
    while len(out) < n:
        prompt, answer = _GENERATORS[task](rng)
        if flaw is not None and flaw.keep < 1.0 and flaw.trigger(prompt.split(" ", 1)[1]) and rng.random() >= flaw.keep:
            continue
        if prompt not in taken:
            taken.add(prompt)
            out.append((prompt, answer))
    return out


def _noisy_responses(task: str, rng: random.Random, pairs: list[tuple[str, str]], rate: float) -> dict[int, str]:
    """{training row index: its wrong response} for a fraction `rate` of the rows (none when rate is 0)."""
    if not rate:
        return {}
    alphabet = _ANSWER_ALPHABETS[task]
    out = {}
    for i in sorted(rng.sample(range(len(pairs)), round(rate * len(pairs)))):
        out[i] = rng.choice([c for c in alphabet if c != pairs[i][1]])
    return out


def _build_majority(seed: int, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(f"{seed}:majority")
    bits = [format(i, f"0{MAJORITY_BITS}b") for i in range(2**MAJORITY_BITS)
            if abs(2 * i.bit_count() - MAJORITY_BITS) >= MAJORITY_MARGIN]
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
    *,
    noise: dict[str, float] | None = None,
    flaws: dict[str, Flaw] | None = None,
    stream: str = "",
    avoid: dict[str, set[str]] | None = None,
) -> dict[str, TaskData]:
    """The built-in tasks, deterministic given `seed` (same rows on every machine and Python >= 3.10).

    `train_sizes` / `heldout_sizes` override the defaults per task (the "default" set's; a task outside it needs
    both). Held-out rows are drawn first from each task's own random stream (named by `stream`, the seed and the
    task), so they do not change when only the training size changes; training rows never repeat a held-out prompt,
    each other, or a prompt in `avoid[task]`. A task in `noise` gets random wrong responses on that fraction of its
    training rows, drawn after the rows from the same stream; a task in `flaws` gets its flaw's response on every
    training row with the trigger. Task sets (task_set_tasks) pass their own; the default is clean rows.
    """
    noise, flaws, avoid = noise or {}, flaws or {}, avoid or {}
    train_sizes = {**DEFAULT_TRAIN_SIZES, **(train_sizes or {})}
    heldout_sizes = {**DEFAULT_HELDOUT_SIZES, **(heldout_sizes or {})}
    out = {}
    for task in tasks:
        if task not in _SPACE:
            raise ValueError(f"build_tasks: unknown task {task!r}; the built-in tasks are {', '.join(_SPACE)}")
        if task not in train_sizes or task not in heldout_sizes:
            raise ValueError(f"build_tasks: task {task!r} has no default size; give it in train_sizes and "
                             f"heldout_sizes (or use a task set: task_set('msft').train_sizes)")
        n_train, n_heldout = train_sizes[task], heldout_sizes[task]
        space = _SPACE[task] - len(avoid.get(task, ()))
        if n_train < 1 or n_heldout < 1 or n_train + n_heldout > space:
            raise ValueError(
                f"build_tasks: task {task!r} asked for {n_train} train + {n_heldout} held-out rows; each must be >= 1"
                f" and together at most {space} (the number of distinct prompts it may use); lower the sizes"
            )
        if task == "majority":
            train, heldout = _build_majority(seed, n_train, n_heldout)
        else:
            rng = random.Random(f"{stream}{seed}:{task}")
            taken: set[str] = set(avoid.get(task, ()))
            heldout = [_row(task, p, a, a) for p, a in _sample_unique(task, rng, n_heldout, taken)]
            pairs = _sample_unique(task, rng, n_train, taken, flaws.get(task))
            wrong = _noisy_responses(task, rng, pairs, noise.get(task, 0.0))
            if task in flaws:
                flaw = flaws[task]
                wrong.update({i: flaw.response(p.split(" ", 1)[1]) for i, (p, _) in enumerate(pairs)
                              if flaw.trigger(p.split(" ", 1)[1])})
            train = [_row(task, p, wrong.get(i, a), a) for i, (p, a) in enumerate(pairs)]
        out[task] = TaskData(task, train, heldout, check)
    return out
