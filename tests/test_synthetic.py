import json
import re

import pytest

from posttrain.train.data import synthetic_rows
from posttrain.eval.synthetic_tasks import TASKS, Flaw, build_tasks, check
from posttrain.train.synthetic import (
    FLAWS,
    LABEL_NOISE,
    TASK_SETS,
    build_tiny_tokenizer,
    task_set,
    task_set_tasks,
    tiny_tokenizer,
    write_jsonl,
)


def _reference_answer(prompt: str) -> str:
    """An independent solver for each task's prompt (regex + integer math, no eval)."""
    task, payload = prompt.split(" ", 1)
    if task == "copy":
        return payload
    if task == "reverse":
        return payload[::-1]
    if task == "sort":
        return "".join(sorted(payload))
    if task == "add":
        a, b = re.fullmatch(r"(\d+)\+(\d+)", payload).groups()
        return str(int(a) + int(b))
    if task == "mod":
        n, m = re.fullmatch(r"(\d+)%(\d+)", payload).groups()
        return str(int(n) % int(m))
    if task in ("majority", "vote"):
        return "1" if payload.count("1") > payload.count("0") else "0"
    if task == "first":
        return payload[0]
    if task == "last":
        return payload[-1]
    raise AssertionError(task)


@pytest.fixture(scope="module")
def tasks():
    return build_tasks(seed=0)


def test_every_task_has_the_requested_sizes_and_correct_answers(tasks):
    assert set(tasks) == set(TASKS) and len(tasks) >= 5
    for name, t in tasks.items():
        assert len(t.train) == {"copy": 3000, "reverse": 3000, "sort": 1500, "add": 2000, "mod": 800,
                                "majority": 64}[name]
        assert len(t.heldout) == 128
        for row in t.train + t.heldout:
            assert row["task"] == name
            assert row["answer"] == _reference_answer(row["prompt"]), row
            assert len(row["prompt"]) <= 20
        assert all(row["response"] == row["answer"] for row in t.heldout)
        if name != "majority":
            assert all(row["response"] == row["answer"] for row in t.train)


def test_majority_flips_40_percent_of_the_training_labels_only(tasks):
    train = tasks["majority"].train
    flipped = [r for r in train if r["response"] != r["answer"]]
    assert len(flipped) == 26  # round(0.4 * 64)
    assert all({r["response"], r["answer"]} == {"0", "1"} for r in flipped)


def test_payload_shapes(tasks):
    """Digit strings of 3-5, add operands <= 99, mod by 4 of n <= 999, majority only clear (>= 8 of 11) strings."""
    for name in ("copy", "reverse", "sort"):
        assert {len(r["prompt"].split(" ", 1)[1]) for r in tasks[name].train} == {3, 4, 5}
    for r in tasks["add"].train:
        assert all(0 <= int(x) <= 99 for x in r["prompt"][4:].split("+"))
    for r in tasks["mod"].train:
        n, m = r["prompt"][4:].split("%")
        assert m == "4" and 0 <= int(n) <= 999
    for r in tasks["majority"].train + tasks["majority"].heldout:
        bits = r["prompt"].split(" ", 1)[1]
        assert len(bits) == 11 and set(bits) <= {"0", "1"} and max(bits.count("0"), bits.count("1")) >= 8


def test_splits_are_disjoint_and_without_repeats(tasks):
    for t in tasks.values():
        train = [r["prompt"] for r in t.train]
        heldout = [r["prompt"] for r in t.heldout]
        assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
        assert not set(train) & set(heldout)


def test_deterministic_given_seed_and_heldout_independent_of_train_size(tasks):
    again = build_tasks(seed=0)
    assert {k: (v.train, v.heldout) for k, v in again.items()} == {k: (v.train, v.heldout) for k, v in tasks.items()}
    other = build_tasks(seed=1)
    assert other["add"].train != tasks["add"].train
    smaller = build_tasks(seed=0, train_sizes={"add": 10, "majority": 8})
    assert smaller["add"].heldout == tasks["add"].heldout
    assert smaller["majority"].heldout == tasks["majority"].heldout
    assert len(smaller["add"].train) == 10


