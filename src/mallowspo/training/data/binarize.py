"""Pairs and lists, each turned into what the objective trains on: the one loader of a run
(``prepare_training_data``), which the trainer and `mallowspo train` both call.

    objective pairwise (``ListDataConfig.as_lists`` False): tokenized lists become pairs (``binarize``):
        best_worst         one pair per list: its best response against its worst
        best_random        one pair per list: its best against one of the responses ranked below it, drawn
                           from ``numpy.random.default_rng([seed, row_index])`` (the same pair in every run
                           with that seed, whatever the order or number of rows)
        all_pairs_as_rows  every ordered pair (i ranked above j) a row of its own; a list of K responses
                           without ties gives K (K - 1) / 2 rows, so it weighs K (K - 1) / 2 times a
                           pair (the all_pairs objective gives each prompt one unit of weight instead)
      A tied top or bottom group gives its first listed response. The pairs keep their list's tokens
      (prompt split, truncation), ``row_index`` and carried columns, so a pairwise run on binarized
      lists and a listwise run on the same lists see the same tokens.
    objective plackett_luce / all_pairs (``as_lists`` True): tokenized pairs become lists of K = 2,
      [chosen, rejected] with ranks [0, 1] (``pairs_as_lists``); lists stay lists.

Tokenized data (with ``prompt_input_ids``) is checked and used as it is, then turned likewise.
"""

from __future__ import annotations

import logging

import datasets
import numpy as np

from mallowspo.training.data.list_formats import ListDataConfig
from mallowspo.training.data.lists import LIST_TOKEN_COLUMNS, is_list_layout, prepare_list_dataset
from mallowspo.training.data.load import source_of
from mallowspo.training.data.prepare import (
    TOKEN_COLUMNS,
    PreferenceDataConfig,
    check_tokenized_dataset,
    prepare_preference_dataset,
)
from mallowspo.training.data.validate import DataValidationError, ValidationReport

logger = logging.getLogger("mallowspo.data")

# Columns that belong to one shape only (per response, or computed from the responses): not carried over.
LIST_ONLY_COLUMNS = (*LIST_TOKEN_COLUMNS[1:], "ranks", "ref_logps", "ref_entropy", "lengths", "hbar", "neg_log_phi")
PAIR_ONLY_COLUMNS = (
    *TOKEN_COLUMNS[1:],
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_chosen_entropy",
    "ref_rejected_entropy",
    "hbar",
    "neg_log_phi",
)


def is_list_dataset(dataset: datasets.Dataset | None) -> bool:
    """Whether tokenized data holds lists (``responses_input_ids``), not pairs."""
    return dataset is not None and "responses_input_ids" in dataset.column_names


def prepare_training_data(
    dataset: datasets.Dataset,
    tokenizer,
    config: PreferenceDataConfig,
    lists: ListDataConfig,
    name: str = "train",
) -> tuple[datasets.Dataset, ValidationReport | None]:
    """Raw rows (pairs or lists, in any layout of ``data.list_formats``) validated and tokenized, or
    tokenized rows checked, then turned into the objective's shape (module docstring). Returns the
    dataset and the validation report (None for tokenized data)."""
    report = None
    if "prompt_input_ids" in dataset.column_names:
        check_tokenized_lists(dataset, name) if is_list_dataset(dataset) else check_tokenized_dataset(dataset, name)
    elif is_list_layout(dataset, lists):
        dataset, report = prepare_list_dataset(dataset, tokenizer, config, lists, name)
    else:
        dataset, report = prepare_preference_dataset(dataset, tokenizer, config, name)
    if lists.as_lists and not is_list_dataset(dataset):
        dataset = pairs_as_lists(dataset)
    elif not lists.as_lists and is_list_dataset(dataset):
        size = len(dataset)
        dataset = binarize(dataset, lists.binarize, lists.seed)
        logger.info(
            "%s: %d lists binarized (%s) into %d pairs (objective pairwise)", name, size, lists.binarize, len(dataset)
        )
    return dataset, report


