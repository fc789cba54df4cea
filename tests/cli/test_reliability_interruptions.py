"""Reliability, interruptions: a training run and a reference pass killed with SIGKILL, an
output directory that cannot be written, a full disk.

- A `mallowspo train` process killed after its first checkpoint resumes
  (`--resume_from_checkpoint last`) to the same final weights and the same logged losses
  as an uninterrupted run with the same seed; a checkpoint left half written is skipped.
- A reference pass killed while computing or while writing its cache leaves no entry that
  a later run could use: the next run recomputes (writes are temp dir + rename).
- An unwritable output_dir or too little free disk is a one-line error before the model
  loads or the reference pass runs; a disk that fills up during training is one line too.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mallowspo.training.checkpoints import resolve_checkpoint

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------
# A training run killed with SIGKILL, resumed
# ---------------------------------------------------------------------------------------

RUN = dict(
    max_steps=40,
    save_strategy="steps",
    save_steps=5,
    logging_steps=5,
    per_device_train_batch_size=4,
    mallows="phi",
    learning_rate=5e-4,
    max_length=48,
    max_prompt_length=24,
)
LOGGED = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "mallows/neg_log_phi_mean",
)


def wait_for_complete_checkpoint(process: subprocess.Popen, out: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed:\n" + process.stderr.read()[-3000:]
        for checkpoint in out.glob("checkpoint-*"):
            try:
                json.loads((checkpoint / "trainer_state.json").read_text())
                return
            except (OSError, ValueError):
                pass
        time.sleep(0.01)
    raise AssertionError("no checkpoint was written in time")


def train_history(out: Path) -> list[dict]:
    return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_killed_run_resumes_to_the_uninterrupted_result(make_recipe, run_cli, tmp_path, mallowspo_cache, caplog):
    killed_out, full_out = tmp_path / "killed", tmp_path / "full"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "MALLOWSPO_CACHE": str(mallowspo_cache),
        "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache"),
    }
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mallowspo")),
            "train",
            "--config",
            str(make_recipe(output_dir=str(killed_out), **RUN)),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_complete_checkpoint(process, killed_out)
    finally:
        process.send_signal(signal.SIGKILL)  # no cleanup, no final save: as a crash or an OOM kill
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (killed_out / "model.safetensors").exists()  # it never got to the final save
    complete = [p for p in killed_out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    resume_step = max(int(p.name.split("-")[1]) for p in complete)
    assert 5 <= resume_step < RUN["max_steps"]
    # A kill while saving leaves a checkpoint without its trainer_state.json (written last):
    partial = killed_out / "checkpoint-39"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(
        (killed_out / f"checkpoint-{resume_step}" / "model.safetensors").read_bytes()[:1000]
    )

    code, _, err = run_cli("train", "--config", make_recipe(output_dir=str(full_out), **RUN))
    assert code == 0, err
    code, _, err = run_cli(
        "train", "--config", make_recipe(output_dir=str(killed_out), **RUN), "--resume_from_checkpoint", "last"
    )
    assert code == 0, err
    assert "skipping incomplete checkpoints" in caplog.text and "checkpoint-39" in caplog.text

    full, resumed = load_file(full_out / "model.safetensors"), load_file(killed_out / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name, tensor in full.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)
    after = lambda history: [h for h in history if h["step"] > resume_step]  # noqa: E731
    full_logs, resumed_logs = after(train_history(full_out)), after(train_history(killed_out))
    assert [h["step"] for h in resumed_logs] == [h["step"] for h in full_logs] and full_logs
    for a, b in zip(full_logs, resumed_logs):
        for key in LOGGED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_resume_checks_the_checkpoint_before_anything_loads(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"log_hist')  # cut by the kill
    assert resolve_checkpoint(True, tmp_path) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="checkpoint-4 is not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "checkpoint-4"), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint .* \(1 incomplete: checkpoint-7\)"):
        (tmp_path / "other" / "checkpoint-7").mkdir(parents=True)
        resolve_checkpoint(True, tmp_path / "other")


# ---------------------------------------------------------------------------------------
# A reference pass killed with SIGKILL
# ---------------------------------------------------------------------------------------

Pass = namedtuple("Pass", "model dataset collator tokenizer")


@pytest.fixture(scope="module")
def reference_inputs(tiny_lm_dir, tiny_prefs_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mallowspo.training.collate import PreferenceCollator
    from mallowspo.training.data import PreferenceDataConfig, load_preference_dataset, prepare_preference_dataset
    from mallowspo.training.head import add_completion_head

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    raw = load_preference_dataset(str(tiny_prefs_path)).select(range(32))
    dataset, _ = prepare_preference_dataset(raw, tokenizer, PreferenceDataConfig(max_length=48, max_prompt_length=24))
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    add_completion_head(model)
    return Pass(model.eval(), dataset, PreferenceCollator(tokenizer.pad_token_id), tokenizer)


def reference_pass(inputs: Pass):
    from accelerate import Accelerator

    from mallowspo.training.data import PreferenceDataConfig
    from mallowspo.training.reference import load_or_compute_reference_columns

    return load_or_compute_reference_columns(
        inputs.model,
        inputs.dataset,
        inputs.collator,
        Accelerator(cpu=True),
        batch_size=8,
        weights="w",
        tokenizer=inputs.tokenizer,
        data_settings=PreferenceDataConfig(max_length=48, max_prompt_length=24),
    )


def run_killed_child(body) -> int:
    """Run ``body()`` in a forked child that is expected to SIGKILL itself; returns its wait status.

    A fork of this process, which has everything imported (a fresh interpreter would spend
    20 s importing torch and transformers); the kill is a real SIGKILL all the same.
    """
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            body()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("when", ["while computing", "while writing the cache"])
def test_killed_reference_pass_leaves_no_usable_cache(when, reference_inputs, mallowspo_cache):
    from mallowspo.training import reference

    def killed_pass():  # runs in the child only, so its patches never reach this process
        if when == "while computing":
            score, calls = reference.score_completions, []

            def score_then_die_at_batch_3(*args, **kwargs):
                calls.append(1)
                if len(calls) == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                return score(*args, **kwargs)

            reference.score_completions = score_then_die_at_batch_3
        else:
            savez = np.savez

            def savez_then_die(*args, **kwargs):
                savez(*args, **kwargs)  # the columns are on disk, meta.json (the completeness marker) is not
                os.kill(os.getpid(), signal.SIGKILL)

            np.savez = savez_then_die
        reference_pass(reference_inputs)

    status = run_killed_child(killed_pass)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    entries = mallowspo_cache / "reference"
    assert not list(entries.glob("*/meta.json"))  # nothing a later run could take for an entry
    if when == "while writing the cache":
        assert [p.name.startswith(".tmp-") for p in entries.iterdir()] == [True]  # the half-written temp dir

    result = reference_pass(reference_inputs)
    assert not result.reused
    again = reference_pass(reference_inputs)
    assert again.reused
    for name, values in result.columns.items():
        assert np.isfinite(values).all() and len(values) == len(reference_inputs.dataset)
        np.testing.assert_array_equal(again.columns[name], values)


# ---------------------------------------------------------------------------------------
# Output directory and disk space, checked before any work
# ---------------------------------------------------------------------------------------


def test_output_dir_under_a_file_is_an_error_before_loading(run_cli, make_recipe, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(
        "mallowspo.training.loading.AutoModelForCausalLM.from_pretrained",
        lambda *a, **k: pytest.fail("the model was loaded before the error"),
    )
    code, _, err = run_cli("train", "--config", make_recipe(output_dir=str(blocker / "out")))
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: output_dir {blocker / 'out'} cannot be created: {blocker} is a file, not a directory. "
        "Choose another --output_dir."
    )


def test_unwritable_output_dir_is_an_error_before_loading(run_cli, make_recipe, tmp_path, monkeypatch):
    """Tests run as root, which chmod does not stop: the write is refused by a patch instead."""
    write_bytes = Path.write_bytes

    def refuse_probe(self, data):
        if self.name.startswith(".mallowspo-write-test"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse_probe)
    monkeypatch.setattr(
        "mallowspo.training.loading.AutoModelForCausalLM.from_pretrained",
        lambda *a, **k: pytest.fail("the model was loaded before the error"),
    )
    code, _, err = run_cli("train", "--config", make_recipe(output_dir=str(tmp_path / "out")))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: output_dir {tmp_path / 'out'} is not writable (Permission "
        "denied); fix its permissions or choose another --output_dir"
    )


def test_full_disk_is_an_error_before_the_reference_pass(run_cli, make_recipe, tmp_path, mallowspo_cache, monkeypatch):
    import shutil

    out = tmp_path / "out"
    disk_usage = shutil.disk_usage

    def almost_full(path):
        usage = disk_usage(path)
        return usage._replace(free=100_000) if Path(path).resolve().is_relative_to(out) else usage

    monkeypatch.setattr(shutil, "disk_usage", almost_full)
    code, _, err = run_cli("train", "--config", make_recipe(output_dir=str(out), save_strategy="steps", save_steps=1))
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith(f"error: not enough free disk space for output_dir {out}: 0.1 MiB free")
    assert "the run writes at least" in line and "[Errno" not in line
    assert not (mallowspo_cache / "reference").exists()  # stopped before the reference pass


def test_disk_filling_up_during_training_is_one_line(run_cli, make_recipe, tmp_path, monkeypatch):
    from mallowspo.training.trainer import MallowsPOTrainer

    def no_space(self, output_dir=None, _internal_call=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MallowsPOTrainer, "save_model", no_space)
    code, _, err = run_cli("train", "--config", make_recipe(output_dir=str(tmp_path / "out")))
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: No space left on device (free some space; a training run resumes from its last checkpoint: "
        "--resume_from_checkpoint last)"
    )


# ----------------------------------------------------------------------------------------
# An output directory belongs to one run
# ----------------------------------------------------------------------------------------


def test_a_finished_run_is_never_silently_replaced(run_cli, make_recipe, tmp_path):
    out = tmp_path / "out"
    assert run_cli("train", "--config", make_recipe(output_dir=str(out), beta=0.1))[0] == 0
    first = (out / "model.safetensors").read_bytes()
    code, _, err = run_cli("train", "--config", make_recipe(output_dir=str(out), beta=0.5))
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        f"error: output_dir {out} already holds a run's results"
    )
    assert (out / "model.safetensors").read_bytes() == first  # untouched
    code, _, err = run_cli(
        "train", "--config", make_recipe(output_dir=str(out), beta=0.5), "--overwrite_output_dir", "true"
    )
    assert code == 0, err
    assert yaml.safe_load((out / "mallowspo_config.yaml").read_text())["training"]["beta"] == 0.5


def test_a_checkpoint_of_another_run_is_refused_on_resume(run_cli, make_recipe, tmp_path):
    out = tmp_path / "out"
    recipe = dict(output_dir=str(out), max_steps=2, save_strategy="steps", save_steps=1)
    assert run_cli("train", "--config", make_recipe(**recipe, learning_rate=1e-3))[0] == 0
    code, _, err = run_cli(
        "train",
        "--config",
        make_recipe(**{**recipe, "max_steps": 4}, learning_rate=5e-4),
        "--resume_from_checkpoint",
        "last",
    )
    line = err.strip().splitlines()[-1]
    assert code == 2 and "belongs to another run (settings differ: learning_rate: 0.001 -> 0.0005)" in line, line
    # the same run resumes, with a larger step budget
    code, _, err = run_cli(
        "train",
        "--config",
        make_recipe(**{**recipe, "max_steps": 4}, learning_rate=1e-3),
        "--resume_from_checkpoint",
        "last",
    )
    assert code == 0, err
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_a_checkpoint_path_from_another_run_is_refused(run_cli, make_recipe, tmp_path):
    first = tmp_path / "first"
    assert (
        run_cli(
            "train", "--config", make_recipe(output_dir=str(first), max_steps=1, save_strategy="steps", save_steps=1)
        )[0]
        == 0
    )
    code, _, err = run_cli(
        "train",
        "--config",
        make_recipe(output_dir=str(tmp_path / "second"), seed=1),
        "--resume_from_checkpoint",
        str(first / "checkpoint-1"),
    )
    line = err.strip().splitlines()[-1]
    assert code == 2 and "belongs to another run (settings differ: seed: 0 -> 1)" in line, line
