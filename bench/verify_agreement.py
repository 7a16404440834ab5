"""Agreement of eval.verify with math-verify's own regression cases, read from math-verify's test files.

    python -m posttrain.bench.verify_agreement PATH [PATH ...] [--json OUT] [--cases]

PATH is a math-verify tests/ directory or test file (e.g. the sdist's `math_verify-0.9.0/tests`: `pip download
math-verify==0.9.0 --no-binary :all: --no-deps` and unpack it). The files are parsed with `ast` and never
executed or imported; their strings are not copied into this repository. A case is one (gold, pred, expected)
triple of a `@pytest.mark.parametrize("gold, pred, expected"[, precision], [...])` test whose `compare_strings`
call extracts LaTeX and sets no option beyond `match_types` and `precision` (no strict or set-relation switch):
math-verify's default configuration otherwise. Identical triples within a test count once (229 cases in 0.9.0).
Each case runs through
  ours          eval.verify.Verifier.verify_batch_reasons(gold, pred) == "correct" (worker pool, 5 s deadline)
  math-verify   verify(parse(gold), parse(pred)) at its defaults, and as the test calls it (its extraction targets,
                its precision), when math-verify is installed
and agreement is the share of cases whose verdict equals `expected`. Disagreements are printed by class (rules on the
strings, `_CLASSES`), each named file::test[index] so it can be looked up in math-verify's sources; --cases also
prints the strings (to the terminal only). docs/verifier.md has the results and the deliberate disagreements.
"""

import argparse
import ast
import json
import platform
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from posttrain.eval.verify import Verifier, extract_answer


def read_cases(paths: list[str]) -> list[dict]:
    """{"id", "test", "gold", "pred", "expected", "match_types"} for every default-configuration case."""
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("test_*.py")) if p.is_dir() else [p]
    cases = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef):
                continue
            call = _default_call(fn)
            if call is None:
                continue
            match_types, precision = call
            for dec in fn.decorator_list:
                if not (isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "parametrize"):
                    continue
                names = [n.strip() for n in ast.literal_eval(dec.args[0]).split(",")]
                if names not in (["gold", "pred", "expected"], ["gold", "pred", "expected", "precision"]):
                    continue
                seen = set()
                for k, el in enumerate(dec.args[1].elts):
                    try:
                        values = ast.literal_eval(el)
                    except ValueError:
                        continue  # not a literal (a config object, a computed value): not a plain case
                    gold, pred, expected = values[:3]
                    if (gold, pred, expected) in seen:
                        continue
                    seen.add((gold, pred, expected))
                    cases.append({"id": f"{path.name}::{fn.name}[{k}]", "test": fn.name, "gold": gold, "pred": pred,
                                  "expected": bool(expected), "match_types": match_types,
                                  "precision": values[3] if len(values) == 4 else precision})
    return cases


def _default_call(fn: ast.FunctionDef) -> tuple[list[str], int | None] | None:
    """(match_types, precision) of the test's compare_strings(gold, pred, ...) call when it extracts LaTeX (as
    math-verify's default parse does) and sets no option beyond match_types and precision; else None."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "compare_strings":
            kw = {k.arg: k.value for k in node.keywords}
            if set(kw) - {"match_types", "precision"} or len(node.args) != 2:
                return None
            match_types = ast.literal_eval(kw["match_types"]) if "match_types" in kw else ["latex", "expr"]
            if "latex" not in match_types:
                return None
            precision = kw.get("precision")
            if precision is not None:
                precision = ast.literal_eval(precision) if isinstance(precision, ast.Constant) else "param"
            return match_types, precision
    return None


# Classes of the issue (31), decided by rules on the two strings (first match wins): a label to group disagreements
# by, not a judgement.
_RELATION = re.compile(r"<=|>=|!=|=<|=>|\\[lg]t\b|\\neq?\b|\\[lg]e(?:q|qslant)?\b|[<>≤≥≠]")
_CLASSES = [
    ("answer in prose, no marker", lambda g, p: len(p) > 150 or bool(re.search(r"<\|\w+\|>", p))),
    ("matrix", lambda g, p: "matrix" in g + p or "\\begin{array}" in g + p),
    ("inequality vs interval", lambda g, p: bool(_RELATION.search(g)) != bool(_RELATION.search(p))
     and bool(re.search(r"[(\[][^,]*,[^,]*[)\]]", g + p))),
    ("relation, ASCII or LaTeX", lambda g, p: bool(_RELATION.search(g + p))),
    ("approximation", lambda g, p: bool(re.search(r"\\approx|≈", g + p))),
    ("decimal vs fraction", lambda g, p: bool(re.search(r"\d\.\d{2,}", g + p)) and bool(re.search(r"frac|/", g + p))),
    ("several answers", lambda g, p: len(re.findall(r"\\boxed", g + p)) > 1 or bool(re.search(
        r"\b(or|and)\b|\\text\{\s*(and|or)|,", g + p))),
    ("display split over lines", lambda g, p: "\n" in p),
]


def _class(gold: str, pred: str) -> str:
    for name, rule in _CLASSES:
        if rule(gold, pred):
            return name
    return "other"


def _math_verify_checks(math_verify):
    """math-verify at its defaults (parse(text), verify(gold, pred)), and as the test itself calls it."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    def default(case: dict) -> bool:
        try:
            return bool(math_verify.verify(math_verify.parse(case["gold"]), math_verify.parse(case["pred"])))
        except Exception:  # counted as not accepted, as in bench_verify
            return False

    def own(case: dict) -> bool:
        targets = [LatexExtractionConfig(boxed_match_priority=0) if t == "latex" else ExprExtractionConfig()
                   for t in case["match_types"]]
        try:
            gold = math_verify.parse(case["gold"], targets)
            pred = math_verify.parse(case["pred"], targets)
            return bool(math_verify.verify(gold, pred, float_rounding=case["precision"] or 6))
        except Exception:
            return False

    return default, own


