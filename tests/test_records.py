"""core/records.py: Parquet files and `datasets` save_to_disk folders are data wherever JSONL is. GSM8K-, MATH- and
messages-shaped sources read through their layouts give the rows, tokens, losses and evaluations of the same rows
in JSONL; bad rows and missing columns are named by file, row and column; the tokenization cache keys on contents."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from posttrain.core import records  # noqa: E402
from posttrain.core.records import DataError, LAYOUTS, apply_layout, read_records  # noqa: E402
from posttrain.train.data import SFTData, data_digest, load_split_dir, mixture_cache_key, read_rows  # noqa: E402
from posttrain.train.synthetic import tiny_tokenizer  # noqa: E402
from tests.test_sft import REPO, SMALL  # noqa: E402

COLUMNS = {"gsm8k": "gsm8k", "math": "math", "chat": "messages"}
SEQ_LEN = 128


def gsm8k_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        rows.append({"question": f"{a} bags of {b}. Total?", "answer": f"{a}*{b}=<<{a}*{b}={a * b}>>{a * b}\n"
                                                                          f"#### {a * b:,}"})
    return rows


def math_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        rows.append({"problem": f"Compute ${a}+{b}$.", "solution": f"${a}+{b}=\\boxed{{{a + b}}}$",
                     "answer": str(a + b), "subject": "Algebra", "level": 1 + i % 5,
                     "unique_id": f"test/algebra/{i}.json"})
    return rows


def chat_rows(n: int, seed: int) -> list[dict]:
    """UltraChat's shape: a prompt column beside the messages, and a struct field ("name") most messages lack."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = f"echo {rng.randint(0, 999)}"
        user = {"role": "user", "content": q, **({"name": "ann"} if i % 3 == 0 else {})}
        rows.append({"prompt": q, "prompt_id": str(i), "messages": [user, {"role": "assistant", "content": q[5:]}]})
    return rows


SHAPES = {"gsm8k": gsm8k_rows, "math": math_rows, "chat": chat_rows}


def as_jsonl_row(task: str, row: dict) -> dict:
    """What a user converting by hand writes: the library's own keys."""
    if task == "gsm8k":
        return {"prompt": row["question"], "response": row["answer"],
                "answer": row["answer"].rsplit("####", 1)[1].strip().replace(",", "")}
    if task == "math":
        return {"prompt": row["problem"], "response": row["solution"], "answer": row["answer"]}
    return {"messages": row["messages"]}


