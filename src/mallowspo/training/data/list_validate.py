"""Raw checks of ranked lists (pass 2 of ``prepare_list_dataset``; no tokenizer needed), with the
same problem kinds, one-line messages and report as the pairs' checks (``data.validate``).

A row is checked in this order, and reported under the first problem found:

    bad_responses        the responses are not a list of at least 2 (checked after the prompt's type)
    non_string_field     the prompt or a response is not a string or a message list
    mixed_formats        text and message lists mixed within the row
    bad_messages         a malformed message; a response not starting with an assistant message
    bad_ranking          the ranking is not a permutation of 0..K-1 (or not integers)
    bad_scores           not one finite number per response
    no_preference        fewer than 2 distinct ranks (all scores tied)
    responses_identical  two responses are the same (up to surrounding white space) at different ranks;
                         copies at the same rank (tied scores, e.g. two equal samples scored by one reward
                         model) are kept once and counted (note duplicates_merged)
    empty_field          an empty prompt or response
    bad_tools, bad_chat_template_kwargs, missing_tools, bad_dispersion   as for pairs

Ranks: ``ranks[k]`` is the rank of response k, 0 = best. From a ranking, ``ranks[ranking[i]] = i``;
from scores, the number of responses with a strictly higher score (tied scores share a rank);
after responses are left out (merged copies, ``max_responses``) the ranks are counted again
(``rerank``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trl.data_utils import maybe_convert_to_chatml

from mallowspo.training.data.validate import (
    RowProblem,
    _check_messages,
    _describe,
    _field_format,
    _is_blank,
    _parse_dispersion,
    _same,
    _template_inputs,
    _text_of,
)

LIST_PROBLEM_KINDS = ("bad_responses", "responses_identical", "bad_ranking", "bad_scores", "no_preference")


@dataclass
class CheckedList:
    """A list row that passed the raw checks."""

    index: int
    prompt: Any  # str or list of messages
    responses: list[Any]
    ranks: list[int]  # 0 = best; equal values are ties
    conversational: bool
    dispersion: float | None = None
    tools: list[dict] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    annotations: dict[str, Any] = field(default_factory=dict)
    merged: list[int] = field(default_factory=list)  # the responses left out as tied copies of earlier ones


def response_name(k: int) -> str:
    """How messages name response k (0-based, whatever the layout's column is called)."""
    return f"response {k}"


def rerank(ranks: list[int]) -> list[int]:
    """Competition ranks (0 = best, ties kept) of the order ``ranks`` gives."""
    return [sum(other < rank for other in ranks) for rank in ranks]


def tied_copies(values: list[Any], ranks: list[int], same, detail: str = "") -> list[int]:
    """The positions of values that repeat an earlier one at the same rank (to leave out); RowProblem
    ("responses_identical") for a repeat at another rank. ``same(a, b)`` compares two values."""
    copies = []
    for j in range(len(values)):
        for k in range(j):
            if k not in copies and same(values[k], values[j]):
                if ranks[k] != ranks[j]:
                    raise RowProblem(
                        "responses_identical",
                        f"{response_name(k)} and {response_name(j)} are identical{detail} but ranked differently",
                    )
                copies.append(j)
                break
    return copies


def ranks_from_ranking(ranking: Any, size: int) -> list[int]:
    """Ranks (0 = best) from response indices best first; RowProblem("bad_ranking") unless a permutation."""
    if not isinstance(ranking, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ranking):
        raise RowProblem("bad_ranking", f"the ranking is {_describe(ranking)}, expected a list of response indices")
    if sorted(ranking) != list(range(size)):
        missing = sorted(set(range(size)) - set(ranking))
        extra = sorted({i for i in ranking if ranking.count(i) > 1 or not 0 <= i < size})
        parts = [f"missing {missing}" if missing else "", f"repeated or out of range {extra}" if extra else ""]
        raise RowProblem(
            "bad_ranking",
            f"the ranking {ranking} is not a permutation of the {size} response indices 0..{size - 1} "
            f"({', '.join(p for p in parts if p) or f'{len(ranking)} entries'})",
        )
    ranks = [0] * size
    for position, k in enumerate(ranking):
        ranks[k] = position
    return ranks


def ranks_from_scores(scores: Any, size: int) -> list[int]:
    """Competition ranks (0 = best; ties share one) from scores, higher is better; RowProblem("bad_scores")
    unless one finite number per response."""
    if not isinstance(scores, list):
        raise RowProblem("bad_scores", f"the scores are {_describe(scores)}, expected a list of numbers")
    if len(scores) != size:
        raise RowProblem("bad_scores", f"there are {len(scores)} scores for {size} responses; give one per response")
    for k, value in enumerate(scores):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RowProblem("bad_scores", f"the score of {response_name(k)} is {_describe(value)}, expected a number")
        if value != value or value in (float("inf"), float("-inf")):
            raise RowProblem("bad_scores", f"the score of {response_name(k)} is {value!r}, expected a finite number")
    return [sum(other > value for other in scores) for value in scores]


def check_list_row(
    index: int,
    row: dict[str, Any],
    label: str,
    dispersion_column: str | None,
    annotation_columns: Sequence[str] = (),
) -> CheckedList:
    """Raw checks of one canonical list row (``data.list_formats.canonical_row``) plus its carried
    columns; ``label`` is "ranking" or "scores". Raises RowProblem (module docstring)."""
    prompt_format = _field_format("prompt", row["prompt"])
    responses = row["responses"]
    if not isinstance(responses, list) or not responses or all(isinstance(m, dict) for m in responses):
        raise RowProblem("bad_responses", f"the responses are {_describe(responses)}, expected a list of completions")
    if len(responses) < 2:
        raise RowProblem("bad_responses", "there is 1 response; a list needs at least 2")
    formats = {_field_format(response_name(k), r) for k, r in enumerate(responses)}
    if len(formats) > 1:
        raise RowProblem("mixed_formats", "some responses are strings and others lists of messages")
    conversational = formats == {"messages"}
    if (prompt_format == "messages") != conversational:
        kinds = ("a list of messages", "strings") if prompt_format == "messages" else ("a string", "lists of messages")
        raise RowProblem("mixed_formats", f"the prompt is {kinds[0]} but the responses are {kinds[1]}")
    prompt = row["prompt"]
    if conversational:
        prompt = _chatml(prompt)
        responses = [_chatml(r) for r in responses]
        _check_messages("prompt", prompt)
        for k, messages in enumerate(responses):
            _check_messages(response_name(k), messages)
            if messages[0]["role"] != "assistant":
                raise RowProblem(
                    "bad_messages",
                    f"{response_name(k)} starts with a {messages[0]['role']!r} message, not 'assistant'",
                )
        if prompt[-1]["role"] not in ("user", "tool", "assistant"):
            raise RowProblem("bad_messages", f"the prompt ends with a {prompt[-1]['role']!r} message")

    ranker = ranks_from_ranking if label == "ranking" else ranks_from_scores
    ranks = ranker(row[label], len(responses))
    if len(set(ranks)) < 2:
        raise RowProblem(
            "no_preference", f"all {len(responses)} responses share one rank (tied scores), so none is preferred"
        )
    merged = tied_copies(responses, ranks, _same)
    if merged:
        responses = [r for k, r in enumerate(responses) if k not in merged]
        ranks = rerank([r for k, r in enumerate(ranks) if k not in merged])
    for k, response in enumerate(responses):
        if _is_blank(_text_of(response)):
            raise RowProblem(
                "empty_field", f"{response_name(k)} is empty or whitespace only (or invisible characters)"
            )
    if _is_blank(_text_of(prompt)):
        raise RowProblem("empty_field", "the prompt is empty or whitespace only")

    conversation = {"prompt": prompt, **{response_name(k): r for k, r in enumerate(responses)}}
    tools, template_kwargs = _template_inputs(row, conversation) if conversational else (None, {})
    dispersion = _parse_dispersion(row[dispersion_column]) if dispersion_column else None
    annotations = {column: row[column] for column in annotation_columns}
    return CheckedList(
        index, prompt, responses, ranks, conversational, dispersion, tools, template_kwargs, annotations, merged
    )


def _chatml(messages: list[dict]) -> list[dict]:
    """A copy of ``messages`` with {"from", "value"} renamed to {"role", "content"} (TRL's helper)."""
    return maybe_convert_to_chatml({"completion": [dict(m) for m in messages]})["completion"]
