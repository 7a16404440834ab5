"""PerMix-RLVR in the GRPO trainer (train/grpo.py's [persona] section) and the embedded default's driver
(train/permix.py): rewards under personas through the one reward path, the mixer applied to a step's prompts,
per-category metrics, config errors, and short end-to-end runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from posttrain.train.grpo import (
    GRPOConfig,
    GRPOSection,
    PerMix,
    PersonaSection,
    Prompt,
    Rewards,
    Sample,
    category_metrics,
    check_resumed_mode,
    read_prompts,
    with_persona,
)
from posttrain.eval.personas import CATEGORIES, load_pool, NO_PERSONA, Persona, pool_path
from posttrain.train.persona_mix import PersonaMixer
from posttrain.train.rl import combine_rewards
from posttrain.train.synthetic import tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
PIRATE = Persona("pirate", "You are a pirate.", "role-play", {"starts_with": "arr", "ends_with": "matey"})
LAZY = Persona("lazy", "You are a lazy chef.", "unhelpful")


def sample(text: str, persona: Persona | None, answer: str = "123", verifiable: bool = True) -> Sample:
    p = Prompt("copy", [{"role": "user", "content": "copy 123"}], answer, "synthetic", "x", persona=persona,
               verifiable=verifiable)
    return Sample(0, p, [1], [0.0], False, text)


def test_rewards_under_personas_are_correctness_plus_weighted_fidelity():
    samples = [
        sample("arr 123 matey", PIRATE),  # correct after strip_style, both constraints: 1 + 0.5 * 1
        sample("arr 124 matey", PIRATE),  # wrong, both constraints: 0.5
        sample("123 matey", PIRATE),  # correct, one of two: 1 + 0.25
        sample("123", LAZY),  # no constraints: correctness only
        sample("12", NO_PERSONA),
        sample("arr hello matey", PIRATE, answer="", verifiable=False),  # a role-play request: fidelity only
        sample("arr 123", None),  # no persona at all (plain RLVR): the text as it is, wrong
    ]
    r = Rewards(GRPOSection(), is_main=False, fidelity_weight=0.5)
    r(samples)
    assert [s.reward for s in samples] == pytest.approx([1.5, 0.5, 1.25, 1.0, 0.0, 0.5, 0.0])
    assert [s.correct for s in samples] == [True, False, True, True, False, False, False]
    assert [s.fidelity for s in samples] == [1.0, 1.0, 0.5, None, None, 1.0, None]
    # The same numbers through train/rl.py's combine_rewards, fidelity as a weighted extra column.
    expect = combine_rewards(torch.tensor([1, 0, 1, 1, 0, 0, 0]), extra=torch.tensor(
        [[1.0], [1.0], [0.5], [0.0], [0.0], [1.0], [0.0]]), extra_weights=torch.tensor([0.5]))
    assert [s.reward for s in samples] == pytest.approx(expect.tolist())


def test_without_personas_the_rewards_have_no_fidelity_column():
    """mode "none": no prompt has a persona, so the reward is the checker's alone, whatever fidelity_weight says."""
    samples = [sample("123", None), sample("arr 123 matey", None)]
    Rewards(GRPOSection(), is_main=False, fidelity_weight=3.0)(samples)
    assert [s.reward for s in samples] == [1.0, 0.0] and [s.fidelity for s in samples] == [None, None]


def test_with_persona_replaces_the_system_message_and_retokenizes():
    tok = tiny_tokenizer()
    base = Prompt("t", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "copy 12"}], "12",
                  "synthetic", "x")
    base.ids = tok.apply_chat_template(base.messages, add_generation_prompt=True, tokenize=True)
    p = with_persona(base, PIRATE, tok)
    assert p.messages == [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "copy 12"}]
    assert p.ids == tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True)
    assert p.persona is PIRATE and base.persona is None and (p.answer, p.checker) == ("12", "synthetic")
    plain = with_persona(base, NO_PERSONA, tok)  # no persona: the prompt as it was
    assert plain.messages == base.messages and plain.ids == base.ids and plain.persona is NO_PERSONA


def fake_runtime(max_positions: int = 512) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=tiny_tokenizer(),
                           model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=max_positions)))


def base_prompts(tok, n: int = 40) -> list[Prompt]:
    out = []
    for i in range(n):
        p = Prompt("copy", [{"role": "user", "content": f"copy {100 + i}"}], str(100 + i), "synthetic", f"p:{i}")
        p.ids = tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True)
        out.append(p)
    return out


