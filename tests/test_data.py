import json
import os
import re

import numpy as np
import pytest
import torch

from posttrain.train.data import (
    IGNORE_INDEX,
    DataError,
    MixtureSampler,
    SFTData,
    load_split_dir,
    read_rows,
    rows_from_records,
    synthetic_rows,
)
from posttrain.train.synthetic import tiny_tokenizer, write_jsonl

SIZES = {"copy": 60, "reverse": 40, "sort": 30, "add": 80, "mod": 20, "majority": 12}
HELDOUT = {"copy": 9, "reverse": 7, "sort": 5, "add": 13, "mod": 6, "majority": 4}
SEQ_LEN = 64
MAX_TOKENS = 4 * SEQ_LEN


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    train, heldout = synthetic_rows(0, SIZES, HELDOUT)
    return SFTData(train, heldout, tok, seq_len=SEQ_LEN)


def _documents(batch, b):
    """Split row b at position restarts: [(start, end)] of every document, padding included."""
    starts = torch.nonzero(batch.position_ids[b] == 0).flatten().tolist() + [batch.position_ids.shape[1]]
    return list(zip(starts[:-1], starts[1:]))


def _reference(tok, train_rows):
    """Rendered ids -> 0/1 assistant mask, straight from the tokenizer, for every training row."""
    ref = {}
    for rows in train_rows.values():
        for row in rows:
            ids, mask = tok.render_with_assistant_mask(row.messages)
            ref[tuple(ids)] = (mask, row.task)
    return ref


def test_packing_keeps_documents_whole_and_targets_on_response_tokens_only(tok, data):
    train, _ = synthetic_rows(0, SIZES, HELDOUT)
    ref = _reference(tok, train)
    im_end = tok.token_to_id("<|im_end|>")
    loader = data.loader(max_tokens=MAX_TOKENS, seed=3)
    seen_docs = 0
    for _ in range(12):
        batch = loader.next_batch()
        B, S = batch.input_ids.shape
        assert S == SEQ_LEN and B * S <= MAX_TOKENS
        assert batch.num_loss_tokens == int((batch.targets != IGNORE_INDEX).sum())
        for b in range(B):
            for a, e in _documents(batch, b):
                ids = batch.input_ids[b, a:e].tolist()
                assert batch.position_ids[b, a:e].tolist() == list(range(e - a))
                if batch.task_ids[b, a] == -1:  # trailing padding: a document of its own, never trained
                    assert a > 0 and e == S and set(ids) == {tok.pad_id}
                    assert (batch.targets[b, a:e] == IGNORE_INDEX).all() and (batch.task_ids[b, a:e] == -1).all()
                    continue
                mask, task = ref[tuple(ids)]  # KeyError: a document was cut or merged with another
                assert batch.tasks[int(batch.task_ids[b, a])] == task
                assert (batch.task_ids[b, a:e] == batch.task_ids[b, a]).all()
                expected = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
                assert batch.targets[b, a:e].tolist() == expected
                trained = [t for t in expected if t != IGNORE_INDEX]
                assert trained[-1] == im_end and trained.count(im_end) == 1  # the end-of-turn token is trained
                seen_docs += 1
    assert seen_docs > 50


def test_prompt_masking_on_multi_turn_messages_with_system(tok):
    rows = rows_from_records([{"task": "chat", "system": "You are a poet.", "messages": [
        {"role": "user", "content": "sort 321"}, {"role": "assistant", "content": "123"},
        {"role": "user", "content": "add 1+2"}, {"role": "assistant", "content": "3"}]}], "mem")
    data = SFTData(rows, rows, tok, seq_len=SEQ_LEN)
    batch = data.loader(max_tokens=SEQ_LEN, seed=0).next_batch()
    ids = batch.input_ids[0]
    assert tok.decode(ids[: batch.position_ids[0].tolist().index(0, 1)].tolist()).startswith(
        "<|im_start|>system\nYou are a poet.<|im_end|>\n<|im_start|>user\nsort 321")
    trained = batch.targets[0][batch.targets[0] != IGNORE_INDEX].tolist()
    assert tok.decode(trained) == "123<|im_end|>3<|im_end|>"
    # The target at t is the token at t+1: inputs just before trained tokens are the headers' last newline, etc.
    pos = torch.nonzero(batch.targets[0] != IGNORE_INDEX).flatten()
    assert batch.input_ids[0, pos + 1].tolist() == trained


