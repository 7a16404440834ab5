"""Math answer verification: the RLVR reward and the MATH500/GSM8K scorer.

For: `extract_answer` (the final answer in a completion), `verify` (one gold vs one prediction, in-process) and
`verify_batch` / `verify_batch_reasons` (many pairs; the stages that may be slow run in a pool of worker processes
with a hard per-item deadline and a memory cap). Safe from any thread: nothing here uses signals.
Not for: grading proofs or free-form text. Model output is untrusted: it is parsed by eval/latex.py's own grammar
and never reaches eval/exec or sympy's string parsers.

Stages, cheapest first (eval/latex.py has the details):
  0. extraction: the final-answer region and every candidate it names (extract_answer)
  1. normalisation and exact match of token strings            in-process, decides most correct answers
  2. structure + exact rationals + floats at random points     in-process, decides almost everything else
  3. sympy simplify on trees built with sympy constructors      worker process, only where 2 cannot decide
A verdict is one of "correct", "wrong", "unparseable" (no answer, or the prediction is outside the grammar or its
size guards) or "timeout" (the worker ran past its deadline, or died, e.g. on its memory cap; it is replaced).

Judgement calls (each has accepted and rejected cases in tests/data/verify_cases.jsonl or verify_longtail.jsonl;
docs/verifier.md gives the reasons and the measurements):
  - The answer is what follows the last final-answer convention (extract_answer lists them). A completion without
    one, or cut off inside its last \\boxed{, has no answer: a reward must not come from a number in unfinished
    reasoning. Without a marker, a one-line statement gives its one value, and a long completion its closing
    sentence only when its turn visibly ended (a chat token follows).
  - Hedging: every candidate the final-answer region names is part of the answer, so "5 or 6" is the set {5, 6}:
    wrong against 5, right against {5, 6}. The same value named twice is one candidate; a remark that offers no
    candidate ("I checked it with $x = 1$") is not part of the region; a last statement naming nothing readable
    gives no answer (never the statement it replaced).
  - Approximations: a predicted decimal matches a rational gold when it is the gold rounded to its own places with
    at least sig_digits (4) significant digits; otherwise decimals are exact values (6366.2 is not 20000/pi).
    "a \\approx b" is graded by a. rel_tol > 0 grades every decimal with a relative tolerance instead.
  - A percentage is the number before the sign (10\\% is 10); words after a number are its unit ("31 paintings").
  - "x = 5", "AB = 4", "(x, y) = (1, 2)" state the value on the right; "p=5, q=2" is the tuple (5, 2) and matches
    "q=2, p=5" by name; "x=1, x=2" is the set {1, 2}; boxes joined by "and"/"or"/commas are one answer.
  - Sets compare as sets; ";" and "or" separate alternatives, "and" and "," elements; "1,000" is a thousand.
  - Inequalities compare as sets of real numbers, by matching atoms or at probe points around every endpoint and
    linear boundary: a nonlinear boundary that is not an endpoint is seen only by a grid of probes.
"""

import atexit
import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
from multiprocessing.connection import wait

from posttrain.eval.latex import SIG_DIGITS, NumericJudge, Refused, SympyJudge, canonical, compare, normalize, parse_answer

REASONS = ("correct", "wrong", "unparseable", "timeout")
MAX_TEXT_CHARS = 1_000_000  # a completion longer than this is cut to its last MAX_TEXT_CHARS characters
MAX_JOINED_BOXES = 32  # boxes listed together as one answer (an answer has at most latex.MAX_ELEMENTS elements)

# ---------------------------------------------------------------------------------------------------------------
# Extraction: the final-answer region of a completion, and every candidate answer it names.


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
    r"|\b(?:final\s+)?answer\b(?=[ \t]*(?:\*\*[ \t]*)?(?:\n|\$|\\[\[(]|$))[ \t]*(?:\*\*)?"
    r"|####",
    re.I,
)
_FINAL = re.compile(r"final\s+answer|####", re.I)
# What follows a marker but is a remark about the answer, not the answer: skip to the marker before.
_REMARK = re.compile(r"(?:correct|incorrect|wrong|right|not\b|indeed|consistent|reasonable|verified|confirmed|"
                     r"the same|that\b|this\b|also\b|clear|unique|as follows|below|above|to\b|of\b|in\b|for\b)", re.I)