def test_permix_applies_the_mixer_per_step_deterministically(tmp_path):
    rt = fake_runtime()
    cfg = GRPOConfig(persona=PersonaSection(mode="permix", pool="synthetic-train"))
    prompts = base_prompts(rt.tokenizer)
    a, b = PerMix(cfg, rt, prompts), PerMix(cfg, rt, prompts)
    first = a.apply(prompts, step=4)
    assert [p.messages for p in first] == [p.messages for p in b.apply(prompts, step=4)]
    assert [p.messages for p in first] != [p.messages for p in a.apply(prompts, step=5)]
    for p, q in zip(first, prompts):
        assert p.messages[-1] == q.messages[-1] and p.answer == q.answer  # the question is kept
        assert (p.messages[0]["content"] == p.persona.text) if p.persona.text else p.messages == q.messages
    cats = {p.persona.category for s in range(10) for p in a.apply(prompts, s)}
    assert cats == set(CATEGORIES)
    # Role-play requests from their own file: a role-play persona on one of those prompts, unverifiable when the
    # row has no answer.
    rp = tmp_path / "rp.jsonl"
    rp.write_text(json.dumps({"prompt": "greet me"}) + "\n" + json.dumps({"prompt": "copy 7", "answer": "7"}) + "\n")
    cfg = GRPOConfig(persona=PersonaSection(mode="permix", pool="synthetic-train", roleplay_prompts=str(rp),
                                            ratios={"roleplay": 1.0}))
    out = PerMix(cfg, rt, prompts).apply(prompts, 0)
    assert {p.persona.category for p in out} == {"role-play"}
    assert {p.messages[-1]["content"] for p in out} == {"greet me", "copy 7"}
    assert all(p.verifiable == (p.messages[-1]["content"] == "copy 7") for p in out)


def test_permix_config_errors():
    with pytest.raises(ValueError, match="persona.mode: 'mix' is not 'none' or 'permix'"):
        PersonaSection(mode="mix")
    with pytest.raises(ValueError, match="persona.pool: mode 'permix' needs a training persona pool"):
        PersonaSection(mode="permix")
    with pytest.raises(ValueError, match="persona.fidelity_weight must be >= 0"):
        PersonaSection(fidelity_weight=-1)
    rt = fake_runtime()
    prompts = base_prompts(rt.tokenizer, 2)
    with pytest.raises(ValueError, match="persona.ratios: unknown kind 'roleplays'"):
        PerMix(GRPOConfig(persona=PersonaSection(mode="permix", pool="synthetic-train", ratios={"roleplays": 1})),
               rt, prompts)
    with pytest.raises(ValueError, match="not a built-in pool"):
        PerMix(GRPOConfig(persona=PersonaSection(mode="permix", pool="synthetic-trian")), rt, prompts)
    with pytest.raises(ValueError, match=r"persona.pool: persona '.*' makes prompt p:\d+ \d+ tokens, more than"):
        PerMix(GRPOConfig(persona=PersonaSection(mode="permix", pool="synthetic-train")), fake_runtime(40), prompts)


def test_a_checkpoint_of_one_method_is_not_resumed_as_the_other():
    permix = GRPOConfig(persona=PersonaSection(mode="permix", pool="synthetic-train"))
    with pytest.raises(ValueError, match=r"ckpt: the checkpoint was written with persona.mode = 'none', this run has "
                                         r"persona.mode = 'permix'"):
        check_resumed_mode({"grpo": {"persona_mode": "none"}}, permix, "ckpt")
    with pytest.raises(ValueError, match="persona.mode = 'permix', this run has persona.mode = 'none'"):
        check_resumed_mode({"config": {"persona.mode": "permix"}}, GRPOConfig(), "ckpt")  # an older checkpoint
    check_resumed_mode({"grpo": {"persona_mode": "permix"}}, permix, "ckpt")
    check_resumed_mode({}, permix, "ckpt")  # nothing recorded: nothing to compare


def test_read_prompts_allows_role_play_requests_without_answers(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "tell me a story"}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl:1: an RL prompt needs an 'answer'"):
        read_prompts(f)
    (p,) = read_prompts(f, require_answer=False)
    assert not p.verifiable and p.messages == [{"role": "user", "content": "tell me a story"}]


def test_category_metrics_by_hand():
    # categories: none, none, unhelpful, unhelpful, role-play, role-play (unverifiable)
    cats = torch.tensor([0, 0, 3, 3, 4, 4])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, 0.5], dtype=torch.float64)
    correct = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    verifiable = torch.tensor([True, True, True, True, True, False])
    fids = torch.tensor([math.nan, math.nan, math.nan, math.nan, 1.0, 0.5], dtype=torch.float64)
    m = category_metrics(cats, rewards, correct, verifiable, fids)
    assert m == {"none": {"share": pytest.approx(1 / 3), "reward": 0.5, "accuracy": 0.5},
                 "unhelpful": {"share": pytest.approx(1 / 3), "reward": 1.0, "accuracy": 1.0},
                 "role-play": {"share": pytest.approx(1 / 3), "reward": 1.25, "accuracy": 1.0, "fidelity": 0.75}}


# ----------------------------------------------------------------------------------------------------------------
# End to end: the driver on a tiny budget (a small model, a few SFT and GRPO steps, a few questions), in a subprocess

