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


def both_paths(monkeypatch, fn, module, fallback):
    """fn() through a Triton kernel (compiled on CUDA, the interpreter on CPU) and through its plain-torch fallback,
    asserting that each path really ran (a comparison of the fallback with itself would prove nothing): (kernel
    result, fallback result). `module`'s use_triton is switched off for the second run, and its `fallback` function
    must run there only."""
    calls = []
    real = getattr(module, fallback)
    monkeypatch.setattr(module, fallback, lambda *a: calls.append(1) or real(*a))
    out_t = fn()
    assert not calls, "the Triton path did not run: are the inputs on DEV, and is Triton importable?"
    with monkeypatch.context() as mp:
        mp.setattr(module, "use_triton", lambda t: False)
        out_f = fn()
    assert calls, "the fallback did not run"
    return out_t, out_f


def _interpreter_problem() -> str | None:
    """None when Triton's interpreter runs what every kernel here relies on, else what it gets wrong. Seen wrong:
    triton 3.6 with NumPy >= 2.4 cannot loop `for start in range(0, n, BLOCK)` with n a kernel argument (it calls
    int() on a 1-element array, which NumPy 2.4 refuses); triton 3.2 stores through a scalar mask that is False
    (the kernels flag bad target ids so); triton 3.3 cannot negate a boolean (`~mask`). Either way many kernel
    tests would fail far from the cause."""
    import numpy
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr, flag_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], tl.int32)
        for start in range(0, n, BLOCK):
            acc += 1
        tl.store(out_ptr + tl.arange(0, BLOCK), acc)
        tl.store(flag_ptr, 1, mask=n > 100)  # a scalar mask, False here: nothing may be stored
        tl.store(flag_ptr, 1, mask=~(n < 100))  # a negated boolean (triton 3.3's interpreter cannot)

    out, flag = torch.zeros(4, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    versions = f"Triton {triton.__version__}'s interpreter (NumPy {numpy.__version__})"
    fix = "Seen right: Triton 3.9.0 with NumPy 2.4; 3.8.0 and 3.6.0 with NumPy < 2.4. Install one of those, then rerun."
    try:
        _probe[(1,)](out, flag, 10, BLOCK=4)
    except Exception as e:  # noqa: BLE001 - reported whole below
        return f"{versions} fails on a loop, a scalar mask or a negated mask in a probe kernel ({e}). {fix}"
    if out.tolist() != [3, 3, 3, 3]:
        return f"{versions} ran a 3-trip loop {out.tolist()[0]} times. {fix}"
    if flag.item() != 0:
        return f"{versions} stored through a scalar mask that is False. {fix}"
    return None


def pytest_sessionstart(session):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    problem = _interpreter_problem()
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