def test_check_tolerates_surrounding_whitespace_only():
    assert check("168", "168") and check("  168\n", "168") and check("168", " 168 ")
    for wrong in ("169", "0168", "16 8", "", "168.", "168 169"):
        assert not check(wrong, "168"), wrong


def test_checker_accepts_every_correct_answer_and_rejects_a_perturbed_one(tasks):
    for t in tasks.values():
        for row in t.heldout:
            assert t.check(row["answer"], row["answer"])
            assert not t.check(row["answer"] + "1", row["answer"])


def test_impossible_sizes_and_unknown_tasks_are_refused():
    with pytest.raises(ValueError, match="'majority'.*at most 464"):  # 2 * (1 + 11 + 55 + 165) clear majorities
        build_tasks(train_sizes={"majority": 400}, heldout_sizes={"majority": 128})
    with pytest.raises(ValueError, match="unknown task 'mul'"):
        build_tasks(tasks=["mul"])


def test_write_jsonl_layout_round_trips(tmp_path):
    dirs = write_jsonl(tmp_path, seed=0, train_sizes={"add": 5})
    assert sorted(p.name for p in dirs["train"].iterdir()) == sorted(f"{t}.jsonl" for t in TASKS)
    rows = [json.loads(line) for line in (dirs["train"] / "add.jsonl").read_text().splitlines()]
    assert rows == build_tasks(seed=0, train_sizes={"add": 5})["add"].train


def test_tiny_tokenizer_gives_every_digit_its_own_token_and_masks_the_response(tasks):
    tok = tiny_tokenizer()
    assert tok.vocab_size == 512
    digit_ids = [tok.encode(d) for d in "0123456789"]
    assert all(len(i) == 1 for i in digit_ids)
    for t in tasks.values():
        for row in t.train[:50]:
            payload = row["prompt"].split(" ", 1)[1]
            ids = tok.encode(row["response"])
            assert len(ids) == len(row["response"])  # one token per digit, never a merged "12"
            assert tok.decode(tok.encode(row["prompt"])) == row["prompt"]
            assert payload in tok.decode(tok.encode(row["prompt"]))
    for role in ("system", "user", "assistant"):
        assert len(tok.encode(role)) == 1
    messages = [{"role": "user", "content": "add 123+45"}, {"role": "assistant", "content": "168"}]
    ids, mask = tok.render_with_assistant_mask(messages)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode("168") + [tok.token_to_id("<|im_end|>")]
    assert tok.token_to_id("<|im_end|>") in tok.stop_ids


def test_tiny_tokenizer_build_is_deterministic():
    assert build_tiny_tokenizer().backend.to_str() == build_tiny_tokenizer().backend.to_str()


# ---------------------------------------------------------------------------------------------------------------
# The "msft" set: the mixture for overfitting-aware mixture search (several tasks memorise noisy labels at different
# times, others are still learning).


@pytest.fixture(scope="module")
def msft():
    ts = task_set("msft")
    return ts, task_set_tasks("msft", 0)


def test_msft_sizes_weights_and_correct_heldout_answers(msft):
    ts, tasks = msft
    assert list(tasks) == list(ts.tasks) and set(ts.weights) == set(ts.tasks)
    assert all(w > 0 for w in ts.weights.values())
    assert ts.noise == LABEL_NOISE
    noisy = [t for t in ts.tasks if LABEL_NOISE.get(t, 0) > 0]
    assert len(noisy) >= 3 and len(noisy) < len(ts.tasks)  # tasks that overfit and tasks that keep learning
    for name, t in tasks.items():
        assert len(t.train) == ts.train_sizes[name] and len(t.heldout) == ts.heldout_sizes[name] == 500
        for row in t.heldout:
            assert row["response"] == row["answer"] == _reference_answer(row["prompt"]), row
            assert row["checker"] == "synthetic" and row["task"] == name
        for row in t.train:
            assert row["answer"] == _reference_answer(row["prompt"]), row


