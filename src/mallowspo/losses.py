"""Preference losses with the Mallows dispersion as a modifier (paper §3, Thm. 1, Props. 4-5, §5.5).

Base objectives (``loss_type``), with z = beta * Delta the scaled implicit reward margin,
Delta = [log pi(yw) - log pi_ref(yw)] - [log pi(yl) - log pi_ref(yl)]:

    sigmoid  DPO (Rafailov et al. 2023)            -log sigmoid(z), with optional label
                                                   smoothing eps (cDPO): -(1-eps) log s(z) - eps log s(-z)
    robust   robust DPO (Chowdhury et al. 2024)    [-(1-eps) log s(z) + eps log s(-z)] / (1 - 2 eps)
    ipo      IPO (Azar et al. 2023)                (Delta - 1 / (2 beta))^2, with Delta from per-token
                                                   mean log-ratios by default (as TRL, and the IPO authors)
    hinge    SLiC hinge (Zhao et al. 2023)         relu(1 - z)
    simpo    SimPO (Meng et al. 2024), reference-free: Delta = log pi(yw)/|yw| - log pi(yl)/|yl|,
                                                   -log sigmoid(z - gamma)

Mallows modifier (``mallows``), with the per-prompt estimate L(x) = -log phi(x) (``neg_log_phi``):

    none   the base objective.
    theta  MallowsPO-theta (eq. 8, Prop. 4): beta is replaced by beta * L(x) everywhere,
           i.e. a prompt-dependent KL strength. Convention: the factor 2 of eq. 8
           (c(x) = -2 log phi(x)) is absorbed in beta, as in the authors' code, so
           L(x) = 1 for every x is exactly the base objective. For SimPO the margin is
           scaled with it: -log sigmoid(L(x) (z - gamma)) (authors' code). For IPO two forms
           exist (``ipo_form``, same per-pair optimum Delta = 1 / (2 beta L), different
           weights): ``scaled_margin`` (default; the authors' MallowsIPO and RainbowPO's)
           (L(x) Delta - 1 / (2 beta))^2, and ``scaled_beta`` (beta -> beta L(x) in IPO,
           Prop. 4's reading) (Delta - 1 / (2 beta L(x)))^2 = the former / L(x)^2, which
           grows without bound as L(x) -> 0.
    phi    MallowsPO-phi (eq. 9, Thm. 1): the logistic link sigmoid(.) is replaced by the
           Kendall link g_phi(.) with phi(x) = exp(-L(x)), under a smoothing (see
           ``mallowspo.links``). Only defined for the likelihood losses (sigmoid, robust,
           simpo); with smoothing="sigmoid", g ~ sigmoid(L(x) z), so L = 1 is exactly DPO.

Shapes: every per-example input is (B,); outputs are (B,). Log-probs are summed over
completion tokens (nats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mallowspo.links import log_smoothed_phi_link

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo")
MALLOWS_VARIANTS = ("none", "theta", "phi")
IPO_FORMS = ("scaled_margin", "scaled_beta")
HALF_DTYPES = (torch.float16, torch.bfloat16)  # computed in float32 (see preference_loss)
_LIKELIHOOD_LOSSES = ("sigmoid", "robust", "simpo")
_REFERENCE_FREE_LOSSES = ("simpo",)


@dataclass
class PreferenceLossOutput:
    """Per-example results, all of shape (B,).

    losses: the objective per pair (mean it for the batch loss).
    chosen_rewards / rejected_rewards: implicit rewards, TRL's definition, detached:
        beta * (log pi - log pi_ref) (summed over tokens, even where the loss averages them, as
        TRL's DPOTrainer logs them) for reference-based losses, beta * log pi / |y| for SimPO.
    margins: the signed quantity fed to the link, beta * Delta (minus gamma for SimPO),
        before the Mallows scaling, detached.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor


def is_reference_free(loss_type: str) -> bool:
    """Whether ``loss_type`` uses no reference log-probs (SimPO)."""
    return loss_type in _REFERENCE_FREE_LOSSES


def check_loss_options(
    loss_type: str,
    mallows: str,
    beta: float,
    label_smoothing: float = 0.0,
    phi_smoothing: str = "cubic",
    smoothing_eps: float | str = 0.1,
    ipo_form: str = "scaled_margin",
) -> None:
    """Raise ValueError naming the problem for any invalid combination of loss options."""
    if ipo_form not in IPO_FORMS:
        raise ValueError(f"unknown ipo_form {ipo_form!r}; choose one of {IPO_FORMS}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if mallows not in MALLOWS_VARIANTS:
        raise ValueError(f"unknown Mallows variant {mallows!r}; choose one of {MALLOWS_VARIANTS}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if mallows == "phi" and loss_type not in _LIKELIHOOD_LOSSES:
        raise ValueError(
            f"mallows='phi' replaces the logistic link, which loss_type={loss_type!r} does not have; "
            f"use it with one of {_LIKELIHOOD_LOSSES}, or use mallows='theta' (a per-prompt beta) with {loss_type!r}"
        )
    if mallows == "phi":
        if phi_smoothing not in ("cubic", "sigmoid", "none"):
            raise ValueError(f"unknown phi smoothing {phi_smoothing!r}; choose 'cubic', 'sigmoid' or 'none'")
        if isinstance(smoothing_eps, str):
            if smoothing_eps != "adaptive":
                raise ValueError(f"smoothing_eps must be a positive number or 'adaptive', got {smoothing_eps!r}")
        elif not smoothing_eps > 0:
            raise ValueError(f"smoothing_eps must be > 0, got {smoothing_eps}")
        elif not math.isfinite(smoothing_eps):
            raise ValueError(f"smoothing_eps must be a finite number, got {smoothing_eps}")


def implicit_reward_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    length_normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response log-ratios (chosen, rejected): log pi - log pi_ref, or log pi alone
    when the reference log-probs are None; divided by the completion length when
    ``length_normalize`` (lengths then required)."""
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if ref_chosen_logps is not None:
        chosen = chosen - ref_chosen_logps
        rejected = rejected - ref_rejected_logps
    if length_normalize:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("length normalisation needs chosen_lengths and rejected_lengths")
        chosen = chosen / chosen_lengths.clamp(min=1).to(chosen.dtype)
        rejected = rejected / rejected_lengths.clamp(min=1).to(rejected.dtype)
    return chosen, rejected


def default_length_normalize(loss_type: str) -> bool:
    """Whether ``loss_type`` averages log-ratios over completion tokens by default: SimPO (its
    definition) and IPO (TRL's DPOTrainer, and the IPO authors' reported form)."""
    return loss_type in ("simpo", "ipo")


def _ipo_losses(delta: torch.Tensor, beta: float, scale: torch.Tensor | None, ipo_form: str) -> torch.Tensor:
    """IPO's (Delta - 1/(2 beta))^2, and with a theta scale L(x) one of the two MallowsIPO forms."""
    if scale is None:
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if ipo_form == "scaled_margin":
        return (scale * delta - 1.0 / (2.0 * beta)) ** 2
    # L(x) = 0 would mean an infinite IPO target; the floor keeps the loss finite.
    return (delta - 1.0 / (2.0 * beta * scale.clamp(min=1e-6))) ** 2


def _log_link(z: torch.Tensor, mallows: str, neg_log_phi, phi_smoothing: str, smoothing_eps) -> torch.Tensor:
    """log p(chosen > rejected) for the scaled margin z under the chosen link."""
    if mallows == "phi":
        return log_smoothed_phi_link(z, neg_log_phi, phi_smoothing, smoothing_eps)
    return F.logsigmoid(z)


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    mallows: str = "none",
    neg_log_phi: torch.Tensor | None = None,
    phi_smoothing: str = "cubic",
    smoothing_eps: float | str = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    length_normalize: bool | None = None,
    ipo_form: str = "scaled_margin",
) -> PreferenceLossOutput:
    """Per-example preference losses and implicit rewards (see the module docstring).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference; required
            unless loss_type is reference-free ("simpo").
        loss_type: one of LOSS_TYPES.
        beta: inverse KL strength (> 0).
        mallows: "none", "theta" or "phi".
        neg_log_phi: (B,) estimates of -log phi(x) >= 0; required for theta and phi.
        phi_smoothing: "cubic" (default), "sigmoid" or "none" (exact eq. 9; no gradient at Delta = 0).
        smoothing_eps: half-width of the cubic patch: a number (default 0.1), or "adaptive" (= -2 log phi(x)).
        label_smoothing: eps of cDPO (sigmoid) and robust DPO.
        simpo_gamma: SimPO target margin gamma (in reward units, i.e. already times beta).
        chosen_lengths, rejected_lengths: (B,) completion token counts, for length normalisation.
        length_normalize: divide log-ratios by the lengths; defaults to True for simpo and ipo (TRL's
            IPO), else False.
        ipo_form: the MallowsIPO form with mallows="theta": "scaled_margin" (the authors') or
            "scaled_beta" (see the module docstring).
    """
    check_loss_options(loss_type, mallows, beta, label_smoothing, phi_smoothing, smoothing_eps, ipo_form)
    reference_free = is_reference_free(loss_type)
    if not reference_free and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type={loss_type!r} needs reference log-probs (ref_chosen_logps, ref_rejected_logps)")
    if mallows != "none" and neg_log_phi is None:
        raise ValueError(f"mallows={mallows!r} needs the per-example dispersion neg_log_phi")
    if length_normalize is None:
        length_normalize = default_length_normalize(loss_type)
    # Half precision is computed (and the losses returned) in float32: float16 tops out at 65504, which
    # beta * Delta * L(x) can pass, and bfloat16's 8-bit mantissa spaces summed log-probs of ~100 nats 0.5
    # apart, which would swamp the margin Delta.
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps = (
        x.float() if x is not None and x.dtype in HALF_DTYPES else x
        for x in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    )

    chosen_logratios, rejected_logratios = implicit_reward_margin(
        policy_chosen_logps,
        policy_rejected_logps,
        None if reference_free else ref_chosen_logps,
        None if reference_free else ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        length_normalize,
    )
    delta = chosen_logratios - rejected_logratios
    margin = beta * delta - (simpo_gamma if loss_type == "simpo" else 0.0)

    # theta: beta -> beta * L(x) (Prop. 4). phi: link replaced by g_phi(x) (eq. 7, 9).
    scale = neg_log_phi.to(delta.dtype) if mallows == "theta" else None
    z = margin * scale if scale is not None else margin

    if loss_type == "ipo":
        losses = _ipo_losses(delta, beta, scale, ipo_form)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - z)
    else:
        log_p_chosen = _log_link(z, mallows, neg_log_phi, phi_smoothing, smoothing_eps)
        eps = label_smoothing
        if eps == 0.0:
            losses = -log_p_chosen
        else:
            log_p_rejected = _log_link(-z, mallows, neg_log_phi, phi_smoothing, smoothing_eps)
            if loss_type == "robust":
                losses = (-(1.0 - eps) * log_p_chosen + eps * log_p_rejected) / (1.0 - 2.0 * eps)
            else:  # sigmoid, simpo: conservative label smoothing (cDPO)
                losses = -(1.0 - eps) * log_p_chosen - eps * log_p_rejected

    if length_normalize and not reference_free:  # TRL logs the summed log-ratios as rewards
        chosen_logratios, rejected_logratios = implicit_reward_margin(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
        )
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
        margins=margin.detach(),
    )


# Listwise objectives (Plackett-Luce, all pairs) over K ranked responses; see mallowspo.listwise.
from mallowspo.listwise import ListwiseLossOutput as ListwiseLossOutput  # noqa: E402
from mallowspo.listwise import listwise_loss as listwise_loss  # noqa: E402