def test_sampler_proportions_follow_sizes_and_explicit_weights():
    sizes = {"a": 100, "b": 300, "c": 600}
    for weights, expect in ((None, [0.1, 0.3, 0.6]), ({"a": 1, "b": 1, "c": 2}, [0.25, 0.25, 0.5])):
        s = MixtureSampler(sizes, seed=7, weights=weights)
        counts = np.bincount([s.next()[0] for _ in range(60_000)], minlength=3) / 60_000
        assert np.abs(counts - expect).max() < 0.01, counts  # 5 sigma for 60k draws


def test_sampler_visits_every_example_once_per_pass():
    s = MixtureSampler({"a": 50, "b": 70}, seed=1)
    draws = [s.next() for _ in range(2000)]
    for t, n in ((0, 50), (1, 70)):
        idx = [i for tt, i in draws if tt == t]
        for p in range(len(idx) // n):
            assert sorted(idx[p * n:(p + 1) * n]) == list(range(n))
        assert idx[:n] != idx[n:2 * n]  # a fresh shuffle each pass


def test_sampler_exclusion_is_immediate_deterministic_and_moves_progress_to_the_new_mixture():
    def run():
        s = MixtureSampler({"a": 100, "b": 300, "c": 600}, seed=5)
        first = [s.next() for _ in range(500)]
        assert s.progress == pytest.approx(0.5)
        s.exclude("c")
        second = [s.next() for _ in range(200)]
        return s, first, second

    s, first, second = run()
    assert any(t == 2 for t, _ in first) and all(t != 2 for t, _ in second)
    assert s.progress == pytest.approx(0.5 + 200 / 400)
    assert run()[1:] == (first, second)
    with pytest.raises(DataError, match="last active"):
        s.exclude("a"), s.exclude("b")


def test_sampler_state_round_trip_reproduces_the_continuation():
    a = MixtureSampler({"a": 10, "b": 37}, seed=2, weights={"a": 3, "b": 1})
    for _ in range(123):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))
    cont = [a.next() for _ in range(5000)]  # crosses several passes and uniform blocks
    b = MixtureSampler({"a": 10, "b": 37}, seed=2, weights={"a": 3, "b": 1})
    b.load_state_dict(state)
    assert [b.next() for _ in range(5000)] == cont
    with pytest.raises(DataError, match="seed"):
        MixtureSampler({"a": 10, "b": 37}, seed=3, weights={"a": 3, "b": 1}).load_state_dict(state)


def _same(x, y):
    return all(torch.equal(getattr(x, k), getattr(y, k)) for k in ("input_ids", "position_ids", "targets", "task_ids"))


def test_loader_resume_mid_epoch_and_after_exclusion_matches_an_uninterrupted_run(data):
    ref = data.loader(max_tokens=MAX_TOKENS, seed=11)
    first = [ref.next_batch() for _ in range(5)]
    ref.exclude("add")
    after = [ref.next_batch() for _ in range(6)]
    assert all((b.task_ids != data.tasks.index("add")).all() for b in after)

    run = data.loader(max_tokens=MAX_TOKENS, seed=11)
    for _ in range(3):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # mid-epoch; the document that closed batch 3 opens batch 4
    assert 0 < run.progress < 1
    resumed = data.loader(max_tokens=MAX_TOKENS, seed=11)
    resumed.load_state_dict(state)
    assert resumed.progress == run.progress
    got = [resumed.next_batch() for _ in range(2)]
    resumed.exclude("add")
    snapshot = resumed.state_dict()
    got += [resumed.next_batch() for _ in range(6)]
    assert all(_same(x, y) for x, y in zip(got, first[3:] + after))

    again = data.loader(max_tokens=MAX_TOKENS, seed=11)  # resuming after the exclusion keeps it
    again.load_state_dict(snapshot)
    assert again.active_tasks == [t for t in data.tasks if t != "add"]
    assert all(_same(again.next_batch(), y) for y in after)


