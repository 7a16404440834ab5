"""train/metrics.py: W&B gets every number of metrics.jsonl under the same names and steps, the events and the run's
whole config; read back from the run directory W&B's offline mode writes (no network)."""

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.core.config import flatten
from posttrain.train.metrics import LogConfig, MetricsLog, flatten_metrics
from posttrain.train.sft import SFTConfig
from tests.test_sft import REPO, SMALL

BLOCK, HEADER = 32768, 7


def wandb_records(run_dir: Path) -> list:
    """The records of a W&B run's transaction log (<run_dir>/run-<id>.wandb): LevelDB's log format (32 KiB blocks of
    checksum u32, length u16, type u8 (1 full, 2 first, 3 middle, 4 last), data) after a 7-byte ":W&B" header, each
    record a wandb_internal_pb2.Record. Read here because wandb >= 0.20 no longer ships a Python reader."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    (path,) = glob.glob(str(run_dir / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    out, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's trailer: too short for a header
            pos += BLOCK - pos % BLOCK
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        parts += data[pos + HEADER:pos + HEADER + n]
        pos += HEADER + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
        elif kind == 0:  # zero padding
            parts = b""
    return out


def wandb_run(out_dir: Path) -> tuple[str, dict, dict[int, dict]]:
    """(run id, config, {step: {name: value}}) of the one offline run under out_dir/wandb; W&B's own keys (_step,
    _runtime, _timestamp) left out."""
    (run_dir,) = [Path(p) for p in glob.glob(str(out_dir / "wandb" / "offline-run-*"))]
    run_id, config, history = None, {}, {}
    for r in wandb_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config.update({c.key: json.loads(c.value_json) for c in r.run.config.update})
        elif kind == "config":
            config.update({c.key: json.loads(c.value_json) for c in r.config.update})
        elif kind == "history":
            row = history.setdefault(r.history.step.num, {})
            for item in r.history.item:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                if not key.startswith("_"):
                    row[key] = json.loads(item.value_json)
    config.pop("_wandb", None)
    return run_id, config, history


def jsonl_by_step(out_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as W&B should hold it: every number of each line at its step, an event's fields (strings too)
    as <event>/<field>."""
    by_step: dict[int, dict] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        step = rec.pop("step")
        if "event" in rec:
            name = rec.pop("event")
            flat = {f"{name}/{k}": v for k, v in rec.items()}
        else:
            flat = flatten_metrics(rec)
        by_step.setdefault(step, {}).update(flat)
    return by_step


def test_an_offline_wandb_run_of_sft_holds_every_metric_at_its_step_and_the_whole_config(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    flags = [*SMALL, "--train.max_steps=3", "--eval.generate=true", "--eval.at_start=true", "--eval.max_examples=2",
             "--checkpoint.export_hf=false", "--log.wandb=true", "--log.wandb_mode=offline", "--log.wandb_project=t"]
    cmd = [sys.executable, "-m", "posttrain.train.sft", "--config", str(REPO / "configs/tiny_sft.toml"),
           f"--out_dir={out}", *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WANDB_MODE")}
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id, config, history = wandb_run(out)
    want = jsonl_by_step(out)
    assert history == want
    assert sorted(want) == [0, 1, 2, 3] and "eval/copy/accuracy" in want[0] and "eval/majority/loss" in want[3]
    assert {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(want[2])
    assert run_id == (out / "wandb_run_id").read_text()
    cfg = SFTConfig()
    assert set(config) == set(flatten(cfg))  # every key of every section
    assert (config["train.max_steps"], config["log.wandb"], config["out_dir"]) == (3, True, str(out))
    assert config["model.hidden_size"] == 64 and config["data.seq_len"] == 64


def test_events_nested_evaluations_and_a_resumed_run(tmp_path):
    wandb = pytest.importorskip("wandb")
    cfg = LogConfig(wandb=True, wandb_mode="offline", wandb_project="t")
    log = MetricsLog(tmp_path, True, append=False, cfg=cfg, config={"a.b": 1, "c": "x"})
    log.write(0, {"epoch": 0.0, "eval": {"t1": {"loss": 2.5, "accuracy": 0.25}, "t2": {"loss": 1.0}}, "method": "m"})
    log.write(1, {"loss": 3.0, "grad_norm": 0.5, "skipped": False})
    log.write(1, {"epoch": 0.5, "eval": {"t1": {"loss": 2.0}}})
    log.event(1, "msft/exclude", stage=1, task="t2", peak_c=0.25)
    log.write(4, {"loss": 1.0})
    log.close()
    wandb.teardown()  # the run's file is complete once W&B's service stops (seen with wandb 0.31: after finish() it
    #                   holds its 7-byte header alone); a training process gets that at exit
    run_id, config, history = wandb_run(tmp_path)
    assert config == {"a.b": 1, "c": "x"}
    assert history == jsonl_by_step(tmp_path) == {
        0: {"epoch": 0.0, "eval/t1/loss": 2.5, "eval/t1/accuracy": 0.25, "eval/t2/loss": 1.0},
        1: {"loss": 3.0, "grad_norm": 0.5, "skipped": False, "epoch": 0.5, "eval/t1/loss": 2.0,
            "msft/exclude/stage": 1, "msft/exclude/task": "t2", "msft/exclude/peak_c": 0.25},
        4: {"loss": 1.0}}
    again = MetricsLog(tmp_path, True, append=True, cfg=cfg, config={"a.b": 1, "c": "x"})  # a resumed run
    again.close()
    runs = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs)  # the same W&B run continued
    fresh = MetricsLog(tmp_path / "fresh", True, append=False, cfg=cfg)
    fresh.close()
    assert (tmp_path / "fresh" / "wandb_run_id").read_text() != run_id


def test_log_config_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"log.wandb_mode: 'offlne' is not one of"):
        LogConfig(wandb_mode="offlne")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"log.wandb = true needs Weights & Biases: pip install 'posttrain\[wandb\]'"):
        LogConfig(wandb=True)
