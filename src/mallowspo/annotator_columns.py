"""Annotations held in dataset columns, read into the annotator estimate of -log phi(x) (notes §8).

The ``dispersion_*_column`` keys of a run name the columns where a dataset keeps its annotators'
judgements. This module checks those keys (``AnnotatorColumns``, called by
``dispersion.DispersionSource``), reads the per-example values as the data holds them (lists,
numbers, dicts, or their JSON text, as a CSV file gives them) into the counts of ``annotators``
or the rankings of ``annotator_rankings``, and returns the posterior means with the prior used.
Bad values are refused in one line that names the data row.

    column key                          one value per example
    dispersion_votes_column             a list of votes: 1 (or true) = prefers chosen, 0 (false) =
                                        prefers rejected, null or 0.5 = a tie
    dispersion_chosen_votes_column,     two counts (integers >= 0): the annotators who preferred
    dispersion_rejected_votes_column    chosen, and those who preferred rejected (ties left out)
    dispersion_strengths_column         a list of signed strengths in the data's own response order
                                        (HelpSteer2-Preference's -3..3: negative = the first response
                                        better; MultiPref labels; dicts holding either; see
                                        ``annotators.preference_sign``); only the sign is a vote
    dispersion_rankings_column          an (M, K) list: [m][k] = the rank (0 = best) that annotator m
                                        gives response k (listwise rows; K = 2 works for pairs)
    dispersion_format                   the raw layout of a known dataset (``ANNOTATION_FORMATS``),
                                        mapped to TRL pairs plus a votes column ``FORMAT_VOTES_COLUMN``
                                        by ``mallowspo.training.data.annotations``

A tie is not a vote for either order: it is left out of the count. ``dispersion_consensus`` says
which order the votes are counted for (``annotators.neg_log_phi_from_votes``):
``majority`` (the default) counts the votes for the majority order, whichever response it favours,
on the folded likelihood: right when chosen was decided by these same votes (MultiPref,
HelpSteer2-Preference), and the only choice for strengths (whose order says nothing about which
response is chosen) and rankings (whose center is always estimated). ``given`` counts the votes for
chosen against a label fixed without these votes: the estimate is signed, and a pair whose
annotators mostly prefer rejected gets L < 0 (the clamp's floor, the smallest weight).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from mallowspo.annotator_prior import BetaPrior
from mallowspo.annotator_rankings import (
    _check_rankings,
    fit_ranking_prior,
    kemeny_distance,
    neg_log_phi_from_rankings,
)
from mallowspo.annotators import CONSENSUS, fit_vote_prior, neg_log_phi_from_votes, preference_sign

__all__ = [
    "ANNOTATION_FORMATS",
    "FORMAT_VOTES_COLUMN",
    "AnnotatorColumns",
    "VoteCounts",
    "agreement",
    "annotator_estimate",
    "read_rankings",
    "read_votes",
]

ANNOTATION_FORMATS = ("multipref", "helpsteer2")  # dispersion_format: mapped in mallowspo.training.data
FORMAT_VOTES_COLUMN = "annotator_votes"  # the votes column a dispersion_format writes (votes convention)
STRENGTH_LIMIT = 3  # |strength| on HelpSteer2-Preference's scale; a larger one is a sentinel, not a vote
CHOICES = {1: 1, 0: -1}  # a vote of the votes column -> +1 for chosen, -1 for rejected


@dataclass(frozen=True)
class AnnotatorColumns:
    """Where the annotations are and how to count them: the ``dispersion_*`` keys of a run without
    the ``dispersion_`` prefix (and ``_column`` suffix). ``DispersionSource`` builds it and calls
    ``check``; one of ``votes``, ``chosen_votes`` with ``rejected_votes``, ``strengths``,
    ``rankings`` or ``format`` is set when the source is annotators."""

    votes: str | None = None
    chosen_votes: str | None = None
    rejected_votes: str | None = None
    strengths: str | None = None
    rankings: str | None = None
    format: str | None = None
    consensus: str = "majority"

    @staticmethod
    def key(name: str) -> str:
        """The run's key of a field: ``votes`` -> ``dispersion_votes_column``."""
        return f"dispersion_{name}" if name in ("format", "consensus") else f"dispersion_{name}_column"

    @property
    def given(self) -> list[str]:
        """The fields naming where the annotations are (columns and format) that are set."""
        return [f.name for f in fields(self) if f.name != "consensus" and getattr(self, f.name) is not None]

    @property
    def kind(self) -> str | None:
        """ "votes" (a votes column or a format), "counts", "strengths", "rankings", or None."""
        given = set(self.given)
        if not given:
            return None
        if given & {"votes", "format"}:
            return "votes"
        return "counts" if "chosen_votes" in given else given.pop()

    @property
    def columns(self) -> tuple[str, ...]:
        """The data columns the estimate reads."""
        if self.format is not None:
            return (FORMAT_VOTES_COLUMN,)
        return tuple(getattr(self, name) for name in self.given)

    def check(self, source: str) -> None:
        """Raise ValueError (one line) for settings that cannot be read; ``source`` is dispersion_source."""
        for name in self.given:
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{self.key(name)} must be a column name, got {value!r}")
        if self.consensus not in CONSENSUS:
            raise ValueError(f"dispersion_consensus must be one of {CONSENSUS}, got {self.consensus!r}")
        if self.format is not None and self.format not in ANNOTATION_FORMATS:
            raise ValueError(f"dispersion_format must be one of {ANNOTATION_FORMATS} or null, got {self.format!r}")
        if source != "annotators":
            return
        self._check_one_kind()
        if self.consensus == "given" and self.kind in ("strengths", "rankings"):
            why = (
                "strengths are signed in the data's own response order, which does not say which response is chosen"
                if self.kind == "strengths"
                else "the rankings' center is always estimated from the same rankings"
            )
            raise ValueError(f"dispersion_consensus 'given' needs votes for chosen, and {why}: use 'majority'")

    def _check_one_kind(self) -> None:
        given = self.given
        keys = ", ".join(self.key(name) for name in given)
        if not given:
            raise ValueError(
                "dispersion_source 'annotators' needs the annotations: set dispersion_votes_column, "
                "dispersion_chosen_votes_column with dispersion_rejected_votes_column, dispersion_strengths_column, "
                f"dispersion_rankings_column, or dispersion_format ({', '.join(ANNOTATION_FORMATS)})"
            )
        if ("chosen_votes" in given) != ("rejected_votes" in given):
            raise ValueError(
                "dispersion_chosen_votes_column and dispersion_rejected_votes_column go together (the votes for "
                f"each response); got only {keys}"
            )
        if self.format is not None and len(given) > 1:
            raise ValueError(
                f"dispersion_format {self.format!r} writes its own votes column ({FORMAT_VOTES_COLUMN!r}): set no "
                f"other annotation column (got {keys})"
            )
        if len(given) > (2 if "chosen_votes" in given else 1):
            raise ValueError(f"the annotations must come from one place, got {keys}: keep one")

    def where(self) -> str:
        """The key and column(s) read, for messages: ``dispersion_votes_column 'votes'``."""
        if self.format is not None:
            return f"dispersion_format {self.format!r} (column {FORMAT_VOTES_COLUMN!r})"
        return " and ".join(f"{self.key(name)} {getattr(self, name)!r}" for name in self.given)


