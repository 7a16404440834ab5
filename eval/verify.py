"""Math answer verification: the RLVR reward and the MATH500/GSM8K scorer.

For: `extract_answer` (the final answer in a completion), `verify` (one gold vs one prediction, in-process) and
`verify_batch` / `verify_batch_reasons` (many pairs; the stages that may be slow run in a pool of worker processes
with a hard per-item deadline and a memory cap). Safe from any thread: nothing here uses signals.
Not for: grading proofs or free-form text. Model output is untrusted: it is parsed by eval/latex.py's own grammar
and never reaches eval/exec or sympy's string parsers.

Stages, cheapest first (eval/latex.py has the details):
  1. normalisation and exact match of token strings            in-process, decides most correct answers
  2. structure + exact rationals + floats at random points     in-process, decides almost everything else
  3. sympy simplify on trees built with sympy constructors      worker process, only where 2 cannot decide
A verdict is one of "correct", "wrong", "unparseable" (no answer, or the prediction is outside the grammar or its
size guards) or "timeout" (the worker ran past its deadline, or died, e.g. on its memory cap; it is replaced).

Judgement calls (each has accepted and rejected cases in tests/data/verify_cases.jsonl):
  - A completion's answer is what follows its last final-answer convention (extract_answer lists them); text after
    it is a remark. A completion without one, or cut off inside its last \\boxed{, has no answer ("unparseable"):
    a reward must not come from a number that happens to appear in unfinished reasoning.
  - Decimals are exact values: 6366.2 is not 20000/pi. Pass rel_tol > 0 to grade rounded answers (latex.NumericJudge).
  - A percentage is the number before the sign (10\\% is 10); words after a number are its unit ("31 paintings").
  - "x = 5", "AB = 4", "(x, y) = (1, 2)" state the value on the right; "p=5, q=2" is the tuple (5, 2) and matches
    "q=2, p=5" by name; "x=1, x=2" is the set {1, 2}. Several boxes separated only by "and"/"or"/commas list one
    answer ("\\boxed{-2} and \\boxed{1}" is "-2, 1"); the same value boxed twice is one answer.
  - Sets compare as sets (a repeated element counts once); ";" and "or" separate alternatives, "and" and ","
    elements; "1,000" is a thousand but "32, 349" (a space after the comma) is a list of two.
  - Inequalities compare as sets of real numbers: "-x > -1" is "x < 1" is (-\\infty, 1). Two relations agree when
    their atoms match (sides proportional with a positive factor); a relation in one variable and intervals agree
    when they hold at the same probe points (every endpoint and linear boundary, beside it, between, far out, a
    grid, all mirrored about 0): a nonlinear boundary ("|z| <= 3/2") that is not an endpoint is seen only by the
    grid, so two sets that differ only on a sliver between grid points would be taken as equal.
  - After a \\boxed answer only "Final Answer" or "####" restates it ("check our answer: ..." is a remark); a
    sentence after a marker gives what it says "is" ("Final Answer: The largest $n$ is 34").

Not measured here: how these rules fare on other models' habits. bench/bench_verify.py measures them against
math-verify on MATH500/GSM8K completions built in many conventions, with labels known by construction.
"""

import atexit
import json
import os
import re
import subprocess
import sys
import threading
import time
from multiprocessing.connection import wait

from posttrain.eval.latex import NumericJudge, Refused, SympyJudge, canonical, compare, normalize, parse_answer

REASONS = ("correct", "wrong", "unparseable", "timeout")
MAX_TEXT_CHARS = 1_000_000  # a completion longer than this is cut to its last MAX_TEXT_CHARS characters
MAX_JOINED_BOXES = 32  # boxes listed together as one answer (an answer has at most latex.MAX_ELEMENTS elements)

# ---------------------------------------------------------------------------------------------------------------
# Extraction


def _braced(text: str, start: int) -> str | None:
    """The contents of the {...} group opening at or after `start` (nested braces balanced), else None."""
    j = start
    while j < len(text) and text[j] == " ":
        j += 1
    if j >= len(text) or text[j] != "{":
        return None
    depth = 0
    for k in range(j, len(text)):
        c = text[k]
        if c == "{" and text[k - 1] != "\\":
            depth += 1
        elif c == "}" and text[k - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k]
    return None


