"""core/model.py against plain references: packed forward, KV-cache seam, hidden states, init, meta construction."""

import pytest
import torch

from posttrain.core.model import KVCache, ModelConfig, Transformer, document_mask


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                max_position_embeddings=128)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(params=[{}, {"qkv_bias": True}, {"qk_norm": True, "head_dim": 24}], ids=["llama", "qwen2", "qwen3"])
def model(request):
    torch.manual_seed(0)
    m = Transformer(tiny(**request.param)).eval()
    m.init_weights(seed=0)
    if m.config.qkv_bias:  # zero biases would hide a bias bug
        for layer in m.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_(0, 0.5)
    return m


def test_packed_forward_equals_separate_documents(model):
    lengths = [5, 1, 9, 7]  # a one-token document included
    docs = [torch.randint(0, 97, (n,)) for n in lengths]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, pos)[0]
        separate = torch.cat([model(d[None])[0] for d in docs])
    assert (packed - separate).abs().max().item() < 1e-5
    # And the same documents packed into two rows of a batch
    ids2 = torch.stack([torch.cat(docs[:2] + [docs[3][:5]]), torch.cat(docs[2:3] + [docs[3][:2]])[:11]])
    pos2 = torch.stack([torch.cat([torch.arange(5), torch.arange(1), torch.arange(5)]),
                        torch.cat([torch.arange(9), torch.arange(2)])])
    with torch.no_grad():
        out = model(ids2, pos2)
        ref_a = torch.cat([model(docs[0][None])[0], model(docs[1][None])[0], model(docs[3][None, :5])[0]])
    assert (out[0] - ref_a).abs().max().item() < 1e-5


def test_document_mask_shape_and_blocks():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    m = document_mask(pos)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(m, expected.bool())


def test_hidden_times_lm_head_is_logits(model):
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        hidden = model(ids, return_hidden=True)
        assert hidden.shape == (2, 13, 64)
        assert torch.allclose(hidden @ model.lm_head.weight.T, model(ids), atol=1e-6)


def test_kv_cache_prefill_then_decode_equals_full_forward(model):
    """Rows of different lengths written at their own positions; stale slots beyond a row's position are masked."""
    B, max_len = 3, 40
    cache = KVCache(model.config, B, max_len, dtype=torch.float32, device="cpu")
    cache.k.normal_()  # garbage in unwritten slots must never be read
    cache.v.normal_()
    lengths = torch.tensor([4, 9, 6])
    seqs = torch.randint(0, 97, (B, 20))
    with torch.no_grad():
        # Prefill right-padded prompts: pad positions write slots >= length, overwritten before they become visible.
        S = int(lengths.max())
        pos = torch.arange(S).expand(B, S)
        model(seqs[:, :S], pos, kv_cache=cache)
        cur = lengths.clone()
        for _ in range(8):  # decode: each row feeds its own next true token at its own position
            tok = seqs[torch.arange(B), cur][:, None]
            logits = model(tok, cur[:, None], kv_cache=cache)[:, 0]
            for b in range(B):
                full = model(seqs[b : b + 1, : cur[b] + 1])[0, -1]
                assert (logits[b] - full).abs().max().item() < 1e-5
            cur += 1
    # A view over some rows writes into the parent cache
    view = cache.rows(1, 2)
    assert view.k.data_ptr() == cache.k[:, 1].data_ptr() and view.batch_size == 2


def test_kv_cache_needs_positions(model):
    cache = KVCache(model.config, 1, 8, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)


def test_meta_construction_then_init_is_reproducible():
    cfg = tiny(tie_word_embeddings=True)
    a = Transformer(cfg)
    a.init_weights(seed=3)
    with torch.device("meta"):
        b = Transformer(cfg)
    b = b.to_empty(device="cpu")
    b.tie_weights()
    b.init_weights(seed=3)
    assert b.lm_head.weight is b.embed_tokens.weight
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    # init: norms are one, output projections have the smaller std
    assert torch.equal(a.norm.weight, torch.ones(64))
    std_o = a.layers[0].self_attn.o_proj.weight.std().item()
    std_q = a.layers[0].self_attn.q_proj.weight.std().item()
    assert std_o < 0.7 * std_q


def test_bf16_forward_runs_and_is_close_to_fp32(model):
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = model(ids)
        out = model.to(torch.bfloat16)(ids).float()
    assert (out - ref).abs().max().item() < 0.1


