"""The installed distribution must not be mistaken for another library (see the note in setup.py), and a wheel
must carry the data the product reads."""

import ast
import fnmatch
import importlib.metadata
from pathlib import Path

import pytest


def test_transformers_does_not_take_our_kernels_package_for_hub_kernels():
    utils = pytest.importorskip("transformers.utils")
    version = importlib.metadata.version("posttrain")
    major, minor, patch = (int(x) for x in version.split(".")[:3])
    assert not ((0, 18, 2) <= (major, minor, patch) < (0, 19, 0)), version
    assert utils.is_kernels_available() is False, (
        "transformers sees Hugging Face's `kernels` library as installed (`pip show kernels`; transformers >= 5.25 "
        "requires it), but `import kernels` is this project's package: every transformers model import fails. "
        "Use transformers < 5.25 and `pip uninstall kernels` (see setup.py)")


def test_packages_import():
    import bench  # noqa: F401
    import core  # noqa: F401
    import eval  # noqa: F401
    import kernels  # noqa: F401
    import train  # noqa: F401


def test_every_shipped_data_file_is_in_package_data():
    """setup.py's package_data globs do not recurse: a data folder added without its glob would be missing from a
    wheel (an editable install, as in CI, would not notice)."""
    root = Path(__file__).resolve().parents[1]
    call = next(n for n in ast.walk(ast.parse((root / "setup.py").read_text()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    missing = []
    for package in ("train", "eval"):
        for path in (root / package / "data").rglob("*"):
            rel = path.relative_to(root / package).as_posix()
            if path.is_file() and "__pycache__" not in rel and \
                    not any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in package_data[package]):
                missing.append(f"{package}/{rel}")
    assert not missing, f"not in setup.py package_data: {missing[:5]}"
