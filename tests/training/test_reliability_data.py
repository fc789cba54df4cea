"""Reliability, bad input: every file of the corpus tests/fixtures/bad/ through `mallowspo train`.

Strict (the default): exit code 2 and ONE line on stderr, `error: ...`, naming the file, the
row (or line) and the problem; no traceback. Lenient (`--strict_validation false`): the bad
rows are skipped, counted and logged, and the run trains on the rest. Problems that cannot be
skipped (missing columns, mixed formats, unreadable files) stay errors when lenient.
Plus a 5 MB completion: truncated without blowing time or memory.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import datasets
import pytest
import torch

from mallowspo.training.data import PreferenceDataConfig, load_preference_dataset, prepare_preference_dataset

torch.set_num_threads(1)

BAD = Path(__file__).parents[1] / "fixtures" / "bad"
DISPERSION_COLUMN = ["--dispersion_source", "column", "--dispersion_column", "neg_log_phi"]

# file -> (what the error names: a problem kind or a phrase, where: "row N" / "line N" / None,
#          rows skipped when lenient (None: an error even when lenient), extra command-line arguments)
CASES = {
    "missing_chosen.jsonl": ("missing_columns", None, None, []),
    "missing_rejected.jsonl": ("missing_columns", None, None, []),
    "misnamed_columns.jsonl": ("did you mean 'Chosen'?", None, None, []),
    "null_field.jsonl": ("non_string_field", "row 1", [1], []),
    "number_field.jsonl": ("non_string_field", "row 2", [2], []),
    "empty_string.jsonl": ("empty_field", "row 1", [1], []),
    "whitespace_completion.jsonl": ("empty_field", "row 1", [1], []),
    "chosen_equals_rejected.jsonl": ("chosen_equals_rejected", "row 1", [1], []),
    "wrong_role.jsonl": ("bad_messages", "row 1", [1], []),
    "empty_message_list.jsonl": ("bad_messages", "row 2", [2], []),
    "mixed_formats.jsonl": ("mixed_formats", "row 2", None, []),
    "invalid_utf8.jsonl": ("not valid UTF-8", "line 2", None, []),
    "truncated_line.jsonl": ("not valid JSON", "line 3", None, []),
    "prompt_too_long.jsonl": ("prompt_too_long", "row 1", [1], []),
    "completion_emptied_by_truncation.jsonl": ("completion_empty_after_truncation", "row 1", [1], []),
    "empty.jsonl": ("the file is empty", None, None, []),
    "blank_lines.jsonl": ("has no rows", None, None, []),
    "dispersion_nan.jsonl": ("bad_dispersion", "row 1", [1], DISPERSION_COLUMN),
    "dispersion_inf.jsonl": ("bad_dispersion", "row 2", [2, 3], DISPERSION_COLUMN),
    "dispersion_nonpositive.jsonl": ("bad_dispersion", "row 0", [0, 2], DISPERSION_COLUMN),
    "zero_width_completion.jsonl": ("empty_field", "row 1", [1], []),
    "text_prompt_with_message_completions.jsonl": (
        "'prompt' is a string but 'chosen'/'rejected' are lists",
        "row 1",
        None,
        [],
    ),
}


def test_every_file_of_the_corpus_is_a_case():
    assert sorted(CASES) == sorted(p.name for p in BAD.iterdir() if p.suffix == ".jsonl")


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit code 2; the error is the last line of stderr (progress bars may come before it), alone."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_strict_bad_file_is_a_one_line_error_naming_file_row_and_problem(name, run_cli, make_recipe):
    problem, where, _, extra = CASES[name]
    code, _, err = run_cli("train", "--config", make_recipe(), "--dataset_name", BAD / name, *extra)
    assert_one_line_error(code, err, name, problem, *([where] if where else []))


@pytest.mark.parametrize("name", sorted(CASES))
def test_lenient_bad_file_skips_and_counts_the_rows_or_stays_an_error(name, run_cli, make_recipe, caplog):
    problem, where, skipped, extra = CASES[name]
    with caplog.at_level(logging.WARNING, logger="mallowspo"):
        code, _, err = run_cli(
            "train", "--config", make_recipe(), "--dataset_name", BAD / name, "--strict_validation", "false", *extra
        )
    if skipped is None:
        assert_one_line_error(code, err, name, problem)
        return
    assert code == 0, err
    total = sum(1 for line in (BAD / name).read_text().splitlines() if line.strip())
    summary = f"{total} rows, {total - len(skipped)} kept"
    assert summary in caplog.text
    assert f"{problem}: {len(skipped)} row{'s' if len(skipped) > 1 else ''}; e.g. {where}" in caplog.text


def test_huge_completion_is_truncated_without_blowing_memory_or_time(
    tmp_path, tiny_lm_dir, run_cli, make_recipe, isolated_hf_datasets_cache
):
    """A 5 MB completion: only the tokens within the budget are computed (0.03 s, flat memory;
    tokenizing it whole took 17 s and 0.9 GB on this tokenizer), and they are the same tokens."""
    from transformers import AutoTokenizer

    words = ("the sky is blue and the sea is green " * 140_000)[:5_000_000]
    path = tmp_path / "huge_row.jsonl"
    rows = [json.loads(line) for line in (BAD / "null_field.jsonl").read_text().splitlines()]
    rows[1] = {"prompt": "What color is the sky?", "chosen": " " + words, "rejected": " Green."}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert path.stat().st_size > 5_000_000

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    raw = load_preference_dataset(path)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    start = time.perf_counter()
    out, report = prepare_preference_dataset(raw, tokenizer, PreferenceDataConfig(max_length=48, max_prompt_length=24))
    elapsed = time.perf_counter() - start
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak_before
    assert report.problems == {} and report.kept_rows == 4
    assert elapsed < 3.0 and peak_growth < 200, (elapsed, peak_growth)
    kept = out[1]["chosen_input_ids"]
    assert len(out[1]["prompt_input_ids"]) + len(kept) == 48
    assert kept == tokenizer(" " + words[:5000], add_special_tokens=False)["input_ids"][: len(kept)]

    code, _, err = run_cli("train", "--config", make_recipe(), "--dataset_name", path)
    assert code == 0, err


def test_huge_prompt_is_prompt_too_long_without_tokenizing_it_whole(tmp_path, tiny_lm_dir, isolated_hf_datasets_cache):
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in (BAD / "null_field.jsonl").read_text().splitlines()]
    rows[1] = {"prompt": "Where is the sun? " * 300_000, "chosen": " In the sky.", "rejected": " In the sea."}
    path = tmp_path / "huge_prompt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    start = time.perf_counter()
    _, report = prepare_preference_dataset(
        load_preference_dataset(path),
        AutoTokenizer.from_pretrained(tiny_lm_dir),
        PreferenceDataConfig(max_length=48, max_prompt_length=24, strict=False),
    )
    assert time.perf_counter() - start < 3.0
    assert report.problems == {"prompt_too_long": [1]}
    assert "more than 24 tokens" in report.examples["prompt_too_long"]


def test_pretokenized_data_with_an_empty_completion_is_an_error(tiny_lm_dir, tmp_path, mallowspo_cache):
    """Already tokenized data skips validation, but an empty completion would score a silent 0."""
    import datasets

    from mallowspo.training.config import MallowsPOConfig
    from mallowspo.training.data import DataValidationError
    from mallowspo.training.trainer import MallowsPOTrainer

    tokenized = datasets.Dataset.from_dict(
        {
            "prompt_input_ids": [[5, 6], [7, 8], [9]],
            "chosen_input_ids": [[10, 1], [], [12, 1]],
            "rejected_input_ids": [[13, 1], [14, 1], [15, 1]],
        }
    )
    args = MallowsPOConfig(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1)
    with pytest.raises(DataValidationError, match=r"chosen_input_ids is empty in 1 row \(e\.g\. row 1\)"):
        MallowsPOTrainer(str(tiny_lm_dir), args=args, train_dataset=tokenized)


# ----------------------------------------------------------------------------------------
# Where the data comes from: one split per file, eval files, directories, local paths, CSV
# ----------------------------------------------------------------------------------------


def good_rows(n: int = 8) -> list[dict]:
    return [{"prompt": f"Question {i}?", "chosen": f" Answer {i}.", "rejected": f" Not {i}."} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("split", ["test", "validation"])
def test_a_file_has_one_split_and_is_never_its_own_eval_set(split, tmp_path, run_cli, make_recipe):
    data = write_jsonl(tmp_path / "train.jsonl", good_rows())
    code, _, err = run_cli("train", "--config", make_recipe(), "--dataset_name", data, "--dataset_test_split", split)
    assert_one_line_error(code, err, "train.jsonl is a single file", f"not '{split}'", "eval_dataset_name")


def test_a_separate_eval_file_is_evaluated(tmp_path, run_cli, make_recipe):
    train = write_jsonl(tmp_path / "train.jsonl", good_rows(8))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", good_rows(3))
    out = tmp_path / "run"
    recipe = make_recipe(output_dir=str(out), save_strategy="no")
    code, _, err = run_cli("train", "--config", recipe, "--dataset_name", train, "--eval_dataset_name", held_out)
    assert code == 0, err
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    assert len(evals) == 1  # once, at the end
    card = (out / "README.md").read_text()
    assert "'eval' (" in card and "held_out.jsonl): 3 rows, 3 kept" in card


def test_final_evaluation_runs_once_when_the_schedule_already_evaluated(tmp_path, run_cli, make_recipe):
    train = write_jsonl(tmp_path / "train.jsonl", good_rows(8))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", good_rows(3))
    out = tmp_path / "run"
    recipe = make_recipe(output_dir=str(out), max_steps=2, eval_strategy="steps", eval_steps=1)
    code, _, err = run_cli("train", "--config", recipe, "--dataset_name", train, "--eval_dataset_name", held_out)
    assert code == 0, err
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "eval_loss" in h] == [1, 2]


def test_a_directory_with_two_types_of_data_files_is_an_error(tmp_path, run_cli, make_recipe):
    folder = tmp_path / "prefs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", good_rows())
    datasets.Dataset.from_list(good_rows()).to_parquet(str(folder / "more.parquet"))
    code, _, err = run_cli("train", "--config", make_recipe(), "--dataset_name", folder)
    assert_one_line_error(code, err, "holds files of several types (1 .jsonl, 1 .parquet)", "Keep one type")


def test_a_mistyped_local_path_fails_at_once_without_asking_the_hub(tmp_path, run_cli, make_recipe, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was asked"))
    code, _, err = run_cli("train", "--config", make_recipe(), "--dataset_name", "data/nonexistent")
    assert_one_line_error(code, err, "Preference data not found: there is no file or directory at 'data/nonexistent'")


def test_csv_cells_are_text_as_written(tmp_path, tiny_tokenizer):
    """Cells such as None, N/A, null and 42 are text in a CSV file: they are the responses, not
    missing values or numbers that validation would then report."""
    path = tmp_path / "prefs.csv"
    path.write_text(
        "prompt,chosen,rejected\nWhat is six times seven?, 42, 41\nSay nothing.,None,N/A\nAnd now?,null,NULL\n"
    )
    loaded = load_preference_dataset(str(path))
    assert loaded["chosen"] == [" 42", "None", "null"] and loaded["rejected"] == [" 41", "N/A", "NULL"]
    out, report = prepare_preference_dataset(loaded, tiny_tokenizer, PreferenceDataConfig(max_length=48))
    assert report.kept_rows == 3 and not report.problems
