"""`mallowspo train` and `mallowspo dispersion` end to end, the YAML + override parsing, the
shipped recipes and accelerate configs, and a 2-process (gloo) run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mallowspo.cli import main
from mallowspo.cli import train as train_command
from mallowspo.testing.tiny import tiny_run_settings

torch.set_num_threads(1)

RECIPES = sorted(Path(train_command.__file__).parent.joinpath("recipes").glob("*.yaml"))


def write_recipe(path: Path, tiny_lm_dir, tiny_prefs_path, **overrides) -> Path:
    fields = dict(
        model_name_or_path=str(tiny_lm_dir),
        dataset_name=str(tiny_prefs_path),
        output_dir=str(path.parent / "out"),
        max_steps=30,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        beta=0.1,
        logging_steps=5,
    )
    values = tiny_run_settings(**{**fields, **overrides})
    path.write_text(yaml.safe_dump(values))
    return path


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


@pytest.mark.parametrize("mallows", ["none", "theta", "phi"])  # none = DPO
def test_train_end_to_end_learns_the_preference(tiny_lm_dir, tiny_prefs_path, tmp_path, mallowspo_cache, mallows):
    # dataset_test_split on a single file evaluates on the same rows: the training pairs
    recipe = write_recipe(
        tmp_path / "recipe.yaml", tiny_lm_dir, tiny_prefs_path, mallows="phi", dataset_test_split="train"
    )
    assert main(["train", "--config", str(recipe), "--mallows", mallows]) == 0
    out = tmp_path / "out"
    history = log_history(out)
    train_losses = [h["loss"] for h in history if "loss" in h]
    final_eval = [h for h in history if "eval_loss" in h][-1]
    assert len(train_losses) == 6 and train_losses[-1] < train_losses[0]
    assert final_eval["eval_loss"] < math.log(2) - 0.1  # log 2 at the start (policy = reference)
    assert final_eval["eval_rewards/accuracies"] >= 0.8  # chance is 0.5
    assert (out / "model.safetensors").is_file()
    assert (out / "dispersion.jsonl").is_file() == (mallows != "none")  # plain DPO has no dispersion
    assert yaml.safe_load((out / "mallowspo_config.yaml").read_text())["training"]["mallows"] == mallows


def test_command_line_overrides_the_recipe(tiny_lm_dir, tiny_prefs_path, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_lm_dir, tiny_prefs_path, beta=0.3, torch_dtype="float32")
    values = yaml.safe_load(recipe.read_text())
    values["dataset_path"] = values.pop("dataset_name")  # the aliases torch_dtype and dataset_path
    recipe.write_text(yaml.safe_dump(values))
    model_args, script_args, args = train_command.parse_run_config(
        str(recipe), ["--beta", "0.05", "--mallows=theta", "--dispersion_clamp", "0.1", "5", "--smoothing_eps", "0.1"]
    )
    assert args.beta == 0.05 and args.mallows == "theta" and args.dispersion_clamp == [0.1, 5.0]
    assert args.smoothing_eps == 0.1 and args.learning_rate == 1e-3  # from the recipe
    assert model_args.dtype == "float32" and script_args.dataset_name == str(tiny_prefs_path)  # aliases


def test_unknown_keys_are_rejected_with_a_hint(tiny_lm_dir, tiny_prefs_path, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_lm_dir, tiny_prefs_path, betta=0.1)
    with pytest.raises(ValueError, match=r"betta \(did you mean beta\?\)"):
        train_command.parse_run_config(str(recipe), [])
    good = write_recipe(tmp_path / "g.yaml", tiny_lm_dir, tiny_prefs_path)
    with pytest.raises(ValueError, match="unknown keys in the command line: mallow"):
        train_command.parse_run_config(str(good), ["--mallow", "phi"])


def test_missing_model_path_is_a_clear_error(tiny_prefs_path, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"dataset_name": str(tiny_prefs_path), "output_dir": str(tmp_path)}))
    with pytest.raises(ValueError, match="model_name_or_path is required"):
        train_command.parse_run_config(str(recipe), [])


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipes_parse(recipe):
    """Every recipe is valid (bf16 is off here only because this machine has no GPU)."""
    model_args, script_args, args = train_command.parse_run_config(str(recipe), ["--bf16", "false"])
    assert model_args.model_name_or_path and script_args.dataset_name
    assert "NEEDS" in recipe.read_text()[:300]  # marked as needing GPUs in its header


def test_default_run_config_selects_the_builtin_world(tmp_path, monkeypatch):
    from mallowspo.cli import defaults
    from mallowspo.experiments.world import WorldPaths

    world = WorldPaths(tmp_path / "world")
    monkeypatch.setattr(defaults, "ensure_world", lambda: world)
    model_args, script_args, args = train_command.parse_run_config(None, ["--max_steps", "3"])
    assert model_args.model_name_or_path == str(world.model_dir)
    assert script_args.dataset_name == str(world.data_dir) and script_args.dataset_test_split == "test"
    assert args.mallows == "phi" and args.max_steps == 3


def test_accelerate_config_shortcut_builds_the_launch_command(tmp_path):
    for name in ("ddp", "fsdp", "zero3"):
        path = train_command.resolve_accelerate_config(name)
        assert path.is_file() and yaml.safe_load(path.read_text())["distributed_type"]
    args = train_command.argparse.Namespace(
        accelerate_config="zero3", num_processes=4, config="r.yaml", overrides=["--beta", "0.2"]
    )
    command = train_command.accelerate_command(args)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--config_file") + 1].endswith("zero3.yaml")
    assert command[command.index("--num_processes") + 1] == "4"
    assert command[-6:] == ["mallowspo.cli", "train", "--config", "r.yaml", "--beta", "0.2"]
    with pytest.raises(FileNotFoundError):
        train_command.resolve_accelerate_config(str(tmp_path / "missing.yaml"))


def test_two_cpu_processes_are_data_parallel_and_equal_one_process(tiny_lm_dir, tiny_prefs_path, tmp_path):
    """`--accelerate_config ddp --num_processes 2` on a CPU machine, with nothing about CPUs in the
    recipe: real data parallelism (gloo). Each process sees its share, one writes, the cache is
    written once, and the result equals one process with the same global batch (16 pairs)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_lm_dir, tiny_prefs_path, max_steps=4, logging_steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOWSPO_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "mallowspo.cli", "train", "--config", str(recipe)]
    two = subprocess.run(
        [*command, "--accelerate_config", "ddp", "--num_processes", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    out = tmp_path / "out"
    assert [p.name for p in out.rglob("model.safetensors")] == ["model.safetensors"]
    history = log_history(out)
    # 4 steps x 8 pairs x 2 processes = 64 of 300 pairs: the epoch counter shows both processes trained
    assert history[-1]["epoch"] == pytest.approx(4 / math.ceil(300 / 16), rel=1e-6)
    assert len(list((tmp_path / "cache" / "reference").iterdir())) == 1  # one cache entry, written once
    assert two.stderr.count("computing for 300 rows") == 1  # the reference pass logged once, by one process

    one_out = tmp_path / "one"
    one = subprocess.run(
        [*command, "--per_device_train_batch_size", "16", "--output_dir", str(one_out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two_weights, one_weights = load_file(out / "model.safetensors"), load_file(one_out / "model.safetensors")
    initial = load_file(Path(tiny_lm_dir) / "model.safetensors")
    for name, tensor in one_weights.items():
        assert (tensor - initial[name]).abs().max() > 1e-3  # training moved the weights...
        torch.testing.assert_close(two_weights[name], tensor, rtol=0, atol=1e-4)  # ...the same way
    dispersion = [(out / "dispersion.jsonl").read_text(), (one_out / "dispersion.jsonl").read_text()]
    assert dispersion[0] == dispersion[1]  # normalised over the whole train split, not one shard


def test_dispersion_command_writes_the_report(tiny_lm_dir, tiny_prefs_path, tmp_path, mallowspo_cache, capsys):
    out = tmp_path / "disp"
    argv = [
        "dispersion",
        "--model",
        str(tiny_lm_dir),
        "--dataset",
        str(tiny_prefs_path),
        "--out",
        str(out),
        "--max_length",
        "48",
        "--max_prompt_length",
        "24",
        "--batch_size",
        "32",
        "--top",
        "3",
    ]
    assert main(argv) == 0
    assert "300 pairs" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "dispersion.jsonl").read_text().splitlines()]
    assert len(rows) == 300 and {"prompt", "neg_log_phi", "hbar", "ref_chosen_entropy"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    stats = summary["summary"]["neg_log_phi"]
    assert stats["min"] <= stats["q50"] <= stats["max"] and stats["mean"] == pytest.approx(1.0, abs=0.05)
    assert not summary["cache_reused"]
    assert (out / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "Most dispersed prompts" in report and "Least dispersed prompts" in report
    assert main(argv) == 0 and json.loads((out / "summary.json").read_text())["cache_reused"]  # rerun: cache


@pytest.mark.slow
def test_default_train_without_arguments(tmp_path, monkeypatch):
    """`mallowspo train` with no arguments: builds the built-in model, trains, saves (about a minute)."""
    monkeypatch.setenv("MALLOWSPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 0
    out = tmp_path / "runs" / "mallowspo-world"
    assert (out / "model.safetensors").is_file()
    last = [h for h in log_history(out) if "loss" in h][-1]
    assert last["rewards/accuracies"] > 0.8


def test_resume_argument():
    assert train_command.resume_argument(None) is None
    assert train_command.resume_argument("true") is True and train_command.resume_argument("last") is True
    assert train_command.resume_argument("runs/x/checkpoint-3") == "runs/x/checkpoint-3"


def test_dispersion_command_takes_the_train_keys_and_recipes(make_recipe, tmp_path, mallowspo_cache, capsys):
    """`mallowspo dispersion --config R` estimates what `mallowspo train --config R` trains with."""
    recipe = make_recipe(dispersion_normalization=0.29, dispersion_clamp=[0.05, 2.0], per_device_train_batch_size=32)
    out = tmp_path / "disp"
    assert main(["dispersion", "--config", str(recipe), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phi_star"] == 0.29 and summary["clamp"] == [0.05, 2.0] and summary["source"] == "entropy"
    assert summary["summary"]["neg_log_phi"]["max"] <= 2.0
    assert "phi* 0.29" in capsys.readouterr().out

    constant = tmp_path / "constant"
    argv = ["dispersion", "--config", str(recipe), "--out", str(constant)]
    assert main([*argv, "--dispersion_source", "constant", "--dispersion_constant", "1.5"]) == 0
    summary = json.loads((constant / "summary.json").read_text())
    assert summary["cache_reused"] and summary["phi_star"] is None  # the same reference pass, from the cache
    assert summary["summary"]["neg_log_phi"]["min"] == summary["summary"]["neg_log_phi"]["max"] == 1.5


def test_naming_a_model_or_dataset_gives_the_documented_defaults_not_the_builtin_run(tmp_path, monkeypatch):
    """Without a recipe, the built-in run's settings apply only when neither a model nor a
    dataset is named; otherwise the result is that of the same keys in a recipe."""
    from mallowspo.cli import defaults

    monkeypatch.setattr(defaults, "ensure_world", lambda: pytest.fail("the built-in world was used"))
    keys = ["--model_name_or_path", "my-model", "--dataset_name", "my-data"]
    from_command_line = train_command.parse_run_config(None, keys)
    recipe = tmp_path / "two_keys.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "my-model", "dataset_name": "my-data"}))
    from_recipe = train_command.parse_run_config(str(recipe), [])
    (model_a, script_a, args), (model_b, script_b, args_b) = from_command_line, from_recipe
    assert vars(model_a) == vars(model_b) and vars(script_a) == vars(script_b) and args.to_dict() == args_b.to_dict()
    assert (args.max_length, args.max_prompt_length, args.learning_rate) == (1024, None, 1e-6)
    for only_one in (keys[:2], keys[2:]):
        with pytest.raises(ValueError, match="is required"):
            train_command.parse_run_config(None, only_one)


def test_help_lists_every_key_once_grouped_mallowspos_first():
    from mallowspo.cli.fields_help import field_groups
    from mallowspo.cli.run_config import argument_parser, known_keys

    groups = field_groups()
    titles = [title for title, _ in groups]
    assert titles[0] == "MallowsPO: objective" and titles[-1] == "Training (transformers.TrainingArguments)"
    listed = [f.name for _, fields in groups for f in fields]
    assert len(listed) == len(set(listed))  # each key once
    assert set(listed) == known_keys(argument_parser())  # and every key the run accepts


def test_trl_list_keys_on_the_command_line():
    model_args, script_args, args = train_command.parse_run_config(
        None,
        [
            "--model_name_or_path",
            "m",
            "--dataset_name",
            "d",
            "--loss_type",
            "sigmoid",
            "sft",
            "--loss_weights",
            "1",
            "0.5",
        ]
        + ["--mallows", "none"],
    )
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]
