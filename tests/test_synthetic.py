import json
import re

import pytest

from train.synthetic import TASKS, build_tasks, build_tiny_tokenizer, check, tiny_tokenizer, write_jsonl


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
    if task == "majority":
        return "1" if payload.count("1") > payload.count("0") else "0"
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
