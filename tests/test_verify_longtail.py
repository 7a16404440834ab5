"""eval/verify.py on the long tail (issue 31) and on hedged answers (issue 34): hand-labelled cases per class, the
approximation rule and its switch, the final-answer region.

tests/data/verify_longtail.jsonl holds {"class", "gold", "pred", "label"} per line, written for these rules (none
is taken from math-verify's tests): relations in ASCII and LaTeX, answers without a marker, matrix sums and
products, approximations, several answers, inequalities against intervals, golds that are worked solutions, and
hedging. tests/data/verify_heldout.jsonl holds cases written after the rules were final (docs/verifier.md).
"""

import json
from collections import defaultdict

import pytest

from posttrain.eval.latex import SIG_DIGITS
from posttrain.eval.verify import (Verifier, _answer_of, _cheap, _expensive, _gold_answer, extract_answer, verify,
                                   verify_reason)
from tests.conftest import REPO
from tests.test_verify import POOL_GOLD, POOL_PRED, verifier  # noqa: F401  -- the module-scoped pool fixture


def _load(name: str) -> list[dict]:
    path = REPO / "tests" / "data" / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


CASES = _load("verify_longtail.jsonl")
HELDOUT = _load("verify_heldout.jsonl")


def test_every_class_has_positive_and_negative_cases():
    labels = defaultdict(set)
    for c in CASES:
        labels[c["class"]].add(c["label"])
    assert {k for k, v in labels.items() if v != {True, False}} == set()
    assert set(labels) == {"ascii_relation", "closing_sentence", "matrix_expression", "approximation",
                           "several_answers", "inequality_interval", "gold_solution", "hedging"}
    assert len(CASES) == 132


@pytest.mark.parametrize("case", CASES, ids=[f"{c['class']}-{i}" for i, c in enumerate(CASES)])
def test_labelled_case(case):
    reason = verify_reason(case["gold"], case["pred"])
    assert (reason == "correct") == case["label"], (reason, extract_answer(case["pred"]))
    answer = _answer_of(case["pred"])
    if answer is not None:  # the in-process stage alone gives the same verdict: no case here needs sympy
        assert _cheap(_gold_answer(case["gold"]), answer, 0.0, SIG_DIGITS)[0] == reason


def test_heldout_cases():
    """Cases written after the rules were final: accuracy is reported in docs/verifier.md, and asserted here."""
    wrong = [(c["class"], c["gold"], c["pred"][-80:]) for c in HELDOUT
             if (verify_reason(c["gold"], c["pred"]) == "correct") != c["label"]]
    assert len(HELDOUT) == 120
    assert len(wrong) == HELDOUT_MISSES, wrong


# The first run of the held-out cases missed 2 of 120 (docs/verifier.md, "Held-out accuracy"): a hedge after a boxed
# answer inside a math span, and "x equals 4" read as bare math. Both are fixed; the set is held out no longer.
HELDOUT_MISSES = 0


def test_batch_agrees_on_labelled_cases(verifier):
    got = verifier.verify_batch([c["gold"] for c in CASES], [c["pred"] for c in CASES])
    assert got == [c["label"] for c in CASES]


# ---------------------------------------------------------------------------------------------------------------
# The approximation rule: a decimal matches a rational gold when it is the gold rounded to its own places and has at
# least k significant digits (k = SIG_DIGITS by default, switchable; 0 turns the rule off).


def test_approximation_rule_and_its_switch():
    assert SIG_DIGITS == 4
    assert verify("\\frac{1}{12}", "0.08333")  # 4 significant digits, rounded
    assert not verify("\\frac{1}{12}", "0.0833")  # 3
    assert verify("\\frac{1}{12}", "0.0833", sig_digits=3)
    assert not verify("\\frac{1}{12}", "0.08333", sig_digits=0)  # off: decimals are exact values
    assert verify("\\frac{1}{8}", "0.125", sig_digits=0)  # exact decimals stay exact
    assert not verify("\\frac{1}{12}", "0.08334")  # not the rounding (nor a truncation)
    assert not verify("\\frac{2}{3}", "0.6666")  # a truncation is not the rounding
    assert verify("\\frac{1}{12}", "0.08333", rel_tol=0.0, sig_digits=5) is False
    assert not verify("\\pi", "3.1416")  # irrational golds: exact forms only, whatever k
    assert not verify("\\pi", "3.1416", sig_digits=1)
    assert verify("\\pi", "3.1416", rel_tol=1e-4)  # the caller's tolerance still works


def _echo_sig_digits(gold: str, answer: str, rel_tol: float, sig_digits: int) -> str:
    """Worker check: "correct" exactly when the pool passed sig_digits 7 and rel_tol 0.5 on."""
    return "correct" if (sig_digits, rel_tol) == (7, 0.5) else "wrong"


def test_pool_passes_the_approximation_switch_on():
    with Verifier(workers=1, sig_digits=7, rel_tol=0.5, check="tests.test_verify_longtail:_echo_sig_digits") as v:
        assert v.verify_batch_reasons([POOL_GOLD], [POOL_PRED]) == ["correct"]
    with Verifier(workers=1, sig_digits=3) as v:  # decided in-process: the same switch
        assert v.verify_batch(["\\frac{1}{12}"] * 2, ["0.0833", "0.083"]) == [True, False]
    assert _expensive("\\frac{1}{12}", "0.0833", 0.0, 3) == "correct"
    assert _expensive("\\frac{1}{12}", "0.0833", 0.0, 4) == "wrong"