def check_tokenized_lists(dataset: datasets.Dataset, name: str = "train") -> None:
    """Check tokenized lists before they are used as they are: the columns, a non-empty prompt and
    responses, one rank per response and at least two distinct ranks (DataValidationError naming a row)."""
    source = source_of(dataset)
    where = f"'{name}'" + (f" ({source})" if source else "")
    missing = [c for c in (*LIST_TOKEN_COLUMNS, "ranks") if c not in dataset.column_names]
    if missing:
        raise DataValidationError(
            f"Tokenized list data {where} has no column {', '.join(map(repr, missing))}; tokenized lists need "
            f"{', '.join(LIST_TOKEN_COLUMNS)} and ranks (as prepare_list_dataset writes them)"
        )
    view = dataset.select_columns([*LIST_TOKEN_COLUMNS, "ranks"])
    for index, row in enumerate(view):
        responses, ranks = row["responses_input_ids"], row["ranks"]
        problem = None
        if not row["prompt_input_ids"] or not responses or not all(responses):
            problem = "an empty prompt or response"
        elif len(ranks) != len(responses) or min(ranks) < 0:
            problem = f"{len(ranks)} ranks for {len(responses)} responses (one rank >= 0 each)"
        elif len(set(ranks)) < 2:
            problem = "fewer than 2 distinct ranks"
        if problem:
            raise DataValidationError(
                f"Tokenized list data {where}: row {index} has {problem}; drop it, or tokenize the raw lists with "
                "prepare_list_dataset"
            )


def ordered_pairs(ranks: list[int], rule: str, rng: np.random.Generator | None = None) -> list[tuple[int, int]]:
    """The (better, worse) response indices ``rule`` takes from one list (module docstring)."""
    best, worst = ranks.index(min(ranks)), ranks.index(max(ranks))
    if rule == "best_worst":
        return [(best, worst)]
    if rule == "best_random":
        below = [k for k, rank in enumerate(ranks) if rank > ranks[best]]
        return [(best, below[int(rng.integers(len(below)))])]
    if rule == "all_pairs_as_rows":
        return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]
    raise ValueError(f"binarize must be one of best_worst, best_random, all_pairs_as_rows, got {rule!r}")


def binarize(dataset: datasets.Dataset, rule: str, seed: int = 0) -> datasets.Dataset:
    """Tokenized lists as tokenized pairs by ``rule`` (module docstring)."""
    carried = [c for c in dataset.column_names if c not in LIST_ONLY_COLUMNS and c != "prompt_input_ids"]
    table = dataset.to_dict()
    out: dict[str, list] = {name: [] for name in (*TOKEN_COLUMNS, *carried)}
    for position in range(len(dataset)):
        row_index = table["row_index"][position] if "row_index" in table else position
        rng = np.random.default_rng([seed, row_index]) if rule == "best_random" else None
        responses = table["responses_input_ids"][position]
        for better, worse in ordered_pairs(table["ranks"][position], rule, rng):
            out["prompt_input_ids"].append(table["prompt_input_ids"][position])
            out["chosen_input_ids"].append(responses[better])
            out["rejected_input_ids"].append(responses[worse])
            for name in carried:
                out[name].append(table[name][position])
    return datasets.Dataset.from_dict(out)


def pairs_as_lists(dataset: datasets.Dataset) -> datasets.Dataset:
    """Tokenized pairs as tokenized lists of K = 2: responses [chosen, rejected], ranks [0, 1]."""
    carried = [c for c in dataset.column_names if c not in PAIR_ONLY_COLUMNS and c != "prompt_input_ids"]
    table = dataset.to_dict()
    responses = [[c, r] for c, r in zip(table["chosen_input_ids"], table["rejected_input_ids"])]
    return datasets.Dataset.from_dict(
        {
            "prompt_input_ids": table["prompt_input_ids"],
            "responses_input_ids": responses,
            "ranks": [[0, 1]] * len(dataset),
            **{name: table[name] for name in carried},
        }
    )
