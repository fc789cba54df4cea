"""Training on ranked lists: the collator and scoring against the unpadded computation, the
list reference pass (per response, Hbar over K), K = 2 lists against the pairwise trainer, the
listwise settings, and a run on the built-in world's lists that learns the held-out rankings."""

from __future__ import annotations

import logging
import math

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from mallowspo.testing.tiny import tiny_run_settings
from mallowspo.training.collate import PreferenceCollator
from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.data import (
    ListDataConfig,
    PreferenceDataConfig,
    load_preference_dataset,
    prepare_list_dataset,
    prepare_preference_dataset,
)
from mallowspo.training.data.binarize import pairs_as_lists
from mallowspo.training.head import add_completion_head
from mallowspo.training.list_collate import ListCollator, scatter_responses
from mallowspo.training.list_reference import (
    compute_list_reference_columns,
    list_hbar,
    load_or_compute_list_reference_columns,
)
from mallowspo.training.reference import compute_reference_columns
from mallowspo.training.reference_cache import weights_fingerprint
from mallowspo.training.scoring import score_completions
from mallowspo.training.trainer import MallowsPOTrainer

torch.set_num_threads(1)

DATA_CONFIG = PreferenceDataConfig(max_length=48, max_prompt_length=24)


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    return AutoTokenizer.from_pretrained(tiny_lm_dir)


@pytest.fixture(scope="module")
def raw_pairs(tiny_prefs_path):
    return load_preference_dataset(str(tiny_prefs_path)).select(range(64))


def ragged_rows(raw: datasets.Dataset, n: int) -> list[dict]:
    """``n`` lists of K = 2, 3, 4 distinct responses (the pair's and other rows'), some with tied scores."""
    pool = list(dict.fromkeys([*raw["rejected"], *raw["chosen"]]))
    rows = []
    for i in range(n):
        responses = [raw[i]["chosen"], raw[i]["rejected"]]
        responses += [t for t in pool[i:] if t not in responses][: i % 3]
        scores = [float(len(responses) - k) for k in range(len(responses))]
        if len(responses) > 2 and i % 2:
            scores[1] = scores[2]  # a tie below the best
        rows.append({"prompt": raw[i]["prompt"], "responses": responses, "scores": scores})
    return rows


@pytest.fixture(scope="module")
def ragged(raw_pairs, tokenizer):
    table = datasets.Dataset.from_list(ragged_rows(raw_pairs, 12))
    return prepare_list_dataset(table, tokenizer, DATA_CONFIG, ListDataConfig())[0]