# A chat model's turn ends at its first special token; what follows (a new "user" turn) is not its answer.
_CHAT_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>|</s>|<eos>|<end_of_turn>")
# "The (final) answer is", "Answer:", "**Answer:**", "answer = ", "**Final Answer**" or "Answer" before a line break
# or math ("Answer \\[ 9 \\]"), GSM8K's "####". A bare "answer" before a word ("to answer this", "the answer
# choices") is not a marker.
_MARKER = re.compile(
    r"\b(?:final\s+)?answer\b\s*(?:\*\*\s*)?(?:(?:is|would\s+be|should\s+be|will\s+be)\b[ \t]*:?|[:=])[ \t]*(?:\*\*)?"
    r"|\b(?:final\s+)?answer\b[ \t]*(?:\*\*)?(?=[ \t]*(?:\n|\$|\\[\[(]|$))"
    r"|####",
    re.I,
)
_FINAL = re.compile(r"final\s+answer|####", re.I)
# What follows a marker but is a remark about the answer, not the answer: skip to the marker before.
_REMARK = re.compile(r"(?:correct|incorrect|wrong|right|not\b|indeed|consistent|reasonable|verified|confirmed|"
                     r"the same|that\b|this\b|also\b|clear|unique|as follows|below|above|to\b|of\b|in\b|for\b)", re.I)
