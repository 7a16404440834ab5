"""kernels/sample.py: the fused sampling kernel against the plain-torch reference, same uniforms, token for token.

Runs the Triton kernel under TRITON_INTERPRET=1 on CPU (tiny vocabularies, a 32-wide tile so every row spans
several tiles and a ragged last one); the distributional checks of the reference itself are in test_sampler.py.
"""

import pytest
import torch

from posttrain.core.sampler import SamplingParams
from posttrain.kernels._utils import use_triton
from posttrain.kernels.sample import fused_sample, sample, sample_reference

pytestmark = pytest.mark.skipif(not use_triton(torch.empty(0)) and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def both(logits, params, u, block=32):
    return fused_sample(logits, params, u, block=block), sample_reference(logits, params, u)


def assert_same(a, b):
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    assert (a[1] - b[1]).abs().max() < 1e-5
    assert (a[2] - b[2]).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.0, top_k=7),
    SamplingParams(temperature=1.4, top_p=0.7),
    SamplingParams(temperature=0.8, min_p=0.1),
    SamplingParams(temperature=1.1, top_k=30, top_p=0.9, min_p=0.02),
])
def test_fused_equals_reference(dtype, params):
    g = torch.Generator().manual_seed(sum(map(ord, repr(params) + str(dtype))))
    B, V = 6, 101
    logits = (torch.randn(B, V, generator=g) * 2.5).to(dtype).to(DEV)
    u = torch.rand(B, generator=g).to(DEV)
    assert_same(*both(logits, params, u))


def sweep(row, params, n=24):
    """One row against n uniforms spread over (0, 1), the extremes included: equal tokens for all of them pin down
    the kept set and the CDF boundaries, not just one draw."""
    u = torch.cat([torch.tensor([2.0**-24, 1.0 - 2.0**-24]), torch.linspace(0.01, 0.99, n - 2)]).to(DEV)
    return both(row.expand(n, -1).contiguous(), params, u)


def test_ties_at_the_top_k_threshold_are_kept():
    row = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.5, 2.0, -1.0] * 5 + [2.0], device=DEV)  # the 3rd value has 16 copies
    a, b = sweep(row, SamplingParams(temperature=1.0, top_k=3))
    assert_same(a, b)
    drawn = set(a[0].tolist())
    assert all(row[t] >= 2.0 for t in drawn) and len(drawn) > 3  # 3.0 and copies of 2.0 past the 3rd, nothing else


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_p=1e-6),
    SamplingParams(temperature=2.0, min_p=0.999),
    SamplingParams(temperature=0.5, top_k=50, top_p=1e-3, min_p=0.9),
])
def test_a_single_allowed_token(params):
    g = torch.Generator().manual_seed(1)
    row = torch.randn(77, generator=g).to(DEV)
    a, b = sweep(row, params)
    assert_same(a, b)
    assert (a[0] == row.argmax()).all() and a[1].abs().max() < 1e-6  # a point mass: log-prob 0


def test_filters_never_leave_an_empty_set():
    # The maximum survives every filter: with -inf entries, ties at the top, the strictest settings, a row whose
    # first tiles are all -inf, and huge logits, every draw is a finite-logit token with a finite log-prob.
    row = torch.full((70,), float("-inf"), device=DEV)
    row[64:] = torch.tensor([5.0, 5.0, -3.0, 60.0, 60.0, 0.0], device=DEV)
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.3, top_k=1, top_p=1e-9, min_p=0.99),
                   SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=0.0)):
        a, b = sweep(row, params)
        assert_same(a, b)
        assert set(a[0].tolist()) <= ({67, 68} if params.temperature > 0 else {67})
        assert torch.isfinite(a[1]).all() and torch.isfinite(a[2]).all()


def test_greedy_takes_the_first_maximum():
    row = torch.tensor([0.0, 2.0, 1.0] + [2.0] * 40, device=DEV)
    a, b = sweep(row, SamplingParams(temperature=0.0), n=3)
    assert_same(a, b)
    assert (a[0] == 1).all()


def test_top_p_boundary_mass():
    # Probabilities 1/2, 1/4, 1/8, ...: top_p 0.75 keeps exactly the first two (mass above the third is 0.75).
    V = 20
    row = torch.arange(V, dtype=torch.float32).neg().mul(torch.log(torch.tensor(2.0))).to(DEV)[torch.randperm(V)]
    a, b = sweep(row, SamplingParams(temperature=1.0, top_p=0.75), n=40)
    assert_same(a, b)
    assert set(a[0].tolist()) == set(row.topk(2).indices.tolist())