# ---------------------------------------------------------------------------------------------------------------
# The final-answer region: what extraction returns when a statement names several candidates.


@pytest.mark.parametrize(
    "text, answer",
    [
        ("The answer is $7$ or $8$.", "7; 8"),
        ("The answer is $8$ or $7$.", "8; 7"),
        ("Final answer: $7$ (or $8$).", "7; 8"),
        ("The final answer is 7, although 8 is also possible.", "7; 8"),
        ("The answer is 7. Alternatively, it could be 8.", "7; 8"),
        ("The answer is 8. The answer is 7.", "8; 7"),
        ("The answer is 8.\n\nWait, no. The answer is 7.", "8; 7"),
        ("The answer is 8.\n\nRecheck: $3 + 4 = 7$. The answer is 7.", "7"),  # reasoning between: a correction
        ("\\boxed{7}\n\nAlternatively: \\boxed{8}", "7; 8"),
        ("\\boxed{7} or possibly \\boxed{8}", "7; 8"),
        ("The answer is $7$.\n\nI checked it with $x = 8$ and $y = 9$.", "7"),  # a remark names no candidate
        ("The answer is $7$ (I checked it with $x = 8$).", "7"),
        ("The answer is 7, not 8.", "7, not 8"),  # one sentence read whole: "7, not 8" is no answer
        ("The answer is $\\frac{1}{2}$ (or $0.5$).", "\\frac{1}{2}; 0.5"),  # one value twice: compares as one
        ("The answer is $7$ or $7$.", "7"),
        ("Since $x=\\boxed{4},$ we are done.", "4"),  # the box's span closes before the remark
        ("The final answer is $\\boxed{4}$.\n\nAlternatively, it could be $5$.", "4; 5"),  # after the span closes
        ("x equals 4", "4"),
        ("Thus $q >= 3$ is our answer.", "q >= 3"),  # one line, no marker: its one math span
        ("So we get $a = 2$ and the answer follows from $b = 3$", None),  # two spans and no statement
        ("Long reasoning here.\nMore reasoning: $x = 2$.\nTherefore, the total is 12.", None),  # may be cut off
        ("Long reasoning here.\nMore reasoning: $x = 2$.\nTherefore, the total is 12.<|im_end|>", "12"),
    ],
)
def test_final_answer_region(text, answer):
    assert extract_answer(text) == answer


def test_hedged_region_is_wrong_unless_the_gold_is_a_set():
    assert verify_reason("7", "The answer is $7$ or $8$.") == "wrong"
    assert verify_reason("\\{7, 8\\}", "The answer is $7$ or $8$.") == "correct"
    assert verify_reason("7, 8", "The answer is $8$, or possibly $7$.") == "correct"
    assert verify_reason("(7, 8)", "The answer is $7$, $8$.") == "correct"  # a tuple, in its order
    assert verify_reason("(8, 7)", "The answer is $7$, $8$.") == "wrong"
    assert verify_reason("\\frac{1}{2}", "The answer is $\\frac{1}{2}$ (or $0.5$).") == "correct"
    assert verify_reason("7", "The answer is 7, although 8 is also possible.") == "wrong"
    # The last statement names nothing readable: no answer, never an earlier statement it replaced.
    assert verify_reason("7", "The answer is $7$.\n\nFinal answer: seven or eight apples") == "unparseable"


# ---------------------------------------------------------------------------------------------------------------
# bench/verify_agreement.py reads math-verify's tests with ast: which cases count (checked on a file written here).

FAKE_TESTS = '''
import pytest

@pytest.mark.parametrize("gold,pred,expected", [("$1$", "$1$", 1), ("$1$", "$2$", 0), ("$1$", "$1$", 1), (f(), "x", 1)])
def test_plain(gold, pred, expected):
    assert compare_strings(gold, pred, match_types=["latex", "expr"]) == expected

@pytest.mark.parametrize("gold, pred, expected, precision", [("$1/3$", "$0.33$", 1, 2)])
def test_with_precision(gold, pred, expected, precision):
    assert compare_strings(gold, pred, match_types=["latex", "expr"], precision=precision) == expected

@pytest.mark.parametrize("gold,pred,expected", [("1", "1", 1)])
def test_expr_only(gold, pred, expected):
    assert compare_strings(gold, pred, match_types=["expr"]) == expected

@pytest.mark.parametrize("gold,pred,expected", [("$x$", "$y$", 0)])
def test_not_strict(gold, pred, expected):
    assert compare_strings(gold, pred, match_types=["latex"], strict=False) == expected
'''


def test_agreement_harness_reads_default_configuration_cases_only(tmp_path):
    from posttrain.bench.verify_agreement import read_cases

    (tmp_path / "test_fake.py").write_text(FAKE_TESTS)
    cases = read_cases([str(tmp_path)])
    # test_plain: 2 distinct literal triples (a repeat and a computed one skipped); test_with_precision: 1 with its
    # precision; expr-only and strict=False tests are not the default configuration.
    assert [(c["id"], c["expected"], c["precision"]) for c in cases] == [
        ("test_fake.py::test_plain[0]", True, None), ("test_fake.py::test_plain[1]", False, None),
        ("test_fake.py::test_with_precision[0]", True, 2)]
    assert cases[0]["match_types"] == ["latex", "expr"]
