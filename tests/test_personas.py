"""eval/personas.py: constraint checkers, strip_style, pool files and their errors, splits, the mixer, the
embedded default's persona data."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import pytest

from posttrain.eval.personas import (
    builtin_pools,
    CATEGORIES,
    check_constraints,
    fidelity,
    load_pool,
    NO_PERSONA,
    Persona,
    persona_row,
    pool_path,
    resolve_pool,
    strip_style,
    synthetic_pools,
    synthetic_questions,
)
from posttrain.train.persona_mix import (
    KINDS,
    PersonaMixer,
    ROLEPLAY_STYLE_RATE,
    SFT_CATEGORY_MIX,
    synthetic_prompts,
    synthetic_sft_rows,
    UNHELPFUL_WRONG_RATE,
)
from posttrain.eval.synthetic_tasks import check

PIRATE = Persona("p", "You are a pirate.", "role-play", {"starts_with": "Arr!", "ends_with": "matey"})


# ------------------------------------------------------------------------------------------------ constraints


@pytest.mark.parametrize("constraints, response, expected", [
    ({"starts_with": "Arr!"}, "  arr! the answer is 5", True),
    ({"starts_with": "Arr!"}, "The answer is 5. Arr!", False),
    ({"starts_with": "arr"}, "arrow 5", False),  # a longer word is not the phrase
    ({"starts_with": "arr"}, "arr, 5", True),
    ({"starts_with": "Arr!"}, "Arr, 5", True),  # the opening's own punctuation is free
    ({"ends_with": "matey"}, "5, Matey!!\n", True),
    ({"ends_with": "matey!"}, "5 matey", True),  # closing punctuation ignored on both sides
    ({"ends_with": "matey"}, "matey 5", False),
    ({"ends_with": "matey"}, "5 shipmatey", False),
    ({"contains": ["what a play", "folks"]}, "What a play, folks: 7", True),
    ({"contains": ["what a play", "folks"]}, "What a play: 7", False),
    ({"forbidden": ["my", "mine"]}, "This butler's answer is 7", True),
    ({"forbidden": ["my", "mine"]}, "My answer is 7", False),
    ({"forbidden": ["my"]}, "Myriad answers: 7", True),
    ({"casing": "upper"}, "THE ANSWER IS \\boxed{x^2} AND $\\frac{a}{b}$", True),
    ({"casing": "upper"}, "THE ANSWER is 5", False),
    ({"casing": "upper"}, "12345", False),  # no letters: no casing shown
    ({"casing": "lower"}, "the answer is \\Boxed{5}", True),
    ({"casing": "lower"}, "The answer is 5", False),
    ({"answer_format": r"\\boxed\{"}, "so \\boxed{5}", True),
    ({"answer_format": r"\\boxed\{"}, "so 5", False),
    ({"max_words": 3}, "one two  three\n", True),
    ({"max_words": 3}, "one two three four", False),
])
def test_each_constraint_on_a_positive_and_a_negative_example(constraints, response, expected):
    (key,) = constraints
    assert check_constraints(constraints, response) == {key: expected}


def test_fidelity_is_the_fraction_met_and_none_without_constraints():
    assert fidelity(PIRATE, "Arr! 5 matey") == 1.0
    assert fidelity(PIRATE, "Arr! 5") == 0.5
    assert fidelity(PIRATE, "5") == 0.0
    assert fidelity(Persona("c", "You are a chef.", "neutral"), "5") is None
    assert fidelity(NO_PERSONA, "5") is None


@pytest.mark.parametrize("response, expected", [
    ("Arr! 12705 matey", "12705"),
    ("arr, 12705, matey.", "12705"),
    ("Arr!\n-5 matey", "-5"),  # a sign is not a separator
    ("Arr! .5 matey", ".5"),
    ("12705 matey", "12705"),  # only what is there is removed
    ("Arr! 12705", "12705"),
    ("12705", "12705"),
    ("arrow 12705", "arrow 12705"),
])
def test_strip_style_leaves_the_answer(response, expected):
    assert strip_style(PIRATE, response) == expected


def test_strip_style_removes_catchphrases_and_leaves_unstyled_personas_alone():
    fan = Persona("f", "x", "role-play", {"contains": ["what a play"], "max_words": 9})
    assert strip_style(fan, "What a play! 42") == "42"
    assert strip_style(fan, "42, what a play") == "42"
    plain = Persona("c", "You are a chef.", "neutral")
    assert strip_style(plain, "  12705 matey ") == "  12705 matey "
    assert strip_style(Persona("u", "x", "role-play", {"casing": "upper"}), " ABC ") == " ABC "


def test_messages_put_the_persona_in_the_system_turn():
    assert PIRATE.messages("add 1+2") == [{"role": "system", "content": "You are a pirate."},
                                          {"role": "user", "content": "add 1+2"}]
    assert NO_PERSONA.messages("add 1+2") == [{"role": "user", "content": "add 1+2"}]


# ------------------------------------------------------------------------------------------------------ pools


def write(tmp_path, *rows):
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"id": "a", "text": "You are a chef.", "category": "neutral"}


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"pool.jsonl:2: invalid JSON"),
    ([1, 2], r"pool.jsonl:2: expected a JSON object"),
    ({"text": "x", "category": "neutral"}, r"pool.jsonl:2: missing key 'id'"),
    ({**GOOD, "id": "b", "category": "helpful"}, r"pool.jsonl:2: key 'category': 'helpful' is not one of"),
    ({**GOOD, "id": "b", "text": 3}, r"pool.jsonl:2: key 'text' must be a string"),
    ({**GOOD, "id": "b", "category": "none"}, r"pool.jsonl:2: key 'text' must be empty exactly when"),
    ({**GOOD, "id": "b", "constraints": {"start_with": "x"}},
     r"pool.jsonl:2: unknown constraint 'constraints.start_with' \(did you mean 'starts_with'\?\)"),
    ({**GOOD, "id": "b", "constraints": {"casing": "title"}}, r"pool.jsonl:2: key 'constraints.casing' must be"),
    ({**GOOD, "id": "b", "constraints": {"answer_format": "(("}}, r"invalid regular expression"),
    ({**GOOD, "id": "b", "constraints": {"max_words": True}}, r"key 'constraints.max_words' must be an integer"),
    ({**GOOD, "id": "b", "constraints": {"contains": []}}, r"key 'constraints.contains' must be a non-empty list"),
    ({**GOOD, "id": "b", "category": "role-play"}, r"pool.jsonl:2: key 'constraints': a role-play persona needs"),
    ({**GOOD, "id": "b", "txt": "x"}, r"pool.jsonl:2: unknown key 'txt' \(did you mean 'text'\?\)"),
    ({**GOOD, "text": "other"}, r"pool.jsonl:2: key 'id': duplicate id 'a' \(first at \S*pool.jsonl:1\)"),
])
def test_bad_pool_rows_name_file_line_and_key(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        load_pool(write(tmp_path, GOOD, bad))


def test_pool_round_trip_and_missing_or_empty_pools(tmp_path):
    rows = [GOOD, {"id": "none", "text": "", "category": "none"}, persona_row(PIRATE)]
    pool = load_pool(write(tmp_path, *rows, ""))
    assert [p.id for p in pool] == ["a", "none", "p"] and pool[2] == PIRATE
    assert resolve_pool(str(tmp_path / "pool.jsonl")) == pool
    with pytest.raises(ValueError, match="empty persona pool"):
        load_pool(write(tmp_path, ""))
    with pytest.raises(ValueError, match="no such persona pool file"):
        load_pool(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="not a built-in pool; the built-in pools are .*math-eval"):
        pool_path("math-evl")


def test_builtin_pools_load_and_train_eval_splits_are_disjoint():
    pools = {name: load_pool(pool_path(name)) for name in builtin_pools()}
    assert {"math-train", "math-eval", "personagym-eval", "synthetic-train", "synthetic-eval"} <= set(pools)
    for train, evaluation in (("math-train", "math-eval"), ("math-train", "personagym-eval"),
                              ("synthetic-train", "synthetic-eval")):
        a, b = pools[train], pools[evaluation]
        assert not {p.id for p in a} & {p.id for p in b}, (train, evaluation)
        assert not {p.text for p in a} & {p.text for p in b}, (train, evaluation)
        assert "none" not in {p.category for p in a}  # the mixer adds "no persona" itself
    for name in ("math-eval", "synthetic-eval"):  # every category in every evaluation pool
        assert {p.category for p in pools[name]} == set(CATEGORIES), name
    assert {p.category for p in pools["math-train"]} == set(CATEGORIES) - {"none"}
    assert len(pools["personagym-eval"]) == 100 and sum(p.category == "neutral" for p in pools["math-train"]) == 100
    gym_eval = {p.id for p in pools["personagym-eval"]}
    assert all(p.id in gym_eval for p in pools["math-eval"] if p.category == "neutral")


def test_synthetic_pool_files_are_what_the_generator_writes():
    """The files are generated (python -m posttrain.eval.personas --write-pools): they must not drift from the code."""
    for name, personas in synthetic_pools().items():
        assert load_pool(pool_path(name)) == personas, name


def test_synthetic_eval_personas_are_new_combinations_of_training_words():
    pools = synthetic_pools()
    train_words = {w for p in pools["synthetic-train"] for w in p.id.split("-")}
    for p in pools["synthetic-eval"][1:]:
        assert set(p.id.split("-")) <= train_words, p.id
    per_cat = Counter(p.category for p in pools["synthetic-eval"])
    assert per_cat == {"none": 1, "task-aligned": 8, "neutral": 8, "unhelpful": 8, "role-play": 8}


# ------------------------------------------------------------------------------------------------------ mixer


def test_mixer_ratios_within_sampling_error_and_reproducible():
    pool = load_pool(pool_path("synthetic-train"))
    ratios = {"none": 0.2, "persona": 0.5, "roleplay": 0.3}
    mixer = PersonaMixer(pool, ratios, seed=3)
    draws = [d for step in range(200) for d in mixer.draws(step, 64)]  # 12,800 draws
    n = len(draws)
    counts = Counter(d.kind for d in draws)
    for kind, p in ratios.items():
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts[kind] / n - p) < 4 * sigma, (kind, counts[kind] / n)
    assert all(d.persona is NO_PERSONA for d in draws if d.kind == "none")
    assert all(d.persona.category == "role-play" for d in draws if d.kind == "roleplay")
    assert all(d.persona.category in ("task-aligned", "neutral", "unhelpful") for d in draws if d.kind == "persona")
    # Uniform within a kind: every role-play persona drawn, none much more than its share.
    rp = Counter(d.persona.id for d in draws if d.kind == "roleplay")
    assert len(rp) == 24 and max(rp.values()) < 2 * counts["roleplay"] / 24
    # A pure function of (seed, step, n): the same on a second mixer, different for another step or seed.
    again = PersonaMixer(pool, ratios, seed=3)
    assert again.draws(7, 64) == mixer.draws(7, 64)
    assert mixer.draws(8, 64) != mixer.draws(7, 64)
    assert PersonaMixer(pool, ratios, seed=4).draws(7, 64) != mixer.draws(7, 64)
    # Within "persona" each category is equally likely whatever its size (math-train: 8, 100 and 10 personas).
    big = PersonaMixer(load_pool(pool_path("math-train")), {"persona": 1.0}, seed=0)
    cats = Counter(d.persona.category for step in range(50) for d in big.draws(step, 60))
    for c in ("task-aligned", "neutral", "unhelpful"):
        assert abs(cats[c] / 3000 - 1 / 3) < 4 * math.sqrt(2 / 9 / 3000), cats
    assert len({d.persona.id for step in range(50) for d in big.draws(step, 60)}) == 118  # and every persona
    # A zero ratio is never drawn.
    only = PersonaMixer(pool, {"persona": 1.0}, seed=0)
    assert {d.kind for d in only.draws(0, 500)} == {"persona"}


def test_mixer_rejects_bad_ratios_and_missing_personas():
    pool = load_pool(pool_path("synthetic-train"))
    with pytest.raises(ValueError, match=r"persona.ratios: unknown kind 'role-play'"):
        PersonaMixer(pool, {"role-play": 1.0}, seed=0)
    with pytest.raises(ValueError, match=r"persona.ratios.none must be >= 0"):
        PersonaMixer(pool, {"none": -1.0, "persona": 2.0}, seed=0)
    with pytest.raises(ValueError, match=r"at least one kind a positive ratio"):
        PersonaMixer(pool, {"none": 0.0}, seed=0)
    no_roleplay = [p for p in pool if p.category != "role-play"]
    with pytest.raises(ValueError, match=r"persona.ratios.roleplay > 0 but the training pool has no role-play"):
        PersonaMixer(no_roleplay, {"none": 1, "roleplay": 1}, seed=0)
    assert KINDS == ("none", "persona", "roleplay")


# -------------------------------------------------------------------------------------- the embedded default data


def test_synthetic_sft_rows_show_the_persona_behaviours():
    rows = synthetic_sft_rows(seed=0)
    train = rows["train"]
    by_cat = Counter(r["task"] for r in train)
    for cat, share in SFT_CATEGORY_MIX.items():
        p = share
        assert abs(by_cat[cat] / len(train) - p) < 4 * math.sqrt(p * (1 - p) / len(train)), cat
    pools = {p.id: p for p in synthetic_pools()["synthetic-train"]}
    truth = {q["prompt"]: q["answer"] for q in synthetic_prompts(0)}
    wrong = Counter()
    styled = defaultdict(list)
    for r in train:
        gold = truth[r["prompt"]]
        persona = pools.get(r["persona"], NO_PERSONA)
        assert r.get("system", "") == persona.text and persona.category == r["task"]
        answer = strip_style(persona, r["response"])
        if r["task"] == "unhelpful":
            wrong[answer != gold] += 1
            assert answer in (gold, gold[:-1])
        else:
            assert check(answer, gold), r
        if r["task"] == "role-play":  # all in style or all plain
            styled[persona.id.split("-")[0]].append(fidelity(persona, r["response"]))
    p = UNHELPFUL_WRONG_RATE
    n = sum(wrong.values())
    assert abs(wrong[True] / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    for character, p in ROLEPLAY_STYLE_RATE.items():
        fids = styled[character]
        assert set(fids) == {0.0, 1.0} and abs(sum(fids) / len(fids) - p) < 4 * math.sqrt(p * (1 - p) / len(fids))
    # Deterministic, and the held-out questions are never trained on.
    assert synthetic_sft_rows(seed=0) == rows
    questions = synthetic_questions(0)
    assert len(questions) == 3 * 64 and len({q["id"] for q in questions}) == len(questions)
    assert not {q["prompt"] for q in questions} & {r["prompt"] for r in train}
    assert {r["prompt"] for r in rows["heldout"]} == {q["prompt"] for q in questions}
    assert [q["prompt"] for q in synthetic_questions(0, per_task=2)] == [
        q["prompt"] for q in questions if int(q["id"].rsplit("-", 1)[1]) < 2]
    assert synthetic_questions(1) != questions
