"""Records from files: the JSONL reader every loader of this library goes through.

For: turning a file a user hands us into (line number, "path:line", parsed value) triples, so every caller's row
checks can name the file and line of a bad row. Blank lines are skipped; a line that is not UTF-8 or not JSON is a
`DataError` naming path:line and the fix. What a value must be (an SFT row, a prompt, a persona) is the caller's to
check: train/data.py, train/grpo.py, eval/personas.py, eval/persona.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Malformed or unusable data; the message names the file:line (or sub-dataset) and the fix."""


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
