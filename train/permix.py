"""PerMix-RLVR against plain RLVR from one SFT checkpoint, evaluated for persona stability and fidelity.

    python -m posttrain.train.permix --config configs/tiny_permix.toml                          the embedded default
    python -m posttrain.train.permix --config configs/tiny_permix.toml --permix.seeds='[0, 1, 2]'   per seed, mean ± std

One comparison (`run_one`), top to bottom:
  1. data     the embedded default's persona data (train/persona_mix.py), written under <out_dir>/data: SFT rows in
              which personas change behaviour (unhelpful personas mostly answer wrongly, role-play personas wrap
              the answer in their opening and closing words), one sub-dataset per persona category, and the RL
              prompts (the same training questions without personas).
  2. SFT      `permix.sft_config` on those rows (train/sft.py), into <out_dir>/sft; skipped when <out_dir>/sft/hf
              exists (delete it to retrain).
  3. RLVR     GRPO (train/grpo.py, this config's [grpo]) from the SFT weights with persona.mode = "none": the
              prompts as they are, reward = correctness. Into <out_dir>/rlvr.
  4. PerMix   the same GRPO run with persona.mode = "permix": each prompt under no persona / a training persona /
              a role-play persona by persona.ratios, reward = correctness + persona.fidelity_weight * fidelity.
              Into <out_dir>/permix. Same steps, prompts, seeds and budget as RLVR; only the personas differ.
  5. eval     each of SFT, RLVR and PerMix under every persona of `permix.eval_pool` (personas no training run
              saw) on the held-out questions, greedy (eval/persona.persona_benchmark): PSS, mean / worst accuracy,
              spread, fidelity; a table, <out_dir>/report.json and <out_dir>/permix.png (with matplotlib).

Design of the embedded default (the phenomenon first, then the methods):
  - Personas are "You are a(n) <adjective> <role>." for task-aligned, neutral and unhelpful ones, and "You are a(n)
    <character> <role>. Start with <w1> and end with <w2>." for role-play (eval/personas.synthetic_pools). A model
    trained from scratch can only generalise from words it has seen, so the 33 evaluation personas are held-out
    combinations of the training personas' words: behaviour must follow the adjective or the character, not the
    memorised sentence.
  - SFT data: unhelpful personas drop the answer's last digit in 75% of their rows, role-play personas answer in
    style in 90/70/50/30% of their rows (pirate/robot/knight/cowboy), everyone else answers correctly. After SFT a
    greedy model is wrong under every unhelpful persona (accuracy ~0.07) and in style for some characters only
    (fidelity ~0.6), while sampling still finds right and styled answers often enough for RL to have signal.
  - PSS counts a question only if every evaluation persona gets it right (eval/persona.py), so one unhelpful
    persona that breaks the model sets it to 0; the pool holds 8 personas per category plus no persona, so no
    category dominates the mean.
  - Both RL runs: 40 steps x 32 prompts x 8 samples from the same SFT weights, the same prompts and seeds. PerMix's
    ratios (persona.ratios) are none 0.25 / persona 0.5 / role-play 0.25: robustness is what plain RLVR never
    sees, so half the prompts carry a (task-aligned, neutral or unhelpful) persona; a quarter stay plain so the
    no-persona accuracy keeps its share of the signal; a quarter are role-play, so fidelity is rewarded about as
    often as unhelpful personas are met. fidelity_weight 1: a styled correct answer earns 2, an unstyled one 1.

Measured over 3 seeds (docs/permix.md has the table and the command): PSS 0.003 / 0.014 / 0.215 and fidelity
0.599 / 0.554 / 0.902 for SFT / RLVR / PerMix; the fidelity reward costs accuracy under role-play personas.

With `permix.seeds` the comparison runs once per seed (train.seed = data.seed = s, <out_dir>/seed<s>) and the
table shows mean ± std over seeds (<out_dir>/study.json). The SFT data, the RL prompts' order and the persona draws
all follow the seed.

Not here: personas (eval/personas.py) and their training data (train/persona_mix.py), the GRPO trainer and its
[persona] section (train/grpo.py), the evaluation (eval/persona.py).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.eval.persona import format_table, load_model, persona_benchmark, plot
from posttrain.eval.personas import resolve_pool, synthetic_questions
from posttrain.train.grpo import GRPOConfig, run as run_grpo
from posttrain.train.persona_mix import synthetic_prompts, synthetic_sft_rows
from posttrain.train.runtime import entry_point, seed_config
from posttrain.train.sft import train_once

METHODS = ("sft", "rlvr", "permix")
LABELS = {"sft": "SFT", "rlvr": "RLVR", "permix": "PerMix"}
# The summary numbers the table and the seed study report, from each method's persona benchmark.
SUMMARY = ("pss", "mean", "worst", "spread", "fidelity", "unhelpful", "role-play")  # the last two: accuracy


@dataclass
class PerMixSection:
    sft_config: str = "configs/tiny_permix_sft.toml"  # the SFT stage (its data.path and out_dir are set here)
    sft_overrides: list[str] = field(default_factory=list)  # its --section.key=value flags
    eval_pool: str = "synthetic-eval"  # evaluation personas (disjoint from persona.pool)
    questions_per_task: int = 32  # held-out questions per task (0: all of them)
    max_new_tokens: int = 16  # generation limit of the evaluation (a styled answer is <= 14 tokens + EOS)
    seeds: list[int] = field(default_factory=list)  # several: the comparison per seed, then mean ± std
    plot: bool = True  # <out_dir>/permix.png when matplotlib is installed

    def __post_init__(self) -> None:
        if self.questions_per_task < 0 or self.max_new_tokens < 1:
            raise ValueError("permix.questions_per_task must be >= 0 and permix.max_new_tokens >= 1")


@dataclass
class PerMixConfig(GRPOConfig):
    permix: PerMixSection = field(default_factory=PerMixSection)
    out_dir: str = "runs/permix"


# ------------------------------------------------------------------------------------------------------ data


def write_data(out: Path, seed: int) -> tuple[Path, Path]:
    """The SFT mixture (<out>/train/<category>.jsonl, <out>/heldout/<category>.jsonl) and the RL prompt file
    (<out>/prompts.jsonl). Returns (mixture directory, prompt file)."""
    rows = synthetic_sft_rows(seed)
    for split in ("train", "heldout"):
        by_cat: dict[str, list[str]] = {}
        for r in rows[split]:
            by_cat.setdefault(r["task"], []).append(json.dumps({k: v for k, v in r.items() if k != "persona"}))
        (out / split).mkdir(parents=True, exist_ok=True)
        for cat, lines in by_cat.items():
            (out / split / f"{cat}.jsonl").write_text("\n".join(lines) + "\n")
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in synthetic_prompts(seed)))
    return out, prompts


# ------------------------------------------------------------------------------------------------ the stages


def train_sft(cfg: PerMixConfig, data_dir: Path, out: Path) -> Path:
    p, seed = cfg.permix, cfg.train.seed
    return train_once(p.sft_config, [*p.sft_overrides, f"--data.path={data_dir}", f"--train.seed={seed}",
                                     f"--data.seed={seed}"], out, who="permix")


def train_rl(cfg: PerMixConfig, mode: str, init: Path, data_dir: Path, prompts: Path, out: Path) -> Path:
    """One GRPO run from `init` with persona.mode = `mode` (plain RLVR or PerMix)."""
    rl = replace(cfg, out_dir=str(out), init=replace(cfg.init, hf_checkpoint=str(init)),
                 data=replace(cfg.data, path=str(data_dir)), grpo=replace(cfg.grpo, prompts=str(prompts)),
                 persona=replace(cfg.persona, mode=mode))
    run_grpo(rl)
    return out / "hf"


def benchmark(cfg: PerMixConfig, path: Path) -> dict[str, Any]:
    """The persona benchmark of one checkpoint: every evaluation persona x the held-out questions, greedy."""
    p = cfg.permix
    model, tokenizer = load_model(path)
    t0 = time.perf_counter()
    bench = persona_benchmark(model, tokenizer, resolve_pool(p.eval_pool),
                              synthetic_questions(cfg.data.seed, per_task=p.questions_per_task),
                              max_new_tokens=p.max_new_tokens, seed=cfg.train.seed)
    bench["seconds"] = time.perf_counter() - t0
    return bench


def summary(bench: dict[str, Any]) -> dict[str, float | None]:
    """SUMMARY's numbers of one benchmark: stability, fidelity, and the accuracy under unhelpful personas (what
    PerMix is to fix) and under role-play personas (what a fidelity reward may cost: answers in style)."""
    s, cats = bench["stability"], bench["by_category"]
    return {"pss": s["pss"], "mean": s["mean"], "worst": s["worst"], "spread": s["spread"],
            "fidelity": bench["fidelity"], "unhelpful": cats.get("unhelpful", {}).get("accuracy"),
            "role-play": cats.get("role-play", {}).get("accuracy")}


def run_one(cfg: PerMixConfig) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    data_dir, prompts = write_data(out / "data", cfg.data.seed)
    paths = {"sft": train_sft(cfg, data_dir, out / "sft")}
    times["sft"] = time.perf_counter() - t0
    for method, mode in (("rlvr", "none"), ("permix", "permix")):
        t = time.perf_counter()
        paths[method] = train_rl(cfg, mode, paths["sft"], data_dir, prompts, out / method)
        times[method] = time.perf_counter() - t
    t = time.perf_counter()
    benches = {m: benchmark(cfg, paths[m]) for m in METHODS}
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    report = {"seed": cfg.train.seed, "eval_pool": cfg.permix.eval_pool, "summary": {m: summary(benches[m])
              for m in METHODS}, "seconds": times, "load_average": list(os.getloadavg()),
              "reports": {LABELS[m]: {"model": str(paths[m]), "benchmark_name": "synthetic", "benchmark": benches[m]}
                          for m in METHODS}}
    (out / "report.json").write_text(json.dumps(report, indent=1))

    print(format_table(report["reports"]), flush=True)
    print(format_summary({m: {k: (v, 0.0) for k, v in report["summary"][m].items()} for m in METHODS}, [])
          + f"\n({times['total']:.0f} s: SFT {times['sft']:.0f}, RLVR {times['rlvr']:.0f}, PerMix "
            f"{times['permix']:.0f}, evaluation {times['eval']:.0f}; load average {os.getloadavg()[0]:.1f})",
          flush=True)
    if cfg.permix.plot:
        try:
            plot(report["reports"], out / "permix.png")
            print(f"wrote {out / 'report.json'} and {out / 'permix.png'}", flush=True)
        except ImportError as e:
            print(f"wrote {out / 'report.json'} (no plot: {e})", flush=True)
    return report


# ------------------------------------------------------------------------------------------------ seeds


def aggregate(reports: dict[int, dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """{method: {number: (mean, population std over seeds)}}; a number a seed lacks (None) is left out of it."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for m in METHODS:
        out[m] = {}
        for key in SUMMARY:
            xs = [r["summary"][m][key] for r in reports.values() if r["summary"][m][key] is not None]
            out[m][key] = (float(np.mean(xs)), float(np.std(xs))) if xs else (float("nan"), 0.0)
    return out