_DELIMS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_LIST_ITEM = re.compile(r"\s*(?:[-*•]|\d+[.)])\s+(.*)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# Where the answer sentence ends and a remark begins: "16 (I checked it with $x = 1$)", "17 because …".
# (?<!\s): a match starts where a run of spaces starts, so that a long run costs one scan, not one per space.
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n|(?<!\s)\s+(?:because|since|which|where|as|so|when|if)\s|(?<!\s)\s+\((?=[A-Za-z]+\s)",
                           re.I)
_WORDS = re.compile(r"(?<![a-zA-Z\\])(?!and\b)[a-zA-Z]{3,}\b")  # words of prose; "1 and 2" is a list
_COMMANDS = re.compile(r"\\(?:begin|end)\{[^{}]*\}|\\[a-zA-Z]+")

# Candidates (issue 34). A candidate is a math span, a box, a number or a bare \frac / \sqrt / \pi. Two of them are
# one answer region when only a link joins them: alternatives ("or", "alternatively", "maybe", "(or …)", "/",
# "although", "it could also be") or a list ("," ";" "and"). Words that are neither (because, since, I, we, not,
# which, …) end the chain: "16 (I checked it with $x = 1$)" names one candidate, "17, not 16" one.
_BARE_VALUE = re.compile(r"(?:\\?\$\s?)?-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?(?!\d)"
                         r"(?:_\{?\w+\}?|\^\{?\\?\w+\}?|\s*\\?%)*"
                         r"|-?\\d?frac\s*\{[^{}]*\}\s*\{[^{}]*\}|-?\\sqrt\s*(?:\[[^\]]*\])?\s*\{[^{}]*\}|-?\\pi\b")
_LINK = re.compile(
    r"[\s)\]]*(?:[,;/(]|—|\band/or\b|\band\b|\bor\b|\balternatively\b|\bmaybe\b|\bperhaps\b|\bpossibly\b|"
    r"\botherwise\b|\beither\b|\b(?:although|though|but)\b|\b(?:it|this|that)\s+(?:could|might|may)\s+(?:also\s+)?be\b|"
    r"\b(?:could|might|may)\s+(?:also\s+)?be\b|\b(?:the\s+)?(?:final\s+)?answer\s+(?:is|could\s+be|might\s+be)\b|"
    r"\bit(?:'s|\s+is)\b|\balso\b|\beven\b|\bjust\b|\\text\{\s*(?:or|and)\s*\}|\\q?quad|\s)+",
    re.I,
)
_ALTERNATIVE = re.compile(r"\bor\b|alternativ|maybe|perhaps|possibl|otherwise|either|though|\bbut\b|could|might|"
                          r"\bmay\b|[/(]|—", re.I)
# A sentence after the answer that offers another candidate: "Alternatively, 6.", "Or maybe $6$.", "It could also
# be 6.", "Another possible answer is 6.", "The answer is 6." (a second statement). Remarks do not start so.
_HEDGE_START = re.compile(
    r"\(?\s*(?:or\b|alternatively\b|maybe\b|perhaps\b|possibly\b|otherwise\b|either\b|"
    r"(?:but|though|however)\b[ \t,]*(?:it|the\s+answer)\s+(?:could|might|may)\b|"
    r"(?:it|this|that|the\s+(?:final\s+)?answer)\s+(?:could|might|may)\s+(?:also\s+)?be\b|"
    r"another\s+(?:possible\s+|valid\s+|correct\s+)?(?:answer|solution|possibility|value)\s+"
    r"(?:is|would\s+be|could\s+be)\b|(?:the\s+)?(?:final\s+)?answer\s*(?:is\b|:)|####)",
    re.I,
)
_FILLER = re.compile(r"(?:[ \t,:*]|\b(?:the\s+)?(?:final\s+)?answer\s+(?:is|could\s+be|might\s+be)\b|"
                     r"\bit(?:'s|\s+is|\s+could\s+be|\s+might\s+be)\b|\b(?:is|be|also|even|just|maybe|perhaps)\b)*",
                     re.I)
# "6 is also possible", "6 would also be correct": a candidate offered after the fact.
_ALSO_WORDS = (r"(?:is|would\s+be|could\s+be|might\s+be|works)\s+(?:also\s+)?(?:possible|valid|correct|right|"
               r"an?\s+(?:possible\s+)?(?:answer|option|possibility|solution))")
_ALSO = re.compile(r"[ \t]*" + _ALSO_WORDS, re.I)
_ALSO_TAIL = re.compile(r"(?<!\s)\s+" + _ALSO_WORDS + r"\W*$", re.I)
# A word without which no sentence after the answer offers another candidate (a cheap test before the scan).
_OFFER = re.compile(r"\b(?:or|alternatively|maybe|perhaps|possibly|otherwise|either|could|might|may|another|"
                    r"answer|also|however|though|but)\b|####", re.I)
# What may stand between two answer statements for them to be one region ("The answer is 6. Wait, no. The answer is
# 5."): punctuation, math delimiters and these words; any reasoning (a number, a formula, another word) separates.
_BETWEEN = re.compile(
    r"(?:[\s.,;:!?()*#\"'—-]|\$|\\[()\[\]]|\b(?:or|and|alternatively|maybe|perhaps|possibly|otherwise|either|also|wait|"
    r"no|hmm|actually|so|thus|therefore|hence|rather|i|think|mean|sorry|correction|let|me|double|check|recheck|"
    r"again|the|final|answer|is|it|could|might|may|be|would|should|a|an|another|possible|alternative|not|sure|oh|"
    r"oops|ok|okay|well)\b)*",
    re.I,
)
# Between two \boxed that list one answer together ("\boxed{-2} and \boxed{1}", "\boxed{5} (or \boxed{6})"):
# joining words, math delimiters, a unit after the first ("\boxed{1} papers and \boxed{2} bins"), part labels
# ("\text{ for part (a) and }") and a name being assigned ("x = \boxed{2} or x = \boxed{3}").
_JOINER = re.compile(
    r"(?:\s*[a-zA-Z]{3,}(?=\s*(?:,|\band\b|\bor\b)))?"
    r"(?:\s|\$|\\[()\[\],]|[,;/().]|—|\band/or\b|\band\b|\bor\b|\balternatively\b|\bmaybe\b|\bperhaps\b|"
    r"\bpossibly\b|\botherwise\b|\beither\b|\balso\b|\bit\s+(?:could|might|may)\s+(?:also\s+)?be\b|"
    r"\bthe\s+answer\s+(?:is|could\s+be|might\s+be)\b|\\text\{\s*(?:(?:and|or|for|parts?|\(?[a-z]\))\s*)*\}|"
    r"\\q?quad|[a-zA-Z](?:_\{?\w+\}?)?\s*=)*",
    re.I,
)
# A closing sentence (no marker, no box) counts only after one of these and only when the turn visibly ended.
_CUE = re.compile(r"\s*(?:therefore|thus|so|hence|finally|in\s+conclusion|in\s+summary|overall|altogether|in\s+total|"
                  r"as\s+a\s+result|this\s+(?:means|gives)|we\s+(?:get|find|have|obtain|conclude))\b", re.I)
_RUN_ON = re.compile(r"\s(?:Therefore|Thus|So|Hence|Finally|In conclusion|In summary|Overall)\b")
_SAID = re.compile(r"\s(?:is|are|equals|was|were|be|=)\s+(?:(?:exactly|equal\s+to|the\s+value|precisely)\s+)?", re.I)
_LEAD = re.compile(r"(?:(?:therefore|thus|so|then|simply|just|clearly|now|either)\b[ \t,]*)*", re.I)
_BREAK = re.compile(r"\$|\\[(\[]|\\boxed|\\fbox|[.!?](?=\s|$)|\n")


def _span_end(text: str, i: int) -> int | None:
    """Where the math span ($…$, $$…$$, \\(…\\), \\[…\\]) or box opening at text[i] ends, else None."""
    for left, right in _DELIMS:
        if text.startswith(left, i):
            end = text.find(right, i + len(left))
            while right == "$" and end > 0 and text[end - 1] == "\\":  # "\$" is a dollar sign, not a delimiter
                end = text.find(right, end + 1)
            return end + len(right) if end >= 0 else None
    if text.startswith("\\boxed", i) or text.startswith("\\fbox", i):
        after = i + (6 if text.startswith("\\boxed", i) else 5)
        inner = _braced(text, after)
        return None if inner is None else text.index("{", after) + len(inner) + 2
    return None


_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NAME_IS = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*")
_IS = re.compile(r"\s(?:is|are|equals|be)\s")


def _inner(span: str) -> str:
    """The contents of a math span or box, without the delimiters and a lone \\boxed{} inside."""
    for left, right in _DELIMS:
        if span.startswith(left) and span.endswith(right) and len(span) >= len(left) + len(right):
            span = span[len(left) : len(span) - len(right)].strip()
            break
    box = _BOX_OPEN.match(span) if span.startswith(("\\boxed", "\\fbox")) else None
    if box and span.endswith("}") and _braced(span, box.end() - 1) == span[box.end() : -1]:
        span = span[box.end() : -1].strip()
    return span


def _value(text: str, i: int) -> tuple[str, int] | None:
    """(candidate, end) for the candidate answer starting at text[i], or None."""
    end = _span_end(text, i)
    if end is not None:
        inner = _inner(text[i:end])
        return (inner, end) if inner else None
    m = _BARE_VALUE.match(text, i)
    return (m.group(0), m.end()) if m else None


def _chain(text: str, i: int, start: int | None = None) -> tuple[list[tuple[str, str]], int]:
    """The candidates joined to the one ending at text[i] by links: [(separator, candidate)], separator "; " for
    alternatives and ", " for a list; and where the last of them ends (after the math span it was in, if any).
    start, where that candidate starts, saves a look back: "$\\boxed{5}$" closes the span its box opened."""
    out = []
    k = _PUNCT.match(text, i).end()
    # "$x = \\boxed{4},$ since …": the box sits inside a span that closes later (looked up only when one may close)
    close = None
    if text.startswith(("$", "\\)", "\\]"), k):
        opened = text[max(0, (start or 0) - 2) : start or 0]
        if start is not None and (opened.endswith(("\\(", "\\[")) or opened[-1:] == "$"):
            close = {"\\(": "\\)", "\\[": "\\]", "$$": "$$"}.get(opened, "$")
        else:
            close = _open_delimiter(text, i)
    while len(out) < MAX_JOINED_BOXES:
        j = i
        if close is not None:
            k = _PUNCT.match(text, i).end()
            if text.startswith(close, k):
                j, close = k + len(close), None
        m = _LINK.match(text, j)
        link = text[i : m.end()] if m else text[i:j]
        if not re.sub(r"[\s)\]$]", "", link) or re.search(r"[.!?]", link):
            i = j  # only spaces and closing brackets, or a sentence end: no link (but past the span it closed)
            break
        v = _value(text, m.end() if m else j)
        if v is None:
            i = j
            break
        out.append(("; " if _ALTERNATIVE.search(link) else ", ", v[0]))
        i = v[1]
    if close is not None:
        k = _PUNCT.match(text, i).end()
        if text.startswith(close, k):
            i = k + len(close)
    return out, i


_PUNCT = re.compile(r"[\s,.;:)\]]*")


def _open_delimiter(text: str, i: int) -> str | None:
    """The delimiter that closes a math span open at text[i] (counted from the paragraph's start), else None.
    Counts, not a walk: \\( \\) and \\[ \\] pair up, and dollars open and close in turn."""
    lo = max(text.rfind("\n\n", max(0, i - 2000), i), i - 2000, 0)
    window = text[lo:i]
    if window.count("\\(") > window.count("\\)"):
        return "\\)"
    if window.count("\\[") > window.count("\\]"):
        return "\\]"
    doubles = window.count("$$")
    singles = window.count("$") - 2 * doubles - window.count("\\$")
    return "$$" if doubles % 2 else ("$" if singles % 2 else None)


def _sentence_end(text: str, i: int, limit: int) -> int:
    """Where the sentence that text[i] is in ends (after its . ! ? or line break), math spans skipped."""
    while True:
        m = _BREAK.search(text, i, limit)
        if m is None:
            return limit
        if m.group(0)[0] in ".!?\n":
            return m.end()
        end = _span_end(text, m.start())
        i = end if end is not None else m.end()


def _hedges(text: str, i: int, start: int | None = None) -> list[tuple[str, str]]:
    """Candidates offered besides the answer that ends at text[i]: joined to it by links in its own sentence
    ("$5$ or $6$", "5, although 6 is also possible"), or in the sentences after it that offer one (_HEDGE_START,
    "6 is also possible"); a remark ("I checked it with $x = 1$") offers none. Looks at most 600 characters ahead."""
    found, i = _chain(text, i, start)
    limit = min(len(text), i + 600)
    if not _OFFER.search(text, i, limit):
        return found  # no sentence after the answer can offer a candidate: skip the sentence scan
    j = _sentence_end(text, i, limit)
    while j < limit and len(found) < MAX_JOINED_BOXES:
        while j < limit and text[j] in " \t\n*":
            j += 1
        start = _HEDGE_START.match(text, j, limit)
        v = None
        if start is not None:
            v = _value(text, _FILLER.match(text, start.end(), limit).end())
        else:
            v = _value(text, j)
            if v is not None and not _ALSO.match(text, v[1], limit):
                v = None
        if v is not None and v[1] <= limit:
            more, end = _chain(text, v[1])
            found += [("; ", v[0])] + more
            j = _sentence_end(text, end, limit)
        else:
            j = _sentence_end(text, j + 1, limit)
    return found


def _earlier(text: str, start: int) -> list[tuple[str, str]]:
    """Answers stated just before the statement at text[start] with only _BETWEEN words between ("The answer is 6.
    The answer is 5.", "\\boxed{6}. Wait, no: \\boxed{5}"): [("; ", candidate)], in text order."""
    out = []
    for _ in range(MAX_JOINED_BOXES):
        lo = max(0, start - 300)
        if not _STATEMENT.search(text, lo, start):
            break  # no statement there to join
        best = None  # (start, end, candidate) of the statement that ends last before `start`
        box = _box_before(text, start, lo)
        if box is not None and box[2] is not None and lo <= box[0] and box[1] <= start:
            best = (box[0], box[1], box[2])
        for m in _MARKER.finditer(text, lo, start):
            if _REMARK.match(text[m.end() : m.end() + 40].lstrip(" \t*:")):
                continue
            got = _after_marker(text, m.end())
            if got is not None and got[1] <= start and (best is None or got[1] > best[1]):
                best = (m.start(), got[1], got[0])
        if best is None or start - best[1] > 200 or not _BETWEEN.fullmatch(text, best[1], start):
            break
        out.insert(0, ("; ", best[2]))
        start = best[0]
    return out


_NONBLANK = re.compile(r"\S")
_STATEMENT = re.compile(r"answer|\\boxed|\\fbox|####", re.I)
_THOUSANDS_ONLY = re.compile(r"\\?\$?-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _join(candidates: list[tuple[str, str]]) -> str:
    """One answer string from [(separator, candidate)]: the same candidate twice counts once; "a; b" lists
    alternatives and "a, b" a list, both read as a set by eval/latex.py."""
    if len(candidates) == 1:
        return candidates[0][1]
    seen, out = set(), ""
    for sep, c in candidates:
        c = c.strip().rstrip(".,;:").rstrip()  # "$40_9.$": the sentence's period, inside the span
        if _THOUSANDS_ONLY.fullmatch(c):
            c = c.replace(",", "")  # "1,596" is one number, also beside another candidate
        key = canonical(c)
        if key in seen:
            continue
        seen.add(key)
        out = c if not out else out + (sep or "; ") + c
    return out


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


def _box_before(text: str, pos: int, lo: int = 0) -> tuple[int, int, str | None] | None:
    """(start, end, contents) of the last \\boxed / \\fbox starting in text[lo:pos], or None; contents None when the
    box never closes (cut off). Searches backwards, so a text of many boxes costs one scan, not one per box."""
    k = pos
    while True:
        k = max(text.rfind("\\boxed", lo, k), text.rfind("\\fbox", lo, k))
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


def _from_boxes(text: str, last: tuple[int, int, str]) -> tuple[list[tuple[str, str]], int]:
    """The last box with the boxes just before it that only joining words separate: [(separator, contents)] in
    text order, and where the first of them starts."""
    parts = [("", last[2])]
    box = last
    for _ in range(MAX_JOINED_BOXES):
        prev = _box_before(text, box[0])
        if prev is None or prev[2] is None:
            break
        between = text[prev[1] : box[0]]
        if len(between) > 200 or "\n\n" in between or not _JOINER.fullmatch(between):
            break
        parts[0] = ("; " if _ALTERNATIVE.search(between) else ", ", parts[0][1])
        parts.insert(0, ("", prev[2]))
        box = prev
    return parts, box[0]


def _after_marker(text: str, pos: int) -> tuple[str, int] | None:
    """(answer, end) for what follows a marker that ends at text[pos]: a math span, a list of lines, or the rest
    of the sentence; end is where the answer stops (where hedges are looked for)."""
    n = len(text)
    i = pos
    while i < n and text[i] in " \t*:\"":
        i += 1
    if text.startswith('\\"', i):
        i += 2
    if text[i : i + 1].isalpha():  # "Our answer is therefore $16 \\cdot (-8) = -128$."
        lead = _LEAD.match(text, i).end()
        if lead < n and text[lead] in "$\\":
            i = lead
    if i >= n or text[i] == "\n" or not _NONBLANK.search(text, i, i + 5000):
        while i < n and text[i] in " \n":
            i += 1
        if i >= n:
            return None
        block_end = text.find("\n\n", i)
        block_end = n if block_end < 0 else block_end
        span = _span_end(text, i)
        if span is not None and span <= block_end and not text.startswith("\\boxed", i):
            inner = _inner(text[i:span])
            return (inner, span) if inner else None
        lines = [ln for ln in text[i:block_end].split("\n") if ln.strip()]
        items = [_LIST_ITEM.fullmatch(ln) for ln in lines]
        if len(lines) > 1 and all(items):  # "- $p = 6$" / "- $q = 31$" / "- $r = -1$"
            return ", ".join(_strip_math(m.group(1)) for m in items), block_end
        while i < n and text[i] in " \t*:":
            i += 1
    span = _span_end(text, i)
    if span is not None and not text.startswith("\\boxed", i) and not text.startswith("\\fbox", i):
        inner = _inner(text[i:span])
        return (inner, span) if inner else None
    end = _SENTENCE_END.search(text, i, min(n, i + 5000))
    stop = end.start() if end else min(n, i + 5000)
    sentence = _strip_math(text[i:stop].strip().strip("*").strip().rstrip('"').rstrip("\\").strip())
    if not sentence:
        return None
    named = _NAME_IS.sub("", sentence, count=1)  # "x = 5.0, although 6 …"
    first = _value(named, 0)
    if first is not None:  # "5 or 6", "5, although 6 is also possible": the candidates it names
        more, _ = _chain(named, first[1])
        if more:
            return _join([("", first[0])] + more), stop
    parts = _alternatives(sentence)
    if parts is not None:  # "\\left(3, \\frac{\\pi}{2}\\right), although (1, 2) is also possible"
        return _join([("; ", p) for p in parts]), stop
    if len(_WORDS.findall(_COMMANDS.sub(" ", sentence))) >= 2:
        # A sentence, "The largest $n$ is 34": the answer is what it is said to be, and in prose, its one number.
        said = _IS.split(sentence)[-1]
        if len(_WORDS.findall(_COMMANDS.sub(" ", said))) < 2:
            said = _strip_math(said)
            return (said, stop) if said else None
        first = _value(said, 0)
        if first is not None:
            more, _ = _chain(said, first[1])
            if more:
                return _join([("", first[0])] + more), stop
        numbers = _NUMBER.findall(said)
        return (numbers[0].rstrip(","), stop) if len(numbers) == 1 else None
    return sentence, stop


_HEDGE_SPLIT = re.compile(r"(?<!\s),?\s+(?:or(?:\s+(?:maybe|perhaps|possibly|else))?|although|though|alternatively|"
                          r"otherwise|and/or|but\s+(?:it\s+)?(?:could|might|may)\s+(?:also\s+)?be)\s+|"
                          r"(?<!\s)\s*;\s*(?:alternatively,?\s*)?|(?<!\s)\s+\((?:or|maybe|perhaps)\s+", re.I)


_DEPTH = {"{": 1, "}": -1, "(": 1, "[": 1, ")": -1, "]": -1}


def _alternatives(sentence: str) -> list[str] | None:
    """A prose answer split at its hedge links, when every part is math ("(1, 2), although (2, 1) is also
    possible"); None when it has no link or a part is prose."""
    parts, depth, start, seen = [], 0, 0, 0
    for m in _HEDGE_SPLIT.finditer(sentence):
        depth += sum(_DEPTH.get(c, 0) for c in sentence[seen : m.start()])  # brackets open before the link
        seen = m.start()
        if depth == 0:
            parts.append(sentence[start : m.start()])
            start = m.end()
        if len(parts) > MAX_JOINED_BOXES:
            return None
    if not parts:
        return None
    last = _ALSO_TAIL.sub("", sentence[start:]).rstrip()
    if last.endswith(")") and last.count(")") > last.count("("):  # "5 (or 6)"
        last = last[:-1]
    parts.append(last)
    parts = [_strip_math(p) for p in parts]
    if any(not p or len(_WORDS.findall(_COMMANDS.sub(" ", p))) >= 2 for p in parts):
        return None
    return parts


def _strip_math(s: str) -> str:
    """"$x = 5$" -> "x = 5"; text with math inside it ("$n$ is 34") stays as it is."""
    s = s.strip().strip("*").strip()
    inner = _delimited(s, whole=True)
    return s if inner is None else inner


def extract_answer(text: str, *, region: bool = True) -> str | None:
    """The final answer in a completion, or None when it states none.

    Rules, in order (each is a convention models use; see the tests for examples of each):
      - the text ends at the first chat special token (<|im_end|>, <|im_start|>, </s>, …): what follows is not
        this turn;
      - \\boxed{…} / \\fbox{…}: the contents of the last box (nested braces allowed, also "\\boxed 5"), together
        with the boxes right before it when only joining words separate them ("\\boxed{-2} and \\boxed{1}" is
        "-2, 1"). A last box that never closes is a completion cut off: None, never a number from the reasoning.
        After the last box, only a "Final Answer" or "####" line can restate the answer ("We may check our answer:
        …" is a remark);
      - otherwise the last marker ("the final answer is", "Answer:", "**Answer:**", "Final Answer" as a heading,
        "####"), skipping markers followed by a remark ("this answer is correct"): the math span that follows
        ($…$, $$…$$, \\(…\\), \\[…\\]), or a list of "- $p = 6$" lines, or the rest of the sentence;
      - no marker: a short bare answer is itself the answer ("$\\frac12$", "x = 3"); a one-line sentence gives its
        one math span or its one number ("Thus $x \\geq 5$ is the solution.", "She makes $1,600 in total."); a
        longer completion gives the value of its closing sentence ("Therefore, the probability is 2/3.") only when
        its turn visibly ended (a chat token follows). Anything else has no final answer: None (a completion cut
        off in its reasoning must not be graded by a number found there).
    The final-answer region is that answer's statement, the statements just before it with nothing but
    connecting words between (_BETWEEN), and the sentences after it that offer another candidate (_HEDGES):
    every candidate named there is part of the answer, so "The answer is $5$ or $6$." gives "5; 6" (a set, wrong
    against the gold 5, right against {5, 6}). A remark after the answer that offers no candidate stays a remark.
    region=False takes the answer statement alone (a gold solution is trusted: it hedges nothing).
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
    for m in _markers_backwards(text, offset):
        if box is not None and not _FINAL.match(m.group(0)):
            continue  # after a box only "Final Answer" or "####" restates the answer ("check our answer: …" does not)
        if _REMARK.match(text[m.end() : m.end() + 40].lstrip(" \t*:")):
            continue
        got = _after_marker(text, m.end())
        if got is None:
            # The last answer statement names nothing readable ("… is 5 apples and 3 pears", "… although 6 is also
            # possible"): no answer, rather than an earlier statement it may have replaced.
            return None
        answer, end = got
        if not region:
            return answer
        return _join(_earlier(text, m.start()) + [("", answer)] + _hedges(text, end))
    if box is not None:
        boxes, start = _from_boxes(text, box)
        if not region:
            return _join(boxes)
        return _join(_earlier(text, start) + boxes + _hedges(text, box[1], box[0]))
    return _closing(text, ended=chat is not None)


def _markers_backwards(text: str, offset: int):
    """The markers in text[offset:], last first. Looks for "answer" and "####" from the end and matches _MARKER there
    (or at "final" just before), so the usual completion, whose last marker is the one, costs one match, not a scan
    of 5,000 characters."""
    window = text[offset:].lower()
    k = len(window)
    while k > 0:
        k = max(window.rfind("answer", 0, k), window.rfind("####", 0, k))
        if k < 0:
            return
        start = k
        final = _FINAL_BEFORE.search(window, max(0, k - 40), k)
        if final is not None and window.startswith("answer", k):
            start = final.start()
        m = _MARKER.match(text, offset + start)
        if m is None and start != k:
            m = _MARKER.match(text, offset + k)
        if m is not None:
            yield m
            k = start  # the next one ends before this one starts
        # else: "answer" in a word or sentence that is no marker; look further back


_FINAL_BEFORE = re.compile(r"\bfinal\s+$")


def _closing(text: str, ended: bool) -> str | None:
    """A completion without a marker or a box: a bare answer, a one-line statement, or (turn ended) its closing
    sentence."""
    s = text.strip()
    inner = _delimited(s.rstrip(".").rstrip(), whole=True)  # "$\\frac12$."
    if inner is not None:
        return inner or None
    words = _WORDS.findall(_COMMANDS.sub(" ", s))
    bare = len(words) < 2 and len(s) <= 1000  # math without prose (a matrix)
    spans = re.search(r"\$|\\[(\[]", s) is not None
    if bare and not spans and not (words and _SAID.search(s)):  # "x equals 4" is a statement
        return s or None
    if ("\n" not in s and len(s) <= 200 and _sentence_end(s, 0, len(s)) >= len(s.rstrip(" .!"))
            and re.search(r"(?:[.!$]|\\[)\]]|\d)\s*$", s)):
        answer = _statement(s)  # one finished sentence (a cut-off one ends inside it, or in an open span)
        if answer is not None:
            return answer
    if bare:  # "$28$ %"
        return s or None
    if ended:
        sentence = _closing_sentence(s)
        if sentence is not None and _CUE.match(sentence):
            return _statement(sentence)
    return None


def _closing_sentence(s: str) -> str | None:
    """The last sentence of s that states something (has a digit or math): "I hope it is correct." is skipped."""
    start = max(0, len(s) - 1000)
    bounds = [start]
    while bounds[-1] < len(s):
        bounds.append(max(bounds[-1] + 1, _sentence_end(s, bounds[-1], len(s))))
    for a, b in zip(bounds[-2::-1], bounds[:0:-1]):
        sentence = s[a:b].strip()
        if re.search(r"\d|\$|\\[(\[]", sentence):
            # "… P(A) = 2/3 Therefore, the probability is 2/3.": a sentence run on without its period starts again at
            # its last capitalised cue
            cues = [m.start() for m in _RUN_ON.finditer(sentence) if _open_delimiter(sentence, m.start()) is None]
            return sentence[cues[-1] + 1 :] if cues else sentence
    return None


def _statement(s: str) -> str | None:
    """The value one sentence states: its one math span and nothing else numeric ("Thus $x <= 2$ is our answer."),
    what it says something is when nothing numeric comes before ("... the game is 2/3."), or its one number."""
    spans, outside, i = [], [], 0
    while True:
        m = _BREAK.search(s, i)
        if m is None or m.group(0)[0] not in "$\\":
            if m is None:
                outside.append(s[i:])
                break
            outside.append(s[i : m.end()])
            i = m.end()
            continue
        end = _span_end(s, m.start())
        if end is None:
            outside.append(s[i : m.end()])
            i = m.end()
            continue
        outside.append(s[i : m.start()] + " \x00 ")
        spans.append(_inner(s[m.start() : end]))
        i = end
    plain = "".join(outside)
    numbers = _NUMBER.findall(plain)
    if len(spans) == 1 and not numbers:
        return spans[0] or None
    said = list(_SAID.finditer(plain))
    if said:
        head, tail = plain[: said[-1].start()], plain[said[-1].end() :]
        k = head.count("\x00")  # spans before the one said to be the value
        if not re.search(r"\d", head) and not any(re.search(r"\d", x) for x in spans[:k]):
            if tail.lstrip().startswith("\x00") and tail.count("\x00") == 1 and not _NUMBER.search(tail):
                return spans[k] or None
            first = _value(tail.lstrip(), 0)
            if first is not None and "\x00" not in tail:
                more, _ = _chain(tail.lstrip(), first[1])
                return _join([("", first[0])] + more)
    if not spans and len(numbers) == 1 and re.search(r"[.!]\s*$|\d\s*$", s):
        return numbers[0].rstrip(",")
    return None


def _answer_of(pred: str) -> str | None:
    return extract_answer(pred)


# ---------------------------------------------------------------------------------------------------------------
# One pair: the in-process stages.


@functools.lru_cache(maxsize=4096)  # a group of samples shares its gold
def _gold_answer(gold: str) -> str:
    """The answer a gold states: itself, or, for a worked solution (a box, "####", a marker, or prose), its final
    answer (the statement alone: a trusted reference hedges nothing); a box the gold leaves unclosed runs to its end."""
    g = gold
    if "\\\\" in g and "\\begin" not in g:  # escaped twice (JSON as text): two backslashes before a command are one
        g = re.sub(r"\\\\(?=[a-zA-Z{}])", r"\\", g)
    if "\\boxed" in g or "####" in g or _MARKER.search(g) or len(_WORDS.findall(_COMMANDS.sub(" ", g))) >= 8:
        answer = extract_answer(g, region=False)
        if answer is None and "\\boxed{" in g:
            answer = g[g.rindex("\\boxed{") + 7 :].strip()
        return answer or gold
    return gold


def _cheap(gold: str, answer: str, rel_tol: float, sig_digits: int) -> tuple[str, object, object]:
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
    if (g[0] == "text" or p[0] == "text") and "set" not in (g[0], p[0]):
        same = re.sub(r"\s+", "", normalize(gold)).lower() == re.sub(r"\s+", "", normalize(answer)).lower()
        return ("correct" if same else "wrong"), None, None
    try:
        verdict = compare(g, p, NumericJudge(rel_tol, sig_digits))
    except Refused:
        return "unparseable", None, None
    except (ArithmeticError, ValueError, RecursionError):
        verdict = None
    return {True: "correct", False: "wrong", None: "undecided"}[verdict], g, p


def _expensive(gold: str, answer: str, rel_tol: float, sig_digits: int = SIG_DIGITS) -> str:
    """The sympy stage; runs in a worker process."""
    try:
        verdict = compare(parse_answer(gold), parse_answer(answer), SympyJudge(rel_tol, sig_digits))
    except Refused:
        return "unparseable"
    except (ArithmeticError, ValueError, TypeError, RecursionError, AttributeError):
        return "wrong"
    return "correct" if verdict else "wrong"


def verify_reason(gold: str, pred: str, *, rel_tol: float = 0.0, sig_digits: int = SIG_DIGITS) -> str:
    """Like verify, with the reason. Runs every stage in this process and thread: no deadline, so use it only on
    trusted or short inputs; verify_batch is the entry point for model output."""
    if not isinstance(gold, str) or not isinstance(pred, str):
        return "unparseable"
    answer = _answer_of(pred)
    if answer is None:
        return "unparseable"
    gold = _gold_answer(gold)
    verdict, _, _ = _cheap(gold, answer, rel_tol, sig_digits)
    return _expensive(gold, answer, rel_tol, sig_digits) if verdict == "undecided" else verdict


def verify(gold: str, pred: str, *, rel_tol: float = 0.0, sig_digits: int = SIG_DIGITS) -> bool:
    """True when `pred` (a full completion or an extracted answer) states the same answer as `gold`.

    In-process and without a deadline; for model output in bulk use verify_batch, which has one. rel_tol > 0
    grades decimals with that relative tolerance; sig_digits is the approximation rule's k (latex.NumericJudge; 0
    makes decimals exact values).
    """
    return verify_reason(gold, pred, rel_tol=rel_tol, sig_digits=sig_digits) == "correct"


# ---------------------------------------------------------------------------------------------------------------
# The worker pool: plain child processes (fork+exec of this Python) talking JSON lines over pipes. Not
# multiprocessing: its spawn/forkserver children re-import the caller's __main__ (a training script), and its
# fork start copies the caller's threads and CUDA state.

_WORKER_BOOT = "from posttrain.eval.verify import _worker_main; _worker_main()"  # a constant, never model text


def _worker_main() -> None:
    """Worker loop (stdin/stdout of a child process). argv: memory cap in bytes, check as "module:function".

    Reads one JSON [gold, answer, rel_tol, sig_digits] per line, writes one verdict per line: plain text both ways,
    so neither side unpickles anything.
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
            gold, answer, rel_tol, sig_digits = json.loads(line)
            verdict = check(gold, answer, rel_tol, sig_digits)
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

    def send(self, gold: str, answer: str, rel_tol: float, sig_digits: int) -> None:
        self.proc.stdin.write(json.dumps([gold, answer, rel_tol, sig_digits]).encode() + b"\n")
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
    rel_tol and sig_digits are verify's. `check` names the worker's function as "module:function", called as
    check(gold, answer, rel_tol, sig_digits) (tests swap in a hanging one).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, memory_mb: int = 2048, rel_tol: float = 0.0,
                 check: str = "posttrain.eval.verify:_expensive", sig_digits: int = SIG_DIGITS):
        if workers < 1:
            raise ValueError(f"Verifier(workers={workers}): need at least one worker process")
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_bytes = memory_mb << 20
        self.rel_tol = rel_tol
        self.sig_digits = sig_digits
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
                verdict, _, _ = _cheap(gold, answer, self.rel_tol, self.sig_digits)
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
                        w.send(gold, answer, self.rel_tol, self.sig_digits)
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
