"""Math answers in LaTeX -> a small tree, compared without running any code from the text.

For: the verifier (eval/verify.py). This module normalises an answer string, tokenises it, parses it with a
recursive-descent grammar into plain tuples, compares two trees structurally (tuples, intervals, sets, matrices and
their sums and products, equations, relations), and compares scalars by exact rational arithmetic, by floats at
random points, or (in the worker pool only) by sympy objects built from the tree with sympy's constructors. Every
stage has size guards: a tree that would need a huge integer, a huge exponent or deep nesting is refused
(`Refused`), never computed. Not for: general LaTeX, proofs. Model text never reaches eval/exec or sympy's string
parsers.

Tree nodes are tuples whose first item names the kind:
    ("num", Fraction, exact: bool[, written])   a literal; a decimal (exact False) keeps its digits as written
                                     ("2.6667") for the approximation rule (NumericJudge)
    ("sym", name) ("const", "pi" | "e" | "i" | "oo") ("base", digits, base)   e.g. 204_5
    ("add", [nodes]) ("mul", [nodes]) ("div", a, b) ("pow", a, b) ("neg", a) ("fact", a) ("abs", a)
    ("fn", name, arg) ("log", base | None, arg) ("binom", n, k)
Answers (the top level) add:
    ("seq", open, close, [answers])   tuples, points, intervals      ("set", [answers])   \\{…\\}, ± and bare lists
    ("union", [answers])   ("matrix", [[nodes]])   ("eq", lhs, rhs)   ("text", str)   ("named", names, values)
    ("rel", [(f, op), ...])   every f op 0 holds, op in "<", "<=", "!=", "=" ("x >= 5" is 5 - x <= 0)
    ("approx", exact | None, approximation)   "x = 1/3 \\approx 0.33": graded by the exact value (_compare_approx)
Design: comparisons answer True, False or None (cannot decide) so that a cheap judge can hand only the undecided
pairs to sympy; a decimal is an exact value unless the approximation rule or a caller's rel_tol says otherwise
(docs/verifier.md has the rule and why k = 4).
"""

import cmath
import functools
import math
import random
import re
from fractions import Fraction

MAX_CHARS = 1000  # an answer longer than this is not parsed (gold answers in MATH500 are < 100 chars)
MAX_TOKENS = 400
MAX_DEPTH = 60  # parser recursion (brackets, fractions, exponents)
MAX_BITS = 30_000  # exact integers/rationals stay below this (2006! has ~19,000 bits)
MAX_EXPONENT = 10_000  # |integer exponent| a power may carry, exactly or symbolically
MAX_FACTORIAL = 3_000
MAX_ELEMENTS = 32  # elements of a tuple/set/matrix


class Refused(ValueError):
    """The answer is outside what the verifier parses or computes (too big, too deep, unknown syntax)."""


class Undecided(ArithmeticError):
    """Floats cannot decide this comparison (overflow, underflow, a pole); a later stage may."""


# ---------------------------------------------------------------------------------------------------------------
# Normalisation: string -> string, only removing notation that never changes the value.

_UNIT_WORDS = (  # after a value, these are units; the short ones only after a space ("2m" is 2 times m)
    "units?|square|sq|cubic|cm|mm|km|meters?|metres?|inches|inch|feet|foot|ft|yards?|miles?|mph|seconds?|"
    "minutes?|hours?|days?|weeks?|years?|dollars?|cents?|degrees?|points?|pounds?|lbs?|ounces?|oz|grams?|kg|"
    "liters?|litres?|ml|gallons?|people|students|ways|times|marbles|apples|cookies|eggs|books|pages|percent|pct"
)
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|textnormal|operatorname)\s*\{([^{}]*)\}")
_TRAILING_UNIT = re.compile(
    r"(?<=[0-9}.])(?:(?:\s*(?:\\\s*)?(?:" + _UNIT_WORDS + r"))+|\s+(?:m|g|L|in))(?:\s*\^\s*\{?[23]\}?)?\s*$"
)
_SPACING = re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad|\\(?:displaystyle|textstyle|limits|nolimits)(?![a-zA-Z])|~")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def normalize(ans: str) -> str:
    """Drop notation that does not change a value: \\left/\\right, \\dfrac, units, degrees, \\%, \\$, 1{,}000, …"""
    s = ans.strip()
    return s if len(s) > MAX_CHARS else _normalize(s)


@functools.lru_cache(maxsize=8192)  # golds repeat (a group of samples per prompt) and each side is read twice
def _normalize(s: str) -> str:
    if "\\\\" in s and "\\begin" not in s:  # escaped twice (JSON written as text): "\\\\frac" is \\frac
        s = re.sub(r"\\\\(?=[a-zA-Z{}])", r"\\", s)
    s = _unwrap(s)
    s = s.translate(_UNICODE)
    s = _RELATION_WORDS.sub(lambda m: _RELATIONS_ASCII[m.group(0)], s)
    s = re.sub(r"(\d)\s*\{\s*,\s*\}\s*(?=\d{3}(?!\d))", r"\1", s)  # 1{,}000 (or 14 {, }916) is a thousands separator
    s = re.sub(r"(?<=\{)\d{1,3}(?:,\d{3})+(?=\})", lambda m: m.group(0).replace(",", ""), s)  # \frac{1,000}{3}
    s = s.replace("\\left.", "").replace("\\right.", "")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\[dt]binom(?![a-zA-Z])", r"\\binom", s)
    s = s.replace("{,}", ",")
    s = re.sub(r",\s*\\!\s*", ",", s)  # "11,\\! 111": a thousands separator with its spacing, before \\! is a space
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = s.replace("−", "-").replace("\\infty", "\\infty ").replace("∞", "\\infty ").replace("\\inf ", "\\infty ")
    # A whole answer in \text{…} is a word ("Evelyn", "(C)"); \text after a value is a unit; \text{ and } separates.
    whole = _TEXT_CMD.fullmatch(s)
    if whole:
        s = whole.group(1).strip()
    else:
        s = re.sub(r"\\text\{\s*and\s*\}", ",", s)
        s = re.sub(r"\\text\{\s*or\s*\}", ";", s)
        # "5.4 \text{ cents}" loses its unit; "\text{Devon} and \text{Eve}" and "3; \text{(C)}" keep their words
        unit = _has_value(s)
        s = re.sub(_TEXT_CMD.pattern + r"(?:\s*\^\s*\{?[23]\}?)?",
                   lambda m: " " if unit and _after_value(s, m.start()) else m.group(1), s)
    s = _TRAILING_UNIT.sub("", s)  # "18 dollars", "5 cm^2", "10 square feet"
    s = _TRAILING_WORDS.sub("", s)  # "31 paintings", "33 players": words after a plain number are its unit
    s = re.sub(r"(?<=[\s)\]}0-9])or(?=[\s($\\0-9A-Z-]|[a-z]\()", ";", s)  # "(5,2) or (7,2)", "g(x)=1org(x)=-1"
    s = re.sub(r"(?<=[\s)\]}0-9])and(?=[\s($\\0-9-])", ",", s)  # "1 and 2 and 3": a list
    s = s.strip().rstrip(".,;:").strip()
    s = re.sub(r'^(?:\\?")+|(?:\\?")+$', "", s).strip()  # an answer in quotes: "\"12 and 13\""
    s = re.sub(r"^(?:[a-zA-Z]\s*\\in|\\text\{is\}|=|\\approx)\s*", "", s)  # "x \in [-2, 7]", "\approx 11"
    # "1,000" is 1000, also as one alternative of several ("1,000 ; 1,000"); "32, 349" (a space after the comma) is
    # a list
    s = ";".join(p.replace(",", "") if _THOUSANDS.fullmatch(p.strip()) else p for p in s.split(";"))
    return s


