"""Ranked lists in the data layer: validation (one-line messages naming the row), the layouts
(UltraFeedback, ArmoRM, responses with a ranking or scores), tokenization against the pairs',
max_responses, binarization and pairs as lists. Synthetic rows in the hub datasets' shapes; no network."""

from __future__ import annotations

import math

import datasets
import pytest

from mallowspo.training.data import (
    PROBLEM_KINDS,
    DataValidationError,
    ListDataConfig,
    PreferenceDataConfig,
    load_preference_dataset,
    prepare_list_dataset,
    prepare_preference_dataset,
    prepare_training_data,
)
from mallowspo.training.data.binarize import binarize, pairs_as_lists
from mallowspo.training.data.list_formats import ULTRAFEEDBACK_ASPECTS, resolve_layout
from mallowspo.training.data.list_validate import LIST_PROBLEM_KINDS, check_list_row
from mallowspo.training.data.validate import RowProblem

CONFIG = PreferenceDataConfig(max_length=64)


@pytest.fixture(scope="module", autouse=True)
def _isolated_datasets_cache(tmp_path_factory):
    datasets.disable_progress_bars()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


def lists(rows, tokenizer, config=CONFIG, **list_settings):
    return prepare_list_dataset(datasets.Dataset.from_list(rows), tokenizer, config, ListDataConfig(**list_settings))


def conversation(text):
    return [{"role": "assistant", "content": text}]


GOOD = {"prompt": "Name a prime number.", "responses": [" Seven.", " Nine.", " Two."], "ranking": [0, 2, 1]}


# ----------------------------------------------------------------------------------------
# Validation: one problem kind per row, named in one line
# ----------------------------------------------------------------------------------------

SCORED = {"prompt": GOOD["prompt"], "responses": GOOD["responses"], "scores": [3.0, 1.0, 2.0]}
PROBLEMS = [  # (kind, bad row, detail); each beside a good row of the same shape
    (
        "bad_ranking",
        {**GOOD, "ranking": [0, 0, 2]},
        "the ranking [0, 0, 2] is not a permutation of the 3 response indices 0..2 (missing [1], repeated or out of range [0])",
    ),
    ("bad_ranking", {**GOOD, "ranking": [0, 1, 3]}, "(missing [2], repeated or out of range [3])"),
    ("bad_ranking", {**GOOD, "ranking": [0, 1]}, "is not a permutation of the 3 response indices"),
    ("bad_scores", {**SCORED, "scores": [1.0, 2.0]}, "there are 2 scores for 3 responses; give one per response"),
    (
        "bad_scores",
        {**SCORED, "scores": [1.0, math.nan, 0.0]},
        "the score of response 1 is nan, expected a finite number",
    ),
    ("no_preference", {**SCORED, "scores": [3.0, 3.0, 3.0]}, "all 3 responses share one rank (tied scores)"),
    (
        "responses_identical",
        {**GOOD, "responses": [" Seven.", " Nine.", " Seven. "]},
        "response 0 and response 2 are identical but ranked differently",
    ),
    (
        "bad_responses",
        {**GOOD, "responses": [" Seven."], "ranking": [0]},
        "there is 1 response; a list needs at least 2",
    ),
    ("empty_field", {**GOOD, "responses": [" Seven.", "  ", " Two."]}, "response 1 is empty or whitespace only"),
    ("empty_field", {**GOOD, "prompt": " "}, "the prompt is empty or whitespace only"),
]
ROW_PROBLEMS = PROBLEMS + [  # rows arrow cannot hold beside a good one
    ("bad_responses", {**GOOD, "responses": " Seven."}, "the responses are a str, expected a list of completions"),
    ("non_string_field", {**GOOD, "responses": [" Seven.", 9, " Two."]}, "'response 1' is a number (9)"),
    ("mixed_formats", {**GOOD, "responses": [" Seven.", conversation("x"), " Two."]}, "some responses are strings"),
    ("mixed_formats", {**GOOD, "prompt": [{"role": "user", "content": "p"}]}, "the prompt is a list of messages but"),
    (
        "bad_messages",
        {
            **GOOD,
            "prompt": [{"role": "user", "content": "p"}],
            "responses": [[{"role": "user", "content": "a"}], conversation("b"), conversation("c")],
        },
        "response 0 starts with a 'user' message",
    ),
]


