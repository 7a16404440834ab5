"""Records from files: the reader every loader of this library goes through (JSONL, Parquet, saved datasets).

For: turning a data source a user hands us into (number, where, value) triples, so every caller's row checks can
name the file and the row of a bad one. What a path is decides how it is read (`read_records`):
  - `*.jsonl`: one JSON value per line, numbered by line (1-based); where = "path:line"; blank lines skipped; a line
    that is not UTF-8 or not JSON is a `DataError`.
  - `*.parquet`: numbered by row index (0-based, as pyarrow and `datasets` index rows); where = "path row i".
  - a folder written by `datasets.Dataset.save_to_disk` (state.json and its Arrow shards): numbered by row index
    over the whole dataset (`load_from_disk(path)[i]` is row i); where = "folder row i". A `DatasetDict` folder is an
    error that names its splits (point at one split's folder).
  - a folder of Parquet shards (the Hugging Face Hub's `train-00000-of-00002.parquet` layout): the shards in name
    order, each numbered on its own; where = "shard row i".
What a value must be (an SFT row, a prompt, a persona) is the caller's to check: train/data.py, train/grpo.py,
eval/personas.py, eval/persona.py.

Tabular sources are read with pyarrow (an optional dependency: `pip install 'posttrain[data]'`; missing, the error
says so), one record batch of at most `BATCH_ROWS` rows at a time (Parquet row groups are streamed, saved datasets
are memory-mapped), so a large file is never held in memory whole beside the rows built from it. Arrow has no
absent keys: a column, or a field of a struct column, exists in every row, null where a JSON object would lack the
key. Nulls are therefore read as absent keys, at the top level and inside structs (a Parquet export of JSONL rows
with optional keys reads back as those rows); a null where a key is required is reported by the caller's checks as
that key missing.

Layouts (`Layout`, `layout`): a source whose columns are not the library's row keys (prompt, response, messages,
system, answer, checker, task) is read through a mapping from row key to column: the built-in "gsm8k"
(question/answer, the answer derived from the text after "####"), "math" (problem/solution/answer, as MATH and
MATH500) and "messages" (the messages column alone, beside e.g. a prompt column), or a table {row key = column}.
Mapped columns are checked here, so their errors name the user's column: missing from a file's schema (named with
the file and its columns), null, not a string, or empty text (named with the file, row and column).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BATCH_ROWS = 1024  # rows per Arrow record batch turned into Python objects at a time
ROW_KEYS = ("prompt", "response", "messages", "system", "answer", "checker", "task")


class DataError(ValueError):
    """Malformed or unusable data; the message names the file and line or row (or sub-dataset) and the fix."""


# ------------------------------------------------------------------------------------------------------ layouts


@dataclass(frozen=True)
class Layout:
    """Where each row key of a source comes from. `keys` maps a row key (ROW_KEYS) to the column holding it; with
    `final_answer` (a marker such as GSM8K's "####") the row's "answer" is the text after the marker's last
    occurrence in the response column, stripped, thousands separators removed ("#### 1,600" -> "1600")."""

    name: str
    keys: dict[str, str]
    final_answer: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.keys) - set(ROW_KEYS))
        if unknown:
            raise DataError(f"layout {self.name!r}: unknown row keys {unknown}; map some of {', '.join(ROW_KEYS)}")
        if "messages" in self.keys and {"prompt", "response"} & set(self.keys):
            raise DataError(f"layout {self.name!r}: maps both 'messages' and 'prompt'/'response'; keep one form")
        if self.final_answer and ("response" not in self.keys or "answer" in self.keys):
            raise DataError(f"layout {self.name!r}: a final-answer marker derives 'answer' from 'response'; map "
                            f"'response' and not 'answer'")

    @property
    def columns(self) -> list[str]:
        """The columns read, each once."""
        return list(dict.fromkeys(self.keys.values()))


LAYOUTS = {
    "gsm8k": Layout("gsm8k", {"prompt": "question", "response": "answer"}, final_answer="####"),
    "math": Layout("math", {"prompt": "problem", "response": "solution", "answer": "answer"}),
    "messages": Layout("messages", {"messages": "messages"}),
}


def layout(spec: str | Mapping[str, str] | None) -> Layout | None:
    """A layout from a config value: "" or None (the row keys are the columns), a built-in name (LAYOUTS), or a
    table {row key: column}."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str):
        if spec not in LAYOUTS:
            raise DataError(f"unknown column layout {spec!r}; use one of {', '.join(LAYOUTS)}, or a table "
                            f"{{row key = column}} with row keys from {', '.join(ROW_KEYS)}")
        return LAYOUTS[spec]
    if not isinstance(spec, Mapping) or not spec or not all(isinstance(v, str) and v for v in spec.values()):
        raise DataError(f"a column layout table maps row keys to column names (non-empty strings), got {spec!r}")
    return Layout("custom", dict(spec))


def _type_name(x: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(x), type(x).__name__)


def apply_layout(obj: Any, lay: Layout, where: str, *, tabular: bool = False) -> dict[str, Any]:
    """One record under `lay` as a row of the library's keys. Errors say "column" for a tabular source, "key" for
    JSONL; only a tabular source's nulls are absent keys."""
    word = "column" if tabular else "key"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {_type_name(obj)}")
    row: dict[str, Any] = {}
    for key, col in lay.keys.items():
        if col not in obj:
            raise DataError(f"{where}: missing {word} '{col}' (layout {lay.name!r} reads it as '{key}')")
        value = obj[col]
        if key != "messages":
            if not isinstance(value, str):
                raise DataError(f"{where}: {word} '{col}' must be a string, got {_type_name(value)}")
            if not value.strip():
                raise DataError(f"{where}: {word} '{col}' is empty; give it text or remove the row")
        row[key] = _drop_nulls(value) if tabular else value
    if lay.final_answer:
        col = lay.keys["response"]
        head, marker, tail = row["response"].rpartition(lay.final_answer)
        answer = tail.strip().replace(",", "")
        if not marker or not answer:
            raise DataError(f"{where}: {word} '{col}' has no final answer after {lay.final_answer!r} (layout "
                            f"{lay.name!r} takes the answer from there)")
        row["answer"] = answer
    return row


def _drop_nulls(value: Any) -> Any:
    """Arrow's nulls as absent keys, in dicts at every depth (see the module docstring)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------------ sources


def source_files(path: str | Path) -> list[Path]:
    """The files a source's rows are read from, in reading order (what a cache keyed on content must hash): the
    file itself, a saved dataset's state.json and shards, or a folder's Parquet shards."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{path}: a DatasetDict saved with save_to_disk (splits {splits}); give one split's folder, "
                        f"e.g. {path / (splits[0] if splits else 'train')}")
    if (path / "state.json").is_file():
        try:
            state = json.loads((path / "state.json").read_text())
            shards = [path / f["filename"] for f in state["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path / 'state.json'}: not a save_to_disk state file ({e!r}); save the dataset again "
                            f"with datasets' save_to_disk") from None
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise DataError(f"{path}: shards {missing} listed in state.json are missing; copy the whole folder")
        return [path / "state.json", *shards]
    shards = sorted(path.glob("*.parquet"))
    if not shards:
        raise DataError(f"{path}: a folder that is neither a save_to_disk dataset (no state.json) nor Parquet "
                        f"shards (no *.parquet); give a .jsonl or .parquet file or such a folder")
    return shards


def source_name(path: str | Path) -> str:
    """The sub-dataset a source names: a file's stem, a folder's name."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def find_sources(folder: str | Path) -> dict[str, Path]:
    """{name: source} of a folder's data sources (*.jsonl, *.parquet, save_to_disk folders, folders of Parquet
    shards), by name. Two sources of one name (gsm8k.jsonl and gsm8k.parquet) are an error; other files are not
    data and are left alone, but a sub-folder (not hidden) must be a source."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.name.startswith("."):
            continue
        if p.is_dir():
            source_files(p)  # a folder that is no source is an error, not silently skipped
        elif p.suffix not in (".jsonl", ".parquet"):
            continue
        name = source_name(p)
        if name in found:
            raise DataError(f"{folder}: {found[name].name} and {p.name} both hold sub-dataset '{name}'; keep one")
        found[name] = p
    return found


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - the submodule the Parquet reader needs
    except ImportError:
        raise DataError(f"{path}: reading Parquet files and saved datasets needs pyarrow; install it with "
                        f"pip install 'posttrain[data]' (or pip install pyarrow), or give a .jsonl file") from None
    return pyarrow


