"""padding_free: the packed layout computes no padding token and gives the padded path's
per-sequence scores, loss, gradients, reference columns and training losses; backends and
models that would mix the packed sequences are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig, OPTForCausalLM

from mallowspo.losses import preference_loss
from mallowspo.testing.tiny import tiny_run_settings
from mallowspo.training.collate import PreferenceCollator, split_pairs
from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.data import PreferenceDataConfig, load_preference_dataset, prepare_preference_dataset
from mallowspo.training.head import add_completion_head
from mallowspo.training.packing import check_packed_model, packed_probe_error
from mallowspo.training.reference import compute_reference_columns, load_or_compute_reference_columns
from mallowspo.training.scoring import score_completions
from mallowspo.training.trainer import MallowsPOTrainer

torch.set_num_threads(1)

PAD = 0


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    return AutoTokenizer.from_pretrained(tiny_lm_dir)


@pytest.fixture(scope="module")
def raw_data(tiny_prefs_path):
    return load_preference_dataset(str(tiny_prefs_path)).select(range(32))


@pytest.fixture(scope="module")
def dataset(raw_data, tokenizer):
    return prepare_preference_dataset(raw_data, tokenizer, PreferenceDataConfig(max_length=48, max_prompt_length=24))[
        0
    ]


def patched(path, attn_implementation="sdpa"):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation)
    add_completion_head(model)
    return model


def rows_of(dataset, n=6):
    """The first ``n`` tokenized pairs: prompts and completions of different lengths."""
    rows = [dataset[i] for i in range(n)]
    lengths = {len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) for r in rows}
    assert len(lengths) > 1  # padding is really needed in the padded layout
    return rows


def both_layouts(rows):
    return PreferenceCollator(PAD)(rows), PreferenceCollator(PAD, padding_free=True)(rows)


# ---- the layout ------------------------------------------------------------------------------


def test_packed_batch_holds_only_real_tokens_in_the_padded_order(dataset):
    rows = rows_of(dataset)
    padded, packed = both_layouts(rows)
    real = padded["attention_mask"].sum().item()
    assert padded["input_ids"].numel() > real  # the padded batch computes pad tokens ...
    assert packed["input_ids"].shape == (1, real)  # ... the packed one only the real ones
    offsets = packed["cu_seq_lens"].tolist()
    assert offsets[0] == 0 and offsets[-1] == real and len(offsets) == 2 * len(rows) + 1
    assert packed["max_length"] == padded["input_ids"].size(1)
    for i in range(2 * len(rows)):  # sequence i is padded row i: chosen ones first, then rejected ones
        lo, hi = offsets[i], offsets[i + 1]
        n = hi - lo
        assert torch.equal(packed["input_ids"][0, lo:hi], padded["input_ids"][i, :n])
        assert torch.equal(packed["completion_mask"][0, lo:hi], padded["completion_mask"][i, :n])
        assert packed["position_ids"][0, lo:hi].tolist() == list(range(n))
        assert set(packed["sequence_ids"][0, lo:hi].tolist()) == {i}
    assert "attention_mask" not in packed  # with one, transformers would not read the boundaries


# ---- scores, loss and gradients ----------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_scores_loss_and_gradients_equal_the_padded_path(tiny_lm_dir, dataset, attn_implementation):
    model = patched(tiny_lm_dir, attn_implementation)
    padded, packed = both_layouts(rows_of(dataset))
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        scores = score_completions(model, batch, with_entropy=True)
        chosen, rejected = split_pairs(scores.logps)
        ref_chosen, ref_rejected = split_pairs(scores.logps.detach() + 0.1 * torch.arange(scores.logps.numel()))
        loss = preference_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type="sigmoid", beta=0.1).losses.mean()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results.append((scores, loss.detach(), grads))
    (want, want_loss, want_grads), (got, got_loss, got_grads) = results
    assert got.logps.shape == (2 * len(rows_of(dataset)),)
    torch.testing.assert_close(got.logps, want.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.mean_entropy, want.mean_entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.lengths, want.lengths)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 0
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_a_sequence_start_is_never_scored_from_the_previous_sequence(tiny_lm_dir):
    """With an empty prompt the completion starts its sequence: its first token has no context of its own."""
    model = patched(tiny_lm_dir).eval()
    rows = [
        dict(prompt_input_ids=[5, 6, 7], chosen_input_ids=[8, 9, 10], rejected_input_ids=[11, 12]),
        dict(prompt_input_ids=[], chosen_input_ids=[13, 14, 15, 16], rejected_input_ids=[17, 18, 19]),
    ]
    padded, packed = both_layouts(rows)
    with torch.no_grad():
        want, got = score_completions(model, padded), score_completions(model, packed)
    assert got.lengths.tolist() == [3, 3, 2, 2]  # the empty-prompt completions lose their first token
    assert torch.equal(got.lengths, want.lengths)
    torch.testing.assert_close(got.logps, want.logps, rtol=1e-5, atol=1e-5)


# ---- the reference pass and its cache -------------------------------------------------------------


def test_reference_pass_and_its_cache_are_the_same_in_both_layouts(tiny_lm_dir, dataset, tokenizer, mallowspo_cache):
    model = patched(tiny_lm_dir).eval()
    padded, packed = PreferenceCollator(PAD), PreferenceCollator(PAD, padding_free=True)
    vocab = model.config.vocab_size
    want = compute_reference_columns(model, dataset, padded, Accelerator(cpu=True), 5, vocab)
    got = compute_reference_columns(model, dataset, packed, Accelerator(cpu=True), 5, vocab)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    # The layout changes rounding only, like the batch size: one cache entry serves both.
    settings = dict(batch_size=5, weights="w", tokenizer=tokenizer, data_settings={"max_length": 48})
    first = load_or_compute_reference_columns(model, dataset, padded, Accelerator(cpu=True), **settings)
    second = load_or_compute_reference_columns(model, dataset, packed, Accelerator(cpu=True), **settings)
    assert not first.reused and second.reused and first.cache_dir == second.cache_dir


# ---- training ----------------------------------------------------------------------------------


def train_losses(tiny_lm_dir, raw_data, out, peft_config=None, **overrides):
    # Plain SGD: Adam's first steps are lr * sign(g), which turns rounding-level gradient differences of
    # near-zero entries into lr-sized weight differences (whatever changes the rounding, the batch size too).
    fields = dict(max_steps=3, per_device_train_batch_size=4, logging_steps=1, optim="sgd", learning_rate=0.5)
    fields.update(output_dir=str(out), eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4)
    trainer = MallowsPOTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir, attn_implementation="sdpa"),
        args=MallowsPOConfig(**tiny_run_settings(**{**fields, **overrides})),
        train_dataset=raw_data,
        eval_dataset=raw_data.select(range(8)),
        processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
        peft_config=peft_config,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]
    parameters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return trainer, logs, parameters


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param(dict(mallows="none"), id="dpo"),
        pytest.param(dict(mallows="phi"), id="mallows-phi"),
        pytest.param(dict(mallows="theta", precompute_ref_log_probs=False), id="per-step-reference-copy"),
        pytest.param(dict(mallows="none", precompute_ref_log_probs=False, lora=True), id="per-step-adapter-reference"),
    ],
)
def test_training_with_padding_free_gives_the_padded_losses(
    tiny_lm_dir, raw_data, tmp_path, mallowspo_cache, settings
):
    settings = dict(settings)
    peft = settings.pop("lora", False)
    runs = {}
    for padding_free in (False, True):
        runs[padding_free] = train_losses(
            tiny_lm_dir,
            raw_data,
            tmp_path / str(padding_free),
            peft_config=lora() if peft else None,
            padding_free=padding_free,
            **settings,
        )
    (padded_trainer, padded_logs, padded_params), (packed_trainer, packed_logs, packed_params) = runs.values()
    assert packed_trainer.data_collator.padding_free and not padded_trainer.data_collator.padding_free
    assert len(packed_logs) == len(padded_logs) == 4  # 3 training steps and 1 evaluation
    for want, got in zip(padded_logs, packed_logs):
        assert want.keys() == got.keys()
        for name in want.keys() & {"loss", "eval_loss", "logps/chosen", "eval_logps/rejected", "rewards/margins"}:
            assert float(got[name]) == pytest.approx(float(want[name]), rel=1e-4, abs=1e-5), name
    assert padded_logs[2]["loss"] != padded_logs[0]["loss"]  # the runs did train
    for name, value in padded_params.items():
        torch.testing.assert_close(packed_params[name], value, rtol=1e-5, atol=1e-5, msg=name)


# ---- what is refused -----------------------------------------------------------------------------


def test_config_refuses_an_attention_backend_without_packed_masks(tmp_path):
    with pytest.raises(
        ValueError, match=r"attn_implementation='paged\|flash_attention_2'.*use attn_implementation='sdpa'"
    ):
        MallowsPOConfig(
            output_dir=str(tmp_path),
            padding_free=True,
            model_init_kwargs={"attn_implementation": "paged|flash_attention_2"},
        )
    MallowsPOConfig(output_dir=str(tmp_path), padding_free=True, model_init_kwargs={"attn_implementation": "sdpa"})


def test_a_custom_attention_backend_is_refused_naming_one_that_works(tiny_lm_dir):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("mallowspo_test_attention", sdpa_attention_forward)  # no packed-sequence mask
    model = patched(tiny_lm_dir, "mallowspo_test_attention")
    with pytest.raises(
        ValueError, match=r"'mallowspo_test_attention'.*LlamaForCausalLM.*use attn_implementation='sdpa'"
    ):
        check_packed_model(model)


def tiny_opt(vocab_size, tokenizer):
    config = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return OPTForCausalLM(config)


def test_a_model_type_that_mixes_packed_sequences_is_refused(tiny_lm_dir, raw_data, tokenizer, tmp_path):
    """OPT counts its learned positions from the attention mask: with sdpa, the backend is fine, the model is not."""
    model = tiny_opt(len(tokenizer), tokenizer)
    assert packed_probe_error(model) is not None
    args = MallowsPOConfig(**tiny_run_settings(output_dir=str(tmp_path), max_steps=1, padding_free=True))
    with pytest.raises(
        ValueError, match=r"OPTForCausalLM \(model_type 'opt'\) mixes the sequences.*padding_free=False"
    ):
        MallowsPOTrainer(model, args=args, train_dataset=raw_data, processing_class=tokenizer)
    assert packed_probe_error(patched(tiny_lm_dir)) is None  # the tiny Llama keeps them apart


def test_a_prompt_learning_adapter_is_refused(tiny_lm_dir):
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(patched(tiny_lm_dir), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="prompt-learning adapter .*PREFIX_TUNING.*use LoRA or padding_free=False"):
        check_packed_model(model)


def test_a_dense_mask_backend_is_accepted_with_a_cost_warning(tiny_lm_dir, caplog):
    with caplog.at_level("WARNING", logger="mallowspo"):
        check_packed_model(patched(tiny_lm_dir, "eager"))
    assert "attn_implementation='eager': the packed row's mask is dense" in caplog.text
