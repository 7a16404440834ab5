"""The mSFT comparison: every method of `msft.methods` from the same θ0 at mSFT's tokens, per seed, and its report.

    python -m posttrain.train.msft --config configs/tiny_msft_pretrained.toml                 mSFT, then SFT
    python -m posttrain.train.msft --config configs/tiny_msft_pretrained.toml \
        --msft.methods='["msft", "sft", "early_stop", "sro", "temperature", "dynamix"]' --msft.seeds='[0, 1, 2]'

One comparison (`run_one`): with `msft.base_config`, a pretrained base is trained first into <out_dir>/base (kept and
reused); then mSFT (train/msft/method.py) sets the token budget, and each baseline (train/msft/baselines.py) runs at
it, one after another in this process; every method's best-overall snapshot is restored and scored. The report
(<out_dir>/report.json, a table, and msft.png: per-task held-out accuracy over compute with mSFT's exclusions and
roll-backs) also reads the SFT baseline's curves with `mixture_shape`: whether the mixture has what mSFT is built
for (at least three tasks that overfit at staggered times, a fall that lasts, and two still improving then).

With `msft.seeds` the comparison runs per seed (train.seed = data.seed = s, <out_dir>/seed<s>) and the mean ± std
over seeds is printed and written to <out_dir>/study.json. Results are keyed by a digest of the whole config and of
the rows the run reads (`study_key`): a seed or a method already finished with the same key is reused, so seeds can
run as separate processes first and a method can be added to a finished study. docs/msft.md has the studies.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from posttrain.core.config import flatten
from posttrain.train.data import data_digest
from posttrain.train.msft.baselines import (
    early_stop,
    run_dynamix,
    run_sft_budget,
    sro_rollout_peaks,
    temperature_mixture,
)
from posttrain.train.msft.method import METHODS, MSFTConfig, check_curves, close_run, open_run, peak_index, run_msft
from posttrain.train.runtime import entry_point, log, seed_config
from posttrain.train.sft import train_once

def run(cfg: MSFTConfig) -> dict[str, Any]:
    """One comparison (`run_one`), or one per seed of `msft.seeds` and their mean ± std (written to
    <out_dir>/study.json and printed)."""
    if not cfg.msft.seeds:
        return run_one(cfg)
    reports, shapes = {}, {}
    for seed in cfg.msft.seeds:
        sub = seed_config(cfg, seed, "msft")
        done = finished_report(sub)
        if done is not None:  # an interrupted study resumes; seeds may also run as separate processes first
            if is_main():
                print(f"seed {seed}: reusing {sub.out_dir}/report.json (same config)", flush=True)
        report = done or run_one(sub)
        reports[seed] = report["summary"]
        shapes[seed] = sft_shape(report.get("runs", {}))  # from the curves: reports from before it have them too
    study = aggregate(reports)
    if is_main():
        (Path(cfg.out_dir) / "study.json").write_text(json.dumps({"seeds": reports, "mean_std": study,
                                                                  "sft_shape": shapes}, indent=1))
        print(format_study(study, cfg.msft.seeds), flush=True)
        for seed, shape in shapes.items():
            if shape:
                print(f"seed {seed}, the SFT baseline's curves:\n{format_shape(shape)}", flush=True)
    return study


def is_main() -> bool:
    """Rank 0 (the process group may not exist yet when every seed's report is reused)."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


# Parameters only one method reads: another method's result does not depend on them.
METHOD_PARAMS = {"temperature": ("temperature",),
                 "dynamix": ("dynamix_every", "dynamix_eta", "dynamix_discount", "dynamix_prior_tau",
                             "dynamix_val_rows")}


def study_key(cfg: MSFTConfig, method: str | None = None) -> dict[str, Any]:
    """What makes two runs the same experiment: the whole config but where it writes (init.hf_checkpoint too when
    msft.base_config derives it from out_dir), and a digest of the rows it reads (train.data.data_digest). For one
    method's result (`method`), also not which methods or seeds the comparison has, nor the parameters only other
    methods read, so a comparison that adds a method (or changes τ) reuses the other methods' results."""
    skip = {"out_dir", "checkpoint.dir"} | ({"init.hf_checkpoint"} if cfg.msft.base_config else set())
    if method is not None:
        skip |= {"msft.methods", "msft.seeds"}
        skip |= {f"msft.{p}" for m, params in METHOD_PARAMS.items() if m != method for p in params}
    key = {k: v for k, v in flatten(cfg).items() if k not in skip}
    key["data.digest"] = data_digest(cfg.data.path, cfg.data.synthetic, cfg.data.seed)  # the rows, not their name
    return key


def saved_by(cfg: MSFTConfig, path: Path, method: str | None = None) -> dict[str, Any] | None:
    """The JSON at `path` when this exact config wrote it (its "key" is this config's study_key, of `method` for
    one method's result; a config change means a new run). Every rank reads it: out_dir must be visible to all of
    them, as it is on one node."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("key") == json.loads(json.dumps(study_key(cfg, method))) else None


def with_base(cfg: MSFTConfig, *, train: bool = True) -> MSFTConfig:
    """`cfg` starting from its pretrained base (msft.base_config): init.hf_checkpoint = <out_dir>/base/hf, which
    is trained first when missing (`train`), with the run's seeds. Unchanged without a base_config."""
    m = cfg.msft
    if not m.base_config:
        return cfg
    if cfg.init.hf_checkpoint:
        raise ValueError(f"msft.base_config ({m.base_config}) trains the base the run starts from; "
                         f"init.hf_checkpoint ({cfg.init.hf_checkpoint}) names another: give one of them")
    base = Path(cfg.out_dir) / "base"
    if train:
        train_once(m.base_config, [*m.base_overrides, f"--train.seed={cfg.train.seed}", f"--data.seed={cfg.data.seed}"],
                   base, who="msft")
    return replace(cfg, init=replace(cfg.init, hf_checkpoint=str(base / "hf")))


def finished_report(cfg: MSFTConfig) -> dict[str, Any] | None:
    """<out_dir>/report.json when it was written by this exact config (the base's path, which with_base derives
    from out_dir, is not in the key)."""
    return saved_by(cfg, Path(cfg.out_dir) / "report.json")


def aggregate(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """{method: {task or "average"/"tokens": (mean, std over seeds)}} from per-seed summaries."""
    out: dict[str, Any] = {}
    for method in next(iter(reports.values())):
        rows = [r[method] for r in reports.values()]
        keys = list(rows[0]["accuracy"])
        values = {k: [row["accuracy"][k] for row in rows] for k in keys}
        values["average"] = [row["average"] for row in rows]
        values["tokens"] = [row["tokens"] for row in rows]
        if all("lookahead" in row for row in rows):  # DynamixSFT's compute besides its training tokens
            values["lookahead_tokens"] = [row["lookahead"]["tokens"] for row in rows]
        out[method] = {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in values.items()}
    return out


def format_study(study: dict[str, Any], seeds: Sequence[int]) -> str:
    keys = [k for k in next(iter(study.values())) if k != "tokens"]
    head = f"{'method':<12}" + "".join(f"{k:>14}" for k in keys) + f"{'tokens':>16}"
    lines = [f"mean ± std over seeds {list(seeds)}", head, "-" * len(head)]
    for method, row in study.items():
        lines.append(f"{method:<12}" + "".join(f"{row[k][0]:>8.3f}±{row[k][1]:.3f}" for k in keys)
                     + f"{row['tokens'][0]:>16,.0f}")
    for method, row in study.items():
        if "lookahead_tokens" in row:
            lines.append(f"{method}: + {row['lookahead_tokens'][0]:,.0f} look-ahead tokens (mean), not in its tokens")
    return "\n".join(lines)


def run_one(cfg: MSFTConfig) -> dict[str, Any]:
    """Every method of `msft.methods` from the same θ0 (the base, with msft.base_config), one after another in
    this process; returns the report."""
    cfg = with_base(cfg)
    results: dict[str, dict[str, Any]] = {}
    out = Path(cfg.out_dir)
    budget: float | None = None  # the tokens mSFT spent: every other method's budget
    order = [m for m in METHODS if m in cfg.msft.methods]
    if "msft" not in order:
        raise ValueError("msft.methods must include 'msft': it sets the token budget of the others")
    if not cfg.eval.generate:
        raise ValueError("msft needs eval.generate = true: held-out accuracy picks every method's best-overall "
                         "snapshot (msft.signal = 'loss' changes only how peaks are read)")
    if cfg.msft.signal == "loss" and not cfg.eval.loss:
        raise ValueError("msft.signal = 'loss' reads held-out loss: set eval.loss = true")
    for method in order:
        if method == "early_stop":
            continue
        saved = saved_by(cfg, out / method / "result.json", method)
        if saved is not None:  # an interrupted comparison resumes after its last finished method
            results[method] = saved["result"]
            budget = saved["result"]["tokens"] if method == "msft" else budget
            if is_main():
                print(f"{method}: reusing {out / method / 'result.json'} (same config)", flush=True)
            continue
        if method == "sro":  # its roll-out first, so that two models are never held at once
            sro_peaks, rollout_tokens = sro_rollout_peaks(cfg)
        rt, loader, ring = open_run(cfg, method, temperature_mixture(cfg) if method == "temperature" else None)
        log(rt.d, f"=== {method} ===")
        if method == "msft":
            results[method] = run_msft(rt, loader, ring)
            budget = results[method]["tokens"]
        elif method == "sro":
            results[method] = run_sft_budget(rt, loader, ring, method, budget - rollout_tokens, exclude_at=sro_peaks)
            results[method].update(recorded_peaks=sro_peaks, rollout_tokens=rollout_tokens)
            results[method]["tokens"] += rollout_tokens
        elif method == "dynamix":
            results[method] = run_dynamix(rt, loader, ring, budget)
        else:
            results[method] = run_sft_budget(rt, loader, ring, method, budget)
        if method == "msft" and cfg.checkpoint.export_hf:
            rt.export(out / "hf")
        close_run(rt, loader, ring)
        if is_main():
            (out / method).mkdir(parents=True, exist_ok=True)
            (out / method / "result.json").write_text(json.dumps({"key": study_key(cfg, method),
                                                                  "result": results[method]}))
    if "early_stop" in cfg.msft.methods and "sft" in results:
        results["early_stop"] = early_stop(results["sft"])
    report = make_report(cfg, results)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        print(format_table(report), flush=True)
        if report["sft_shape"]:
            print(f"the SFT baseline's curves:\n{format_shape(report['sft_shape'])}", flush=True)
        plot(report, out / "msft.png")
    return report


# -------------------------------------------------------------------------------------------------------- report


def mixture_shape(points: Sequence[float], scores: dict[str, Sequence[float]], *, min_fall: float = 0.10,
                  min_gap: float = 0.5, min_after: int = 2, slack: float = 0.02) -> dict[str, Any]:
    """Whether a mixture gives mSFT something to find, read off one plain-SFT curve (points: epochs; scores[task]:
    held-out accuracy there). Per task: its peak (first argmax: epoch and score), the mean and the last of the
    evaluations after it, and whether it overfit: at least `min_after` evaluations follow the peak and they average
    at least `min_fall` below it (a fall that lasts, not one dip: a single evaluation after the peak cannot tell
    the two apart). Then "staggered": the most
    overfitting tasks whose peaks are pairwise at least `min_gap` epochs apart (earliest first; taking the earliest
    peak and then each next one far enough from the last taken is optimal), less `slack` because evaluation points
    are a little past each multiple of Δ; and "improving": the tasks whose own peak comes after the first overfit
    peak (still improving when the first task has overfitted). `meets` is the criterion the mSFT mixture was
    designed for: at least three staggered and at least two improving."""
    check_curves("mixture_shape", points, scores)
    if min_after < 1:
        raise ValueError(f"mixture_shape: min_after={min_after}: a fall needs at least one evaluation after the peak")
    tasks: dict[str, dict[str, Any]] = {}
    for task, s in scores.items():
        k = peak_index(s)
        after = list(s[k + 1:])
        mean_after = sum(after) / len(after) if after else None
        tasks[task] = {"peak_epoch": points[k], "peak": s[k], "mean_after": mean_after, "last": s[-1],
                       "overfit": len(after) >= min_after and s[k] - mean_after >= min_fall - 1e-9}
    staggered: list[str] = []
    for task in sorted((t for t in tasks if tasks[t]["overfit"]), key=lambda t: (tasks[t]["peak_epoch"], t)):
        if not staggered or tasks[task]["peak_epoch"] - tasks[staggered[-1]]["peak_epoch"] >= min_gap - slack:
            staggered.append(task)
    improving = [t for t in tasks if tasks[t]["peak_epoch"] > tasks[staggered[0]]["peak_epoch"]] if staggered else []
    return {"epochs": points[-1], "min_fall": min_fall, "min_gap": min_gap, "min_after": min_after, "tasks": tasks,
            "staggered": staggered, "improving": improving, "meets": len(staggered) >= 3 and len(improving) >= 2}


def format_shape(shape: dict[str, Any]) -> str:
    """Three lines: the curve's length, each task's peak and its fall, and the verdict."""
    parts = []
    for t, p in sorted(shape["tasks"].items(), key=lambda kv: (kv[1]["peak_epoch"], kv[0])):
        fall = f" -> {p['mean_after']:.2f}" if p["mean_after"] is not None else ""
        parts.append(f"{t} {p['peak']:.2f}@{p['peak_epoch']:.2f}{fall}{' overfit' if p['overfit'] else ''}")
    staggered = ", ".join(f"{t}@{shape['tasks'][t]['peak_epoch']:.2f}" for t in shape["staggered"]) or "none"
    return (f"  plain SFT of the whole mixture for {shape['epochs']:.2f} epochs\n"
            f"  peak@epoch -> mean after it: {'; '.join(parts)}\n"
            f"  overfit (>= {shape['min_after']} evaluations after the peak, averaging >= "
            f"{shape['min_fall']:.2f} below it) at times >= {shape['min_gap']} epoch "
            f"apart: {staggered}; still improving then: {len(shape['improving'])}; "
            f"{'meets' if shape['meets'] else 'misses'} the mSFT mixture criterion (3 staggered, 2 improving)")


def sft_shape(results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """mixture_shape of the SFT baseline's curve (plain SFT of the whole mixture), when it ran."""
    if "sft" not in results or not results["sft"]["curve"]:
        return None
    curve = results["sft"]["curve"]
    return mixture_shape([p["epoch"] for p in curve],
                         {t: [p["eval"][t]["accuracy"] for p in curve] for t in curve[0]["eval"]})


def make_report(cfg: MSFTConfig, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = {}
    for method, r in results.items():
        acc = r["selected"]["accuracy"]
        rows[method] = {"accuracy": acc, "average": sum(acc.values()) / len(acc), "overall": r["selected"]["overall"],
                        "tokens": r["tokens"], "flops": r["flops"]}
        if "lookahead" in r:  # compute spent besides the training tokens (DynamixSFT's probes)
            rows[method]["lookahead"] = {k: r["lookahead"][k] for k in ("tokens", "flops", "flops_vs_training")}
    return {"config": {"budget_epochs": cfg.msft.budget_epochs, "eval_every": cfg.msft.eval_every,
                       "signal": cfg.msft.signal, "margin": cfg.msft.margin, "min_fall": cfg.msft.min_fall,
                       "seed": cfg.train.seed, "init": cfg.init.hf_checkpoint or "random"},
            "key": study_key(cfg), "summary": rows, "sft_shape": sft_shape(results), "runs": results}


def format_table(report: dict[str, Any]) -> str:
    rows = report["summary"]
    tasks = list(next(iter(rows.values()))["accuracy"])
    head = f"{'method':<12}" + "".join(f"{t:>9}" for t in tasks) + f"{'average':>9}{'tokens':>12}"
    lines = [head, "-" * len(head)]
    for method, r in rows.items():
        lines.append(f"{method:<12}" + "".join(f"{r['accuracy'][t]:>9.3f}" for t in tasks)
                     + f"{r['average']:>9.3f}{r['tokens']:>12,.0f}")
    for method, r in rows.items():
        if "lookahead" in r:
            la = r["lookahead"]
            lines.append(f"{method}: + {la['tokens']:,.0f} look-ahead tokens, {la['flops']:.3g} FLOPs "
                         f"({la['flops_vs_training']:.0%} of its training FLOPs), not in its tokens")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Per-task held-out accuracy over compute (tokens), one panel per trained method; mSFT's exclusions and
    roll-backs marked. Needs matplotlib (pip install -e '.[plot]'); without it, says so and returns."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot at {path} (pip install -e '.[plot]')", flush=True)
        return
    runs = [r for r in report["runs"].values() if r["curve"]]
    bandits = [r for r in runs if r.get("bandit")]  # DynamixSFT: one more panel, its mixture weights
    panels = len(runs) + len(bandits)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], runs):
        tasks = list(r["curve"][0]["eval"])
        for i, t in enumerate(tasks):
            color = f"C{i}"
            segments: list[list[tuple[float, float]]] = [[]]
            for p in r["curve"]:
                if segments[-1] and p["c"] == 0.0 and p["stage"] > 1:
                    segments.append([])  # a new stage starts from the roll-back point
                segments[-1].append((p["tokens"], p["eval"][t]["accuracy"]))
            for k, seg in enumerate(segments):
                ax.plot(*zip(*seg), color=color, label=t if k == 0 else None, lw=1.4)
        for s in r.get("stages", []):
            if s["excluded"]:
                ax.axvline(s["tokens_end"], color="grey", ls=":", lw=0.8)
                ax.annotate(f"−{s['excluded']}", (s["tokens_end"], 1.0), fontsize=8, rotation=90, va="top")
        ax.set_title(f"{r['method']} (selected: overall {r['selected']['overall']:.3f})")
        ax.set_xlabel("tokens trained (discarded included)")
        ax.grid(alpha=0.3)
    for ax, r in zip(axes[0][len(runs):], bandits):
        points = r["bandit"]["trajectory"]
        for i, t in enumerate(points[0]["weights"]):
            ax.step([p["tokens"] for p in points] + [r["tokens"]],
                    [p["weights"][t] for p in points] + [points[-1]["weights"][t]], where="post", color=f"C{i}")
        ax.set_title(f"{r['method']}: mixture weights (bandit)")
        ax.set_xlabel("tokens trained")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return entry_point(run, MSFTConfig, argv)
