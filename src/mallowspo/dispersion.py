"""The entropy-based dispersion estimator (paper §3.3, eqs. 10, 11, 17).

No model of phi(x) is trained. The reference model's predictive entropy on the two
responses is a proxy for the dispersion of preferences on the prompt:

    Hbar(x)     = 1/2 [ Hw / (|yw| log V) + Hl / (|yl| log V) ]          (eq. 11, per-token mean)
    -log phi(x) ~= -phi* log Hbar(x)                                       (eq. 10)

Hbar lies in [0, 1]: 0 when the reference model is certain of every token, 1 at the
uniform distribution. phi* is chosen so that the dataset mean of the estimate is 1
("as in DPO"), or fixed (the authors' code uses 0.29 for Llama3-8B-Instruct).

All functions here run under ``torch.no_grad``: the estimate is a constant of the frozen
reference model and the example, and carries no gradient.

The one dispersion path. Whatever its source, the per-example -log phi(x) comes from
``dispersion_estimate(source, ...)``, which the trainer and `mallowspo dispersion` both call:

    entropy     -phi* log Hbar(x) (eq. 10), phi* fitted ("mean": the mean estimate is 1) or fixed,
                then clamped; a phi* fitted on the train split is passed back in for the others
    annotators  phi* E[-log phi(x) | annotations]: the posterior mean from the data's annotator votes
                or rankings (``annotator_columns``, notes §8) under a Beta prior fitted on the train
                split (passed back in for the others, as phi* is), normalised and clamped as entropy is
    constant    the same value for every example (1.0 with the theta variant is DPO)
    column      values given per example in the data, used as given
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mallowspo.annotator_columns import AnnotatorColumns, annotator_estimate
from mallowspo.annotators import BetaPrior, neg_log_phi_from_rankings, neg_log_phi_from_votes  # noqa: F401 (re-export)

DEFAULT_MIN_HBAR = 1e-6  # bounds -log Hbar by 13.8 when the reference is certain
DISPERSION_SOURCES = ("entropy", "annotators", "constant", "column")
NORMALIZED_SOURCES = ("entropy", "annotators")  # the sources that dispersion_normalization and _clamp apply to
DEFAULT_CLAMP = (0.05, 20.0)


@torch.no_grad()
def mean_completion_entropy(token_entropy: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of per-token entropies over completion tokens (nats).

    Args:
        token_entropy: (B, T) entropy of the next-token distribution at each position.
        completion_mask: (B, T) 1 where the position predicts a completion token.
    Returns:
        (B,) mean entropy per completion token; 0 for a sequence with no completion token.
    """
    mask = completion_mask.to(token_entropy.dtype)
    return (token_entropy * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@torch.no_grad()
def normalized_entropy(
    chosen_mean_entropy: torch.Tensor, rejected_mean_entropy: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Hbar(x), eq. 11: the mean of the two per-token mean entropies divided by log V, in [0, 1]."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    hbar = 0.5 * (chosen_mean_entropy + rejected_mean_entropy) / math.log(vocab_size)
    return hbar.clamp(0.0, 1.0)


@torch.no_grad()
def neg_log_phi_from_entropy(
    hbar: torch.Tensor, phi_star: float = 1.0, min_hbar: float = DEFAULT_MIN_HBAR
) -> torch.Tensor:
    """Eq. 10: -log phi(x) ~= -phi* log Hbar(x), with Hbar floored at ``min_hbar`` so the
    estimate stays finite when the reference model is certain (Hbar = 0)."""
    if not 0 < min_hbar < 1:
        raise ValueError(f"min_hbar must lie in (0, 1), got {min_hbar}")
    return -phi_star * torch.log(hbar.clamp(min_hbar, 1.0))


@torch.no_grad()
def fit_phi_star(hbar: torch.Tensor, min_hbar: float = DEFAULT_MIN_HBAR) -> float:
    """phi* such that the mean of -phi* log Hbar over ``hbar`` is 1 (the paper's choice)."""
    mean_raw = float(neg_log_phi_from_entropy(hbar.double(), 1.0, min_hbar).mean())
    if not mean_raw > 1e-12:
        raise ValueError(
            "the reference model is at maximum entropy (Hbar = 1) on every example, so the mean-1 "
            "normalisation of the dispersion is undefined; use a fixed phi_star or a fixed dispersion"
        )
    return 1.0 / mean_raw


@torch.no_grad()
def estimate_neg_log_phi(
    hbar: torch.Tensor,
    phi_star: float | str = "mean",
    clamp: tuple[float, float] | None = None,
    min_hbar: float = DEFAULT_MIN_HBAR,
) -> tuple[torch.Tensor, float]:
    """The per-pair estimate of -log phi(x) for a whole dataset.

    Args:
        hbar: (N,) normalised mean entropies (``normalized_entropy``), one per pair.
        phi_star: "mean" to normalise the dataset mean to 1, or a fixed positive constant.
        clamp: optional (min, max) bounds applied after normalisation.
        min_hbar: floor on Hbar (bounds the estimate when the entropy is 0).
    Returns:
        (estimates (N,), phi_star used).
    """
    if isinstance(phi_star, str):
        if phi_star != "mean":
            raise ValueError(f"phi_star must be 'mean' or a positive number, got {phi_star!r}")
        phi_star = fit_phi_star(hbar, min_hbar)
    return scale_and_clamp(neg_log_phi_from_entropy(hbar, 1.0, min_hbar), phi_star, clamp), float(phi_star)


@torch.no_grad()
def scale_and_clamp(raw: torch.Tensor, phi_star: float, clamp: tuple[float, float] | None) -> torch.Tensor:
    """phi* raw, bounded by ``clamp`` = (min, max) when given: the last step of every normalised source."""
    if not phi_star > 0:
        raise ValueError(f"phi_star must be > 0, got {phi_star}")
    estimate = float(phi_star) * raw
    if clamp is not None:
        low, high = clamp
        if not 0 <= low <= high:
            raise ValueError(f"dispersion clamp needs 0 <= min <= max, got ({low}, {high})")
        estimate = estimate.clamp(low, high)
    return estimate


@dataclass(frozen=True)
class DispersionSource:
    """Where -log phi(x) comes from, and how the entropy and annotator estimates are normalised
    and bounded.

    The field names are those of ``MallowsPOConfig`` without the ``dispersion_`` prefix, and
    this is their one validator.

    source: one of ``DISPERSION_SOURCES``.
    normalization: phi* of the entropy or annotator estimate: "mean" (fitted so that the mean is 1)
        or a fixed number > 0 (the authors' code uses 0.29 for the entropy; 1 keeps the annotators'
        measured -log phi(x) as it is).
    clamp: (min, max) bounds on the entropy or annotator estimate, or None.
    constant: -log phi(x) of every example for the ``constant`` source (> 0).
    votes_column, chosen_votes_column, rejected_votes_column, strengths_column, rankings_column,
        format, consensus: where the ``annotators`` source finds the annotations and how it counts
        them (``annotator_columns.AnnotatorColumns``; one of the columns, the two vote counts, or a
        format).
    """

    source: str = "entropy"
    normalization: float | str = "mean"
    clamp: tuple[float, float] | None = DEFAULT_CLAMP
    constant: float = 1.0
    votes_column: str | None = None
    chosen_votes_column: str | None = None
    rejected_votes_column: str | None = None
    strengths_column: str | None = None
    rankings_column: str | None = None
    format: str | None = None
    consensus: str = "majority"

    @property
    def annotators(self) -> AnnotatorColumns:
        """The annotation settings, as ``annotator_columns`` reads them."""
        return AnnotatorColumns(
            votes=self.votes_column,
            chosen_votes=self.chosen_votes_column,
            rejected_votes=self.rejected_votes_column,
            strengths=self.strengths_column,
            rankings=self.rankings_column,
            format=self.format,
            consensus=self.consensus,
        )

    @property
    def annotation_columns(self) -> tuple[str, ...]:
        """The data columns the estimate reads (none unless the source is annotators)."""
        return self.annotators.columns if self.source == "annotators" else ()

    def __post_init__(self) -> None:
        if self.source not in DISPERSION_SOURCES:
            raise ValueError(f"unknown dispersion_source {self.source!r}; choose one of {DISPERSION_SOURCES}")
        if isinstance(self.normalization, str):
            if self.normalization != "mean":
                raise ValueError(f"dispersion_normalization must be 'mean' or > 0, got {self.normalization!r}")
        elif not (self.normalization > 0 and math.isfinite(self.normalization)):
            raise ValueError(f"dispersion_normalization must be 'mean' or > 0 and finite, got {self.normalization}")
        if self.clamp is not None:
            if len(self.clamp) != 2:
                raise ValueError(f"dispersion_clamp needs two numbers (min max), got {list(self.clamp)}")
            low, high = self.clamp
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(
                    f"dispersion_clamp needs finite numbers, got min={low}, max={high} (null for no clamp)"
                )
            if not 0 <= low <= high:
                raise ValueError(f"dispersion_clamp needs 0 <= min <= max, got min={low}, max={high}")
        if not self.constant > 0:
            raise ValueError(f"dispersion_constant must be > 0, got {self.constant}")
        if not math.isfinite(self.constant):
            raise ValueError(f"dispersion_constant must be a finite number, got {self.constant}")
        self.annotators.check(self.source)


@dataclass(frozen=True)
class DispersionEstimate:
    """Per-example -log phi(x), (N,) float64; the phi* of the entropy or annotator estimate (else
    None); and the Beta prior of the annotator estimate (else None)."""

    neg_log_phi: torch.Tensor
    phi_star: float | None
    prior: BetaPrior | None = None


@torch.no_grad()
def dispersion_estimate(
    source: DispersionSource,
    *,
    size: int,
    hbar: torch.Tensor | np.ndarray | None = None,
    column: torch.Tensor | np.ndarray | None = None,
    annotations: Mapping[str, Sequence] | None = None,
    phi_star: float | None = None,
    prior: BetaPrior | tuple[float, float] | None = None,
    rows: Sequence[int] | None = None,
) -> DispersionEstimate:
    """-log phi(x) for ``size`` examples from ``source``.

    Args:
        source: the settings.
        size: the number of examples N.
        hbar: (N,) Hbar(x) of eq. 11, needed by the ``entropy`` source.
        column: (N,) values given in the data, needed by the ``column`` source.
        annotations: column name -> (N,) values of ``source.annotation_columns``, needed by the
            ``annotators`` source.
        phi_star: a phi* fitted on another split (the train split); with the ``entropy`` or
            ``annotators`` source and ``normalization="mean"`` it is used instead of fitting here.
        prior: the annotators' Beta prior fitted on another split (the train split); None fits it here.
        rows: (N,) data row of each example, named by errors about annotation values (default 0..N-1).
    """
    if source.source == "constant":
        return DispersionEstimate(torch.full((size,), float(source.constant), dtype=torch.float64), None)
    if source.source == "column":
        if column is None:
            raise ValueError("dispersion_source='column' needs the per-example values of dispersion_column")
        return DispersionEstimate(_as_float64(column, size, "column"), None)
    if source.source == "annotators":
        return _annotator_dispersion(source, size, annotations, phi_star, prior, rows)
    if hbar is None:
        raise ValueError("dispersion_source='entropy' needs Hbar(x) from the reference pass")
    normalization = phi_star if (phi_star is not None and source.normalization == "mean") else source.normalization
    estimates, used = estimate_neg_log_phi(_as_float64(hbar, size, "hbar"), phi_star=normalization, clamp=source.clamp)
    return DispersionEstimate(estimates, used)


def _annotator_dispersion(
    source: DispersionSource,
    size: int,
    annotations: Mapping[str, Sequence] | None,
    phi_star: float | None,
    prior: BetaPrior | tuple[float, float] | None,
    rows: Sequence[int] | None,
) -> DispersionEstimate:
    """phi* E[-log phi(x) | annotations], clamped: the ``annotators`` source of ``dispersion_estimate``."""
    if annotations is None:
        raise ValueError(f"dispersion_source='annotators' needs the values of {source.annotators.where()}")
    raw, prior = annotator_estimate(source.annotators, annotations, prior=prior, rows=rows)
    raw = _as_float64(raw, size, "the annotator estimate")
    if source.normalization != "mean":
        phi_star = float(source.normalization)
    elif phi_star is None:
        mean = float(raw.mean())
        if not mean > 1e-12:
            raise ValueError(
                f"the annotator estimate of -log phi(x) has mean {mean:.3g} <= 0 over these {size} examples (most "
                "annotators prefer the rejected responses), so the mean-1 normalisation is undefined: check the "
                "labels, use dispersion_consensus 'majority', or a fixed dispersion_normalization"
            )
        phi_star = 1.0 / mean
    estimate = scale_and_clamp(raw, phi_star, source.clamp)
    if source.clamp is None and not (estimate > 0).all():
        i = int(torch.argmax((estimate <= 0).long()))
        raise ValueError(
            f"data row {rows[i] if rows is not None else i}: the annotator estimate of -log phi(x) is "
            f"{float(estimate[i]):.3g} <= 0 (its annotators prefer the rejected response), which the objective cannot "
            "use: set dispersion_clamp (its min is the smallest weight), or use dispersion_consensus 'majority'"
        )
    return DispersionEstimate(estimate, float(phi_star), BetaPrior(*prior))


# When the entropy estimate carries no information (``uninformative_entropy``). Measured Hbar
# (eq. 11) over a train split, mean / std, and the coefficient of variation of -log Hbar:
#   random-init tiny Llama (hidden 64, V 512), tiny preference file   0.9976 / 7.5e-5   CV 0.031
#   random-init Llama of the built-in world's shape, world data        0.9938 / 2.2e-4   CV 0.036
#   the same with hidden size 1024                                     0.968  / 2.4e-3   CV 0.078
#   the built-in world's trained (SFT) model, its 1,220 train rows     0.101  / 0.086    CV 0.43
# A random-init model's logits have a std of about init_std * sqrt(hidden) (0.02 * 64 = 1.3 at
# hidden 4096), so its entropy is about log V - 1.3^2 / 2, Hbar ~0.93 at V = 32k-128k: still above
# the first threshold. A trained model's per-token entropy is a small fraction of log V.
UNINFORMATIVE_MEAN_HBAR = 0.9  # mean Hbar at or above this: near-uniform next-token distributions
UNINFORMATIVE_SPREAD = 0.05  # CV of -log Hbar below this: -log phi within a few % of the same value


def uninformative_entropy(
    hbar: torch.Tensor | np.ndarray, neg_log_phi: torch.Tensor | np.ndarray, min_hbar: float = DEFAULT_MIN_HBAR
) -> str | None:
    """Why the entropy estimate of a split cannot rank its prompts, or None when it can.

    It cannot when the reference is near its maximum entropy everywhere (mean Hbar >=
    ``UNINFORMATIVE_MEAN_HBAR``: its next-token distributions are close to uniform, as an
    untrained model's are), or when the raw estimate -log Hbar is nearly the same for every
    pair (coefficient of variation < ``UNINFORMATIVE_SPREAD``). What is left of the spread is
    noise, which the mean-1 normalisation (phi* = 1 / mean(-log Hbar), ~400 for a random-init
    model) stretches into an order of -log phi(x) that looks meaningful.

    Args:
        hbar: (N,) Hbar(x) of the split.
        neg_log_phi: (N,) the estimate made from it (normalised, clamped): its range is reported.
    Returns:
        a one-line description of the spread, what it means and what to do; or None.
    """
    hbar = np.asarray(hbar, dtype=np.float64)
    if hbar.size == 0:
        return None
    raw = -np.log(np.clip(hbar, min_hbar, 1.0))
    mean_raw = float(raw.mean())
    spread = float(raw.std()) / mean_raw if mean_raw > 0 else 0.0
    reasons = []
    if float(hbar.mean()) >= UNINFORMATIVE_MEAN_HBAR:
        reasons.append(f"mean Hbar >= {UNINFORMATIVE_MEAN_HBAR}: next-token distributions near uniform")
    if hbar.size > 1 and spread < UNINFORMATIVE_SPREAD:
        reasons.append(f"-log Hbar varies by {100 * spread:.2g}% of its mean, under {UNINFORMATIVE_SPREAD:.0%}")
    if not reasons:
        return None
    estimate = np.asarray(neg_log_phi, dtype=np.float64)
    return (
        f"the reference model's entropies cannot rank prompts: Hbar = {hbar.mean():.4f} +- {hbar.std():.2g} "
        f"over {hbar.size} pairs ({'; '.join(reasons)}), which the estimate turns into -log phi(x) in "
        f"[{estimate.min():.3g}, {estimate.max():.3g}]: noise, not dispersion. Usual cause: an untrained "
        "(random-init) reference model. Use a trained (SFT) reference model, or a constant dispersion "
        "(dispersion_source: constant, --dispersion_source constant)"
    )


def _as_float64(values: torch.Tensor | np.ndarray, size: int, name: str) -> torch.Tensor:
    values = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if values.shape != (size,):
        raise ValueError(f"{name} has shape {tuple(values.shape)}, expected ({size},)")
    return values