def test_every_list_problem_kind_has_a_case():
    assert set(LIST_PROBLEM_KINDS) <= {kind for kind, _, _ in PROBLEMS}


@pytest.mark.parametrize("kind, row, detail", ROW_PROBLEMS, ids=[f"{p[0]}-{i}" for i, p in enumerate(ROW_PROBLEMS)])
def test_each_row_problem_has_its_kind_and_detail(kind, row, detail):
    label = "ranking" if "ranking" in row else "scores"
    with pytest.raises(RowProblem) as caught:
        check_list_row(0, row, label, None)
    assert caught.value.kind == kind and detail in caught.value.detail


@pytest.mark.parametrize("kind, row, detail", PROBLEMS, ids=[f"{p[0]}-{i}" for i, p in enumerate(PROBLEMS)])
def test_a_bad_list_is_one_line_naming_kind_row_and_fix(kind, row, detail, tiny_tokenizer):
    table = datasets.Dataset.from_list([GOOD if "ranking" in row else SCORED, row])
    with pytest.raises(DataValidationError) as caught:
        prepare_list_dataset(table, tiny_tokenizer, CONFIG, ListDataConfig())
    message = str(caught.value)
    assert "\n" not in message and f"{kind} (1 row; e.g. row 1: " in message and detail in message
    assert f"fix: {PROBLEM_KINDS[kind]}" in message and "strict=False" in message
    kept, report = prepare_list_dataset(table, tiny_tokenizer, PreferenceDataConfig(strict=False), ListDataConfig())
    assert report.problems == {kind: [1]} and kept["row_index"] == [0]


def test_missing_list_columns_are_always_an_error(tiny_tokenizer):
    table = datasets.Dataset.from_list([{"prompt": "p", "responses": ["a", "b"]}])
    with pytest.raises(DataValidationError, match=r"no column with the ranking \(ranking_column or scores_column\)"):
        prepare_list_dataset(table, tiny_tokenizer, PreferenceDataConfig(strict=False), ListDataConfig())
    table = datasets.Dataset.from_list([{"prompt": "p", "answers": ["a", "b"], "ranking": [1, 0]}])
    with pytest.raises(DataValidationError, match="no column 'responses' for the responses list layout"):
        prepare_list_dataset(table, tiny_tokenizer, CONFIG, ListDataConfig(list_format="responses"))
    out, _ = prepare_list_dataset(table, tiny_tokenizer, CONFIG, ListDataConfig(responses_column="answers"))
    assert out["ranks"] == [[1, 0]]


def test_ranking_and_scores_give_ranks_ties_shared(tiny_tokenizer):
    by_ranking, _ = lists([GOOD], tiny_tokenizer)
    assert by_ranking["ranks"] == [[0, 2, 1]]  # ranking best first: response 0, then 2, then 1
    tied = {"prompt": GOOD["prompt"], "responses": [*GOOD["responses"], " Four."], "scores": [2.0, 0.5, 2.0, -1]}
    by_scores, _ = lists([tied], tiny_tokenizer)
    assert by_scores["ranks"] == [[0, 2, 0, 3]]
    both, _ = lists([{**GOOD, "scores": [0.0, 1.0, 2.0]}], tiny_tokenizer)  # the ranking is the label
    assert both["ranks"] == [[0, 2, 1]]
    by_scores, _ = lists([{**GOOD, "scores": [0.0, 1.0, 2.0]}], tiny_tokenizer, ranking_column=None)
    assert by_scores["ranks"] == [[2, 1, 0]]


def test_tied_copies_are_merged_and_counted(tiny_tokenizer):
    row = {"prompt": "p", "responses": [" Seven.", " Nine.", " Seven."], "scores": [1.0, 0.0, 1.0]}
    out, report = lists([row], tiny_tokenizer)
    assert out["ranks"] == [[0, 1]] and len(out["responses_input_ids"][0]) == 2
    assert report.notes == {"duplicates_merged": [0]}


