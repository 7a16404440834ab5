"""eval/verify.py on what models write: final-answer conventions, truncation, relations, matrices, sets, notation.

tests/data/verify_cases.jsonl holds hand-labelled cases, one per line: {"class", "gold", "pred", "label"}; each
class of the verifier's judgement calls has cases that must be accepted and cases that must be rejected. The
model-style completions of bench/bench_verify.py (MATH500 and GSM8K problems, labels known by construction) are
checked here too.
"""

import json
from collections import defaultdict

import pytest

from posttrain.bench.bench_verify import CONVENTIONS, completions
from posttrain.eval.math500 import load_gsm8k, load_math500
from posttrain.eval.verify import Verifier, extract_answer, verify, verify_reason
from tests.conftest import REPO
from tests.test_verify import verifier  # noqa: F401  -- the module-scoped worker pool fixture

CASES = [json.loads(line) for line in (REPO / "tests" / "data" / "verify_cases.jsonl").read_text().splitlines()
         if line.strip()]


def test_every_class_has_positive_and_negative_cases():
    labels = defaultdict(set)
    for c in CASES:
        labels[c["class"]].add(c["label"])
    assert {k for k, v in labels.items() if v != {True, False}} == {"truncated"}  # nothing to accept there
    assert len(labels) >= 12 and len(CASES) >= 150


@pytest.mark.parametrize("case", CASES, ids=[f"{c['class']}-{i}" for i, c in enumerate(CASES)])
def test_labelled_case(case):
    reason = verify_reason(case["gold"], case["pred"])
    assert (reason == "correct") == case["label"], reason


def test_batch_agrees_on_labelled_cases(verifier):
    got = verifier.verify_batch([c["gold"] for c in CASES], [c["pred"] for c in CASES])
    assert got == [c["label"] for c in CASES]


def test_model_style_completions():
    """Every problem of MATH500 and GSM8K, right and wrong answers in every convention, and cut-off completions:
    each verdict as labelled, and no truncated completion accepted."""
    made = completions(load_math500(), load_gsm8k())
    assert {k.split("/")[1] for _, _, _, k in made} >= {name for name, _ in CONVENTIONS}
    misses = [(k, g, p[-120:]) for g, p, label, k in made if (verify_reason(g, p) == "correct") != label]
    assert misses == []
    assert sum(k.startswith("truncated/") for *_, k in made) > 500


@pytest.mark.parametrize(
    "text, answer",
    [
        ("**Answer:** $\\dfrac{13}{15}$", "\\dfrac{13}{15}"),
        ("Work: $x = 1$.\n\n**Answer:** 16\n\nI checked with $x = 1$.", "16"),
        ("**Answer:**\n- $p = 6$\n- $q = 31$\n- $r = -1$", "p = 6, q = 31, r = -1"),
        ("So.\n\nAnswer: \\((3,4)\\)", "(3,4)"),
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),
        ("Thus the answer is\n$$\n7\n$$\nas claimed.", "7"),
        ("The roots are $\\boxed{-2}$ and $\\boxed{1}$.", "-2, 1"),
        ("\\boxed{3}\n\nSo again: \\boxed{3}", "3"),
        ("\\boxed{5}<|im_end|>\n<|im_start|>user\n\\boxed{6}", "5"),
        ("We had $\\boxed{4}$ before; finally \\boxed{", None),  # cut off inside the last box
        ("Step 1: $x = 5$.\nSo the answer is", None),  # cut off after a marker, before the answer
        ("Step 1: $x = 5$.\nStep 2: multiply by", None),  # no final answer: no number from the reasoning
        ("This answer is correct: the answer is 12.", "12"),
        ("The final answer is 12. This answer is correct.", "12"),  # a remark after the answer is skipped
        ("Answer \\[ 9 \\]", "9"),
        ("Answer $ 9 $", "9"),
        ("#### 31 paintings", "31 paintings"),
        ("To answer this, look at the answer choices: 3 or 5.\nThen we", None),  # "answer" before a word: no marker
        ("Final Answer:\n1. $p = 6$\n2. $q = 31$", "p = 6, q = 31"),
    ],
)
def test_extract_conventions(text, answer):
    assert extract_answer(text) == answer


def test_decimals_are_exact_unless_a_tolerance_is_asked():
    assert not verify("\\frac{20000}{\\pi}", "6366.2")
    assert verify("\\frac{20000}{\\pi}", "6366.2", rel_tol=1e-4)
    assert not verify("\\frac{9}{256}", "0.03515626")
    assert verify("\\frac{9}{256}", "0.03515626", rel_tol=1e-6)
    assert verify("\\frac{9}{256}", "0.03515625")
    with Verifier(workers=1, rel_tol=1e-4) as v:  # the pool path passes the caller's tolerance on
        assert v.verify_batch(["\\frac{20000}{\\pi}", "\\frac{20000}{\\pi}"], ["6366.2", "6360"]) == [True, False]


def test_relations_floats_cannot_decide_go_to_sympy(verifier):
    # Sides scaled by e^{-40} are below the float stage's floor: the worker's sympy ratio decides, sign included.
    golds = ["e^{-40} x < e^{-40}", "-e^{-40} x < -e^{-40}", "-e^{-40} x < -e^{-40}"]
    preds = ["x < 1", "x < 1", "x > 1"]
    assert verifier.verify_batch_reasons(golds, preds) == ["correct", "wrong", "correct"]
    assert [verify_reason(g, p) for g, p in zip(golds, preds)] == ["correct", "wrong", "correct"]
