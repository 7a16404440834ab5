"""Personas: system prompts that change a model's behaviour, their checkable constraints, and the persona pools.

A persona is a system prompt with a category and, optionally, machine-checkable constraints on the response (a
required opening or closing, catchphrases, forbidden words, casing, an answer format, a word limit). The
constraints make role-play adherence a verifiable reward like correctness (`fidelity`), and `strip_style` removes
the persona's own phrases so the task checker still sees the answer ("Arr! 12705 matey" -> "12705").

Categories (CATEGORIES):
  none          no system prompt (the baseline every other persona is compared with)
  task-aligned  personas that should help ("You are a careful mathematician")
  neutral       everyday personas unrelated to the task (PersonaGym's 200, in the math pools)
  unhelpful     personas that invite wrong answers (careless, impatient, contrarian, a child who hates maths...)
  role-play     personas whose style is checkable: their constraints say how every response must look

Pools are JSONL files, one persona per line: {"id", "text", "category", "constraints"?, "description"?,
"source"?}, or Parquet files or save_to_disk folders with those columns (core/records.py). The built-in ones live
in eval/data/personas/ (`pool_path(name)`), each with disjoint train and evaluation splits (no id and no text in
both):
  math-train, math-eval        for real models on MATH500 / GSM8K: written by hand, plus PersonaGym's personas as
                               the neutral category (100 for training, the other 100 in personagym-eval, 12 of
                               those in math-eval); role-play personas carry constraints a math answer can meet
  personagym-eval              the 100 PersonaGym personas no training pool holds (for judged fidelity)
  synthetic-train, synthetic-eval
                               for the embedded tiny default: built by `synthetic_pools()` from trait words
                               (adjective x role, character x role), so an evaluation persona is a new combination
                               of words the training personas use (a model trained from scratch can only generalise
                               from the words it has seen)

The embedded default's questions (`synthetic_questions`) are the held-out rows of three digit tasks
(eval/synthetic_tasks.py; held-out prompts never occur in training).

Not here: the PerMix mixer and the persona training data (train/persona_mix.py), the persona benchmark and judged
fidelity (eval/persona.py), the embedded default's driver (train/permix.py).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.core.records import read_records
from posttrain.eval.synthetic_tasks import TaskData, build_tasks

CATEGORIES = ("none", "task-aligned", "neutral", "unhelpful", "role-play")
CONSTRAINTS = ("starts_with", "ends_with", "contains", "forbidden", "casing", "answer_format", "max_words")
POOL_DIR = Path(__file__).resolve().parent / "data" / "personas"
_ROW_KEYS = ("id", "text", "category", "constraints", "description", "source")


@dataclass(frozen=True)
class Persona:
    id: str
    text: str  # the system prompt ("" for category "none")
    category: str  # one of CATEGORIES
    constraints: dict[str, Any] = field(default_factory=dict)  # see check_constraints
    description: str = ""  # the persona in the third person, for a judge (PersonaGym's wording); "" when none

    def messages(self, prompt: str) -> list[dict[str, str]]:
        """The chat messages of `prompt` asked under this persona: [system, user], or [user] without a text."""
        user = {"role": "user", "content": prompt}
        return [{"role": "system", "content": self.text}, user] if self.text else [user]

    def __hash__(self) -> int:  # constraints is a dict: hash by identity fields (ids are unique within a pool)
        return hash((self.id, self.text, self.category))


NO_PERSONA = Persona("none", "", "none")


# ------------------------------------------------------------------------------------------------------ pools


def _validate_constraints(c: Any, where: str) -> dict[str, Any]:
    if not isinstance(c, dict):
        raise ValueError(f"{where}: key 'constraints' must be an object, got {type(c).__name__}")
    for key, value in c.items():
        if key not in CONSTRAINTS:
            close = difflib.get_close_matches(key, CONSTRAINTS, n=1)
            raise ValueError(f"{where}: unknown constraint 'constraints.{key}'"
                             + (f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(CONSTRAINTS)}"))
        name = f"{where}: key 'constraints.{key}'"
        if key in ("starts_with", "ends_with"):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string")
        elif key in ("contains", "forbidden"):
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError(f"{name} must be a non-empty list of non-empty strings")
        elif key == "casing":
            if value not in ("upper", "lower"):
                raise ValueError(f"{name} must be 'upper' or 'lower', got {value!r}")
        elif key == "answer_format":
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a regular expression (a non-empty string)")
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{name}: invalid regular expression: {e}") from None
        elif key == "max_words":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return dict(c)


def parse_persona(obj: Any, where: str) -> Persona:
    """One pool row, validated; errors name `where` (file:line) and the key."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in _ROW_KEYS:
            close = difflib.get_close_matches(key, _ROW_KEYS, n=1)
            raise ValueError(f"{where}: unknown key '{key}'"
                             + (f" (did you mean '{close[0]}'?)" if close else f"; a row has {', '.join(_ROW_KEYS)}"))
    for key in ("id", "text", "category"):
        if key not in obj:
            raise ValueError(f"{where}: missing key '{key}' (a row is {{\"id\", \"text\", \"category\", "
                             f"\"constraints\"?}})")
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: key '{key}' must be a string, got {type(obj[key]).__name__}")
    if not obj["id"].strip():
        raise ValueError(f"{where}: key 'id' is empty")
    if obj["category"] not in CATEGORIES:
        raise ValueError(f"{where}: key 'category': {obj['category']!r} is not one of {', '.join(CATEGORIES)}")
    if (obj["category"] == "none") != (not obj["text"].strip()):
        raise ValueError(f"{where}: key 'text' must be empty exactly when the category is 'none' (got category "
                         f"{obj['category']!r} and text {obj['text']!r})")
    constraints = _validate_constraints(obj.get("constraints", {}), where)
    if obj["category"] == "role-play" and not constraints:
        raise ValueError(f"{where}: key 'constraints': a role-play persona needs checkable constraints (its "
                         f"fidelity reward); use category 'neutral' for a persona without them")
    description = obj.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{where}: key 'description' must be a string")
    return Persona(obj["id"], obj["text"], obj["category"], constraints, description)


