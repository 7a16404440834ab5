"""core/config.py: TOML + overrides into dataclasses, and the errors that name the file/flag and the closest key."""

from dataclasses import dataclass, field

import pytest

from posttrain.core.config import ConfigError, flatten, load_config, parse_args
from posttrain.core.model import ModelConfig


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0


@dataclass
class Run:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: Optim = field(default_factory=Optim)
    name: str = "run"
    compile: bool = False
    init_from: str | None = None


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_file_then_overrides(tmp_path):
    p = write(tmp_path, 'name = "x"\n[model]\nhidden_size = 128\nnum_heads = 4\n[optim]\nlr = 1\n')
    cfg = load_config(Run, p, ["--optim.lr=3e-4", "--compile=true", "--optim.betas=[0.8, 0.9]",
                               "--init_from=/ckpt/dir", "--model.rope_scaling={rope_type='llama3', factor=8.0, "
                               "low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64}"])
    assert cfg.name == "x" and cfg.model.hidden_size == 128 and cfg.model.head_dim == 32
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.compile is True and cfg.optim.betas == [0.8, 0.9] and cfg.init_from == "/ckpt/dir"
    assert cfg.model.rope_scaling["factor"] == 8.0
    assert flatten(cfg)["optim.warmup_steps"] == 0


def test_int_in_file_becomes_float(tmp_path):
    assert load_config(Run, write(tmp_path, "[optim]\nlr = 1\n")).optim.lr == 1.0


@pytest.mark.parametrize("text,match", [
    ("[optim]\nlrr = 1\n", r"c.toml: unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
    ("[optimm]\nlr = 1\n", r"c.toml: unknown key 'optimm' \(did you mean 'optim'\?\)"),
    ("[optim]\nlr = 'fast'\n", r"c.toml: 'optim.lr' must be a number, got 'fast'"),
    ("[optim]\nwarmup_steps = 1.5\n", r"'optim.warmup_steps' must be int"),
    ("name = 3\n", r"'name' must be str"),
    ("optim = 3\n", r"'optim' is a section"),
    ("[model]\nnum_heads = 4\nnum_kv_heads = 3\n", r"c.toml: model.num_heads \(4\) must be a multiple"),
    ("[model\n", r"c.toml: invalid TOML"),
])
def test_bad_file(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Run, write(tmp_path, text))


@pytest.mark.parametrize("flag,match", [
    ("--optim.lrr=1", r"flag --optim.lrr: unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
    ("--name.x=1", r"'name' is a value, not a section"),
    ("--compile=maybe", r"flag --compile: 'compile' must be bool"),
    ("optim.lr=1", r"expected --section.key=value"),
])
def test_bad_flag(flag, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Run, None, [flag])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Run, tmp_path / "nope.toml")


def test_parse_args(tmp_path):
    p = write(tmp_path, "[optim]\nlr = 2.0\n")
    cfg = parse_args(Run, ["--config", str(p), "--optim.warmup_steps=5"])
    assert cfg.optim.lr == 2.0 and cfg.optim.warmup_steps == 5


def test_repo_configs_load():
    from pathlib import Path

    from posttrain.core.model import Transformer

    root = Path(__file__).resolve().parent.parent / "configs"
    @dataclass
    class OnlyModel:
        model: ModelConfig = field(default_factory=ModelConfig)

    m = load_config(OnlyModel, root / "tiny.toml").model
    n = Transformer(m).config.num_params()
    assert 1e6 < n < 2e7, n  # "a few million parameters"


def test_help_lists_the_values_the_file_and_flags_give(tmp_path, capsys):
    p = write(tmp_path, "[optim]\nlr = 2.0\n")
    with pytest.raises(SystemExit) as e:
        parse_args(Run, ["--config", str(p), "--optim.warmup_steps=5", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--optim.lr=2.0" in out and "--optim.warmup_steps=5" in out and "--name='run'" in out
