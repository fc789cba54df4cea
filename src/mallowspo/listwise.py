"""Listwise preference losses: K ranked responses per prompt, with the Mallows modifier.

Notation: a prompt x has K responses y_1..y_K; ``ranks[b, k]`` is the observed rank of
response k (0 = best; only the order of the values matters; equal values are ties), as
``mallowspo.mallows.sample_kendall`` returns. The implicit rewards are

    r_k = beta * [log pi(y_k|x) - log pi_ref(y_k|x)]     (divided by |y_k| when length-normalised),
    r_k = beta * log pi(y_k|x) / |y_k|                   for SimPO (reference-free),

exactly as ``mallowspo.losses.preference_loss`` defines them. Two objectives:

    plackett_luce  (DPO paper, appendix A.3): the negative log-likelihood of the ranking,
                   picking the best remaining response stage by stage,
                       -sum_{i < top_k} [ r_(i) - logsumexp_{j >= i} r_(j) ],
                   where (i) is the response ranked i. top_k (default: the whole list) keeps
                   the first top_k stages. With K = 2 it is DPO (loss_type="sigmoid").
                   MallowsPO-theta replaces beta by beta * L(x), L(x) = -log phi(x), as in the
                   pairwise case. Supported: loss_type="sigmoid" with mallows "none" or "theta",
                   without label smoothing (the other combinations have no Plackett-Luce form;
                   use all_pairs for them).
    all_pairs      composite likelihood: the mean over the ordered pairs (i above j) of the
                   pairwise loss preference_loss(y_i, y_j), for every loss_type and Mallows
                   variant that preference_loss supports. With K = 2 it is preference_loss.

Weighting (all_pairs): each prompt's pairs share one unit of weight, i.e. a prompt's loss is
the mean of its pairs' losses, so ``losses.mean()`` weights prompts equally whatever their
number of responses, and a K = 2 prompt counts as it does in the pairwise loss.

Ties: tied responses form no pair (all_pairs). For plackett_luce a tied group G is one
stage whose choice is the group as a set, with Luce's choice probability
    P(G | R) = sum_{g in G} e^{r_g} / sum_{j in R} e^{r_j},   R = G and everything ranked below it,
so the stage contributes -[logsumexp_G r - logsumexp_R r]; the order within G is unobserved
and not modelled (a bottom tie contributes 0). Without ties this is the formula above.
top_k then keeps the stages of the groups that have fewer than top_k responses above them.
Ties are never broken by position.

Ragged lists: ``mask`` (B, K) bool marks the present responses; masked entries may hold any
values (NaN, inf) and affect neither the losses nor the gradients (they are replaced with
torch.where before any arithmetic). Every row needs at least two distinct ranks among its
present responses.

Shapes: log-probs, ranks, mask and lengths are (B, K); neg_log_phi is (B,); losses are (B,).
float16 and bfloat16 inputs are computed in float32 (as in preference_loss); other dtypes are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OBJECTIVES = ("plackett_luce", "all_pairs")


@dataclass
class ListwiseLossOutput:
    """Per-example results of ``listwise_loss``.

    losses: (B,) the objective per prompt (mean it for the batch loss).
    rewards: (B, K) implicit rewards as preference_loss reports them (TRL's definition, before
        the Mallows scaling), detached; NaN at masked responses.
    kendall_tau: (B,) agreement of the reward order with the observed order, detached:
        the mean over the untied observed pairs (i above j) of sign(r_i - r_j), in [-1, 1].
    best_rewards / worst_rewards: (B,) mean reward of the responses at the best / worst
        observed rank (a tied group is averaged), detached.
    """

    losses: torch.Tensor
    rewards: torch.Tensor
    kendall_tau: torch.Tensor
    best_rewards: torch.Tensor
    worst_rewards: torch.Tensor


# ----------------------------------------------------------------------------- validation


def _check_objective(objective: str, loss_type: str, mallows: str, label_smoothing: float, top_k) -> None:
    """Raise a one-line ValueError for an objective that does not support the chosen options."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown listwise objective {objective!r}; choose one of {OBJECTIVES}")
    if objective == "all_pairs":
        if top_k is not None:
            raise ValueError("top_k applies to objective='plackett_luce' only; leave it None for 'all_pairs'")
        return
    if loss_type != "sigmoid" or mallows not in ("none", "theta") or label_smoothing != 0.0:
        raise ValueError(
            "objective='plackett_luce' supports loss_type='sigmoid' with mallows 'none' or 'theta' and no "
            f"label_smoothing (got loss_type={loss_type!r}, mallows={mallows!r}, label_smoothing={label_smoothing}); "
            "use objective='all_pairs' for the others"
        )


