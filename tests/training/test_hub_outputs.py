"""What a run leaves for the hub and for the next user: a model card with the hub's metadata,
framework versions, citations and a "Use" snippet that runs as written; LoRA adapters that
name their base model so they load from any working directory; TRL's PEFT options (DoRA,
rsLoRA, modules_to_save) and the bitsandbytes options, refused in one line where they cannot run.

Tiny local models, a few steps each, through the `mallowspo train` command."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from mallowspo.training.arguments import ModelArguments
from mallowspo.training.card import PAPER_BIBTEX, TRL_BIBTEX, framework_versions, render_model_card

torch.set_num_threads(1)

LORA = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"])


def train(run_cli, make_recipe, **settings):
    code, _, err = run_cli("train", "--config", make_recipe(**settings))
    assert code == 0, err


def python_block(card: str) -> str:
    """The first ```python block of a model card."""
    match = re.search(r"```python\n(.*?)```", card, re.DOTALL)
    assert match, card
    return match.group(1)


def run_snippet(code: str) -> str:
    """Execute ``code`` as a script; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "<model card>", "exec"), {"__name__": "__main__"})
    return printed.getvalue()


def training_losses(out) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


# ---------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------


def card_facts(**overrides):
    config = dict(
        loss_type="sigmoid",
        mallows="phi",
        beta=0.1,
        phi_smoothing="cubic",
        smoothing_eps=0.1,
        precompute_ref_log_probs=True,
        learning_rate=1e-6,
        lr_scheduler_type="linear",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        seed=0,
        max_length=1024,
        max_prompt_length=512,
        max_completion_length=None,
    )
    facts = dict(
        model_name="qwen-mallowspo",
        model_path="/runs/qwen-mallowspo",
        base_model="Qwen/Qwen2.5-0.5B-Instruct",
        dataset="trl-lib/ultrafeedback_binarized",
        config=config,
    )
    return {**facts, **overrides}


def test_card_metadata_follows_the_hub_conventions():
    card = ModelCard(render_model_card(card_facts()))
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert card.data.datasets == ["trl-lib/ultrafeedback_binarized"]
    assert card.data.library_name == "transformers"
    assert {"generated_from_trainer", "mallowspo", "mallowspo-phi"} <= set(card.data.tags)


def test_card_metadata_names_only_hub_ids_and_marks_adapters(tmp_path):
    """Local paths are not hub ids: the hub would refuse them as base_model / datasets."""
    adapter = dict(kind="DoRA", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=None)
    facts = card_facts(base_model=str(tmp_path), dataset="data/prefs.jsonl", adapter=adapter)
    card = ModelCard(render_model_card(facts))
    assert card.data.base_model is None and card.data.datasets is None
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert f"a DoRA adapter of `{tmp_path}`" in card.text


def test_card_lists_framework_versions_and_cites_the_paper_and_trl():
    text = render_model_card(card_facts(adapter=dict(kind="LoRA", r=4, lora_alpha=8, target_modules=["q_proj"])))
    versions = framework_versions(peft=True)
    assert set(versions) == {"mallowspo", "TRL", "Transformers", "PyTorch", "Datasets", "Tokenizers", "PEFT"}
    for name, version in versions.items():
        assert f"- {name}: {version}" in text
    assert "PEFT" not in framework_versions(peft=False)
    assert PAPER_BIBTEX in text and TRL_BIBTEX in text
    assert "arXiv 2405.14953" in text and "2405.14953" in PAPER_BIBTEX and "ICLR" in PAPER_BIBTEX


def test_the_use_snippet_of_a_full_run_runs_as_written(run_cli, make_recipe, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train(run_cli, make_recipe, output_dir=str(out))
    card = (out / "README.md").read_text()
    snippet = python_block(card)
    assert json.dumps(str(out.resolve())) in snippet and "AutoModelForCausalLM" in snippet
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_snippet(snippet)  # loads the model and the tokenizer and generates: no exception


# ---------------------------------------------------------------------------------------
# LoRA adapters: base model path, snippet, TRL's PEFT options
# ---------------------------------------------------------------------------------------


def test_an_adapter_trained_from_a_relative_path_loads_from_any_directory(
    run_cli, make_recipe, tiny_lm_dir, tmp_path, monkeypatch
):
    from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_lm_dir, tmp_path / "base")
    train(run_cli, make_recipe, model_name_or_path="base", output_dir="out", **LORA)
    out = (tmp_path / "out").resolve()
    stored = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert stored == str((tmp_path / "base").resolve())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # ./base no longer resolves: only the absolute path can
    assert isinstance(AutoPeftModelForCausalLM.from_pretrained(out), PeftModel)
    base = AutoModelForCausalLM.from_pretrained(PeftConfig.from_pretrained(out).base_model_name_or_path)
    assert isinstance(PeftModel.from_pretrained(base, out), PeftModel)

    card = (out / "README.md").read_text()
    assert ModelCard(card).data.library_name == "peft" and "a LoRA adapter of `base`" in card
    snippet = python_block(card)
    assert "AutoPeftModelForCausalLM" in snippet
    run_snippet(snippet)


@pytest.mark.parametrize("option, kind", [("use_dora", "DoRA"), ("use_rslora", "rsLoRA")])
def test_dora_and_rslora_build_their_adapter_and_train(run_cli, make_recipe, tmp_path, option, kind):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "out"
    train(run_cli, make_recipe, output_dir=str(out), max_steps=2, learning_rate=1e-2, **LORA, **{option: True})
    config = json.loads((out / "adapter_config.json").read_text())
    assert config[option] is True
    assert config["use_dora" if option == "use_rslora" else "use_rslora"] is False
    losses = training_losses(out)
    assert losses and all(math.isfinite(loss) for loss in losses)
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [value for key, value in weights.items() if "lora_B" in key]
    assert lora_b and all(value.abs().max() > 0 for value in lora_b)  # zero at init: the adapter trained
    magnitudes = [key for key in weights if "lora_magnitude_vector" in key]
    assert bool(magnitudes) == (option == "use_dora")
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    scaling = model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert scaling == pytest.approx(8 / 4**0.5 if option == "use_rslora" else 8 / 4)
    assert ModelCard((out / "README.md").read_text()).text.count(f"a {kind} adapter of") == 1


def test_lora_modules_to_save_are_trained_and_saved_with_the_adapter(run_cli, make_recipe, tiny_lm_dir, tmp_path):
    out = tmp_path / "out"
    train(
        run_cli,
        make_recipe,
        output_dir=str(out),
        max_steps=2,
        learning_rate=1e-2,
        lora_modules_to_save=["norm"],
        **LORA,
    )
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["norm"]
    saved = load_file(out / "adapter_model.safetensors")["base_model.model.model.norm.weight"]
    initial = load_file(tiny_lm_dir / "model.safetensors")["model.norm.weight"]
    assert saved.shape == initial.shape and not torch.equal(saved, initial)


# ---------------------------------------------------------------------------------------
# bitsandbytes options: one-line errors where they cannot run
# ---------------------------------------------------------------------------------------


def model_arguments(**settings) -> ModelArguments:
    return ModelArguments(model_name_or_path="model", **settings)


def test_quantization_on_cpu_is_refused_in_one_line(run_cli, make_recipe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli("train", "--config", make_recipe(load_in_4bit=True, **LORA))
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert line.startswith("error: load_in_4bit quantizes the model with bitsandbytes, which needs a CUDA GPU"), line


def test_quantization_without_bitsandbytes_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as when it is not installed
    with pytest.raises(ValueError, match=r"^load_in_8bit needs the bitsandbytes package: pip install bitsandbytes$"):
        model_arguments(load_in_8bit=True, use_peft=True)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(load_in_4bit=True), "load_in_4bit needs use_peft true"),
        (dict(load_in_4bit=True, load_in_8bit=True, use_peft=True), "load_in_4bit and load_in_8bit are both set"),
        (dict(bnb_4bit_quant_type="int4"), "bnb_4bit_quant_type must be nf4 or fp4, got 'int4'"),
    ],
)
def test_quantization_settings_that_cannot_work(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model_arguments(**settings)


def test_peft_options_map_to_lora_config_and_warn_without_use_peft(caplog):
    lora = model_arguments(use_peft=True, use_dora=True, use_rslora=True, lora_modules_to_save=["lm_head"])
    config = lora.peft_config()
    assert config.use_dora and config.use_rslora and set(config.modules_to_save) == {"lm_head"}
    with caplog.at_level("WARNING"):
        assert model_arguments(use_dora=True).peft_config() is None
    assert "LoRA options are set but use_peft is false" in caplog.text


@pytest.fixture
def gpu_with_bitsandbytes(monkeypatch):
    """Pretend this machine has a CUDA GPU and bitsandbytes (only the settings are checked, nothing is loaded)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else find_spec(name, *a)
    )


def test_load_in_4bit_gives_trl_s_quantization_config(gpu_with_bitsandbytes):
    settings = dict(load_in_4bit=True, use_peft=True, dtype="bfloat16", bnb_4bit_quant_type="fp4")
    kwargs = model_arguments(**settings, use_bnb_nested_quant=True).init_kwargs({"revision": "main"})
    config = kwargs["quantization_config"]
    assert kwargs["revision"] == "main" and config.load_in_4bit and not config.load_in_8bit
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == ("fp4", True)
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert model_arguments(load_in_8bit=True, use_peft=True).init_kwargs()["quantization_config"].load_in_8bit
    assert model_arguments().init_kwargs({"revision": "main"}) == {"revision": "main"}
    with pytest.raises(ValueError, match="load_in_4bit and model_init_kwargs' quantization_config both quantize"):
        model_arguments(**settings).init_kwargs({"quantization_config": {"load_in_4bit": True}})
