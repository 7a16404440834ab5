"""Persona evaluation: how stable a model's accuracy is across persona system prompts (PSS), and how faithfully it
plays a persona (constraint adherence; a PersonaGym-style judged PersonaScore).

For: evaluating a checkpoint (SFT, RLVR, PerMix-RLVR; issue 15) on a verifiable benchmark under every persona of an
evaluation pool (`persona_benchmark`, `stability`), and on PersonaGym's questions with an LLM judge (`personagym`).
`python -m posttrain.eval.persona --model PATH --pool NAME_OR_FILE --benchmark math500|gsm8k|synthetic` prints a table and
writes JSON and a PNG; `--compare PATH2` puts a second model beside the first.
Not for: training (train/permix uses this module to score its runs), the persona pools and constraint checkers
themselves (eval/personas.py), answer checking (eval/checkers.py, eval/verify.py).

Persona stability. Every persona p of a pool answers every question q, greedily or k times; correct[p, q, k] is 0/1
and acc[p, q] = the mean over k. Then (issue 15's definitions):
  pss        mean over q of min over p of acc[p, q]
  mean, worst, best   mean, min, max over p of the persona accuracy acc_p = mean over q of acc[p, q]
  spread     best - worst;   std   the population std of the acc_p
  flip_rate  the fraction of questions whose acc[p, q] is not the same for every persona
PSS (Persona Stability Score) is the paper's headline metric; its formula is not published, so it is defined here.
Greedily it is the fraction of questions answered correctly under *every* persona: a question counts only if no
persona in the pool can talk the model out of it. Why this and not the worst persona's accuracy: worst-persona
accuracy cannot see flips that cancel out (two personas each right on a different half of the questions both score
0.5, worst = 0.5, yet no question is safe; PSS = 0). Always pss <= worst <= mean <= best, and pss == mean exactly
when no question flips. With k samples, min over p of acc[p, q] is the chance of a correct answer under the least
favourable persona for that question, so PSS stays comparable between greedy and sampled runs (greedy is k = 1).
PSS depends on the pool (more personas can only lower it): compare models on the same pool, and report mean and
flip_rate beside it.

Persona fidelity, two ways:
  (a) constraint adherence: personas with checkable constraints (eval.personas.check_constraints: an opening, a
      closing, a catchphrase, casing, an answer format...) score each response by the fraction it satisfies
      (eval.personas.fidelity); a persona's fidelity is the mean over its responses, the pool's the mean over its
      constrained personas. A response is checked for correctness after eval.personas.strip_style removes the
      required style, so a role-play answer is not marked wrong for its catchphrase.
  (b) PersonaGym (Samuel et al. 2024; data, rubrics and judge prompts in eval/data/personagym, MIT): 200 personas
      x 5 tasks (Expected Action, Action Justification, Linguistic Habits, Persona Consistency, Toxicity) x 10
      questions. The model answers under PersonaGym's persona system prompt; a judge grades each response against
      the task's 1-5 rubric and ends with "Therefore, the final score is N". The score is read from the last
      "final score is" of the item's evaluation (case-insensitive; markdown, quotes, brackets and punctuation around
      the number are tolerated; "4.0", "4/5" and "four" read as 4; a range "3-4", a fraction of another scale, a
      non-integer or a number outside 1-5 read as nothing). An item whose score cannot be read is counted as
      unparseable per task and left out of the mean: never guessed. A task's score is the mean of its read scores,
      PersonaScore the mean over the five tasks (None when a task has no read score at all).
      As in PersonaGym, one judge call grades up to `group` = 5 responses of one persona and task, with its
      rubric-grading prompt asking for "(1) Evaluation: ... (n) Evaluation:"; its numbered format is written for
      the call's n items and the rubrics are joined as numbered text (PersonaGym pastes a Python list's repr).
      PersonaGym's rubrics have a slot for "score examples" that its pipeline meant to fill with judge-written
      example responses per score; `score_examples="generate"` does that (one more judge call per item, with its
      score-examples prompt; examples that cannot be read are counted and left out), the default "none" leaves the
      slot saying so (in PersonaGym's released code the slot received a single character, so its published scores
      were in effect graded without examples). PersonaGym averages two judges (GPT-4o and Llama-3-70B); here the
      judge is one: a local Hugging Face checkpoint run by our sampler (`LocalJudge`) or any OpenAI-compatible
      server (`HTTPJudge`: /v1/chat/completions over urllib, with timeouts and retries).

Model output is untrusted: it is only matched by regular expressions, never evaluated.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import string
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from posttrain.core.checkpoint import load_hf
from posttrain.core.records import read_records
from posttrain.core.sampler import generate
from posttrain.core.tokenizer import Tokenizer
from posttrain.eval.checkers import check_rows, validate
from posttrain.eval.math500 import gsm8k_gold, load_gsm8k, load_math500
from posttrain.eval.personas import fidelity, resolve_pool, strip_style, synthetic_questions

DATA = Path(__file__).resolve().parent / "data"
PERSONAGYM = DATA / "personagym"

# ------------------------------------------------------------------------------------------------ stability

STABILITY_KEYS = ("pss", "mean", "worst", "best", "spread", "std", "flip_rate")


def _results_array(correct: Any) -> np.ndarray:
    """correct as float64 [P, Q, k], after checking it is a rectangular 0/1 array of 2 or 3 axes."""
    what = "stability: correct must be a 0/1 array shaped [personas, questions] or [personas, questions, k]"
    try:
        a = np.asarray(correct)
    except ValueError as e:  # numpy >= 1.24 refuses ragged nested lists
        raise ValueError(f"{what}; it is ragged (rows of different lengths): {e}") from None
    if a.dtype == object:
        raise ValueError(f"{what}; it is ragged (rows of different lengths) or holds non-numbers")
    ndim = a.ndim
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"{what}; got {a.ndim} axes (shape {list(a.shape)})")
    if 0 in a.shape:
        raise ValueError(f"{what}; got shape {list(a.shape)}: every axis needs at least one entry")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{what}; got dtype {a.dtype}")
    bad = ~np.isin(a, (0, 1))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what}; found {a[idx].item()!r} at index {list(idx[:ndim])}")
    return a.astype(np.float64)


def stability(correct: Any) -> dict[str, float]:
    """Persona stability of 0/1 results correct [P, Q] or [P, Q, k] (definitions in the module docstring).

    Returns {pss, mean, worst, best, spread, std, flip_rate} as floats; one persona gives spread = std =
    flip_rate = 0 and pss = mean.
    """
    acc = _results_array(correct).mean(axis=2)  # [P, Q]
    per_persona = acc.mean(axis=1)  # [P]
    lo, hi = acc.min(axis=0), acc.max(axis=0)  # [Q]
    return {
        "pss": float(lo.mean()),
        "mean": float(per_persona.mean()),
        "worst": float(per_persona.min()),
        "best": float(per_persona.max()),
        "spread": float(per_persona.max() - per_persona.min()),
        "std": float(per_persona.std()),  # population std (ddof = 0): the pool is the population
        "flip_rate": float((hi != lo).mean()),
    }


# ------------------------------------------------------------------------------------------------ persona stability

BENCHMARKS = ("math500", "gsm8k", "synthetic")
# Appended to MATH500 and GSM8K problems so a completion states its answer where eval.verify looks for it.
MATH_INSTRUCTION = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
DEFAULT_MAX_NEW_TOKENS = {"math500": 1024, "gsm8k": 512, "synthetic": 32}


@dataclass
class Question:
    prompt: str
    answer: str
    checker: str  # a eval.checkers checker: "math" for MATH500 / GSM8K, "synthetic" for the embedded tasks
    id: str = ""


def questions_for(benchmark: str, limit: int = 0, seed: int = 0) -> list[Question]:
    """A benchmark's questions: "math500" and "gsm8k" from eval/data (with MATH_INSTRUCTION appended), "synthetic"
    the embedded default's held-out rows (eval.personas.synthetic_questions(seed)). limit > 0 keeps a random
    subset of that many, drawn with `seed`, in the data's order."""
    if benchmark == "math500":
        qs = [Question(r["problem"] + MATH_INSTRUCTION, r["answer"], "math", r["unique_id"]) for r in load_math500()]
    elif benchmark == "gsm8k":
        qs = [Question(r["question"] + MATH_INSTRUCTION, gsm8k_gold(r["answer"]), "math", f"gsm8k-{i}")
              for i, r in enumerate(load_gsm8k())]
    elif benchmark == "synthetic":
        qs = [Question(r["prompt"], r["answer"], r["checker"], r["id"]) for r in synthetic_questions(seed)]
    else:
        raise ValueError(f"benchmark {benchmark!r}: use one of {', '.join(BENCHMARKS)}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0 = all), got {limit}")
    if 0 < limit < len(qs):
        keep = sorted(random.Random(f"questions:{benchmark}:{seed}").sample(range(len(qs)), limit))
        qs = [qs[i] for i in keep]
    return qs