def test_dispatch_and_bad_input():
    logits = torch.randn(3, 10, device=DEV)
    u = torch.rand(3, device=DEV)
    assert_same(sample(logits, SamplingParams(), u), sample_reference(logits, SamplingParams(), u))
    with pytest.raises(ValueError, match="need u"):
        fused_sample(logits, SamplingParams(), None)
    with pytest.raises(ValueError, match="dtype"):
        fused_sample(logits.double(), SamplingParams(), u)
    with pytest.raises(ValueError, match="contiguous rows"):
        fused_sample(logits.t(), SamplingParams(), u)
    # A strided row view (every other row of a batch) is fine: rows need only be contiguous themselves.
    big = torch.randn(6, 10, device=DEV)
    assert_same(fused_sample(big[::2], SamplingParams(top_p=0.9), u), sample_reference(big[::2], SamplingParams(top_p=0.9), u))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_p=0.8)])
def test_fused_sample_step_equals_reference(params):
    """The decode step's tail in one launch: per-row uniform and output column, live rows advance, stop ids and the
    length limit set done, done rows change nothing that is read."""
    from posttrain.kernels.sample import fused_sample_step, sample_step_reference

    g = torch.Generator().manual_seed(3)
    R, V, T = 5, 40, 4
    logits = torch.randn(R, V, generator=g).to(DEV)
    stop = int(logits[1].argmax())  # row 1 draws its argmax greedily: a stop
    state = dict(u=torch.rand(R, T + 1, generator=g).to(DEV), step=torch.tensor([0, 1, 3, 2, 4], device=DEV),
                 out_tokens=torch.zeros(R, T + 1, dtype=torch.long, device=DEV),
                 out_logprobs=torch.zeros(R, T + 1, device=DEV), out_raw=torch.zeros(R, T + 1, device=DEV),
                 tokens=torch.zeros(R, dtype=torch.long, device=DEV), positions=torch.tensor([3, 9, 4, 7, 8], device=DEV),
                 done=torch.tensor([False, False, False, True, True], device=DEV),
                 stop_ids=torch.tensor([stop, 1000], device=DEV))
    results = []
    for fn in (fused_sample_step, sample_step_reference):
        st = {k: v.clone() for k, v in state.items()}
        fn(logits, params, st["u"], st["step"], st["out_tokens"], st["out_logprobs"], st["out_raw"], st["tokens"],
           st["positions"], st["done"], st["stop_ids"])
        results.append(st)
    a, b = results
    for k in ("step", "out_tokens", "tokens", "positions", "done"):
        assert torch.equal(a[k], b[k]), k
    assert (a["out_logprobs"] - b["out_logprobs"]).abs().max() < 1e-5
    assert (a["out_raw"] - b["out_raw"]).abs().max() < 1e-5
    assert a["step"].tolist() == [1, 2, 4, 2, 4] and a["positions"].tolist() == [4, 10, 5, 7, 8]
    assert a["done"].tolist()[2:] == [True, True, True]  # row 2 reached T; rows 3, 4 were done
    if params.temperature == 0.0:
        assert a["done"][1]  # drew the stop id


@pytest.mark.gpu
def test_gpu_fused_sampling_at_full_vocabulary():
    """Compiled, bf16 logits of Qwen2's vocabulary (151936), 4096-wide tiles: the reference's tokens for the same
    uniforms, every filter combination."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (4 * torch.randn(64, 151936, device="cuda", generator=g)).to(torch.bfloat16)
    u = torch.rand(64, device="cuda", generator=g)
    for params in (SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(temperature=0.7, top_k=50),
                   SamplingParams(top_p=0.9), SamplingParams(temperature=1.2, top_k=200, top_p=0.95, min_p=0.05)):
        a, b = fused_sample(logits, params, u), sample_reference(logits, params, u)
        assert (a[0] == b[0]).float().mean() >= 63 / 64  # a draw within float rounding of a boundary may differ
        same = a[0] == b[0]
        assert (a[1] - b[1])[same].abs().max() < 1e-4 and (a[2] - b[2])[same].abs().max() < 1e-4
