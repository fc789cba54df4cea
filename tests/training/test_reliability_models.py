"""Reliability, models and tokenizers: what `load_causal_lm` and `load_tokenizer` refuse, in one
line naming the directory and the file, instead of training something wrong or a traceback
deep in a library.

- weights missing from the file (an untied lm_head) or in the file but not in the model;
  tied embeddings and the keys transformers itself ignores still load;
- an encoder / masked LM (BERT), which AutoModelForCausalLM would load as a "decoder";
- a truncated safetensors file, and a config.json whose sizes are not those of the weights;
- a tokenizer with ids beyond the model's embedding (`check_tokenizer_fits`);
- missing or corrupted tokenizer files, and a hub id that cannot be reached.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mallowspo.training.loading import (
    check_causal_lm_config,
    check_tokenizer_fits,
    load_causal_lm,
    load_tokenizer,
)

torch.set_num_threads(1)
HUB_ID = "mallowspo-test/no-such-model"


def variant(src, dst, weights=None, config=None):
    """Copy the model directory ``src`` to ``dst``; ``weights(dict)`` / ``config(dict)`` edit
    model.safetensors / config.json in place."""
    shutil.copytree(src, dst)
    if weights is not None:
        tensors = load_file(dst / "model.safetensors")
        weights(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        values = json.loads((dst / "config.json").read_text())
        config(values)
        (dst / "config.json").write_text(json.dumps(values))
    return dst


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def untied_lm_dir(tiny_lm_dir, tmp_path_factory):
    """The tiny Llama with untied embeddings: its own lm_head.weight in the file."""

    def add_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].flip(0).contiguous()

    return variant(
        tiny_lm_dir,
        tmp_path_factory.mktemp("untied") / "model",
        weights=add_head,
        config=lambda c: c.update(tie_word_embeddings=False),
    )


def save_tiny(model_class, config, directory, tokenizer_from=None):
    torch.manual_seed(0)
    model_class(config).save_pretrained(directory, safe_serialization=True)
    if tokenizer_from is not None:  # for the command line, which loads the tokenizer first
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (tokenizer_from / name).is_file():
                shutil.copy(tokenizer_from / name, directory / name)
    return directory


def tiny_bert(directory, tokenizer_from=None):
    config = transformers.BertConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    return save_tiny(transformers.BertForMaskedLM, config, directory, tokenizer_from)


# ---------------------------------------------------------------------------------------
# Weights that would load wrong
# ---------------------------------------------------------------------------------------


def test_tied_embeddings_need_no_lm_head_in_the_file(tiny_lm_dir, untied_lm_dir):
    with safe_open(str(tiny_lm_dir / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = load_causal_lm(str(tiny_lm_dir))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = load_causal_lm(str(untied_lm_dir))
    torch.testing.assert_close(untied.lm_head.weight, untied.model.embed_tokens.weight.flip(0))


def test_keys_transformers_ignores_are_not_errors(tiny_lm_dir, tmp_path):
    # An old Llama checkpoint with per-layer rotary buffers (transformers drops them) ...
    def add_inv_freq(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    load_causal_lm(str(variant(tiny_lm_dir, tmp_path / "old_llama", weights=add_inv_freq)))
    # ... and GPT-2's attention-mask buffers (GPT2LMHeadModel._keys_to_ignore_on_load_unexpected).
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    gpt2 = save_tiny(transformers.GPT2LMHeadModel, config, tmp_path / "gpt2")
    tensors = load_file(gpt2 / "model.safetensors")
    tensors["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(tensors, gpt2 / "model.safetensors", metadata={"format": "pt"})
    assert isinstance(load_causal_lm(str(gpt2)), transformers.GPT2LMHeadModel)
    # ... and a Pythia checkpoint's per-layer attention and rotary buffers.
    config = transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    pythia = save_tiny(transformers.GPTNeoXForCausalLM, config, tmp_path / "pythia")
    tensors = load_file(pythia / "model.safetensors")
    for name in ("bias", "masked_bias", "rotary_emb.inv_freq"):
        tensors[f"gpt_neox.layers.0.attention.{name}"] = torch.ones(4)
    save_file(tensors, pythia / "model.safetensors", metadata={"format": "pt"})
    assert isinstance(load_causal_lm(str(pythia)), transformers.GPTNeoXForCausalLM)


@pytest.fixture
def transformers_warnings():
    """The messages transformers' loggers emit during the test."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    yield messages
    logging.getLogger("transformers").removeHandler(handler)