def _unwrap(s: str) -> str:
    """An answer written inside one math span, "$9$", "\\(9\\)", "\\[9\\]", "$$9$$", without it."""
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            inner = s[len(left) : len(s) - len(right)]
            if left not in inner and right not in inner:
                return inner.strip()
    return s


# Unicode a model may write for LaTeX; √2 becomes \sqrt 2 and √(x+1) \sqrt (x+1), both in the grammar.
_UNICODE = str.maketrans({"π": "\\pi ", "√": "\\sqrt ", "−": "-", "–": "-", "≤": "\\leq ", "≥": "\\geq ",
                          "≠": "\\neq ", "×": "\\times ", "·": "\\cdot ", "⋅": "\\cdot ", "∞": "\\infty ",
                          "≈": "\\approx ", "∪": "\\cup "})
# One spelling per relation: \le, \leqslant, <= and \leq are \leq; \lt is <; \simeq and ≈ are \approx (an
# approximation: see _approx).
_RELATIONS_ASCII = {"<=": "\\leq ", ">=": "\\geq ", "=<": "\\leq ", "=>": "\\geq ", "!=": "\\neq ",
                    "\\ne": "\\neq ", "\\lt": "<", "\\gt": ">", "\\approx": "\\approx ", "\\simeq": "\\approx ",
                    "\\leqq": "\\leq ", "\\geqq": "\\geq ", "\\le": "\\leq ", "\\ge": "\\geq ",
                    "\\leqslant": "\\leq ", "\\geqslant": "\\geq ", "\\neq": "\\neq "}
_RELATION_WORDS = re.compile(
    r"<=|>=|=<|=>|!=|\\(?:neq?|lt|gt|approx|simeq|leqq|geqq|leqslant|geqslant|le|ge)(?![a-zA-Z])"
)
_TRAILING_WORDS = re.compile(r"(?<=\d)\s+[a-zA-Z][a-zA-Z'-]{2,}(?:\s+[a-zA-Z][a-zA-Z'-]+)*$")


def _after_value(s: str, i: int) -> bool:
    """Whether s[i] follows a value (a digit, a closing bracket, a letter): what a unit follows."""
    before = s[max(0, i - 8) : i].rstrip()
    return bool(before) and before[-1] not in ",;=([" and not re.search(r"\b(?:or|and)$", before)


def _has_value(s: str) -> bool:
    return bool(re.search(r"[0-9]|\\pi|\\frac|\\sqrt", s))


# ---------------------------------------------------------------------------------------------------------------
# Tokens: "\\frac", "{", "12", "3.5", "x", "+", … Spaces separate nothing in LaTeX except after a command.

_TOKEN = re.compile(r"\\[a-zA-Z]+|\\.|\d+(?:\.\d*)?|\.\d+|[a-zA-Z]|\S")


def tokenize(s: str) -> list[str]:
    if len(s) > MAX_CHARS:
        raise Refused(f"answer has {len(s)} characters (limit {MAX_CHARS})")
    tokens = _TOKEN.findall(s)
    if len(tokens) > MAX_TOKENS:
        raise Refused(f"answer has {len(tokens)} tokens (limit {MAX_TOKENS})")
    return tokens


def canonical(ans: str) -> str:
    """The normalised token string: two answers with the same canonical string are the same answer."""
    s = normalize(ans)
    if len(s) > MAX_CHARS:
        return s
    return " ".join(_TOKEN.findall(s))


# ---------------------------------------------------------------------------------------------------------------
# Parser: tokens -> tree. Recursive descent; each level of nesting costs depth, capped by MAX_DEPTH.

_OPEN = {"(": ")", "[": "]", "\\{": "\\}", "\\lbrace": "\\rbrace", "\\langle": "\\rangle", "{": "}"}
_CLOSE = {")", "]", "\\}", "\\rbrace", "\\rangle", "}"}
_FUNCS = {
    "\\sin", "\\cos", "\\tan", "\\cot", "\\sec", "\\csc", "\\arcsin", "\\arccos", "\\arctan", "\\sinh", "\\cosh",
    "\\tanh", "\\exp", "\\ln", "\\log",
}
_GREEK = {
    "\\alpha", "\\beta", "\\gamma", "\\delta", "\\epsilon", "\\varepsilon", "\\zeta", "\\eta", "\\theta",
    "\\vartheta", "\\kappa", "\\lambda", "\\mu", "\\nu", "\\xi", "\\rho", "\\sigma", "\\tau", "\\phi", "\\varphi",
    "\\chi", "\\psi", "\\omega", "\\Gamma", "\\Delta", "\\Theta", "\\Lambda", "\\Xi", "\\Sigma", "\\Phi", "\\Psi",
    "\\Omega",
}
_MUL_OPS = {"*", "\\cdot", "\\times", "\\ast"}
_DIV_OPS = {"/", "\\div", ":"}  # "7:32" is the ratio 7/32
_RELATION_OPS = {"<", ">", "\\leq", "\\geq", "\\neq"}
_STOP = {"+", "-", "=", ",", ";", "\\pm", "\\mp", "&", "\\\\", "\\cup", "\\in", "\\right", "|"}
_STOP |= _RELATION_OPS | _CLOSE | _MUL_OPS | _DIV_OPS


