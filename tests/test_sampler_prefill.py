"""Chunked prefill of prompts longer than one prefill forward (core/sampler.py), with the chunk budget lowered to 8
tokens: the same logits and completions as one forward, and a refill of a long prompt stalls decoding one chunk."""

import pytest
import torch

import posttrain.core.sampler as S
from posttrain.core.model import KVCache
from posttrain.core.sampler import generate, sampler_stats
from tests.test_sampler import tiny_model

C = 8  # the lowered chunk budget (_PREFILL_TOKENS)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(1, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# 1 chunk + 1 token, exactly 2 and 3 chunks, 3 chunks + a remainder, and short prompts beside them.
PROMPTS = [prompt(n, i) for i, n in enumerate((9, 16, 3, 24, 27, 5))]


@torch.no_grad()
@pytest.mark.parametrize("garbage", [False, True])
def test_continuing_chunks_equal_the_full_forward(model, garbage):
    """Chunk 0 over its own keys into a scattered row, then chunks over that row's cache slots [0, end) (a one-row
    view, and the whole cache through row_index), one of them a single token: the logits of the full forward."""
    seq = torch.tensor([prompt(27, 9)])
    cache = KVCache(model.config, 3, 64, dtype=torch.float32, device="cpu")
    if garbage:  # slots past a chunk's end hold stale values: they must never be read
        cache.k.normal_()
        cache.v.normal_()
    row = torch.tensor([2])
    parts = [model(seq[:, :8], torch.arange(8)[None], kv_cache=KVCache.wrap(cache.k, cache.v, row, prefill=True))]
    for start, end, via_index in ((8, 16, False), (16, 17, False), (17, 25, True), (25, 27, False)):
        pos = torch.arange(start, end)[None]
        if via_index:
            view = KVCache.wrap(cache.k[:, :, :end], cache.v[:, :, :end], row)
        else:
            view = KVCache.wrap(cache.k[:, 2:3, :end], cache.v[:, 2:3, :end])
        parts.append(model(seq[:, start:end], pos, kv_cache=view))
    assert (torch.cat(parts, 1) - model(seq)).abs().max() < 1e-5


@torch.no_grad()
def test_first_token_logits_equal_a_full_recompute(model, monkeypatch):
    """The logits the first token is drawn from, after a chunked prefill, are the full forward's last logits."""
    seen = []
    real = S.sample

    def record(logits, params, u):
        seen.append(logits.clone())
        return real(logits, params, u)

    monkeypatch.setattr(S, "sample", record)
    monkeypatch.setattr(S, "_PREFILL_TOKENS", C)
    generate(model, PROMPTS, max_new_tokens=1, temperature=0.0)
    first = torch.cat(seen)  # rows in fill order: short prompts' batched prefill first, then each long one
    full = {i: model(torch.tensor([p]))[0, -1] for i, p in enumerate(PROMPTS)}
    matched = [min(full, key=lambda i: (full[i] - row).abs().max().item()) for row in first]
    assert sorted(matched) == list(range(len(PROMPTS)))  # every prompt once
    for i, row in zip(matched, first):
        assert (full[i] - row).abs().max() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("refill", [True, False])
@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=5)])
def test_chunked_completions_equal_one_forward(model, monkeypatch, refill, params):
    """Greedy and seeded draws, n = 2, rows scarce (refills while others decode) or plentiful: the same tokens and
    log-probs as with every prompt prefilled in one forward."""
    params = dict(params, stop_token_ids=(3, 7, 11, 13, 17, 19, 23, 29))  # rows end at different steps
    ref = generate(model, PROMPTS, max_new_tokens=12, n=2, **params)
    assert len({len(c.tokens) for c in ref}) > 2
    monkeypatch.setattr(S, "_PREFILL_TOKENS", C)
    for mbt in (None, 3 * 64):  # every sequence a row; 3 rows of 64 slots for 12 sequences
        S.free_cache(model)  # counters from zero
        out = generate(model, PROMPTS, max_new_tokens=12, n=2, refill=refill, max_batch_tokens=mbt, sync_every=3,
                       **params)
        assert [c.tokens for c in out] == [c.tokens for c in ref]
        for a, b in zip(out, ref):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
            assert a.raw_logprobs == pytest.approx(b.raw_logprobs, abs=1e-5)
        stats = sampler_stats(model)
        if mbt is None:  # lengths 27, 24, 16, 9 in 4, 3, 2, 2 chunks; 5 and 3 one forward each (8 // 5 = 1)
            assert stats["prefill_forwards"] == 13 and stats["prefill_tokens"] == 27 + 24 + 16 + 9 + 5 + 3
        assert stats["refill_stall_tokens"] <= C
        assert (stats["refilled_rows"] > 0) == (mbt is not None)
        if refill and mbt is not None:  # long prompts were refilled in chunks while other rows decoded
            assert stats["refill_stall_tokens"] == C


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_refill_of_a_long_prompt_runs_one_chunk_per_look(monkeypatch, fused):
    """Two rows: A and B decode, A stops early, long prompt D (27 tokens: 4 chunks) is refilled into A's row while
    B decodes: its chunks go one per look (sync_every decode steps between them), and completions do not change.
    The decode steps between D's chunks write D's waiting row too (plain or fused KV write): only at the slot its
    next chunk rewrites."""
    model = tiny_model(seed=2)
    prompts = [prompt(30, 20), prompt(29, 21), prompt(27, 22)]  # sorted longest first: A, B start, D waits
    free = generate(model, prompts, max_new_tokens=40, temperature=0.0, stop_token_ids=())
    a, b = free[0].tokens, free[1].tokens
    stop = next(t for t in a[:4] if t not in b)  # ends A within 4 tokens, never B
    ref = generate(model, prompts, max_new_tokens=40, temperature=0.0, stop_token_ids=[stop])
    assert len(ref[0].tokens) <= 4 and len(ref[1].tokens) == 40  # the setup this test needs

    monkeypatch.setattr(S, "_PREFILL_TOKENS", C)
    shapes = []
    hook = model.register_forward_hook(lambda m, args, kw, out: shapes.append(tuple(args[0].shape)), with_kwargs=True)
    try:
        out = generate(model, prompts, max_new_tokens=40, temperature=0.0, stop_token_ids=[stop],
                       max_batch_tokens=2 * 128, sync_every=2, fused_kernels=fused)
    finally:
        hook.remove()
    assert [c.tokens for c in out] == [c.tokens for c in ref]
    prefills = [i for i, s in enumerate(shapes) if s != (2, 1)]  # the rest are decode steps of both rows
    # A, B at once before decoding (30 and 29 tokens), then D (27 tokens) in 4 chunks.
    assert [shapes[i] for i in prefills] == [(1, 8)] * 3 + [(1, 6)] + [(1, 8)] * 3 + [(1, 5)] + [(1, 8)] * 3 + [(1, 3)]
    assert prefills[:8] == list(range(8))
    chunks = prefills[8:]
    assert [j - i - 1 for i, j in zip(chunks, chunks[1:])] == [2, 2, 2]  # one chunk per look, 2 decode steps between
    assert len(shapes) - chunks[-1] - 1 >= 39  # then D decodes its 39 further tokens
    assert sampler_stats(model)["refill_stall_tokens"] == C