def test_an_untied_checkpoint_without_its_lm_head_is_refused(untied_lm_dir, tmp_path, transformers_warnings):
    directory = variant(untied_lm_dir, tmp_path / "no_head", weights=lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError) as raised:
        load_causal_lm(str(directory))
    message = str(raised.value)
    assert message.startswith(f"{directory}: the weights in {directory / 'model.safetensors'} do not match")
    assert "missing from the file: 1 weight (lm_head.weight), which would be trained from a random init" in message
    assert '"tie_word_embeddings": true' in message and "\n" not in message
    # transformers' table of the same ("newly initialized ... consider training") is not shown above the error
    assert not [m for m in transformers_warnings if "LOAD REPORT" in m], transformers_warnings


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.")],
            "missing from the file: 9 weights (model.layers.1.input_layernorm.weight, "
            "model.layers.1.mlp.down_proj.weight, model.layers.1.mlp.gate_proj.weight, ...)",
        ),
        (
            lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(128, 64)}),
            "not used by the model: 1 weight (model.layers.2.mlp.up_proj.weight) in the file, which would be ignored",
        ),
    ],
    ids=["missing_layer", "unexpected_weight"],
)
def test_missing_or_unexpected_weights_are_refused(tiny_lm_dir, tmp_path, edit, expected):
    directory = variant(tiny_lm_dir, tmp_path / "model", weights=edit)
    with pytest.raises(ValueError, match="do not match the LlamaForCausalLM its config.json describes") as raised:
        load_causal_lm(str(directory))
    assert str(directory / "model.safetensors") in str(raised.value) and expected in str(raised.value)


# ---------------------------------------------------------------------------------------
# Non-causal architectures
# ---------------------------------------------------------------------------------------


def test_a_masked_lm_directory_is_refused(tmp_path):
    directory = tiny_bert(tmp_path / "bert")
    with pytest.raises(ValueError) as raised:
        load_causal_lm(str(directory))
    assert str(raised.value).startswith(
        f"{directory} is not a causal language model: its config.json gives architectures ['BertForMaskedLM'], "
        "model_type 'bert', is_decoder False: a masked-LM or classification model."
    )


CAUSAL = {
    "llama": transformers.LlamaConfig(architectures=["LlamaForCausalLM"]),
    "qwen2": transformers.Qwen2Config(architectures=["Qwen2ForCausalLM"]),
    "mistral": transformers.MistralConfig(architectures=["MistralForCausalLM"]),
    "gpt2": transformers.GPT2Config(architectures=["GPT2LMHeadModel"]),
    "pythia": transformers.GPTNeoXConfig(architectures=["GPTNeoXForCausalLM"]),
    "no_architectures": transformers.LlamaConfig(),
    "bert_decoder": transformers.BertConfig(architectures=["BertLMHeadModel"], is_decoder=True),
}
NOT_CAUSAL = {
    "bert": (transformers.BertConfig(), "an encoder"),
    "bert_lm_head_without_is_decoder": (transformers.BertConfig(architectures=["BertLMHeadModel"]), "an encoder"),
    "roberta_mlm": (transformers.RobertaConfig(architectures=["RobertaForMaskedLM"]), "a masked-LM"),
    "xlm_roberta": (transformers.XLMRobertaConfig(), "an encoder"),
    "distilbert": (transformers.DistilBertConfig(architectures=["DistilBertForMaskedLM"]), "a masked-LM"),
    "reward_model": (transformers.LlamaConfig(architectures=["LlamaForSequenceClassification"]), "classification"),
}


@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_causal_lm_configs_pass(name):
    check_causal_lm_config(CAUSAL[name], name)


@pytest.mark.parametrize("name", sorted(NOT_CAUSAL))
def test_encoder_and_classifier_configs_are_refused(name):
    config, what = NOT_CAUSAL[name]
    with pytest.raises(ValueError, match=f"^{name} is not a causal language model: .*{what}"):
        check_causal_lm_config(config, name)


def test_causal_lms_of_other_families_load(tmp_path):
    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    models = {
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)),
        "pythia": (transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig(**small)),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(num_key_value_heads=1, **small)),
    }
    for name, (model_class, config) in models.items():
        assert isinstance(load_causal_lm(str(save_tiny(model_class, config, tmp_path / name))), model_class)


# ---------------------------------------------------------------------------------------
# Truncated weights, and sizes that do not match
# ---------------------------------------------------------------------------------------


