"""train/rl.py: every formula against values computed by hand."""

import pytest
import torch

from posttrain.train.rl import (
    batch_normalize, combine_rewards, group_advantages, masked_mean, overlong_penalty, token_weights,
    zero_variance_groups,
)  # fmt: skip

R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]], dtype=torch.float64)


def test_group_advantages_by_hand():
    # group 0: mean 0.5, Bessel std sqrt(1/3); group 1: all equal; group 2: mean 0.75, Bessel std 1.5
    s = (1 / 3) ** 0.5
    grpo = torch.tensor([[0.5 / (s + 1e-6), -0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0.5 / (s + 1e-6)], [0.0] * 4,
                         [2.25 / 1.500001, -0.75 / 1.500001, -0.75 / 1.500001, -0.75 / 1.500001]], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(R, mode="grpo"), grpo, rtol=1e-12, atol=1e-12)
    dr = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [2.25, -0.75, -0.75, -0.75]], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(R, mode="dr_grpo"), dr)
    # rloo: r minus the mean of the other three (group 0, r=1: 1 - 1/3; group 2, r=3: 3 - 0; r=0: 0 - 1)
    rloo = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0] * 4, [3.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(R, mode="rloo"), rloo)
    assert group_advantages(R.float(), mode="grpo").dtype == torch.float32
    assert group_advantages(R[:, :1], mode="grpo").abs().sum() == 0  # G = 1: no baseline, no signal
    with pytest.raises(ValueError, match="rloo"):
        group_advantages(R[:, :1], mode="rloo")
    with pytest.raises(ValueError, match="unknown mode"):
        group_advantages(R, mode="ppo")
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        group_advantages(R.flatten(), mode="grpo")


def test_batch_normalize_and_zero_variance_groups():
    a = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)  # mean 3, Bessel std sqrt(14/3)
    std = (14 / 3) ** 0.5
    torch.testing.assert_close(batch_normalize(a, eps=0.0), (a - 3) / std)
    assert batch_normalize(torch.ones(5)).abs().sum() == 0 and batch_normalize(torch.ones(1)).item() == 0
    assert zero_variance_groups(R) == 1
    assert zero_variance_groups(torch.zeros(3, 8)) == 3


def test_overlong_penalty_and_combined_reward_by_hand():
    lengths = torch.tensor([10, 12, 14, 16, 17])
    # max_len 16, buffer 4: free up to 12 tokens, then -1/4 per token to -1 at 16
    torch.testing.assert_close(overlong_penalty(lengths, max_len=16, buffer=4),
                               torch.tensor([0.0, 0.0, -0.5, -1.0, -1.25], dtype=torch.float64))
    assert overlong_penalty(lengths, max_len=16, buffer=0).abs().sum() == 0
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_len=4, buffer=8)
    correct = torch.tensor([True, False, True, False, True])
    fmt = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    extra = torch.tensor([[0.5, 1.0], [0.0, 0.0], [1.0, -1.0], [0.2, 0.0], [0.0, 2.0]])
    r = combine_rewards(correct, correct_weight=2.0, format_ok=fmt, format_weight=0.5, extra=extra,
                        extra_weights=torch.tensor([1.0, 0.25]), lengths=lengths, max_len=16, overlong_buffer=4)
    # 2*c + 0.5*f + (e0 + 0.25 e1) + penalty
    want = [2 + 0.5 + 0.75 + 0, 0 + 0.5 + 0 + 0, 2 + 0 + 0.75 - 0.5, 0 + 0 + 0.2 - 1.0, 2 + 0.5 + 0.5 - 1.25]
    torch.testing.assert_close(r, torch.tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError, match="lengths"):
        combine_rewards(correct, overlong_buffer=4, max_len=16)


def test_token_weights_by_hand():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    # grpo: each sequence's mean, then the mean over 4 sequences (this batch is half of them)
    torch.testing.assert_close(token_weights(mask, loss_type="grpo", max_completion_length=4, num_sequences=4),
                               torch.tensor([[1 / 8, 1 / 8, 0, 0], [1 / 16] * 4], dtype=torch.float64))
    torch.testing.assert_close(token_weights(mask, loss_type="dapo", max_completion_length=4, num_tokens=12),
                               mask.double() / 12)
    torch.testing.assert_close(token_weights(mask, loss_type="bnpo", max_completion_length=4), mask.double() / 6)
    torch.testing.assert_close(token_weights(mask, loss_type="dr_grpo", max_completion_length=8),
                               mask.double() / 16)
    assert masked_mean(torch.tensor([[1.0, 3.0, 100.0, 100.0], [2.0] * 4]), mask) == pytest.approx(12 / 6)
    assert masked_mean(torch.ones(2, 2), torch.zeros(2, 2)) == 0.0