class VoteCounts(NamedTuple):
    """Per pair (N,): ``agree``, the votes for the consensus order, and ``total``, the votes for
    either order; ``against_label``: how many pairs have more votes for rejected than for chosen
    (None when the votes do not say which response is chosen: strengths)."""

    agree: NDArray[np.int64]
    total: NDArray[np.int64]
    against_label: int | None


# ----------------------------------------------------------------------------- one value


class _BadValue(ValueError):
    """A bad value of one example; the caller adds which row and column."""


def _as_list(value: Any) -> list:
    """A list value: a list, tuple or array, or the JSON text of a list (CSV cells are text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _BadValue(f"{value[:40]!r} is neither a list nor the JSON text of one") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise _BadValue(f"{_describe(value)} is not a list")
    return list(value)


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:60]


def _choice(value: Any) -> int:
    """+1 (prefers chosen), -1 (prefers rejected) or 0 (a tie) of one entry of a votes list."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return 1 if value else -1
    if isinstance(value, int | float | np.integer | np.floating) and value in (0, 0.5, 1):
        return CHOICES.get(value, 0)
    raise _BadValue(f"vote {value!r} is not 1 (prefers chosen), 0 (prefers rejected), or 0.5 / null (a tie)")


def _strength(value: Any) -> int:
    """-1, 0 or +1 of one strength (``preference_sign``), refusing numbers beyond the -3..3 scale:
    a sentinel such as HelpSteer2-Preference's -100 is not a vote."""
    number = value.get("score", value.get("strength")) if isinstance(value, dict) else value
    if isinstance(number, int | float | np.integer | np.floating) and not abs(number) <= STRENGTH_LIMIT:
        raise _BadValue(
            f"strength {number!r} is outside -{STRENGTH_LIMIT}..{STRENGTH_LIMIT} (HelpSteer2-Preference's scale): "
            "a sentinel such as -100 is not a vote; remove it from the list"
        )
    return preference_sign(value, "strength")


