"""Shared pytest fixtures.

Each fixture here is self-contained; add new ones below with their own section.
"""

from __future__ import annotations

import pytest

# --------------------------------------------------------------------------------------
# tiny_tokenizer: a locally trained byte-level BPE tokenizer with a chat template
# (no network, no hub). Used by the data-layer tests (tests/test_data.py).
# --------------------------------------------------------------------------------------

TINY_TOKENIZER_CORPUS = [
    "What color is the sky? The sky is blue on a clear day.",
    "The sky is green, said nobody ever.",
    "Name a prime number. Seven is a prime number. Nine is not a prime number.",
    "Where is the sun? The sun is in the sky. The sun is in the sea.",
    "Write a short poem about the sea and the waves and the wind.",
    "How are you today? I am fine, thank you. I am not sure.",
    "Paris is the capital of France. London is the capital of England.",
]

# A minimal ChatML-like template. The prompt ends with the generation prompt
# "<|assistant|>", each assistant turn ends with the EOS token and nothing after it, so
# that a completion rendered by the template already ends with EOS.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tiny_tokenizer(chat_template: str | None = TINY_CHAT_TEMPLATE):
    """Train a byte-level BPE (vocab ~300) on a few sentences and wrap it.

    The tokenizer adds BOS to every text when ``add_special_tokens=True`` (like Llama),
    has ``<s>``/``</s>``/``<pad>`` and role markers as special tokens, and, unless
    ``chat_template`` is None, a simple Jinja chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_TOKENIZER_CORPUS, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", bos_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A tiny local tokenizer (byte-level BPE, BOS added, chat template). Do not mutate."""
    return build_tiny_tokenizer()


# --------------------------------------------------------------------------------------
# BEGIN trainer / reference pass / train CLI fixtures (tests/test_trainer*.py,
# tests/test_reference*.py, tests/test_cli*.py). Tiny models built locally, no hub.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_prefs_path():
    """The bundled preference file (300 rows, standard format): src/mallowspo/assets/tiny_prefs.jsonl."""
    from mallowspo.testing.tiny import tiny_preferences_path

    return tiny_preferences_path()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_prefs_path):
    """A random-init tiny Llama + BPE tokenizer (vocab 512) trained on the bundled texts, in HF format."""
    import json

    from mallowspo.testing.tiny import build_tiny_model

    rows = [json.loads(line) for line in tiny_prefs_path.read_text().splitlines() if line.strip()]
    texts = [r["prompt"] + " " + r[side] for r in rows for side in ("chosen", "rejected")]
    return build_tiny_model(tmp_path_factory.mktemp("tiny_lm"), texts, vocab_size=512, seed=0)


@pytest.fixture
def mallowspo_cache(tmp_path, monkeypatch):
    """A fresh reference-pass cache root for one test (MALLOWSPO_CACHE)."""
    root = tmp_path / "mallowspo_cache"
    monkeypatch.setenv("MALLOWSPO_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def reference_pass():
    """reference_pass(raw, tokenizer, model, config) -> (ReferenceResult, tokenized dataset): the cached
    reference pass over raw preference rows, on a copy of ``model`` with the completion head."""
    import copy

    from accelerate import Accelerator

    from mallowspo.training.collate import PreferenceCollator
    from mallowspo.training.data import prepare_preference_dataset
    from mallowspo.training.head import add_completion_head
    from mallowspo.training.reference import load_or_compute_reference_columns
    from mallowspo.training.reference_cache import weights_fingerprint

    def run(raw, tokenizer, model, config):
        dataset, _ = prepare_preference_dataset(raw, tokenizer, config)
        patched = copy.deepcopy(model)
        add_completion_head(patched)
        result = load_or_compute_reference_columns(
            patched.eval(),
            dataset,
            PreferenceCollator(tokenizer.pad_token_id),
            Accelerator(cpu=True),
            batch_size=8,
            weights=weights_fingerprint(model),
            tokenizer=tokenizer,
            data_settings=config,
        )
        return result, dataset

    return run


# END trainer / reference pass / train CLI fixtures
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# BEGIN reliability fixtures (tests/test_reliability_*.py): the train CLI in-process on a
# tiny model, with a base recipe, captured output and an isolated `datasets` cache.
# --------------------------------------------------------------------------------------


@pytest.fixture
def isolated_hf_datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache of loaded data files in the test's tmp dir."""
    import datasets

    datasets.disable_progress_bars()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture
def make_recipe(tmp_path, tiny_lm_dir, tiny_prefs_path):
    """make_recipe(**overrides) -> path of a small `mallowspo train` recipe (1 step, no saving)."""
    import yaml

    from mallowspo.testing.tiny import tiny_run_settings

    def make(**overrides):
        fields = dict(
            model_name_or_path=str(tiny_lm_dir),
            dataset_name=str(tiny_prefs_path),
            output_dir=str(tmp_path / "out"),
            max_steps=1,
            per_device_train_batch_size=2,
            per_device_eval_batch_size=4,
            logging_steps=1,
        )
        values = tiny_run_settings(**{**fields, **overrides})
        path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    return make


@pytest.fixture
def run_cli(capsys, mallowspo_cache, isolated_hf_datasets_cache):
    """run_cli(*argv) -> (exit code, stdout, stderr) of `mallowspo` run in-process."""
    from mallowspo.cli import main

    def run(*argv):
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


# END reliability fixtures
# --------------------------------------------------------------------------------------