def check_listwise_options(
    objective: str, loss_type: str, mallows: str, label_smoothing: float = 0.0, top_k: int | None = None
) -> None:
    """The check ``listwise_loss`` runs on its options before any tensor: a one-line ValueError for an
    unknown objective or a combination it does not support (for a run's settings, before training)."""
    _check_objective(objective, loss_type, mallows, label_smoothing, top_k)


def _check_tensor(name: str, x: torch.Tensor | None, shape: tuple[int, ...], required: str | None = None) -> None:
    """Raise a one-line ValueError if ``x`` is not a tensor of ``shape`` (or is missing and ``required``)."""
    if x is None:
        if required is not None:
            raise ValueError(f"{required} needs {name} of shape {tuple(shape)}")
        return
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)} (like policy_logps), got {got}")


def _check_ranks(ranks: torch.Tensor, present: torch.Tensor) -> None:
    """Ranks must be integers >= 0 (0 = best) at the present responses."""
    if ranks.dtype == torch.bool or ranks.is_floating_point() or ranks.is_complex():
        raise ValueError(f"ranks must be an integer tensor (0 = best), got dtype {ranks.dtype}")
    if bool((present & (ranks < 0)).any()):
        raise ValueError("ranks must be >= 0 (0 = best) at the present responses")


def _check_top_k(top_k, K: int) -> None:
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= K - 1:
        raise ValueError(
            f"top_k must be an integer in [1, K - 1] = [1, {K - 1}] (or None: the whole list), got {top_k!r}"
        )


def _check_rows_ranked(pairs: torch.Tensor) -> None:
    """Every row needs two distinct ranks among its present responses, i.e. at least one pair."""
    empty = (~pairs.flatten(1).any(dim=1)).nonzero().flatten().tolist()
    if empty:
        shown = f"{empty[:10]}" + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise ValueError(
            f"row(s) {shown} have fewer than 2 distinct ranks among their present responses; "
            "each list needs a better and a worse response"
        )


