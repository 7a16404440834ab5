"""eval/verify.py + eval/latex.py: extraction, equivalences, near misses, adversarial input, the worker pool."""

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from posttrain.eval.latex import MAX_CHARS, SIG_DIGITS, Refused, parse_answer
from posttrain.eval.math500 import DATA, gsm8k_gold, load_gsm8k, load_math500, score_gsm8k, score_math500
from posttrain.eval.verify import (Verifier, _answer_of, _cheap, _expensive, _gold_answer, extract_answer, verify,
                                   verify_batch, verify_reason)
from tests.conftest import REPO, SHARED_DATA

SENTINEL = "/tmp/posttrain_verify_pwned"

# Pairs the cheap stages cannot decide (floats underflow), so they go to the worker pool.
POOL_GOLD, POOL_PRED = "e^{-40}", "e^{-40} + 0"


def _hang_on_41(gold: str, answer: str, rel_tol: float, sig_digits: int) -> str:
    """Worker check for the pool tests: hangs on answers mentioning 41, otherwise the real sympy stage."""
    if "41" in answer:
        time.sleep(600)
    return _expensive(gold, answer, rel_tol, sig_digits)


def _allocate_on_41(gold: str, answer: str, rel_tol: float, sig_digits: int) -> str:
    if "41" in answer:
        blob = bytearray(8 << 30)  # 8 GiB: past the worker's RLIMIT_AS
        return str(len(blob))
    return _expensive(gold, answer, rel_tol, sig_digits)


@pytest.fixture(scope="module")
def verifier():
    v = Verifier(workers=2, timeout_s=2.0)
    yield v
    v.close()


# ---------------------------------------------------------------------------------------------------------------
# MATH500 and GSM8K


def test_data_copies_match_shared():
    for name in ("math500.jsonl", "gsm8k_test.jsonl"):
        if (SHARED_DATA / name).exists():
            assert (DATA / name).read_bytes() == (SHARED_DATA / name).read_bytes(), name
    assert "MIT" in (DATA / "README.md").read_text()


def test_math500_every_gold_verifies_against_its_solution(verifier):
    rows = load_math500()
    assert len(rows) == 500
    # Every solution's last \boxed{} holds exactly the gold answer, except one that boxes the value twice, joined
    # by "or" (alternatives in one answer region: a set whose elements all equal the gold, so not a hedge).
    extracted = [extract_answer(r["solution"]) for r in rows]
    missed = [(r["answer"], a) for r, a in zip(rows, extracted) if a != r["answer"]]
    assert missed == [("\\frac{639}{40}", "15\\frac{39}{40}; \\frac{639}{40}")]
    reasons = verifier.verify_batch_reasons([r["answer"] for r in rows], [r["solution"] for r in rows])
    assert reasons == ["correct"] * 500
    # And every gold answer parses with our grammar, so the structured stages are reachable for all of them.
    for r in rows:
        parse_answer(r["answer"])


def test_math500_swapped_answers_are_rejected(verifier):
    rows = load_math500()
    golds = [r["answer"] for r in rows]
    swapped = ["\\boxed{" + rows[(i + 1) % 500]["answer"] + "}" for i in range(500)]
    reasons = verifier.verify_batch_reasons(golds, swapped)
    accepted = [(golds[i], rows[(i + 1) % 500]["answer"]) for i, r in enumerate(reasons) if r == "correct"]
    # The only accepted swaps state the same value: "5" vs "x=5", and two identical neighbours.
    assert accepted == [("5", "x=5"), ("7", "7"), ("3", "3")]
    assert reasons.count("wrong") == 497


