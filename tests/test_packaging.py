"""The library installs as one namespace, `posttrain`, and lives beside any other package: Hugging Face's `kernels`
(a dependency of transformers >= 5.25), a user's own `core` or `eval`, whether Python runs from the repository root
or elsewhere (setup.py says why the folders have no __init__.py); and a wheel carries the data the product reads."""

import ast
import fnmatch
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("core", "kernels", "train", "eval", "bench")


def test_the_distribution_installs_one_top_level_name():
    dist = importlib.metadata.distribution("posttrain")
    assert dist.read_text("top_level.txt").split() == ["posttrain"]
    owners = importlib.metadata.packages_distributions()
    assert not [name for name in FOLDERS if "posttrain" in owners.get(name, [])]


def test_no_folder_is_a_regular_top_level_package():
    """A folder with an __init__.py is a regular package `kernels` (or `core`, ...) whenever the repository root is
    on sys.path (`python -m`, pytest, a REPL there), and it outranks every library of that name."""
    assert [f for f in FOLDERS if (REPO / f / "__init__.py").exists()] == []


def test_from_the_repository_root_other_packages_of_our_folder_names_win(tmp_path):
    """A stand-in for Hugging Face's `kernels` and a user's `core` on the path: from the repository root, `import
    kernels` and `import core` get them (not our folders), and posttrain still imports whole, transformers too."""
    for name, body in (("kernels", "CUDAProperties = 'hub kernels'\n"), ("core", "WHO = 'user'\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(body)
    code = textwrap.dedent("""
        import kernels, core
        assert kernels.CUDAProperties == "hub kernels" and core.WHO == "user", (kernels, core)
        from kernels import CUDAProperties
        import posttrain.core.model, posttrain.kernels.logprob, posttrain.train.sft, posttrain.eval.persona
        import posttrain.train.msft.study, posttrain.bench.aot
        try:
            import transformers
        except ImportError:
            pass
        else:
            from transformers import AutoModelForCausalLM
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_transformers_loads_its_own_kernels_library_when_it_has_one():
    """With Hugging Face's `kernels` installed (transformers >= 5.25 requires it), transformers must find that one;
    without it, nothing of ours may pass for it."""
    utils = pytest.importorskip("transformers.utils")
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert utils.is_kernels_available() is False
        return
    import kernels

    assert "posttrain" not in str(getattr(kernels, "__file__", "") or kernels.__path__)


def test_every_shipped_data_file_is_in_package_data():
    """setup.py's package_data globs do not recurse: a data folder added without its glob would be missing from a
    wheel (an editable install, as in CI, would not notice)."""
    call = next(n for n in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    missing = []
    for package in ("train", "eval"):
        globs = package_data[f"posttrain.{package}"]
        for path in (REPO / package / "data").rglob("*"):
            rel = path.relative_to(REPO / package).as_posix()
            if path.is_file() and "__pycache__" not in rel and \
                    not any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs):
                missing.append(f"{package}/{rel}")
    assert not missing, f"not in setup.py package_data: {missing[:5]}"


def test_product_code_imports_the_project_at_module_level_only():
    """No import of this project inside a function (STYLE.md: layers are read from the top of each file, and an
    import hidden in a function is how a circle between layers gets dodged); the contracts in .importlinter check
    the direction."""
    hidden = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for fn in ast.walk(ast.parse(path.read_text())):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                        [a.name for a in node.names] if isinstance(node, ast.Import) else []
                    if any(n == "posttrain" or n.startswith("posttrain.") for n in names):
                        hidden.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not hidden, f"project imports inside functions: {hidden}"