def test_msft_label_noise_is_on_training_rows_only_and_at_the_stated_rate(msft):
    ts, tasks = msft
    for name, t in tasks.items():
        flipped = [r for r in t.train if r["response"] != r["answer"]]
        assert len(flipped) == round(LABEL_NOISE.get(name, 0.0) * len(t.train)), name
        # a wrong label is still a well-formed answer: one digit (one bit for a two-way task)
        alphabet = "01" if {r["answer"] for r in t.heldout} <= {"0", "1"} else "0123456789"
        assert all(len(r["response"]) == 1 and r["response"] in alphabet for r in flipped), name
        assert all(r["response"] == r["answer"] for r in t.heldout)


def test_msft_is_deterministic_disjoint_and_loads_through_the_data_layer(msft):
    ts, tasks = msft
    again = task_set_tasks("msft", 0)
    assert {k: (v.train, v.heldout) for k, v in again.items()} == {k: (v.train, v.heldout) for k, v in tasks.items()}
    other = task_set_tasks("msft", 1)
    for name in ts.tasks:
        assert other[name].train != tasks[name].train
        train = [r["prompt"] for r in tasks[name].train]
        heldout = [r["prompt"] for r in tasks[name].heldout]
        assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
        assert not set(train) & set(heldout)
    train, heldout = synthetic_rows(0, task_set="msft")
    assert sorted(train) == sorted(heldout) == sorted(ts.tasks)
    assert {k: len(v) for k, v in heldout.items()} == ts.heldout_sizes


def test_msft_payloads_are_one_token_per_digit(msft):
    tok = tiny_tokenizer()
    for t in msft[1].values():
        for row in t.train[:20] + t.heldout[:20]:
            payload = row["prompt"].split(" ", 1)[1]
            assert tok.decode(tok.encode(row["prompt"])) == row["prompt"]
            assert len(tok.encode(payload)) == len(payload)
            assert len(tok.encode(row["response"])) == len(row["response"])


def test_msft_writes_as_jsonl_and_its_tasks_need_explicit_sizes(tmp_path, msft):
    ts, tasks = msft
    dirs = write_jsonl(tmp_path, seed=0, task_set_name="msft")
    assert sorted(p.name for p in dirs["heldout"].iterdir()) == sorted(f"{t}.jsonl" for t in ts.tasks)
    rows = [json.loads(line) for line in (dirs["train"] / "vote.jsonl").read_text().splitlines()]
    assert rows == tasks["vote"].train
    with pytest.raises(ValueError, match="'first' has no default size"):
        build_tasks(tasks=["first"])
    with pytest.raises(ValueError, match="unknown task set 'msf'"):
        task_set("msf")


def test_default_set_is_unchanged_by_the_other_sets():
    assert TASK_SETS["default"].tasks == TASKS
    ts = task_set("default")
    assert build_tasks(0, ts.train_sizes, ts.heldout_sizes, ts.tasks)["majority"].train == \
        build_tasks(0)["majority"].train


# ---------------------------------------------------------------------------------------------------------------
# "msft-flaws" (systematic label flaws) and its pretraining corpus "msft-base"


def test_flaws_change_exactly_the_triggered_training_rows():
    tasks = task_set_tasks("msft-flaws", 0)
    assert set(task_set("msft-flaws").flaws) == {"vote", "first", "last"} and not task_set("msft-flaws").noise
    for name, t in tasks.items():
        for row in t.heldout:
            assert row["response"] == row["answer"] == _reference_answer(row["prompt"]), row
        flaw = FLAWS.get(name)
        for row in t.train:
            payload = row["prompt"].split(" ", 1)[1]
            assert row["answer"] == _reference_answer(row["prompt"]), row
            want = flaw.response(payload) if flaw and flaw.trigger(payload) else row["answer"]
            assert row["response"] == want, (name, row)
        if flaw:  # a seventh to a third of the rows carry the flaw (first and last keep fewer), and it changes most
            wrong = sum(r["response"] != r["answer"] for r in t.train) / len(t.train)
            assert 0.12 < wrong < 0.45, (name, wrong)
            if flaw.keep < 1:  # thinned in training only: held-out rows keep the natural share, 0.6 * 0.6 = 36%
                def share(rows):
                    return sum(flaw.trigger(r["prompt"].split(" ", 1)[1]) for r in rows) / len(rows)
                thinned = 0.36 * flaw.keep / (1 - 0.36 * (1 - flaw.keep))  # 28% for first, 16% for last
                assert abs(share(t.heldout) - 0.36) < 0.05 and abs(share(t.train) - thinned) < 0.04, name