def columns_of(rows: list[dict]) -> dict[str, list]:
    """Rows as columns, every key of any row a column (null where a row lacks it). pa.Table.from_pylist and
    datasets' from_list take the columns of the first row alone."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 7) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns_of(rows)), path, row_group_size=row_group_size)


def save_to_disk(path: Path, rows: list[dict], num_shards: int = 2) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict(columns_of(rows)).save_to_disk(str(path), num_shards=num_shards)


@pytest.fixture(scope="module")
def mixtures(tmp_path_factory):
    """The same rows as a JSONL mixture and as a tabular one: train/ in Parquet (several row groups), held-out as
    save_to_disk folders (2 shards) and, for math, a folder of Parquet shards."""
    root = tmp_path_factory.mktemp("mixtures")
    jsonl, tab = root / "jsonl", root / "tabular"
    for split, n, seed in (("train", 40, 0), ("heldout", 9, 1)):
        (jsonl / split).mkdir(parents=True)
        for task, make in SHAPES.items():
            rows = make(n, seed + 10 * len(task))
            (jsonl / split / f"{task}.jsonl").write_text("".join(json.dumps(as_jsonl_row(task, r)) + "\n"
                                                                for r in rows))
            if split == "train":
                write_parquet(tab / "train" / f"{task}.parquet", rows)
            elif task == "math":
                write_parquet(tab / "heldout" / "math" / "test-00000-of-00002.parquet", rows[:5])
                write_parquet(tab / "heldout" / "math" / "test-00001-of-00002.parquet", rows[5:])
            else:
                save_to_disk(tab / "heldout" / task, rows)
    return jsonl, tab


def test_tabular_sources_give_the_rows_and_tokens_of_the_same_rows_in_jsonl(mixtures):
    jsonl, tab = mixtures
    checkers = {"gsm8k": "math", "math": "math"}
    a_train, a_held = load_split_dir(jsonl, checkers=checkers)
    b_train, b_held = load_split_dir(tab, checkers=checkers, columns=COLUMNS)
    strip = lambda split: {t: [(r.task, r.messages, r.answer, r.checker) for r in rows]  # noqa: E731
                           for t, rows in split.items()}
    assert strip(a_train) == strip(b_train) and strip(a_held) == strip(b_held)
    assert sorted(b_train) == ["chat", "gsm8k", "math"] and len(b_held["gsm8k"]) == 9
    assert any(r.answer != r.messages[-1]["content"] and "," not in r.answer and int(r.answer) >= 1000
               for r in b_train["gsm8k"])  # "#### 1,234" -> "1234"
    # Rows are named by file and row index: the Parquet file's, the saved dataset's (across its two shards), a
    # shard's own.
    assert [r.where for r in b_train["gsm8k"]][-1] == f"{tab / 'train' / 'gsm8k.parquet'} row 39"
    assert [r.where for r in b_held["chat"]][-1] == f"{tab / 'heldout' / 'chat'} row 8"
    assert b_held["math"][5].where == f"{tab / 'heldout' / 'math' / 'test-00001-of-00002.parquet'} row 0"
    tok = tiny_tokenizer()
    a = SFTData(a_train, a_held, tok, seq_len=SEQ_LEN)
    b = SFTData(b_train, b_held, tok, seq_len=SEQ_LEN)
    for t in a.tasks:
        for x, y in ((a.train[t], b.train[t]), (a.heldout[t], b.heldout[t])):
            assert np.array_equal(x.ids, y.ids) and np.array_equal(x.loss, y.loss) and x.kept == y.kept
        assert a.heldout_examples(t) == b.heldout_examples(t)


def test_tabular_sources_train_and_evaluate_exactly_as_jsonl(tmp_path, mixtures):
    """SFT for 4 steps with held-out loss and generation (math checker) at the start and the end, on the JSONL
    mixture and on the Parquet / save_to_disk one (through the tokenization cache): the same metrics, bitwise."""
    jsonl, tab = mixtures
    flags = [*SMALL, f"--data.seq_len={SEQ_LEN}", "--data.max_tokens=512", "--train.max_steps=4",
             "--eval.generate=true", "--eval.at_start=true", "--eval.max_examples=3", f"--data.cache_dir={tmp_path}/c",
             '--data.checkers={gsm8k="math", math="math"}', "--checkpoint.export_hf=false"]
    columns = "--data.columns={" + ", ".join(f'{k}="{v}"' for k, v in COLUMNS.items()) + "}"
    code = f"""
from posttrain.core.config import parse_args
from posttrain.core.distributed import close_distributed
from posttrain.train.sft import SFTConfig, run
for name, extra in (("jsonl", []), ("tabular", [{columns!r}])):
    path = {str(jsonl)!r} if name == "jsonl" else {str(tab)!r}
    run(parse_args(SFTConfig, ["--config", "configs/tiny_sft.toml", f"--out_dir={tmp_path}/" + name,
                               f"--data.path=" + path, *{flags!r}, *extra]))
close_distributed()
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the torch fallback is fast on CPU
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("tokenized mixture written to") == 2  # each mixture went through the cache

    def metrics(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows]

    a, b = metrics("jsonl"), metrics("tabular")
    assert a == b
    assert [r["step"] for r in a if "loss" in r] == [1, 2, 3, 4]
    evals = [r["eval"] for r in a if "eval" in r]
    assert len(evals) == 2 and all(set(e) == {"chat", "gsm8k", "math"} for e in evals)
    assert all(set(e[t]) == {"loss", "accuracy"} for e in evals for t in e)


def test_the_gsm8k_layout_takes_the_gold_answer_evaluation_takes(tmp_path):
    """Over all 1,319 GSM8K test rows (eval/data), the layout's answer is eval.math500.gsm8k_gold's."""
    from posttrain.eval.math500 import gsm8k_gold, load_gsm8k

    rows = load_gsm8k()
    assert len(rows) == 1319
    for i, row in enumerate(rows):
        assert apply_layout(row, LAYOUTS["gsm8k"], f"gsm8k[{i}]")["answer"] == gsm8k_gold(row["answer"]), i


GOOD_GSM8K = {"question": "q", "answer": "a\n#### 3"}