def test_a_truncated_safetensors_file_is_named(tiny_lm_dir, tmp_path):
    directory = variant(tiny_lm_dir, tmp_path / "model")
    truncate(directory / "model.safetensors")
    with pytest.raises(ValueError) as raised:
        load_causal_lm(str(directory))
    assert str(raised.value).startswith(f"{directory / 'model.safetensors'} is not a readable safetensors file (")
    assert "it is truncated or corrupted" in str(raised.value)


def test_the_truncated_shard_of_a_sharded_checkpoint_is_named(tiny_lm_dir, tmp_path):
    directory = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(tiny_lm_dir).save_pretrained(directory, max_shard_size="100KB")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1
    truncate(shards[1], keep=0.9)
    with pytest.raises(ValueError, match="is not a readable safetensors file") as raised:
        load_causal_lm(str(directory))
    assert str(raised.value).startswith(str(shards[1]))


@pytest.mark.parametrize(
    "field, value, tensor",
    [
        ("hidden_size", 32, "model.embed_tokens.weight is [512, 64] in the file, [512, 32] by config.json"),
        ("vocab_size", 600, "model.embed_tokens.weight is [512, 64] in the file, [600, 64] by config.json"),
        ("intermediate_size", 96, "model.layers.0.mlp.down_proj.weight is [64, 128] in the file, [64, 96]"),
    ],
    ids=["hidden_size", "vocab_size", "intermediate_size"],
)
def test_config_sizes_that_do_not_match_the_weights_name_the_tensors(tiny_lm_dir, tmp_path, field, value, tensor):
    directory = variant(tiny_lm_dir, tmp_path / "model", config=lambda c: c.update({field: value}))
    with pytest.raises(ValueError) as raised:
        load_causal_lm(str(directory))
    message = str(raised.value)
    assert message.startswith(
        f"{directory}: the sizes in config.json do not match the weights in {directory / 'model.safetensors'} ("
    )
    assert tensor in message and "\n" not in message


def test_a_size_mismatch_it_cannot_name_keeps_transformers_report(
    tiny_lm_dir, tmp_path, monkeypatch, transformers_warnings
):
    """A hub model (no local files to compare): the message points to transformers' table, which stays."""
    monkeypatch.setattr("mallowspo.training.loading.config_size_mismatches", lambda *args: [])
    directory = variant(tiny_lm_dir, tmp_path / "model", config=lambda c: c.update(hidden_size=32))
    with pytest.raises(ValueError, match=r"config.json do not match .*\(the load report above lists the tensors\)"):
        load_causal_lm(str(directory))
    assert [m for m in transformers_warnings if "LOAD REPORT" in m and "MISMATCH" in m]


# ---------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------


def test_a_tokenizer_that_fits_passes_and_one_beyond_the_embedding_is_refused(tiny_lm_dir):
    model = load_causal_lm(str(tiny_lm_dir))
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    check_tokenizer_fits(model, tokenizer, str(tiny_lm_dir))
    tokenizer.add_tokens(["<new-1>", "<new-2>"])
    with pytest.raises(ValueError) as raised:
        check_tokenizer_fits(model, tokenizer, str(tiny_lm_dir))
    assert str(raised.value).startswith(
        f"the tokenizer of {tiny_lm_dir} does not fit its model: it has 514 tokens (largest id 513"
    )
    assert "the model's input embedding has 512 rows" in str(raised.value)
    assert "model.resize_token_embeddings" in str(raised.value)
    model.resize_token_embeddings(len(tokenizer))
    check_tokenizer_fits(model, tokenizer, str(tiny_lm_dir))


def test_a_special_token_id_beyond_the_embedding_is_refused(tiny_lm_dir):
    class Tokenizer:  # a vocabulary that fits, with a special id past its end
        all_special_ids = [0, 1, 700]

        def __len__(self):
            return 300

    with pytest.raises(ValueError, match=r"it has 300 tokens \(largest id 700, special ids up to 700\).* 512 rows"):
        check_tokenizer_fits(load_causal_lm(str(tiny_lm_dir)), Tokenizer(), "the model")


def test_load_tokenizer_uses_eos_as_pad_when_there_is_none(tiny_lm_dir, tmp_path):
    directory = variant(tiny_lm_dir, tmp_path / "model")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(directory))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|end|>"