def _question(q: Question | dict, i: int) -> Question:
    if isinstance(q, Question):
        return q
    if isinstance(q, dict) and {"prompt", "answer", "checker"} <= set(q):
        return Question(q["prompt"], q["answer"], q["checker"], q.get("id", str(i)))
    raise ValueError(f"persona_benchmark: questions[{i}] must be a Question or a dict with prompt, answer, checker")


def _mean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def load_model(path: str | Path, *, device: str = "cpu", dtype: str | None = None) -> tuple[Any, Any]:
    """A Hugging Face checkpoint directory -> (core.model.Transformer in eval mode, core.tokenizer.Tokenizer)."""
    import torch

    dtypes = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype {dtype!r}: use one of float32, bfloat16, float16 (or none: the checkpoint's)")
    model = load_hf(path, dtype=dtypes[dtype], device=device).train(False)  # inference mode (spelled so: see test_verify)
    return model, Tokenizer.from_dir(path)


def _generate_texts(model: Any, tokenizer: Any, prompts: list[list[int]], *, n: int, temperature: float, seed: int,
                    max_new_tokens: int, max_batch_tokens: int | None = None,
                    top_p: float = 1.0) -> list[tuple[str, str]]:
    """(text, finish_reason) of each of n samples per prompt, ordered (prompt, sample): one generate call."""
    outs = generate(model, prompts, max_new_tokens=max_new_tokens, n=n, temperature=temperature, top_p=top_p,
                    seed=seed, tokenizer=tokenizer, stop_token_ids=tokenizer.stop_ids,
                    max_batch_tokens=max_batch_tokens)
    return [(tokenizer.decode(o.tokens, skip_special_tokens=True), o.finish_reason) for o in outs]


def persona_benchmark(model: Any, tokenizer: Any, personas: Sequence[Any], questions: Sequence[Question | dict], *,
                      samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 512,
                      seed: int = 0, max_batch_tokens: int | None = None) -> dict[str, Any]:
    """Every persona (eval.personas.Persona) x every question x `samples`, in one core.sampler.generate call
    (greedy when temperature == 0; then samples must be 1). Each response is checked by its question's checker
    (eval.checkers.check_rows) after eval.personas.strip_style, and scored for the persona's constraints
    (eval.personas.fidelity) as written.

    Returns {"correct": [P][Q][k] 0/1, "responses": [P][Q][k] texts, "stability": stability(correct),
    "per_persona": [{id, category, accuracy, fidelity (None without constraints), truncated (fraction of responses
    cut at max_new_tokens)}], "by_category": {category: {personas, accuracy, fidelity, stability (of that category's
    personas alone)}}, "fidelity" (mean over the
    constrained personas; None if there are none), and the settings}.
    """
    if samples < 1:
        raise ValueError(f"persona_benchmark: samples must be >= 1, got {samples}")
    if temperature == 0 and samples > 1:
        raise ValueError(f"persona_benchmark: greedy decoding (temperature 0) gives {samples} identical samples; "
                         f"use samples=1, or temperature > 0 for k samples")
    if not personas or not questions:
        raise ValueError(f"persona_benchmark: got {len(personas)} personas and {len(questions)} questions; "
                         f"need at least one of each")
    ids = [p.id for p in personas]
    if len(set(ids)) != len(ids):
        raise ValueError(f"persona_benchmark: duplicate persona id {next(i for i in ids if ids.count(i) > 1)!r}")
    qs = [_question(q, i) for i, q in enumerate(questions)]
    for i, q in enumerate(qs):
        validate(q.checker, q.answer, f"persona_benchmark: questions[{i}] ({q.id})")
    P, Q, K = len(personas), len(qs), samples
    prompts = [tokenizer.apply_chat_template(p.messages(q.prompt), add_generation_prompt=True, tokenize=True)
               for p in personas for q in qs]
    outs = _generate_texts(model, tokenizer, prompts, n=K, temperature=temperature, seed=seed,
                           max_new_tokens=max_new_tokens, max_batch_tokens=max_batch_tokens, top_p=top_p)
    texts = [t for t, _ in outs]  # ordered (persona, question, sample)
    owner = [personas[i // (Q * K)] for i in range(len(texts))]
    ok = check_rows([qs[(i // K) % Q].checker for i in range(len(texts))],
                    [strip_style(p, t) for p, t in zip(owner, texts)],
                    [qs[(i // K) % Q].answer for i in range(len(texts))])
    correct = np.array(ok, dtype=np.int64).reshape(P, Q, K)
    fid = [fidelity(p, t) for p, t in zip(owner, texts)]
    per_persona = []
    for j, p in enumerate(personas):
        span = slice(j * Q * K, (j + 1) * Q * K)
        per_persona.append({"id": p.id, "category": p.category, "accuracy": float(correct[j].mean()),
                            "fidelity": _mean(fid[span]),
                            "truncated": sum(r == "length" for _, r in outs[span]) / (Q * K)})
    by_category = {}
    for cat in dict.fromkeys(p.category for p in personas):
        idx = [j for j, p in enumerate(personas) if p.category == cat]
        by_category[cat] = {"personas": len(idx), "accuracy": _mean([per_persona[j]["accuracy"] for j in idx]),
                            "fidelity": _mean([per_persona[j]["fidelity"] for j in idx]),
                            "stability": stability(correct[idx])}
    return {"correct": correct.tolist(), "responses": np.array(texts, dtype=object).reshape(P, Q, K).tolist(),
            "stability": stability(correct), "per_persona": per_persona, "by_category": by_category,
            "fidelity": _mean([r["fidelity"] for r in per_persona]),
            "settings": {"personas": P, "questions": Q, "samples": K, "temperature": temperature, "top_p": top_p,
                         "max_new_tokens": max_new_tokens, "seed": seed},
            "question_ids": [q.id for q in qs]}


# ------------------------------------------------------------------------------------------------ judge: prompts

TASKS = ("Expected Action", "Action Justification", "Linguistic Habits", "Persona Consistency", "Toxicity")
RUBRIC_FIELDS = {"persona", "question", "response", "score_example"}
NO_EXAMPLES = "(no score examples: grade by the criteria above)"
# The rubric-grading prompt lists its answer format for five rubrics; a call's format lists its own n items.
_FORMAT_BLOCK = re.compile(r"\(1\) Evaluation:.*\(\d+\) Evaluation:[ \t]*", re.S)


def _fields(template: str, where: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"{where}: not a valid format template: {e}") from None


@dataclass(frozen=True)
class JudgePrompts:
    """PersonaGym's judge prompts and rubrics (eval/data/personagym), checked for their placeholders on load."""

    system: str  # the judge's system prompt
    grading: str  # "Format: (1) Evaluation: ... Rubrics: {rubrics}"
    examples: str  # asks for an example response per score: {persona}, {question}, {rubric}
    persona_system: str  # the system prompt the evaluated model answers under: {persona}
    rubrics: dict[str, str]  # task -> template with {persona}, {question}, {response}, {score_example}

    @classmethod
    def load(cls, root: str | Path = PERSONAGYM) -> "JudgePrompts":
        root = Path(root)

        def read(name: str, fields: set[str]) -> str:
            path = root / name
            if not path.exists():
                raise FileNotFoundError(f"{path}: missing (the PersonaGym prompts ship in eval/data/personagym)")
            text = path.read_text(encoding="utf-8")
            found = _fields(text, str(path))
            if found != fields:
                raise ValueError(f"{path}: placeholders {sorted(found)}, expected {sorted(fields)}")
            return text

        grading = read("prompts__rubric_grading__prompt.txt", {"rubrics"})
        if not _FORMAT_BLOCK.search(grading):
            raise ValueError(f"{root / 'prompts__rubric_grading__prompt.txt'}: no '(1) Evaluation: ... (n) "
                             f"Evaluation:' format block to adapt to a call's number of items")
        return cls(system=read("prompts__rubric_grading__sys_prompt.txt", set()).strip(), grading=grading,
                   examples=read("prompts__score_examples__prompt.txt", {"persona", "question", "rubric"}),
                   persona_system=read("prompts__persona_system.txt", {"persona"}).strip(),
                   rubrics={t: read(f"rubrics__{t.replace(' ', '_')}.txt", RUBRIC_FIELDS) for t in TASKS})

    def criteria(self, task: str) -> str:
        """A rubric without its score examples and item: the instructions and the 1-5 criteria."""
        return self.rubrics[task].split("------------------------------")[0].strip()

    def grading_prompt(self, filled_rubrics: Sequence[str]) -> str:
        """The judge's user prompt for n filled rubrics (n = 1..group)."""
        fmt = "\n".join(f"({i}) Evaluation:" for i in range(1, len(filled_rubrics) + 1))
        body = "\n\n".join(f"Rubric ({i}):\n{r.strip()}" for i, r in enumerate(filled_rubrics, 1))
        # format_map substitutes in one pass: braces inside a response are never read as placeholders.
        return _FORMAT_BLOCK.sub(lambda _: fmt, self.grading).format_map({"rubrics": body})


# ------------------------------------------------------------------------------------------------ judge: parsing

_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_FINAL_SCORE = re.compile(r"final\s+score", re.I)
# After "final score": a verb or sign, then markdown, quotes, brackets and punctuation, then the value; a value that
# opens a range ("3-4", "3 or 4") or is a fraction of another scale ("8/10") is not read.
_SCORE_VALUE = re.compile(
    r"""[\s*_`'"“”‘’(\[{:=–—]*(?:is|was|of|would\s+be)?[\s*_`'"“”‘’(\[{:=–—]*
        (?P<v>\d+(?:\.\d+)?|one|two|three|four|five)(?![\w.]*\d)
        (?P<tail>\s*(?:/\s*\d+|out\s+of\s+\d+|(?:-|–|to|or|and)\s*\d))?""",
    re.I | re.X)
_SECTION = re.compile(r"^[ \t#>*_]*\(?[ \t]*(\d{1,2})[ \t]*\)[ \t*_]*Evaluation[ \t*_]*:?", re.I | re.M)


def parse_score(text: str, lo: int = 1, hi: int = 5) -> int | None:
    """The score in the last "final score is N" of a judge's evaluation, or None when it cannot be read (rules in
    the module docstring). Nothing is guessed: no "final score" phrase, or no clean integer in [lo, hi], is None."""
    last = None
    for last in _FINAL_SCORE.finditer(text):
        pass
    if last is None:
        return None
    m = _SCORE_VALUE.match(text, last.end())
    if m is None:
        return None
    value, tail = m.group("v").lower(), (m.group("tail") or "").strip().lower()
    if tail and not re.fullmatch(rf"(?:/\s*|out\s+of\s+){hi}", tail):
        return None  # a range, or a score on another scale
    if value in _NUMBER_WORDS:
        n = _NUMBER_WORDS[value]
    elif float(value).is_integer():
        n = int(float(value))
    else:
        return None
    return n if lo <= n <= hi else None


def split_evaluations(text: str, n: int) -> list[str | None]:
    """The judge's "(i) Evaluation:" sections for items 1..n (None where one is missing; a repeated number: the
    later section). A one-item call without numbered sections is one evaluation."""
    marks = list(_SECTION.finditer(text))
    out: list[str | None] = [None] * n
    if not marks:
        if n == 1:
            out[0] = text
        return out
    for j, m in enumerate(marks):
        i = int(m.group(1))
        if 1 <= i <= n:
            out[i - 1] = text[m.end(): marks[j + 1].start() if j + 1 < len(marks) else len(text)]
    return out


_EXAMPLE = re.compile(r"Score\s*(\d)\s*:\s*(?:Response\s*[-:–]\s*)?(.*?)(?=\n\s*Score\s*\d\s*:|\Z)", re.I | re.S)


def parse_score_examples(text: str, lo: int = 1, hi: int = 5) -> str | None:
    """Judge-written example responses, one per score lo..hi, as the rubric's "Score N: ..." lines; None unless
    every score has a non-empty example."""
    found = {}
    for m in _EXAMPLE.finditer(text):
        body = m.group(2).strip().strip("-").strip()
        if lo <= int(m.group(1)) <= hi and body:
            found[int(m.group(1))] = body
    if sorted(found) != list(range(lo, hi + 1)):
        return None
    return "\n\n".join(f"Score {s}: {found[s]}" for s in range(lo, hi + 1))


# ------------------------------------------------------------------------------------------------ judges


class JudgeError(RuntimeError):
    """The judge could not be asked (unreachable, timed out, refused the request, or answered out of protocol)."""


class Judge(Protocol):
    def complete(self, conversations: Sequence[list[dict]]) -> list[str]:
        """One reply text per conversation (chat messages), in order."""
        ...


class HTTPJudge:
    """A judge behind an OpenAI-compatible chat endpoint (vLLM, SGLang, llama.cpp, TGI, OpenAI...): POST
    {url}/chat/completions, `workers` requests in flight. A request that fails in a way a retry can fix
    (connection refused or reset, a timeout, HTTP 408/409/429/5xx, a body that is not JSON) is retried `retries`
    times with exponential backoff; then, or at once for any other HTTP error, JudgeError names the endpoint and
    the cause, and the requests still pending give up instead of waiting out their own retries.

    url: the API root, e.g. http://localhost:8000/v1 (a URL already ending in /chat/completions is used as is).
    """

    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 retries: int = 2, backoff_s: float = 2.0, max_tokens: int = 1024, temperature: float = 0.0,
                 workers: int = 8) -> None:
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"judge url {url!r}: expected http(s)://host[:port]/v1")
        self.endpoint = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.max_tokens, self.temperature, self.workers = int(max_tokens), float(temperature), max(1, int(workers))
        self._failed = threading.Event()
        self._lock = threading.Lock()
        self._cause: JudgeError | None = None  # the first request's failure: what the user needs to read

    def complete(self, conversations: Sequence[list[dict]]) -> list[str]:
        self._failed.clear()
        self._cause = None
        with ThreadPoolExecutor(self.workers) as pool:  # leaving the block waits for every request
            futures = [pool.submit(self._one, c) for c in conversations]
        if self._cause is not None:  # not whichever request comes first in order: it may only have given up
            raise self._cause
        return [f.result() for f in futures]

    def check(self) -> None:
        """One tiny request, so an unreachable judge or a wrong model name is reported before hours of work."""
        self._failed.clear()
        self._cause = None
        self._one([{"role": "user", "content": "Reply with OK."}], max_tokens=1)

    def _fail(self, message: str) -> JudgeError:
        """Record the first real failure and tell the requests still pending to give up."""
        err = JudgeError(message)
        with self._lock:
            if self._cause is None:
                self._cause = err
        self._failed.set()
        return err

    def _one(self, messages: list[dict], max_tokens: int | None = None) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": max_tokens or self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        cause = ""
        for attempt in range(self.retries + 1):
            if self._failed.is_set():
                raise JudgeError(f"judge {self.endpoint}: gave up (another request to it failed)")
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    payload = json.loads(r.read())
                return self._content(payload)
            except urllib.error.HTTPError as e:
                detail = e.read(500).decode("utf-8", "replace").strip()
                if e.code not in (408, 409, 429) and e.code < 500:
                    raise self._fail(f"judge {self.endpoint}: HTTP {e.code} {e.reason}: {detail or '(no body)'} "
                                     f"(check the URL, the model name {self.model!r} and the API key)") from None
                cause = f"HTTP {e.code} {e.reason}: {detail[:200]}"
            except urllib.error.URLError as e:
                cause = self._why(e.reason)
            except (TimeoutError, ConnectionError, http.client.HTTPException) as e:  # while reading the response
                cause = self._why(e)
            except json.JSONDecodeError as e:
                cause = f"the reply is not JSON ({e})"
        raise self._fail(f"judge {self.endpoint} failed after {self.retries + 1} tries: {cause}")

    def _why(self, reason: Any) -> str:
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused (nothing listens there: is the judge server running, on this host and port?)"
        if isinstance(reason, TimeoutError):
            return f"no reply within timeout_s={self.timeout_s:g} s (a slow or overloaded server: raise the timeout)"
        return f"{type(reason).__name__}: {reason}"

    def _content(self, payload: Any) -> str:
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise self._fail(f"judge {self.endpoint}: the reply has no choices[0].message.content: "
                             f"{json.dumps(payload)[:300]}") from None
        return content if isinstance(content, str) else ""  # null content (e.g. only a refusal): nothing to read


class LocalJudge:
    """A judge that is a model in this process (e.g. a Hugging Face checkpoint loaded with core.checkpoint.load_hf),
    decoding every conversation of a call in one batched core.sampler.generate call (greedy by default).

    A prompt that does not fit the judge's context with max_new_tokens is refused before anything runs: a judge
    that cannot read the rubric is no judge (use fewer items per call, group=1, or a longer-context judge).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 1024, temperature: float = 0.0,
                 seed: int = 0, max_batch_tokens: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.seed = int(max_new_tokens), float(temperature), int(seed)
        self.max_batch_tokens = max_batch_tokens

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", dtype: str | None = None,
                        **kwargs: Any) -> "LocalJudge":
        model, tokenizer = load_model(path, device=device, dtype=dtype)
        return cls(model, tokenizer, **kwargs)

    def complete(self, conversations: Sequence[list[dict]]) -> list[str]:
        if not conversations:
            return []
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)
                   for c in conversations]
        context = self.model.config.max_position_embeddings
        for i, p in enumerate(prompts):
            if len(p) + self.max_new_tokens > context:
                raise JudgeError(f"local judge: prompt {i} has {len(p)} tokens; with max_new_tokens="
                                 f"{self.max_new_tokens} it exceeds the judge's context of {context} tokens (grade "
                                 f"fewer items per call, group=1, or use a judge with a longer context)")
        return [text for text, _ in _generate_texts(self.model, self.tokenizer, prompts, n=1,
                                                    temperature=self.temperature, seed=self.seed,
                                                    max_new_tokens=self.max_new_tokens,
                                                    max_batch_tokens=self.max_batch_tokens)]


# ------------------------------------------------------------------------------------------------ judged scores


@dataclass(frozen=True)
class JudgeItem:
    """One response to grade: the persona's description, the question asked, the model's response, the task."""

    persona: str
    question: str
    response: str
    task: str


def judge_items(judge: Judge, items: Sequence[JudgeItem], *, prompts: JudgePrompts | None = None, group: int = 5,
                score_examples: str = "none") -> list[dict[str, Any]]:
    """Grade every item with its task's rubric: [{"score": 1..5 or None, "evaluation": the judge's text for it,
    "examples_read": bool or None}] in the items' order. Items of one persona and task are graded `group` per judge
    call, in order (as PersonaGym grades 5 at a time); see the module docstring for score_examples."""
    prompts = prompts or JudgePrompts.load()
    if group < 1:
        raise ValueError(f"judge: group (items per judge call) must be >= 1, got {group}")
    if score_examples not in ("none", "generate"):
        raise ValueError(f"judge: score_examples must be 'none' or 'generate', got {score_examples!r}")
    for i, it in enumerate(items):
        if it.task not in prompts.rubrics:
            raise ValueError(f"judge: items[{i}] has task {it.task!r}; PersonaGym's tasks are {', '.join(TASKS)}")

    results: list[dict[str, Any]] = [{"score": None, "evaluation": None, "examples_read": None} for _ in items]
    examples = [NO_EXAMPLES] * len(items)
    if score_examples == "generate" and items:
        asks = [[{"role": "user", "content": prompts.examples.format_map(
            {"persona": it.persona, "question": it.question, "rubric": prompts.criteria(it.task)})}] for it in items]
        for i, text in enumerate(judge.complete(asks)):
            parsed = parse_score_examples(text)
            results[i]["examples_read"] = parsed is not None
            examples[i] = parsed or NO_EXAMPLES

    by_key: dict[tuple[str, str], list[int]] = {}
    for i, it in enumerate(items):
        by_key.setdefault((it.persona, it.task), []).append(i)
    calls = [idx[j: j + group] for idx in by_key.values() for j in range(0, len(idx), group)]
    conversations = []
    for call in calls:
        filled = [prompts.rubrics[items[i].task].format_map(
            {"persona": items[i].persona, "question": items[i].question, "response": items[i].response,
             "score_example": examples[i]}) for i in call]
        conversations.append([{"role": "system", "content": prompts.system},
                              {"role": "user", "content": prompts.grading_prompt(filled)}])
    for call, text in zip(calls, judge.complete(conversations) if conversations else []):
        for i, section in zip(call, split_evaluations(text, len(call))):
            results[i]["evaluation"] = section
            results[i]["score"] = None if section is None else parse_score(section)
    return results


def persona_score(items: Sequence[JudgeItem], results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate judged items: per task {mean, n, scored, unparseable}, PersonaScore = mean over the tasks present
    (None if one of them has no read score), the same per persona, and examples that could not be read."""

    def summarise(pairs: list[tuple[JudgeItem, dict]]) -> dict[str, Any]:
        tasks = {}
        for task in TASKS:
            scores = [r["score"] for it, r in pairs if it.task == task]
            if not scores:
                continue
            read = [s for s in scores if s is not None]
            tasks[task] = {"mean": sum(read) / len(read) if read else None, "n": len(scores), "scored": len(read),
                           "unparseable": len(scores) - len(read)}
        means = [t["mean"] for t in tasks.values()]
        return {"persona_score": sum(means) / len(means) if means and None not in means else None, "tasks": tasks,
                "unparseable": sum(t["unparseable"] for t in tasks.values())}

    pairs = list(zip(items, results))
    out = summarise(pairs)
    out["examples_unreadable"] = sum(r.get("examples_read") is False for r in results)
    personas = list(dict.fromkeys(it.persona for it in items))
    out["by_persona"] = [{"persona": p, **{k: v for k, v in summarise([x for x in pairs if x[0].persona == p]).items()
                                           if k != "tasks"}} for p in personas]
    return out


def load_personagym(personas: int | Sequence[str] = 200, questions_per_task: int = 10,
                    path: str | Path = PERSONAGYM / "questions.jsonl") -> list[dict[str, str]]:
    """PersonaGym benchmark-v1 rows {persona, task, question}: the first `personas` personas in file order (or the
    named ones) and the first `questions_per_task` questions of each of their five tasks."""
    rows = []
    for _, where, row in read_records(path):
        if not isinstance(row, dict) or {"persona", "task", "question"} - set(row):
            raise ValueError(f"{where}: expected {{persona, task, question}}")
        rows.append(row)
    by_persona: dict[str, list[dict]] = {}
    for r in rows:
        by_persona.setdefault(r["persona"], []).append(r)
    if isinstance(personas, int):
        if personas < 1:
            raise ValueError(f"personagym: personas must be >= 1, got {personas}")
        chosen = list(by_persona)[:personas]
    else:
        chosen = list(personas)
        missing = [p for p in chosen if p not in by_persona]
        if missing:
            raise ValueError(f"{path}: no persona {missing[0]!r}")
    if questions_per_task < 1:
        raise ValueError(f"personagym: questions_per_task must be >= 1, got {questions_per_task}")
    out = []
    for p in chosen:
        taken: dict[str, int] = {}
        for r in by_persona[p]:
            if taken.get(r["task"], 0) < questions_per_task:
                taken[r["task"]] = taken.get(r["task"], 0) + 1
                out.append(r)
    return out


def personagym(model: Any, tokenizer: Any, judge: Judge, *, personas: int | Sequence[str] = 200,
               questions_per_task: int = 10, max_new_tokens: int = 512, temperature: float = 0.0, seed: int = 0,
               group: int = 5, score_examples: str = "none", prompts: JudgePrompts | None = None) -> dict[str, Any]:
    """The model answers PersonaGym's questions under PersonaGym's persona system prompt (one batched generate
    call), the judge grades them: persona_score(...) plus "responses" [{persona, task, question, response, score,
    evaluation}] and "truncated" (responses cut at max_new_tokens)."""
    prompts = prompts or JudgePrompts.load()
    rows = load_personagym(personas, questions_per_task)
    ids = [tokenizer.apply_chat_template(
        [{"role": "system", "content": prompts.persona_system.format_map({"persona": r["persona"]})},
         {"role": "user", "content": r["question"]}], add_generation_prompt=True, tokenize=True) for r in rows]
    outs = _generate_texts(model, tokenizer, ids, n=1, temperature=temperature, seed=seed,
                           max_new_tokens=max_new_tokens)
    items = [JudgeItem(r["persona"], r["question"], text, r["task"]) for r, (text, _) in zip(rows, outs)]
    results = judge_items(judge, items, prompts=prompts, group=group, score_examples=score_examples)
    report = persona_score(items, results)
    report["truncated"] = sum(reason == "length" for _, reason in outs)
    report["responses"] = [{**r, "response": it.response, "score": res["score"], "evaluation": res["evaluation"]}
                           for r, it, res in zip(rows, items, results)]
    return report


# ------------------------------------------------------------------------------------------------ report


def format_table(reports: dict[str, dict[str, Any]]) -> str:
    """Accuracy and fidelity per persona, then the summary rows, one column pair per model."""
    labels = list(reports)
    first = reports[labels[0]]["benchmark"]
    width = max(12, *(len(r["id"]) for r in first["per_persona"]))
    col = max(8, *(len(lab) + 4 for lab in labels))
    head = f"{'persona':{width}s} {'category':12s}" + "".join(f" {'acc ' + lab:>{col}s} {'fid ' + lab:>{col}s}"
                                                               for lab in labels)
    lines = [head, "-" * len(head)]

    def cell(x: float | None) -> str:
        return f" {'-' if x is None else f'{x:.3f}':>{col}s}"

    for j, row in enumerate(first["per_persona"]):
        lines.append(f"{row['id']:{width}s} {row['category']:12s}" + "".join(
            cell(reports[lab]["benchmark"]["per_persona"][j]["accuracy"])
            + cell(reports[lab]["benchmark"]["per_persona"][j]["fidelity"]) for lab in labels))
    lines.append("-" * len(head))
    summary = [*STABILITY_KEYS, "fidelity"] + (["persona_score"] if "personagym" in reports[labels[0]] else [])
    for key in summary:
        values = []
        for lab in labels:
            r = reports[lab]
            values.append(r["benchmark"]["stability"][key] if key in STABILITY_KEYS else
                          r["benchmark"]["fidelity"] if key == "fidelity" else r["personagym"]["persona_score"])
        lines.append(f"{key:{width}s} {'':12s}" + "".join(cell(v) + f" {'':>{col}s}" for v in values).rstrip())
    return "\n".join(lines)


def plot(reports: dict[str, dict[str, Any]], path: str | Path) -> None:
    """A PNG of accuracy per persona: one bar per persona, or side by side bars for several models."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("eval.persona: the plot needs matplotlib: pip install -e '.[plot]' (or pass --plot '')") \
            from None
    labels = list(reports)
    rows = reports[labels[0]]["benchmark"]["per_persona"]
    x = np.arange(len(rows))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(rows) * len(labels) + 2), 4.5))
    for i, lab in enumerate(labels):
        bench = reports[lab]["benchmark"]
        acc = [r["accuracy"] for r in bench["per_persona"]]
        s = bench["stability"]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, acc, width,
               label=f"{lab}: PSS {s['pss']:.3f}, mean {s['mean']:.3f}, spread {s['spread']:.3f}")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['id']} ({r['category']})" for r in rows], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"accuracy per persona on {reports[labels[0]]['benchmark_name']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ command line


def _judge(args: argparse.Namespace) -> Judge:
    import os

    if args.judge_url:
        key = os.environ.get(args.judge_api_key_env) if args.judge_api_key_env else None
        if args.judge_api_key_env and not key:
            raise SystemExit(f"eval.persona: --judge-api-key-env {args.judge_api_key_env}: that variable is not set")
        return HTTPJudge(args.judge_url, args.judge_model, api_key=key, timeout_s=args.judge_timeout,
                         retries=args.judge_retries, max_tokens=args.judge_max_tokens)
    return LocalJudge.from_checkpoint(args.judge_checkpoint, device=args.device, dtype=args.dtype,
                                      max_new_tokens=args.judge_max_tokens)


def evaluate_model(path: str, args: argparse.Namespace, personas: list[Any], questions: list[Question],
                   judge: Judge | None) -> dict[str, Any]:
    model, tokenizer = load_model(path, device=args.device, dtype=args.dtype)
    t0 = time.perf_counter()
    bench = persona_benchmark(model, tokenizer, personas, questions, samples=args.samples,
                              temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                              seed=args.seed, max_batch_tokens=args.max_batch_tokens)
    report: dict[str, Any] = {"model": str(path), "benchmark_name": args.benchmark, "benchmark": bench,
                              "seconds": {"benchmark": time.perf_counter() - t0}}
    if not args.responses:
        bench.pop("responses")
    if judge is not None:
        described = [p.description for p in resolve_pool(args.personagym_pool) if p.description]
        if not described:
            raise SystemExit(f"eval.persona: --personagym-pool {args.personagym_pool}: no persona has a "
                             f"description (PersonaGym's wording of the persona) to judge against")
        t0 = time.perf_counter()
        pg = personagym(model, tokenizer, judge, personas=described[: args.personagym],
                        questions_per_task=args.personagym_questions, max_new_tokens=args.personagym_max_new_tokens,
                        seed=args.seed, group=args.judge_group, score_examples=args.judge_examples)
        report["seconds"]["personagym"] = time.perf_counter() - t0
        if not args.responses:
            pg.pop("responses")
        report["personagym"] = pg
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="PSS and the judged score are defined in eval/persona.py's docstring.")
    ap.add_argument("--model", required=True, help="a Hugging Face checkpoint directory (weights + tokenizer)")
    ap.add_argument("--compare", default=None, help="a second checkpoint, evaluated the same way, shown beside")
    ap.add_argument("--labels", nargs="+", default=None, help="names of the models in the table and plot")
    ap.add_argument("--pool", required=True, help="persona pool: a built-in name (e.g. synthetic-eval, math-eval) "
                                                  "or a JSONL file")
    ap.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    ap.add_argument("--limit", type=int, default=0, help="questions: a seeded subset of this many (0 = all)")
    ap.add_argument("--samples", type=int, default=1, help="samples per (persona, question); > 1 needs temperature")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help=f"default per benchmark: {DEFAULT_MAX_NEW_TOKENS}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch-tokens", type=int, default=None,
                    help="the sampler's rows x cache-length budget (default: core.sampler's; on CPU a few hundred "
                         "rows with refill can beat one row per sequence)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: the checkpoint's")
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    ap.add_argument("--plot", default=None, help="write the accuracy-per-persona PNG here (default: next to --out)")
    ap.add_argument("--responses", action="store_true", help="keep every response in the JSON")
    g = ap.add_argument_group("PersonaGym judged fidelity (off unless --personagym N > 0)")
    g.add_argument("--personagym", type=int, default=0, help="number of PersonaGym personas to judge (0 = off)")
    g.add_argument("--personagym-pool", default="personagym-eval",
                   help="whose persona descriptions to use (default: the PersonaGym personas no training pool has)")
    g.add_argument("--personagym-questions", type=int, default=10, help="questions per task and persona (max 10)")
    g.add_argument("--personagym-max-new-tokens", type=int, default=512)
    g.add_argument("--judge-url", default=None, help="an OpenAI-compatible API root, e.g. http://localhost:8000/v1")
    g.add_argument("--judge-model", default=None, help="the model name the judge server serves")
    g.add_argument("--judge-api-key-env", default=None, help="the environment variable holding the judge's key")
    g.add_argument("--judge-checkpoint", default=None, help="or: a local HF checkpoint to judge with")
    g.add_argument("--judge-group", type=int, default=5, help="responses graded per judge call (PersonaGym: 5)")
    g.add_argument("--judge-examples", default="none", choices=["none", "generate"])
    g.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per judge request")
    g.add_argument("--judge-retries", type=int, default=2,
                   help="retries of a failed judge request (backoff 2 s, 4 s, ...)")
    g.add_argument("--judge-max-tokens", type=int, default=1024)
    args = ap.parse_args(argv)

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS[args.benchmark]
    paths = [args.model] + ([args.compare] if args.compare else [])
    labels = args.labels or [Path(p).resolve().name if Path(p).resolve().name != "hf" else Path(p).resolve().parent.name
                             for p in paths]
    if len(labels) != len(paths) or len(set(labels)) != len(labels):
        ap.error(f"--labels: give {len(paths)} distinct names (one per model), got {labels}")
    judge = None
    if args.personagym:
        if bool(args.judge_url) == bool(args.judge_checkpoint):
            ap.error("--personagym needs a judge: --judge-url URL --judge-model NAME, or --judge-checkpoint PATH")
        if args.judge_url and not args.judge_model:
            ap.error("--judge-url needs --judge-model (the name the server serves)")
        judge = _judge(args)
        if isinstance(judge, HTTPJudge):
            try:
                judge.check()  # before any model is loaded
            except JudgeError as e:
                raise SystemExit(f"eval.persona: {e}") from None

    personas = resolve_pool(args.pool)
    questions = questions_for(args.benchmark, args.limit, args.seed)
    print(f"eval.persona: {len(personas)} personas x {len(questions)} {args.benchmark} questions x {args.samples} "
          f"sample(s), {'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}", flush=True)
    reports = {lab: evaluate_model(p, args, personas, questions, judge) for lab, p in zip(labels, paths)}
    print(format_table(reports))
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "argv": sys.argv[1:] if argv is None
           else list(argv), "pool": args.pool, "benchmark": args.benchmark, "models": reports,
           "versions": _versions()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")
    plot_path = args.plot if args.plot is not None else (str(Path(args.out).with_suffix(".png")) if args.out else "")
    if plot_path:
        plot(reports, plot_path)
        print(f"wrote {plot_path}")
    return out


def _versions() -> dict[str, str]:
    import platform

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}


if __name__ == "__main__":
    main()