def test_rows_may_have_different_k_and_carried_columns_follow(tiny_tokenizer):
    rows = [GOOD, {"prompt": "Say hi.", "responses": [" Hi!", " Go away."], "ranking": [0, 1], "phi": 2.0}]
    rows[0] = {**GOOD, "phi": 0.5}
    out, report = lists(rows, tiny_tokenizer, PreferenceDataConfig(max_length=64, dispersion_column="phi"))
    assert [len(r) for r in out["responses_input_ids"]] == [3, 2] and out["dispersion"] == [0.5, 2.0]
    assert out["row_index"] == [0, 1] and report.kept_rows == 2


def test_max_responses_keeps_best_worst_and_a_seeded_choice(tiny_tokenizer):
    row = {"prompt": "p", "responses": [f" answer {i}." for i in range(6)], "scores": [3, 5, 1, 0, 4, 2]}
    kept = [lists([row], tiny_tokenizer, max_responses=3, seed=seed)[0] for seed in (0, 0, 1, 2, 3)]
    assert all(sorted(out["ranks"][0]) == [0, 1, 2] for out in kept)  # ranked again among the kept
    texts = [tuple(map(tuple, out["responses_input_ids"][0])) for out in kept]
    assert texts[0] == texts[1] and len(set(texts)) > 1  # reproducible, and the seed matters
    full, _ = lists([row], tiny_tokenizer)
    best, worst = full["responses_input_ids"][0][1], full["responses_input_ids"][0][3]
    for out in kept:
        responses, ranks = out["responses_input_ids"][0], out["ranks"][0]
        assert responses[ranks.index(0)] == best and responses[ranks.index(2)] == worst


# ----------------------------------------------------------------------------------------
# Tokenization: a list of K = 2 is the pair
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_two_response_lists_tokenize_exactly_as_pairs(tiny_prefs_path, tiny_tokenizer, mode):
    raw = load_preference_dataset(str(tiny_prefs_path)).select(range(40))
    budget = dict(max_length=20) if mode == "keep_start" else dict(max_length=28, max_completion_length=14)
    config = PreferenceDataConfig(**budget, truncation_mode=mode, strict=False)
    pairs, pair_report = prepare_preference_dataset(raw, tiny_tokenizer, config)
    as_lists = raw.map(lambda r: {"responses": [r["chosen"], r["rejected"]], "ranking": [0, 1]})
    out, list_report = prepare_list_dataset(
        as_lists.remove_columns(["chosen", "rejected"]), tiny_tokenizer, config, ListDataConfig()
    )
    assert pair_report.notes.get("truncated") and list_report.notes.get("truncated") == pair_report.notes["truncated"]
    assert out["row_index"] == pairs["row_index"] and out["prompt_input_ids"] == pairs["prompt_input_ids"]
    assert out["responses_input_ids"] == [
        [c, r] for c, r in zip(pairs["chosen_input_ids"], pairs["rejected_input_ids"])
    ]
    assert out["prompt"] == pairs["prompt"]


def test_conversational_lists_use_the_chat_template(tiny_tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "Sky?"}],
        "responses": [conversation("Blue."), conversation("Green.")],
    }
    out, _ = lists([{**row, "ranking": [1, 0]}], tiny_tokenizer)
    pair = {"prompt": row["prompt"], "chosen": conversation("Green."), "rejected": conversation("Blue.")}
    pairs, _ = prepare_preference_dataset(datasets.Dataset.from_list([pair]), tiny_tokenizer, CONFIG)
    assert out["ranks"] == [[1, 0]]
    assert out["responses_input_ids"][0] == [pairs["rejected_input_ids"][0], pairs["chosen_input_ids"][0]]


# ----------------------------------------------------------------------------------------
# The hub layouts, on synthetic rows of their shapes
# ----------------------------------------------------------------------------------------