def test_loader_progress_counts_epochs_and_no_document_is_lost_or_repeated_within_a_pass(data):
    loader = data.loader(max_tokens=MAX_TOKENS, seed=0)
    total, docs = sum(SIZES.values()), 0
    seen = {t: [] for t in data.tasks}
    while loader.progress < 3.0:
        batch = loader.next_batch()
        for b in range(batch.input_ids.shape[0]):
            for a, e in _documents(batch, b):
                if batch.task_ids[b, a] >= 0:
                    seen[batch.tasks[int(batch.task_ids[b, a])]].append(tuple(batch.input_ids[b, a:e].tolist()))
        docs += int(((batch.position_ids == 0) & (batch.task_ids >= 0)).sum())
        assert loader.progress == pytest.approx(docs / total)
    for t, split in data.train.items():
        first_pass = seen[t][: len(split)]
        assert len(first_pass) == len(split) and len(set(first_pass)) == len(split), t


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("prefetch", [False, True])
def test_ranks_get_disjoint_consecutive_micro_batches_of_one_global_stream(data, world_size, prefetch):
    """1, 2 and 3 ranks draw one global stream (rank r gets micro-batch r of each round), also with the
    background packer, across an exclusion (mSFT) and a resume from a saved state."""
    single = data.loader(max_tokens=MAX_TOKENS, seed=4)
    ranks = [data.loader(max_tokens=MAX_TOKENS, seed=4, rank=r, world_size=world_size, prefetch=prefetch)
             for r in range(world_size)]
    for k in range(8):
        if k == 3:
            for loader in (single, *ranks):
                loader.exclude("add")
        if k == 5:  # a restart from the saved position
            state = ranks[0].state_dict()
            for loader in ranks:
                loader.close()
            ranks = [data.loader(max_tokens=MAX_TOKENS, seed=4, rank=r, world_size=world_size, prefetch=prefetch)
                     for r in range(world_size)]
            for loader in ranks:
                loader.load_state_dict(state)
        mine = [r.next_batch() for r in ranks]
        for batch in mine:
            assert _same(batch, single.next_batch())
    assert all(r.state_dict() == single.state_dict() for r in ranks)
    for loader in ranks:
        loader.close()