def patched(path, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    add_completion_head(model)
    return model.eval()


def naive_scores(model, prompt_ids, completion_ids):
    """Summed log-prob and mean entropy of one completion from the full float64 logits, unpadded."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, ids.size(1) - 1)  # position t predicts token t + 1
    logp = log_p[positions, ids[0, len(prompt_ids) :]].sum()
    entropy = -(log_p[positions].exp() * log_p[positions]).sum(-1).mean()
    return float(logp), float(entropy)


# ----------------------------------------------------------------------------------------
# Collator and scoring
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_ragged_batches_score_every_response_as_alone(tiny_lm_dir, ragged, tokenizer, padding_free):
    model = patched(tiny_lm_dir, torch.float64)
    rows = [ragged[i] for i in range(6)]
    batch = ListCollator(tokenizer.pad_token_id, padding_free=padding_free)(rows)
    sizes = [len(r["responses_input_ids"]) for r in rows]
    assert sorted(set(sizes)) == [2, 3, 4]
    assert batch["list_mask"].tolist() == [[k < size for k in range(4)] for size in sizes]
    assert batch["ranks"][batch["list_mask"]].tolist() == [rank for r in rows for rank in r["ranks"]]
    rows_computed = batch["input_ids"].size(0) if not padding_free else batch["cu_seq_lens"].numel() - 1
    assert rows_computed == sum(sizes)  # absent responses are not computed
    with torch.no_grad():
        scores = score_completions(model, batch, with_entropy=True)
    logps, entropy = scatter_responses(scores.logps, batch), scatter_responses(scores.mean_entropy, batch)
    for b, row in enumerate(rows):
        for k, completion in enumerate(row["responses_input_ids"]):
            logp, mean_entropy = naive_scores(model, row["prompt_input_ids"], completion)
            assert float(logps[b, k]) == pytest.approx(logp, rel=1e-10, abs=1e-10)
            assert float(entropy[b, k]) == pytest.approx(mean_entropy, rel=1e-10, abs=1e-10)
        assert (logps[b, len(row["responses_input_ids"]) :] == 0).all()


def test_scattered_scores_carry_the_gradient(tiny_lm_dir, ragged, tokenizer):
    model = patched(tiny_lm_dir)
    batch = ListCollator(tokenizer.pad_token_id)([ragged[i] for i in range(3)])
    logps = scatter_responses(score_completions(model, batch).logps, batch)
    logps[batch["list_mask"]].sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------
# The reference pass over lists
# ----------------------------------------------------------------------------------------


def test_list_reference_pass_scores_each_response_once(tiny_lm_dir, ragged, tokenizer):
    model = patched(tiny_lm_dir, torch.float64)
    vocab = model.config.vocab_size
    columns = compute_list_reference_columns(
        model, ragged, ListCollator(tokenizer.pad_token_id), Accelerator(cpu=True), 5, vocab
    )
    assert columns["list_sizes"].tolist() == [len(r) for r in ragged["responses_input_ids"]]
    position = 0
    for row, hbar in zip(ragged, columns["hbar"]):
        entropies = []
        for completion in row["responses_input_ids"]:
            logp, entropy = naive_scores(model, row["prompt_input_ids"], completion)
            assert columns["ref_logps"][position] == pytest.approx(logp, rel=1e-10, abs=1e-10)
            assert columns["ref_entropy"][position] == pytest.approx(entropy, rel=1e-10, abs=1e-10)
            assert columns["lengths"][position] == len(completion)
            entropies.append(entropy)
            position += 1
        assert hbar == pytest.approx(np.mean(entropies) / math.log(vocab), abs=1e-12)  # eq. 11 over K
    assert position == len(columns["ref_logps"])


def test_two_response_lists_have_the_pairs_reference_columns_and_hbar(tiny_lm_dir, raw_pairs, tokenizer):
    model = patched(tiny_lm_dir)
    pairs = prepare_preference_dataset(raw_pairs.select(range(20)), tokenizer, DATA_CONFIG)[0]
    vocab = model.config.vocab_size
    pair_columns = compute_reference_columns(
        model, pairs, PreferenceCollator(tokenizer.pad_token_id), Accelerator(cpu=True), 8, vocab
    )
    list_columns = compute_list_reference_columns(
        model, pairs_as_lists(pairs), ListCollator(tokenizer.pad_token_id), Accelerator(cpu=True), 8, vocab
    )
    np.testing.assert_allclose(list_columns["ref_logps"][0::2], pair_columns["ref_chosen_logps"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        list_columns["ref_logps"][1::2], pair_columns["ref_rejected_logps"], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(list_columns["hbar"], pair_columns["hbar"], rtol=1e-6, atol=1e-7)
    # On the same entropies, Hbar over K = 2 is eq. 11 exactly.
    from mallowspo.dispersion import normalized_entropy

    entropies = torch.rand(50, 2, dtype=torch.float64) * 3
    exact = normalized_entropy(entropies[:, 0], entropies[:, 1], vocab)
    assert torch.equal(list_hbar(entropies, torch.ones(50, 2, dtype=torch.bool), vocab), exact)


def test_list_reference_cache_is_reused_for_the_same_lists(tiny_lm_dir, ragged, tokenizer, mallowspo_cache):
    model = patched(tiny_lm_dir)

    def run(data):
        return load_or_compute_list_reference_columns(
            model,
            data,
            ListCollator(tokenizer.pad_token_id),
            Accelerator(cpu=True),
            batch_size=4,
            weights=weights_fingerprint(model),
            tokenizer=tokenizer,
            data_settings=DATA_CONFIG,
        )

    first, again = run(ragged), run(ragged)
    assert not first.reused and again.reused and again.cache_dir == first.cache_dir
    assert again.columns["ref_logps"] == first.columns["ref_logps"]
    assert [len(v) for v in first.columns["ref_entropy"]] == [len(r) for r in ragged["responses_input_ids"]]
    shorter = ragged.map(
        lambda r, i: {"responses_input_ids": r["responses_input_ids"][:2], "ranks": r["ranks"][:2]} if i == 5 else {},
        with_indices=True,
    )
    assert not run(shorter).reused


# ----------------------------------------------------------------------------------------
# The trainer on lists
# ----------------------------------------------------------------------------------------


def config(tmp_path, **overrides) -> MallowsPOConfig:
    fields = dict(max_steps=3, per_device_train_batch_size=8, per_device_eval_batch_size=16, logging_steps=1)
    return MallowsPOConfig(**tiny_run_settings(**{"output_dir": str(tmp_path), **fields, **overrides}))


def trained(tiny_lm_dir, data, tmp_path, **overrides) -> MallowsPOTrainer:
    trainer = MallowsPOTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
        args=config(tmp_path, **overrides),
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
    )
    trainer.train()
    return trainer


def logged(trainer, name):
    return [entry[name] for entry in trainer.state.log_history if name in entry and "train_runtime" not in entry]


@pytest.mark.parametrize(
    "pairwise, listwise",
    [
        (dict(mallows="none"), dict(objective="plackett_luce", mallows="none")),
        (dict(mallows="theta"), dict(objective="plackett_luce", mallows="theta")),  # Hbar over K = 2: eq. 11
        (dict(mallows="phi"), dict(objective="all_pairs", mallows="phi")),
    ],
    ids=["dpo", "theta-entropy", "phi-all-pairs"],
)
def test_two_response_lists_train_exactly_like_pairs(
    tiny_lm_dir, raw_pairs, tmp_path, mallowspo_cache, pairwise, listwise
):
    lists = raw_pairs.map(lambda r: {"responses": [r["chosen"], r["rejected"]], "ranking": [0, 1]})
    lists = lists.remove_columns(["chosen", "rejected"])
    pairs = trained(tiny_lm_dir, raw_pairs, tmp_path / "pairs", **pairwise)
    listed = trained(tiny_lm_dir, lists, tmp_path / "lists", **listwise)
    assert "responses_input_ids" in listed.train_dataset.column_names
    for name in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/rejected", "entropy"):
        np.testing.assert_allclose(logged(listed, name), logged(pairs, name), rtol=2e-5, atol=1e-6, err_msg=name)
    if pairwise["mallows"] != "none":
        np.testing.assert_allclose(listed.train_dataset["neg_log_phi"], pairs.train_dataset["neg_log_phi"], rtol=1e-5)
    assert logged(listed, "rewards/kendall_tau")  # the ranking accuracy is logged


def test_online_reference_gives_the_precomputed_loss(tiny_lm_dir, ragged, tmp_path, mallowspo_cache):
    def trainer(**overrides):
        return MallowsPOTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
            args=config(tmp_path, objective="all_pairs", mallows="none", **overrides),
            train_dataset=ragged,
            processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
        )

    cached, online = trainer(), trainer(precompute_ref_log_probs=False)
    assert online.ref_model is not None and "ref_logps" not in online.train_dataset.column_names
    batch = next(iter(cached.get_train_dataloader()))
    with torch.no_grad():
        for model in (cached.model, online.model):
            torch.manual_seed(1)
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    loss_cached, out_cached = cached.compute_loss(cached.model, batch, return_outputs=True)
    del batch["ref_logps"]
    loss_online, out_online = online.compute_loss(online.model, batch, return_outputs=True)
    assert out_cached.kendall_tau.abs().max() > 0
    torch.testing.assert_close(loss_online, loss_cached, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_online.rewards, out_cached.rewards, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_padding_free_lists_give_the_padded_loss(tiny_lm_dir, ragged, tmp_path, mallowspo_cache):
    def first_loss(padding_free):
        trainer = MallowsPOTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_lm_dir, attn_implementation="sdpa"),
            args=config(tmp_path, objective="plackett_luce", mallows="theta", padding_free=padding_free),
            train_dataset=ragged,
            processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
        )
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("cu_seq_lens" in batch) == padding_free
        with torch.no_grad():
            torch.manual_seed(1)
            for p in trainer.model.parameters():
                p.add_(0.01 * torch.randn_like(p))
            return trainer.compute_loss(trainer.model, batch, return_outputs=True)[1].losses

    torch.testing.assert_close(first_loss(True), first_loss(False), rtol=1e-5, atol=1e-6)


def test_listwise_settings_are_checked_in_one_line(tmp_path, caplog):
    with pytest.raises(
        ValueError, match="objective must be one of 'pairwise', 'plackett_luce', 'all_pairs', got 'pl'"
    ):
        config(tmp_path, objective="pl")
    with pytest.raises(
        ValueError, match="objective='plackett_luce' supports loss_type='sigmoid' with mallows 'none' or 'theta'"
    ):
        config(tmp_path, objective="plackett_luce", mallows="phi")
    with pytest.raises(
        ValueError, match=r"objective='all_pairs' trains on one preference term, got loss_type=\['sigmoid', 'sft'\]"
    ):
        config(tmp_path, objective="all_pairs", loss_type=["sigmoid", "sft"])
    with pytest.raises(ValueError, match="listwise_top_k must be an integer >= 1 or null, got 0"):
        config(tmp_path, objective="plackett_luce", mallows="theta", listwise_top_k=0)
    with pytest.raises(ValueError, match="ultrafeedback_score must be one of"):
        config(tmp_path, ultrafeedback_score="overall")
    with caplog.at_level(logging.WARNING):
        config(tmp_path, objective="all_pairs", binarize="best_random", listwise_top_k=2)
    assert "binarize='best_random' is ignored" in caplog.text and "listwise_top_k=2 is ignored" in caplog.text


def test_top_k_keeps_the_first_stages(tiny_lm_dir, ragged, tmp_path, mallowspo_cache):
    def first_loss(**overrides):
        trainer = MallowsPOTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
            args=config(tmp_path, objective="plackett_luce", mallows="none", **overrides),
            train_dataset=ragged,
            processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
        )
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            torch.manual_seed(1)
            for p in trainer.model.parameters():
                p.add_(0.01 * torch.randn_like(p))
            return trainer.compute_loss(trainer.model, batch, return_outputs=True)[1].losses

    whole, top1, top9 = first_loss(), first_loss(listwise_top_k=1), first_loss(listwise_top_k=9)
    torch.testing.assert_close(top9, whole)  # more stages than any list has: the whole rankings
    assert not torch.allclose(top1, whole)


# ----------------------------------------------------------------------------------------
# End to end: the built-in world's lists
# ----------------------------------------------------------------------------------------


def test_listwise_training_on_the_world_lists_learns_the_held_out_rankings(tmp_path, mallowspo_cache):
    from mallowspo.experiments.world import ensure_world

    world = ensure_world()
    train = load_preference_dataset(str(world.train_lists_file)).select(range(240))
    test = load_preference_dataset(str(world.test_lists_file)).select(range(64))
    args = config(
        tmp_path,
        objective="plackett_luce",
        mallows="theta",
        max_steps=30,
        logging_steps=10,
        max_length=64,
        max_prompt_length=None,
    )
    trainer = MallowsPOTrainer(
        AutoModelForCausalLM.from_pretrained(world.model_dir),
        args=args,
        train_dataset=train,
        eval_dataset=test,
        processing_class=AutoTokenizer.from_pretrained(world.model_dir),
    )
    assert sorted(set(len(r) for r in trainer.eval_dataset["responses_input_ids"])) == [2, 3, 4]
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_rewards/kendall_tau"] == 0.0  # the policy is the reference: every implicit reward is 0
    assert after["eval_rewards/kendall_tau"] > 0.2, after
    assert after["eval_rewards/accuracies"] > 0.6 and after["eval_rewards/margins"] > 0