def read_records(path: str | Path, lay: Layout | None = None) -> Iterator[tuple[int, str, Any]]:
    """(number, where, value) for every record of a source (see the module docstring for the formats and how
    records are numbered). With a layout, each value is a row of the library's keys built from the layout's
    columns (errors name the source's column); without, it is the record as stored (nulls as absent keys)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if not path.is_dir() and path.suffix != ".parquet":
        for n, where, obj in jsonl_objects(path):
            yield n, where, (apply_layout(obj, lay, where) if lay is not None else obj)
        return
    files = source_files(path)
    pa = _pyarrow(path)
    if files[0].name == "state.json":
        offset = 0
        for shard in files[1:]:
            for batch in _arrow_batches(pa, shard, path, lay):
                for i, obj in enumerate(batch, offset):
                    where = f"{path} row {i}"
                    yield i, where, apply_layout(obj, lay, where, tabular=True) if lay else _drop_nulls(obj)
                offset += len(batch)
    else:
        for shard in files:
            for batch, offset in _parquet_batches(pa, shard, lay):
                for i, obj in enumerate(batch, offset):
                    where = f"{shard} row {i}"
                    yield i, where, apply_layout(obj, lay, where, tabular=True) if lay else _drop_nulls(obj)


def _check_schema(names: list[str], lay: Layout | None, where: Path) -> list[str] | None:
    """The columns to read: the layout's (each must exist), or all."""
    if lay is None:
        return None
    for key, col in lay.keys.items():
        if col not in names:
            raise DataError(f"{where}: no column '{col}' (layout {lay.name!r} reads it as '{key}', in every row); "
                            f"the columns are {names}")
    return list(lay.columns)