def _count(value: Any) -> int:
    """One vote count: an integer >= 0, or its text."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise _BadValue(f"{value!r} is not a count") from None
    if isinstance(number, bool) or not isinstance(number, int | float | np.integer | np.floating):
        raise _BadValue(f"{_describe(value)} is not a count")
    if not (math.isfinite(number) and number >= 0 and number == int(number)):
        raise _BadValue(f"{value!r} is not a count (an integer >= 0)")
    return int(number)


def _signs(value: Any, read_one) -> tuple[int, int]:
    """(entries read as +1, entries read as -1) of one list: (chosen, rejected) for votes; (second
    response, first response) for strengths, whose order only ``majority`` reads (symmetric)."""
    signs = []
    for position, entry in enumerate(_as_list(value)):
        try:
            signs.append(read_one(entry))
        except ValueError as bad:
            raise _BadValue(f"entry {position}: {bad}") from None
    return signs.count(1), signs.count(-1)


# ----------------------------------------------------------------------------- a column


def _row_names(rows: Sequence[int] | None, size: int) -> Sequence[int]:
    return range(size) if rows is None else rows


def _values(columns: AnnotatorColumns, annotations: Mapping[str, Sequence]) -> list[Sequence]:
    """The values of the columns the estimate reads, each (N,)."""
    missing = [name for name in columns.columns if name not in annotations]
    if missing:
        raise ValueError(f"{columns.where()}: the data has no column {', '.join(map(repr, missing))}")
    values = [annotations[name] for name in columns.columns]
    if len({len(v) for v in values}) > 1:
        raise ValueError(f"{columns.where()}: the columns have different lengths {[len(v) for v in values]}")
    return values


def _per_row(columns: AnnotatorColumns, annotations, rows, read) -> list:
    """``read(row, *values)`` for every example; a bad value is a ValueError naming the data row."""
    values = _values(columns, annotations)
    names = _row_names(rows, len(values[0]))
    out = []
    for i, row_values in enumerate(zip(*values)):
        try:
            out.append(read(names[i], *row_values))
        except ValueError as bad:
            raise ValueError(f"data row {names[i]}: {columns.where()}: {bad}") from None
    return out


def read_votes(
    columns: AnnotatorColumns, annotations: Mapping[str, Sequence], rows: Sequence[int] | None = None
) -> VoteCounts:
    """The vote counts of every pair, counted for ``columns.consensus``.

    Args:
        columns: a checked ``AnnotatorColumns`` of kind votes, counts or strengths.
        annotations: column name -> (N,) values, as the data holds them.
        rows: (N,) the data row of each pair, for messages (default 0..N-1).
    """
    readers = {
        "votes": lambda _, value: _signs(value, _choice),
        "counts": lambda _, chosen, rejected: (_count(chosen), _count(rejected)),
        "strengths": lambda _, value: _signs(value, _strength),
    }
    pairs = np.array(_per_row(columns, annotations, rows, readers[columns.kind]), dtype=np.int64).reshape(-1, 2)
    first, second = pairs[:, 0], pairs[:, 1]
    total = first + second
    if (total == 0).any():
        i = int(np.argmax(total == 0))
        raise ValueError(
            f"data row {_row_names(rows, len(total))[i]}: {columns.where()}: no annotator preferred either response "
            "(no votes, or only ties): drop the row, or use another dispersion_source"
        )
    oriented = columns.kind != "strengths"
    agree = first if columns.consensus == "given" else np.maximum(first, second)
    return VoteCounts(agree, total, int((second > first).sum()) if oriented else None)


def read_rankings(
    columns: AnnotatorColumns, annotations: Mapping[str, Sequence], rows: Sequence[int] | None = None
) -> list[NDArray[np.int64]]:
    """Each prompt's (M, K) rankings (0 = best), checked; arguments as in ``read_votes``."""
    read = lambda row, value: _check_rankings(np.asarray(_as_list(value)), prompt=row)  # noqa: E731
    return _per_row(columns, annotations, rows, read)