def test_edges_by_hand():
    """The smallest sizes and the boundaries of each formula: G = 2 (a pair), two values to whiten, a spread of
    exactly `tol`, a buffer as long as max_len or of one token, empty and single-token masks."""
    pair = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # mean 0.5, Bessel std sqrt(1/2)
    s = 0.5**0.5
    torch.testing.assert_close(group_advantages(pair, mode="grpo"),
                               torch.tensor([[0.5 / (s + 1e-6), -0.5 / (s + 1e-6)]], dtype=torch.float64))
    torch.testing.assert_close(group_advantages(pair, mode="rloo"), torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    two = torch.tensor([1.0, 3.0], dtype=torch.float64)  # mean 2, Bessel std sqrt(2)
    torch.testing.assert_close(batch_normalize(two, eps=0.0), torch.tensor([-(0.5**0.5), 0.5**0.5], dtype=torch.float64))
    a = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)  # eps is added to the std: (a - 3) / (sqrt(14/3) + 0.5)
    torch.testing.assert_close(batch_normalize(a, eps=0.5), (a - 3) / ((14 / 3) ** 0.5 + 0.5))
    assert zero_variance_groups(torch.tensor([[0.0, 0.5], [0.0, 0.75]]), tol=0.5) == 1  # a spread of tol is "equal"
    # buffer == max_len: the penalty starts at length 0; buffer 1: -1 per token past max_len - 1
    torch.testing.assert_close(overlong_penalty(torch.tensor([0, 2, 4]), max_len=4, buffer=4),
                               torch.tensor([0.0, -0.5, -1.0], dtype=torch.float64))
    torch.testing.assert_close(overlong_penalty(torch.tensor([3, 4, 5]), max_len=4, buffer=1),
                               torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64))
    correct = torch.tensor([True, False])
    torch.testing.assert_close(combine_rewards(correct, correct_weight=2.0),  # no penalty asked: no lengths needed
                               torch.tensor([2.0, 0.0], dtype=torch.float64))
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    torch.testing.assert_close(token_weights(mask, loss_type="grpo", max_completion_length=3),
                               torch.tensor([[0.0] * 3, [0.25, 0.25, 0.0]], dtype=torch.float64))
    assert token_weights(torch.zeros(2, 3), loss_type="bnpo", max_completion_length=3).abs().sum() == 0  # not NaN
    assert masked_mean(torch.tensor([[5.0, 7.0]]), torch.tensor([[0, 1]])) == 7.0


def test_advantages_are_computed_in_float64_whatever_the_rewards_dtype():
    """float32 rewards give the float64 result rounded once: [0.1, 0.7, 0.3, 0.9] in float32 arithmetic is off by an
    ulp in two places."""
    r = torch.tensor([[0.1, 0.7, 0.3, 0.9], [1.0, 0.0, 0.0, 1.0]])
    for mode in ("grpo", "dr_grpo", "rloo"):
        assert torch.equal(group_advantages(r, mode=mode), group_advantages(r.double(), mode=mode).float()), mode
    assert group_advantages(torch.tensor([[1, 0]]), mode="dr_grpo").dtype == torch.float64  # integer rewards


def test_combine_rewards_arguments_at_their_edges():
    correct = torch.tensor([True, False, True])
    # a format weight without format results adds nothing (no checker ran); a zero weight ignores them
    torch.testing.assert_close(combine_rewards(correct, format_weight=0.5), torch.tensor([1.0, 0.0, 1.0],
                                                                                          dtype=torch.float64))
    torch.testing.assert_close(combine_rewards(correct, format_ok=torch.ones(3), format_weight=0.0),
                               torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    extra = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"extra_weights \[K\]"):
        combine_rewards(correct, extra=extra)
    with pytest.raises(ValueError, match=r"extra_weights \[K\]"):
        combine_rewards(correct, extra=extra, extra_weights=torch.ones(3))
    torch.testing.assert_close(combine_rewards(correct, extra=torch.ones(3, 0)), correct.double())  # K = 0
    # a one-token buffer: -1 per token past max_len - 1, through combine_rewards as well
    torch.testing.assert_close(combine_rewards(correct, lengths=torch.tensor([3, 4, 5]), max_len=4, overlong_buffer=1),
                               torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