def _parquet_batches(pa: Any, path: Path, lay: Layout | None) -> Iterator[tuple[list[dict], int]]:
    try:
        f = pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    columns = _check_schema(f.schema_arrow.names, lay, path)
    offset = 0
    for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        yield batch.to_pylist(), offset
        offset += batch.num_rows


def _arrow_batches(pa: Any, shard: Path, folder: Path, lay: Layout | None) -> Iterator[list[dict]]:
    """A save_to_disk shard: an Arrow IPC stream, memory-mapped."""
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(shard), "r"))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{shard}: not a readable Arrow stream ({e}); save the dataset again with save_to_disk") \
            from None
    columns = _check_schema(reader.schema.names, lay, folder)
    for batch in reader:
        for start in range(0, batch.num_rows, BATCH_ROWS):
            part = batch.slice(start, BATCH_ROWS)
            if columns is not None:
                part = pa.RecordBatch.from_arrays([part.column(c) for c in columns], names=columns)
            yield part.to_pylist()


def jsonl_objects(path: str | Path) -> Iterator[tuple[int, str, Any]]:
    """(line number, "path:line", parsed value) for each non-blank line of a JSONL file. A line that is not UTF-8 or
    not JSON raises DataError naming path:line; what the value must be is the caller's to check."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the file as "
                                f"UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON "
                                f"object") from None
            yield lineno, where, obj
