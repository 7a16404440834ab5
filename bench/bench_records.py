"""Reading a sub-dataset from JSONL, Parquet and a save_to_disk folder: seconds and peak memory per format.

    python -m posttrain.bench.bench_records [--rows 200000] [--out bench_records.json]

Writes the same GSM8K-shaped rows (question / answer with "#### n") three ways, then reads each in a fresh process
through train/data.read_rows (the path SFT, mSFT and GRPO take: records -> layout -> row checks -> Row objects) and
reports wall time, peak resident memory above the process's memory before reading, what stays resident (the
rows), and the most memory Arrow held at once. Linux only (/proc/self). JSONL is the anchor: it holds
the rows once, as Python objects; a tabular reader that held the whole table beside them would show the table's size
on top. Needs pyarrow and datasets (for the save_to_disk folder).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

# Peak memory: Linux's high-water mark (VmHWM), reset after the imports (clear_refs 5), minus the memory then.
READ = """
import json, sys, time
from posttrain.core.records import layout
from posttrain.train.data import read_rows
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
t0 = time.perf_counter()
rows = read_rows(sys.argv[1], lay=layout(sys.argv[2]))
dt = time.perf_counter() - t0
arrow = 0.0
if "pyarrow" in sys.modules:  # the most Arrow memory live at once: one record batch, not the table
    import pyarrow
    arrow = pyarrow.default_memory_pool().max_memory() / 2**20
    pyarrow.default_memory_pool().release_unused()
print(json.dumps({"seconds": dt, "rows": sum(map(len, rows.values())), "peak_mib": (status("VmHWM") - base) / 1024,
                  "held_mib": (status("VmRSS") - base) / 1024, "arrow_peak_mib": arrow}))
"""


def make_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 99)
        rows.append({"question": f"A shop sells {a} pens a day for {b} days and {c} more on the last day. How many "
                                 f"pens does it sell in all?",
                     "answer": f"It sells {a}*{b}=<<{a}*{b}={a * b}>>{a * b} pens, then {c} more: "
                               f"{a * b}+{c}=<<{a * b}+{c}={a * b + c}>>{a * b + c}.\n#### {a * b + c:,}"})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--out", default="bench_records.json")
    args = p.parse_args()
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets.disable_progress_bars()
    rows = make_rows(args.rows)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open(tmp / "gsm8k.jsonl", "w") as f:
            for r in rows:
                gold = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
                f.write(json.dumps({"prompt": r["question"], "response": r["answer"], "answer": gold}) + "\n")
        table = pa.table({"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]})
        pq.write_table(table, tmp / "gsm8k.parquet")
        datasets.Dataset(table).save_to_disk(str(tmp / "saved"), num_shards=4)
        del rows, table
        cases = {"jsonl": (tmp / "gsm8k.jsonl", ""), "parquet": (tmp / "gsm8k.parquet", "gsm8k"),
                 "save_to_disk": (tmp / "saved", "gsm8k")}
        sizes = {"jsonl": (tmp / "gsm8k.jsonl").stat().st_size, "parquet": (tmp / "gsm8k.parquet").stat().st_size,
                 "save_to_disk": sum(f.stat().st_size for f in (tmp / "saved").glob("*.arrow"))}
        for name, (path, lay) in cases.items():
            out = subprocess.run([sys.executable, "-c", READ, str(path), lay], capture_output=True, text=True,
                                 check=True)
            results[name] = {**json.loads(out.stdout), "file_mib": sizes[name] / 2**20}
    print(f"{'format':>13} {'rows':>8} {'file MiB':>9} {'seconds':>8} {'rows/s':>9} {'peak MiB':>9} {'rows MiB':>9} "
          f"{'Arrow MiB':>10}")
    for name, r in results.items():
        print(f"{name:>13} {r['rows']:>8} {r['file_mib']:>9.1f} {r['seconds']:>8.2f} {r['rows'] / r['seconds']:>9,.0f} "
              f"{r['peak_mib']:>9.0f} {r['held_mib']:>9.0f} {r['arrow_peak_mib']:>10.1f}")
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