def agreement(
    columns: AnnotatorColumns, annotations: Mapping[str, Sequence], rows: Sequence[int] | None = None
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(agree, total) per example: the votes for the consensus order of ``total`` votes; for rankings,
    the pair orders agreeing with a Kemeny center of all M K (K - 1) / 2 (for K = 2, the votes)."""
    if columns.kind == "rankings":
        rankings = read_rankings(columns, annotations, rows)
        total = np.array([r.shape[0] * r.shape[1] * (r.shape[1] - 1) // 2 for r in rankings], dtype=np.int64)
        return total - kemeny_distance(rankings), total
    counts = read_votes(columns, annotations, rows)
    return counts.agree, counts.total


def annotator_estimate(
    columns: AnnotatorColumns,
    annotations: Mapping[str, Sequence],
    *,
    prior: BetaPrior | tuple[float, float] | None = None,
    rows: Sequence[int] | None = None,
) -> tuple[NDArray[np.float64], BetaPrior]:
    """(N,) posterior means E[-log phi(x) | annotations] and the prior used.

    Args:
        columns, annotations, rows: as in ``read_votes``.
        prior: a Beta prior fitted on another split (the train split), or None to fit one on these
            examples (empirical Bayes: ``fit_vote_prior`` / ``fit_ranking_prior``).
    """
    if columns.kind == "rankings":
        rankings = read_rankings(columns, annotations, rows)
        prior = BetaPrior(*prior) if prior is not None else fit_ranking_prior(rankings)
        return np.asarray(neg_log_phi_from_rankings(rankings, prior=prior)), prior
    counts = read_votes(columns, annotations, rows)
    if counts.against_label and columns.consensus == "majority":
        warnings.warn(
            f"{counts.against_label} of {len(counts.total)} pairs have more votes for rejected than for chosen: with "
            "dispersion_consensus 'majority' their -log phi(x) measures how much the annotators agree, whatever the "
            "label; use 'given' if chosen was not decided by these votes (such pairs then get the smallest weight)",
            stacklevel=2,
        )
    consensus = columns.consensus
    prior = BetaPrior(*prior) if prior is not None else fit_vote_prior(counts.agree, counts.total, consensus=consensus)
    estimate = neg_log_phi_from_votes(counts.agree, counts.total, prior=prior, consensus=consensus)
    return np.asarray(estimate), prior
