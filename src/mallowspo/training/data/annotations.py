"""Raw layouts of annotated preference datasets, mapped to TRL pairs plus a votes column
(``dispersion_format``; the first step of ``prepare_preference_dataset`` when it is set).

Each format reads the hub file as it is published and gives one conversational pair per row
that has a preferred response:

    prompt           [{"role": "user", "content": ...}] (HelpSteer2's earlier turns become messages)
    chosen/rejected  [{"role": "assistant", "content": ...}]
    annotator_votes  one entry per annotator (``mallowspo.annotator_columns``' votes convention):
                     1 = prefers chosen, 0 = prefers rejected, null = a tie

``multipref`` (allenai/multipref, config ``default``): prompt ``text``, responses ``completion_a``
    / ``completion_b``, votes the ``overall_pref`` of every entry of ``normal_worker_annotations``
    and ``expert_worker_annotations`` (2 + 2): "A-is-clearly-better" and "A-is-slightly-better"
    vote for A, the "B-is-..." labels for B, "Tie" is a tie, and a missing label is no vote. Chosen
    is the response with more votes; a row without a majority (a 2-2 split, or only ties) has no
    preferred response and is left out.
``helpsteer2`` (nvidia/HelpSteer2, data_dir ``preference``): prompt ``prompt``, responses
    ``response_1`` / ``response_2``, chosen by the sign of ``preference_strength`` (-3..3, negative =
    response 1 better; 0, a tie, is left out); votes the sign of each ``strength`` in
    ``all_preferences_unprocessed`` (every annotator: the three most similar, from which the
    overall preference is computed, would hide the disagreement), where 0 is a tie and a strength
    outside -3..3 (-100: the pair could not be rated) or missing is no vote. A row whose annotators
    left no vote for either response is left out.

Rows left out are counted in the log; the row indices of later messages count the pairs that are
left.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import datasets

from mallowspo.annotator_columns import ANNOTATION_FORMATS, FORMAT_VOTES_COLUMN, STRENGTH_LIMIT
from mallowspo.annotators import preference_sign
from mallowspo.training.data.validate import DataValidationError

logger = logging.getLogger("mallowspo.data")

HELPSTEER_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n")  # HelpSteer2's multi-turn prompt markers


def _messages(role: str, content: Any) -> list[dict[str, Any]]:
    return [{"role": role, "content": content}]


def _pair(prompt: list[dict], first: str, second: str, side: int, signs: list[int | None]) -> dict[str, Any]:
    """The TRL pair with ``first`` (side -1) or ``second`` (side +1) chosen, and the votes relative to chosen."""
    chosen, rejected = (first, second) if side < 0 else (second, first)
    votes = [None if s is None or s == 0 else int(s == side) for s in signs]
    return {
        "prompt": prompt,
        "chosen": _messages("assistant", chosen),
        "rejected": _messages("assistant", rejected),
        FORMAT_VOTES_COLUMN: votes,
    }


def _majority(signs: list[int | None]) -> int:
    """-1 or +1: the side with more votes; 0 without a majority."""
    first, second = signs.count(-1), signs.count(1)
    return (first < second) - (first > second)


def multipref_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """One MultiPref row as a pair, or None when no response has a majority of the votes."""
    annotations = list(row["normal_worker_annotations"] or []) + list(row["expert_worker_annotations"] or [])
    labels = [a.get("overall_pref") if isinstance(a, dict) else a for a in annotations]
    signs = [None if label is None else preference_sign(label, "overall_pref") for label in labels]
    side = _majority(signs)
    if side == 0:
        return None
    return _pair(_messages("user", row["text"]), row["completion_a"], row["completion_b"], side, signs)


def helpsteer2_prompt(text: str) -> list[dict[str, str]]:
    """HelpSteer2's prompt text as messages; its earlier turns are joined by markers:
    "{user 1}\\n<extra_id_1>Assistant\\n{assistant 1}\\n<extra_id_1>User\\n{user 2}"."""
    parts = HELPSTEER_TURN.split(text)
    messages = [{"role": "user", "content": parts[0]}]
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": role.lower(), "content": content})
    return messages


def _helpsteer2_sign(entry: Any) -> int | None:
    """The vote of one entry of all_preferences_unprocessed: -1, 0 (a tie), +1, or None (no vote)."""
    strength = entry.get("strength") if isinstance(entry, dict) else entry
    if strength is None or isinstance(strength, bool) or not isinstance(strength, int | float):
        return None
    return None if abs(strength) > STRENGTH_LIMIT else preference_sign(strength, "strength")


def helpsteer2_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """One HelpSteer2-Preference row as a pair, or None for a tie or a row without votes."""
    side = preference_sign(row["preference_strength"], "preference_strength")
    signs = [_helpsteer2_sign(entry) for entry in row["all_preferences_unprocessed"] or []]
    if side == 0 or not any(s in (-1, 1) for s in signs):
        return None
    return _pair(helpsteer2_prompt(row["prompt"]), row["response_1"], row["response_2"], side, signs)


FORMATS: dict[str, tuple[Callable[[dict], dict | None], tuple[str, ...]]] = {
    "multipref": (
        multipref_row,
        ("text", "completion_a", "completion_b", "normal_worker_annotations", "expert_worker_annotations"),
    ),
    "helpsteer2": (
        helpsteer2_row,
        ("prompt", "response_1", "response_2", "preference_strength", "all_preferences_unprocessed"),
    ),
}  # one per annotator_columns.ANNOTATION_FORMATS (the names dispersion_format accepts)


def map_annotation_format(dataset: datasets.Dataset, format_name: str, name: str = "train") -> datasets.Dataset:
    """The pairs of ``dataset`` in the raw layout ``format_name`` (see the module docstring).

    Raises DataValidationError (one line) for an unknown format, a missing column, a bad value
    (naming the row) or no pair left.
    """
    if format_name not in FORMATS:
        raise DataValidationError(f"dispersion_format must be one of {ANNOTATION_FORMATS}, got {format_name!r}")
    convert, needed = FORMATS[format_name]
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        raise DataValidationError(
            f"Preference data '{name}' is not in the {format_name} layout (dispersion_format): no column "
            f"{', '.join(map(repr, missing))}; its columns are {dataset.column_names}"
        )
    pairs = []
    for index, row in enumerate(dataset.select_columns(list(needed))):
        try:
            pair = convert(row)
        except ValueError as bad:
            raise DataValidationError(f"Preference data '{name}', row {index} ({format_name} layout): {bad}") from None
        if pair is not None:
            pairs.append(pair)
    left_out = len(dataset) - len(pairs)
    if not pairs:
        raise DataValidationError(
            f"Preference data '{name}' ({format_name} layout) has no row with a preferred response"
        )
    if left_out:
        logger.info(
            "%s (%s layout): %d of %d rows have no preferred response (tied votes, or no vote) and are left out",
            name,
            format_name,
            left_out,
            len(dataset),
        )
    return datasets.Dataset.from_list(pairs)