@pytest.mark.parametrize("rows,lay,message", [
    ([{"question": "q", "solution": "s"}], "gsm8k",
     r"gsm8k.parquet: no column 'answer' \(layout 'gsm8k' reads it as 'response', in every row\); the columns are "
     r"\['question', 'solution'\]"),
    ([GOOD_GSM8K, GOOD_GSM8K, {"question": None, "answer": "a\n#### 3"}], "gsm8k",
     r"gsm8k.parquet row 2: column 'question' must be a string, got null"),
    ([GOOD_GSM8K, {"question": "q", "answer": "no marker here"}], "gsm8k",
     r"gsm8k.parquet row 1: column 'answer' has no final answer after '####'"),
    ([GOOD_GSM8K, {"question": "q", "answer": "a ####  "}], "gsm8k",
     r"gsm8k.parquet row 1: column 'answer' has no final answer after '####'"),
    ([{"problem": "p", "solution": "s", "answer": 3}], "math",
     r"gsm8k.parquet row 0: column 'answer' must be a string, got int"),
    ([{"problem": "p", "solution": "s", "answer": "3"}] * 3 + [{"problem": " ", "solution": "s", "answer": "3"}],
     "math", r"gsm8k.parquet row 3: column 'problem' is empty"),
    ([{"prompt": "p", "response": "r"}, {"prompt": "p", "response": None}], "",
     r"gsm8k.parquet row 1: missing key 'response'"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}], "messages",
     r"gsm8k.parquet row 0: messages\[1\] is missing key 'content'"),
    ([{"query": "p", "reply": 7}], {"prompt": "query", "response": "reply"},
     r"gsm8k.parquet row 0: column 'reply' must be a string, got int"),
])
def test_bad_rows_and_missing_columns_name_file_row_and_column(tmp_path, rows, lay, message):
    path = tmp_path / "gsm8k.parquet"
    write_parquet(path, rows)
    with pytest.raises(DataError, match=re.escape(str(tmp_path)) + "/" + message):
        read_rows(path, lay=records.layout(lay))


def test_row_numbers_run_across_batches_row_groups_and_shards(tmp_path, monkeypatch):
    """A bad row deep in a file is named by its index in the file (Parquet: across row groups and record batches) or
    in the dataset (save_to_disk: across shards), and every row before it was read."""
    monkeypatch.setattr(records, "BATCH_ROWS", 3)
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(23)]
    rows[17]["answer"] = "missing the marker"
    write_parquet(tmp_path / "g.parquet", rows, row_group_size=5)
    save_to_disk(tmp_path / "saved", rows, num_shards=3)
    for path in (tmp_path / "g.parquet", tmp_path / "saved"):
        seen = []
        with pytest.raises(DataError, match=rf"{re.escape(str(path))} row 17: column 'answer' has no final answer"):
            for i, where, row in read_records(path, LAYOUTS["gsm8k"]):
                seen.append((i, row["prompt"], row["answer"]))
        assert seen == [(i, f"q{i}", str(i)) for i in range(17)], path


def test_grpo_prompts_and_persona_pools_read_parquet_and_saved_datasets(tmp_path, mixtures):
    from posttrain.eval.personas import load_pool, pool_path, resolve_pool
    from posttrain.train.grpo import read_prompts

    jsonl, tab = mixtures
    a = read_prompts(jsonl / "train" / "gsm8k.jsonl", {"gsm8k": "math"})
    b = read_prompts(tab / "train" / "gsm8k.parquet", {"gsm8k": "math"}, columns="gsm8k")
    c = read_prompts(tab / "heldout" / "gsm8k", {"gsm8k": "math"}, columns="gsm8k")
    strip = lambda ps: [(p.task, p.messages, p.answer, p.checker) for p in ps]  # noqa: E731
    assert strip(a) == strip(b) and len(a) == 40 and strip(c) == strip(read_prompts(jsonl / "heldout" / "gsm8k.jsonl",
                                                                                       {"gsm8k": "math"}))
    # A pool's constraints differ per persona: as one Arrow struct column, each persona's missing ones are nulls.
    personas = [json.loads(line) for line in pool_path("math-eval").read_text().splitlines() if line.strip()]
    write_parquet(tmp_path / "pool.parquet", personas)
    save_to_disk(tmp_path / "pool", personas)
    want = load_pool(pool_path("math-eval"))
    assert any(p.constraints for p in want) and any(not p.constraints for p in want)
    assert resolve_pool(str(tmp_path / "pool.parquet")) == want
    assert load_pool(tmp_path / "pool") == want


