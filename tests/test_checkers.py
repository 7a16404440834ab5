"""eval/checkers.py: each checker on positive and negative examples, and their validation errors."""

import pytest

from posttrain.eval.checkers import check_batch, check_rows, choice_letter, normalize, validate


def test_exact_normalises_case_space_unicode_and_a_final_period_only():
    ok = [("  Paris.\n", "paris"), ("New   York", "new york"), ("ＡＢＣ", "abc"), ("42", "42")]
    bad = [("0168", "168"), ("16 8", "168"), ("Paris!", "Paris"), ("the answer is 42", "42"), ("", "x")]
    assert check_batch("exact", [r for r, _ in ok], [a for _, a in ok]) == [True] * len(ok)
    assert check_batch("exact", [r for r, _ in bad], [a for _, a in bad]) == [False] * len(bad)
    assert normalize("A  b\tC. ") == "a b c"


def test_synthetic_is_the_built_in_tasks_exact_match():
    assert check_batch("synthetic", ["  12705\n", "012705", "1270"], ["12705"] * 3) == [True, False, False]


def test_math_checks_a_chain_of_thought_through_the_verifier():
    cot = ("Natalia sold 48 clips in April and half as many in May, so 48 / 2 = 24 in May.\n"
           "Altogether 48 + 24 = 72.\n#### 72")
    boxed = "We have $x^2 = 1/4$, so $x = \\frac{1}{2}$ since $x > 0$. The answer is $\\boxed{\\frac{1}{2}}$."
    responses = [cot, boxed, boxed, cot.replace("#### 72", "#### 71"),
                 "First, 48 / 2 = 24. Then 48 + 24 = 72, and I need to add the \\boxed{"]
    answers = ["72", "0.5", "1/3", "72", "72"]
    # The last one is cut off inside \boxed{: no answer, so wrong, although 72 appears in the reasoning.
    assert check_batch("math", responses, answers) == [True, True, False, False, False]


@pytest.mark.parametrize("response,letter", [
    ("B", "B"), ("(c)", "C"), ("D) 42", "D"), ("A. Paris is the capital.", "A"), ("**B**", "B"),
    ("Let me think. Option A is wrong because... so the answer is (C).", "C"),
    ("The answer is C", "C"), ("Answer: D", "D"), ("I pick A first, but the final answer: B", "B"),
    ("So we get $\\boxed{B}$", "B"), ("\\boxed{\\text{(E)}}", "E"),
    ("I am not sure about this one.", None), ("Apples are red.", None), ("", None),
])
def test_choice_letter_extraction(response, letter):
    assert choice_letter(response) == letter


def test_choice_compares_letters_and_rejects_no_commitment():
    responses = ["The answer is (b).", "B", "C", "Both A and B look right", "Answer: A"]
    assert check_batch("choice", responses, ["B", "(B)", "B", "B", "a"]) == [True, True, False, False, True]


def test_check_rows_groups_by_checker_and_keeps_order():
    assert check_rows(["exact", "choice", "exact", "math"], ["x", "B", "y", "#### 7"], ["X", "B", "z", "7"]) \
        == [True, True, False, True]


def test_validation_names_the_place_and_the_fix():
    with pytest.raises(ValueError, match=r"f.jsonl:3: unknown checker 'regex'; use one of exact, math"):
        validate("regex", "1", "f.jsonl:3")
    with pytest.raises(ValueError, match=r"f.jsonl:4: checker 'math' needs an \"answer\" field"):
        validate("math", None, "f.jsonl:4")
    with pytest.raises(ValueError, match=r"f.jsonl:5: checker 'choice' needs a single letter A-Z"):
        validate("choice", "42", "f.jsonl:5")
    validate("exact", None, "f.jsonl:6")  # exact falls back to the response