def test_packing_work_per_rank_does_not_grow_with_world_size(data, monkeypatch):
    """Simulated world sizes 1, 8, 64: each rank tensorizes only its own micro-batch (one pack_rows call of its
    own documents per round); only the lengths-only global plan sees the other ranks' documents. Prints the
    measured time per round (the closing note's table)."""
    import time

    import posttrain.train.data as data_module
    packed = []
    real = data_module.pack_rows
    monkeypatch.setattr(data_module, "pack_rows", lambda rows, *a: packed.append(sum(map(len, rows))) or
                        real(rows, *a))
    times = {}
    for world_size in (1, 8, 64):
        loader = data.loader(max_tokens=MAX_TOKENS, seed=1, rank=world_size - 1, world_size=world_size)
        loader.next_batch()
        packed.clear()
        rounds = max(4, 128 // world_size)
        t0 = time.perf_counter()
        for _ in range(rounds):
            loader.next_batch()
        times[world_size] = (time.perf_counter() - t0) / rounds * 1e3
        assert len(packed) == rounds  # one tensorization per round: this rank's micro-batch only
        assert max(packed) <= 4 * SEQ_LEN  # ... holding at most its own micro-batch's documents
    print("ms per round, rank-local view:", {w: round(t, 3) for w, t in times.items()})


def test_row_checker_field_and_config_defaults(tmp_path, tok):
    root = tmp_path / "mix"
    (root / "train").mkdir(parents=True)
    (root / "heldout").mkdir()
    rows = [{"prompt": "2+2?", "response": "It is 4. #### 4", "answer": "4"},
            {"prompt": "Pick", "response": "B", "answer": "B", "checker": "choice"}]
    for split in ("train", "heldout"):
        (root / split / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, heldout = load_split_dir(root, checkers={"m": "math"})
    assert [r.checker for r in heldout["m"]] == ["math", "choice"]
    assert [r.answer for r in heldout["m"]] == ["4", "B"]
    data = SFTData(train, heldout, tok, seq_len=SEQ_LEN)
    assert [(e.checker, e.answer) for e in data.heldout_examples("m")] == [("math", "4"), ("choice", "B")]
    assert [r.checker for r in load_split_dir(root)[1]["m"]] == ["exact", "choice"]  # no default: exact
    with pytest.raises(DataError, match=r"data.checkers names sub-datasets \['n'\]"):
        load_split_dir(root, checkers={"n": "math"})


@pytest.mark.parametrize("row,checkers,message", [
    ({"prompt": "q", "response": "r", "checker": "regex"}, None, r"m.jsonl:2: unknown checker 'regex'"),
    ({"prompt": "q", "response": "r"}, {"m": "math"}, r"m.jsonl:2: checker 'math' needs an \"answer\" field"),
    ({"prompt": "q", "response": "r", "answer": "12", "checker": "choice"}, None,
     r"m.jsonl:2: checker 'choice' needs a single letter"),
    ({"prompt": "q", "response": "r", "checker": 3}, None, r"m.jsonl:2: key 'checker' must be a string"),
])
def test_bad_checker_rows_name_file_and_line(tmp_path, row, checkers, message):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"prompt": "ok", "response": "fine", "answer": "A"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        read_rows(f, checkers)


def test_tokenization_cache_round_trip_and_key(tmp_path, tok):
    from posttrain.train.data import mixture_cache_key

    write_jsonl(tmp_path / "mix", seed=0, train_sizes=SIZES, heldout_sizes=HELDOUT)
    root = tmp_path / "mix"
    built = SFTData.from_dir(root, tok, seq_len=SEQ_LEN)
    key = mixture_cache_key(root, tok, seq_len=SEQ_LEN, truncation="error", heldout_fraction=None, seed=0,
                            checkers=None)
    built.save_cache(tmp_path / "cache" / key)
    built.save_cache(tmp_path / "cache" / key)  # a second writer finds it there and leaves it
    loaded = SFTData.load_cache(tmp_path / "cache" / key)
    assert loaded.tasks == built.tasks
    for name in built.tasks:
        for a, b in ((built.train[name], loaded.train[name]), (built.heldout[name], loaded.heldout[name])):
            assert np.array_equal(a.ids, b.ids) and np.array_equal(a.loss, b.loss)
            assert np.array_equal(a.offsets, b.offsets) and a.kept == b.kept
        assert built.heldout_examples(name) == loaded.heldout_examples(name)
    a, b = built.loader(max_tokens=MAX_TOKENS, seed=2), loaded.loader(max_tokens=MAX_TOKENS, seed=2)
    assert all(_same(a.next_batch(), b.next_batch()) for _ in range(3))

    def key_of(**kw):
        args = dict(seq_len=SEQ_LEN, truncation="error", heldout_fraction=None, seed=0, checkers=None) | kw
        return mixture_cache_key(root, tok, **args)

    f = root / "train" / "copy.jsonl"
    os.utime(f, (1, 1))  # a new date alone keeps the key: it is the content that counts
    assert key_of() == key
    assert len({key, key_of(seq_len=128), key_of(checkers={"copy": "exact"}), key_of(truncation="drop")}) == 4
    f.write_text(f.read_text().replace("copy", "copy ", 1))
    assert key_of() != key


def test_heldout_batches_cover_each_document_once_in_order_with_equal_counts_per_rank(tok, data):
    _, heldout = synthetic_rows(0, SIZES, HELDOUT)
    expected = [tok.render_with_assistant_mask(r.messages)[0] for r in heldout["add"]]
    per_rank = [list(data.heldout_batches("add", max_tokens=2 * SEQ_LEN, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    interleaved = [b for pair in zip(*per_rank) for b in pair]
    docs = [batch.input_ids[b, a:e].tolist() for batch in interleaved for b in range(batch.input_ids.shape[0])
            for a, e in _documents(batch, b) if batch.task_ids[b, a] >= 0]
    assert docs == expected
    assert interleaved[-1].num_loss_tokens == 0  # 13 documents, 3 per row, 2 rows per batch: 3 batches, so rank 1 pads
    assert (interleaved[-1].task_ids == -1).all()
    examples = data.heldout_examples("add")
    assert [e.answer for e in examples] == [r.answer for r in heldout["add"]]
    assert examples[0].prompt == heldout["add"][0].messages[:-1]


def test_jsonl_path_gives_the_same_tokens_as_the_in_memory_path(tmp_path, tok, data):
    write_jsonl(tmp_path, seed=0, train_sizes=SIZES, heldout_sizes=HELDOUT)
    from_files = SFTData.from_dir(tmp_path, tok, seq_len=SEQ_LEN)
    assert from_files.tasks == data.tasks
    for t in data.tasks:
        assert np.array_equal(from_files.train[t].ids, data.train[t].ids)
        assert np.array_equal(from_files.train[t].loss, data.train[t].loss)


def test_truncation_policies(tmp_path, tok):
    long_prompt = "sort " + "9" * 40
    rows = {"t": [{"prompt": "add 1+2", "response": "3"}, {"prompt": long_prompt, "response": "1"},
                  {"prompt": "copy 1", "response": "1" * 40}]}
    (tmp_path / "train").mkdir()
    (tmp_path / "heldout").mkdir()
    for split in ("train", "heldout"):
        (tmp_path / split / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows["t"]))
    where = tmp_path / "train" / "t.jsonl"
    with pytest.raises(DataError, match=rf"{re.escape(str(where))}:2: .* renders to \d+ tokens, more than seq_len=32"):
        SFTData.from_dir(tmp_path, tok, seq_len=32)
    dropped = SFTData.from_dir(tmp_path, tok, seq_len=32, truncation="drop")
    assert len(dropped.train["t"]) == 1 and dropped.train["t"].dropped == 2
    cut = SFTData.from_dir(tmp_path, tok, seq_len=32, truncation="truncate_left_prompt")
    split = cut.train["t"]
    assert (len(split), split.truncated, split.dropped) == (2, 1, 1)  # the long response cannot fit: dropped
    ids, loss = split.doc(1)
    full_ids, full_mask = tok.render_with_assistant_mask([{"role": "user", "content": long_prompt},
                                                          {"role": "assistant", "content": "1"}])
    assert len(ids) == 32 and ids.tolist() == full_ids[-32:] and loss.tolist() == [bool(m) for m in full_mask[-32:]]
    assert "1 truncated, 1 dropped" in cut.report()
    with pytest.raises(DataError, match="'t': all 3 train rows"):
        SFTData.from_dir(tmp_path, tok, seq_len=8, truncation="drop")


BAD_ROWS = [
    ('{"prompt": "a", "response": "b"', "invalid JSON"),
    ('{"prompt": "a"}', "missing key 'response'"),
    ('{"prompt": "a", "response": 3}', "key 'response' must be a string, got int"),
    ('{"prompt": "a", "response": "  "}', "empty response"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages\\[0\\] has unknown role 'bot'"),
    ('{"messages": [{"role": "assistant", "content": ""}]}', "empty response"),
    ('{"messages": [{"role": "assistant"}]}', "messages\\[0\\] is missing key 'content'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "last message must be the assistant's"),
    ('{"messages": "hi"}', "'messages' must be a non-empty array, got string"),
    ('{"prompt": "a", "response": "b", "system": null}', "key 'system' must be a string, got null"),
    ('[1, 2]', "expected a JSON object per line, got array"),
]


@pytest.mark.parametrize("line,message", BAD_ROWS)
def test_malformed_rows_name_file_line_and_problem(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text('{"prompt": "ok", "response": "fine"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: .*{message}"):
        read_rows(path)


def test_empty_sub_dataset_and_missing_heldout_are_named(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "quiet.jsonl").write_text("\n")
    with pytest.raises(DataError, match="sub-dataset 'quiet' is empty"):
        load_split_dir(tmp_path)
    (tmp_path / "train" / "quiet.jsonl").write_text('{"prompt": "a", "response": "b"}\n' * 4)
    with pytest.raises(DataError, match="heldout: missing"):
        load_split_dir(tmp_path)
    train, heldout = load_split_dir(tmp_path, heldout_fraction=0.25)
    assert (len(train["quiet"]), len(heldout["quiet"])) == (3, 1)


def test_task_field_groups_rows_of_one_file_into_sub_datasets(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "a", "response": "b", "task": "x"}\n{"prompt": "c", "response": "d"}\n')
    groups = read_rows(path)
    assert {k: [r.where for r in v] for k, v in groups.items()} == {"x": [f"{path}:1"], "mixed": [f"{path}:2"]}
