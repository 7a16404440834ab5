"""Where a run's numbers go: metrics.jsonl, TensorBoard and Weights & Biases, written by rank 0 only.

The contract (`MetricsLog`, opened by Runtime.resume with the `[log]` section):
  - `write(step, record)` appends {"step", **record} to <out_dir>/metrics.jsonl. Its numbers, flattened to slash
    names (`flatten_metrics`: {"eval": {"gsm8k": {"loss": x}}} -> "eval/gsm8k/loss", so evaluations are per task),
    go to TensorBoard and W&B at the same step under the same names; strings (a method's name) stay in the JSON line.
  - `event(step, name, **fields)` records something that happened rather than a measurement (mSFT's exclusions and
    roll-backs): {"step", "event": name, **fields} in metrics.jsonl, the fields as "<name>/<field>" in W&B (strings
    too) and TensorBoard (numbers; the whole event as text).
  - the run's whole config (core.config.flatten, as in checkpoints) is W&B's run config and TensorBoard's "config"
    text.
Steps are the runtime's global step, which only goes up, roll-backs included: W&B drops a step lower than one it
has, so nothing else may name the step.

W&B (`log.wandb = true`, `pip install 'posttrain[wandb]'`): one W&B run per runtime, named by its out_dir unless
`log.wandb_name` says otherwise (mSFT's methods are runs of their own under <out_dir>/<method>; `log.wandb_group`
groups them), its files under <out_dir>/wandb (`log.wandb_mode = "offline"` writes the run there without network;
`wandb sync` uploads it later). The run id is kept in <out_dir>/wandb_run_id, so a resumed run continues the same
W&B run; W&B keeps the first value of a step, so the steps an interrupted run logged after the checkpoint it resumes
from keep their first values there, while metrics.jsonl holds both. TensorBoard: <out_dir>/tb, when the tensorboard
package is installed and `log.tensorboard` is on.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WANDB_MODES = ("", "online", "offline", "disabled")


@dataclass
class LogConfig:
    tensorboard: bool = True  # <out_dir>/tb, when the tensorboard package is installed
    wandb: bool = False  # send the metrics to Weights & Biases too (pip install 'posttrain[wandb]')
    wandb_project: str = "posttrain"
    wandb_entity: str = ""  # default: the logged-in user's
    wandb_name: str = ""  # default: out_dir
    wandb_group: str = ""
    wandb_mode: str = ""  # "online" | "offline" | "disabled"; "": $WANDB_MODE, else online

    def __post_init__(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"log.wandb_mode: {self.wandb_mode!r} is not one of 'online', 'offline', 'disabled'")
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ValueError("log.wandb = true needs Weights & Biases: pip install 'posttrain[wandb]' (or pip "
                             "install wandb), or set log.wandb = false")


def flatten_metrics(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a record under slash names: {"eval": {"t": {"loss": 1.0}}, "lr": 0.1} -> {"eval/t/loss": 1.0,
    "lr": 0.1}. Strings, lists and None are left out."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(flatten_metrics(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[prefix + k] = v
    return out


class MetricsLog:
    """metrics.jsonl, TensorBoard and W&B for one run (see the module docstring); a no-op where not `enabled`
    (every rank but 0). `append` continues metrics.jsonl and the W&B run of a resumed run."""

    def __init__(self, out_dir: Path, enabled: bool, *, append: bool, cfg: LogConfig | None = None,
                 config: dict[str, Any] | None = None) -> None:
        cfg = cfg or LogConfig()
        self.enabled = enabled
        self.file = self.tb = self.wandb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "metrics.jsonl", "a" if append else "w")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                pass
            else:
                self.tb.add_text("config", json.dumps(config or {}, indent=1, default=str))
        if cfg.wandb:
            import wandb

            id_file = out_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if append and id_file.is_file() else secrets.token_hex(6)
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None,
                                    name=cfg.wandb_name or str(out_dir), group=cfg.wandb_group or None,
                                    dir=str(out_dir), id=run_id, resume="allow", mode=cfg.wandb_mode or None,
                                    config=config or {})

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        flat = flatten_metrics(record)
        if self.tb is not None:
            for k, v in flat.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def event(self, step: int, name: str, **fields: Any) -> None:
        """Something that happened at `step` (not a measurement): `fields` are numbers or strings."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "event": name, **fields}) + "\n")
        self.file.flush()
        named = {f"{name}/{k}": v for k, v in fields.items()}
        if self.tb is not None:
            self.tb.add_text(name, json.dumps(fields), step)
            for k, v in flatten_metrics(named).items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(named, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        self.file = self.tb = self.wandb = None
