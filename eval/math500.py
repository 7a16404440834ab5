"""MATH500 and GSM8K scorers: completions in, accuracy out (overall, and per subject and level for MATH500).

For: evaluating a model's completions against the copies of the test sets in eval/data (see its README for sources
and licences). Verification is eval/verify.py's verify_batch (deadline per item, worker pool). A completion must
state its final answer in a convention eval.verify.extract_answer knows (\\boxed{}, "The answer is", "Answer:",
"####", ...): one that stops in its reasoning scores 0 even when the right number appears there.
Not for: generating the completions (that is the sampler's job) or prompting.
"""

import json
from collections import Counter, defaultdict
from pathlib import Path

from posttrain.eval.verify import Verifier, default_verifier

DATA = Path(__file__).resolve().parent / "data"


def load_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_math500() -> list[dict]:
    """500 rows: problem, solution, answer, subject, level, unique_id."""
    return load_jsonl(DATA / "math500.jsonl")


def load_gsm8k() -> list[dict]:
    """1,319 rows: question, answer (worked solution ending in "#### N")."""
    return load_jsonl(DATA / "gsm8k_test.jsonl")


def gsm8k_gold(answer: str) -> str:
    """The number after GSM8K's "####", without thousands separators: "#### 1,600" -> "1600"."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def _score(golds: list[str], completions: list[str], groups: dict[str, list], verifier: Verifier | None,
           timeout_s: float) -> dict:
    if len(completions) != len(golds):
        raise ValueError(
            f"eval.math500: got {len(completions)} completions for {len(golds)} problems; pass one per row, "
            "in the data's order (or pass rows= with the rows you sampled)"
        )
    verifier = verifier or default_verifier()
    reasons = verifier.verify_batch_reasons(golds, completions, timeout_s=timeout_s)
    correct = [r == "correct" for r in reasons]
    report = {
        "n": len(golds),
        "correct": sum(correct),
        "accuracy": sum(correct) / max(1, len(golds)),
        "reasons": dict(Counter(reasons)),
    }
    for name, keys in groups.items():
        hits, totals = defaultdict(int), defaultdict(int)
        for key, ok in zip(keys, correct):
            totals[key] += 1
            hits[key] += ok
        report[name] = {k: {"n": totals[k], "accuracy": hits[k] / totals[k]} for k in sorted(totals)}
    report["verdicts"] = reasons
    return report


def score_math500(completions: list[str], rows: list[dict] | None = None, *, verifier: Verifier | None = None,
                  timeout_s: float = 5.0) -> dict:
    """Accuracy of completions[i] against rows[i]["answer"] (rows default to all 500, in file order).

    Returns {"n", "correct", "accuracy", "reasons", "by_subject": {s: {"n", "accuracy"}}, "by_level": {...},
    "verdicts": [one reason per row]}.
    """
    rows = load_math500() if rows is None else rows
    groups = {"by_subject": [r["subject"] for r in rows], "by_level": [int(r["level"]) for r in rows]}
    return _score([r["answer"] for r in rows], completions, groups, verifier, timeout_s)


def score_gsm8k(completions: list[str], rows: list[dict] | None = None, *, verifier: Verifier | None = None,
                timeout_s: float = 5.0) -> dict:
    """Accuracy of completions[i] against the "####" number of rows[i] (rows default to all 1,319)."""
    rows = load_gsm8k() if rows is None else rows
    return _score([gsm8k_gold(r["answer"]) for r in rows], completions, {}, verifier, timeout_s)