_DELIMS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_LIST_ITEM = re.compile(r"\s*(?:[-*•]|\d+[.)])\s+(.*)")
# Between two \boxed that list one answer together ("\boxed{-2} and \boxed{1}"): only joining words and math
# delimiters, and a name being assigned ("x = \boxed{2} or x = \boxed{3}").
_JOINER = re.compile(r"(?:\s|\$|\\[()\[\],]|,|;|\band\b|\bor\b|\\text\{\s*(?:and|or)\s*\}|\\q?quad|"
                     r"[a-zA-Z](?:_\{?\w+\}?)?\s*=)*")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# Where the answer sentence ends and a remark begins: "16 (I checked it with $x = 1$)", "17 because …".
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n|\s+(?:because|since|which|where|as|so|when|if)\s|\s+\((?=[A-Za-z]+\s)", re.I)


def _delimited(text: str, whole: bool = False) -> str | None:
    """The contents of the math span text opens with ($…$, $$…$$, \\(…\\), \\[…\\]); None if it opens none or
    leaves it unclosed, or (whole=True) if text goes on after the span closes."""
    for left, right in _DELIMS:
        if text.startswith(left):
            end = text.find(right, len(left))
            while right == "$" and end > 0 and text[end - 1] == "\\":  # "\$" is a dollar sign, not a delimiter
                end = text.find(right, end + 1)
            if end < 0 or (whole and end + len(right) != len(text)):
                return None
            return text[len(left) : end].strip()
    return None


def _box_before(text: str, pos: int) -> tuple[int, int, str | None] | None:
    """(start, end, contents) of the last \\boxed / \\fbox starting before pos, or None; contents None when the
    box never closes (cut off). Searches backwards, so a text of many boxes costs one scan, not one per box."""
    k = pos
    while True:
        k = max(text.rfind("\\boxed", 0, k), text.rfind("\\fbox", 0, k))
        if k < 0:
            return None
        after = k + (6 if text.startswith("\\boxed", k) else 5)
        if after >= len(text) or not text[after].isalpha():
            break
    inner = _braced(text, after)
    if inner is not None:
        return k, text.index("{", after) + len(inner) + 2, inner.strip()
    bare = re.match(r"\s+([^\s${}]+)", text[after : after + 200])  # "\boxed 5"
    if bare and not text[after:].lstrip().startswith("{"):
        return k, after + bare.end(), bare.group(1)
    return k, len(text), None


def _from_boxes(text: str, last: tuple[int, int, str]) -> str:
    """The last box, joined with the boxes just before it when only joining words separate them."""
    parts = [last[2]]
    box = last
    for _ in range(MAX_JOINED_BOXES):
        prev = _box_before(text, box[0])
        if prev is None or prev[2] is None:
            break
        between = text[prev[1] : box[0]]
        if len(between) > 200 or "\n\n" in between or not _JOINER.fullmatch(between):
            break
        if prev[2] not in parts:  # the same answer boxed twice is one answer
            parts.insert(0, prev[2])
        box = prev
    return ", ".join(parts)


def _after_marker(rest: str) -> str | None:
    """The answer that follows a marker: a math span, a list of lines, or the rest of the sentence."""
    rest = rest.lstrip(" \t*:")
    if rest.startswith("\n") or not rest.strip():
        block = rest.strip("\n ").split("\n\n")[0]
        if not block:
            return None
        inner = _delimited(block.lstrip())
        if inner is not None:
            return inner
        lines = [ln for ln in block.split("\n") if ln.strip()]
        items = [_LIST_ITEM.fullmatch(ln) for ln in lines]
        if len(lines) > 1 and all(items):  # "- $p = 6$" / "- $q = 31$" / "- $r = -1$"
            return ", ".join(_strip_math(m.group(1)) for m in items)
        rest = lines[0].lstrip(" \t*:")
    inner = _delimited(rest)
    if inner is not None:
        return inner
    end = _SENTENCE_END.search(rest)
    sentence = _strip_math((rest[: end.start()] if end else rest).strip().strip("*").strip())
    if len(_WORDS.findall(_COMMANDS.sub(" ", sentence))) >= 2:
        # A sentence, "The largest $n$ is 34": the answer is what it is said to be, and in prose, its one number.
        said = re.split(r"\s(?:is|are|equals|be)\s", sentence)[-1]
        if len(_WORDS.findall(_COMMANDS.sub(" ", said))) < 2:
            return _strip_math(said) or None
        numbers = _NUMBER.findall(said)
        return numbers[0].rstrip(",") if len(numbers) == 1 else None
    return sentence or None


def _strip_math(s: str) -> str:
    """"$x = 5$" -> "x = 5"; text with math inside it ("$n$ is 34") stays as it is."""
    s = s.strip().strip("*").strip()
    inner = _delimited(s, whole=True)
    return s if inner is None else inner


def extract_answer(text: str) -> str | None:
    """The final answer in a completion, or None when it states none.

    Rules, in order (each is a convention models use; see the tests for examples of each):
      - the text ends at the first chat special token (<|im_end|>, <|im_start|>, </s>, …): what follows is not
        this turn;
      - \\boxed{…} / \\fbox{…}: the contents of the last box (nested braces allowed, also "\\boxed 5"), together
        with the boxes right before it when only "and", "or", commas or math delimiters separate them
        ("\\boxed{-2} and \\boxed{1}" is "-2, 1"). A last box that never closes is a completion cut off: None,
        never a number from the reasoning. After the last box, only a "Final Answer" or "####" line can restate
        the answer ("We may check our answer: …" is a remark);
      - otherwise the last marker ("the final answer is", "Answer:", "**Answer:**", "Final Answer" as a heading,
        "####"), skipping markers followed by a remark ("this answer is correct"): the math span that follows
        ($…$, $$…$$, \\(…\\), \\[…\\]), or a list of "- $p = 6$" lines, or the rest of the sentence. Text after
        it is a remark, not the answer;
      - no marker: a short bare answer is itself the answer ("$\\frac12$", "x = 3"); a one-line sentence with
        exactly one number gives that number ("She makes $1,600 in total."). Anything else has no final answer:
        None (a completion cut off in its reasoning must not be graded by a number found there).
    Never raises: anything that is not a str gives None.
    """
    if not isinstance(text, str) or not text:
        return None
    text = text[-MAX_TEXT_CHARS:]
    chat = _CHAT_TOKEN.search(text)
    if chat:
        text = text[: chat.start()]
    box = _box_before(text, len(text))
    if box is not None and box[2] is None:
        return None  # cut off inside the last box: no answer, whatever the reasoning said
    # Markers before the last box do not count (the box comes after them), so the search starts after it.
    offset = max(len(text) - 5000, box[1] if box is not None else 0, 0)
    for m in reversed(list(_MARKER.finditer(text, offset))):
        if box is not None and not _FINAL.match(m.group(0)):
            continue  # after a box only "Final Answer" or "####" restates the answer ("check our answer: …" does not)
        rest = text[m.end() :]
        if _REMARK.match(rest.lstrip(" \t*:")):
            continue
        answer = _after_marker(rest)
        if answer:
            return answer
    if box is not None:
        return _from_boxes(text, box)
    return _bare(text)


def _bare(text: str) -> str | None:
    """A completion without a final-answer marker: a bare answer, or one sentence with one number."""
    s = text.strip()
    inner = _delimited(s.rstrip(".").rstrip(), whole=True)  # "$\\frac12$."
    if inner is not None:
        return inner or None
    words = len(_WORDS.findall(_COMMANDS.sub(" ", s)))
    if words < 2 and len(s) <= 1000:  # math without prose, also over several lines (a matrix)
        return s or None
    if "\n" in s or len(s) > 200:
        return None
    numbers = _NUMBER.findall(s)
    if len(numbers) == 1 and re.search(r"[.!]\s*$|\d\s*$", s):
        return numbers[0].rstrip(",")
    return None


_WORDS = re.compile(r"(?<![a-zA-Z\\])(?!and\b)[a-zA-Z]{3,}\b")  # words of prose; "1 and 2" is a list
_COMMANDS = re.compile(r"\\(?:begin|end)\{[^{}]*\}|\\[a-zA-Z]+")


def _answer_of(pred: str) -> str | None:
    return extract_answer(pred)


# ---------------------------------------------------------------------------------------------------------------
# One pair: the in-process stages.


def _gold_answer(gold: str) -> str:
    return (extract_answer(gold) if ("\\boxed" in gold or "####" in gold) else None) or gold


def _cheap(gold: str, answer: str, rel_tol: float) -> tuple[str, object, object]:
    """(verdict, gold tree, pred tree); verdict "undecided" means only the sympy stage can tell."""
    if answer == gold:
        return "correct", None, None
    cg, cp = canonical(gold), canonical(answer)
    if cg == cp:
        return "correct", None, None
    try:
        g = parse_answer(gold)
    except Refused:
        return "wrong", None, None  # gold outside the grammar: only an exact match could have been right
    try:
        p = parse_answer(answer)
    except Refused:
        return "unparseable", None, None
    if g[0] == "text" or p[0] == "text":
        same = re.sub(r"\s+", "", normalize(gold)).lower() == re.sub(r"\s+", "", normalize(answer)).lower()
        return ("correct" if same else "wrong"), None, None
    try:
        verdict = compare(g, p, NumericJudge(rel_tol))
    except Refused:
        return "unparseable", None, None
    except (ArithmeticError, ValueError, RecursionError):
        verdict = None
    return {True: "correct", False: "wrong", None: "undecided"}[verdict], g, p


def _expensive(gold: str, answer: str, rel_tol: float) -> str:
    """The sympy stage; runs in a worker process."""
    try:
        verdict = compare(parse_answer(gold), parse_answer(answer), SympyJudge(rel_tol))
    except Refused:
        return "unparseable"
    except (ArithmeticError, ValueError, TypeError, RecursionError, AttributeError):
        return "wrong"
    return "correct" if verdict else "wrong"


def verify_reason(gold: str, pred: str, *, rel_tol: float = 0.0) -> str:
    """Like verify, with the reason. Runs every stage in this process and thread: no deadline, so use it only on
    trusted or short inputs; verify_batch is the entry point for model output."""
    if not isinstance(gold, str) or not isinstance(pred, str):
        return "unparseable"
    answer = _answer_of(pred)
    if answer is None:
        return "unparseable"
    verdict, _, _ = _cheap(_gold_answer(gold), answer, rel_tol)
    return _expensive(_gold_answer(gold), answer, rel_tol) if verdict == "undecided" else verdict


def verify(gold: str, pred: str, *, rel_tol: float = 0.0) -> bool:
    """True when `pred` (a full completion or an extracted answer) states the same answer as `gold`.

    In-process and without a deadline; for model output in bulk use verify_batch, which has one.
    """
    return verify_reason(gold, pred, rel_tol=rel_tol) == "correct"


# ---------------------------------------------------------------------------------------------------------------
# The worker pool: plain child processes (fork+exec of this Python) talking JSON lines over pipes. Not
# multiprocessing: its spawn/forkserver children re-import the caller's __main__ (a training script), and its
# fork start copies the caller's threads and CUDA state.

_WORKER_BOOT = "from posttrain.eval.verify import _worker_main; _worker_main()"  # a constant, never model text


def _worker_main() -> None:
    """Worker loop (stdin/stdout of a child process). argv: memory cap in bytes, check as "module:function".

    Reads one JSON [gold, answer, rel_tol] per line, writes one verdict per line: plain text both ways, so
    neither side unpickles anything.
    """
    import importlib

    memory_bytes, spec = int(sys.argv[1]), sys.argv[2]
    module, name = spec.split(":")
    check = getattr(importlib.import_module(module), name)
    import sympy  # noqa: F401  -- imported before "ready" so that no item's deadline pays for it

    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ImportError, ValueError, OSError):
        pass  # no RLIMIT_AS here: the parent's deadline still bounds every item
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            gold, answer, rel_tol = json.loads(line)
            verdict = check(gold, answer, rel_tol)
        except MemoryError:
            verdict = "timeout"
        except Exception:
            verdict = "wrong"
        out.write(f"{verdict}\n")
        out.flush()


