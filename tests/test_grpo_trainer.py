"""train/grpo.py end to end, and the model-level head-loss seam it trains through (core/model.py `head_loss=`)."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.core.model import ModelConfig, Transformer
from posttrain.core.sampler import generate
from posttrain.kernels.grpo import grpo_loss_reference, linear_grpo_loss
from posttrain.train.grpo import GRPOSection, Prompt, Rewards, Sample, accumulate_gradients, micro_batches, sequence_logprobs
from posttrain.train.rl import group_advantages, token_weights
import posttrain.train.grpo as grpo_module

REPO = Path(__file__).resolve().parent.parent


def test_head_loss_seam_equals_the_loss_on_materialized_logits():
    """model(ids, head_loss=f) runs f(hidden, lm_head.weight) inside the lm-head call: the GRPO loss and every
    parameter gradient equal those of the plain loss on the model's logits (tied and untied heads)."""
    for tied in (True, False):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
        model = Transformer(cfg).double()
        model.init_weights(seed=0)
        ids = torch.randint(0, 53, (3, 9))
        targets = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], 1)
        mask = (torch.rand(3, 9) < 0.8).double()
        old = -torch.rand(3, 9, dtype=torch.float64) * 4
        adv = torch.randn(3, dtype=torch.float64)
        kw = dict(loss_type="grpo", eps_low=0.2, eps_high=0.28)

        loss, _ = model(ids, head_loss=lambda h, w: linear_grpo_loss(h, w, targets, old, adv, mask, **kw))
        loss.backward()
        fused = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()

        logp = torch.log_softmax(model(ids), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        ref, _ = grpo_loss_reference(logp, old, adv, mask * (targets != -100), **kw)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-9)  # the row pass keeps fp32 pieces
        for n, p in model.named_parameters():
            torch.testing.assert_close(fused[n], p.grad, rtol=1e-5, atol=1e-8, msg=n)


# ----------------------------------------------------------------------------------------------------------------
# The trainer's pieces in-process, on a small float64 model

V, PAD = 61, 0


def digit_reward(prompt: str, response: str, answer: str) -> float:
    """A reward a random model earns sometimes: the share of digits in its response (used by the runs below)."""
    return sum(ch.isdigit() for ch in response) / max(len(response), 1)


def small_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = Transformer(cfg).double()
    model.init_weights(seed=0)
    return model


