"""Reliability, bad settings: through `mallowspo train` (in-process and one real process).

Each invalid setting is exit code 2 with one line `error: ...` that says what is wrong and,
where the setting is checked before loading, before any model is loaded. `--debug` or
MALLOWSPO_DEBUG=1 shows the traceback; errors that are bugs (raised while training) keep it.
The value checks themselves are unit-tested in tests/test_trainer.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mallowspo.cli import main
from mallowspo.training.trainer import MallowsPOTrainer

torch.set_num_threads(1)

BAD = Path(__file__).parents[1] / "fixtures" / "bad"

# command-line overrides -> a fragment of the one-line error
SETTINGS = {
    "beta_zero": (["--beta", "0"], "beta must be > 0, got 0.0"),
    "beta_negative": (["--beta", "-0.1"], "beta must be > 0, got -0.1"),
    "unknown_loss_type": (["--loss_type", "kto"], "unknown loss_type 'kto'; choose one of"),
    "unknown_mallows_variant": (["--mallows", "kendall"], "unknown Mallows variant 'kendall'"),
    "smoothing_eps_zero": (["--smoothing_eps", "0"], "smoothing_eps must be > 0, got 0.0"),
    "smoothing_eps_negative": (["--smoothing_eps", "-0.1"], "smoothing_eps must be > 0, got -0.1"),
    "clamp_min_above_max": (["--dispersion_clamp", "5", "1"], "dispersion_clamp needs 0 <= min <= max, got min=5.0"),
    "max_length_within_prompt_budget": (
        ["--max_length", "24", "--max_prompt_length", "24"],
        "max_length (24) must exceed max_prompt_length (24)",
    ),
    "unknown_key": (["--betta", "0.1"], "unknown keys in the command line: betta (did you mean beta?)"),
    "missing_model_path": (
        ["--model_name_or_path", "/no/such/model"],
        "Model not found: there is no directory at '/no/such/model'",
    ),
    "missing_data_file": (["--dataset_name", "/no/such/prefs.jsonl"], "Preference data not found"),
    "missing_checkpoint": (
        ["--resume_from_checkpoint", "/no/such/checkpoint-3"],
        "checkpoint to resume from not found",
    ),
    "no_checkpoint_to_resume": (["--resume_from_checkpoint", "last"], "no complete checkpoint to resume from"),
    # values that used to pass and then do something else
    "max_steps_negative": (["--max_steps", "-5"], "max_steps must be a positive number of steps, or -1"),
    "max_steps_zero": (["--max_steps", "0"], "max_steps must be a positive number of steps, or -1"),
    "no_epochs": (["--max_steps", "-1", "--num_train_epochs", "0"], "num_train_epochs must be a finite number > 0"),
    "learning_rate_zero": (["--learning_rate", "0"], "learning_rate must be a finite number > 0, got 0.0"),
    "learning_rate_negative": (["--learning_rate=-1e-3"], "learning_rate must be a finite number > 0, got -0.001"),
    "no_accumulation": (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be >= 1, got 0"),
    "beta_inf": (["--beta", "inf"], "beta must be a finite number, got inf"),
    "dispersion_constant_inf": (
        ["--mallows", "theta", "--dispersion_source", "constant", "--dispersion_constant", "inf"],
        "dispersion_constant must be a finite number, got inf",
    ),
    "clamp_inf": (["--dispersion_clamp", "0.05", "inf"], "dispersion_clamp needs finite numbers"),
    "simpo_gamma_nan": (["--loss_type", "simpo", "--simpo_gamma", "nan"], "simpo_gamma must be a finite number"),
    "empty_output_dir": (["--output_dir", ""], "output_dir is empty"),
    "wrong_type_on_the_command_line": (["--beta", "abc"], "argument --beta: invalid float value: 'abc'"),
    "null_for_a_key_that_cannot_be_null": (["--beta", "null"], "--beta cannot be null on the command line"),
}

# recipe file contents -> a fragment of the one-line error (which names the recipe)
BAD_RECIPES = {
    "syntax_error": (b"beta: 0.1\n  max_length: [\n", "line 2, column 13: mapping values are not allowed here"),
    "python_tag": (b'beta: !!python/object/apply:os.system ["echo hi"]\n', "tags are refused, never executed"),
    "duplicate_key": (b"beta: 0.1\nbeta: 0.2\n", "line 2, column 1: the key 'beta' is given twice"),
    "wrong_type": (b"beta: abc\n", "beta in recipe"),
    "scalar_for_a_pair": (b"dispersion_clamp: 20\n", "dispersion_clamp in recipe"),
    "not_utf8": (b"beta: 0.1\n# caf\xe9\n", "is not UTF-8 text (byte 0xe9 on line 2)"),
    "not_a_mapping": (b"- beta\n- 0.1\n", "must be a mapping of keys to values, got list"),
}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr("mallowspo.training.loading.AutoModelForCausalLM.from_pretrained", refuse)


def last_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err, err
    return lines[-1]


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_file_is_a_one_line_error_naming_it(case, run_cli, no_model_loading, tmp_path):
    content, message = BAD_RECIPES[case]
    recipe = tmp_path / f"{case}.yaml"
    recipe.write_bytes(content)
    code, _, err = run_cli("train", "--config", recipe)
    line = last_line(err)
    assert code == 2 and line.startswith("error: ") and f"{case}.yaml" in line and message in line, line
    assert "usage:" not in err


def test_null_on_the_command_line_clears_a_key_a_recipe_set(make_recipe):
    from mallowspo.cli.run_config import parse_run_config

    recipe = make_recipe(max_length=100, max_prompt_length=50, dispersion_clamp=[0.1, 5.0])
    _, _, args = parse_run_config(str(recipe), ["--max_length", "null", "--dispersion_clamp=null"])
    assert args.max_length is None and args.dispersion_clamp is None and args.max_prompt_length == 50
    _, _, args = parse_run_config(str(recipe), ["--max_completion_length", "None", "--report_to", "none"])
    assert args.max_completion_length is None  # "None" clears a number...
    assert args.report_to == []  # ...but a text key takes "none" as its value (TrainingArguments: no reporting)


def test_num_processes_alone_is_a_one_line_error(run_cli, make_recipe):
    code, _, err = run_cli("train", "--config", make_recipe(), "--num_processes", "2")
    assert code == 2 and last_line(err).startswith("error: --num_processes goes with --accelerate_config")


@pytest.mark.parametrize("case", sorted(SETTINGS))
def test_bad_setting_is_a_one_line_error_before_loading(case, run_cli, make_recipe, no_model_loading):
    overrides, message = SETTINGS[case]
    code, _, err = run_cli("train", "--config", make_recipe(), *overrides)
    assert code == 2
    line = last_line(err)
    assert line.startswith("error: ") and message in line, line


def test_missing_recipe_file(run_cli, tmp_path):
    code, _, err = run_cli("train", "--config", tmp_path / "nope.yaml")
    assert code == 2 and last_line(err) == f"error: recipe not found: {tmp_path / 'nope.yaml'}"


def test_model_directory_without_a_model(run_cli, make_recipe, tmp_path, no_model_loading):
    (tmp_path / "empty_model").mkdir()
    code, _, err = run_cli("train", "--config", make_recipe(model_name_or_path=str(tmp_path / "empty_model")))
    assert code == 2 and "holds no config.json: it is not a saved model" in last_line(err)


def test_relative_model_path_under_a_local_directory_is_not_taken_for_a_hub_id(
    run_cli, make_recipe, tmp_path, monkeypatch, no_model_loading
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # `runs/never_trained` is a local path, not the hub repo of an owner "runs"
    code, _, err = run_cli("train", "--config", make_recipe(), "--model_name_or_path", "runs/never_trained")
    assert code == 2 and "Model not found: there is no directory at 'runs/never_trained'" in last_line(err)


def test_lora_without_peft_installed(run_cli, make_recipe, monkeypatch, no_model_loading):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails, as when it is not installed
    code, _, err = run_cli("train", "--config", make_recipe(), "--use_peft", "true")
    assert code == 2 and "use_peft needs the peft package: pip install 'mallowspo[peft]'" in last_line(err)


def test_tokenizer_without_pad_token_uses_eos_and_says_so(run_cli, make_recipe, tiny_lm_dir, tmp_path, caplog):
    """What users expect (TRL does the same): EOS pads (padding is masked), with a warning."""
    from transformers import AutoTokenizer

    model_dir = tmp_path / "no_pad"
    shutil.copytree(tiny_lm_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    with caplog.at_level(logging.WARNING, logger="mallowspo"):
        code, _, err = run_cli("train", "--config", make_recipe(model_name_or_path=str(model_dir)))
    assert code == 0, err
    assert "the tokenizer has no pad token: using its EOS token '<|end|>' as the pad token" in caplog.text


def test_debug_flag_and_environment_show_the_traceback(
    make_recipe, mallowspo_cache, isolated_hf_datasets_cache, monkeypatch
):
    recipe = str(make_recipe())
    for argv in (
        ["--debug", "train", "--config", recipe, "--beta", "0"],
        ["train", "--config", recipe, "--beta", "0", "--debug"],
    ):
        with pytest.raises(ValueError, match="beta must be > 0"):
            main(argv)
    monkeypatch.setenv("MALLOWSPO_DEBUG", "1")
    with pytest.raises(ValueError, match="beta must be > 0"):
        main(["train", "--config", recipe, "--beta", "0"])


def test_transformers_own_debug_option_still_reaches_training_arguments():
    from mallowspo.cli.main import take_debug_flag

    assert take_debug_flag(["train", "--debug", "underflow_overflow", "--beta", "0.1"]) == (
        ["train", "--debug", "underflow_overflow", "--beta", "0.1"],
        False,
    )
    assert take_debug_flag(["--debug", "train", "--debug"]) == (["train"], True)


def test_an_error_while_training_is_a_bug_and_keeps_its_traceback(make_recipe, run_cli, monkeypatch):
    def broken(self, *args, **kwargs):
        raise ValueError("a bug in the loss")

    monkeypatch.setattr(MallowsPOTrainer, "compute_loss", broken)
    with pytest.raises(ValueError, match="a bug in the loss"):
        run_cli("train", "--config", make_recipe())


def test_ctrl_c_is_one_line_with_the_way_to_go_on(make_recipe, run_cli, monkeypatch):
    """Before any checkpoint, Ctrl-C says to start over; after one, how to resume."""
    compute_loss = MallowsPOTrainer.compute_loss

    def interrupted_at_step(step):
        def interrupted(self, *args, **kwargs):
            if self.state.global_step >= step:
                raise KeyboardInterrupt
            return compute_loss(self, *args, **kwargs)

        return interrupted

    monkeypatch.setattr(MallowsPOTrainer, "compute_loss", interrupted_at_step(0))
    code, _, err = run_cli("train", "--config", make_recipe())
    assert code == 130 and "Traceback" not in err
    assert last_line(err) == "error: interrupted (no checkpoint was saved yet: run the command again to start over)"

    monkeypatch.setattr(MallowsPOTrainer, "compute_loss", interrupted_at_step(2))
    code, _, err = run_cli("train", "--config", make_recipe(max_steps=4, save_strategy="steps", save_steps=1))
    assert code == 130 and "Traceback" not in err
    assert (
        last_line(err)
        == "error: interrupted (a training run resumes from its last checkpoint: --resume_from_checkpoint last)"
    )


def test_real_process_prints_one_line_and_exits_2(make_recipe, tmp_path):
    """The installed `mallowspo` command, as a user runs it: no traceback, exit code 2."""
    command = Path(sys.executable).with_name("mallowspo")
    env = {**os.environ, "MALLOWSPO_CACHE": str(tmp_path / "cache"), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    env.pop("MALLOWSPO_DEBUG", None)
    result = subprocess.run(
        [str(command), "train", "--config", str(make_recipe()), "--dataset_name", str(BAD / "null_field.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Invalid preference data 'train' (") and "null_field.jsonl" in last
    assert "non_string_field (1 row; e.g. row 1: 'chosen' is null" in last


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/no/such/model"], "Model not found: there is no directory at '/no/such/model'"),
        (["--dataset", str(BAD / "truncated_line.jsonl")], "truncated_line.jsonl: line 3 is not valid JSON"),
    ],
)
def test_dispersion_command_errors_are_one_line_too(
    argv, message, run_cli, tiny_lm_dir, tiny_prefs_path, tmp_path, no_model_loading
):
    defaults = {"--model": str(tiny_lm_dir), "--dataset": str(tiny_prefs_path), "--out": str(tmp_path / "d")}
    defaults.update(dict(zip(argv[::2], argv[1::2])))
    code, _, err = run_cli("dispersion", *[x for pair in defaults.items() for x in pair])
    assert code == 2 and message in last_line(err)


@pytest.mark.parametrize("name, mode", [("fsdp", "FSDP"), ("zero3", "DEEPSPEED")])
def test_gpu_only_distributed_modes_are_refused_before_launching_on_a_cpu_machine(name, mode, run_cli, make_recipe):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run_cli("train", "--config", make_recipe(), "--accelerate_config", name, "--num_processes", "2")
    assert code == 2 and last_line(err).startswith(
        f"error: accelerate config {name}.yaml uses {mode}, which needs GPUs"
    )


@pytest.mark.parametrize("command", [["train"], ["demo", "--steps", "1"]])
def test_a_world_directory_that_is_a_file_is_a_one_line_error(command, run_cli, tmp_path, monkeypatch):
    not_a_dir = tmp_path / "world.txt"
    not_a_dir.write_text("")
    monkeypatch.setenv("MALLOWSPO_WORLD_DIR", str(not_a_dir))
    code, _, err = run_cli(*command)
    assert code == 2 and last_line(err).startswith(
        f"error: MALLOWSPO_WORLD_DIR={not_a_dir} is a file, not a directory"
    )
