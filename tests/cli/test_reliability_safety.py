"""Reliability, safe defaults.

- remote code runs only when the user sets trust_remote_code;
- weights are written and read as safetensors only: no *.bin in the output or in
  checkpoints, a pickle-only model is refused, and resuming loads its state files with
  torch.load(weights_only=True);
- the default run makes no network request (sockets blocked, HF_HUB_OFFLINE unset).
"""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from mallowspo.cli import train as train_command

torch.set_num_threads(1)


@pytest.fixture
def loading_calls(monkeypatch):
    """Record the keyword arguments of every tokenizer and model load."""
    import transformers

    calls = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_remote_code_is_off_unless_the_user_sets_it(run_cli, make_recipe, loading_calls):
    model_args, _, _ = train_command.parse_run_config(str(make_recipe()), [])
    assert model_args.trust_remote_code is False
    assert run_cli("train", "--config", make_recipe())[0] == 0
    assert {name for name, _ in loading_calls} == {"AutoTokenizer", "AutoModelForCausalLM"}
    assert all(kwargs.get("trust_remote_code", False) is False for _, kwargs in loading_calls)
    assert all(kwargs["use_safetensors"] is True for name, kwargs in loading_calls if name == "AutoModelForCausalLM")

    loading_calls.clear()
    assert (
        run_cli("train", "--config", make_recipe(), "--trust_remote_code", "true", "--overwrite_output_dir", "true")[0]
        == 0
    )
    assert loading_calls and all(kwargs["trust_remote_code"] is True for _, kwargs in loading_calls)


def test_outputs_and_checkpoints_hold_safetensors_and_no_pickle_weights(run_cli, make_recipe, tmp_path, monkeypatch):
    out = tmp_path / "out"
    recipe = make_recipe(output_dir=str(out), max_steps=2, save_strategy="steps", save_steps=1)
    assert run_cli("train", "--config", recipe)[0] == 0
    for directory in (out, out / "checkpoint-1", out / "checkpoint-2"):
        assert (directory / "model.safetensors").is_file(), directory
        assert not list(directory.glob("*.bin")), list(directory.glob("*.bin"))  # incl. training_args.bin
    assert (out / "mallowspo_config.yaml").is_file()  # the settings, as YAML instead of a pickle

    # Resuming reads the checkpoint's optimizer, scheduler and RNG state with weights_only=True only.
    loads = []
    load = torch.load

    def checked_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    recipe = make_recipe(output_dir=str(out), max_steps=3, save_strategy="steps", save_steps=1)
    assert run_cli("train", "--config", recipe, "--resume_from_checkpoint", str(out / "checkpoint-2"))[0] == 0
    assert len(loads) >= 3 and all(weights_only is True for weights_only in loads)
    assert not list(out.rglob("*.bin"))


def test_a_model_with_only_pickle_weights_is_refused(run_cli, make_recipe, tiny_lm_dir, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled_model"
    shutil.copytree(tiny_lm_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    code, _, err = run_cli("train", "--config", make_recipe(model_name_or_path=str(pickled)))
    line = err.strip().splitlines()[-1]
    assert (
        code == 2
        and f"error: {pickled} holds only pickle weights (*.bin), and mallowspo loads safetensors only" in line
    )


@pytest.fixture
def no_network(monkeypatch):
    """Refuse (and record) every network connection and name lookup; make sure offline mode is off."""
    import datasets
    import huggingface_hub.constants

    attempts = []

    def refuse(what):
        def blocked(*args, **kwargs):
            attempts.append((what, args[1:] if what == "socket.connect" else args))
            raise OSError(f"network access blocked by the test: {what}{args}")

        return blocked

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import: patch the constants too
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False, raising=False)
    return attempts


def test_default_run_makes_no_network_request(run_cli, tmp_path, monkeypatch, no_network):
    """`mallowspo train` with no config: the built-in default (`builtin.default_run_config`:
    its model, its data, evaluation, the reference pass, saving), all with sockets refused.
    Only the step count is cut (--max_steps 2) to keep it a few seconds; the full default run
    is tests/test_cli_train.py::test_default_train_without_arguments (marked slow)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("train", "--max_steps", "2")
    assert code == 0, err
    assert no_network == []
    saved = list((tmp_path / "runs").glob("*/model.safetensors"))
    assert len(saved) == 1
    history = json.loads((saved[0].parent / "trainer_state.json").read_text())["log_history"]
    assert max(h["step"] for h in history) == 2


class _Payload:
    """What an attacker would put in a checkpoint: unpickling it runs code."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_a_poisoned_checkpoint_is_refused_in_one_line_and_never_run(run_cli, make_recipe, tmp_path, capsys):
    import pickle

    out = tmp_path / "out"
    recipe = dict(output_dir=str(out), max_steps=1, save_strategy="steps", save_steps=1)
    assert run_cli("train", "--config", make_recipe(**recipe))[0] == 0
    rng_state = next((out / "checkpoint-1").glob("rng_state*.pth"))
    rng_state.write_bytes(pickle.dumps(_Payload()))
    code, out_text, err = run_cli(
        "train", "--config", make_recipe(**{**recipe, "max_steps": 2}), "--resume_from_checkpoint", "last"
    )
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and "weights_only=False" not in err
    assert line.startswith(f"error: checkpoint {out / 'checkpoint-1'} holds a file with pickled objects"), line
    assert "pwned" not in out_text