def run(paths: list[str]) -> dict:
    cases = read_cases(paths)
    if not cases:
        sys.exit(f"bench.verify_agreement: no default-configuration cases found under {paths}; pass math-verify's "
                 "tests/ directory (see the module docstring)")
    with Verifier(workers=2, timeout_s=5.0) as v:
        reasons = v.verify_batch_reasons([c["gold"] for c in cases], [c["pred"] for c in cases])
    try:
        import math_verify
    except ImportError:
        math_verify = None
    mv = _math_verify_checks(math_verify) if math_verify is not None else None
    for c, r in zip(cases, reasons):
        c["ours"] = r
        c["ours_ok"] = (r == "correct") == c["expected"]
        c["class"] = _class(c["gold"], c["pred"])
        if mv is not None:
            c["math_verify_ok"] = mv[0](c) == c["expected"]
            c["math_verify_own_ok"] = mv[1](c) == c["expected"]
    by_class = defaultdict(list)
    for c in cases:
        if not c["ours_ok"]:
            by_class[c["class"]].append(c)
    out = {"env": {"python": platform.python_version()}, "n": len(cases),
           "ours_agree": sum(c["ours_ok"] for c in cases),
           "by_test": {t: {"n": n, "ours_agree": sum(c["ours_ok"] for c in cases if c["test"] == t)}
                       for t, n in Counter(c["test"] for c in cases).items()},
           "disagreements": {k: [{x: c[x] for x in ("id", "expected", "ours")} for c in v]
                             for k, v in sorted(by_class.items())}}
    if mv is not None:
        out["env"]["math_verify"] = getattr(math_verify, "__version__", "installed")
        out["math_verify_agree"] = sum(c["math_verify_ok"] for c in cases)
        out["math_verify_own_config_agree"] = sum(c["math_verify_own_ok"] for c in cases)
        out["math_verify_misses"] = [c["id"] for c in cases if not c["math_verify_ok"]]
    out["cases"] = cases
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="math-verify's tests/ directory or test files")
    ap.add_argument("--json", help="write the summary here (case ids and verdicts, no strings)")
    ap.add_argument("--cases", action="store_true", help="print each disagreement's strings and extracted answer")
    args = ap.parse_args()
    res = run(args.paths)
    n = res["n"]
    print(f"math-verify regression cases (default configuration): {n}")
    print(f"  ours agrees with expected:        {res['ours_agree']} ({res['ours_agree'] / n:.1%})")
    if "math_verify_agree" in res:
        print(f"  math-verify agrees with expected: {res['math_verify_agree']} ({res['math_verify_agree'] / n:.1%}) at "
              f"its defaults, {res['math_verify_own_config_agree']} as each test calls it (precision, targets)")
        print(f"    math-verify's own misses at its defaults: {', '.join(res['math_verify_misses']) or 'none'}")
    for test, r in sorted(res["by_test"].items()):
        print(f"    {test:42} {r['ours_agree']:4d}/{r['n']}")
    print("disagreements by class:")
    for cls, items in res["disagreements"].items():
        print(f"  {cls} ({len(items)})")
        for item in items:
            case = next(c for c in res["cases"] if c["id"] == item["id"])
            print(f"    {item['id']}: expected {item['expected']}, ours {item['ours']}")
            if args.cases:
                print(f"      gold {case['gold'][-300:]!r}\n      pred {case['pred'][-300:]!r}\n"
                      f"      extracted {extract_answer(case['pred'])!r}")
    if args.json:
        res = {k: v for k, v in res.items() if k != "cases"}
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