class _Parser:
    def __init__(self, tokens: list[str]):
        self.t = tokens
        self.i = 0
        self.depth = 0

    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.t[j] if j < len(self.t) else None

    def take(self, want: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise Refused(f"expected {want or 'a token'} at token {self.i}, found {tok!r}")
        self.i += 1
        return tok

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise Refused(f"nesting deeper than {MAX_DEPTH}")

    def done(self) -> bool:
        return self.i >= len(self.t)

    # expr := ['+'|'-'] term (('+'|'-') term)*
    def expr(self):
        self.enter()
        terms = [self.signed_term()]
        while self.peek() in ("+", "-"):
            terms.append(self.signed_term())
        self.depth -= 1
        return terms[0] if len(terms) == 1 else ("add", terms)

    def signed_term(self):
        sign = 1
        while self.peek() in ("+", "-"):
            if self.take() == "-":
                sign = -sign
        if self.peek() is None:
            raise Refused("expression ends after a sign")
        term = self.term()
        return term if sign == 1 else ("neg", term)

    # term := power ((mulop | divop)? power)*   -- no operator means implicit multiplication: 2x, 3\sqrt{2}, (a)(b)
    def term(self):
        node = self.power()
        while True:
            tok = self.peek()
            if tok in _MUL_OPS:
                self.take()
                node = ("mul", [node, self.signed_power()])
            elif tok in _DIV_OPS:
                self.take()
                node = ("div", node, self.signed_power())
            elif tok is None or tok in _STOP:
                return node
            else:
                node = self.implicit(node)

    def signed_power(self):
        if self.peek() == "-":
            self.take()
            return ("neg", self.signed_power())
        return self.power()

    def implicit(self, left):
        # "4\frac{2}{3}" is the mixed number 4 2/3, not 4 * 2/3 (MATH's convention).
        if left[0] == "num" and left[2] and left[1].denominator == 1 and self.peek() == "\\frac":
            start = self.i
            frac = self.power()
            if frac[0] == "div" and frac[1][0] == "num" and frac[2][0] == "num" and frac[1][2] and frac[2][2]:
                if left[1] >= 0 and frac[2][1] != 0 and self.peek() not in ("^", "_"):
                    return ("num", left[1] + frac[1][1] / frac[2][1], True)
            self.i = start
        return ("mul", [left, self.power()])

    # power := postfix ('^' group)?
    def power(self):
        base = self.postfix(self.atom())
        if self.peek() == "^":
            self.take()
            self.enter()
            exponent = self.script()
            self.depth -= 1
            base = self.postfix(("pow", base, exponent))
        return base

    def postfix(self, node):
        while self.peek() in ("!", "'"):
            if self.take() == "'":
                raise Refused("primes are not supported")
            node = ("fact", node)
        return node

    def script(self):
        """The argument of ^ or _: a braced group, or one token (LaTeX reads 2^10 as 2^1 0)."""
        tok = self.peek()
        if tok == "{":
            return self.group()
        if tok == "-":
            self.take()
            return ("neg", self.script())
        if tok is not None and tok[0].isdigit():
            self.take()
            if len(tok) > 1:  # "2^10": the exponent is the first digit, the rest multiplies
                self.t.insert(self.i, tok[1:])
                tok = tok[0]
            return ("num", Fraction(tok), True)
        return self.atom()

    def group(self):
        self.take("{")
        node = self.expr()
        self.take("}")
        return node

    def arg(self):
        """A command argument: {…} or a single token (\\frac12, \\sqrt2)."""
        tok = self.peek()
        if tok == "{":
            return self.group()
        if tok is not None and tok[0].isdigit():
            self.take()
            if len(tok) > 1 and "." not in tok:
                self.t.insert(self.i, tok[1:])
                tok = tok[0]
            return _num(tok)
        return self.atom()

    def atom(self):
        self.enter()
        node = self._atom()
        self.depth -= 1
        if self.peek() == "_":  # subscripts: x_1, a_{n}, 204_5 (a number in base 5), \log_2 handled in _atom
            self.take()
            sub = self.script()
            if node[0] == "num" and node[2] and sub[0] == "num":
                return ("base", str(node[1].numerator), int(sub[1]))
            if node[0] == "sym":
                return ("sym", node[1] + "_" + _flat(sub))
            raise Refused("subscript on something that is not a symbol or a number")
        return node

    def _atom(self):
        tok = self.take()
        if tok[0].isdigit() or (tok[0] == "." and len(tok) > 1):
            if "." in tok and self.peek() == "\\overline":
                return self.repeating(tok)
            return _num(tok)
        if tok.isalpha() and len(tok) == 1:
            if tok == "i":
                return ("const", "i")
            if tok == "e":
                return ("const", "e")
            return ("sym", tok)
        if tok in ("(", "[", "{"):
            node = self.expr()
            self.take({"(": ")", "[": "]", "{": "}"}[tok])
            return node
        if tok == "|":
            node = self.expr()
            self.take("|")
            return ("abs", node)
        if tok == "\\frac":
            num = self.arg()
            return ("div", num, self.arg())
        if tok == "\\binom":
            n = self.arg()
            return ("binom", n, self.arg())
        if tok == "\\sqrt":
            index = None
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.take("]")
            radicand = self.arg()
            return ("pow", radicand, ("div", ("num", Fraction(1), True), index or ("num", Fraction(2), True)))
        if tok == "\\pi":
            return ("const", "pi")
        if tok == "\\infty":
            return ("const", "oo")
        if tok in _GREEK:
            return ("sym", tok[1:])
        if tok in _FUNCS:
            return self.function(tok)
        if tok in ("\\lvert", "\\vert"):
            node = self.expr()
            if self.take() not in ("\\rvert", "\\vert"):
                raise Refused("unclosed \\lvert")
            return ("abs", node)
        raise Refused(f"unsupported token {tok!r}")

    def repeating(self, head: str):
        """A repeating decimal, 0.\\overline{3} or 2.1\\overline{36}: an exact rational, not a rounded float."""
        self.take("\\overline")
        braced = self.peek() == "{"
        if braced:
            self.take()
        digits = self.take()
        if braced:
            self.take("}")
        if not digits.isdigit():
            raise Refused(f"\\overline over {digits!r}: only digits repeat in a decimal")
        places = len(head.split(".")[1])
        period = Fraction(int(digits), (10 ** len(digits) - 1) * 10**places)
        return ("num", Fraction(head) + period, True)

    def function(self, name: str):
        base = None
        power = None
        if name == "\\log" and self.peek() == "_":
            self.take()
            base = self.script()
        if self.peek() == "^":  # \sin^2 x
            self.take()
            power = self.script()
        if self.peek() in ("(", "{", "["):
            arg = self.atom()
        else:  # \sin x, \cos 2x: the argument runs to the next +, - or operator
            arg = self.power()
            while self.peek() is not None and self.peek() not in _STOP and self.peek() not in _FUNCS:
                arg = ("mul", [arg, self.power()])
        node = ("log", base, arg) if name in ("\\log", "\\ln") else ("fn", name[1:], arg)
        if name == "\\ln":
            node = ("log", ("const", "e"), arg)
        return ("pow", node, power) if power is not None else node


def _num(tok: str):
    """A number token: an exact integer, or a decimal that remembers its digits (2.50 has three)."""
    return ("num", Fraction(tok), True) if "." not in tok else ("num", Fraction(tok), False, tok)


def _flat(node) -> str:
    if node[0] == "num":
        return str(node[1])
    if node[0] == "sym":
        return node[1]
    return "{" + repr(node) + "}"


def parse_scalar(tokens: list[str]):
    """Tokens of one scalar expression -> tree; raises Refused on anything else."""
    p = _Parser(list(tokens))
    node = p.expr()
    if not p.done():
        raise Refused(f"unexpected token {p.peek()!r} at {p.i}")
    return node


def _split(tokens: list[str], seps: set[str]) -> list[list[str]]:
    """Split at separators outside brackets."""
    parts, cur, depth = [], [], 0
    for tok in tokens:
        if tok in _OPEN or tok == "\\begin":
            depth += 1
        elif tok in _CLOSE or tok == "\\end":
            depth -= 1
        if depth == 0 and tok in seps:
            parts.append(cur)
            cur = []
        else:
            cur.append(tok)
    parts.append(cur)
    return parts


def _closes_at_end(tokens: list[str]) -> bool:
    """True when the bracket opened by tokens[0] is closed by tokens[-1] (not earlier)."""
    depth = 0
    for j, tok in enumerate(tokens):
        if tok in _OPEN:
            depth += 1
        elif tok in _CLOSE:
            depth -= 1
            if depth == 0:
                return j == len(tokens) - 1
    return False


_CHOICE = re.compile(r"\s*(?:\\text(?:bf)?\{\s*)?\(([A-E])\)\s*\}?\s+(?![-+*/=<>^,;])"
                     r"(?![^;]*(?:\bor\b|\\text\{\s*(?:or|and)\b))\S", re.S)


def parse_answer(ans: str):
    """A whole answer (already extracted) -> tree. Raises Refused when it cannot be parsed."""
    if _CHOICE.match(ans):  # "\\text{(B)} 3(1 + r/10)^x = 7": a choice label and its option's text is the label
        parts = [p for p in ans.split(";") if p.strip()]
        if len(parts) == 1:
            return ("sym", _CHOICE.match(ans).group(1))
        if len(parts) > MAX_ELEMENTS:
            raise Refused(f"more than {MAX_ELEMENTS} alternatives")
        return ("set", _flatten([parse_answer(p) for p in parts]))
    s = normalize(ans)
    if not s:
        raise Refused("empty answer")
    if "\\begin" in s and ";" in s:  # "A \\text{ or } B" with matrices: alternatives, each parsed whole
        parts = [p.strip() for p in s.split(";") if p.strip()]
        if len(parts) > MAX_ELEMENTS:
            raise Refused(f"more than {MAX_ELEMENTS} alternatives")
        return ("set", _flatten([_parse_normalized(p, p) for p in parts]))
    return _parse_normalized(s, ans)


def _parse_normalized(s: str, ans: str):
    wrapped = re.fullmatch(r"[(\[]\s*(\\begin\{(?:array|[pbBvV]?matrix)\}.*\\end\{\w+\})\s*[)\]]", s, re.S)
    if wrapped:  # \left( \begin{array}{cc} … \end{array} \right): the brackets of an array matrix
        s = wrapped.group(1)
    if s.startswith("\\begin"):
        return _matrix_expression(s)
    tokens = tokenize(s)
    if re.fullmatch(r"[A-Za-z][A-Za-z ]*[A-Za-z]", s) and (len(s) > 3 or ans.strip().startswith("\\text")):
        return ("text", re.sub(r"\s+", " ", s).lower())
    return _answer(tokens, 0)


def _answer(tokens: list[str], depth: int):
    if depth > 4:
        raise Refused("answer structure nested deeper than 4")
    if not tokens:
        raise Refused("empty element")
    if tokens[0] == "\\begin":
        raise Refused("a matrix inside a larger answer")
    if depth and len(tokens) >= 4 and all(len(t) == 1 and t.isalpha() for t in tokens):
        return ("text", "".join(tokens).lower())  # "Evelyn; Navin": a word as an element
    parts = _split(tokens, {";"})  # alternatives: "(5,2); (7,2)", "p=5,q=2; p=7,q=2", "x<-1 or x>2"
    if len(parts) > 1:
        if len(parts) > MAX_ELEMENTS:
            raise Refused(f"more than {MAX_ELEMENTS} alternatives")
        return _named(("set", _flatten([_answer(p, depth + 1) for p in parts if p])))
    parts = _split(tokens, {"\\cup"})
    if len(parts) > 1:
        return ("union", [_answer(p, depth + 1) for p in parts])
    parts = _split(tokens, {","})
    if len(parts) > 1:
        if len(parts) > MAX_ELEMENTS:
            raise Refused(f"more than {MAX_ELEMENTS} elements")
        items = [_answer(p, depth + 1) for p in parts]
        if all(item[0] == "rel" for item in items):  # "x > 1, x < 3": both hold
            return ("rel", [r for item in items for r in item[1]])
        return _named(("set", _flatten(items)))
    if "\\approx" in tokens:
        return _approx(tokens, depth)
    if tokens[0] in ("(", "[") and tokens[-1] in (")", "]") and _closes_at_end(tokens):
        inner = _split(tokens[1:-1], {","})
        if len(inner) == 1:
            inner = _split(tokens[1:-1], {";"})  # "(0;-2;6)": a tuple written with semicolons
        if len(inner) > 1:
            if len(inner) > MAX_ELEMENTS:
                raise Refused(f"more than {MAX_ELEMENTS} elements")
            return ("seq", tokens[0], tokens[-1], [_answer(p, depth + 1) for p in inner])
    if tokens[0] in ("\\{", "\\lbrace", "{") and _closes_at_end(tokens) and (
        tokens[0] != "{" or len(_split(tokens[1:-1], {","})) > 1
    ):  # "{1, 2, 3}" written without the backslashes is a set too
        return ("set", _flatten([_answer(p, depth + 1) for p in _split(tokens[1:-1], {","})]))
    if any(op in tokens for op in _RELATION_OPS):
        rel = _relation(tokens)
        if rel is not None:
            return rel
    parts = _split(tokens, {"="})
    if len(parts) == 2:
        lhs = _answer(parts[0], depth + 1)
        if lhs[0] == "seq" and all(_is_name(x) for x in lhs[3]):  # "(x, y) = (15, -29)": the tuple is the answer
            return _answer(parts[1], depth + 1)
        if lhs[0] in _STRUCTURES:
            raise Refused("an equation between structures")
        rhs = parse_scalar(parts[1])
        if not symbols(lhs) and (_is_name(rhs) or not symbols(rhs)):
            return lhs if _is_name(rhs) else rhs  # "\frac12 \cdot 20 = 10" states its result; "3 = x" states 3
        return ("eq", lhs, rhs)
    if len(parts) > 2:  # "x = y = 3": the last side is the value
        return parse_scalar(parts[-1])
    pm = [j for j, tok in enumerate(tokens) if tok in ("\\pm", "\\mp")]
    if pm:
        if len(pm) > 3:
            raise Refused("more than three \\pm")
        options = []
        for signs in range(2 ** len(pm)):
            alt = list(tokens)
            for b, j in enumerate(pm):
                alt[j] = "-" if (signs >> b) & 1 else "+"
            options.append(parse_scalar(alt))
        return ("set", options)
    return parse_scalar(tokens)


def _relation(tokens: list[str]):
    """ "1 \\leq |z| \\leq 3/2" -> ("rel", [(f, op), ...]) meaning every f op 0, op in <, <=, !=; None when the
    relation operators sit inside brackets only."""
    sides, ops, cur, depth = [], [], [], 0
    for tok in tokens:
        if tok in _OPEN or tok == "\\begin":
            depth += 1
        elif tok in _CLOSE or tok == "\\end":
            depth -= 1
        if depth == 0 and (tok in _RELATION_OPS or tok == "="):
            sides.append(cur)
            ops.append(tok)
            cur = []
        else:
            cur.append(tok)
    sides.append(cur)
    if not any(op in _RELATION_OPS for op in ops):
        return None
    trees = [parse_scalar(s) for s in sides]
    out = []
    for a, op, b in zip(trees, ops, trees[1:]):
        if op in (">", "\\geq"):  # a > b is b < a
            a, b, op = b, a, {">": "<", "\\geq": "\\leq"}[op]
        out.append((("add", [a, ("neg", b)]), {"<": "<", "\\leq": "<=", "\\neq": "!=", "=": "="}[op]))
    return ("rel", out)


def _approx(tokens: list[str], depth: int):
    """ "x = 5 + 5 + 1 = 1/3 \\approx 0.33" -> ("approx", 1/3, 0.33): the exact value stated before the first
    \\approx (the last side of its chain), and the approximation after the last; exact is None when nothing but a
    name comes before ("x \\approx 0.33"). compare grades the exact value, and the approximation only where the
    gold is itself a rounded decimal and the approximation is the exact value rounded (see compare)."""
    parts = _split(tokens, {"\\approx"})
    if any(not p for p in parts[1:]):
        raise Refused("\\approx with nothing after it")
    approx = _answer(parts[-1], depth + 1)
    exact = _split(parts[0], {"="})[-1] if parts[0] else []
    exact = _answer(exact, depth + 1) if exact else None
    if exact is not None and _is_name(exact):
        exact = None
    return ("approx", exact, approx)


def _is_name(node) -> bool:
    """A name that an answer is assigned to: x, x_1, AB, S_{MBCN}:S (symbols only, no numbers)."""
    if node[0] == "sym":
        return True
    if node[0] == "mul":
        return all(_is_name(x) for x in node[1])
    if node[0] == "div":
        return _is_name(node[1]) and _is_name(node[2])
    return node[0] == "abs" and _is_name(node[1])  # |AB|


def _names_only(node) -> bool:
    """A sum or difference of names ("a + b", "m - n"): a predicted "a + b = -1" states the value -1."""
    if node[0] == "add":
        return all(_is_name(x[1] if x[0] == "neg" else x) for x in node[1])
    return False


def _named(node):
    """A set of assignments read as one answer: "p=5, q=2" is ("named", names, values), which compares by name
    with another such list and as the tuple (5, 2), in the order written, with anything else; "x=1, x=2" is the
    set {1, 2} (one name)."""
    items = node[1]
    if len(items) < 2 or not all(x[0] == "eq" and _is_name(x[1]) for x in items):
        return node
    names = [repr(x[1]) for x in items]
    if len(set(names)) == len(names):
        return ("named", names, [x[2] for x in items])
    if len(set(names)) == 1:
        return ("set", [x[2] for x in items])
    return node


def _flatten(items: list) -> list:
    """Elements of a set, with "a \\pm b" (itself a set of two) spread into it: {1 \\pm \\sqrt5, -2} has three."""
    out = []
    for item in items:
        out.extend(item[1] if item[0] == "set" else [item])
    if len(out) > MAX_ELEMENTS:
        raise Refused(f"more than {MAX_ELEMENTS} elements")
    return out


_MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix|array)\}.*?\\end\{\1\}", re.S)
MAX_MATRICES = 8  # matrices in one sum or product