def rollouts(model: Transformer, P: int = 3, G: int = 4, T: int = 6, seed: int = 0) -> list[Sample]:
    """Real sampler rollouts of random prompts (lengths 3..7), stopping on a tenth of the vocabulary so completion
    lengths vary; rewards hashed from the tokens, so groups have variance."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [Prompt("t", [], "", "exact", f"p{i}", torch.randint(1, V, (3 + 2 * i % 5,), generator=gen).tolist())
               for i in range(P)]
    outs = generate(model, [p.ids for p in prompts], n=G, max_new_tokens=T, seed=seed,
                    stop_token_ids=list(range(1, V, 10)))
    samples = [Sample(o.prompt_index, prompts[o.prompt_index], o.tokens, o.raw_logprobs, o.finish_reason == "length",
                      "") for o in outs]
    rewards = torch.tensor([[float(sum(s.tokens) % 3) for s in samples[p * G:(p + 1) * G]] for p in range(P)])
    adv = group_advantages(rewards, mode="grpo").view(-1)
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a
    return samples


def plain_policy_gradient(model: Transformer, samples: list[Sample], g: GRPOSection) -> dict[str, torch.Tensor]:
    """REINFORCE with the group baseline on materialized logits: loss = -sum_b,t W_bt A_b log p_bt, W the loss type's
    token weights (bnpo: per micro-batch, as the trainer splits them), then plain autograd."""
    model.zero_grad()
    groups = micro_batches(samples, g.micro_batch_seqs) if g.loss_type == "bnpo" else [samples]
    for group in groups:
        C = max(len(s.tokens) for s in group)
        logp = torch.zeros(len(group), C, dtype=torch.float64)
        mask = torch.zeros(len(group), C)
        for b, s in enumerate(group):
            ids = torch.tensor([s.prompt.ids + s.tokens[:-1]])
            logits = model(ids)[0, len(s.prompt.ids) - 1:]  # [len(tokens), V]
            logp[b, : len(s.tokens)] = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.tokens)[:, None])[:, 0]
            mask[b, : len(s.tokens)] = 0.0 if (g.mask_truncated and s.truncated) else 1.0
        all_tokens = sum(0 if (g.mask_truncated and s.truncated) else len(s.tokens) for s in samples)
        w = token_weights(mask, loss_type=g.loss_type, max_completion_length=g.max_new_tokens,
                          num_sequences=len(samples) if g.loss_type != "bnpo" else None,
                          num_tokens=all_tokens if g.loss_type == "dapo" else None)
        adv = torch.tensor([s.advantage for s in group], dtype=torch.float64)[:, None]
        (-(w * adv * logp).sum() / len(groups)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_on_policy_gradient_is_reinforce_with_the_group_baseline(loss_type):
    """mu = 1, beta = 0, old log-probs = the policy's own: the fused trainer gradient (2 micro-batches, one truncated
    completion masked) equals REINFORCE with the group baseline through plain autograd on materialized logits."""
    model = small_model()
    samples = rollouts(model)
    assert len({len(s.tokens) for s in samples}) > 2 and any(s.truncated for s in samples)
    g = GRPOSection(loss_type=loss_type, max_new_tokens=6, micro_batch_seqs=5, mask_truncated=True)
    for s, lp in zip(samples, sequence_logprobs(model, samples, g, PAD, torch.device("cpu"))[0]):
        s.old_logp = lp.double()
        torch.testing.assert_close(lp, torch.tensor(s.sampler_logp), rtol=0, atol=1e-4)  # the sampler agrees
    n_tokens = sum(0 if s.truncated else len(s.tokens) for s in samples)
    model.zero_grad()
    accumulate_gradients(model, samples, g, PAD, torch.device("cpu"), world_size=1, num_sequences=len(samples),
                         num_tokens=n_tokens)
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    plain = plain_policy_gradient(model, samples, g)
    scale = max(float(v.abs().max()) for v in plain.values())
    assert scale > 1e-3  # a real gradient, not zeros on both sides
    for n in fused:  # old log-probs are stored in fp32: ratios are 1 to ~1e-7
        torch.testing.assert_close(fused[n], plain[n], rtol=1e-5, atol=1e-6 * scale, msg=n)


def test_a_step_raises_positive_advantage_completions_and_lowers_the_others():
    model = small_model()
    samples = rollouts(model, P=4, G=6)
    g = GRPOSection(loss_type="grpo", max_new_tokens=6, micro_batch_seqs=8)

    def seq_logp() -> torch.Tensor:
        return torch.stack([lp.sum() for lp in sequence_logprobs(model, samples, g, PAD, torch.device("cpu"))[0]])

    before = seq_logp()
    for s, lp in zip(samples, sequence_logprobs(model, samples, g, PAD, torch.device("cpu"))[0]):
        s.old_logp = lp.double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    accumulate_gradients(model, samples, g, PAD, torch.device("cpu"), world_size=1, num_sequences=len(samples),
                         num_tokens=sum(len(s.tokens) for s in samples))
    opt.step()
    delta = seq_logp() - before
    adv = torch.tensor([s.advantage for s in samples])
    up, down = delta[adv > 0.1], delta[adv < -0.1]
    assert len(up) >= 4 and len(down) >= 4
    assert (up > 0).float().mean() >= 0.8 and (down < 0).float().mean() >= 0.8, (up, down)
    assert up.mean() > 0 > down.mean()


def boom(prompt, response, answer):
    raise RuntimeError("reward server down")


def slow(prompt, response, answer):
    time.sleep(SLOW_S)
    return 1.0


SLOW_S = 60.0  # far past the 0.3 s timeout: waiting for even one slow reward would show whatever the load


def test_failing_and_timing_out_rewards_are_counted_not_fatal(monkeypatch):
    p = Prompt("t", [{"role": "user", "content": "q"}], "42", "exact", "x")
    samples = [Sample(0, p, [1], [0.0], False, text) for text in ("42", "41", "42.")]
    g = GRPOSection(reward_fns={"tests.test_grpo_trainer:boom": 1.0, "tests.test_grpo_trainer:digit_reward": 0.5},
                    reward_timeout_s=0.5)
    r = Rewards(g, is_main=False)
    r(samples)
    # checker: 1, 0, 1; boom: 0 each (3 errors); digit_reward: 1, 1, 2/3 at weight 0.5
    assert [s.reward for s in samples] == pytest.approx([1.5, 0.5, 1 + 1 / 3])
    assert (r.errors, r.timeouts) == (3, 0)

    g = GRPOSection(reward_fns={"tests.test_grpo_trainer:slow": 1.0}, reward_timeout_s=0.3)
    r = Rewards(g, is_main=False)
    t0 = time.perf_counter()
    r(samples)
    assert time.perf_counter() - t0 < SLOW_S / 2  # the deadline held: no slow reward was waited for
    assert [s.reward for s in samples] == [1.0, 0.0, 1.0] and r.timeouts == 3  # scored by the checker only

    def broken(checkers, texts, answers):  # a checker that raises on one item: that item alone scores 0
        if "41" in texts:
            raise ValueError("cannot parse")
        return [t.startswith("42") for t in texts]

    monkeypatch.setattr(grpo_module, "check_rows", broken)
    r = Rewards(GRPOSection(), is_main=False)
    r(samples)
    assert [s.reward for s in samples] == [1.0, 0.0, 1.0] and r.errors == 1
    with pytest.raises(ValueError, match="grpo.reward_fns"):
        Rewards(GRPOSection(reward_fns={"tests.test_grpo_trainer:nope": 1.0}))


# ----------------------------------------------------------------------------------------------------------------
# Whole runs in subprocesses: a small, barely trained model; rewards from digit_reward (such a model earns some)

# The policy starts from a 2-step SFT of a small model, which the first run trains itself (grpo.sft_config).
SFT = ["--model.hidden_size=64", "--model.intermediate_size=128", "--model.num_layers=2", "--model.num_heads=4",
       "--model.num_kv_heads=2", "--model.max_position_embeddings=128", "--data.seq_len=64", "--data.max_tokens=256",
       "--train.max_steps=2", "--eval.at_start=false", "--eval.generate=false", "--eval.every_epochs=0"]
RUN = [
    "--grpo.sft_config=configs/tiny_sft.toml", "--grpo.sft_overrides=[" + ", ".join(f'"{f}"' for f in SFT) + "]",
    "--data.seq_len=64", "--data.max_tokens=256",
    "--grpo.prompts_per_step=4", "--grpo.group_size=4", "--grpo.max_new_tokens=6", "--grpo.rollout_shards=2",
    "--grpo.correct_weight=0", '--grpo.reward_fns={"tests.test_grpo_trainer:digit_reward" = 1.0}',
    "--grpo.iterations=2", "--grpo.beta=0.05", "--grpo.entropy=true", "--grpo.micro_batch_seqs=3",
    "--optim.lr=3e-3", "--optim.warmup_steps=0", "--train.max_steps=4", "--train.log_every=2",
    "--eval.at_start=false", "--eval.generate=false", "--grpo.eval_every_steps=0",
]


def run_grpo(out: Path, sft_hf: Path, *flags: str, nproc: int = 1) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the torch fallback is fast on CPU
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = launcher + ["-m", "posttrain.train.grpo", "--config", str(REPO / "configs/tiny_grpo.toml"), f"--out_dir={out}",
                      f"--init.hf_checkpoint={sft_hf}", *RUN, *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward_mean" in r]  # the step records (evaluations are records too)


KEYS = ("loss", "reward_mean", "accuracy", "clip_low", "clip_high", "ratio", "kl", "entropy", "completion_len",
        "grad_norm")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference run; it first trains its starting point (<tmp>/sft/hf does not exist yet)."""
    root = tmp_path_factory.mktemp("grpo")
    out, sft_hf = root / "straight", root / "sft" / "hf"
    metrics = run_grpo(out, sft_hf)
    assert (sft_hf / "config.json").is_file() and (root / "sft" / "summary.json").is_file()
    return out, sft_hf, metrics


