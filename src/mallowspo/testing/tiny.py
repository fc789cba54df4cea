"""Tiny local language models: a byte-level BPE tokenizer trained on given texts and a
small random-init Llama, saved in Hugging Face format so that the real
``from_pretrained(path)`` code paths run without any hub access.

Used by the tests, by the benchmark harness and by the built-in world. Also ships a small
preference file (``tiny_preferences_path()``: 300 pairs in TRL's standard format, with a
``category`` column; made by ``scripts/make_tiny_prefs.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, BOS = "<|pad|>", "<|end|>", "<|begin|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, EOS, BOS, *ROLE_TOKENS)

# Each message renders as <|role|>content<|end|>; the generation prompt is <|assistant|>.
# The end token is the EOS, so conversational and standard completions end alike.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with pad/eos/bos, role tokens and a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, bos_token=BOS, model_max_length=4096
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A Llama config of a few hundred thousand parameters; ``overrides`` change any field."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_model(
    out_dir: str | Path, texts: Iterable[str], vocab_size: int = 512, seed: int = 0, **config_overrides
) -> Path:
    """Train a tokenizer on ``texts``, build a random-init tiny Llama for it, save both to ``out_dir``."""
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size)
    config = tiny_llama_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_preferences_path() -> Path:
    """The shipped preference file: 300 rows in TRL's standard format, with a ``category`` column."""
    return Path(str(files("mallowspo.testing") / "assets" / "tiny_prefs.jsonl"))


def trl_parity_settings(**overrides) -> dict:
    """Settings shared by ``DPOConfig`` and ``MallowsPOConfig`` for side-by-side runs with TRL on CPU:
    SGD (Adam's first steps are about sign(gradient), so float noise in a near-zero gradient would
    show in the weights), precomputed reference log-probs, a log every step, no truncation, no
    saving; ``overrides`` change or add any key."""
    settings = dict(
        per_device_train_batch_size=4,
        learning_rate=0.5,
        optim="sgd",
        beta=0.1,
        precompute_ref_log_probs=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        use_cpu=True,
        max_length=None,
    )
    settings.update(overrides)
    return settings


def tiny_run_settings(**overrides) -> dict:
    """``MallowsPOConfig`` / recipe settings for a short, quiet run on a tiny model: token budgets
    that fit the tiny preference file (48 tokens, prompts up to 24), lr 1e-3, seed 0, no
    saving, no reporting, no progress bars; ``overrides`` change or add any key (``output_dir``
    among them)."""
    settings = dict(
        learning_rate=1e-3,
        max_length=48,
        max_prompt_length=24,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return settings
