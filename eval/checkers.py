"""Task checkers: does a generated response answer a held-out (or RL) prompt correctly?

A checker is a property of each sub-dataset (or of one row): held-out accuracy in SFT and mSFT, and rewards in
GRPO, all go through `check_batch(checker, responses, answers)`. Four checkers exist:

  exact      the response equals the answer after normalisation: Unicode NFKC, case-folded, runs of whitespace
             collapsed, outer whitespace and one trailing period dropped ("  Paris.\\n" == "paris"). Without an
             "answer" field a row's answer is its whole response (SFT data whose response is the answer).
  math       the final answer of a chain of thought (\\boxed{}, "####", "the answer is", "**Answer:**", ...)
             equals the gold up to mathematical equivalence, through eval.verify in its sandboxed worker pool
             (a timeout counts as wrong). Needs an "answer".
  choice     the multiple-choice letter the response commits to equals the gold letter ("B", "(B)"): the last
             \\boxed{X}, else the last "answer is X" / "Answer: (X)", else a response that is only the letter or
             opens with it ("B) 42", "(B)", "B."). A response that commits to no single letter is wrong. Needs an
             "answer" that is one letter A-Z.
  synthetic  the built-in tasks' own check (eval/synthetic_tasks.check: exact match up to outer whitespace).

Not here: extracting and comparing math answers (eval/verify.py), persona-fidelity rewards (eval/personas.py).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from posttrain.eval.synthetic_tasks import check as synthetic_check
from posttrain.eval.verify import verify_batch

CHECKERS = ("exact", "math", "choice", "synthetic")
NEEDS_ANSWER = {"exact": False, "math": True, "choice": True, "synthetic": True}
DEFAULT_CHECKER = "exact"


def normalize(text: str) -> str:
    """The `exact` checker's normal form (see the module docstring)."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text[:-1].rstrip() if text.endswith(".") else text


_LETTER = r"\(?\s*([A-Za-z])\s*\)?"
_BOXED_LETTER = re.compile(r"\\boxed\{\s*(?:\\text\{\s*)?\(?([A-Za-z])\)?\s*\}?\s*\}")
_ANSWER_LETTER = re.compile(r"answer\s*(?:is|:)?\s*[:\-]?\s*\**\s*(?:option\s+|choice\s+)?" + _LETTER + r"(?![A-Za-z])",
                            re.I)
_OPENING_LETTER = re.compile(r"\**\(?([A-Za-z])(?:\)|\.|:|\*\*|$)(?:\s|$)")


def choice_letter(text: str) -> str | None:
    """The letter a multiple-choice response commits to (upper case), or None (rules in the module docstring)."""
    boxed = _BOXED_LETTER.findall(text)
    if boxed:
        return boxed[-1].upper()
    stated = _ANSWER_LETTER.findall(text)
    if stated:
        return stated[-1].upper()
    m = _OPENING_LETTER.match(text.strip())
    return m.group(1).upper() if m else None


def gold_letter(answer: str) -> str | None:
    """A choice gold as one upper-case letter ("b", "(B)", " B " -> "B"), or None when it is not one letter."""
    m = re.fullmatch(r"\s*\(?\s*([A-Za-z])\s*\)?\s*", answer)
    return m.group(1).upper() if m else None


def validate(checker: str, answer: str | None, where: str) -> None:
    """Raise ValueError naming `where` when `checker` is unknown, or cannot check against `answer`."""
    if checker not in CHECKERS:
        raise ValueError(f"{where}: unknown checker {checker!r}; use one of {', '.join(CHECKERS)}")
    if answer is None and NEEDS_ANSWER[checker]:
        raise ValueError(f"{where}: checker {checker!r} needs an \"answer\" field (the gold it compares against)")
    if checker == "choice" and answer is not None and gold_letter(answer) is None:
        raise ValueError(f"{where}: checker 'choice' needs a single letter A-Z as its answer, got {answer!r}")


def check_batch(checker: str, responses: Sequence[str], answers: Sequence[str], *,
                timeout_s: float = 5.0) -> list[bool]:
    """responses[i] checked against answers[i] with one checker; math items run in eval.verify's worker pool."""
    if len(responses) != len(answers):
        raise ValueError(f"check_batch: {len(responses)} responses for {len(answers)} answers")
    if checker == "exact":
        return [normalize(r) == normalize(a) for r, a in zip(responses, answers)]
    if checker == "synthetic":
        return [synthetic_check(r, a) for r, a in zip(responses, answers)]
    if checker == "choice":
        return [choice_letter(r) is not None and choice_letter(r) == gold_letter(a) for r, a in zip(responses, answers)]
    if checker == "math":
        if not responses:
            return []
        return verify_batch(list(answers), list(responses), timeout_s=timeout_s)
    raise ValueError(f"unknown checker {checker!r}; use one of {', '.join(CHECKERS)}")


def check_rows(checkers: Sequence[str], responses: Sequence[str], answers: Sequence[str]) -> list[bool]:
    """Like check_batch, with a checker per item (grouped, so math items share one pool call)."""
    out = [False] * len(responses)
    for name in sorted(set(checkers)):
        idx = [i for i, c in enumerate(checkers) if c == name]
        for i, ok in zip(idx, check_batch(name, [responses[i] for i in idx], [answers[i] for i in idx])):
            out[i] = ok
    return out
