"""RL math for the GRPO trainer as pure functions of tensors: advantages, reward shaping, group statistics.

Everything here is a function of tensors with no model, optimizer or process group in sight (verl's `core_algos`
style), so each formula is unit-tested against hand-computed values (tests/test_rl.py). The policy loss itself is a
kernel (kernels/grpo.py: `linear_grpo_loss`, beside its plain reference `grpo_loss_reference`); the trainer that
wires these together is train/grpo.py.

Shapes: rewards and advantages of one step are [P, G] (P prompts, G completions each); per-completion vectors are
[N] with N = P * G in (prompt, sample) order.
"""

from __future__ import annotations

import torch

ADVANTAGES = ("grpo", "dr_grpo", "rloo")


def group_advantages(rewards: torch.Tensor, *, mode: str, eps: float = 1e-6) -> torch.Tensor:
    """Advantages [P, G] of rewards [P, G], each completion compared with the other completions of its prompt.

    "grpo":    (r - group mean) / (group std + eps), std with Bessel's correction (as TRL and verl compute it)
    "dr_grpo": r - group mean (Dr. GRPO: no std division, which would up-weight near-unanimous groups)
    "rloo":    r - mean of the other G - 1 rewards = G / (G - 1) * (r - group mean) (leave-one-out baseline)

    A group whose rewards are all equal gets advantage 0 in every mode (it carries no signal). G = 1 gives 0 for
    "grpo" and "dr_grpo"; "rloo" needs G >= 2.
    """
    if rewards.dim() != 2:
        raise ValueError(f"group_advantages: rewards must be [P, G], got {tuple(rewards.shape)}")
    G = rewards.shape[1]
    r = rewards.to(torch.float64) if rewards.dtype != torch.float64 else rewards
    centred = r - r.mean(dim=1, keepdim=True)
    if mode == "grpo":
        std = r.std(dim=1, keepdim=True) if G > 1 else torch.zeros_like(centred[:, :1])
        out = centred / (std + eps)
    elif mode == "dr_grpo":
        out = centred
    elif mode == "rloo":
        if G < 2:
            raise ValueError("group_advantages: mode 'rloo' needs at least 2 completions per prompt")
        out = centred * (G / (G - 1))
    else:
        raise ValueError(f"group_advantages: unknown mode {mode!r}; use one of {', '.join(ADVANTAGES)}")
    return out.to(rewards.dtype) if rewards.is_floating_point() else out


def batch_normalize(advantages: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Whiten advantages over the whole batch: (a - mean) / (std + eps), std with Bessel's correction (REINFORCE++'s
    batch normalisation; with "dr_grpo" group centring it is the "group mean, batch std" of Lite PPO). A batch of
    one value, or of equal values, gives zeros."""
    a = advantages.to(torch.float64)
    if a.numel() < 2:
        return torch.zeros_like(advantages)
    return ((a - a.mean()) / (a.std() + eps)).to(advantages.dtype)


def zero_variance_groups(rewards: torch.Tensor, tol: float = 1e-9) -> int:
    """How many of the P groups of rewards [P, G] have all G rewards equal (within tol): they get zero advantage."""
    return int(((rewards.max(dim=1).values - rewards.min(dim=1).values) <= tol).sum())


def overlong_penalty(lengths: torch.Tensor, *, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, <= 0 per completion: 0 up to max_len - buffer tokens, then falling linearly
    to -factor at max_len (and below it past max_len). buffer = 0 turns it off."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float64)
    if buffer > max_len:
        raise ValueError(f"overlong_penalty: buffer {buffer} is longer than max_len {max_len}")
    over = (lengths.to(torch.float64) - (max_len - buffer)).clamp(min=0)
    return -factor * over / buffer


def combine_rewards(correct: torch.Tensor, *, correct_weight: float = 1.0, format_ok: torch.Tensor | None = None,
                    format_weight: float = 0.0, extra: torch.Tensor | None = None,
                    extra_weights: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                    max_len: int = 0, overlong_buffer: int = 0, overlong_factor: float = 1.0) -> torch.Tensor:
    """Reward [N] (float64) = correct_weight * correct + format_weight * format_ok + extra @ extra_weights
    + overlong_penalty(lengths). correct/format_ok: [N] bool or float; extra: [N, K] scores of K reward functions
    with their weights [K]; lengths: [N] completion lengths in tokens (needed when overlong_buffer > 0)."""
    r = correct_weight * correct.to(torch.float64)
    if format_ok is not None and format_weight:
        r = r + format_weight * format_ok.to(torch.float64)
    if extra is not None and extra.numel():
        if extra_weights is None or extra.shape[1:] != extra_weights.shape:
            raise ValueError("combine_rewards: extra [N, K] needs extra_weights [K]")
        r = r + extra.to(torch.float64) @ extra_weights.to(torch.float64)
    if overlong_buffer > 0:
        if lengths is None:
            raise ValueError("combine_rewards: overlong_buffer > 0 needs the completion lengths")
        r = r + overlong_penalty(lengths, max_len=max_len, buffer=overlong_buffer, factor=overlong_factor)
    return r


def token_weights(mask: torch.Tensor, *, loss_type: str, max_completion_length: int,
                  num_sequences: float | None = None, num_tokens: float | None = None) -> torch.Tensor:
    """The weight W [B, L] of each token's loss in a loss type's reduction (loss = sum W * per_token_loss), over a
    batch that may be a slice of a larger one of `num_sequences` sequences and `num_tokens` active tokens (default:
    this batch's). "grpo": 1 / (n_b * S); "bnpo" and "dapo": 1 / N; "dr_grpo": 1 / (S * max_completion_length).
    What kernels/grpo.py computes per micro-batch, written out for the on-policy test and for readers."""
    m = mask.to(torch.float64)
    S = float(num_sequences if num_sequences is not None else m.shape[0])
    N = float(num_tokens if num_tokens is not None else m.sum().clamp(min=1.0))
    if loss_type == "grpo":
        return m / (m.sum(1, keepdim=True).clamp(min=1.0) * S)
    if loss_type in ("bnpo", "dapo"):
        return m / N
    if loss_type == "dr_grpo":
        return m / (S * max_completion_length)
    raise ValueError(f"token_weights: unknown loss_type {loss_type!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over mask (0.0 when the mask is empty)."""
    m = mask.to(torch.float64)
    return float((x.to(torch.float64) * m).sum() / m.sum().clamp(min=1.0))
