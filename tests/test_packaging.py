"""The installed distribution must not be mistaken for another library (see the note in setup.py)."""

import importlib.metadata

import pytest


def test_transformers_does_not_take_our_kernels_package_for_hub_kernels():
    utils = pytest.importorskip("transformers.utils")
    version = importlib.metadata.version("posttrain")
    major, minor, patch = (int(x) for x in version.split(".")[:3])
    assert not ((0, 18, 2) <= (major, minor, patch) < (0, 19, 0)), version
    assert utils.is_kernels_available() is False


def test_packages_import():
    import bench  # noqa: F401
    import core  # noqa: F401
    import eval  # noqa: F401
    import kernels  # noqa: F401
    import train  # noqa: F401