def _matrix_expression(s: str):
    """One matrix, or a sum or product of matrices ("A + B", "A B", "A \\cdot B") -> ("matrix", rows): the cells
    of the result are trees (a product's cell is the sum of its terms), compared like any other cells."""
    terms, ops, pos = [[]], [], 0
    for m in _MATRIX.finditer(s):
        between = s[pos : m.start()].strip()
        pos = m.end()
        if len(ops) + 1 > MAX_MATRICES:
            raise Refused(f"more than {MAX_MATRICES} matrices")
        if m.start() == 0:
            pass
        elif between in ("+", "-"):
            terms.append([])
            ops.append(between)
        elif between not in ("", "\\cdot", "\\times"):
            raise Refused(f"matrices joined by {between[:20]!r}")
        terms[-1].append(parse_matrix(m.group(0))[1])
        if len(ops) + sum(map(len, terms)) > MAX_MATRICES:
            raise Refused(f"more than {MAX_MATRICES} matrices")
    if pos != len(s) or not terms[-1]:
        raise Refused("malformed matrix")
    total = None
    for op, factors in zip(["+"] + ops, terms):
        value = factors[0]
        for f in factors[1:]:
            value = _matmul(value, f)
        if op == "-":
            value = [[("neg", c) for c in row] for row in value]
        total = value if total is None else _matadd(total, value)
    return ("matrix", total)