@pytest.mark.slow
def test_resume_mid_run_reproduces_the_following_steps_exactly(straight, tmp_path):
    """Stop after the first rollout (2 updates), resume: the second rollout and its losses are identical."""
    out, sft_hf, full = straight
    assert [m["step"] for m in full] == [2, 4] and full[0]["reward_std"] > 0 and full[1]["kl"] > 0
    assert full[0]["loss"] != 0 and math.isfinite(full[1]["entropy"]) and full[0]["logprob_gap"] < 1e-4
    run_grpo(tmp_path / "split", sft_hf, "--train.stop_at_step=2")
    resumed = run_grpo(tmp_path / "split", sft_hf)
    assert [m["step"] for m in resumed] == [2, 4]
    for key in KEYS:
        assert resumed[1][key] == full[1][key], key
    wa, wb = load_file(out / "hf" / "model.safetensors"), load_file(tmp_path / "split" / "hf" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_gloo_ranks_match_one_process_on_the_same_global_batch(straight, tmp_path):
    """Each rank rolls out its shard (the one process rolls out both shards with the same seeds) and trains on it
    under FSDP2: same rollouts, same losses and metrics, same weights."""
    out, sft_hf, one = straight
    two = run_grpo(tmp_path / "two", sft_hf, nproc=2)
    assert [m["step"] for m in two] == [2, 4]
    for a, b in zip(one, two):
        assert a["completion_len"] == b["completion_len"] and a["reward_mean"] == pytest.approx(b["reward_mean"])
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    wa, wb = load_file(out / "hf" / "model.safetensors"), load_file(tmp_path / "two" / "hf" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4, msg=k)