@pytest.mark.parametrize(
    "removed, error, message",
    [
        (
            ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"),
            FileNotFoundError,
            "{d} holds no tokenizer files (tokenizer.json, tokenizer_config.json): save the tokenizer with the model",
        ),
        (
            ("tokenizer.json",),
            FileNotFoundError,
            "{d} has tokenizer_config.json but no tokenizer.json (nor a vocabulary file",
        ),
    ],
    ids=["no_files", "no_tokenizer_json"],
)
def test_missing_tokenizer_files_are_named(tiny_lm_dir, tmp_path, removed, error, message):
    directory = variant(tiny_lm_dir, tmp_path / "model")
    for name in removed:
        (directory / name).unlink()
    with pytest.raises(error) as raised:
        load_tokenizer(str(directory))
    assert str(raised.value).startswith(message.format(d=directory)) and "sentencepiece" not in str(raised.value)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_truncated_tokenizer_file_is_named(tiny_lm_dir, tmp_path, name):
    directory = variant(tiny_lm_dir, tmp_path / "model")
    truncate(directory / name)
    with pytest.raises(ValueError) as raised:
        load_tokenizer(str(directory))
    assert str(raised.value).startswith(f"{directory / name} is not valid JSON (")
    assert "the tokenizer file is truncated or corrupted" in str(raised.value)


def test_a_tokenizer_json_the_library_rejects_names_the_directory(tiny_lm_dir, tmp_path):
    directory = variant(tiny_lm_dir, tmp_path / "model")
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    with pytest.raises(ValueError, match=f"^could not load the tokenizer in {directory} \\(tokenizer.json, "):
        load_tokenizer(str(directory))


# ---------------------------------------------------------------------------------------
# Hub ids that cannot be loaded
# ---------------------------------------------------------------------------------------


@pytest.fixture
def hub_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch it too


@pytest.mark.parametrize("load, what", [(load_causal_lm, "the model"), (load_tokenizer, "the tokenizer of")])
def test_an_unreachable_hub_id_is_one_line_naming_it(hub_offline, load, what):
    with pytest.raises(OSError) as raised:
        load(HUB_ID)
    assert str(raised.value) == (
        f"could not load {what} '{HUB_ID}' from the Hugging Face hub (HF_HUB_OFFLINE is set and it is not in the "
        "local cache); check the id and the network, or give a local directory"
    )


def test_a_hub_connection_error_is_one_line_naming_the_id(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as cause:
            try:
                raise LocalEntryNotFoundError("cannot find the requested files in the local cache") from cause
            except LocalEntryNotFoundError as error:
                raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from error

    monkeypatch.setattr("mallowspo.training.loading.AutoModelForCausalLM.from_pretrained", unreachable)
    with pytest.raises(OSError) as raised:
        load_causal_lm(HUB_ID)
    assert str(raised.value) == (
        f"could not load the model '{HUB_ID}' from the Hugging Face hub (the hub cannot be reached and it is not in "
        "the local cache); check the id and the network, or give a local directory"
    )


# ---------------------------------------------------------------------------------------
# Through the command line: one line, exit code 2
# ---------------------------------------------------------------------------------------


def no_lm_head(untied, tiny, tmp_path):
    return variant(untied, tmp_path / "no_head", weights=lambda t: t.pop("lm_head.weight"))


def masked_lm(untied, tiny, tmp_path):
    return tiny_bert(tmp_path / "bert", tokenizer_from=tiny)


def truncated(untied, tiny, tmp_path):
    directory = variant(tiny, tmp_path / "truncated")
    truncate(directory / "model.safetensors")
    return directory


def edited_config(untied, tiny, tmp_path):
    return variant(tiny, tmp_path / "edited", config=lambda c: c.update(hidden_size=32))


@pytest.mark.parametrize(
    "make, fragment",
    [
        (no_lm_head, "missing from the file: 1 weight (lm_head.weight)"),
        (masked_lm, "is not a causal language model"),
        (truncated, "is not a readable safetensors file"),
        (edited_config, "the sizes in config.json do not match the weights"),
    ],
    ids=["no_lm_head", "masked_lm", "truncated", "edited_config"],
)
def test_train_refuses_a_bad_model_in_one_line(
    run_cli, make_recipe, untied_lm_dir, tiny_lm_dir, tmp_path, make, fragment
):
    directory = make(untied_lm_dir, tiny_lm_dir, tmp_path)
    code, _, err = run_cli("train", "--config", make_recipe(model_name_or_path=str(directory)))
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert line.startswith("error: ") and str(directory) in line and fragment in line, line
