"""Answer verification throughput and deadlines: eval.verify vs math-verify (when installed), in one run.

    python -m posttrain.bench.bench_verify [--smoke] [--json PATH]

Sets (from eval/data/math500.jsonl, the repository's copy):
  gold_vs_solution   every gold answer against its own solution (the boxed answer is extracted): all correct
  rewritten          every gold against an equivalent rewrite (14/3 for \\frac{14}{3}, "x = 5.0" for 5, …)
  mix_wrong          each solution, plus a completion boxing the next problem's answer: half correct, half wrong
  completions        model-style completions of every MATH500 and GSM8K problem (eval/data/gsm8k_test.jsonl too):
                     reasoning, then a right or a wrong final answer in one of 22 conventions, plus completions cut
                     off in the reasoning or inside \\boxed{ (see `completions`); reported as correct ones accepted,
                     wrong ones rejected, truncated ones rejected, and the conventions that failed
  classes            tests/data/verify_cases.jsonl: hand-labelled cases of each judgement call (markers, truncation,
                     relations, matrices, tuples, named assignments, notation, decimals), same split
  longtail           tests/data/verify_longtail.jsonl: hand-labelled cases of the long tail (issue 31: ASCII
                     relations, answers without a marker, matrix arithmetic, approximations, several answers,
                     inequalities vs intervals, worked-solution golds) and of hedging (issue 34), same split
  hedged             every correct completion of `completions` with a second, different candidate in its final
                     answer region: 2 of the 33 HEDGE_FORMS each (cycled), both orders; none may be accepted;
                     reported as accepted per form
  adversarial        huge powers, factorials, 1 MB strings, 10,000 nested braces, code payloads: all must finish
                     within their deadline + 1 s (ours only; math-verify's signal.alarm does not bound these
                     outside the main thread, so it is not run on them)
Both verifiers run on the same pairs in the same process; math-verify gets the gold as \\boxed{gold}. Rates are
verdicts per wall second and, in brackets, per CPU second of this process: on a machine shared with other jobs the
CPU rate is the one to compare between runs (ours leaves the pool's CPU out: only pairs that reach sympy use it).
A CPU benchmark (2 cores here): not part of bench/gpu.sh. --smoke uses 40 problems per set and runs in seconds.
"""

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

from posttrain.eval.math500 import load_gsm8k, load_math500
from posttrain.eval.latex import canonical
from posttrain.eval.verify import Verifier

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
CASES = DATA / "verify_cases.jsonl"  # hand-labelled classes
LONGTAIL = DATA / "verify_longtail.jsonl"
ADVERSARIAL = [
    "\\boxed{9^{9^{9^{9^{9}}}}}",
    "\\boxed{10^{10^{10^{10}}}!}",
    "\\boxed{" + "1" * 1_000_000 + "}",
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "\\boxed{__import__('os').system('touch /tmp/bench_verify_pwned')}",
    "\\boxed{(lambda: __import__('os').system('touch /tmp/bench_verify_pwned'))()}",
    "\\boxed{(x+1)^{9999} - (x+1)^{9998}(x+1)}",
    "x" * 1_000_000,
    "\\boxed{" * 100_000,
    "**Answer:**" + "\n- $p = 6$" * 50_000,
    "The answer is " + "7 or " * 200_000 + "6.",
    "The answer is 5." + " Alternatively, 6." * 100_000,
    "The answer is 6. Wait, no. " * 50_000 + "The answer is 7.",
]


def _rewrite(gold: str) -> str:
    """An equivalent answer that is not the same string, so the parser and value stages run (not exact match)."""
    m = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", gold)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if re.fullmatch(r"-?\d+", gold):
        return f"x = {gold}.0"
    if re.fullmatch(r"[^,=\\]*[a-z][^,=\\]*", gold):  # a polynomial-like expression: reorder the sum
        return f"0 + {gold}"
    return re.sub(r"(?<![a-zA-Z])\s+", "", gold.replace("\\frac", "\\dfrac"))  # keep "\\cot x" apart