@pytest.mark.parametrize("bad,match", [
    (dict(num_heads=4, num_kv_heads=3), "multiple of model.num_kv_heads"),
    (dict(architecture="GPT2LMHeadModel"), "supported: LlamaForCausalLM"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn' is not supported"),
    (dict(hidden_size=0), "hidden_size must be positive"),
])
def test_bad_model_config(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)


def test_num_params_matches_module():
    for kw in ({}, {"qkv_bias": True}, {"qk_norm": True}, {"tie_word_embeddings": True}):
        m = Transformer(tiny(**kw))
        assert m.config.num_params() == sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------- flash-attn branches, with a CPU stand-in
# The GPU machine has no flash-attn, so these branches never ran anywhere. The stand-ins implement flash-attn 2's
# documented contract (q [T, heads, D], k/v [T, kv_heads, D], int32 cu_seqlens on q's device, query head h reads
# kv head h // (heads / kv_heads), causal within each sequence) with SDPA per sequence, and check their inputs.


def _flash_varlen_standin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                          softmax_scale=None, causal=False):
    T, H, D = q.shape
    assert k.shape == v.shape == (T, k.shape[1], D) and H % k.shape[1] == 0
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    for cu in (cu_seqlens_q, cu_seqlens_k):
        assert cu.dtype == torch.int32 and cu.device == q.device and cu.dim() == 1
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q[0] == 0 and cu_seqlens_q[-1] == T
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    assert min(lengths) > 0 and max_seqlen_q == max_seqlen_k == max(lengths)
    assert isinstance(max_seqlen_q, int)
    out, rep = torch.empty_like(q), H // k.shape[1]
    for s, e in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        out[s:e] = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1)
    return out


def _flash_func_standin(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    B, S, H, D = q.shape
    assert k.shape[:2] == (B, S) and k.shape == v.shape
    cu = torch.arange(0, B * S + 1, S, dtype=torch.int32, device=q.device)
    out = _flash_varlen_standin(q.reshape(B * S, H, D), k.reshape(B * S, -1, D), v.reshape(B * S, -1, D),
                                cu, cu, S, S, causal=causal)
    return out.view(B, S, H, D)


@pytest.fixture
def flash_standin(monkeypatch):
    """Route Transformer's attention through the flash-attn branches (as on CUDA with flash-attn installed)."""
    import posttrain.core.model as cm
    monkeypatch.setattr(cm, "flash_attn_func", _flash_func_standin, raising=False)
    monkeypatch.setattr(cm, "flash_attn_varlen_func", _flash_varlen_standin, raising=False)
    sdpa_layout = Transformer.attention_layout

    def flash_layout(self, position_ids, B, S, device, dtype, cache):
        layout = sdpa_layout(self, position_ids, B, S, device, dtype, cache)
        if cache is not None:
            return layout
        if position_ids is None:
            return cm.AttentionLayout(layout.position_ids, use_flash=True)
        cu, max_len = cm.cu_seqlens_from_positions(position_ids)
        return cm.AttentionLayout(position_ids, cu_seqlens=cu, max_seqlen=max_len)

    monkeypatch.setattr(Transformer, "attention_layout", flash_layout)


def test_flash_attn_branches_equal_sdpa(model, flash_standin):
    # Packed rows (a one-token document, trailing padding as 0-position tokens, a row that is one document), a
    # batch of one, and an unpacked forward (flash_attn_func).
    torch.manual_seed(1)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 0, 1, 2, 0, 0, 0],
                        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    ids = torch.randint(0, 97, pos.shape)
    with torch.no_grad():
        got_packed, got_one, got_plain = model(ids, pos), model(ids[1:], pos[1:]), model(ids)
    assert got_packed.shape == (2, 12, 97)
    import posttrain.core.model as cm
    with torch.no_grad():  # the reference: the blocks' SDPA branch with the block-diagonal causal mask
        x = model.embed_tokens(ids)
        attn = cm.AttentionLayout(pos, mask=document_mask(pos))
        cos, sin = cm.rope_cos_sin(model.config, pos, x.dtype)
        for layer in model.layers:
            x = layer(x, cos, sin, attn)
        want_packed = model.lm_head(model.norm(x))
    assert (got_packed - want_packed).abs().max().item() < 1e-5
    assert (got_one - want_packed[1:]).abs().max().item() < 1e-5
    assert (got_plain[1:] - want_packed[1:]).abs().max().item() < 1e-5  # row 1 is one document from 0


def test_cu_seqlens_from_positions():
    from posttrain.core.model import cu_seqlens_from_positions

    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4]])
    cu, max_len = cu_seqlens_from_positions(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 10, 15] and max_len == 5
    # A row that continues a document from the previous row still starts a new sequence (rows are independent).
    cu, max_len = cu_seqlens_from_positions(torch.tensor([[0, 1, 2], [3, 4, 0]]))
    assert cu.tolist() == [0, 3, 5, 6] and max_len == 3