class _Worker:
    def __init__(self, memory_bytes: int, check: str):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))  # the child imports posttrain as we did
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, str(memory_bytes), check],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        self.fd = self.proc.stdout.fileno()
        self.ready = False
        self._buf = b""

    def fileno(self) -> int:
        return self.fd

    def send(self, gold: str, answer: str, rel_tol: float) -> None:
        self.proc.stdin.write(json.dumps([gold, answer, rel_tol]).encode() + b"\n")
        self.proc.stdin.flush()

    def read_line(self) -> str | None:
        """The next line if a whole one has arrived, "" if not yet, None at EOF (the worker died)."""
        chunk = os.read(self.fd, 4096)
        if not chunk:
            return None
        self._buf += chunk
        if b"\n" not in self._buf:
            return ""
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(1.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class Verifier:
    """Owns a pool of worker processes for the sympy stage; the cheap stages run in the caller's thread.

    Workers start lazily (when an item first needs sympy; ~1 s to import it, not counted in any deadline), live
    until close(), and are replaced when they pass their deadline or die. Threads may share one Verifier: each
    batch checks workers out and returns them. memory_mb caps each worker's address space (RLIMIT_AS).
    `check` names the worker's function as "module:function" (tests swap in a hanging one).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, memory_mb: int = 2048, rel_tol: float = 0.0,
                 check: str = "posttrain.eval.verify:_expensive"):
        if workers < 1:
            raise ValueError(f"Verifier(workers={workers}): need at least one worker process")
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_bytes = memory_mb << 20
        self.rel_tol = rel_tol
        self.check = check
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._live = 0
        self._closed = False
        self.killed = 0  # workers killed or found dead, for tests and logs

    # -- checkout -------------------------------------------------------------------------------------------------
    def _acquire(self, n: int, limit: int) -> list[_Worker]:
        with self._cond:
            while not self._idle and self._live >= limit and not self._closed:
                self._cond.wait()
            if self._closed:
                raise RuntimeError("Verifier.verify_batch after close(): make a new Verifier")
            taken = [self._idle.pop() for _ in range(min(n, len(self._idle)))]
            spawn = max(0, min(n - len(taken), limit - self._live))
            self._live += spawn
        try:
            taken += [_Worker(self.memory_bytes, self.check) for _ in range(spawn)]
        except BaseException:
            with self._cond:
                self._live -= spawn
            raise
        return taken

    def _release(self, alive: list[_Worker], dead: int) -> None:
        with self._cond:
            self._live -= dead
            if self._closed:
                for w in alive:
                    w.kill()
                self._live -= len(alive)
            else:
                self._idle.extend(alive)
            self._cond.notify_all()

    # -- batches --------------------------------------------------------------------------------------------------
    def verify_batch_reasons(self, golds: list[str], preds: list[str], *, timeout_s: float | None = None,
                             workers: int | None = None) -> list[str]:
        """One verdict per pair: "correct", "wrong", "unparseable" or "timeout". Never raises on bad input.

        timeout_s is the hard deadline of one item in a worker, counted from when it is sent; the cheap
        in-process stages are bounded by the size guards of eval/latex.py instead.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        limit = max(1, min(workers or self.workers, self.workers))
        try:
            n = min(len(golds), len(preds))
        except TypeError:
            return []
        out = ["unparseable"] * n
        pending = []
        for i in range(n):
            gold, pred = golds[i], preds[i]
            if not isinstance(gold, str) or not isinstance(pred, str):
                continue
            try:
                answer = _answer_of(pred)
                if answer is None:
                    continue
                gold = _gold_answer(gold)
                verdict, _, _ = _cheap(gold, answer, self.rel_tol)
            except Exception:  # a bug in a cheap stage must not take the training loop down
                verdict = "unparseable"
            if verdict == "undecided":
                pending.append((i, gold, answer))
            else:
                out[i] = verdict
        if pending:
            self._run_pool(pending, out, timeout_s, limit)
        return out

    def _run_pool(self, pending: list, out: list, timeout_s: float, limit: int) -> None:
        pending = pending[::-1]
        crew = self._acquire(len(pending), limit)
        idle = [w for w in crew if w.ready]
        starting = [w for w in crew if not w.ready]
        busy: dict[_Worker, tuple[int, float]] = {}
        dead = 0

        def replace(w: _Worker) -> None:
            w.kill()
            self.killed += 1
            starting.append(_Worker(self.memory_bytes, self.check))

        try:
            while pending or busy:
                while pending and idle:
                    w = idle.pop()
                    i, gold, answer = pending.pop()
                    try:
                        w.send(gold, answer, self.rel_tol)
                    except (OSError, ValueError):  # died while idle: replace it, retry the item
                        pending.append((i, gold, answer))
                        replace(w)
                        continue
                    busy[w] = (i, time.monotonic() + timeout_s)
                now = time.monotonic()
                deadline = min((d for _, d in busy.values()), default=now + 60.0)
                for w in wait(list(busy) + starting, timeout=max(0.0, deadline - now)):
                    line = w.read_line()
                    if line == "":
                        continue
                    if w in starting:
                        starting.remove(w)
                        if line == "ready":
                            w.ready = True
                            idle.append(w)
                        else:  # could not start (bad check name, no sympy): give up on this worker
                            w.kill()
                            dead += 1
                            if not (idle or busy or starting):
                                raise RuntimeError(f"eval.verify: worker for {self.check!r} failed to start")
                        continue
                    i, _ = busy.pop(w)
                    if line is None:  # died on its memory cap or crashed
                        out[i] = "timeout"
                        replace(w)
                    else:
                        out[i] = line if line in REASONS else "wrong"
                        idle.append(w)
                now = time.monotonic()
                for w, (i, d) in list(busy.items()):
                    if now >= d:
                        del busy[w]
                        out[i] = "timeout"
                        replace(w)
        except BaseException:
            for w in list(busy):
                w.kill()
                dead += 1
            raise
        finally:
            self._release(idle + starting, dead)

    def verify_batch(self, golds: list[str], preds: list[str], *, timeout_s: float | None = None,
                     workers: int | None = None) -> list[bool]:
        return [r == "correct" for r in self.verify_batch_reasons(golds, preds, timeout_s=timeout_s, workers=workers)]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._live -= len(idle)
            self._cond.notify_all()
        for w in idle:
            w.kill()

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_default: Verifier | None = None
_default_lock = threading.Lock()


def default_verifier(workers: int = 2) -> Verifier:
    """The process-wide Verifier used by the module-level functions; created on first use, closed at exit."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Verifier(workers=workers)
            atexit.register(_default.close)
        # Grow, never shrink or replace: another thread may be inside a batch on this Verifier.
        _default.workers = max(_default.workers, workers)
        return _default


def verify_batch_reasons(golds: list[str], preds: list[str], *, timeout_s: float = 5.0, workers: int = 2) -> list[str]:
    """Verdicts ("correct" / "wrong" / "unparseable" / "timeout") for each (gold, pred) pair; see Verifier."""
    return default_verifier(workers).verify_batch_reasons(golds, preds, timeout_s=timeout_s, workers=workers)


def verify_batch(golds: list[str], preds: list[str], *, timeout_s: float = 5.0, workers: int = 2) -> list[bool]:
    """verify for many pairs, with a hard per-item deadline on the sympy stage; safe from any thread."""
    return [r == "correct" for r in verify_batch_reasons(golds, preds, timeout_s=timeout_s, workers=workers)]
