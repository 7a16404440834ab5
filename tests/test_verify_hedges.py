"""Hedged answers (issue 34): a completion whose final-answer region names the gold and a second, different
candidate is never accepted; one that names only the gold (once, twice, or with remarks) stays accepted.

The completions are the correct completions of bench/bench_verify.py's `completions` (every MATH500 and GSM8K
problem), with their final statement replaced by a hedge form of bench_verify.HEDGE_FORMS (33 forms: "or", "or
maybe", "(or …)", "; alternatively", "although … is also possible", "either … or", "/", a comma list, boxes joined by
"or", "\\text{ or }" in math, "and/or", plain text and "####", and statements after the answer: "Alternatively, …",
"It could also be …", "… is also possible", a second "The answer is …", "Wait, no: the answer is …", a box then a
different "Final Answer", a boxed answer then "Alternatively, the answer could be …"), in both orders (the gold
first or second). The second candidate is the answer of the set's wrong completion for that problem, which the
verifier rejects on its own.
"""

import collections

from hypothesis import given, settings, strategies as st

from posttrain.bench.bench_verify import HEDGE_FORMS, HEDGE_TAILS, completions, hedge, hedge_cases
from posttrain.eval.math500 import load_gsm8k, load_math500
from posttrain.eval.verify import verify_reason
from tests.test_verify import verifier  # noqa: F401  -- the module-scoped pool fixture

CASES = hedge_cases(load_math500(), load_gsm8k())
FORMS = [name for name, _, _ in HEDGE_FORMS]


def test_forms_cover_both_positions():
    positions = collections.Counter(position for _, position, _ in HEDGE_FORMS)
    assert len(FORMS) == len(set(FORMS)) == 33 and positions == {"inline": 22, "after": 11}
    correct = [m for m in completions(load_math500(), load_gsm8k()) if m[2]]
    assert len(CASES) == len(correct) == 1819
    assert [c[0] for c in CASES] == [m[0] for m in correct]  # the same problems, in the same order


def test_every_correct_completion_hedged_in_every_form_is_rejected(verifier):
    golds, preds, kinds = [], [], []
    for k, (gold, reasoning, answer, other) in enumerate(CASES):
        tail = HEDGE_TAILS[k % len(HEDGE_TAILS)]
        for form in FORMS:
            for order, (first, second) in (("gold_first", (answer, other)), ("gold_second", (other, answer))):
                golds.append(gold)
                preds.append(hedge(reasoning, first, second, form, tail))
                kinds.append(f"{form}/{order}")
    reasons = verifier.verify_batch_reasons(golds, preds)
    assert len(reasons) == 1819 * 33 * 2
    accepted = collections.Counter(k for k, r in zip(kinds, reasons) if r == "correct")
    assert accepted == {}
    assert reasons.count("timeout") == 0


def test_the_gold_restated_in_a_hedge_form_stays_accepted(verifier):
    """The same candidate twice is one candidate: every form with the gold in both places is accepted."""
    golds, preds = [], []
    for k, (gold, reasoning, answer, _) in enumerate(CASES[::7]):
        for form in FORMS:
            golds.append(gold)
            preds.append(hedge(reasoning, answer, answer, form, HEDGE_TAILS[k % len(HEDGE_TAILS)]))
    reasons = verifier.verify_batch_reasons(golds, preds)
    missed = [(g, p[-100:]) for g, p, r in zip(golds, preds, reasons) if r != "correct"]
    assert len(reasons) == 260 * 33 and missed == []


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    case=st.integers(0, len(CASES) - 1),
    form=st.sampled_from(FORMS),
    gold_first=st.booleans(),
    tail=st.sampled_from(HEDGE_TAILS + ["\n\nLet me know if anything is unclear.", " (Checked with $x = 1$.)"]),
    lead=st.sampled_from(["", "Putting it all together.\n\n", "Hmm, let me finish.\n\n"]),
    shout=st.booleans(),
)
def test_hedges_are_never_accepted_property(case, form, gold_first, tail, lead, shout):
    gold, reasoning, answer, other = CASES[case]
    first, second = (answer, other) if gold_first else (other, answer)
    text = hedge(reasoning + "\n\n" + lead.rstrip("\n"), first, second, form, tail)
    if shout:  # the same words with capitals: "The Answer Is", "OR"
        text = text.replace(" or ", " OR ").replace("The answer is", "The Answer Is")
    assert verify_reason(gold, text) != "correct"
    assert verify_reason(gold, hedge(reasoning, answer, answer, form, tail)) == "correct"
