"""PerMix's training side: the mixer that puts personas on RL prompts, and the embedded default's persona data.

The mixer (`PersonaMixer`) decides, per prompt of a PerMix-RLVR step, by configured ratios, between no persona, a
training persona on the verifiable task (robustness), and a role-play request (fidelity); a step's draws are a pure
function of (seed, step, number of prompts), so every rank draws the same and a resumed run draws what the
uninterrupted one drew. train/grpo.py applies it (section [persona]).

The embedded default's data (`synthetic_sft_rows`, `synthetic_prompts`) is SFT rows in which personas change
behaviour (unhelpful personas mostly go with a wrong answer, role-play personas with their opening and closing
words) and the verifiable RL prompts without personas, both from the held-in rows of eval/personas.py's synthetic
tasks; the held-out questions and the persona pools themselves are evaluation's (eval/personas.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from posttrain.eval.personas import CATEGORIES, NO_PERSONA, Persona, synthetic_pools, synthetic_tasks

KINDS = ("none", "persona", "roleplay")


@dataclass(frozen=True)
class Draw:
    kind: str  # "none" | "persona" (a training persona on a verifiable task) | "roleplay" (a role-play request)
    persona: Persona


class PersonaMixer:
    """Per prompt of an RL step, by `ratios` over KINDS: no persona, a training persona that is not role-play
    (task-aligned, neutral or unhelpful: robustness on verifiable tasks), or a role-play persona (fidelity).
    Within "persona" the category is drawn uniformly among those the pool has, then the persona uniformly within
    it, so a large category does not crowd out the others (math-train has 100 neutral PersonaGym personas and 10
    unhelpful ones: unhelpful prompts are still a third of the persona draws); role-play personas are drawn
    uniformly. draws(step, n) is a pure function of (seed, step, n)."""

    def __init__(self, pool: list[Persona], ratios: dict[str, float], seed: int, *, where: str = "persona") -> None:
        for k, v in ratios.items():
            if k not in KINDS:
                raise ValueError(f"{where}.ratios: unknown kind {k!r}; the kinds are {', '.join(KINDS)}")
            if not (v >= 0):
                raise ValueError(f"{where}.ratios.{k} must be >= 0, got {v}")
        total = sum(ratios.values())
        if total <= 0:
            raise ValueError(f"{where}.ratios: give at least one kind a positive ratio")
        # kind -> its personas grouped by category (one group for "none" and "roleplay")
        robust = [[p for p in pool if p.category == c] for c in CATEGORIES if c not in ("none", "role-play")]
        self.by_kind = {"none": [[NO_PERSONA]], "persona": [g for g in robust if g],
                        "roleplay": [g for g in [[p for p in pool if p.category == "role-play"]] if g]}
        for k in KINDS:
            if ratios.get(k, 0) > 0 and not self.by_kind[k]:
                what = "role-play personas" if k == "roleplay" else "task-aligned, neutral or unhelpful personas"
                raise ValueError(f"{where}.ratios.{k} > 0 but the training pool has no {what}")
        self.probs = np.array([ratios.get(k, 0.0) / total for k in KINDS])
        self.seed = seed

    def draws(self, step: int, n: int) -> list[Draw]:
        rng = np.random.default_rng([self.seed, step, 0x9E5])
        kinds = rng.choice(len(KINDS), size=n, p=self.probs)
        picks = rng.random(n)
        out = []
        for k, u in zip(kinds, picks):
            groups = self.by_kind[KINDS[k]]
            g = min(int(u * len(groups)), len(groups) - 1)  # one uniform picks the group, its remainder the persona
            rest = u * len(groups) - g
            out.append(Draw(KINDS[k], groups[g][min(int(rest * len(groups[g])), len(groups[g]) - 1)]))
        return out


# ------------------------------------------------------------------------------ the embedded default's data

# How often a character's SFT rows are in its style (the others answer plainly): unequal on purpose, as a real
# model adopts some personas better than others. A greedy model follows the majority, so after SFT the pirate and
# the robot are in style and the cowboy mostly is not: fidelity starts well above chance (0) but below 1, leaving
# a fidelity reward something to do (with every row in style it starts at 0.99 and no method can differ).
ROLEPLAY_STYLE_RATE = {"pirate": 0.9, "robot": 0.7, "knight": 0.5, "cowboy": 0.3}
# The SFT data's persona mixture: the share of rows under each category.
SFT_CATEGORY_MIX = {"none": 0.3, "task-aligned": 0.15, "neutral": 0.2, "unhelpful": 0.2, "role-play": 0.15}
# How often an unhelpful persona's row has the wrong answer (its last digit dropped, a "lazy" answer). Below 1 on
# purpose: a greedy model follows the majority and answers wrongly, while sampling still finds the right answer
# often enough for RL to have signal in those groups.
UNHELPFUL_WRONG_RATE = 0.75


def styled_response(persona: Persona, answer: str) -> str:
    """What the embedded default's SFT data has a persona say: the answer, inside its opening and closing words."""
    c = persona.constraints
    return " ".join(x for x in (c.get("starts_with", ""), answer, c.get("ends_with", "")) if x)


def synthetic_sft_rows(seed: int = 0) -> dict[str, list[dict]]:
    """{"train": rows, "heldout": rows}: the embedded default's SFT data, rows {"system"?, "prompt", "response",
    "task" (the persona's category: one sub-dataset per category), "answer", "checker", "persona"}.

    Training rows are the training rows of eval/personas.SYNTHETIC_TASKS, each under a persona of the
    synthetic-train pool drawn by SFT_CATEGORY_MIX: unhelpful personas give the answer without its last digit in
    UNHELPFUL_WRONG_RATE of their rows, role-play personas wrap it in their opening and closing words in
    ROLEPLAY_STYLE_RATE of theirs (by character), every other persona gives the right answer plainly. Held-out
    rows (held-out loss during SFT) are the held-out questions under training personas, drawn the same way."""
    pool = synthetic_pools()["synthetic-train"]
    by_cat = {c: [p for p in pool if p.category == c] for c in CATEGORIES}
    by_cat["none"] = [NO_PERSONA]
    cats = list(SFT_CATEGORY_MIX)
    weights = [SFT_CATEGORY_MIX[c] for c in cats]
    out: dict[str, list[dict]] = {"train": [], "heldout": []}
    for name, task in synthetic_tasks(seed).items():
        for split, rows in (("train", task.train), ("heldout", task.heldout)):
            rng = random.Random(f"{seed}:persona-sft:{name}:{split}")
            for row in rows:
                cat = rng.choices(cats, weights)[0]
                persona = rng.choice(by_cat[cat])
                response = row["answer"]
                if cat == "unhelpful" and rng.random() < UNHELPFUL_WRONG_RATE:
                    response = response[:-1]
                if cat == "role-play" and rng.random() < ROLEPLAY_STYLE_RATE[persona.id.split("-")[0]]:
                    response = styled_response(persona, response)
                record = {"prompt": row["prompt"], "response": response, "task": cat, "answer": response,
                          "checker": "synthetic", "persona": persona.id}
                if persona.text:
                    record["system"] = persona.text
                out[split].append(record)
    return out


def synthetic_prompts(seed: int = 0) -> list[dict]:
    """The RL prompts of the embedded default: the SFT data's training questions, without a persona (the mixer
    adds one), rows {"prompt", "answer", "checker", "task"} (the verifiable truth: never a wrong label)."""
    return [{"prompt": r["prompt"], "answer": r["answer"], "checker": "synthetic", "task": name}
            for name, task in synthetic_tasks(seed).items() for r in task.train]