def ultrafeedback_row(instruction, graded):
    """A row of openbmb/UltraFeedback: (response, overall_score, four aspect ratings) per completion."""
    completions = []
    for text, overall, ratings in graded:
        numbers = [float(r) for r in ratings if r != "N/A"]
        completions.append(
            {
                "annotations": {
                    aspect: {"Rating": rating, "Rationale": "because", "Type": ["1"]}
                    for aspect, rating in zip(ULTRAFEEDBACK_ASPECTS, ratings)
                },
                "critique": "fine",
                "custom_system_prompt": "",
                "fine-grained_score": sum(numbers) / len(numbers),
                "model": "some-model",
                "overall_score": overall,
                "principle": "helpfulness",
                "response": text,
            }
        )
    return {
        "source": "evol_instruct",
        "instruction": instruction,
        "models": ["m"] * 4,
        "completions": completions,
        "correct_answers": [],
        "incorrect_answers": [],
    }


UF_ROWS = [
    ultrafeedback_row(
        "Name a prime number.",
        [
            ("Seven.", 8.0, ["5", "4", "5", "5"]),
            ("Nine.", 3.0, ["2", "5", "1", "1"]),
            ("Two.", 8.0, ["5", "5", "5", "5"]),
            ("I do not know.", 5.5, ["1", "5", "3", "N/A"]),
        ],
    ),
    ultrafeedback_row("Say hi.", [("Hi!", 7.0, ["4", "4", "4", "4"]), ("Go away.", 2.0, ["1", "3", "2", "3"])]),
]


def test_ultrafeedback_as_published(tiny_tokenizer):
    table = datasets.Dataset.from_list(UF_ROWS)
    assert resolve_layout(table.column_names, ListDataConfig()) == "ultrafeedback"
    out, report = prepare_list_dataset(table, tiny_tokenizer, CONFIG, ListDataConfig())
    assert report.kept_rows == 2
    assert out["ranks"] == [[0, 3, 0, 2], [0, 1]]  # overall_score: the two 8.0 grades tie
    assert out["prompt"][0] == tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a prime number."}], tokenize=False, add_generation_prompt=True
    )
    by_aspect, _ = prepare_list_dataset(table, tiny_tokenizer, CONFIG, ListDataConfig(ultrafeedback_score="honesty"))
    assert by_aspect["ranks"][0] == [3, 0, 0, 0]
    mean, _ = prepare_list_dataset(
        table, tiny_tokenizer, CONFIG, ListDataConfig(ultrafeedback_score="fine-grained_score")
    )
    assert mean["ranks"][0] == [1, 3, 0, 2]
    with pytest.raises(
        DataValidationError, match=r"row 0: completion 3 has no number in the truthfulness 'Rating' \(it holds 'N/A'\)"
    ):
        prepare_list_dataset(table, tiny_tokenizer, CONFIG, ListDataConfig(ultrafeedback_score="truthfulness"))


def armorm_row(prompt, responses, scores):
    """A row of princeton-nlp/llama3-ultrafeedback-armorm; chosen/rejected are its best and worst."""
    best, worst = scores.index(max(scores)), scores.index(min(scores))
    user = {"role": "user", "content": prompt}
    return {
        "prompt_id": prompt[:8],
        "prompt": prompt,
        "all_generated_responses": responses,
        "all_rm_scores": scores,
        "chosen": [user, *conversation(responses[best])],
        "rejected": [user, *conversation(responses[worst])],
    }


ARMORM_ROWS = [
    armorm_row("Name a prime number.", ["Seven.", "Nine.", "Two.", "Four.", "Eleven."], [0.12, -0.3, 0.2, -0.1, 0.15]),
    armorm_row("Say hi.", ["Hi!", "Go away.", "Hello there.", "Bye.", "Hey."], [0.1, -0.5, 0.3, -0.2, 0.0]),
]


def test_armorm_lists_and_their_best_worst_pairs_are_the_dataset_pairs(tiny_tokenizer):
    table = datasets.Dataset.from_list(ARMORM_ROWS)
    assert resolve_layout(table.column_names, ListDataConfig()) == "armorm"
    out, _ = prepare_training_data(table, tiny_tokenizer, CONFIG, ListDataConfig(as_lists=True))
    assert out["ranks"] == [[2, 4, 0, 3, 1], [1, 4, 0, 3, 2]]
    pairs, _ = prepare_training_data(table, tiny_tokenizer, CONFIG, ListDataConfig())  # objective pairwise
    own, _ = prepare_preference_dataset(  # the dataset's own chosen/rejected (implicit prompt)
        table.select_columns(["chosen", "rejected"]), tiny_tokenizer, CONFIG
    )
    for column in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        assert pairs[column] == own[column]
    forced, _ = prepare_training_data(  # list_format pairs reads chosen/rejected (here: their prompt is text)
        table.select_columns(["chosen", "rejected"]), tiny_tokenizer, CONFIG, ListDataConfig(list_format="pairs")
    )
    assert forced["chosen_input_ids"] == own["chosen_input_ids"]


