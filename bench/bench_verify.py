"""Answer verification throughput and deadlines: eval.verify vs math-verify (when installed), in one run.

    python -m bench.bench_verify [--smoke] [--json PATH]

Sets (from eval/data/math500.jsonl, the repository's copy):
  gold_vs_solution   every gold answer against its own solution (the boxed answer is extracted): all correct
  rewritten          every gold against an equivalent rewrite (14/3 for \\frac{14}{3}, "x = 5.0" for 5, …)
  mix_wrong          each solution, plus a completion boxing the next problem's answer: half correct, half wrong
  adversarial        huge powers, factorials, 1 MB strings, 10,000 nested braces, code payloads: all must finish
                     within their deadline + 1 s (ours only; math-verify's signal.alarm does not bound these
                     outside the main thread, so it is not run on them)
A CPU benchmark (2 cores here): not part of bench/gpu.sh. --smoke uses 40 pairs per set and runs in seconds.
"""

import argparse
import json
import platform
import re
import time

from eval.math500 import load_math500
from eval.latex import canonical
from eval.verify import Verifier

ADVERSARIAL = [
    "\\boxed{9^{9^{9^{9^{9}}}}}",
    "\\boxed{10^{10^{10^{10}}}!}",
    "\\boxed{" + "1" * 1_000_000 + "}",
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "\\boxed{__import__('os').system('touch /tmp/bench_verify_pwned')}",
    "\\boxed{(lambda: __import__('os').system('touch /tmp/bench_verify_pwned'))()}",
    "\\boxed{(x+1)^{9999} - (x+1)^{9998}(x+1)}",
    "x" * 1_000_000,
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


def _rate(fn, n: int) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return n / (time.perf_counter() - t), out


def run(smoke: bool) -> dict:
    rows = load_math500()
    if smoke:
        rows = rows[:40]
    golds = [r["answer"] for r in rows]
    sols = [r["solution"] for r in rows]
    others = [rows[(i + 1) % len(rows)]["answer"] for i in range(len(rows))]
    wrong = [f"Thus the answer is $\\boxed{{{a}}}$." for a in others]
    # The expected verdict of a swapped answer: wrong unless it states the same value ("5" vs "x=5").
    same = [canonical(g) in (canonical(a), canonical(a.split("=")[-1])) for g, a in zip(golds, others)]
    rewritten = [f"The answer is $\\boxed{{{_rewrite(g)}}}$." for g in golds]
    sets = {
        "gold_vs_solution": (golds, sols, [True] * len(rows)),
        "rewritten": (golds, rewritten, [True] * len(rows)),
        "mix_wrong": (golds + golds, sols + wrong, [True] * len(rows) + same),
    }
    results = {"env": {"python": platform.python_version(), "machine": platform.machine()}, "sets": {}}
    verifier = Verifier(workers=2, timeout_s=5.0)
    verifier.verify_batch(["x^2"], ["\\sin^2 x"])  # start the workers outside the timed region
    try:
        import math_verify
    except ImportError:
        math_verify = None
    if math_verify is not None:  # warm up its grammar outside the timed region, as ours is
        math_verify.verify(math_verify.parse("$\\frac{1}{2}$"), math_verify.parse("$0.5$"))
    for name, (g, p, expect) in sets.items():
        rate, verdicts = _rate(lambda: verifier.verify_batch(g, p), len(g))
        row = {"n": len(g), "ours_per_s": rate, "ours_agree": sum(v == e for v, e in zip(verdicts, expect))}
        if math_verify is not None:
            def mv():
                return [math_verify.verify(math_verify.parse("\\boxed{" + a + "}"), math_verify.parse(b))
                        for a, b in zip(g, p)]
            mv_rate, mv_verdicts = _rate(mv, len(g))
            mv_agree = sum(bool(v) == e for v, e in zip(mv_verdicts, expect))
            row.update(math_verify_per_s=mv_rate, math_verify_agree=mv_agree, speedup=rate / mv_rate)
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
    print(f"{'set':18} {'n':>5} {'ours/s':>9} {'ours ok':>8} {'math-verify/s':>14} {'mv ok':>6} {'speedup':>8}")
    for name, r in res["sets"].items():
        mv = (f"{r['math_verify_per_s']:14.0f} {r['math_verify_agree']:6d} {r['speedup']:7.1f}x"
              if "math_verify_per_s" in r else f"{'(not installed)':>14} {'-':>6} {'-':>8}")
        print(f"{name:18} {r['n']:5d} {r['ours_per_s']:9.0f} {r['ours_agree']:8d} {mv}")
    a = res["adversarial"]
    print(f"adversarial: {a['n']} calls at timeout {a['timeout_s']} s, "
          f"worst overrun {a['worst_over_deadline_s']:+.2f} s, workers killed {a['workers_killed']}, "
          f"pool works after: {a['pool_works_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
