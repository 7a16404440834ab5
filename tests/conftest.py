import os
from pathlib import Path

import pytest

# Triton runs on CPU only through its interpreter, which must be chosen before triton is imported.
if not os.environ.get("TRITON_INTERPRET"):
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def _interpreter_loops_over_runtime_bounds() -> str | None:
    """None when Triton's interpreter can run `for start in range(0, n, BLOCK)` with n a kernel argument (every
    kernel here loops so), else why not. Triton 3.6's interpreter turns n into a 1-element array and calls int() on
    it, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); every kernel
    test would then fail with that message, far from its cause."""
    import numpy
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], tl.int32)
        for start in range(0, n, BLOCK):
            acc += 1
        tl.store(out_ptr + tl.arange(0, BLOCK), acc)

    out = torch.zeros(4, dtype=torch.int32)
    try:
        _probe[(1,)](out, 10, BLOCK=4)
    except Exception as e:  # noqa: BLE001 - reported whole below
        return (f"Triton {triton.__version__}'s interpreter cannot loop up to a kernel argument with NumPy "
                f"{numpy.__version__} ({e}). Install 'numpy<2.4' or a newer Triton (3.9.0 works), then rerun.")
    if out.tolist() != [3, 3, 3, 3]:
        return f"Triton {triton.__version__}'s interpreter ran a 3-trip loop {out.tolist()[0]} times"
    return None


def pytest_sessionstart(session):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    problem = _interpreter_loops_over_runtime_bounds()
    if problem:
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