# ---------------------------------------------------------------------------------------------------------------
# Model-style completions, labelled by construction.
#
# Each problem gives a reasoning (its reference solution with the box removed, so the right value appears in the
# text) followed by a final answer in one of the conventions below. Correct completions state the gold (as
# written, or in an equivalent rewrite); wrong ones state a value known to differ; truncated ones stop inside the
# reasoning or inside "\boxed{": they have no final answer, so no verdict may accept them.

CHAT_TAIL = "<|im_end|>\n<|im_start|>user\nThanks! Now what is 3 + 4?<|im_end|>"

# (name, template): {a} is the answer as LaTeX, {r} the reasoning. Each keeps text after the answer where models do.
CONVENTIONS = [
    ("boxed", "{r}\n\nTherefore, the final answer is $\\boxed{{{a}}}$."),
    ("answer_is", "{r}\n\nThe answer is ${a}$."),
    ("bold_answer_remark", "{r}\n\n**Answer:** ${a}$\n\nI double-checked this with $x = 1$ and $y = 12$."),
    ("minerva", "{r}\n\nFinal Answer: The final answer is ${a}$. I hope it is correct."),
    ("answer_paren", "{r}\n\nAnswer: \\({a}\\)"),
    ("final_answer_display_box", "{r}\n\n**Final Answer**\n\\[\n\\boxed{{{a}}}\n\\]"),
    ("answer_is_dollars", "{r}\n\nThus the answer is\n$$\n{a}\n$$"),
    ("boxed_chat_tail", "{r}\n\n## Final Answer\n\n$$\\boxed{{{a}}}$$" + CHAT_TAIL),
    ("boxed_check_remark", "{r}\n\nSo the final answer is \\boxed{{{a}}}. (Check: substituting back gives 0 = 0.)"),
    ("bold_inline", "{r}\n\n**Answer: ${a}$**"),
    ("final_answer_colon", "{r}\n\nFinal answer: ${a}$"),
    ("answer_is_display", "{r}\n\nThe answer is: \\[ {a} \\]"),
    ("bare_box", "{r}\n\nPutting it together:\n\n\\boxed{{{a}}}"),
    ("answer_bold_sentence", "{r}\n\nTherefore the answer is **${a}$**."),
    ("boxed_note", "{r}\n\nThe final answer is $\\boxed{{{a}}}$.\n\nNote: an earlier step gave 12, which was before "
                   "simplifying."),
    ("final_answer_heading", "{r}\n\n### Final Answer\nThe final answer is \\(\\boxed{{{a}}}\\)."),
    ("short_display", "Answer \\[ {a} \\]"),
    ("short_inline", "Answer $ {a} $"),
]
GSM_CONVENTIONS = [  # GSM8K answers are numbers: plain text conventions and units after the number
    ("hashes", "{r}\n#### {a}"),
    ("hashes_unit", "{r}\n#### {a} items"),
    ("answer_is_unit", "{r}\nThe answer is {a} players."),
    ("bold_plain", "{r}\n\n**Answer:** {a}\n\nI checked it with the first step: 2 + 3 = 5."),
]


