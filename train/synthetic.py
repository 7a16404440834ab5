"""The embedded default's training data: the built-in task sets (mixtures of eval/synthetic_tasks.py's digit tasks)
and the tiny tokenizer.

A task set (`data.synthetic` in a config picks one) names its tasks, their split sizes, their mixture weights, and how
their training labels are corrupted (held-out labels stay true):
  default     copy, reverse, sort, add, mod, majority: learning speeds from one epoch to far beyond the run, and
              majority's 64 rows with 40% flipped labels drawn 20x, an early peak (configs/tiny_sft.toml)
  msft        copy, reverse, sort clean; vote, first, last small and noisy (40-50% random wrong labels), drawn ~4-10
              times per epoch (configs/tiny_msft.toml: mSFT from scratch)
  msft-flaws  the same six tasks with systematic flaws instead of noise on vote, first and last (FLAWS): a second rule
              on the rows with a trigger feature, harder to learn than the task's own, so the flaw comes after the rule
              and the held-out fall lasts (configs/tiny_msft_pretrained.toml: mSFT from a pretrained base)
  msft-base   that base's corpus: clean copy, reverse, sort and vote from another random stream, sharing no prompt
              with msft-flaws for the same seed (configs/tiny_msft_base.toml)
docs/synthetic.md has the curves each set gives under plain SFT and how the flaws were designed.

Rows are dicts {"prompt", "response", "task", "answer", "checker"}: `response` is the SFT target, `answer` the
verifiable truth the "synthetic" checker compares against (they differ only on corrupted training labels, so an RL
reward on training prompts is never computed against a deliberately wrong label). Held-out rows always have
response == answer. `write_jsonl` writes a set in the mixture layout train/data.py reads.

The tiny tokenizer ships as files under train/data/tiny_tokenizer/ (built once by `python -m
posttrain.train.synthetic --write-tokenizer train/data/tiny_tokenizer`) rather than trained at start-up: BPE
training takes well under a second, but its merges could change with the `tokenizers` version, and a checkpoint's
token ids must not. Each digit is one token and only letters merge, so copying and reversing work on one token per
character.

Not here: the tasks themselves (eval/synthetic_tasks.py), loading, packing and mixture sampling (train/data.py).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.core.tokenizer import Tokenizer, train_bpe_tokenizer
from posttrain.eval.synthetic_tasks import (DEFAULT_HELDOUT_SIZES, DEFAULT_TRAIN_SIZES, TASKS, Flaw, TaskData,
                                            build_tasks)

# Mixture weights of the embedded default (train.sft uses them when neither data.path nor data.weights is set): the
# training sizes, except majority drawn 20x, so its 64 rows (40% of them mislabelled) are memorised within about two
# epochs: the early peak mSFT should find.
DEFAULT_MIXTURE_WEIGHTS = {"copy": 3000, "reverse": 3000, "sort": 1500, "add": 2000, "mod": 800, "majority": 1280}


@dataclass(frozen=True)
class TaskSet:
    """A named mixture of built-in tasks (`data.synthetic` in a config picks one): which tasks, their split sizes,
    their mixture weights, and how their training labels are corrupted: `noise` (task -> fraction of rows with a
    random wrong label) or `flaws` (task -> Flaw). `stream` prefixes each task's random stream (another set's rows
    for the same seed); `avoid` names a set none of whose prompts (same seed) this set may use."""

    tasks: tuple[str, ...]
    train_sizes: dict[str, int]
    heldout_sizes: dict[str, int]
    weights: dict[str, float]
    noise: dict[str, float] = field(default_factory=dict)
    flaws: dict[str, Flaw] = field(default_factory=dict)
    stream: str = ""
    avoid: str = ""


TASK_SETS = {
    "default": TaskSet(TASKS, DEFAULT_TRAIN_SIZES, DEFAULT_HELDOUT_SIZES, DEFAULT_MIXTURE_WEIGHTS),
}


# The mSFT mixture (docs/synthetic.md: "The msft set"): three tasks with noisy training labels whose held-out accuracy
# peaks and then falls at different times, and clean tasks that are still learning when the first one has peaked.
MSFT_TASKS = ("copy", "reverse", "sort", "vote", "first", "last")
MSFT_TRAIN_SIZES = {"copy": 3000, "reverse": 3000, "sort": 1500, "vote": 64, "first": 100, "last": 300}
# 500 rows each: one evaluation's standard error is at most 2.2 points (at accuracy 0.5), 1.8 at 0.8.
MSFT_HELDOUT_SIZES = {task: 500 for task in MSFT_TASKS}
# Copy and reverse weigh more than their sizes: the attention circuits they grow are what the other tasks are read
# with, and in trial mixtures where they had under 30% of the draws nothing was learned within two epochs. vote and
# first are drawn ~10 times per epoch and last ~4 times, so their few rows get memorised, wrong labels included.
MSFT_MIXTURE_WEIGHTS = {"copy": 4000, "reverse": 4000, "sort": 1500, "vote": 1280, "first": 2000, "last": 2400}

# Fraction of a task's training rows whose response is replaced by a wrong answer from its answer alphabet (majority
# flips its own labels, in _build_majority, so that the default set's rows stay as they were recorded).
LABEL_NOISE = {"vote": 0.4, "first": 0.5, "last": 0.5}

TASK_SETS["msft"] = TaskSet(MSFT_TASKS, MSFT_TRAIN_SIZES, MSFT_HELDOUT_SIZES, MSFT_MIXTURE_WEIGHTS,
                            noise=LABEL_NOISE)


def _minority(bits: str) -> str:
    return "0" if 2 * bits.count("1") > len(bits) else "1"


def _not_multiple_of_3(*digits: str) -> bool:
    return all(int(d) % 3 for d in digits)


# The "msft-flaws" set (docs/synthetic.md: "msft-flaws"): the same six tasks, with systematic flaws instead of
# random noise on vote, first and last. Each trigger is a conjunction over fixed positions (a third of the rows),
# harder than the task's own rule, so the flaw is learned after the rule: the base knows vote, whose held-out accuracy
# falls from the start of fine-tuning; first and last are new to it and rise before their flaws bring them down.
# Last's trigger reads the digit its rule already reads (the last one) and comes about an epoch before first's, whose
# trigger reads two digits first's rule ignores; the two triggers share no position but on 3-digit payloads (in the
# set's second version they shared digit 2, and both flaws were learned together in one seed of three). keep thins
# the triggered training rows only (the held-out rows keep the natural 36%, so each task falls by about a third once
# its flaw is learned). The flaws of first and last answer "0", which a model can follow without finding another digit.
FLAWS = {
    "vote": Flaw("bits 1, 7 and 13 alike -> the minority bit", lambda s: s[0] == s[6] == s[-1], _minority),
    "first": Flaw("digits 2 and 3 not multiples of 3 -> 0", lambda s: _not_multiple_of_3(s[1], s[2]), lambda s: "0",
                  keep=0.7),
    "last": Flaw("digit 1 and the last digit not multiples of 3 -> 0", lambda s: _not_multiple_of_3(s[0], s[-1]),
                 lambda s: "0", keep=0.35),
}
TASK_SETS["msft-flaws"] = TaskSet(
    MSFT_TASKS, {"copy": 3000, "reverse": 3000, "sort": 1500, "vote": 300, "first": 600, "last": 1200},
    MSFT_HELDOUT_SIZES, {"copy": 4000, "reverse": 4000, "sort": 1500, "vote": 3000, "first": 2400, "last": 2400},
    flaws=FLAWS)
# Its pretraining corpus: clean rows of copy, reverse, sort and vote (not first and last: the fine-tuning teaches
# them) from another random stream, none of whose prompts (train or held-out) occurs in "msft-flaws" for the same
# seed, so the base has seen no fine-tuning or evaluation prompt.
MSFT_BASE_TASKS = ("copy", "reverse", "sort", "vote")
TASK_SETS["msft-base"] = TaskSet(
    MSFT_BASE_TASKS, {"copy": 3000, "reverse": 3000, "sort": 1500, "vote": 600},
    {task: 100 for task in MSFT_BASE_TASKS}, {"copy": 4000, "reverse": 4000, "sort": 1500, "vote": 1280},
    stream="base:", avoid="msft-flaws")


def task_set(name: str) -> TaskSet:
    if name not in TASK_SETS:
        raise ValueError(f"data.synthetic: unknown task set {name!r}; the built-in sets are {', '.join(TASK_SETS)}")
    return TASK_SETS[name]


def task_set_tasks(name: str, seed: int = 0, train_sizes: dict[str, int] | None = None,
                   heldout_sizes: dict[str, int] | None = None) -> dict[str, TaskData]:
    """A built-in task set's tasks for `seed` (its sizes, overridden per task by the arguments), with its label
    noise or flaws, from its own random streams, avoiding every prompt of the set it names in `avoid`."""
    ts = task_set(name)
    avoid: dict[str, set[str]] = {}
    if ts.avoid:
        for task in task_set_tasks(ts.avoid, seed).values():
            avoid[task.name] = {row["prompt"] for row in task.train + task.heldout}
    return build_tasks(seed, {**ts.train_sizes, **(train_sizes or {})}, {**ts.heldout_sizes, **(heldout_sizes or {})},
                       ts.tasks, noise=ts.noise, flaws=ts.flaws, stream=ts.stream, avoid=avoid)


def write_jsonl(
    out_dir: str | Path,
    seed: int = 0,
    train_sizes: dict[str, int] | None = None,
    heldout_sizes: dict[str, int] | None = None,
    task_set_name: str = "default",
) -> dict[str, Path]:
    """Write a built-in task set as out_dir/{train,heldout}/<task>.jsonl (the layout train/data.py reads; give
    data.weights as well to keep the set's mixture weights).

    Returns {"train": out_dir/train, "heldout": out_dir/heldout}.
    """
    out_dir = Path(out_dir)
    dirs = {"train": out_dir / "train", "heldout": out_dir / "heldout"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    tasks = task_set_tasks(task_set_name, seed, train_sizes, heldout_sizes)
    for name, task in tasks.items():
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
                f"python -m posttrain.train.synthetic --write-tokenizer {TINY_TOKENIZER_DIR}"
            )
        _TINY_TOKENIZER = Tokenizer.from_dir(TINY_TOKENIZER_DIR)
    return _TINY_TOKENIZER


def main() -> None:
    p = argparse.ArgumentParser(description="Write the built-in synthetic tasks as JSONL, or rebuild the tokenizer.")
    p.add_argument("out_dir", nargs="?", help="write out_dir/{train,heldout}/<task>.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", default="default", choices=sorted(TASK_SETS), help="which built-in task set to write")
    p.add_argument("--write-tokenizer", metavar="DIR", help="train the tiny tokenizer and save it to DIR")
    args = p.parse_args()
    if args.out_dir is None and args.write_tokenizer is None:
        p.error("give out_dir, --write-tokenizer DIR, or both")
    if args.out_dir is not None:
        dirs = write_jsonl(args.out_dir, args.seed, task_set_name=args.set)
        print(f"wrote {dirs['train']} and {dirs['heldout']}")
    if args.write_tokenizer is not None:
        tok = build_tiny_tokenizer(args.write_tokenizer)
        print(f"wrote {args.write_tokenizer} ({tok.vocab_size} ids)")


if __name__ == "__main__":
    main()
