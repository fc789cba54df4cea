"""TRL's combined objective (loss_type list + loss_weights, "sft") against independent computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mallowspo.losses import preference_loss
from mallowspo.objective import check_objective, combined_loss, sft_loss

f64 = torch.float64


def per_token_batch(seed=0, batch=5, max_len=7):
    """Per-token log-probs (B, T) with a ragged completion mask, and their per-row sums."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).to(f64)
    tokens = -torch.rand(batch, max_len, generator=g, dtype=f64) * 3
    return tokens, mask, lengths, (tokens * mask).sum(1)


def test_sft_is_minus_the_mean_chosen_token_log_prob_over_the_batch():
    tokens, mask, lengths, sums = per_token_batch()
    expected = -tokens[mask.bool()].mean()  # trl 1.16: -chosen_per_token_logps[chosen_mask].mean()
    out = sft_loss(sums, lengths)
    assert out.shape == (5,)
    torch.testing.assert_close(out, expected.expand(5))


def test_weighted_terms_with_the_mallows_modifier_on_each_preference_term():
    tokens_c, _, len_c, pc = per_token_batch(1)
    _, _, len_r, pr = per_token_batch(2)
    g = torch.Generator().manual_seed(3)
    rc, rr = pc + torch.randn(5, generator=g, dtype=f64), pr + torch.randn(5, generator=g, dtype=f64)
    L = torch.tensor([0.3, 0.8, 1.0, 1.7, 3.0], dtype=f64)
    lengths = dict(chosen_lengths=len_c, rejected_lengths=len_r)
    options = dict(beta=0.2, mallows="theta", neg_log_phi=L)
    out = combined_loss(
        pc, pr, rc, rr, loss_types=["sigmoid", "ipo", "sft"], loss_weights=[0.8, 0.3, 1.5], **lengths, **options
    )
    # Independently: theta is beta * L(x) in DPO (Prop. 4); the authors' MallowsIPO on per-token means.
    delta = (pc - rc) - (pr - rr)
    dpo = -F.logsigmoid(0.2 * L * delta)
    per_token_delta = (pc - rc) / len_c - (pr - rr) / len_r
    ipo = (L * per_token_delta - 1 / (2 * 0.2)) ** 2
    sft = -pc.sum() / len_c.sum()
    torch.testing.assert_close(out.losses.mean(), 0.8 * dpo.mean() + 0.3 * ipo.mean() + 1.5 * sft)
    torch.testing.assert_close(out.terms["sigmoid"], dpo)
    torch.testing.assert_close(out.terms["ipo"], ipo)
    # The metrics' rewards come from the first preference term, as preference_loss reports them.
    first = preference_loss(pc, pr, rc, rr, loss_type="sigmoid", **lengths, **options)
    torch.testing.assert_close(out.preference.chosen_rewards, first.chosen_rewards)


def test_default_weights_are_one_and_a_single_term_is_preference_loss():
    _, _, len_c, pc = per_token_batch(4)
    _, _, len_r, pr = per_token_batch(5)
    rc, rr = pc * 0.9, pr * 1.1
    lengths = dict(chosen_lengths=len_c, rejected_lengths=len_r)
    single = combined_loss(pc, pr, rc, rr, loss_types=["hinge"], beta=0.5, **lengths)
    torch.testing.assert_close(single.losses, preference_loss(pc, pr, rc, rr, loss_type="hinge", beta=0.5).losses)
    both = combined_loss(pc, pr, rc, rr, loss_types=["hinge", "sft"], beta=0.5, **lengths)
    torch.testing.assert_close(both.losses, single.losses + sft_loss(pc, len_c))


def test_sft_gradient_matches_finite_differences():
    _, _, lengths, sums = per_token_batch(6)
    sums = sums.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: sft_loss(s, lengths).sum(), (sums,))


@pytest.mark.parametrize(
    "loss_types,weights,mallows,message",
    [
        ([], None, "none", "must be a non-empty list"),
        (["sigmoid", "kto"], None, "none", "unknown loss_type 'kto'; choose one of"),
        (["sft"], None, "none", "loss_type ['sft'] alone is supervised fine-tuning"),
        (["sigmoid", "sigmoid"], None, "none", "lists a term twice"),
        (["sigmoid", "sft"], [1.0], "none", "loss_weights has 1 values for 2 loss types"),
        (["sigmoid", "sft"], [1.0, -0.5], "none", "loss_weights must be finite numbers >= 0"),
        (["sigmoid", "hinge"], None, "phi", "mallows='phi' replaces the logistic link, which loss_type='hinge'"),
    ],
)
def test_bad_objectives_are_one_line_errors(loss_types, weights, mallows, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")) as error:
        check_objective(loss_types, weights, mallows, beta=0.1)
    assert "\n" not in str(error.value)