def _reasoning(solution: str) -> str:
    """A MATH solution without its boxes (their contents stay), or a GSM8K solution without calculator notes."""
    text = re.sub(r"<<[^>]*>>", "", solution.split("####")[0]).strip()
    while True:
        k = text.rfind("\\boxed")
        if k < 0:
            return text
        depth, j = 0, text.find("{", k)
        for end in range(j, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        text = text[:k] + text[j + 1 : end] + text[end + 1 :]


def _same_string(a: str, b: str) -> bool:
    """The answers equal as strings up to spacing, \\left/\\right and \\dfrac: a wrong answer must not be one."""
    def key(s):
        s = re.sub(r"\\(left|right|[,!;: ])|\s|\\d(?=frac)|^[a-z]=", "", s)
        return s
    return key(a) == key(b)


def _gsm_gold(answer: str) -> str:
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def _math_case(rows: list[dict], i: int) -> tuple[str, str, str, str]:
    """(gold, reasoning, the gold as the correct completion writes it, a wrong answer) for MATH500 row i."""
    row = rows[i]
    gold, reasoning = row["answer"], _reasoning(row["solution"])
    answer = _rewrite(gold) if i % 3 == 1 else gold
    other = next(r["answer"] for r in rows[i + 1 :] + rows[:i] if not _same_string(r["answer"], gold))
    if re.fullmatch(r"-?\d+", gold) and i % 2:
        other = str(int(gold) + (1 if i % 4 == 1 else -10))
    return gold, reasoning, answer, other


def _gsm_case(rows: list[dict], i: int) -> tuple[str, str, str, str]:
    """The same for GSM8K row i (numbers: the wrong answer is the gold + 1 or + 10)."""
    gold, reasoning = _gsm_gold(rows[i]["answer"]), _reasoning(rows[i]["answer"])
    value = int(gold) if re.fullmatch(r"-?\d+", gold) else None
    written = f"{value:,}" if value is not None and i % 4 == 3 else gold
    other = str(value + (1 if i % 3 else 10)) if value is not None else gold + "1"
    return gold, reasoning, written, other


def completions(math_rows: list[dict], gsm_rows: list[dict]) -> list[tuple[str, str, bool, str]]:
    """(gold, completion, label, kind) for each problem: one correct, one wrong, and every third a truncated one.

    kind is "correct/<convention>", "wrong/<convention>" or "truncated/<how>". Deterministic.
    """
    out = []
    for i in range(len(math_rows)):
        gold, reasoning, answer, other = _math_case(math_rows, i)
        name, tpl = CONVENTIONS[i % len(CONVENTIONS)]
        out.append((gold, tpl.format(r=reasoning, a=answer), True, "correct/" + name))
        name, tpl = CONVENTIONS[(i + 5) % len(CONVENTIONS)]
        out.append((gold, tpl.format(r=reasoning, a=other), False, "wrong/" + name))
        if i % 3 == 0:
            cut = reasoning[: max(1, len(reasoning) * (3 + i % 5) // 8)]
            boxed = reasoning + "\n\nSo the answer is $\\boxed{" + gold[: len(gold) // 2]
            kind, text = (("mid_reasoning", cut), ("inside_box", boxed))[(i // 3) % 2]
            out.append((gold, text, False, "truncated/" + kind))
    for i in range(len(gsm_rows)):
        gold, reasoning, written, other = _gsm_case(gsm_rows, i)
        if i % 2:
            name, tpl = CONVENTIONS[i % len(CONVENTIONS)]
        else:
            name, tpl = GSM_CONVENTIONS[(i // 2) % len(GSM_CONVENTIONS)]
        out.append((gold, tpl.format(r=reasoning, a=written), True, "correct/" + name))
        name, tpl = GSM_CONVENTIONS[(i + 1) % len(GSM_CONVENTIONS)]
        out.append((gold, tpl.format(r=reasoning, a=other), False, "wrong/" + name))
        if i % 3 == 0:  # the reasoning ends with the right number, but no final answer was reached
            out.append((gold, reasoning, False, "truncated/no_final_answer"))
    return out


# Hedged completions (issue 34): the final answer region names the gold and a second, different candidate. {a} is
# the first candidate and {b} the second; each form runs in both orders (gold first, gold second). "inline" forms
# put both in one answer statement, "after" forms state one and offer the other in a statement that follows.
HEDGE_FORMS = [
    ("or", "inline", "The answer is ${a}$ or ${b}$."),
    ("or_maybe", "inline", "So the answer is ${a}$ or maybe ${b}$."),
    ("paren_or", "inline", "Final answer: ${a}$ (or ${b}$)."),
    ("semicolon_alternatively", "inline", "The answer is ${a}$; alternatively ${b}$."),
    ("although_plain", "inline", "The final answer is {a}, although {b} is also possible."),
    ("either_or", "inline", "The answer is either ${a}$ or ${b}$."),
    ("slash", "inline", "The answer is ${a}$/${b}$."),
    ("comma_list", "inline", "The answer is ${a}$, ${b}$."),
    ("or_possibly", "inline", "The answer is ${a}$, or possibly ${b}$."),
    ("paren_maybe", "inline", "The answer is ${a}$ (maybe ${b}$)."),
    ("boxes_or", "inline", "The answer is $\\boxed{{{a}}}$ or $\\boxed{{{b}}}$."),
    ("box_paren_or", "inline", "The final answer is $\\boxed{{{a}}}$ (or $\\boxed{{{b}}}$)."),
    ("text_or_in_math", "inline", "The answer is ${a} \\text{{ or }} {b}$."),
    ("bold_slash", "inline", "**Answer:** ${a}$ / ${b}$"),
    ("or_perhaps", "inline", "The answer is \\({a}\\), or perhaps \\({b}\\)."),
    ("but_could_be", "inline", "The answer is ${a}$, but it could also be ${b}$."),
    ("and_or", "inline", "The answer is ${a}$ and/or ${b}$."),
    ("plain_or", "inline", "Final answer: {a} or {b}"),
    ("hashes_or", "inline", "#### {a} or {b}"),
    ("boxed_otherwise", "inline", "\\boxed{{{a}}}, otherwise \\boxed{{{b}}}"),
    ("display_quad_or", "inline", "\\[ \\boxed{{{a}}} \\quad\\text{{or}}\\quad \\boxed{{{b}}} \\]"),
    ("display_lines_or", "inline", "The answer is\n$$\n{a}\n$$\nor\n$$\n{b}\n$$"),
    ("then_alternatively", "after", "The answer is ${a}$. Alternatively, the answer is ${b}$."),
    ("repeated_answer_is", "after", "The answer is ${a}$. The answer is ${b}$."),
    ("then_or_maybe", "after", "The answer is ${a}$. Or maybe ${b}$."),
    ("boxes_alternatively", "after", "\\boxed{{{a}}}\n\nAlternatively: \\boxed{{{b}}}"),
    ("could_also_be", "after", "The answer is ${a}$. It could also be ${b}$."),
    ("answer_lines", "after", "Answer: ${a}$\nAnswer: ${b}$"),
    ("also_possible", "after", "The answer is ${a}$.\n\n${b}$ is also possible."),
    ("another_answer", "after", "The answer is ${a}$. Another possible answer is ${b}$."),
    ("wait_no", "after", "The answer is ${a}$. Wait, no: the answer is ${b}$."),
    ("box_then_final_answer", "after", "\\boxed{{{a}}}\n\nFinal Answer: ${b}$"),
    ("boxed_span_then_could_be", "after",
     "The final answer is $\\boxed{{{a}}}$.\n\nAlternatively, the answer could be ${b}$."),
]
# What may follow the hedge: nothing, a remark that names no other value, or the end of a chat turn.
HEDGE_TAILS = ["", " I hope it is correct.", "\n\nI double-checked the arithmetic.", CHAT_TAIL]


def hedge_cases(math_rows: list[dict], gsm_rows: list[dict]) -> list[tuple[str, str, str]]:
    """(gold, reasoning, a wrong answer) for every correct completion of `completions`, the gold as it writes it."""
    out = []
    for i in range(len(math_rows)):
        gold, reasoning, answer, other = _math_case(math_rows, i)
        out.append((gold, reasoning, answer, other))
    for i in range(len(gsm_rows)):
        out.append(_gsm_case(gsm_rows, i))
    return out


def hedge(reasoning: str, first: str, second: str, form: str, tail: str = "") -> str:
    """A completion whose final-answer region names `first` and `second` in hedge form `form` (a HEDGE_FORMS name)."""
    tpl = next(t for name, _, t in HEDGE_FORMS if name == form)
    body = tpl.format(a=first, b=second)
    if tail.startswith(" ") and body[-1] not in ".$":  # a remark after a plain answer starts a new line
        tail = "\n" + tail[1:]
    return reasoning + "\n\n" + body + tail


def hedged(math_rows: list[dict], gsm_rows: list[dict], per_case: int = 2) -> list[tuple[str, str, str]]:
    """(gold, completion, kind) hedged completions: per correct completion, `per_case` forms (cycled so that every
    form meets every kind of answer) in both orders, each with a tail from HEDGE_TAILS; kind is
    "<form>/gold_first" or "<form>/gold_second". None may be accepted. Deterministic."""
    out = []
    for k, (gold, reasoning, answer, other) in enumerate(hedge_cases(math_rows, gsm_rows)):
        for j in range(per_case):
            form = HEDGE_FORMS[(k + j * (len(HEDGE_FORMS) // per_case + 1)) % len(HEDGE_FORMS)][0]
            tail = HEDGE_TAILS[(k + j) % len(HEDGE_TAILS)]
            out.append((gold, hedge(reasoning, answer, other, form, tail), form + "/gold_first"))
            out.append((gold, hedge(reasoning, other, answer, form, tail), form + "/gold_second"))
    return out


def _rate(fn, n: int) -> tuple[float, float, object]:
    """(items per wall second, items per CPU second of this process, fn's result). On a shared machine the CPU rate
    is the steadier one; it leaves out the workers' CPU, which only the few pairs that reach sympy use."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return n / (time.perf_counter() - t), n / max(time.process_time() - c, 1e-9), out


def _split_score(verdicts: list[bool], labels: list[bool], kinds: list[str]) -> dict:
    """Correct completions accepted, wrong ones rejected, truncated ones rejected; and the kinds that failed."""
    def rate(group):
        idx = [i for i, k in enumerate(kinds) if k.startswith(group)]
        return {"n": len(idx), "right": sum(verdicts[i] == labels[i] for i in idx)}

    misses: dict[str, int] = {}
    for v, label, kind in zip(verdicts, labels, kinds):
        if v != label:
            misses[kind] = misses.get(kind, 0) + 1
    return {"agree": sum(v == label for v, label in zip(verdicts, labels)), "correct_accepted": rate("correct/"),
            "wrong_rejected": rate("wrong/"), "truncated_rejected": rate("truncated/"),
            "misses": dict(sorted(misses.items(), key=lambda kv: -kv[1]))}


def _math_verify_fn(math_verify):
    def check(gold: str, pred: str) -> bool:
        try:
            return bool(math_verify.verify(math_verify.parse("\\boxed{" + gold + "}"), math_verify.parse(pred)))
        except Exception:  # its parser raises on some inputs: count as not accepted
            return False
    return check


def run(smoke: bool) -> dict:
    rows, gsm = load_math500(), load_gsm8k()
    if smoke:
        rows, gsm = rows[:40], gsm[:40]
    golds = [r["answer"] for r in rows]
    sols = [r["solution"] for r in rows]
    others = [rows[(i + 1) % len(rows)]["answer"] for i in range(len(rows))]
    wrong = [f"Thus the answer is $\\boxed{{{a}}}$." for a in others]
    # The expected verdict of a swapped answer: wrong unless it states the same value ("5" vs "x=5").
    same = [canonical(g) in (canonical(a), canonical(a.split("=")[-1])) for g, a in zip(golds, others)]
    rewritten = [f"The answer is $\\boxed{{{_rewrite(g)}}}$." for g in golds]
    made = completions(rows, gsm)
    cases = [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]
    tail = [json.loads(line) for line in LONGTAIL.read_text().splitlines() if line.strip()]
    hedges = hedged(rows, gsm)
    sets = {
        "gold_vs_solution": (golds, sols, [True] * len(rows)),
        "rewritten": (golds, rewritten, [True] * len(rows)),
        "mix_wrong": (golds + golds, sols + wrong, [True] * len(rows) + same),
        "completions": ([m[0] for m in made], [m[1] for m in made], [m[2] for m in made]),
        "classes": ([c["gold"] for c in cases], [c["pred"] for c in cases], [c["label"] for c in cases]),
        "longtail": ([c["gold"] for c in tail], [c["pred"] for c in tail], [c["label"] for c in tail]),
        "hedged": ([h[0] for h in hedges], [h[1] for h in hedges], [False] * len(hedges)),
    }
    kinds = {"completions": [m[3] for m in made],
             "classes": [("correct/" if c["label"] else "wrong/") + c["class"] for c in cases],
             "longtail": [("correct/" if c["label"] else "wrong/") + c["class"] for c in tail],
             "hedged": ["wrong/" + h[2] for h in hedges]}
    results = {"env": {"python": platform.python_version(), "machine": platform.machine()}, "sets": {}}
    verifier = Verifier(workers=2, timeout_s=5.0)
    # Start both workers outside the timed region: the pair must need the sympy stage (floats underflow at e^{-40});
    # "x^2" against "\\sin^2 x", used before, is decided in-process and started none, so the first adversarial item
    # to reach the pool paid the workers' start (~1.8 s) inside its deadline.
    verifier.verify_batch(["e^{-40}"] * 2, ["e^{-40} + 0"] * 2)
    try:
        import math_verify
    except ImportError:
        math_verify = None
    if math_verify is not None:  # warm up its grammar outside the timed region, as ours is
        results["env"]["math_verify"] = getattr(math_verify, "__version__", "installed")
        mv_check = _math_verify_fn(math_verify)
        mv_check("\\frac{1}{2}", "$0.5$")
    for name, (g, p, expect) in sets.items():
        rate, cpu_rate, verdicts = _rate(lambda: verifier.verify_batch(g, p), len(g))
        row = {"n": len(g), "ours_per_s": rate, "ours_per_cpu_s": cpu_rate,
               "ours_agree": sum(v == e for v, e in zip(verdicts, expect))}
        if name in kinds:
            row["ours"] = _split_score(verdicts, expect, kinds[name])
        if math_verify is not None:
            mv_rate, mv_cpu_rate, mv_verdicts = _rate(lambda: [mv_check(a, b) for a, b in zip(g, p)], len(g))
            mv_agree = sum(bool(v) == e for v, e in zip(mv_verdicts, expect))
            row.update(math_verify_per_s=mv_rate, math_verify_per_cpu_s=mv_cpu_rate, math_verify_agree=mv_agree,
                       speedup=rate / mv_rate, cpu_speedup=cpu_rate / mv_cpu_rate)
            if name in kinds:
                row["math_verify"] = _split_score(mv_verdicts, expect, kinds[name])
        results["sets"][name] = row
    # Deadlines: one call per adversarial completion, timed from outside.
    timeout_s = 1.0 if smoke else 2.0
    worst = 0.0
    for pred in ADVERSARIAL:
        t = time.perf_counter()
        verifier.verify_batch_reasons(["5"], [pred], timeout_s=timeout_s)
        worst = max(worst, time.perf_counter() - t - timeout_s)
    alive = verifier.verify_batch(["\\sin^2 x + \\cos^2 x"], ["1"])[0]
    results["adversarial"] = {"n": len(ADVERSARIAL), "timeout_s": timeout_s, "worst_over_deadline_s": worst,
                              "pool_works_after": alive, "workers_killed": verifier.killed}
    verifier.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="40 pairs per set, for the CI smoke test")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    res = run(args.smoke)
    print("rates: verdicts per wall second (per CPU second of this process)")
    print(f"{'set':18} {'n':>5} {'ours/s':>17} {'ours ok':>8} {'math-verify/s':>14} {'mv ok':>6} {'speedup':>8}")
    for name, r in res["sets"].items():
        mv = (f"{r['math_verify_per_s']:6.0f} ({r['math_verify_per_cpu_s']:5.0f}) {r['math_verify_agree']:6d} "
              f"{r['speedup']:7.1f}x" if "math_verify_per_s" in r else f"{'(not installed)':>14} {'-':>6} {'-':>8}")
        print(f"{name:18} {r['n']:5d} {r['ours_per_s']:7.0f} ({r['ours_per_cpu_s']:7.0f}) {r['ours_agree']:8d} {mv}")
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) at the end")
    for name in ("completions", "classes", "longtail", "hedged"):
        c = res["sets"][name]
        for who in ("ours", "math_verify"):
            if who in c:
                s = c[who]
                parts = [f"{k.split('_')[0]} {s[k]['right']}/{s[k]['n']}"
                         for k in ("correct_accepted", "wrong_rejected", "truncated_rejected") if s[k]["n"]]
                print(f"{name}, {who}: {s['agree']}/{c['n']} right ({', '.join(parts)}); misses: {s['misses']}")
    a = res["adversarial"]
    print(f"adversarial: {a['n']} calls at timeout {a['timeout_s']} s, "
          f"worst overrun {a['worst_over_deadline_s']:+.2f} s, workers killed {a['workers_killed']}, "
          f"pool works after: {a['pool_works_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