def test_cache_key_follows_the_contents_of_every_shard_and_the_layouts(tmp_path, mixtures):
    import shutil

    _, tab = mixtures
    root = tmp_path / "tab"
    shutil.copytree(tab, root)
    tok = tiny_tokenizer()

    def key(columns=COLUMNS):
        return mixture_cache_key(root, tok, seq_len=SEQ_LEN, truncation="error", heldout_fraction=None, seed=0,
                                 checkers=None, columns=columns)

    first, digest = key(), data_digest(str(root), "default", 0)
    for f in root.rglob("*"):
        os.utime(f, (1, 1))  # dates are not contents
    assert key() == first
    assert key({**COLUMNS, "gsm8k": {"prompt": "question", "response": "answer"}}) != first
    shard = root / "heldout" / "chat" / "data-00001-of-00002.arrow"
    data = bytearray(shard.read_bytes())
    i = data.rindex(b"echo")  # in the last column, messages
    data[i:i + 4] = b"ECHO"  # same length: the Arrow stream stays valid, one row's text differs
    shard.write_bytes(bytes(data))
    assert key() != first and data_digest(str(root), "default", 0) != digest
    assert any(r.messages[0]["content"].startswith("ECHO") for r in load_split_dir(root, columns=COLUMNS)[1]["chat"])


def test_sources_that_cannot_be_read_are_named(tmp_path, mixtures, monkeypatch):
    _, tab = mixtures
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    d = datasets.Dataset.from_list(gsm8k_rows(4, 0))
    datasets.DatasetDict({"train": d, "test": d}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: a DatasetDict saved with save_to_disk \(splits \['train', 'test'\]\); "
                                        r"give one split's folder, e.g. .*dd/train"):
        list(read_records(tmp_path / "dd"))
    assert len(list(read_records(tmp_path / "dd" / "train", LAYOUTS["gsm8k"]))) == 4

    mix = tmp_path / "mix"
    (mix / "train").mkdir(parents=True)
    write_parquet(mix / "train" / "gsm8k.parquet", gsm8k_rows(4, 0))
    (mix / "train" / "gsm8k.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(DataError, match=r"gsm8k.jsonl and gsm8k.parquet both hold sub-dataset 'gsm8k'; keep one"):
        load_split_dir(mix, heldout_fraction=0.25, columns={"gsm8k": "gsm8k"})
    (mix / "train" / "gsm8k.jsonl").unlink()
    (mix / "train" / "notes").mkdir()
    with pytest.raises(DataError, match=r"notes: a folder that is neither a save_to_disk dataset"):
        load_split_dir(mix, heldout_fraction=0.25, columns={"gsm8k": "gsm8k"})
    (mix / "train" / "notes").rmdir()
    with pytest.raises(DataError, match=r"data.columns names sub-datasets \['gsm8kk'\]"):
        load_split_dir(mix, heldout_fraction=0.25, columns={"gsm8kk": "gsm8k"})
    with pytest.raises(DataError, match=r"unknown column layout 'gsm'; use one of gsm8k, math, messages"):
        records.layout("gsm")
    (mix / "train" / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable Parquet file"):
        load_split_dir(mix, heldout_fraction=0.25, columns={"gsm8k": "gsm8k"})

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"gsm8k.parquet: reading Parquet files and saved datasets needs pyarrow; "
                                        r"install it with pip install 'posttrain\[data\]'"):
        list(read_records(mix / "train" / "gsm8k.parquet"))


def test_a_data_config_checks_its_layouts():
    from posttrain.core.config import ConfigError, load_config
    from posttrain.train.sft import SFTConfig

    cfg = load_config(SFTConfig, overrides=['--data.columns={gsm8k="gsm8k", m={prompt="q", response="a"}}'])
    assert cfg.data.columns == {"gsm8k": "gsm8k", "m": {"prompt": "q", "response": "a"}}
    with pytest.raises(ConfigError, match=r"data.columns.m: layout 'custom': unknown row keys \['reply'\]"):
        load_config(SFTConfig, overrides=['--data.columns={m={prompt="q", reply="a"}}'])