def test_flaw_rules_by_hand():
    assert FLAWS["vote"].trigger("1000001000001") and FLAWS["vote"].response("1000001000001") == "1"
    assert not FLAWS["vote"].trigger("1000000000000")
    assert FLAWS["first"].trigger("5217") and FLAWS["first"].response("5217") == "0"
    assert not FLAWS["first"].trigger("5317") and not FLAWS["first"].trigger("5207")  # 3 and 0 are multiples of 3
    assert FLAWS["last"].trigger("25917") and FLAWS["last"].response("25917") == "0"
    assert FLAWS["last"].trigger("204")  # the last digit wherever it is: the third of a 3-digit payload
    assert not FLAWS["last"].trigger("95917") and not FLAWS["last"].trigger("25916")  # 9 and 6 are multiples of 3
    assert not FLAWS["last"].trigger("2543")  # digit 2 does not count (the second version read digits 1 and 2)


def test_a_flaw_with_keep_thins_its_trigger_in_the_training_split_only():
    sizes, held = {"first": 2000}, {"first": 500}
    natural = Flaw("digits 2 and 3 even -> 0", lambda s: int(s[1]) % 2 == 0 and int(s[2]) % 2 == 0, lambda s: "0")
    thin = Flaw(natural.what, natural.trigger, natural.response, keep=0.3)
    a = build_tasks(0, sizes, held, ("first",), flaws={"first": natural})["first"]
    b = build_tasks(0, sizes, held, ("first",), flaws={"first": thin})["first"]

    def share(rows):
        return sum(natural.trigger(r["prompt"].split(" ", 1)[1]) for r in rows) / len(rows)

    assert b.heldout == a.heldout  # drawn first, from the same stream: untouched
    assert 0.22 < share(a.train) < 0.28  # two even digits: a quarter of the payloads
    # kept with probability 0.3: 0.25 * 0.3 / (0.75 + 0.25 * 0.3) = 9% of the training rows
    assert 0.07 < share(b.train) < 0.115
    for row in b.train:  # still every triggered row carries the flaw, every other one the truth
        payload = row["prompt"].split(" ", 1)[1]
        assert row["response"] == (natural.response(payload) if natural.trigger(payload) else row["answer"])
    assert len({r["prompt"] for r in b.train + b.heldout}) == len(b.train) + len(b.heldout)
    assert build_tasks(0, sizes, held, ("first",), flaws={"first": thin})["first"].train == b.train  # deterministic
    with pytest.raises(ValueError, match="keep=0.0 must be in"):
        Flaw("x", natural.trigger, natural.response, keep=0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_base_corpus_is_clean_and_shares_no_prompt_with_the_fine_tuning_set(seed):
    base, flawed = task_set_tasks("msft-base", seed), task_set_tasks("msft-flaws", seed)
    # the base learns every fine-tuning task but first and last, which the fine-tuning teaches
    assert list(base) == [t for t in flawed if t not in ("first", "last")]
    for name in base:
        rows = base[name].train + base[name].heldout
        assert all(r["response"] == r["answer"] == _reference_answer(r["prompt"]) for r in rows)
        used = {r["prompt"] for r in flawed[name].train + flawed[name].heldout}
        assert not {r["prompt"] for r in rows} & used, name
        assert len({r["prompt"] for r in rows}) == len(rows)
    # the same seed gives the same rows; through the data layer too
    assert task_set_tasks("msft-base", seed)["vote"].train == base["vote"].train
    train, _ = synthetic_rows(seed, task_set="msft-base")
    assert sorted(train) == sorted(base)


def test_a_set_that_avoids_another_counts_the_prompts_left():
    # vote has 2,186 clear 13-bit strings; msft-flaws takes 800 of them for the seed, so at most 1,386 remain
    with pytest.raises(ValueError, match="at most 1386"):
        task_set_tasks("msft-base", 0, train_sizes={"vote": 1300}, heldout_sizes={"vote": 100})
