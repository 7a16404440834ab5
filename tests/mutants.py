"""Mutation testing of the math-bearing modules: put one small bug at a time into a function that carries a
formula, run that module's tests, and list the bugs that no test noticed (the survivors).

    TRITON_INTERPRET=1 python -m tests.mutants                      # every target; a table, then the survivors
    TRITON_INTERPRET=1 python -m tests.mutants --target grpo --list # the mutants of one target, not run
    TRITON_INTERPRET=1 python -m tests.mutants --only grpo:12 msft:M5 --json out.json

A test that would pass with the formula wrong proves nothing about the formula; a survivor is either such a gap
or an equivalent mutant (a change that cannot alter any result, e.g. `<` -> `<=` where equality cannot happen),
and each one left needs its reason written down (docs/testing.md holds the last run's list). Not run by CI: a
run takes hours on 2 loaded cores.

What is mutated. Only the functions named in TARGETS (the formulas, not the plumbing around them), one site at a
time, with a small set of operators that model the slips that keep a program running: a comparison's boundary
(`<` <-> `<=`, `>` <-> `>=`, `==` <-> `!=`), an arithmetic operator (`+` <-> `-`, `*` <-> `/`, also in `+=`), a
dropped unary minus or `not`, `and` <-> `or`, min <-> max in every spelling (`min`, `minimum`, `amin`, `clamp(min=)`),
`sum` <-> `mean`, a numeric constant off by one (n -> n + 1), and a sort key that loses its tie-break. Besides
those, NAMED mutants are hand-written multi-site bugs: the same wrong formula written into a kernel, its fallback
and its reference together (which no comparison among the three can see), and the bugs an earlier review found.

How. A mutant is spliced into the source file in place (only the mutated characters change) and the file is put
back afterwards; the script refuses to start while a target file has uncommitted changes, so `git checkout` undoes
an interrupted run. Each mutant's tests run in a child forked from a parent that has imported torch, triton and
pytest once, so a mutant costs test collection rather than a fresh interpreter; the child compiles the project from
source (sys.pycache_prefix is an empty folder: no bytecode of an earlier mutant of equal size and mtime can load).
Tests run with -x, so a killed mutant stops at its first failing test.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    path: str  # relative to the repository root
    functions: tuple[str, ...]  # qualified names ("f", "Class.method"): every operator
    edges: tuple[str, ...]  # functions that are a second copy of a formula checked against the first (a Triton
    #                          kernel, its torch fallback): boundary operators only (see EDGE_OPERATORS)
    tests: tuple[str, ...]  # pytest arguments


TARGETS = {
    "grpo": Target("kernels/grpo.py",
                   ("grpo_loss_reference", "_token_terms", "_row_scale", "_metrics", "_GRPOLoss.backward"),
                   ("_grpo_rows_kernel", "_grpo_rows_torch"),
                   ("tests/test_grpo.py", "-k", "not bench_smoke and not long_sequences and not cuda")),
    "logprob": Target("kernels/logprob.py",
                      ("linear_logprob_reference", "uniform_value", "scale_cast"),
                      ("_logprob_rows_kernel", "_rows_torch"),
                      ("tests/test_logprob.py", "-k", "not bench_smoke and not past_int32 and not cuda")),
    "rl": Target("train/rl.py",
                 ("group_advantages", "batch_normalize", "zero_variance_groups", "overlong_penalty", "combine_rewards",
                  "token_weights", "masked_mean"), (),
                 ("tests/test_rl.py",)),
    # The unit tests of the decision and the tracker; the end-to-end runs (minutes each) are left to --tests.
    "msft": Target("train/msft/method.py",
                   ("peak_index", "is_flat", "peaked_at", "decide", "Tracker.evaluate", "Tracker._gc"), (),
                   ("tests/test_msft.py", "-k",
                    "not report_is_consistent and not pretrained_base and not dynamix and not study and not "
                    "result and not set_weights and not configs and not refused and not mixture_shape")),
    # The verifier's comparison of two parsed answers (extraction and parsing are tested by their own cases).
    "verify": Target("eval/latex.py",
                     ("compare", "_compare_approx", "_rounds_to", "_all", "_matching", "NumericJudge.scalar",
                      "NumericJudge.equation", "_rounded_decimal", "_close", "_same_base_number"), (),
                     ("tests/test_verify.py", "tests/test_verify_longtail.py")),
}

# Hand-written multi-site mutants: (target, name, [(old, new, count), ...]); each `old` must occur `count` times.
NAMED = [
    ("grpo", "M1 clipped objective min -> max in kernel, fallback and reference", [
        ("dmin = tl.where(l1 < l2, d1, tl.where(l1 > l2, d2,", "dmin = tl.where(l1 > l2, d1, tl.where(l1 < l2, d2,", 1),
        ("return -tl.minimum(l1, l2), -dmin", "return -tl.maximum(l1, l2), -dmin", 1),
        ("loss_t = -torch.minimum(l1, l2)", "loss_t = -torch.maximum(l1, l2)", 1),
        ("dloss_dr = -torch.where(l1 < l2, d1, torch.where(l1 > l2, d2,",
         "dloss_dr = -torch.where(l1 > l2, d1, torch.where(l1 < l2, d2,", 1),
        ("per_token_loss = -torch.min(coef_1c * adv, coef_2 * adv)",
         "per_token_loss = -torch.max(coef_1c * adv, coef_2 * adv)", 1),
    ]),
    ("grpo", "M2 k3 KL direction reversed in kernel, fallback and reference", [
        ("diff = tl.load(ref_ptr + row + c, mask=inb, other=0.0).to(ACC) - lp",
         "diff = lp - tl.load(ref_ptr + row + c, mask=inb, other=0.0).to(ACC)", 2),
        ("dloss_dlp = beta * (1.0 - e_diff)", "dloss_dlp = beta * (e_diff - 1.0)", 1),
        ("m * scale * beta * (1.0 - tl.exp(diff))", "m * scale * beta * (tl.exp(diff) - 1.0)", 1),
        ("diff = ref - logp\n", "diff = logp - ref\n", 1),
        ("dloss_dlp = beta * (1 - torch.exp(diff))", "dloss_dlp = beta * (torch.exp(diff) - 1)", 1),
        ("diff = ref_logp - logp\n", "diff = logp - ref_logp\n", 1),
    ]),
    ("grpo", "M3 GSPO sequence ratio without its length normalisation in kernel, fallback and reference", [
        ("r_seq = tl.exp(tl.sum(num, 0) / n_seq)", "r_seq = tl.exp(tl.sum(num, 0))", 1),
        ("coef = tl.sum(dr_acc, 0) * r_seq / n_seq", "coef = tl.sum(dr_acc, 0) * r_seq", 1),
        ("r = torch.exp(torch.where(active, mask * lr, 0.0).sum(-1) / n_seq)",
         "r = torch.exp(torch.where(active, mask * lr, 0.0).sum(-1))", 1),
        ("coef = torch.where(active, w * dloss_dr, 0.0).sum(-1) * r[:, 0] / n_seq",
         "coef = torch.where(active, w * dloss_dr, 0.0).sum(-1) * r[:, 0]", 1),
        ("log_iw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))",
         "log_iw = ((log_ratio * mask).sum(-1))", 1),
    ]),
    ("msft", "M4 decide without its tie-break by name", [
        ("key=lambda task: (peaks[task], task))", "key=lambda task: peaks[task])", 1),
    ]),
    ("msft", "M5 the tracker keeps a snapshot on ties (> -> >=): a roll-back restores a later point than the peak", [
        ("signal_of(rt.cfg, results[t]) > self.task_best[t][0]", "signal_of(rt.cfg, results[t]) >= self.task_best[t][0]",
         1),
    ]),
]


@dataclass
class Mutant:
    id: str  # "<target>:<n>" for generated ones, "<target>:M<k>" for named ones
    target: str
    where: str  # "path:line function"
    what: str  # "`<` -> `<=`", or the named mutant's description
    edits: list[tuple[int, int, bytes]]  # (start, end, replacement) byte offsets into the file
    outcome: str = ""  # killed | survived | timeout | error
    seconds: float = 0.0
    detail: str = ""  # the first failing test, or the tail of an error


# ---------------------------------------------------------------------------------------------------- generation

COMPARE = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"), ast.Eq: ("==", "!="),
           ast.NotEq: ("!=", "==")}
BINOP = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*")}
# In a second copy of a formula, an arithmetic slip or a wrong constant is caught by any comparison with the first;
# what can hide there are the edges: a comparison's boundary, min <-> max, a sign, a boolean (their calls are
# filtered below to min/max).
EDGE_OPERATORS = (ast.Compare, ast.UnaryOp, ast.BoolOp, ast.Call)
CALLS = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum", "amin": "amax", "amax": "amin",
         "sum": "mean", "mean": "sum"}


def _functions(tree: ast.Module, names: tuple[str, ...]) -> list[tuple[str, ast.AST]]:
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if isinstance(child, ast.FunctionDef) and name in names:
                    found.append((name, child))
                visit(child, name + ".")
            elif isinstance(child, ast.If):  # kernels are defined under `if HAS_TRITON:`
                visit(child, prefix)

    visit(tree, "")
    missing = set(names) - {n for n, _ in found}
    if missing:
        raise SystemExit(f"tests/mutants.py: no function {sorted(missing)} in the target file; update TARGETS")
    return found


def _token_between(src: bytes, start: int, end: int, token: str) -> int | None:
    """Offset of `token` as an operator in src[start:end] (outside comments), or None."""
    gap = src[start:end]
    i = gap.find(token.encode())
    while i >= 0:
        after = gap[i + len(token): i + len(token) + 1]
        before = gap[i - 1: i] if i else b""
        if after not in (b"=", b"<", b">", b"*", b"/") and before not in (b"=", b"<", b">", b"!", b"*", b"/"):
            return start + i
        i = gap.find(token.encode(), i + 1)
    return None


def generate(name: str, target: Target) -> list[Mutant]:
    path = REPO / target.path
    src = path.read_bytes()
    tree = ast.parse(src)
    starts = [0]
    for line in src.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def off(lineno: int, col: int) -> int:  # ast columns are UTF-8 byte offsets
        return starts[lineno - 1] + col

    out: list[Mutant] = []

    def add(fn: str, node: ast.AST, what: str, start: int, end: int, new: str) -> None:
        out.append(Mutant(f"{name}:{len(out) + 1}", name, f"{target.path}:{node.lineno} {fn}", what,
                          [(start, end, new.encode())]))

    for fn, func in _functions(tree, target.functions + target.edges):
        edges_only = fn in target.edges
        body = func.body[1:] if ast.get_docstring(func) else func.body
        nodes = [n for stmt in body for n in ast.walk(stmt)]
        # Constants are mutated only as operands of arithmetic and comparisons (1 - eps, n > 1): as call arguments
        # they are mostly fill values and sizes (tl.where(m, x, 0.0), other=0.0), which masking makes irrelevant.
        operands = {id(c) for n in nodes if isinstance(n, (ast.BinOp, ast.Compare))
                    for c in ((n.left, n.right) if isinstance(n, ast.BinOp) else (n.left, *n.comparators))}
        # Pointer arithmetic (logp_ptr + row + c) is addressing, not a formula: a slip there reads other memory.
        addressing = {id(n) for n in nodes if isinstance(n, ast.BinOp) and any(
            isinstance(x, ast.Name) and x.id.endswith("_ptr") for x in ast.walk(n))}
        addressing |= {id(x) for n in nodes if id(n) in addressing for x in ast.walk(n)}
        for node in sorted(nodes, key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0))):
            if id(node) in addressing or (edges_only and not isinstance(node, EDGE_OPERATORS)):
                continue
            if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in COMPARE:
                old, new = COMPARE[type(node.ops[0])]
                left_end = off(node.left.end_lineno, node.left.end_col_offset)
                at = _token_between(src, left_end, off(node.comparators[0].lineno, node.comparators[0].col_offset), old)
                if at is not None:
                    add(fn, node, f"`{old}` -> `{new}`", at, at + len(old), new)
            elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOP:
                old, new = BINOP[type(node.op)]
                left = node.left if isinstance(node, ast.BinOp) else node.target
                right = node.right if isinstance(node, ast.BinOp) else node.value
                at = _token_between(src, off(left.end_lineno, left.end_col_offset), off(right.lineno, right.col_offset),
                                    old)
                if at is not None:
                    add(fn, node, f"`{old}` -> `{new}`" + (" in an augmented assignment" if isinstance(node, ast.AugAssign)
                                                           else ""), at, at + len(old), new)
            elif (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not))
                  and not isinstance(node.operand, ast.Constant)):  # -1: mostly a dim, where 1 is the same in 2-D
                start = off(node.lineno, node.col_offset)
                width = off(node.operand.lineno, node.operand.col_offset) - start
                add(fn, node, "dropped unary `-`" if isinstance(node.op, ast.USub) else "dropped `not`", start,
                    start + width, "")
            elif isinstance(node, ast.BoolOp):
                old, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
                a, b = node.values[0], node.values[1]
                at = _token_between(src, off(a.end_lineno, a.end_col_offset), off(b.lineno, b.col_offset), old)
                if at is not None:
                    add(fn, node, f"`{old}` -> `{new}`", at, at + len(old), new)
            elif isinstance(node, ast.Call):
                f = node.func
                attr = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                in_triton = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "tl"
                if edges_only and attr in ("sum", "mean"):
                    continue
                if attr in CALLS and not (in_triton and attr in ("sum", "mean")):  # no tl.mean: a crash, not a bug
                    end = off(f.end_lineno, f.end_col_offset)
                    add(fn, node, f"`{attr}` -> `{CALLS[attr]}`", end - len(attr), end, CALLS[attr])
                for kw in node.keywords:
                    if attr in ("clamp", "clamp_", "clip") and kw.arg in ("min", "max"):
                        swap = "max" if kw.arg == "min" else "min"
                        start = off(kw.lineno, kw.col_offset)
                        add(fn, node, f"`{attr}({kw.arg}=)` -> `{attr}({swap}=)`", start, start + len(kw.arg), swap)
                    if kw.arg == "key" and isinstance(kw.value, ast.Lambda) and isinstance(kw.value.body, ast.Tuple):
                        first = kw.value.body.elts[0]
                        t = kw.value.body
                        add(fn, node, "sort key without its tie-break", off(t.lineno, t.col_offset),
                            off(t.end_lineno, t.end_col_offset), ast.get_source_segment(src.decode(), first))
            elif (isinstance(node, ast.Constant) and type(node.value) in (int, float) and id(node) in operands
                  and node.value + 1 != node.value):  # 1e250 + 1 is 1e250: no mutant
                start, end = off(node.lineno, node.col_offset), off(node.end_lineno, node.end_col_offset)
                add(fn, node, f"constant {node.value!r} -> {node.value + 1!r}", start, end, repr(node.value + 1))
    for target_name, title, patches in NAMED:
        if target_name != name:
            continue
        edits = []
        for old, new, count in patches:
            found = [i for i in range(len(src)) if src.startswith(old.encode(), i)]
            if len(found) != count:
                raise SystemExit(f"tests/mutants.py: named mutant {title!r}: {old!r} occurs {len(found)} times in "
                                 f"{target.path}, expected {count}; update NAMED")
            edits += [(i, i + len(old.encode()), new.encode()) for i in found]
        out.append(Mutant(f"{name}:{title.split()[0]}", name, target.path, title, edits))
    return out


def apply(src: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    for start, end, new in sorted(edits, reverse=True):
        src = src[:start] + new + src[end:]
    return src


# ---------------------------------------------------------------------------------------------------------- running


def run_tests(tests: tuple[str, ...], timeout: float) -> tuple[str, str, float]:
    """Run pytest on `tests` in a forked child; (outcome, detail, seconds)."""
    t0 = time.monotonic()
    log = tempfile.NamedTemporaryFile(prefix="mutant-", suffix=".log", delete=False)
    pid = os.fork()
    if pid == 0:  # the child: fresh project modules, compiled from the (mutated) source
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        os.setpgid(0, 0)
        sys.pycache_prefix = tempfile.mkdtemp(prefix="mutant-pyc-")
        sys.dont_write_bytecode = True
        import pytest

        code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rf", *tests])
        os._exit(int(code))
    deadline = t0 + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", "", time.monotonic() - t0
        time.sleep(0.2)
    code = os.waitstatus_to_exitcode(status)
    text = Path(log.name).read_text(errors="replace")
    os.unlink(log.name)
    seconds = time.monotonic() - t0
    if code == 0:
        return "survived", "", seconds
    if code == 1:  # tests failed: the first failure's name, then its first assertion lines
        lines = text.splitlines()
        failed = next((ln for ln in lines if ln.startswith(("FAILED", "ERROR"))), "")
        first = next((ln.strip("_ ") for ln in lines if ln.startswith("____")), "")
        why = [ln for ln in lines if ln.startswith("E ")][:4]
        return "killed", "\n".join([failed or first, *why]), seconds
    return "error", text[-1500:], seconds  # collection error, crash: the mutant broke the import, which counts


def check_clean(paths: list[str]) -> None:
    proc = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:  # a plain copy (e.g. of an older commit, to measure its tests): nothing to undo with
        print(f"tests/mutants.py: {REPO} is not a git checkout; an interrupted run leaves a mutant in place there")
    elif proc.stdout.strip():
        raise SystemExit(f"tests/mutants.py: uncommitted changes in {proc.stdout.split()}; commit or stash them first "
                         "(the run rewrites these files and puts the committed text back)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", nargs="*", choices=sorted(TARGETS), default=sorted(TARGETS))
    p.add_argument("--only", nargs="*", default=None, help="mutant ids (e.g. grpo:12 msft:M5)")
    p.add_argument("--named", action="store_true", help="only the named (hand-written) mutants")
    p.add_argument("--tests", default=None, help="pytest arguments instead of the target's own, one string "
                   "(e.g. --tests='tests/test_msft.py -k report_is_consistent')")
    p.add_argument("--list", action="store_true", help="list the mutants and stop")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per mutant")
    p.add_argument("--json", default=None, help="write every mutant's outcome here")
    args = p.parse_args(argv)

    mutants = [m for t in args.target for m in generate(t, TARGETS[t])]
    if args.only is not None:
        mutants = [m for m in mutants if m.id in args.only]
    if args.named:
        mutants = [m for m in mutants if ":M" in m.id]
    if args.list:
        for m in mutants:
            print(f"{m.id:12} {m.where:50} {m.what}")
        print(f"{len(mutants)} mutants")
        return 0
    check_clean([TARGETS[t].path for t in args.target])
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # subprocesses (the verifier's workers) compile the mutant afresh
    import pytest  # noqa: F401  imported once here, inherited by every child
    import torch  # noqa: F401

    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    results = []
    for i, m in enumerate(mutants):
        target = TARGETS[m.target]
        path = REPO / target.path
        original = path.read_bytes()
        try:
            path.write_bytes(apply(original, m.edits))
            tests = tuple(shlex.split(args.tests)) if args.tests else target.tests
            m.outcome, m.detail, m.seconds = run_tests(tests, args.timeout)
        finally:
            path.write_bytes(original)
        results.append(m)
        print(f"[{i + 1}/{len(mutants)}] {m.id:12} {m.outcome:8} {m.seconds:6.0f} s  {m.where}  {m.what}"
              + (f"  ({m.detail.splitlines()[0][:100]})" if m.outcome == "killed" and m.detail else ""), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) | {"edits": None} for r in results], indent=1))
    survivors = [m for m in results if m.outcome in ("survived", "timeout")]
    by_target = {t: [m for m in results if m.target == t] for t in args.target}
    print("\ntarget    mutants  killed  survived")
    for t, ms in by_target.items():
        print(f"{t:9} {len(ms):7} {sum(m.outcome in ('killed', 'error') for m in ms):7} "
              f"{sum(m.outcome in ('survived', 'timeout') for m in ms):9}")
    print("\nsurvivors:" if survivors else "\nno survivors")
    for m in survivors:
        print(f"  {m.id:12} {m.where}  {m.what}" + ("  (timed out)" if m.outcome == "timeout" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