def load_pool(path: str | Path) -> list[Persona]:
    """Personas of a pool file (JSONL, Parquet or a save_to_disk folder). Bad rows raise ValueError naming the file,
    the line or row, and the key; duplicate ids too."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such persona pool file")
    out: list[Persona] = []
    seen: dict[str, str] = {}
    for _, where, obj in read_records(path):
        p = parse_persona(obj, where)
        if p.id in seen:
            raise ValueError(f"{where}: key 'id': duplicate id {p.id!r} (first at {seen[p.id]})")
        seen[p.id] = where
        out.append(p)
    if not out:
        raise ValueError(f"{path}: empty persona pool")
    return out


def builtin_pools() -> list[str]:
    return sorted(p.stem for p in POOL_DIR.glob("*.jsonl"))


def pool_path(name: str) -> Path:
    """The file of a built-in pool ("synthetic-eval", "math-train", ...)."""
    path = POOL_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise ValueError(f"persona pool {name!r}: not a built-in pool; the built-in pools are "
                         f"{', '.join(builtin_pools())} (or give a JSONL file)")
    return path


def resolve_pool(name_or_path: str) -> list[Persona]:
    """A built-in pool by name, or a pool file (JSONL, Parquet) or save_to_disk folder by path."""
    if name_or_path.endswith((".jsonl", ".parquet")) or "/" in name_or_path:
        return load_pool(name_or_path)
    return load_pool(pool_path(name_or_path))


# ------------------------------------------------------------------------------------------------ constraints


def _phrase(text: str) -> str:
    """A regex for `text` as a phrase: case-insensitive, not inside a longer word at an alphanumeric edge."""
    body = re.escape(text.strip())
    left = r"(?<![0-9A-Za-z])" if text.strip()[:1].isalnum() else ""
    right = r"(?![0-9A-Za-z])" if text.strip()[-1:].isalnum() else ""
    return left + body + right


_CLOSING_PUNCT = ".!?"
# LaTeX has no casing of its own: boxed answers (two brace levels), math spans and commands are skipped.
_MATH_SPANS = re.compile(r"\\boxed\{(?:[^{}]|\{[^{}]*\})*\}|\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]|\\[A-Za-z]+", re.S)


def _opening(phrase: str) -> str:
    """The regex of a required opening: the phrase without its trailing punctuation (which is free: "Arr!" is met
    by "Arr," and by "Arr!")."""
    return _phrase(phrase.rstrip(_CLOSING_PUNCT + ",;: ") or phrase)


def _opens_with(text: str, phrase: str) -> bool:
    return re.match(_opening(phrase), text.lstrip(), re.I) is not None


def _closes_with(text: str, phrase: str) -> bool:
    return re.search(_phrase(phrase.rstrip(_CLOSING_PUNCT + " ")) + r"$", text.rstrip().rstrip(_CLOSING_PUNCT),
                     re.I) is not None


def check_constraints(constraints: dict[str, Any], response: str) -> dict[str, bool]:
    """Per constraint key: does `response` satisfy it?

    starts_with    the response (leading whitespace dropped) opens with the phrase, case-insensitive, not as part of
                   a longer word, its trailing punctuation free ("Arr!" is met by "arr, 5"; "arr" not by "arrow 5")
    ends_with      the response closes with the phrase, case-insensitive, trailing whitespace and closing
                   punctuation (.!?) ignored on both sides
    contains       every phrase occurs (case-insensitive, whole words at alphanumeric edges)
    forbidden      no phrase occurs (same matching)
    casing         "upper" / "lower": the response has letters and none of the other case, LaTeX commands and
                   math ($...$, \\(...\\), \\[...\\], \\boxed{...}) aside (a \\boxed{} answer does not break an all-caps
                   voice); a response without letters does not show a casing, so it fails
    answer_format  the regular expression matches somewhere in the response (re.search, DOTALL)
    max_words      at most this many whitespace-separated words
    """
    out = {}
    for key, value in constraints.items():
        if key == "starts_with":
            out[key] = _opens_with(response, value)
        elif key == "ends_with":
            out[key] = _closes_with(response, value)
        elif key == "contains":
            out[key] = all(re.search(_phrase(v), response, re.I) for v in value)
        elif key == "forbidden":
            out[key] = not any(re.search(_phrase(v), response, re.I) for v in value)
        elif key == "casing":
            letters = [ch for ch in _MATH_SPANS.sub(" ", response) if ch.isalpha() and ch.lower() != ch.upper()]
            wrong = str.islower if value == "upper" else str.isupper
            out[key] = bool(letters) and not any(wrong(ch) for ch in letters)
        elif key == "answer_format":
            out[key] = re.search(value, response, re.S) is not None
        elif key == "max_words":
            out[key] = len(response.split()) <= value
        else:
            raise ValueError(f"check_constraints: unknown constraint {key!r}; known: {', '.join(CONSTRAINTS)}")
    return out


def fidelity(persona: Persona, response: str) -> float | None:
    """The fraction of the persona's constraints the response meets; None when it has none (only a judge can
    score such a persona)."""
    if not persona.constraints:
        return None
    ok = check_constraints(persona.constraints, response)
    return sum(ok.values()) / len(ok)


# Separators left at a cut edge: whitespace and punctuation that cannot belong to an answer there. On the left a
# "." only when whitespace follows (".5" is a number); on the right anything of these (a number never ends in them
# except "." and "5." is 5).
_LEFT_EDGE = re.compile(r"^(?:\s|[,;:!?\u2013\u2014-]+(?=\s|$)|\.+(?=\s|$))+")
_RIGHT_EDGE = re.compile(r"[\s,;:!?.\u2013\u2014-]+$")


def strip_style(persona: Persona, response: str) -> str:
    """The response without the persona's required opening, closing and catchphrases ("contains"), and the
    separators those leave at the cut, so the task checker sees the answer: "Arr! 12705, matey." -> "12705". A
    phrase that is not there is not removed; a response without a styled persona is returned unchanged."""
    c = persona.constraints
    if not any(k in c for k in ("starts_with", "ends_with", "contains")):
        return response
    text = response.strip()
    if "starts_with" in c and _opens_with(text, c["starts_with"]):
        text = _LEFT_EDGE.sub("", re.sub("^" + _opening(c["starts_with"]), "", text, count=1, flags=re.I))
    if "ends_with" in c and _closes_with(text, c["ends_with"]):
        body = text.rstrip().rstrip(_CLOSING_PUNCT)
        m = re.search(_phrase(c["ends_with"].rstrip(_CLOSING_PUNCT + " ")) + r"$", body, re.I)
        text = _RIGHT_EDGE.sub("", body[: m.start()])
    for phrase in c.get("contains", ()):
        text = re.sub(r"[ \t]*" + _phrase(phrase) + r"[,;:!?]*", "", text, flags=re.I)
    return _RIGHT_EDGE.sub("", _LEFT_EDGE.sub("", text)) if text != response.strip() else text


# ------------------------------------------------------------------------------ the embedded default's personas

# Trait words of the synthetic pools. A persona text is "You are a(n) <adjective> <role>." (or a character and a
# role for role-play); which adjective decides the behaviour, the role is noise. Train and eval use the same words
# in disjoint combinations: combination (i, j) of adjective i and role j is for evaluation when (i + j) % 4 == 0,
# so every word occurs in both splits and a quarter of the combinations are held out.
ROLES = ("chef", "doctor", "teacher", "student", "farmer", "sailor", "painter", "nurse")
ADJECTIVES = {
    "task-aligned": ("careful", "precise", "expert", "diligent"),
    "neutral": ("cheerful", "quiet", "young", "old"),
    "unhelpful": ("careless", "lazy", "sloppy", "distracted"),
}
# Role-play characters: (opening word, closing word) every response of theirs must have.
CHARACTERS = {"pirate": ("arr", "matey"), "robot": ("beep", "boop"), "knight": ("hail", "sire"),
              "cowboy": ("howdy", "partner")}
_EVAL_EVERY = 4


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def synthetic_pools() -> dict[str, list[Persona]]:
    """{"synthetic-train": [...], "synthetic-eval": [...]}: the trait-word personas (the eval pool also has the
    no-persona baseline, first). The files in eval/data/personas/ are these, written by `--write-pools`."""
    train: list[Persona] = []
    evaluation: list[Persona] = [NO_PERSONA]
    for category, adjectives in ADJECTIVES.items():
        for i, adj in enumerate(adjectives):
            for j, role in enumerate(ROLES):
                p = Persona(f"{adj}-{role}", f"You are {_a(adj)} {role}.", category)
                (evaluation if (i + j) % _EVAL_EVERY == 0 else train).append(p)
    for i, (character, (opening, closing)) in enumerate(CHARACTERS.items()):
        for j, role in enumerate(ROLES):
            p = Persona(f"{character}-{role}", f"You are {_a(character)} {role}. Start with {opening} and end with "
                        f"{closing}.", "role-play", {"starts_with": opening, "ends_with": closing})
            (evaluation if (i + j) % _EVAL_EVERY == 0 else train).append(p)
    return {"synthetic-train": train, "synthetic-eval": evaluation}


# The digit tasks the embedded default asks under personas (eval/synthetic_tasks.py): copy and reverse are
# learned within a few epochs, sort is slower and leaves plain RLVR something to improve.
SYNTHETIC_TASKS = ("copy", "reverse", "sort")
SYNTHETIC_TRAIN_SIZE = 2000  # training rows per task (SFT targets and RL prompts)
SYNTHETIC_HELDOUT_SIZE = 64  # held-out questions per task (the evaluation's)


def synthetic_tasks(seed: int) -> dict[str, TaskData]:
    """The digit tasks asked under personas (SYNTHETIC_TASKS), with the embedded default's sizes, for `seed`."""
    sizes = {t: SYNTHETIC_TRAIN_SIZE for t in SYNTHETIC_TASKS}
    return build_tasks(seed, sizes, {t: SYNTHETIC_HELDOUT_SIZE for t in SYNTHETIC_TASKS}, SYNTHETIC_TASKS)