# ----------------------------------------------------------------------------------------
# Binarizing lists; pairs as lists
# ----------------------------------------------------------------------------------------


@pytest.fixture
def tokenized_lists(tiny_tokenizer):
    rows = [
        {"prompt": "p0", "responses": [" a.", " b.", " c.", " d."], "scores": [1.0, 3.0, 2.0, 3.0]},
        {"prompt": "p1", "responses": [" e.", " f."], "scores": [0.0, 1.0]},
    ]
    return lists(rows, tiny_tokenizer)[0]


def test_binarize_rules(tokenized_lists):
    responses = tokenized_lists["responses_input_ids"]
    best_worst = binarize(tokenized_lists, "best_worst")
    assert best_worst["chosen_input_ids"] == [responses[0][1], responses[1][1]]  # the tied top: the first listed
    assert best_worst["rejected_input_ids"] == [responses[0][0], responses[1][0]]
    assert best_worst["row_index"] == [0, 1]
    every = binarize(tokenized_lists, "all_pairs_as_rows")
    assert len(every) == 5 + 1  # ranks [3, 0, 2, 0]: 5 untied ordered pairs, and one
    assert (responses[0][1], responses[0][3]) not in zip(every["chosen_input_ids"], every["rejected_input_ids"])
    draws = {tuple(binarize(tokenized_lists, "best_random", seed)["rejected_input_ids"][0]) for seed in range(12)}
    assert draws == {tuple(responses[0][0]), tuple(responses[0][2])}  # below the best only, and seeded
    assert binarize(tokenized_lists, "best_random", 3)[:] == binarize(tokenized_lists, "best_random", 3)[:]


def test_pairs_become_two_response_lists(tiny_prefs_path, tiny_tokenizer):
    raw = load_preference_dataset(str(tiny_prefs_path)).select(range(8))
    pairs, _ = prepare_preference_dataset(raw, tiny_tokenizer, CONFIG)
    out = pairs_as_lists(pairs)
    assert out["ranks"] == [[0, 1]] * 8 and out["row_index"] == pairs["row_index"]
    assert [r[0] for r in out["responses_input_ids"]] == pairs["chosen_input_ids"]
    via_loader, report = prepare_training_data(raw, tiny_tokenizer, CONFIG, ListDataConfig(as_lists=True))
    assert via_loader["responses_input_ids"] == out["responses_input_ids"] and report.kept_rows == 8
    again, report = prepare_training_data(via_loader, tiny_tokenizer, CONFIG, ListDataConfig(as_lists=True))
    assert report is None and again["ranks"] == via_loader["ranks"]  # tokenized data passes through


def test_tokenized_lists_are_checked(tokenized_lists, tiny_tokenizer):
    broken = tokenized_lists.map(lambda r: {"ranks": [0] * len(r["ranks"])})
    with pytest.raises(DataValidationError, match="row 0 has fewer than 2 distinct ranks"):
        prepare_training_data(broken, tiny_tokenizer, CONFIG, ListDataConfig(as_lists=True))


def test_list_settings_are_checked_in_one_line():
    with pytest.raises(
        ValueError,
        match="list_format must be one of 'auto', 'pairs', 'responses', 'ultrafeedback', 'armorm', got 'uf'",
    ):
        ListDataConfig(list_format="uf")
    with pytest.raises(ValueError, match="max_responses must be an integer >= 2 or null, got 1"):
        ListDataConfig(max_responses=1)
    with pytest.raises(ValueError, match="binarize must be one of"):
        ListDataConfig(binarize="best")
    with pytest.raises(ValueError, match="ranking_column and scores_column are both null"):
        ListDataConfig(ranking_column=None, scores_column=None)