def test_math500_scorer_per_subject_and_level(verifier):
    rows = load_math500()
    completions = [r["solution"] if i % 2 == 0 else "I give up." for i, r in enumerate(rows)]
    report = score_math500(completions, verifier=verifier)
    assert report["n"] == 500 and report["correct"] == 250 and report["accuracy"] == 0.5
    by_level = report["by_level"]
    for level in range(1, 6):
        expect = sum(1 for i, r in enumerate(rows) if r["level"] == level and i % 2 == 0)
        total = sum(1 for r in rows if r["level"] == level)
        assert by_level[level]["n"] == total
        assert by_level[level]["accuracy"] == pytest.approx(expect / total)
    assert sum(s["n"] for s in report["by_subject"].values()) == 500
    with pytest.raises(ValueError, match="completions for 500 problems"):
        score_math500(completions[:3], verifier=verifier)


def test_gsm8k_scorer(verifier):
    rows = load_gsm8k()[:200]
    assert gsm8k_gold("So 3 + 4 = 7\n#### 1,600") == "1600"
    golds = [gsm8k_gold(r["answer"]) for r in rows]
    # The reference solutions themselves (#### N), prose with a thousands separator, and off-by-one answers.
    assert score_gsm8k([r["answer"] for r in rows], rows, verifier=verifier)["accuracy"] == 1.0
    prose = [f"She makes ${int(g):,} in total." for g in golds]
    assert score_gsm8k(prose, rows, verifier=verifier)["accuracy"] == 1.0
    off = [f"The answer is {int(g) + 1}." for g in golds]
    assert score_gsm8k(off, rows, verifier=verifier)["correct"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    "text, answer",
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\fbox{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed 5.", "5."),
        ("Therefore, the answer is 42.", "42"),
        ("The answer is: $x = 3$\nDone", "x = 3"),
        ("Janet sells 9 eggs.\n#### 18", "18"),
        ("we get 3, then 4.5, and finally 1,200 apples", None),  # no final answer: no number from the reasoning
        ("She makes $1,600 in total.", "1,600"),  # one sentence, one number: that is the answer
        ("no numbers here", None),
        ("\\boxed{unclosed", None),
        ("", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("junk", [None, 3, b"\\boxed{1}", "{" * 10_000, "}" * 10_000, "\\boxed" * 10_000, "\x00\\"])
def test_extract_answer_never_raises(junk):
    extract_answer(junk)


# ---------------------------------------------------------------------------------------------------------------
# Equivalences and near misses (in-process verify and the batch path must agree)

EQUIVALENT = [
    ("\\frac{14}{3}", "14/3"),
    ("\\frac{14}{3}", "4\\frac{2}{3}"),
    ("14/3", "4\\frac{2}{3}"),
    ("0.5", "\\frac12"),
    ("\\dfrac{33}{100}", "0.33"),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"),
    ("90^\\circ", "90"),
    ("\\$18", "18"),
    ("\\$18.90", "18.9"),
    ("1,000", "1000"),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
    ("x=5", "5"),
    ("5", "x = 5"),
    ("6+9i", "9i+6"),
    ("1 - 12i", "-12i + 1"),
    ("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1-\\sqrt5, 1+\\sqrt5"),
    ("3, 5, 7", "7, 3, 5"),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}"),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}"),
    ("\\begin{pmatrix} -7 \\\\ 16 \\\\ 5 \\end{pmatrix}", "(-7, 16, 5)"),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(3,\\infty)\\cup(-\\infty,2)"),
    ("\\left(\\frac{3}{5},\\frac{8}{3}\\right]", "(0.6, \\frac{8}{3}]"),
    ("x \\in [-2,7]", "[-2, 7]"),
    ("2\\sqrt{5}", "\\sqrt{20}"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("12\\pi", "\\pi \\cdot 12"),
    ("\\frac{20000}{\\pi}", "20000/\\pi"),
    ("y = 2x + 3", "2x - y + 3 = 0"),
    ("5x - 7y + 11z + 4 = 0", "-10x + 14y - 22z - 8 = 0"),
    ("x^3+3x-6", "3x + x^3 - 6"),
    ("6r^2-4r-24", "2(3r^2 - 2r - 12)"),
    ("(a+5)(b+2)", "ab + 2a + 5b + 10"),
    ("\\cot x", "\\frac{\\cos x}{\\sin x}"),
    ("\\frac{11+9a}{20}", "\\frac{11}{20} + \\frac{9a}{20}"),
    ("15\\mbox{ cm}^2", "15"),
    ("5.4 \\text{ cents}", "5.4"),
    ("\\text{Evelyn}", "evelyn"),
    ("\\text{(C)}", "C"),
    ("\\text{(C)}", "(C)"),
    ("204_5", "204_{5}"),
    ("50\\%", "50"),
    ("\\frac{1}{2004!}", "\\frac{1}{2004 \\cdot 2003!}"),
    ("\\log_2 8", "3"),
    ("\\binom{5}{2}", "10"),
    ("1.25", "\\frac{5}{4}"),
    ("6.72\\times10^{-5}", ".0000672"),
    # Repeating decimals are exact rationals (refused as "unparseable" before the grammar knew \overline).
    ("\\frac{1}{3}", "0.\\overline{3}"),
    ("\\frac{7}{12}", "0.58\\overline{3}"),
    ("\\frac{1030}{9999}", "0.\\overline{1030}"),
    ("-\\frac{4}{3}", "-1.\\overline3"),
    ("-5", "\u22125"),  # unicode minus
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2"),
    ("[2, \\infty)", "[2,\\infty)"),
    # A gold that lists one value written two ways is that value.
    ("\\frac{639}{40}, 15\\frac{39}{40}", "\\frac{639}{40}"),
    # An exact value that equals a decimal gold, followed by its rounding ("\\frac18 = 0.125 rounds to 0.13").
    ("0.125", "\\frac{1}{8} \\approx 0.13"),
    # "a \\approx b" against a decimal gold b: a must round to b at b's places, exactly for a rational a.
    ("0.13", "\\frac{125000000001}{1000000000000} \\approx 0.13"),
    ("4.5", "\\sqrt{20} \\approx 4.5"),
    ("(-\\infty, \\frac{1}{2})", "(-\\infty, 0.5)"),  # infinities compare by sign
    ("(2, \\infty)", "(2, +\\infty)"),
    ("0.13", "\\frac{1}{8} \\approx 0.13"),  # a tie rounds either way
    ("0.12", "\\frac{1}{8} \\approx 0.12"),
    # An equation scaled so that one side is small at every evaluation point (values in [1.2, 2.9]).
    ("x + y = 5", "\\frac{x}{100} + \\frac{y}{100} = \\frac{1}{20}"),
    ("\\frac{x}{100} + \\frac{y}{100} = \\frac{1}{20}", "x + y = 5"),
    # The gold's elements are compared as golds: 0.3333 is 1/3 rounded (the approximation rule reads gold, then pred).
    ("\\frac{1}{3}, \\frac{2}{6}", "0.3333"),
    ("\\sqrt{2}", "1.41421356237310"),  # a decimal equal to an irrational to float precision (1e-12 relative)
    ("x < 5", "2x < 10"),  # one variable: compared as intervals
    ("y < 2x + 1", "2y < 4x + 2"),  # two: as half-planes, the sides' ratio a positive constant (here 1/2)
    ("y < 2x + 1", "-y > -2x - 1"),
    ("\\frac{2469}{20000}", "0.1235"),  # 0.12345: the approximation rule at a tie, either way
    ("\\frac{2469}{20000}", "0.1234"),
    ("204_5", "204"),  # a base-5 answer written without its base: the digits as written
]

NEAR_MISSES = [
    ("5", "-5"),
    ("-\\frac{24}{25}", "\\frac{24}{25}"),
    ("(15,-29)", "(15,29)"),
    ("(1,-16,-4,43)", "(1,-16,-4,42)"),
    ("(3, \\frac{\\pi}{2})", "(\\frac{\\pi}{2}, 3)"),
    ("3, 5, 7", "3, 5"),
    ("\\{1\\pm\\sqrt{5},-2\\}", "1+\\sqrt5, 1-\\sqrt5"),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}"),
    ("3x-y+13=0", "3x+4y+14=0"),
    ("\\frac{1}{2004!}", "\\frac{1}{2006!}"),
    ("(3,4]", "(3,4)"),
    ("(2,\\infty)", "[2,\\infty)"),
    ("\\pi", "\\frac{355}{113}"),
    ("\\pi", "3.14"),
    ("\\sqrt{2}", "1.414"),
    ("x^3+3x-6", "x^3+3x+6"),
    ("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\begin{pmatrix} -1 & 0 \\\\ 0 & 1 \\end{pmatrix}"),
    ("\\text{Evelyn}", "Navin"),
    ("326.5", "326"),
    ("6+9i", "6-9i"),
    ("y = 2x + 3", "y = 2x - 3"),
    ("2k+2", "2k+1"),
    ("\\frac{1}{3}", "0.\\overline{30}"),  # 30/99
    ("\\frac{1}{3}", "0.3\\overline{4}"),
    # A percentage answer is the number before the sign, as MATH and GSM8K grade it: 10\% is 10, so 0.1 is wrong.
    ("10\\%", "0.1"),
    ("\\frac{639}{40}, 16", "\\frac{639}{40}"),
    ("5", "5, 6"),
    ("0.13", "\\frac{124999999999}{1000000000000} \\approx 0.13"),  # 1e-12 short of rounding to 0.13
    ("4.4", "\\sqrt{20} \\approx 4.4"),  # 4.47... rounds to 4.5
    ("0.29", "\\frac{2}{7} \\approx \\frac{29}{100}"),  # not a decimal literal: no rounding to check
    ("1.0", "1 + i \\approx 1.0"),  # a complex value rounds to no real decimal
    ("\\infty", "10^{100}"),
    ("-\\infty", "\\infty"),
    ("x < 5", "-x < -5"),  # scaled by a negative constant: the other half-line
    ("y < 2x + 1", "-y < -2x - 1"),  # the other half-plane
    ("\\frac{2469}{20000}", "0.1236"),
    ("204_5", "204_6"),
]


@pytest.mark.parametrize("gold, pred", EQUIVALENT)
def test_equivalent_rewrites_verify(gold, pred):
    assert verify_reason(gold, pred) == "correct"
    assert verify_reason(gold, f"So the final answer is $\\boxed{{{pred}}}$.") == "correct"


@pytest.mark.parametrize("gold, pred", NEAR_MISSES)
def test_near_misses_are_rejected(gold, pred):
    assert verify_reason(gold, pred) == "wrong"


@pytest.mark.parametrize("gold, pred, want", [(g, p, "correct") for g, p in EQUIVALENT] +
                         [(g, p, "wrong") for g, p in NEAR_MISSES if (g, p) != ("\\pi", "\\frac{355}{113}")])
def test_the_in_process_stage_decides_these_without_sympy(gold, pred, want):
    """The cheap stage (exact rationals, floats at random points) settles every case above by itself but one (pi
    against 355/113, equal to 7 digits: sympy's). A judge that deferred more would still be right, only slower: the
    verifier's throughput rests on this stage, so its tolerances are checked here, where the sympy stage cannot
    hide them."""
    assert _cheap(_gold_answer(gold), _answer_of(pred), 0.0, SIG_DIGITS)[0] == want


# Words as elements of a list, in any order and beside numbers. Boxed: a bare list of words is prose, not an answer.
WORD_LISTS = [
    ("Evelyn, Navin", "Navin, Evelyn", "correct"),
    ("Evelyn; Navin", "\\text{Navin}; \\text{Evelyn}", "correct"),
    ("(\\text{A}, 3)", "(\\text{ A }, 3)", "correct"),
    ("Evelyn, Navin", "Evelyn, Luna", "wrong"),
    ("Evelyn, Navin", "Evelyn, Navin, Luna", "wrong"),
    ("(\\text{A}, 3)", "(\\text{B}, 3)", "wrong"),
]


@pytest.mark.parametrize("gold, pred, reason", WORD_LISTS)
def test_lists_of_words(gold, pred, reason):
    assert verify_reason(gold, f"The answer is $\\boxed{{{pred}}}$.") == reason


def test_batch_agrees_with_verify(verifier):
    golds = [g for g, _ in EQUIVALENT + NEAR_MISSES]
    preds = [p for _, p in EQUIVALENT + NEAR_MISSES]
    expect = [True] * len(EQUIVALENT) + [False] * len(NEAR_MISSES)
    assert verifier.verify_batch(golds, preds) == expect
    assert verify_batch(golds, preds, timeout_s=2.0) == expect  # the lazily created default Verifier


def test_tolerance_is_configurable():
    # Decimals are exact values unless the caller asks for a tolerance.
    assert not verify("0.3333333", "\\frac{1}{3}")
    assert verify("0.3333333", "\\frac{1}{3}", rel_tol=1e-6)
    assert not verify("0.333", "\\frac{1}{3}")
    assert verify("0.333", "\\frac{1}{3}", rel_tol=1e-2)
    assert not verify("\\frac{1000001}{1000000}", "1")  # exact answers compare exactly, whatever the tolerance
    # The tolerance is relative to the larger value, its bound included: |1 - 2| = 0.5 * 2.
    assert verify("1", "2.0", rel_tol=0.5) and not verify("1", "2.1", rel_tol=0.5)
    assert verify("100", "101.005", rel_tol=0.01)  # 1.005 <= 0.01 * 101.005, not 0.01 * 100
    assert verify("\\sqrt{2}", "1.5", rel_tol=0.06)  # irrational gold, floats: 0.0858 <= 0.06 * 1.5, not * 1.414
    assert not verify("\\sqrt{2}", "1.5", rel_tol=0.05)


def test_sympy_stage_decides_what_floats_cannot(verifier):
    """e^{-40} is below the float comparison's floor, and 100 pi is 35500/113 to 7 digits: the in-process stage
    leaves these to a worker's sympy stage, values and equations alike (one side of the equation tiny at every
    point)."""
    cases = [(POOL_GOLD, POOL_PRED, "correct"), (POOL_GOLD, "e^{-41}", "wrong"),
             ("x = 1", "e^{-40} x = e^{-40}", "correct"), ("e^{-40} x = e^{-40}", "x = 1", "correct"),
             ("x = 1", "e^{-40} x = e^{-41}", "wrong"),
             ("100\\pi", "\\frac{35500}{113}", "wrong")]  # equal to 7 digits: floats cannot tell
    assert [_cheap(g, p, 0.0, SIG_DIGITS)[0] for g, p, _ in cases] == ["undecided"] * len(cases)
    assert verifier.verify_batch_reasons([g for g, _, _ in cases], [p for _, p, _ in cases]) == [w for *_, w in cases]


def test_reasons():
    assert verify_reason("5", "I do not know.") == "unparseable"
    assert verify_reason("5", "\\boxed{5 \\sqcup 3}") == "unparseable"
    assert verify_reason("5", "\\boxed{6}") == "wrong"
    assert verify_reason("5", "\\boxed{5}") == "correct"


# ---------------------------------------------------------------------------------------------------------------
# Adversarial input and the sandbox

ADVERSARIAL = [
    "\\boxed{9^{9^{9^{9^{9}}}}}",
    "9^{9^{9^{9^{9}}}}",
    "\\boxed{10^{10^{10^{10}}}!}",
    "10^{10^{10^{10}}}!",
    "\\boxed{(10^{10^{10}})!}",
    "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    "\\boxed{" + "7" * 1_000_000 + "}",
    "x" * 1_000_000,
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "{" * 10_000,
    "\\boxed{" + "(" * 5_000 + "1" + ")" * 5_000 + "}",
    "\\boxed{(x+1)^{9999} - (x+1)^{9998}(x+1)}",
    # Extraction: many unclosed or joined boxes (one backward scan, not one per box), long runs after a marker.
    "\\boxed{" * 100_000,
    "\\boxed{1} and " * 60_000,
    "answer" + " " * 5_000 + "x",
    "**Answer:**" + "\n- $p = 6$" * 50_000,
    "x < " * 300 + "1",
    # The final-answer region (issue 34): long chains of hedges, statements and links, all bounded.
    "The answer is " + "7 or " * 200_000 + "6.",
    "The answer is $5$" + " (or $6$)" * 100_000,
    "The final answer is x = 1.0" + ", although 2 is also possible" * 30_000,
    "The answer is 5." + " Alternatively, 6." * 100_000,
    "The answer is 6. Wait, no. " * 50_000 + "The answer is 7.",
    "The answer is " + "therefore " * 100_000 + "$5$",
    "$" * 1_000_000,
    "We compute. " * 50_000 + "Therefore, the value is 5 or 6.<|im_end|>",
    # Long runs of spaces where a pattern could start at every space (each once cost ~1 s: quadratic scans).
    "x answer" + " " * 4_900 + "y",
    "The answer is 7" + " " * 4_900 + "x",
    "We compute." + " " * 4_900 + "Therefore 7 is it.<|im_end|>",
    "Final answer: 7, although" + " " * 4_900 + "8",
]
PAYLOADS = [
    f"__import__('os').system('touch {SENTINEL}')",
    f"(lambda: __import__('os').system('touch {SENTINEL}'))()",
    f"lambda x: __import__('os').system('touch {SENTINEL}')",
]
for _p in PAYLOADS:
    ADVERSARIAL += [_p, f"\\boxed{{{_p}}}", f"\\boxed{{1 + {_p}}}", f"\\frac{{{_p}}}{{2}}", f"The answer is {_p}.",
                    f"#### {_p}", f"\\boxed{{x = {_p}}}", f"\\boxed{{({_p}, 1)}}"]


def test_adversarial_inputs_return_within_deadline_and_run_no_code(verifier):
    if os.path.exists(SENTINEL):
        os.remove(SENTINEL)
    timeout_s = 1.0
    verifier.verify_batch([POOL_GOLD] * 2, [POOL_PRED] * 2)  # workers started: start-up is outside the deadline
    for pred in ADVERSARIAL:
        for gold, p in ((POOL_GOLD, pred), ("5", pred), (pred, "5")):
            t = time.monotonic()
            reason = verifier.verify_batch_reasons([gold], [p], timeout_s=timeout_s)[0]
            took = time.monotonic() - t
            assert took < timeout_s + 1.0, (pred[:60], took)
            assert reason in ("wrong", "unparseable", "timeout"), (pred[:60], reason)
        assert verify_reason("5", pred[:MAX_CHARS]) != "correct"
    assert not os.path.exists(SENTINEL)
    assert verifier.verify_batch_reasons([POOL_GOLD, "\\frac{14}{3}"], [POOL_PRED, "4\\frac23"]) == ["correct"] * 2


def test_guards_refuse_huge_numbers_without_computing_them():
    for big in ("9^{9^{9^{9^{9}}}}", "10^{10^{10^{10}}}!", "2^{100000}", "3001!"):
        t = time.monotonic()
        assert verify_reason("5", big) == "unparseable"
        assert time.monotonic() - t < 0.5
    with pytest.raises(Refused):
        parse_answer("{" * 10_000 + "1" + "}" * 10_000)


def test_hung_worker_is_killed_and_replaced():
    with Verifier(workers=2, timeout_s=1.0, check="tests.test_verify:_hang_on_41") as v:
        golds = [POOL_GOLD] * 4
        preds = [POOL_PRED, "e^{-41}", POOL_PRED, "e^{-41} + 0"]
        v.verify_batch(golds[:2], [POOL_PRED] * 2)  # start both workers: start-up is outside every deadline
        t = time.monotonic()
        assert v.verify_batch_reasons(golds, preds) == ["correct", "timeout", "correct", "timeout"]
        assert time.monotonic() - t < 2 * 1.0 + 1.0  # two workers, so at worst two rounds of one deadline
        assert v.killed == 2
        assert v.verify_batch_reasons([POOL_GOLD], [POOL_PRED]) == ["correct"]  # replacements work


def test_worker_memory_is_capped():
    with Verifier(workers=1, timeout_s=5.0, memory_mb=1024, check="tests.test_verify:_allocate_on_41") as v:
        reasons = v.verify_batch_reasons([POOL_GOLD, POOL_GOLD], ["e^{-41}", POOL_PRED])
        assert reasons == ["timeout", "correct"]  # MemoryError under RLIMIT_AS, and the worker carries on


def test_dead_worker_is_replaced():
    with Verifier(workers=1, timeout_s=2.0) as v:
        assert v.verify_batch_reasons([POOL_GOLD], [POOL_PRED]) == ["correct"]
        v._idle[0].proc.kill()  # killed from outside (OOM killer, a stray signal) while idle
        v._idle[0].proc.wait()
        assert v.verify_batch_reasons([POOL_GOLD], [POOL_PRED]) == ["correct"]
        assert v.killed == 1


def test_works_from_non_main_threads(verifier):
    golds = [POOL_GOLD, "\\frac{14}{3}", "5", POOL_GOLD]
    preds = [POOL_PRED, "14/3", "6", "e^{-41}"]
    results, errors = [], []

    def worker():
        try:
            results.append(verifier.verify_batch_reasons(golds, preds, timeout_s=2.0))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert results == [["correct", "correct", "wrong", "wrong"]] * 4


def test_bad_input_never_raises(verifier):
    assert verifier.verify_batch_reasons([None, 5, "5", "5"], ["5", "5", None, b"5"]) == ["unparseable"] * 4
    assert verifier.verify_batch(["1", "2"], ["1"]) == [True]
    assert verifier.verify_batch(None, None) == []


def test_no_code_evaluation_in_eval_package():
    """Model text must never reach eval/exec or sympy's string parsers: these names do not appear at all."""
    banned = re.compile(
        r"\beval\s*\(|\bexec\s*\(|sympify|parse_expr|parse_latex|__import__|\bcompile\s*\(|import pickle|pickle\.load"
    )
    for path in sorted((REPO / "eval").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = re.sub(r"re\.compile\(", "", line)
            assert not banned.search(code), f"{path.name}:{n}: {line.strip()}"


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench_verify.json"
    subprocess.run([sys.executable, "-m", "posttrain.bench.bench_verify", "--smoke", "--json", str(out)], cwd=REPO,
                   check=True, capture_output=True, timeout=120)
    res = json.loads(out.read_text())
    gs = res["sets"]["gold_vs_solution"]
    assert gs["ours_agree"] == gs["n"] == 40
    assert res["sets"]["rewritten"]["ours_agree"] == 40
    assert res["sets"]["mix_wrong"]["ours_agree"] == 80
    made = res["sets"]["completions"]
    assert made["ours_agree"] == made["n"] > 80 and made["ours"]["truncated_rejected"]["n"] > 0
    assert res["sets"]["classes"]["ours_agree"] == res["sets"]["classes"]["n"]
    assert res["sets"]["longtail"]["ours_agree"] == res["sets"]["longtail"]["n"] == 132
    hedged = res["sets"]["hedged"]  # 80 correct completions x 2 forms x 2 orders, none accepted
    assert hedged["n"] == 320 and hedged["ours_agree"] == 320 and hedged["ours"]["misses"] == {}
    assert res["adversarial"]["worst_over_deadline_s"] < 1.0 and res["adversarial"]["pool_works_after"]