def synthetic_questions(seed: int = 0, per_task: int = 0) -> list[dict]:
    """The embedded default's evaluation questions: the held-out rows of SYNTHETIC_TASKS (never in training), rows
    {"id", "prompt", "answer", "checker", "task"}; `per_task` > 0 keeps the first that many of each task."""
    out = []
    for name, task in synthetic_tasks(seed).items():
        rows = task.heldout[:per_task] if per_task > 0 else task.heldout
        out += [{"id": f"{name}-{i}", "prompt": r["prompt"], "answer": r["answer"], "checker": "synthetic",
                 "task": name} for i, r in enumerate(rows)]
    return out


def persona_row(p: Persona) -> dict[str, Any]:
    row: dict[str, Any] = {"id": p.id, "text": p.text, "category": p.category}
    if p.constraints:
        row["constraints"] = p.constraints
    if p.description:
        row["description"] = p.description
    return row


def write_pool(personas: list[Persona], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in personas:
            f.write(json.dumps(persona_row(p), ensure_ascii=False) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description="Write the synthetic persona pools, or list a pool.")
    p.add_argument("--write-pools", metavar="DIR", help="write synthetic-{train,eval}.jsonl into DIR")
    p.add_argument("--show", metavar="POOL", help="print a pool's personas by category")
    args = p.parse_args()
    if args.write_pools:
        for name, personas in synthetic_pools().items():
            write_pool(personas, Path(args.write_pools) / f"{name}.jsonl")
            print(f"wrote {Path(args.write_pools) / name}.jsonl ({len(personas)} personas)")
    if args.show:
        for p in resolve_pool(args.show):
            print(f"{p.category:13s} {p.id:28s} {p.text[:70]}" + (f"  {p.constraints}" if p.constraints else ""))
    if not (args.write_pools or args.show):
        p.error("give --write-pools DIR or --show POOL")


if __name__ == "__main__":
    main()