TINY = [
    "--permix.sft_overrides=[" + ", ".join(f'"{f}"' for f in (
        "--model.hidden_size=64", "--model.intermediate_size=128", "--model.num_layers=2", "--model.num_heads=4",
        "--model.num_kv_heads=2", "--model.max_position_embeddings=128", "--data.seq_len=96",
        "--data.max_tokens=512", "--train.max_steps=3", "--eval.every_epochs=0")) + "]",
    "--permix.questions_per_task=2", "--permix.plot=false", "--data.seq_len=96", "--data.max_tokens=512",
    "--grpo.prompts_per_step=8", "--grpo.group_size=4", "--grpo.micro_batch_seqs=32", "--train.max_steps=2",
    "--train.log_every=1", "--optim.warmup_steps=0",
]


@pytest.mark.slow
def test_driver_end_to_end_on_a_tiny_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "permix"
    proc = subprocess.run([sys.executable, "-m", "posttrain.train.permix", "--config", str(REPO / "configs/tiny_permix.toml"),
                           f"--out_dir={out}", *TINY], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    pool = load_pool(pool_path("synthetic-eval"))
    for label in ("SFT", "RLVR", "PerMix"):
        bench = report["reports"][label]["benchmark"]
        assert [r["id"] for r in bench["per_persona"]] == [p.id for p in pool]
        assert len(bench["correct"]) == len(pool) and len(bench["correct"][0]) == 6
    for m in ("sft", "rlvr", "permix"):
        assert set(report["summary"][m]) >= {"pss", "mean", "fidelity"}
    assert "PSS" in proc.stdout and "PerMix" in proc.stdout
    # RLVR logged no persona categories; PerMix logged them, and its first step drew the same personas a rerun draws.
    steps = {m: [json.loads(x) for x in (out / m / "metrics.jsonl").read_text().splitlines() if "reward_mean" in x]
             for m in ("rlvr", "permix")}
    assert len(steps["rlvr"]) == 2 and all("persona" not in r for r in steps["rlvr"])
    assert len(steps["permix"]) == 2 and all(set(r["persona"]) <= set(CATEGORIES) for r in steps["permix"])
    # The categories it trained on are the mixer's draws for (train.seed, global step): step 0, then step 1.
    mixer = PersonaMixer(load_pool(pool_path("synthetic-train")), PersonaSection().ratios, seed=0)
    for step, record in enumerate(steps["permix"]):
        drawn = Counter(d.persona.category for d in mixer.draws(step, 8))
        assert {c: v["share"] for c, v in record["persona"].items()} == {c: n / 8 for c, n in drawn.items()}
    # Each run's checkpoint and summary say which method it was (a resumed run checks it).
    for m, mode in (("rlvr", "none"), ("permix", "permix")):
        (ckpt,) = (out / m / "checkpoints").glob("step_*/trainer.json")
        assert json.loads(ckpt.read_text())["grpo"]["persona_mode"] == mode
        assert json.loads((out / m / "summary.json").read_text())["grpo"]["persona_mode"] == mode
    # Both RL runs started from the same SFT weights and trained the same number of steps.
    assert (out / "sft" / "hf" / "config.json").is_file()
    assert report["reports"]["RLVR"]["model"] != report["reports"]["PerMix"]["model"]


def test_seeds_run_one_comparison_each_and_aggregate_mean_and_std(tmp_path, monkeypatch, capsys):
    import posttrain.train.permix as permix
    from posttrain.core.config import load_config

    seen = []

    def fake_run_one(cfg):
        seen.append((cfg.out_dir, cfg.train.seed, cfg.data.seed, cfg.permix.seeds))
        s = cfg.train.seed
        summary = {m: {k: None if (m, k) == ("sft", "fidelity") and s == 1 else float(s + i)
                       for k in permix.SUMMARY} for i, m in enumerate(permix.METHODS)}
        return {"summary": summary, "seconds": {"total": 1.0}, "load_average": [0.0, 0.0, 0.0]}

    monkeypatch.setattr(permix, "run_one", fake_run_one)
    cfg = load_config(permix.PerMixConfig, REPO / "configs/tiny_permix.toml",
                      [f"--out_dir={tmp_path}", "--permix.seeds=[1, 3]"])
    out = permix.run(cfg)
    assert seen == [(str(tmp_path / "seed1"), 1, 1, []), (str(tmp_path / "seed3"), 3, 3, [])]
    ms = out["mean_std"]
    assert ms["sft"]["pss"] == (2.0, 1.0) and ms["permix"]["mean"] == (4.0, 1.0)
    assert ms["sft"]["fidelity"] == (3.0, 0.0)  # seed 1 had none: the mean is over the seeds that have it
    study = json.loads((tmp_path / "study.json").read_text())
    assert study["mean_std"]["rlvr"]["pss"] == [3.0, 1.0] and set(study["seeds"]) == {"1", "3"}
    printed = capsys.readouterr().out
    assert "mean ± std over seeds [1, 3]" in printed and "2.000 ± 1.000" in printed