def _check_inputs(
    policy_logps, ref_logps, ranks, mask, lengths, neg_log_phi, top_k, *, needs_ref, needs_lengths, needs_phi
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the tensors (one-line ValueErrors); return the (B, K) present mask and the (B, K, K) ordered pairs.

    ``needs_*`` name the option that requires the tensor, or are None when it is optional."""
    if not isinstance(policy_logps, torch.Tensor) or policy_logps.dim() != 2:
        raise ValueError(f"policy_logps must be a (B, K) tensor, got {getattr(policy_logps, 'shape', policy_logps)!r}")
    B, K = policy_logps.shape
    _check_tensor("ref_logps", ref_logps, (B, K), needs_ref)
    _check_tensor("ranks", ranks, (B, K), "listwise_loss")
    _check_tensor("mask", mask, (B, K))
    _check_tensor("lengths", lengths, (B, K), needs_lengths)
    _check_tensor("neg_log_phi", neg_log_phi, (B,), needs_phi)
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = present), got dtype {mask.dtype}")
    _check_top_k(top_k, K)
    present = torch.ones_like(ranks, dtype=torch.bool) if mask is None else mask
    _check_ranks(ranks, present)
    pairs = _ordered_pairs(ranks, present)
    _check_rows_ranked(pairs)
    return present, pairs


# ----------------------------------------------------------------------------- building blocks


def _ordered_pairs(ranks: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(B, K, K) bool: pairs[b, i, j] = responses i and j both present and i ranked strictly above j."""
    both = present[:, :, None] & present[:, None, :]
    return both & (ranks[:, :, None] < ranks[:, None, :])


def _logratios(policy, ref, lengths, length_normalize: bool) -> torch.Tensor:
    """(B, K) per-response log-ratios, via preference_loss's own ``implicit_reward_margin``
    (the one response set is passed as both sides)."""
    logratios, _ = implicit_reward_margin(policy, policy, ref, ref, lengths, lengths, length_normalize)
    return logratios


def _rewards(policy, ref, lengths, **options) -> torch.Tensor:
    """(B, K) implicit rewards, detached, by preference_loss's own definition (each response is
    passed as both sides of a pair and its chosen reward read back)."""
    flat = lambda x: None if x is None else x.flatten()
    with torch.no_grad():
        out = preference_loss(
            flat(policy),
            flat(policy),
            flat(ref),
            flat(ref),
            chosen_lengths=flat(lengths),
            rejected_lengths=flat(lengths),
            **options,
        )
    return out.chosen_rewards.view(policy.shape)


def _plackett_luce_nll(scores: torch.Tensor, ranks: torch.Tensor, present: torch.Tensor, top_k) -> torch.Tensor:
    """(B,) -sum over stages of [logsumexp_G r - logsumexp_R r] (module docstring), ``scores`` (B, K) finite.

    Computed per response k with G_k its tied group and R_k = {j : rank_j >= rank_k}; each
    response carries 1/|G_k| of its group's term, so every stage counts once. An absent
    response is given G = R = {k}, a zero term."""
    B, K = scores.shape
    both = present[:, :, None] & present[:, None, :]
    alone = ~present[:, :, None] & torch.eye(K, dtype=torch.bool, device=scores.device)
    group = (both & (ranks[:, None, :] == ranks[:, :, None])) | alone
    risk = (both & (ranks[:, None, :] >= ranks[:, :, None])) | alone
    expanded = scores[:, None, :].expand(B, K, K)
    neg_inf = torch.full_like(expanded, -math.inf)
    stage = torch.logsumexp(torch.where(group, expanded, neg_inf), dim=-1) - torch.logsumexp(
        torch.where(risk, expanded, neg_inf), dim=-1
    )
    kept = present
    if top_k is not None:
        kept = kept & ((both & (ranks[:, None, :] < ranks[:, :, None])).sum(dim=-1) < top_k)
    share = stage / group.sum(dim=-1).to(stage.dtype)
    return -torch.where(kept, share, torch.zeros_like(share)).sum(dim=-1)


def _all_pairs_nll(policy, ref, lengths, neg_log_phi, pairs: torch.Tensor, **pairwise_options) -> torch.Tensor:
    """(B,) per prompt, the mean of preference_loss over its ordered pairs (i above j)."""
    b, i, j = pairs.nonzero(as_tuple=True)

    def pick(x, k):
        return None if x is None else x[b, k]

    pair_losses = preference_loss(
        policy[b, i],
        policy[b, j],
        pick(ref, i),
        pick(ref, j),
        neg_log_phi=None if neg_log_phi is None else neg_log_phi[b],
        chosen_lengths=pick(lengths, i),
        rejected_lengths=pick(lengths, j),
        **pairwise_options,
    ).losses
    total = torch.zeros(policy.shape[0], dtype=pair_losses.dtype, device=pair_losses.device).index_add(
        0, b, pair_losses
    )
    return total / pairs.sum(dim=(1, 2)).to(total.dtype)


def _kendall_tau(rewards: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """(B,) mean over the observed pairs (i above j) of sign(r_i - r_j)."""
    signs = torch.sign(rewards[:, :, None] - rewards[:, None, :])
    agree = torch.where(pairs, signs, torch.zeros_like(signs)).sum(dim=(1, 2))
    return agree / pairs.sum(dim=(1, 2)).to(agree.dtype)


def _rewards_at_rank(rewards: torch.Tensor, ranks: torch.Tensor, present: torch.Tensor, best: bool) -> torch.Tensor:
    """(B,) mean reward of the present responses at the best (lowest) or worst (highest) rank."""
    big = torch.iinfo(ranks.dtype).max
    if best:
        extreme = torch.where(present, ranks, torch.full_like(ranks, big)).amin(dim=1, keepdim=True)
    else:
        extreme = torch.where(present, ranks, torch.full_like(ranks, -big)).amax(dim=1, keepdim=True)
    at = present & (ranks == extreme)
    return torch.where(at, rewards, torch.zeros_like(rewards)).sum(dim=1) / at.sum(dim=1).to(rewards.dtype)


# ----------------------------------------------------------------------------- the loss


def listwise_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    ranks: torch.Tensor,
    *,
    objective: str = "plackett_luce",
    mask: torch.Tensor | None = None,
    top_k: int | None = None,
    lengths: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    mallows: str = "none",
    neg_log_phi: torch.Tensor | None = None,
    phi_smoothing: str = "cubic",
    smoothing_eps: float | str = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    length_normalize: bool | None = None,
    ipo_form: str = "scaled_margin",
) -> ListwiseLossOutput:
    """Per-prompt listwise preference losses and per-response rewards (see the module docstring).

    Args:
        policy_logps: (B, K) summed log-probs of each response under the policy.
        ref_logps: (B, K) the same under the reference; required unless loss_type is "simpo".
        ranks: (B, K) integer observed ranks, 0 = best; equal values are ties.
        objective: "plackett_luce" (default) or "all_pairs".
        mask: (B, K) bool, True where a response is present (default: all present).
        top_k: Plackett-Luce only: keep the first top_k stages, in [1, K - 1] (default: all).
        lengths: (B, K) completion token counts, for length normalisation.
        loss_type, beta, mallows, neg_log_phi (B,), phi_smoothing, smoothing_eps, label_smoothing,
        simpo_gamma, length_normalize, ipo_form: as in ``mallowspo.losses.preference_loss``.
    Returns:
        ListwiseLossOutput with losses (B,), rewards (B, K) and detached metrics.
    """
    check_loss_options(loss_type, mallows, beta, label_smoothing, phi_smoothing, smoothing_eps, ipo_form)
    _check_objective(objective, loss_type, mallows, label_smoothing, top_k)
    reference_free = is_reference_free(loss_type)
    if length_normalize is None:
        length_normalize = default_length_normalize(loss_type)
    present, pairs = _check_inputs(
        policy_logps,
        None if reference_free else ref_logps,
        ranks,
        mask,
        lengths,
        neg_log_phi,
        top_k,
        needs_ref=None if reference_free else f"loss_type={loss_type!r}",
        needs_lengths="length_normalize=True" if length_normalize else None,
        needs_phi=f"mallows={mallows!r}" if mallows != "none" else None,
    )

    # Masked slots are replaced before any arithmetic, so garbage there reaches neither the
    # values nor the gradients; float16 is promoted as in preference_loss.
    def clean(x, fill):
        if x is None:
            return None
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return torch.where(present, x, torch.full_like(x, fill))

    policy = clean(policy_logps, 0)
    ref = None if reference_free else clean(ref_logps, 0)
    lengths = clean(lengths, 1)

    if objective == "plackett_luce":
        logratios = _logratios(policy, ref, lengths, length_normalize)
        scale = beta if mallows == "none" else beta * neg_log_phi.to(logratios.dtype)[:, None]
        losses = _plackett_luce_nll(scale * logratios, ranks, present, top_k)
    else:
        losses = _all_pairs_nll(
            policy,
            ref,
            lengths,
            neg_log_phi,
            pairs,
            loss_type=loss_type,
            beta=beta,
            mallows=mallows,
            phi_smoothing=phi_smoothing,
            smoothing_eps=smoothing_eps,
            label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma,
            length_normalize=length_normalize,
            ipo_form=ipo_form,
        )

    rewards = _rewards(policy, ref, lengths, loss_type=loss_type, beta=beta, length_normalize=length_normalize)
    return ListwiseLossOutput(
        losses=losses,
        rewards=torch.where(present, rewards, torch.full_like(rewards, math.nan)),
        kendall_tau=_kendall_tau(rewards, pairs),
        best_rewards=_rewards_at_rank(rewards, ranks, present, best=True),
        worst_rewards=_rewards_at_rank(rewards, ranks, present, best=False),
    )


# Imported last: mallowspo.losses re-exports listwise_loss from its last line, so whichever of
# the two modules is imported first, the other finds the names it needs already defined.
from mallowspo.losses import (  # noqa: E402
    check_loss_options,
    default_length_normalize,
    implicit_reward_margin,
    is_reference_free,
    preference_loss,
)
