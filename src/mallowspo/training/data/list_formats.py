"""Ranked lists of responses: their settings (``ListDataConfig``) and the layouts a list dataset
comes in, each read into one canonical row.

A list row holds one prompt and its K >= 2 responses with their order. Layouts (``list_format``):

    responses       the canonical one, column names configurable:
                      prompt     str, or a list of {"role", "content"} messages
                      responses  (``responses_column``) K completions: strings, or message lists
                      ranking    (``ranking_column``) response indices, best first: a permutation of 0..K-1
                   or scores     (``scores_column``) one finite number per response, higher is better;
                                 equal scores are tied ranks
                    With both a ranking and scores the ranking is the label (the built-in world's lists
                    hold annotator 1's ranking and the true rewards): set ``ranking_column: null`` to rank
                    by the scores.
    ultrafeedback   openbmb/UltraFeedback as published: ``instruction`` (the prompt, as a user message) and
                    ``completions``, a list of {"response": str, "overall_score": float,
                    "fine-grained_score": float, "annotations": {aspect: {"Rating": "1".."5" or "N/A", ...}}};
                    responses become assistant messages, scored by ``ultrafeedback_score``:
                      overall_score       (default) the critique's grade of the whole response, 1..10
                      fine-grained_score  the mean of the four aspect ratings
                      helpfulness, honesty, instruction_following, truthfulness   one aspect's Rating
                    A completion without a number there (a missing score, a Rating of "N/A") is a
                    ``bad_scores`` problem of its row.
    armorm          princeton-nlp/llama3-ultrafeedback-armorm (and gemma2-ultrafeedback-armorm, SimPO's
                    on-policy data): ``prompt`` (a user message), ``all_generated_responses`` (assistant
                    messages) and ``all_rm_scores`` (ArmoRM's reward of each); its own ``chosen``/``rejected``
                    (the best and worst by score) are not read.
    pairs           TRL's preference formats (chosen/rejected), whatever other columns there are
    auto            (default) by the columns: ``completions`` + ``instruction`` is ultrafeedback,
                    ``all_generated_responses`` + ``all_rm_scores`` is armorm, a ``responses_column`` is
                    responses, anything else pairs.

Rows may have different K. Columns a run carries (the dispersion column, the annotation columns,
TRL's ``tools`` and ``chat_template_kwargs``) are read from the row as they are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from mallowspo.training.data.validate import RowProblem

logger = logging.getLogger("mallowspo.data")

LIST_FORMATS = ("auto", "pairs", "responses", "ultrafeedback", "armorm")
LIST_LAYOUTS = ("responses", "ultrafeedback", "armorm")
ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
ULTRAFEEDBACK_SCORES = ("overall_score", "fine-grained_score", *ULTRAFEEDBACK_ASPECTS)
BINARIZE_RULES = ("best_worst", "best_random", "all_pairs_as_rows")
# The raw columns of the hub layouts.
LAYOUT_COLUMNS = {
    "ultrafeedback": ("instruction", "completions"),
    "armorm": ("prompt", "all_generated_responses", "all_rm_scores"),
}


@dataclass
class ListDataConfig:
    """How list data is read, and what the objective trains on (``MallowsPOConfig.to_list_config``).

    list_format, responses_column, ranking_column, scores_column, ultrafeedback_score: the layout
        (module docstring); a column set to None is not read.
    max_responses: None (all), or the most responses a list keeps (>= 2): a longer list keeps its
        best and its worst response (the first listed of a tied group) and a seeded random choice of
        the others, in their order. It bounds the sequences of a batch by
        per_device_train_batch_size * max_responses.
    as_lists: the objective trains on lists (plackett_luce, all_pairs): pairs become lists of K = 2.
        False (pairwise): lists become pairs by ``binarize`` (``data.binarize``).
    binarize: best_worst (each list's best against its worst), best_random (its best against one of
        the responses ranked below it, seeded per row) or all_pairs_as_rows (every untied ordered pair
        a row of its own).
    seed: the seed of best_random and of the max_responses choice (the run's ``seed``).
    """

    list_format: str = "auto"
    responses_column: str = "responses"
    ranking_column: str | None = "ranking"
    scores_column: str | None = "scores"
    ultrafeedback_score: str = "overall_score"
    max_responses: int | None = None
    as_lists: bool = False
    binarize: str = "best_worst"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("list_format", self.list_format, LIST_FORMATS)
        _check_choice("ultrafeedback_score", self.ultrafeedback_score, ULTRAFEEDBACK_SCORES)
        _check_choice("binarize", self.binarize, BINARIZE_RULES)
        if not isinstance(self.responses_column, str) or not self.responses_column:
            raise ValueError(f"responses_column must name a column, got {self.responses_column!r}")
        if self.ranking_column is None and self.scores_column is None:
            raise ValueError("ranking_column and scores_column are both null: a list needs one of them to be ranked")
        if self.max_responses is not None and (
            isinstance(self.max_responses, bool) or not isinstance(self.max_responses, int) or self.max_responses < 2
        ):
            raise ValueError(f"max_responses must be an integer >= 2 or null, got {self.max_responses!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def resolve_layout(columns: list[str], config: ListDataConfig) -> str:
    """The layout of a dataset with ``columns``: ``config.list_format``, or the one ``auto`` finds."""
    if config.list_format != "auto":
        return config.list_format
    for layout, needed in LAYOUT_COLUMNS.items():
        if all(column in columns for column in needed):
            return layout
    return "responses" if config.responses_column in columns else "pairs"


def layout_columns(layout: str, config: ListDataConfig) -> list[str]:
    """The columns a list layout reads for its prompt and responses (the hub layouts: all of them)."""
    return list(LAYOUT_COLUMNS.get(layout, ("prompt", config.responses_column)))


def label_of(layout: str, columns: list[str], config: ListDataConfig) -> tuple[str | None, str]:
    """(column, kind): where a layout's order is, and whether it is a "ranking" or "scores". The
    responses layout reads the ranking when its column is there, else the scores; the column is
    None when the data has neither."""
    if layout in LAYOUT_COLUMNS:
        return LAYOUT_COLUMNS[layout][-1], "scores"
    has = {name: name is not None and name in columns for name in (config.ranking_column, config.scores_column)}
    if has[config.ranking_column]:
        if has[config.scores_column]:
            logger.info(
                "the lists have a %r and a %r column: the ranking is the label (ranking_column: null ranks by the "
                "scores)",
                config.ranking_column,
                config.scores_column,
            )
        return config.ranking_column, "ranking"
    if has[config.scores_column]:
        return config.scores_column, "scores"
    return None, "scores" if config.ranking_column is None else "ranking"


def canonical_row(layout: str, row: dict[str, Any], config: ListDataConfig, label: tuple[str, str]) -> dict[str, Any]:
    """One raw row (its ``layout_columns`` and ``label`` = ``label_of``'s (column, kind)) as
    {"prompt", "responses", "ranking" | "scores"}; raises RowProblem where the layout's own fields
    are unreadable (an UltraFeedback completion without its score)."""
    if layout == "ultrafeedback":
        completions = row["completions"]
        if not isinstance(completions, list):
            raise RowProblem("bad_responses", f"'completions' is {type(completions).__name__}, expected a list")
        return {
            "prompt": _user(row["instruction"]),
            "responses": [_assistant(_field(c, "response")) for c in completions],
            "scores": [ultrafeedback_score(c, config.ultrafeedback_score, k) for k, c in enumerate(completions)],
        }
    if layout == "armorm":
        responses = row["all_generated_responses"]
        return {
            "prompt": _user(row["prompt"]),
            "responses": [_assistant(r) for r in responses] if isinstance(responses, list) else responses,
            "scores": row["all_rm_scores"],
        }
    column, kind = label
    return {"prompt": row["prompt"], "responses": row[config.responses_column], kind: row[column]}


def ultrafeedback_score(completion: Any, key: str, position: int) -> float:
    """The number ``key`` names in one UltraFeedback completion (module docstring)."""
    if key in ("overall_score", "fine-grained_score"):
        value, where = _field(completion, key), f"'{key}'"
    else:
        aspect = (_field(completion, "annotations") or {}).get(key)
        value, where = (aspect.get("Rating") if isinstance(aspect, dict) else None), f"the {key} 'Rating'"
    number = _number(value)
    if number is None:
        raise RowProblem(
            "bad_scores",
            f"completion {position} has no number in {where} (it holds {value!r}); choose another ultrafeedback_score "
            "or drop the row",
        )
    return number


def _field(completion: Any, key: str) -> Any:
    return completion.get(key) if isinstance(completion, dict) else None


def _number(value: Any) -> float | None:
    """A finite number from a number or its text ("4"), else None ("N/A", null, NaN)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _user(content: Any) -> Any:
    return [{"role": "user", "content": content}] if isinstance(content, str) else content


def _assistant(content: Any) -> Any:
    return [{"role": "assistant", "content": content}] if isinstance(content, str) else content