def format_summary(study: dict[str, dict[str, tuple[float, float]]], seeds: list[int]) -> str:
    """SFT / RLVR / PerMix side by side: PSS, mean and worst accuracy, spread, fidelity, unhelpful-persona
    accuracy and role-play fidelity (mean ± std over seeds when there are several)."""
    names = {"pss": "PSS", "mean": "mean accuracy", "worst": "worst persona accuracy", "spread": "spread (best-worst)",
             "fidelity": "fidelity (constraints met)", "unhelpful": "accuracy, unhelpful personas",
             "role-play": "accuracy, role-play personas"}
    show = (lambda v: f"{v[0]:.3f} ± {v[1]:.3f}") if len(seeds) > 1 else (lambda v: f"{v[0]:.3f}")
    col = 15 if len(seeds) > 1 else 8
    head = f"{'':30s}" + "".join(f" {LABELS[m]:>{col}s}" for m in METHODS)
    lines = ([f"mean ± std over seeds {seeds}"] if len(seeds) > 1 else []) + [head, "-" * len(head)]
    for key in SUMMARY:
        lines.append(f"{names[key]:30s}" + "".join(f" {show(study[m][key]):>{col}s}" for m in METHODS))
    return "\n".join(lines)


def run(cfg: PerMixConfig) -> dict[str, Any]:
    """One comparison, or one per seed of `permix.seeds` and their mean ± std (<out_dir>/study.json)."""
    if not cfg.permix.seeds:
        return run_one(cfg)
    reports = {}
    for seed in cfg.permix.seeds:
        one = seed_config(cfg, seed, "permix")
        reports[seed] = run_one(one)
    study = aggregate(reports)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "study.json").write_text(json.dumps(
        {"seeds": {s: {"summary": r["summary"], "seconds": r["seconds"], "load_average": r["load_average"]}
                   for s, r in reports.items()}, "mean_std": study}, indent=1))
    print(format_summary(study, list(cfg.permix.seeds)), flush=True)
    return {"seeds": reports, "mean_std": study}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return entry_point(run, PerMixConfig, argv)


if __name__ == "__main__":
    main()
