"""Tests of the data layer (mallowspo.training.data): loading, validation, templating, tokenization.

Uses the locally trained `tiny_tokenizer` (tests/conftest.py) and the files under
tests/fixtures/data/; no network.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import datasets
import pytest

from mallowspo.training.data import (
    PROBLEM_KINDS,
    DataValidationError,
    PreferenceDataConfig,
    ValidationReport,
    load_preference_dataset,
    prepare_preference_dataset,
)
from mallowspo.training.data import load as data_load
from mallowspo.training.data.list_validate import LIST_PROBLEM_KINDS

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


@pytest.fixture(scope="module", autouse=True)
def _isolated_datasets_cache(tmp_path_factory):
    """Keep `datasets`' cache of the loaded fixture files out of the user's home."""
    datasets.disable_progress_bars()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


def load(name: str) -> datasets.Dataset:
    return load_preference_dataset(str(FIXTURES / f"{name}.jsonl"))


def rows_of(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def prepare(dataset, tokenizer, **config):
    return prepare_preference_dataset(dataset, tokenizer, PreferenceDataConfig(**config))


def ids(dataset: datasets.Dataset) -> dict[str, list]:
    return {column: dataset[column][:] for column in ID_COLUMNS}


# ----------------------------------------------------------------------------------------
# Valid data in the four formats
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["standard_explicit", "standard_implicit", "conversational_explicit", "conversational_implicit"]
)
def test_valid_formats_give_one_row_per_pair(name, tiny_tokenizer):
    out, report = prepare(load(name), tiny_tokenizer)
    n = len(rows_of(name))
    assert report.total_rows == report.kept_rows == len(out) == n
    assert report.problems == {}
    assert set(out.column_names) == {*ID_COLUMNS, "prompt", "row_index"}
    assert out["row_index"][:] == list(range(n))
    for row in out:
        assert row["prompt_input_ids"][0] == tiny_tokenizer.bos_token_id
        assert row["prompt_input_ids"].count(tiny_tokenizer.bos_token_id) == 1
        for column in ("chosen_input_ids", "rejected_input_ids"):
            assert row[column][-1] == tiny_tokenizer.eos_token_id  # added (standard) or by the template
            assert row[column].count(tiny_tokenizer.eos_token_id) == 1
        assert isinstance(row["prompt"], str) and row["prompt"]


def test_standard_and_conversational_rows_give_identical_ids(tiny_tokenizer):
    conversational = rows_of("conversational_explicit")
    standard = []
    for row in conversational:  # render the conversations with the template, as text
        prompt = tiny_tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        completions = {
            key: tiny_tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False)[len(prompt) :]
            for key in ("chosen", "rejected")
        }
        standard.append({"prompt": prompt, **completions})
    out_conv, _ = prepare(load("conversational_explicit"), tiny_tokenizer)
    out_std, _ = prepare(datasets.Dataset.from_list(standard), tiny_tokenizer)
    assert ids(out_std) == ids(out_conv)
    assert out_std["prompt"][:] == out_conv["prompt"][:]


def test_conversational_ids_concatenate_to_the_templated_conversation(tiny_tokenizer):
    out, _ = prepare(load("conversational_explicit"), tiny_tokenizer)
    for row, source in zip(out, rows_of("conversational_explicit")):
        for key in ("chosen", "rejected"):
            full = tiny_tokenizer.apply_chat_template(source["prompt"] + source[key], tokenize=True)["input_ids"]
            assert row["prompt_input_ids"] + row[f"{key}_input_ids"] == list(full)


@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_implicit_prompt_gives_the_same_ids_as_explicit(kind, tiny_tokenizer):
    explicit, _ = prepare(load(f"{kind}_explicit"), tiny_tokenizer)
    implicit, _ = prepare(load(f"{kind}_implicit"), tiny_tokenizer)
    assert ids(implicit) == ids(explicit)
    assert implicit["prompt"][:] == explicit["prompt"][:]


def test_standard_prompt_gets_bos_once_and_completion_eos_once(tiny_tokenizer):
    bos, eos = tiny_tokenizer.bos_token, tiny_tokenizer.eos_token
    rows = [
        {"prompt": "What color is the sky?", "chosen": " Blue.", "rejected": " Green."},
        {"prompt": bos + "What color is the sky?", "chosen": " Blue." + eos, "rejected": " Green."},
    ]
    out, _ = prepare(datasets.Dataset.from_list(rows), tiny_tokenizer)
    assert out[0]["prompt_input_ids"] == out[1]["prompt_input_ids"]
    assert out[0]["chosen_input_ids"] == out[1]["chosen_input_ids"]
    assert out[0]["prompt_input_ids"].count(tiny_tokenizer.bos_token_id) == 1
    plain = tiny_tokenizer(" Blue.", add_special_tokens=False)["input_ids"]
    assert out[0]["chosen_input_ids"] == plain + [tiny_tokenizer.eos_token_id]

    no_eos, _ = prepare(datasets.Dataset.from_list(rows[:1]), tiny_tokenizer, add_eos=False)
    assert no_eos[0]["chosen_input_ids"] == plain


def test_dispersion_column_is_returned_as_float(tiny_tokenizer):
    rows = [dict(r, neg_log_phi=v) for r, v in zip(rows_of("standard_explicit"), [0.5, 1, "2.5", 3.0])]
    out, _ = prepare(_json_dataset(rows), tiny_tokenizer, dispersion_column="neg_log_phi")
    assert out["dispersion"][:] == [0.5, 1.0, 2.5, 3.0]
    assert out.features["dispersion"].dtype == "float64"


def _json_dataset(rows: list[dict]) -> datasets.Dataset:
    """A Dataset from rows of mixed value types, as the JSON loader builds it."""
    features = {key: datasets.Json() for key in rows[0]}
    return datasets.Dataset.from_list(rows, features=datasets.Features(features))


# ----------------------------------------------------------------------------------------
# Problem kinds: each fixture file, strict and lenient
# ----------------------------------------------------------------------------------------

# fixture file, config, kind, rows with the problem
PROBLEM_CASES = [
    ("non_string_field", {}, "non_string_field", [1, 3, 4]),
    ("bad_messages", {}, "bad_messages", [1, 2, 3, 5]),
    ("empty_field", {}, "empty_field", [1, 2, 3]),
    ("chosen_equals_rejected", {}, "chosen_equals_rejected", [1, 2]),
    ("prompt_too_long", {"max_prompt_length": 32, "max_length": 64}, "prompt_too_long", [1]),
    ("completion_empty_after_truncation", {}, "completion_empty_after_truncation", [1, 3]),
    ("bad_dispersion", {"dispersion_column": "neg_log_phi"}, "bad_dispersion", [1, 2, 3, 4, 5, 6]),
    ("mixed_formats", {}, "mixed_formats", [2]),
    ("bad_tools", {}, "bad_tools", [1, 2]),
    ("bad_chat_template_kwargs", {}, "bad_chat_template_kwargs", [1, 2]),
    ("missing_tools", {}, "missing_tools", [1, 2]),
    ("completion_too_long", {"truncation_mode": "keep_end", "max_length": 16}, "completion_too_long", [1]),
]
FATAL_CASES = {"mixed_formats", "missing_tools"}


def test_every_problem_kind_has_a_fixture():
    covered = {case[2] for case in PROBLEM_CASES} | {"missing_columns"} | set(LIST_PROBLEM_KINDS)  # test_lists.py
    assert covered == set(PROBLEM_KINDS)
    for name, *_ in PROBLEM_CASES:
        assert (FIXTURES / f"{name}.jsonl").is_file()


@pytest.mark.parametrize("name,config,kind,bad_rows", PROBLEM_CASES, ids=[c[0] for c in PROBLEM_CASES])
def test_problem_strict_raises_naming_kind_count_row_and_file(name, config, kind, bad_rows, tiny_tokenizer):
    with pytest.raises(DataValidationError) as caught:
        prepare(load(name), tiny_tokenizer, strict=True, **config)
    message = str(caught.value)
    count = f"{len(bad_rows)} row{'s' if len(bad_rows) > 1 else ''}"
    assert kind in message and f"({count};" in message
    assert f"row {bad_rows[0]}:" in message
    assert f"{name}.jsonl" in message
    assert "\n" not in message and "Traceback" not in message
    assert caught.value.report.problems == {kind: bad_rows}


@pytest.mark.parametrize(
    "name,config,kind,bad_rows",
    [c for c in PROBLEM_CASES if c[0] not in FATAL_CASES],
    ids=[c[0] for c in PROBLEM_CASES if c[0] not in FATAL_CASES],
)
def test_problem_lenient_skips_counts_and_logs(name, config, kind, bad_rows, tiny_tokenizer, caplog):
    dataset = load(name)
    with caplog.at_level(logging.WARNING, logger="mallowspo.training.data"):
        out, report = prepare(dataset, tiny_tokenizer, strict=False, **config)
    good_rows = [i for i in range(len(dataset)) if i not in bad_rows]
    assert report.problems == {kind: bad_rows}
    assert report.total_rows == len(dataset) and report.kept_rows == len(good_rows) == len(out)
    assert out["row_index"][:] == good_rows
    assert kind in caplog.text and f"row {bad_rows[0]}" in caplog.text
    assert kind in report.summary() and f"{len(bad_rows)} row" in report.summary()


def test_mixed_formats_is_an_error_even_when_lenient(tiny_tokenizer):
    with pytest.raises(DataValidationError, match=r"mixed_formats \(1 row; e\.g\. row 2: it is conversational"):
        prepare(load("mixed_formats"), tiny_tokenizer, strict=False)


@pytest.mark.parametrize("strict", [True, False])
def test_missing_columns_is_an_error_that_suggests_the_close_name(strict, tiny_tokenizer):
    with pytest.raises(DataValidationError) as caught:
        prepare(load("missing_columns"), tiny_tokenizer, strict=strict)
    message = str(caught.value)
    assert "missing_columns" in message and "missing_columns.jsonl" in message
    assert "did you mean 'chosen_response'?" in message and "did you mean 'rejected_response'?" in message
    assert "cannot be skipped" in message


def test_missing_dispersion_column_is_missing_columns(tiny_tokenizer):
    with pytest.raises(DataValidationError, match="missing_columns.*'neg_log_phi'"):
        prepare(load("standard_explicit"), tiny_tokenizer, dispersion_column="neg_log_phi")


def test_non_finite_dispersion_values_in_memory(tiny_tokenizer):
    rows = [dict(r, d=v) for r, v in zip(rows_of("standard_explicit"), [1.0, math.nan, math.inf, -math.inf])]
    out, report = prepare(datasets.Dataset.from_list(rows), tiny_tokenizer, strict=False, dispersion_column="d")
    assert report.problems == {"bad_dispersion": [1, 2, 3]} and out["row_index"][:] == [0]


def test_bad_messages_examples_name_the_fault(tiny_tokenizer):
    _, report = prepare(load("bad_messages"), tiny_tokenizer, strict=False)
    assert "role 'human'" in report.examples["bad_messages"]


def test_prompt_leaving_no_room_within_max_length_is_prompt_too_long(tiny_tokenizer):
    dataset = load("standard_explicit")
    full, _ = prepare(dataset, tiny_tokenizer, max_prompt_length=None, max_length=None)
    shortest = min(len(p) for p in full["prompt_input_ids"])
    _, report = prepare(dataset, tiny_tokenizer, strict=False, max_prompt_length=None, max_length=shortest + 1)
    too_long = [i for i, p in enumerate(full["prompt_input_ids"]) if len(p) >= shortest + 1]
    assert report.problems["prompt_too_long"] == too_long
    assert "no room for a completion" in report.examples["prompt_too_long"]


def test_completions_equal_after_truncation_are_chosen_equals_rejected(tiny_tokenizer):
    rows = [
        {"prompt": "Where is the sun?", "chosen": " The sun is in the sky.", "rejected": " The sun is in the sea."},
        {"prompt": "Name a prime number.", "chosen": " Seven.", "rejected": " Nine."},
    ]
    _, report = prepare(datasets.Dataset.from_list(rows), tiny_tokenizer, strict=False, max_completion_length=2)
    assert report.problems == {"chosen_equals_rejected": [0]}
    assert "after truncation" in report.examples["chosen_equals_rejected"]


def test_lenient_with_no_row_left_is_an_error(tiny_tokenizer):
    rows = [{"prompt": "Hi", "chosen": None, "rejected": " x"}, {"prompt": "Hi", "chosen": " y", "rejected": " y"}]
    with pytest.raises(DataValidationError, match="No usable row is left"):
        prepare(datasets.Dataset.from_list(rows), tiny_tokenizer, strict=False)


def test_empty_dataset_is_an_error(tiny_tokenizer):
    empty = datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(DataValidationError, match="'eval' has no rows"):
        prepare_preference_dataset(empty, tiny_tokenizer, PreferenceDataConfig(), name="eval")


def test_conversational_data_needs_a_chat_template(tiny_tokenizer):
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    with pytest.raises(DataValidationError, match="no chat template"):
        prepare(load("conversational_explicit"), bare)


def test_chat_template_failure_is_bad_messages(tiny_tokenizer):
    picky = copy.deepcopy(tiny_tokenizer)
    picky.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + picky.chat_template
    )
    out, report = prepare(load("conversational_explicit"), picky, strict=False)
    assert report.problems == {"bad_messages": [1]}  # row 1 has a system message
    assert "System role not supported" in report.examples["bad_messages"]
    assert out["row_index"][:] == [0, 2]


def test_prepare_rejects_a_dataset_dict(tiny_tokenizer):
    with pytest.raises(TypeError, match="DatasetDict"):
        prepare(datasets.DatasetDict({"train": load("standard_explicit")}), tiny_tokenizer)


def test_report_to_dict_and_summary(tiny_tokenizer):
    _, report = prepare(load("empty_field"), tiny_tokenizer, strict=False)
    as_dict = report.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["total_rows"] == 5 and as_dict["kept_rows"] == 2
    assert as_dict["problems"] == {"empty_field": [1, 2, 3]}
    assert "empty_field: 3 rows; e.g. row 1" in report.summary()
    clean = ValidationReport(total_rows=3, kept_rows=3)
    assert "no problems" in clean.summary()


# ----------------------------------------------------------------------------------------
# Truncation
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["standard_explicit", "conversational_explicit"])
def test_truncation_respects_budgets_and_keeps_prompt_intact(name, tiny_tokenizer):
    dataset = load(name)
    full, _ = prepare(dataset, tiny_tokenizer, max_prompt_length=None, max_length=None)
    max_length, max_completion = 24, 6
    out, report = prepare(
        dataset,
        tiny_tokenizer,
        strict=False,
        max_length=max_length,
        max_prompt_length=20,
        max_completion_length=max_completion,
    )
    assert set(report.problems) <= {"prompt_too_long"}
    assert len(out) > 0
    for row in out:
        reference = full[row["row_index"]]
        assert row["prompt_input_ids"] == reference["prompt_input_ids"]  # never truncated
        assert len(row["prompt_input_ids"]) <= 20
        for column in ("chosen_input_ids", "rejected_input_ids"):
            kept = row[column]
            assert 0 < len(kept) <= max_completion
            assert len(row["prompt_input_ids"]) + len(kept) <= max_length
            assert kept == reference[column][: len(kept)]  # the start is kept
    assert any(len(r) < len(full[i]["chosen_input_ids"]) for r, i in zip(out["chosen_input_ids"], out["row_index"]))


@pytest.mark.parametrize("name", ["standard_explicit", "conversational_explicit"])
def test_keep_end_cuts_the_prompt_start_once_for_both_completions(name, tiny_tokenizer):
    dataset = load(name)
    full, _ = prepare(dataset, tiny_tokenizer, max_length=None)
    max_length, max_completion = 16, 8
    out, report = prepare(
        dataset,
        tiny_tokenizer,
        max_length=max_length,
        max_completion_length=max_completion,
        truncation_mode="keep_end",
    )
    assert report.problems == {} and len(out) == len(dataset)
    for row in out:
        reference = full[row["row_index"]]
        completions = [row[c] for c in ("chosen_input_ids", "rejected_input_ids")]
        for kept, column in zip(completions, ("chosen_input_ids", "rejected_input_ids")):
            assert kept == reference[column][:max_completion]  # completions keep their start
        longest = max(len(c) for c in completions)
        prompt = reference["prompt_input_ids"]
        assert row["prompt_input_ids"] == prompt[-(max_length - longest) :]  # the prompt keeps its end
    cut = [i for i, (a, b) in enumerate(zip(out, full)) if a != b]
    assert cut and report.notes["truncated"] == cut


def test_config_rejects_meaningless_budgets():
    with pytest.raises(ValueError, match="max_completion_length"):
        PreferenceDataConfig(max_completion_length=0)
    with pytest.raises(ValueError, match="max_length"):
        PreferenceDataConfig(max_length=1, max_prompt_length=None)
    with pytest.raises(ValueError, match=r"max_length \(64\) must exceed max_prompt_length \(64\)"):
        PreferenceDataConfig(max_length=64, max_prompt_length=64)
    with pytest.raises(ValueError, match="truncation_mode must be one of 'keep_start', 'keep_end', got 'left'"):
        PreferenceDataConfig(truncation_mode="left")
    PreferenceDataConfig(max_length=128)  # no prompt budget of its own: rows then check there is room


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------


def _assert_same_rows(dataset: datasets.Dataset, expected: list[dict]):
    assert len(dataset) == len(expected)
    assert [{k: row[k] for k in expected[0]} for row in dataset] == expected


def test_load_jsonl_and_json_array(tmp_path):
    expected = rows_of("standard_explicit")
    _assert_same_rows(load("standard_explicit"), expected)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(expected))
    _assert_same_rows(load_preference_dataset(str(path)), expected)


def test_load_parquet_and_csv(tmp_path):
    expected = rows_of("standard_explicit")
    datasets.Dataset.from_list(expected).to_parquet(str(tmp_path / "data.parquet"))
    datasets.Dataset.from_list(expected).to_csv(str(tmp_path / "data.csv"), index=False)
    _assert_same_rows(load_preference_dataset(tmp_path / "data.parquet"), expected)
    _assert_same_rows(load_preference_dataset(str(tmp_path / "data.csv")), expected)


def test_load_conversational_parquet_prepares_like_jsonl(tmp_path, tiny_tokenizer):
    load("conversational_explicit").to_parquet(str(tmp_path / "conv.parquet"))
    from_parquet, _ = prepare(load_preference_dataset(str(tmp_path / "conv.parquet")), tiny_tokenizer)
    from_jsonl, _ = prepare(load("conversational_explicit"), tiny_tokenizer)
    assert ids(from_parquet) == ids(from_jsonl)


def test_load_save_to_disk_directories(tmp_path):
    expected = rows_of("standard_explicit")
    dataset = datasets.Dataset.from_list(expected)
    dataset.save_to_disk(str(tmp_path / "single"))
    _assert_same_rows(load_preference_dataset(str(tmp_path / "single")), expected)
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "dict"))
    _assert_same_rows(load_preference_dataset(str(tmp_path / "dict"), split="test"), expected[:1])
    with pytest.raises(DataValidationError, match="no split 'validation'.*'test', 'train'"):
        load_preference_dataset(str(tmp_path / "dict"), split="validation")


def test_load_directory_of_data_files(tmp_path):
    expected = rows_of("standard_explicit")
    (tmp_path / "train.jsonl").write_text((FIXTURES / "standard_explicit.jsonl").read_text())
    _assert_same_rows(load_preference_dataset(str(tmp_path)), expected)
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(DataValidationError, match="holds no"):
        load_preference_dataset(str(empty_dir))


def test_load_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "data.jsonl"
    with pytest.raises(FileNotFoundError, match="data.jsonl"):
        load_preference_dataset(str(missing))
    with pytest.raises(FileNotFoundError):
        load_preference_dataset("./not_here")


def test_load_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(DataValidationError, match=r"unsupported file extension '\.txt'.*\.jsonl"):
        load_preference_dataset(str(path))


def test_load_truncated_jsonl_names_file_and_line():
    with pytest.raises(DataValidationError) as caught:
        load_preference_dataset(str(FIXTURES / "truncated.jsonl"))
    message = str(caught.value)
    assert "truncated.jsonl" in message and "line 3 is not valid JSON" in message
    assert caught.value.__suppress_context__  # no chained traceback


def test_load_invalid_utf8_names_file_and_line():
    expected = r"invalid_utf8\.jsonl: it is not valid UTF-8 text \(byte 0xe9 on line 2"
    with pytest.raises(DataValidationError, match=expected):
        load_preference_dataset(str(FIXTURES / "invalid_utf8.jsonl"))


def test_utf8_check_handles_characters_split_across_chunks(tmp_path):
    path = tmp_path / "multi.jsonl"
    path.write_text('{"prompt": "café ü 日本"}\n' * 3, encoding="utf-8")
    for chunk_size in (1, 2, 3, 7):
        data_load._check_utf8(path, chunk_size=chunk_size)  # no error
    path.write_bytes(path.read_bytes() + b'{"x": "\xff"}\n')
    with pytest.raises(DataValidationError, match="line 4"):
        data_load._check_utf8(path, chunk_size=5)


def test_load_empty_files():
    with pytest.raises(DataValidationError, match="empty.jsonl: the file is empty"):
        load_preference_dataset(str(FIXTURES / "empty.jsonl"))


def test_load_empty_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[]")
    with pytest.raises(DataValidationError, match="empty JSON array"):
        load_preference_dataset(str(path))


def test_hub_id_goes_to_load_dataset_and_failures_are_explained(monkeypatch):
    calls = []

    def fake_load_dataset(source, name=None, split=None, **kwargs):
        calls.append((source, name, split))
        raise ConnectionError("no network\nlong details")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    expected = r"'org/prefs'.*hub dataset \(split 'test'\).*ConnectionError: no network"
    with pytest.raises(DataValidationError, match=expected):
        load_preference_dataset("org/prefs", split="test")
    with pytest.raises(DataValidationError, match=expected):
        load_preference_dataset("org/prefs", split="test", config_name="default")  # TRL's dataset_config
    assert calls == [("org/prefs", None, "test"), ("org/prefs", "default", "test")]


def test_loaded_file_name_appears_in_validation_errors(tiny_tokenizer):
    with pytest.raises(DataValidationError, match=r"'eval' \(.*empty_field\.jsonl\)"):
        prepare_preference_dataset(load("empty_field"), tiny_tokenizer, PreferenceDataConfig(), name="eval")
