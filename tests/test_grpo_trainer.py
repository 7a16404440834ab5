"""train/grpo.py end to end, and the model-level head-loss seam it trains through (core/model.py `head_loss=`)."""

import torch

from core.model import ModelConfig, Transformer
from kernels.grpo import grpo_loss_reference, linear_grpo_loss


def test_head_loss_seam_equals_the_loss_on_materialized_logits():
    """model(ids, head_loss=f) runs f(hidden, lm_head.weight) inside the lm-head call: the GRPO loss and every
    parameter gradient equal those of the plain loss on the model's logits (tied and untied heads)."""
    for tied in (True, False):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
        model = Transformer(cfg).double()
        model.init_weights(seed=0)
        ids = torch.randint(0, 53, (3, 9))
        targets = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], 1)
        mask = (torch.rand(3, 9) < 0.8).double()
        old = -torch.rand(3, 9, dtype=torch.float64) * 4
        adv = torch.randn(3, dtype=torch.float64)
        kw = dict(loss_type="grpo", eps_low=0.2, eps_high=0.28)

        loss, _ = model(ids, head_loss=lambda h, w: linear_grpo_loss(h, w, targets, old, adv, mask, **kw))
        loss.backward()
        fused = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()

        logp = torch.log_softmax(model(ids), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        ref, _ = grpo_loss_reference(logp, old, adv, mask * (targets != -100), **kw)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-9)  # the row pass keeps fp32 pieces
        for n, p in model.named_parameters():
            torch.testing.assert_close(fused[n], p.grad, rtol=1e-5, atol=1e-8, msg=n)
