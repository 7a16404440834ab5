"""train/sft.py and core/distributed.py end to end: FSDP2 over 2 gloo ranks equals one process, exact resume,
the NaN guard, and the embedded default learning."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent

# A small model and short run: every test here launches real training processes.
SMALL = [
    "--model.hidden_size=64", "--model.intermediate_size=128", "--model.num_layers=2", "--model.num_heads=4",
    "--model.num_kv_heads=2", "--model.tie_word_embeddings=false",
    "--data.seq_len=64", "--data.max_tokens=256",
    "--optim.warmup_steps=2", "--optim.lr=3e-3",
    "--train.log_every=1", "--eval.every_epochs=0", "--eval.at_start=false", "--eval.generate=false",
    "--parallel.param_dtype=float32",
]


def run_sft(out: Path, *flags: str, nproc: int = 1, ok: bool = True) -> subprocess.CompletedProcess:
    """train.sft on the small model in a subprocess; asserts it succeeded (or, with ok=False, that it failed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the torch fallback is fast on CPU
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = launcher + ["-m", "posttrain.train.sft", "--config", str(REPO / "configs/tiny_sft.toml"), f"--out_dir={out}",
                      *SMALL, *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_fsdp_two_ranks_equal_one_process(tmp_path):
    """2 ranks x 1 micro-batch and 1 rank x 2 micro-batches see the same global batch: same losses, same weights."""
    run_sft(tmp_path / "one", "--train.max_steps=4", "--optim.grad_accum=2")
    run_sft(tmp_path / "two", "--train.max_steps=4", nproc=2)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == [1, 2, 3, 4] and a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5 * abs(a[step]), (step, a[step], b[step])
    wa = load_file(tmp_path / "one" / "hf" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "hf" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=2e-5, rtol=1e-4), k
    assert a[4] < a[1]  # and it trains


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_sft(full, "--train.max_steps=6")
    proc = run_sft(part, "--train.max_steps=6", "--train.stop_at_step=3")  # "killed" after step 3's checkpoint
    assert "stopped: 3 steps" in proc.stdout and not (part / "hf").exists()
    # A half-written later checkpoint (no COMPLETE marker) must be ignored on resume.
    (part / "checkpoints" / "step_00000005").mkdir()
    proc = run_sft(part, "--train.max_steps=6")
    assert "resumed from" in proc.stdout and "step_00000003" in proc.stdout
    a, b = losses(full), losses(part)
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]  # bitwise: same data, optimizer state, RNG
    wa = load_file(full / "hf" / "model.safetensors")
    wb = load_file(part / "hf" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_exported_checkpoint_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    run_sft(tmp_path, "--train.max_steps=2", "--model.tie_word_embeddings=true")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    from posttrain.core.checkpoint import load_hf

    ours = load_hf(tmp_path / "hf")
    ids = torch.tensor([tok.encode("copy 123")])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["tiny_sft.toml", "qwen2.5-0.5b_sft.toml", "qwen2.5-1.5b_sft.toml"])
def test_repo_configs_parse(name):
    from posttrain.core.config import load_config
    from posttrain.train.sft import SFTConfig

    cfg = load_config(SFTConfig, REPO / "configs" / name)
    assert cfg.data.max_tokens % cfg.data.seq_len == 0


def test_bad_flag_names_the_closest_key(tmp_path):
    proc = run_sft(tmp_path, "--optim.lrr=1", ok=False)
    assert "flag --optim.lrr: unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in proc.stderr


def test_an_evaluation_with_nothing_to_measure_is_refused():
    from posttrain.core.config import load_config
    from posttrain.train.sft import SFTConfig

    with pytest.raises(ValueError, match="eval.loss = false and eval.generate = false: every evaluation would be "
                                         "empty"):
        load_config(SFTConfig, REPO / "configs/tiny_sft.toml", ["--eval.loss=false", "--eval.generate=false"])
    load_config(SFTConfig, REPO / "configs/tiny_sft.toml", ["--eval.loss=false"])


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    """An absurd learning rate blows the weights up after one step; the following non-finite steps are skipped
    (never applied) and the run stops with a message after max_bad_steps of them in a row."""
    proc = run_sft(tmp_path, "--optim.lr=1e30", "--optim.warmup_steps=0", "--optim.max_grad_norm=0",
                   "--train.max_steps=20", "--train.max_bad_steps=3", ok=False)
    assert "non-finite loss" in proc.stdout and "step skipped (3 in a row, 3 in total)" in proc.stdout
    assert "3 consecutive steps with non-finite loss or gradients" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r.get("skipped")]
    assert len(skipped) >= 2 and all(r["skipped_total"] >= 1 for r in skipped)


def test_sequence_longer_than_the_model_is_refused_up_front(tmp_path):
    proc = run_sft(tmp_path, "--eval.generate=true", "--model.max_position_embeddings=64", ok=False)
    assert "data.seq_len (64) + eval.max_new_tokens (8) exceeds the model's max_position_embeddings (64)" in proc.stderr


@pytest.mark.slow
def test_compile_with_activation_checkpointing_in_bf16_matches_eager(tmp_path):
    """The GPU recipe's switches together (per-block torch.compile, activation checkpointing inside the block, bf16
    FSDP2 mixed precision) give the losses of the plain eager run, within bf16 rounding."""
    bf16 = ["--train.max_steps=3", "--parallel.param_dtype=bfloat16"]
    run_sft(tmp_path / "eager", *bf16)
    run_sft(tmp_path / "compiled", *bf16, "--parallel.compile=true", "--parallel.activation_checkpointing=true")
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) < 2e-2 * abs(a[step]), (step, a[step], b[step])