def _shape(rows) -> tuple[int, int]:
    if len({len(r) for r in rows}) != 1:
        raise Refused("a matrix with rows of different lengths in a sum or product")
    return len(rows), len(rows[0])


def _matadd(a, b):
    if _shape(a) != _shape(b):
        raise Refused("sum of matrices of different shapes")
    return [[("add", [x, y]) for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def _matmul(a, b):
    (n, k), (k2, m) = _shape(a), _shape(b)
    if k != k2:
        raise Refused("product of matrices whose shapes do not match")
    return [[("add", [("mul", [a[i][t], b[t][j]]) for t in range(k)]) if k > 1 else ("mul", [a[i][0], b[0][j]])
             for j in range(m)] for i in range(n)]


def parse_matrix(s: str):
    """\\begin{pmatrix} a & b \\\\ c & d \\end{pmatrix} -> ("matrix", [[a, b], [c, d]])."""
    m = re.fullmatch(r"\s*\\begin\{([pbBvV]?matrix|array)\}(?:\{[lcr|\s]*\})?(.*)\\end\{\1\}\s*", s, re.S)
    if not m:
        raise Refused("malformed matrix")
    rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
    if not rows or len(rows) > MAX_ELEMENTS:
        raise Refused("matrix with no rows or too many rows")
    out = []
    for row in rows:
        cells = row.split("&")
        if len(cells) > MAX_ELEMENTS:
            raise Refused("matrix row too long")
        out.append([parse_scalar(tokenize(c)) for c in cells])
    return ("matrix", out)


# ---------------------------------------------------------------------------------------------------------------
# Structural comparison. `judge` compares scalars and equations and answers True, False or None (cannot decide).


def compare(g, p, judge) -> bool | None:
    """Compare two answer trees (gold first). All elements of a tuple/set/matrix must match."""
    if g[0] == "approx":
        g = g[1] if g[1] is not None else g[2]
    if p[0] == "approx":
        return _compare_approx(g, p, judge)
    if g[0] == "eq" and p[0] != "eq" and _is_name(g[1]):  # "x = 5", "AB = 4" against "5"
        g = g[2]
    if p[0] == "eq" and g[0] != "eq" and (_is_name(p[1]) or _names_only(p[1])):  # "a + b = -1" states -1
        p = p[2]
    if "text" in (g[0], p[0]) and "set" not in (g[0], p[0]):  # a word, also as an element ("Evelyn; Navin")
        return g[0] == p[0] and g[1].replace(" ", "") == p[1].replace(" ", "")
    if p[0] == "set" and g[0] not in ("set", "union") and p[1] and all(compare(g, x, judge) is True for x in p[1]):
        return True  # one answer written several ways: "(3, 4] or (3, 4]", "\\frac{14}{3}; 14/3"
    if g[0] == "named" and p[0] == "named" and sorted(g[1]) == sorted(p[1]):  # "a_3 = 2, a_37 = 19", any order
        values = dict(zip(p[1], p[2]))
        return _all(compare(v, values[name], judge) for name, v in zip(g[1], g[2]))
    g, p = (("seq", "(", ")", x[2]) if x[0] == "named" else x for x in (g, p))
    kg, kp = g[0], p[0]
    if "rel" in (kg, kp) or _some_rel(g) or _some_rel(p):
        return _compare_relations(g, p, judge)
    if kg == "eq" and kp == "eq":
        return judge.equation(("add", [g[1], ("neg", g[2])]), ("add", [p[1], ("neg", p[2])]))
    if kg == "seq" and kp == "seq":
        if g[1:3] != p[1:3] or len(g[3]) != len(p[3]):
            return False
        return _all(compare(a, b, judge) for a, b in zip(g[3], p[3]))
    if kg in ("set", "union") and kp == kg:
        return _matching(g[1], p[1], judge)
    if {kg, kp} == {"set", "seq"} and (g if kg == "seq" else p)[1:3] == ("(", ")"):
        # a point written without its brackets: "3, \frac{\pi}{2}" (not an interval: "3,4" is not "(3,4]")
        a, b = (g[1], p[3]) if kg == "set" else (g[3], p[1])
        return len(a) == len(b) and _all(compare(x, y, judge) for x, y in zip(a, b))
    if kg == "matrix" and kp == "matrix" and [len(r) for r in g[1]] != [len(r) for r in p[1]]:
        return False  # same entries in another shape: a 2x3 is not a 3x2
    if kg == "matrix" or kp == "matrix":
        a, b = _cells(g), _cells(p)
        if a is None or b is None or len(a) != len(b):
            return False
        return _all(judge.scalar(x, y) for x, y in zip(a, b))
    if (kg == "set") != (kp == "set") and (kg if kp == "set" else kp) not in _STRUCTURES:
        # One value written several ways ("15\\frac{39}{40}, or \\frac{639}{40}"): a set whose elements all equal it.
        items, one = (g[1], p) if kg == "set" else (p[1], g)
        return _all(compare(x, one, judge) if kg == "set" else compare(one, x, judge) for x in items)
    if kg in _STRUCTURES or kp in _STRUCTURES:
        return False
    return judge.scalar(g, p)


def _compare_approx(g, p, judge) -> bool | None:
    """ "a \\approx b" is graded by its exact value a; by b as well when the gold is itself a rounded decimal
    ("\\sqrt{40} \\approx 6.3" for 6.3) and b is a rounded to the digits b is written with, so b names no second
    candidate ("\\frac13 \\approx 11" is graded as 1/3 only)."""
    exact, approx = p[1], p[2]
    if exact is None:
        return compare(g, approx, judge)
    verdict = compare(g, exact, judge)
    if verdict is True or not has_decimal(g) or not _rounds_to(exact, approx):
        return verdict
    other = compare(g, approx, judge)
    return True if other is True else (None if None in (verdict, other) else False)


def _rounds_to(exact, approx) -> bool:
    """True when the literal `approx` (a decimal or an integer) is the value of `exact` rounded to approx's digits."""
    lit = _literal(approx)
    if lit is None or symbols(exact):
        return False
    value, places, _ = lit
    try:
        v = evaluate(exact, {})
        if not isinstance(v, Fraction):
            v = _complex(v)
            if abs(v.imag) > 1e-12 * max(1.0, abs(v)):
                return False
            return abs(v.real - float(value)) <= 0.5 * 10.0**-places * (1 + 1e-9) + 1e-12 * abs(v.real)
    except (Undecided, Refused, ArithmeticError):
        return False
    return abs(v - value) * 2 * 10**places <= 1


def _literal(node) -> tuple[Fraction, int, int] | None:
    """(value, decimal places, significant digits) of a signed number literal as written, else None."""
    sign = 1
    while node[0] == "neg":
        sign, node = -sign, node[1]
    if node[0] != "num" or (node[2] and node[1].denominator != 1):
        return None
    written = node[3] if len(node) > 3 else str(node[1].numerator)
    places = len(written.split(".")[1]) if "." in written else 0
    return sign * node[1], places, len(written.replace(".", "").lstrip("0"))


def _some_rel(node) -> bool:
    """A set or union with a relation in it: "x < -1 or x > 2"."""
    return node[0] in ("set", "union") and any(x[0] == "rel" for x in node[1])


def _compare_relations(g, p, judge) -> bool | None:
    """Inequalities: two relations agree when their atoms match one to one (same operator, sides proportional with
    a positive factor: "-x > -1" is "x < 1"); a relation in one variable and a set of intervals agree when they
    hold at the same points, probed at every endpoint, just beside it, between endpoints and far out."""
    if g[0] == "rel" and p[0] == "rel":
        def same(a, b):  # atoms (f, op): the same operator, and f_a / f_b a constant (positive for < and <=)
            return a[1] == b[1] and judge.equation(a[0], b[0], a[1] in ("<", "<="))

        verdict = _matching(g[1], p[1], judge, same)
        if verdict is not False:
            return verdict
    rg, rp = _region(g), _region(p)
    if rg is None or rp is None:
        return False
    (fg, eg, vg), (fp, ep, vp) = rg, rp
    if vg and vp and vg != vp:
        return False
    ends = sorted({e for e in eg + ep if math.isfinite(e)})
    if not ends:  # nothing to probe around (relations not linear): the atoms did not match, so call them different
        return False
    probes = set(ends)
    for e in ends:
        delta = 1e-6 * max(1.0, abs(e))
        probes |= {e - delta, e + delta}
    probes |= {(a + b) / 2 for a, b in zip(ends, ends[1:])}
    span = max(1.0, ends[-1] - ends[0], abs(ends[0]), abs(ends[-1]))
    probes |= {ends[0] - span, ends[0] - 10 * span - 7, ends[-1] + span, ends[-1] + 10 * span + 7}
    probes |= {ends[0] + (ends[-1] - ends[0] + 2 * span) * k / 64 - span for k in range(65)}
    probes |= {-x for x in probes}  # a relation's own boundaries are unknown: |x| and x^2 mirror them about 0
    undecided = False
    for x in sorted(probes):
        a, b = fg(x), fp(x)
        if a is None or b is None:
            undecided = True
        elif a != b:
            return False
    return None if undecided else True


def _region(node):
    """(membership(x) -> bool | None, finite endpoints, variable or None) for a relation in one variable, an
    interval, or a union / alternatives of those; None for anything else."""
    kind = node[0]
    if kind == "rel":
        names = set()
        for f, _ in node[1]:
            symbols(f, names)
        if len(names) != 1:  # "0 < f(x) < 1": f(x) is the unknown
            unknown = _single_unknown(node[1])
            if unknown is None:
                return None
            node, names = ("rel", [(_substitute(f, unknown, ("sym", "\0")), op) for f, op in node[1]]), {"\0"}
        (var,) = names
        return (lambda x: _holds(node[1], var, x)), _linear_roots(node[1], var), var
    if kind == "seq" and len(node[3]) == 2 and not any(symbols(e) for e in node[3]):
        try:
            lo, hi = (_real(e) for e in node[3])
        except (Refused, Undecided, ArithmeticError, TypeError):
            return None
        if lo is None or hi is None:
            return None
        closed_lo, closed_hi = node[1] == "[", node[2] == "]"
        return ((lambda x: (lo < x or (closed_lo and lo == x)) and (x < hi or (closed_hi and x == hi))),
                [lo, hi], None)
    if kind in ("union", "set"):
        parts = [_region(x) for x in node[1]]
        if not parts or any(r is None for r in parts):
            return None
        names = {r[2] for r in parts if r[2]}
        if len(names) > 1:
            return None

        def member(x):
            results = [r[0](x) for r in parts]
            return True if True in results else (None if None in results else False)

        return member, [e for r in parts for e in r[1]], next(iter(names), None)
    return None


def _single_unknown(atoms):
    """The side with symbols that every atom a - b of a relation shares ("f(x)" in "0 < f(x) < 1"), else None."""
    unknown = None
    for f, _ in atoms:
        if f[0] != "add" or len(f[1]) != 2 or f[1][1][0] != "neg":
            return None
        for side in (f[1][0], f[1][1][1]):
            if symbols(side):
                if unknown is not None and side != unknown:
                    return None
                unknown = side
    return unknown


def _substitute(node, old, new):
    if node == old:
        return new
    return tuple([_substitute(c, old, new) if isinstance(c, tuple) else
                  [_substitute(x, old, new) for x in c] if isinstance(c, list) else c for c in node])


def _linear_roots(atoms, var: str) -> list[float]:
    """Where each atom f that is linear in var crosses 0: the boundaries of "2x + 1 < 5", to probe around."""
    roots = []
    for f, _ in atoms:
        try:
            v0, v1, v2 = (_complex(evaluate(f, {var: complex(x)})) for x in (0.0, 1.0, 2.0))
        except (Undecided, Refused, ArithmeticError):
            continue
        slope = v1 - v0
        if abs(slope) > 1e-12 and abs((v2 - v1) - slope) <= 1e-9 * max(1.0, abs(slope)) and abs(v0.imag) < 1e-12:
            roots.append(-v0.real / slope.real)
    return roots


def _real(node) -> float | None:
    inf = _inf_sign(node)
    if inf:
        return inf * math.inf
    v = _complex(evaluate(node, {}))
    return v.real if abs(v.imag) <= 1e-12 * max(1.0, abs(v)) else None


def _holds(atoms, var: str, x: float) -> bool | None:
    """Whether every atom f op 0 holds at var = x; None when a side cannot be evaluated there (a pole)."""
    for f, op in atoms:
        try:
            v = _complex(evaluate(f, {var: complex(x)}))
        except (Undecided, Refused, ArithmeticError):
            return None
        if abs(v.imag) > 1e-9 * max(1.0, abs(v)):
            return False  # not real there: outside the set the relation describes
        r, tol = v.real, 1e-9 * max(1.0, abs(x))
        ok = {"<": r < -tol, "<=": r <= tol, "!=": abs(r) > tol, "=": abs(r) <= tol}[op]
        if not ok:
            return False
    return True


_STRUCTURES = {"eq", "seq", "set", "union", "matrix", "text", "rel", "named"}


def _cells(node):
    """Matrix cells in row-major order; a vector given as a tuple counts as a column."""
    if node[0] == "matrix":
        if len({len(r) for r in node[1]}) != 1:
            return None
        return [c for row in node[1] for c in row]
    if node[0] == "seq" and node[1] == "(" and all(e[0] not in _STRUCTURES for e in node[3]):
        return node[3]
    return None


def _all(results) -> bool | None:
    undecided = False
    for r in results:
        if r is False:
            return False
        undecided |= r is None
    return None if undecided else True


def _matching(a: list, b: list, judge, same=None) -> bool | None:
    """Unordered comparison as sets: True when every element on each side equals one on the other (so a repeated
    element counts once); False when some element equals none even counting undecided pairs as equal; None in
    between. `same` compares two elements (default: compare)."""
    same = same or (lambda x, y: compare(x, y, judge))
    table = [[same(x, y) for y in b] for x in a]
    columns = list(zip(*table)) if table else []
    lines = table + [list(c) for c in columns]
    if len(lines) != len(a) + len(b):
        return False  # one side empty, the other not
    if all(True in line for line in lines):
        return True
    return False if any(all(r is False for r in line) for line in lines) else None


# ---------------------------------------------------------------------------------------------------------------
# Numbers: exact rationals while they stay small, complex floats otherwise; symbols get random values.


def _guard(q: Fraction) -> Fraction:
    if q.numerator.bit_length() > MAX_BITS or q.denominator.bit_length() > MAX_BITS:
        raise Refused(f"a number in the answer needs more than {MAX_BITS} bits")
    return q


def _complex(v) -> complex:
    try:
        c = complex(v)
    except OverflowError as e:
        raise Undecided("float overflow") from e
    if not (math.isfinite(c.real) and math.isfinite(c.imag)):
        raise Undecided("not finite")
    return c


def _int_root(n: int, q: int) -> int | None:
    if n < 0:
        return None
    r = round(n ** (1.0 / q)) if n.bit_length() < 1000 else None
    if r is None:
        return None
    for cand in (r - 1, r, r + 1):
        if cand >= 0 and cand**q == n:
            return cand
    return None


def _pow(a, b):
    if isinstance(b, Fraction) and b.denominator == 1 and abs(b) > MAX_EXPONENT and not (
        isinstance(a, Fraction) and abs(a) in (0, 1)
    ):
        raise Refused(f"exponent {b} exceeds {MAX_EXPONENT}")
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        if a == 0 and b < 0:
            raise Undecided("0 to a negative power")
        if b.denominator == 1:
            e = int(b)
            bits = max(a.numerator.bit_length(), a.denominator.bit_length())
            if abs(a) in (0, 1) or bits * abs(e) <= MAX_BITS:
                return _guard(a**e)
            raise Refused(f"power needs more than {MAX_BITS} bits")
        if a > 0 and b.denominator <= 64:  # exact roots: \sqrt{16} = 4, 8^{2/3} = 4
            num, den = _int_root(a.numerator, b.denominator), _int_root(a.denominator, b.denominator)
            if num is not None and den is not None:
                return _pow(Fraction(num, den), Fraction(b.numerator))
    ca, cb = _complex(a), _complex(b)
    if ca == 0:
        if cb.real > 0:
            return Fraction(0)
        raise Undecided("0 to a non-positive power")
    try:
        return ca**cb
    except (OverflowError, ZeroDivisionError) as e:
        raise Undecided(str(e)) from e


_CMATH = {
    "sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "arcsin": cmath.asin, "arccos": cmath.acos,
    "arctan": cmath.atan, "sinh": cmath.sinh, "cosh": cmath.cosh, "tanh": cmath.tanh, "exp": cmath.exp,
    "cot": lambda z: 1 / cmath.tan(z), "sec": lambda z: 1 / cmath.cos(z), "csc": lambda z: 1 / cmath.sin(z),
}
_CONST = {"pi": complex(math.pi), "e": complex(math.e), "i": 1j}


def evaluate(node, env: dict):
    """Value of a scalar tree: a Fraction when exact, else a complex. Raises Refused or Undecided."""
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "sym":
        return env[node[1]]
    if kind == "const":
        if node[1] == "oo":
            raise Undecided("infinity inside arithmetic")
        return _CONST[node[1]]
    if kind in ("add", "mul"):
        vals = [evaluate(x, env) for x in node[1]]
        acc = vals[0]
        for v in vals[1:]:
            if isinstance(acc, Fraction) and isinstance(v, Fraction):
                acc = _guard(acc + v if kind == "add" else acc * v)
            else:
                acc = _complex(_complex(acc) + _complex(v) if kind == "add" else _complex(acc) * _complex(v))
        return acc
    if kind == "neg":
        return -evaluate(node[1], env)
    if kind == "div":
        a, b = evaluate(node[1], env), evaluate(node[2], env)
        try:
            if isinstance(a, Fraction) and isinstance(b, Fraction):
                return _guard(a / b)
            return _complex(_complex(a) / _complex(b))
        except ZeroDivisionError as e:
            raise Undecided("division by zero") from e
    if kind == "pow":
        return _pow(evaluate(node[1], env), evaluate(node[2], env))
    if kind == "fact":
        n = evaluate(node[1], env)
        if isinstance(n, Fraction) and n.denominator == 1 and n >= 0:
            if n > MAX_FACTORIAL:
                raise Refused(f"factorial of {n} exceeds {MAX_FACTORIAL}!")
            return Fraction(math.factorial(int(n)))
        raise Undecided("factorial of a non-integer")
    if kind == "binom":
        n, k = evaluate(node[1], env), evaluate(node[2], env)
        if all(isinstance(v, Fraction) and v.denominator == 1 for v in (n, k)) and 0 <= n <= MAX_FACTORIAL:
            return Fraction(math.comb(int(n), int(k)) if k >= 0 else 0)
        raise Undecided("binomial of non-integers")
    if kind == "abs":
        v = evaluate(node[1], env)
        return abs(v) if isinstance(v, Fraction) else complex(abs(_complex(v)))
    if kind == "fn":
        z = _complex(evaluate(node[2], env))
        try:
            return _complex(_CMATH[node[1]](z))
        except (ValueError, ZeroDivisionError, OverflowError) as e:
            raise Undecided(f"{node[1]} at {z}") from e
    if kind == "log":
        x = evaluate(node[2], env)
        base = evaluate(node[1], env) if node[1] is not None else Fraction(10)
        if isinstance(x, Fraction) and isinstance(base, Fraction) and x > 0 and base > 0 and base != 1:
            k = round(math.log(x) / math.log(base))  # log_2 8 = 3 exactly when it is an integer
            if abs(k) <= MAX_EXPONENT and max(base.numerator, base.denominator).bit_length() * abs(k) <= MAX_BITS:
                if base**k == x:
                    return Fraction(k)
        try:
            return _complex(cmath.log(_complex(x)) / cmath.log(_complex(base)))
        except (ValueError, ZeroDivisionError) as e:
            raise Undecided("log of 0 or base 1") from e
    raise Refused(f"cannot evaluate {kind!r}")


def symbols(node, out: set | None = None) -> set:
    out = set() if out is None else out
    if node[0] == "sym":
        out.add(node[1])
    for child in node[1:]:
        if isinstance(child, tuple):
            symbols(child, out)
        elif isinstance(child, list):
            for c in child:
                symbols(c, out)
    return out


def has_decimal(node) -> bool:
    if node[0] == "num":
        return not node[2]
    return any(
        (isinstance(c, tuple) and has_decimal(c)) or (isinstance(c, list) and any(has_decimal(x) for x in c))
        for c in node[1:]
    )


def _inf_sign(node) -> int:
    if node == ("const", "oo"):
        return 1
    if node[0] == "neg":
        return -_inf_sign(node[1])
    return 0


def _points(names: set, n: int) -> list[dict]:
    return _points_cached(tuple(sorted(names)), n)


@functools.lru_cache(maxsize=1024)  # a new Random per comparison cost more than the comparison; callers only read
def _points_cached(ordered: tuple, n: int) -> list[dict]:
    rng = random.Random(1234)  # fixed: a verdict must not change between runs
    # Values in [1.2, 2.9] stay clear of 0 and 1, where cancellation would blur a float comparison.
    return [{s: complex(1.2 + 1.7 * rng.random()) for s in ordered} for _ in range(n)]


SIG_DIGITS = 4  # the approximation rule's k (NumericJudge); 0 turns it off


class NumericJudge:
    """Compares scalars and equations by value: exact for rationals, floats (at random points) otherwise.

    The approximation rule (docs/verifier.md): a predicted decimal literal matches a rational gold when it is the
    gold rounded to the places it is written with and has at least sig_digits significant digits: 0.0833333 and
    2.6667 are 1/12 and 8/3, 0.33 and 0.0352 are not 1/3 and 9/256 (too few digits), 0.03515626 is not 9/256 (not
    its rounding). Otherwise decimals are exact values: "6366.2" is not 20000/pi (an irrational gold asks for its
    exact form) and a gold decimal is the exact target (0.3333333 is not 1/3). A decimal matches only what it equals,
    up to the rounding of the float arithmetic that evaluates the other side (1e-12 relative). A caller that grades
    rounded answers passes rel_tol > 0: then a comparison that involves a decimal accepts that relative error.
    Answers without decimals compare exactly (rationals) or to 1e-9 at random points (float noise of irrational or
    symbolic values).
    """

    def __init__(self, rel_tol: float = 0.0, sig_digits: int = SIG_DIGITS):
        self.rel_tol = rel_tol
        self.sig_digits = sig_digits

    def scalar(self, a, b) -> bool | None:
        if a[0] == "base" or b[0] == "base":
            return _same_base_number(a, b)
        sa, sb = _inf_sign(a), _inf_sign(b)
        if sa or sb:
            return sa == sb
        if self.sig_digits and _rounded_decimal(a, b, self.sig_digits):
            return True
        decimal = has_decimal(a) or has_decimal(b)
        tolerant = decimal and self.rel_tol > 0
        tol = self.rel_tol if tolerant else (1e-12 if decimal else 1e-9)
        names = symbols(a) | symbols(b)
        for env in _points(names, 3 if names else 1):
            try:
                verdict = _close(evaluate(a, env), evaluate(b, env), tol, exact=not tolerant, decimal=decimal)
            except Undecided:
                return None
            if verdict is not True:
                return verdict
        return True

    def equation(self, fa, fb, positive: bool = False) -> bool | None:
        """f_a = 0 and f_b = 0 describe the same set when f_a / f_b is a nonzero constant (a positive one, for
        the sides of two inequalities f_a < 0 and f_b < 0)."""
        names = symbols(fa) | symbols(fb)
        ratios = []
        for env in _points(names, 4):
            try:
                va, vb = _complex(evaluate(fa, env)), _complex(evaluate(fb, env))
            except Undecided:
                return None
            if abs(va) < 1e-12 and abs(vb) < 1e-12:
                continue
            if abs(va) < 1e-12 or abs(vb) < 1e-12:
                return None  # one side vanishes, or is only tiny (e^{-40} x): sympy decides
            ratios.append(va / vb)
        if not ratios:
            return None
        same = all(abs(r - ratios[0]) <= 1e-9 * abs(ratios[0]) for r in ratios)
        if same and positive:
            r = ratios[0]
            return abs(r.imag) <= 1e-9 * abs(r) and r.real > 0
        return same


def _rounded_decimal(gold, pred, sig_digits: int) -> bool:
    """The approximation rule: pred is a decimal literal with >= sig_digits significant digits, and the rational
    gold rounded to pred's decimal places gives pred (either way at a tie)."""
    if "." not in _written(pred):
        return False  # not a decimal literal (the common case: checked first, cheaply)
    lit = _literal(pred)
    if lit is None:
        return False
    value, places, sig = lit
    if sig < sig_digits or has_decimal(gold) or symbols(gold):
        return False
    try:
        v = evaluate(gold, {})
    except (Undecided, Refused, ArithmeticError):
        return False
    return isinstance(v, Fraction) and abs(v - value) * 2 * 10**places <= 1


def _written(node) -> str:
    while node[0] == "neg":
        node = node[1]
    return node[3] if node[0] == "num" and len(node) > 3 else ""


def _close(x, y, tol: float, exact: bool, decimal: bool = False) -> bool | None:
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        if x == y:
            return True
        if exact:
            return False
        return abs(x - y) <= Fraction(tol) * max(abs(x), abs(y))
    cx, cy = _complex(x), _complex(y)
    m = max(abs(cx), abs(cy))
    if m < 1e-9 or m > 1e250:  # floats cannot tell tiny or huge values apart reliably; leave it to sympy
        return None
    d = abs(cx - cy)
    if d <= tol * m:
        return True
    if decimal:  # a decimal off by more than float rounding is a different number: no need for sympy
        return False
    return None if d <= 1e-6 * m else False


def _same_base_number(a, b) -> bool:
    if a[0] == "base" and b[0] == "base":
        return a[1:] == b[1:]
    base, other = (a, b) if a[0] == "base" else (b, a)
    # "204_5" against "204": the digits as written, without the base
    return other[0] == "num" and other[2] and str(other[1]) == base[1]


# ---------------------------------------------------------------------------------------------------------------
# sympy objects from a tree (worker processes only): constructors, never a string parser.


def to_sympy(node):
    import sympy

    kind = node[0]
    if kind == "num":
        return sympy.Rational(node[1].numerator, node[1].denominator)
    if kind == "sym":
        return sympy.Symbol(node[1])
    if kind == "const":
        return {"pi": sympy.pi, "e": sympy.E, "i": sympy.I, "oo": sympy.oo}[node[1]]
    if kind == "add":
        return sympy.Add(*[to_sympy(x) for x in node[1]])
    if kind == "mul":
        return sympy.Mul(*[to_sympy(x) for x in node[1]])
    if kind == "neg":
        return -to_sympy(node[1])
    if kind == "div":
        return sympy.Mul(to_sympy(node[1]), sympy.Pow(to_sympy(node[2]), -1))
    if kind == "pow":
        base, exponent = to_sympy(node[1]), to_sympy(node[2])
        if exponent.is_number and exponent.is_real and abs(float(exponent)) > MAX_EXPONENT:
            raise Refused(f"exponent above {MAX_EXPONENT}")
        if base.is_Rational and exponent.is_Integer:
            bits = max(int(base.p).bit_length(), int(base.q).bit_length())
            if abs(base) != 1 and bits * abs(int(exponent)) > MAX_BITS:
                raise Refused(f"power needs more than {MAX_BITS} bits")
        return sympy.Pow(base, exponent)
    if kind == "fact":
        n = to_sympy(node[1])
        if n.is_number and (not n.is_real or abs(float(n)) > MAX_FACTORIAL):
            raise Refused(f"factorial above {MAX_FACTORIAL}")
        return sympy.factorial(n)
    if kind == "binom":
        n, k = to_sympy(node[1]), to_sympy(node[2])
        if n.is_number and (not n.is_real or abs(float(n)) > MAX_FACTORIAL):
            raise Refused(f"binomial above {MAX_FACTORIAL}")
        return sympy.binomial(n, k)
    if kind == "abs":
        return sympy.Abs(to_sympy(node[1]))
    if kind == "fn":
        f = {"arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan}.get(node[1]) or getattr(sympy, node[1])
        return f(to_sympy(node[2]))
    if kind == "log":
        x = to_sympy(node[2])
        return sympy.log(x, to_sympy(node[1])) if node[1] is not None else sympy.log(x, 10)
    raise Refused(f"cannot build {kind!r}")


class SympyJudge(NumericJudge):
    """NumericJudge first; where floats cannot decide, sympy's simplify on trees built by to_sympy."""

    def scalar(self, a, b) -> bool | None:
        verdict = super().scalar(a, b)
        if verdict is not None:
            return verdict
        import sympy

        x, y = to_sympy(a), to_sympy(b)
        diff = sympy.simplify(x - y)
        if diff == 0:
            return True
        if diff.is_number:  # simplify may leave an exact zero unreduced (nested radicals): 50 digits decide
            scale = max(abs(x.evalf(50)), abs(y.evalf(50)))
            return bool(scale != 0 and abs(diff.evalf(50)) <= sympy.Float(1e-30) * scale)
        return bool(x.equals(y))

    def equation(self, fa, fb, positive: bool = False) -> bool | None:
        verdict = super().equation(fa, fb, positive)
        if verdict is not None:
            return verdict
        import sympy

        ratio = sympy.simplify(to_sympy(fa) / to_sympy(fb))
        if positive:
            return bool(ratio.is_number and ratio.is_positive)
        return bool(ratio.is_number and ratio != 0 and ratio.is_finite)
