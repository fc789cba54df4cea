"""TRL's DPO metric names: the head's per-token statistics (entropy, mean logit, top-1) against plain
logits, their token-weighted pooling, the trainer's logged ``entropy``, ``logits/chosen``,
``logits/rejected``, ``mean_token_accuracy`` and ``num_tokens`` against an independent computation;
and the MoE router load-balancing loss (``router_aux_loss_coef``) against transformers' own."""

from __future__ import annotations

import copy
import math

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MixtralConfig
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import mallowspo.training.head as head_module
from mallowspo.testing.tiny import tiny_run_settings, train_tokenizer, trl_parity_settings
from mallowspo.training.collate import PreferenceCollator
from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.data import load_preference_dataset
from mallowspo.training.head import add_completion_head, completion_scores
from mallowspo.training.metrics import MetricAccumulator, token_weighted
from mallowspo.training.scoring import score_completions
from mallowspo.training.trainer import MallowsPOTrainer

torch.set_num_threads(1)

TOKEN_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


# ---- the oracle: plain logits of each sequence alone -------------------------------------------


def plain_statistics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row of (rows, vocab) ``logits``: log p(target), entropy, mean logit, whether target is the argmax."""
    log_p = torch.log_softmax(logits, dim=-1)
    return {
        "log_probs": log_p.gather(1, targets[:, None]).squeeze(1),
        "entropy": -(log_p.exp() * log_p).sum(-1),
        "mean_logits": logits.mean(-1),
        "is_top1": logits.argmax(-1) == targets,
    }


def completion_statistics(model, prompt: list[int], completion: list[int]) -> dict[str, torch.Tensor]:
    """``plain_statistics`` of the completion tokens of prompt + completion, from the model's own logits."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]  # position t predicts token t + 1
    scored = slice(len(prompt) - 1, ids.size(1) - 1)
    return plain_statistics(logits[scored].double(), ids[0, 1:][scored])


def expected_metrics(model, rows: list[dict]) -> dict[str, float]:
    """The five TRL metrics of ``rows`` (tokenized pairs) computed directly: token-weighted over all pairs."""
    sums = dict.fromkeys(("entropy", "tokens", "chosen_logits", "chosen_tokens", "rejected_logits", "top1"), 0.0)
    seen = 0
    for row in rows:
        for side in ("chosen", "rejected"):
            completion = list(row[f"{side}_input_ids"])
            stats = completion_statistics(model, list(row["prompt_input_ids"]), completion)
            sums["entropy"] += float(stats["entropy"].sum())
            sums["tokens"] += len(completion)
            seen += len(row["prompt_input_ids"]) + len(completion)
            if side == "chosen":
                sums["chosen_logits"] += float(stats["mean_logits"].sum())
                sums["chosen_tokens"] += len(completion)
                sums["top1"] += float(stats["is_top1"].sum())
            else:
                sums["rejected_logits"] += float(stats["mean_logits"].sum())
    rejected_tokens = sums["tokens"] - sums["chosen_tokens"]
    return {
        "entropy": sums["entropy"] / sums["tokens"],
        "logits/chosen": sums["chosen_logits"] / sums["chosen_tokens"],
        "logits/rejected": sums["rejected_logits"] / rejected_tokens,
        "mean_token_accuracy": sums["top1"] / sums["chosen_tokens"],
        "num_tokens": seen,
    }


# ---- the CPU head -------------------------------------------------------------------------------


def head_inputs(rows=37, hidden_size=16, vocab=101, bias=True, seed=0):
    """float64 rows whose targets are the argmax for every third row (so top-1 is not all False)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden_size, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    t = torch.randint(vocab, (rows,), generator=g)
    logits = (h @ w.t() + (b if bias else 0)).detach()
    t[::3] = logits[::3].argmax(-1)
    return h, w, b, t, logits


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 1000])  # one chunk; many chunks
def test_head_statistics_match_plain_logits(bias, chunk_elements, monkeypatch):
    monkeypatch.setattr(head_module, "ROW_CHUNK_ELEMENTS", chunk_elements)
    h, w, b, t, logits = head_inputs(bias=bias)
    want = plain_statistics(logits, t)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            got = completion_scores(h, w, b, t, ("entropy", "mean_logits", "is_top1"))
        torch.testing.assert_close(got.log_probs.detach(), want["log_probs"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.entropy, want["entropy"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.mean_logits, want["mean_logits"], rtol=1e-12, atol=1e-12)
        assert torch.equal(got.is_top1, want["is_top1"]) and 0 < int(got.is_top1.sum()) < len(t)
        assert not any(x.requires_grad for x in (got.entropy, got.mean_logits, got.is_top1))


def test_head_statistics_leave_the_log_prob_gradient_alone():
    h, w, b, t, _ = head_inputs()
    plain = completion_scores(h, w, b, t).log_probs
    with_statistics = completion_scores(h, w, b, t, ("entropy", "mean_logits", "is_top1")).log_probs
    for got, want in zip(
        torch.autograd.grad(with_statistics.sum(), (h, w, b)), torch.autograd.grad(plain.sum(), (h, w, b))
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unknown_statistic_is_refused():
    h, w, b, t, _ = head_inputs()
    with pytest.raises(ValueError, match="unknown head statistics"):
        completion_scores(h, w, b, t, ("entropies",))


# ---- scoring a batch, both layouts ----------------------------------------------------------------


def tiny_llama(attn_implementation="sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).double()


def random_rows(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(3, 97, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    return [
        dict(prompt_input_ids=ids(2, 7), chosen_input_ids=ids(1, 6), rejected_input_ids=ids(1, 6)) for _ in range(n)
    ]


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """The model's n most likely next tokens after ``prompt``, one at a time."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_scores_carry_the_statistics_of_each_sequence(padding_free):
    model = tiny_llama()
    rows = random_rows()
    for row in rows[:2]:  # greedy chosen completions: their labels are the argmax
        row["chosen_input_ids"] = greedy(model, row["prompt_input_ids"], 4)
    plain = [
        completion_statistics(model, r["prompt_input_ids"], r[side])
        for side in ("chosen_input_ids", "rejected_input_ids")
        for r in rows
    ]
    add_completion_head(model)
    batch = PreferenceCollator(0, padding_free=padding_free)(rows)
    with torch.no_grad():
        scores = score_completions(model, batch, with_entropy=True, with_token_metrics=True)
    want = {
        name: torch.stack([s[name].double().sum() for s in plain])
        for name in ("log_probs", "entropy", "mean_logits", "is_top1")
    }
    lengths = torch.tensor([float(len(s["entropy"])) for s in plain], dtype=torch.float64)
    torch.testing.assert_close(scores.lengths, lengths)
    torch.testing.assert_close(scores.logps, want["log_probs"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scores.mean_entropy, want["entropy"] / lengths, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scores.mean_logit_sums, want["mean_logits"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scores.top1_counts, want["is_top1"], rtol=0, atol=0)
    assert 0 < want["is_top1"].sum() < lengths.sum()
    assert scores.aux_loss is None


def test_trls_head_gives_the_same_statistics(monkeypatch):
    ours, theirs = tiny_llama(), tiny_llama()
    rows = random_rows()
    rows[0]["chosen_input_ids"] = greedy(ours, rows[0]["prompt_input_ids"], 4)
    add_completion_head(ours)
    monkeypatch.setattr(head_module, "_needs_trl_head", lambda config: True)
    add_completion_head(theirs)
    batch = PreferenceCollator(0)(rows)
    scores = [score_completions(m, batch, with_entropy=True, with_token_metrics=True) for m in (ours, theirs)]
    for name in ("logps", "mean_entropy", "mean_logit_sums", "top1_counts"):  # TRL computes in float32
        got, want = getattr(scores[1], name), getattr(scores[0], name)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)
    assert scores[0].top1_counts.sum() > 0


def test_statistics_are_only_computed_when_asked_for():
    model = tiny_llama()
    add_completion_head(model)
    scores = score_completions(model, PreferenceCollator(0)(random_rows()))
    assert scores.mean_logit_sums is None and scores.top1_counts is None and not bool(scores.mean_entropy.any())


# ---- pooling ----------------------------------------------------------------------------------------


def test_token_weighted_metrics_pool_tokens_not_batches():
    """Three micro-batches (two of them gathered from two processes, say): the pooled value is the
    sum over every token divided by the number of tokens, not a mean of per-batch means."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(n, generator=g), torch.randint(0, 9, (n,), generator=g).double()) for n in (3, 5, 2)]
    batches[1][1][0] = 0.0  # a pair without completion tokens
    acc = MetricAccumulator()
    for per_pair_sums, tokens in batches:
        columns = token_weighted("entropy", per_pair_sums * tokens, tokens) | {"rewards/margins": per_pair_sums}
        acc.update(list(columns), torch.stack(list(columns.values()), dim=1))
    acc.set("num_tokens", 41)
    sums = torch.cat([s * n for s, n in batches])
    tokens = torch.cat([n for _, n in batches])
    popped = acc.pop()
    assert set(popped) == {"entropy", "rewards/margins", "num_tokens"}  # the hidden columns are not logged
    assert popped["entropy"] == pytest.approx(float(sums.sum() / tokens.sum()), rel=1e-6)
    per_batch = sum(float((s * n).sum() / n.sum()) for s, n in batches) / len(batches)
    assert abs(popped["entropy"] - per_batch) > 1e-3  # what averaging step means would have logged
    assert popped["rewards/margins"] == pytest.approx(float(torch.cat([s for s, _ in batches]).mean()), rel=1e-6)
    assert popped["num_tokens"] == 41
    assert acc.pop() == {}


def test_no_tokens_logs_zero_as_trl():
    acc = MetricAccumulator()
    columns = token_weighted("mean_token_accuracy", torch.zeros(2), torch.zeros(2))
    assert acc.update(list(columns), torch.stack(list(columns.values()), dim=1)) is not None
    assert acc.pop() == {"mean_token_accuracy": 0.0}


# ---- the trainer's logs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_data(tiny_prefs_path):
    return load_preference_dataset(str(tiny_prefs_path)).select(range(16))


def trainer_for(model_dir, raw_data, tmp_path, eval_data=None, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, max_steps=1, logging_steps=1, mallows="none"
    )
    return MallowsPOTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=MallowsPOConfig(**tiny_run_settings(**{**settings, **overrides})),
        train_dataset=raw_data,
        eval_dataset=eval_data,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_first_step_logs_trls_token_metrics(tiny_lm_dir, raw_data, tmp_path, mallowspo_cache, padding_free):
    """One step over all 16 pairs: its metrics are those of the initial weights on the whole split."""
    trainer = trainer_for(tiny_lm_dir, raw_data, tmp_path, padding_free=padding_free)
    initial = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)  # the trainer's initial weights
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    trainer.train()
    (log,) = train_logs(trainer)
    want = expected_metrics(initial, rows)
    for name in TOKEN_METRICS:
        assert log[name] == pytest.approx(want[name], rel=1e-5, abs=1e-5), name
    assert log["num_tokens"] == want["num_tokens"]
    assert "aux_loss" not in log  # a dense model


def test_pooled_over_accumulation_and_steps_and_num_tokens_is_cumulative(
    tiny_lm_dir, raw_data, tmp_path, mallowspo_cache
):
    """Weights that do not move (SGD, learning rate 1e-30): four micro-batches of 4 pairs (2 steps of 2, one log) pool to the whole split's
    token-weighted values; num_tokens counts every real token so far, in train and eval logs."""
    trainer = trainer_for(
        tiny_lm_dir,
        raw_data,
        tmp_path,
        eval_data=raw_data.select(range(6)),
        learning_rate=1e-30,
        optim="sgd",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
    )
    initial = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)  # the trainer's initial weights
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    eval_rows = [trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))]
    trainer.train()
    first, second = train_logs(trainer)
    want = expected_metrics(initial, rows)  # the first log pooled the 16 pairs of epoch 1
    for name in TOKEN_METRICS:
        assert first[name] == pytest.approx(want[name], rel=1e-5, abs=1e-5), name
    assert first["num_tokens"] == want["num_tokens"] and second["num_tokens"] == 2 * want["num_tokens"]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [e["eval_num_tokens"] for e in evals] == [want["num_tokens"], 2 * want["num_tokens"]]
    want_eval = expected_metrics(initial, eval_rows)
    for name in TOKEN_METRICS:
        assert evals[0][f"eval_{name}"] == pytest.approx(want_eval[name], rel=1e-5, abs=1e-5), name


# ---- the MoE load-balancing loss ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, tiny_prefs_path):
    """A random-init tiny Mixtral (4 experts, top 2, its config's router_aux_loss_coef 0.02) with a BPE tokenizer."""
    rows = [r for r in load_preference_dataset(str(tiny_prefs_path))]
    tokenizer = train_tokenizer([r["prompt"] + " " + r[s] for r in rows for s in ("chosen", "rejected")], 512)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_moe")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def independent_aux_loss(model, batch) -> torch.Tensor:
    """transformers' load-balancing loss on router logits of a plain forward of the padded batch."""
    config = model.config
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    return load_balancing_loss_func(
        out.router_logits, config.num_local_experts, config.num_experts_per_tok, batch["attention_mask"]
    )


def test_moe_head_requests_router_logits_only_for_the_aux_loss(tiny_moe_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_dir)
    model.config.output_router_logits = True  # even when the config asks for them
    plain = copy.deepcopy(model)
    add_completion_head(model)
    batch = PreferenceCollator(0)(random_rows_for(AutoTokenizer.from_pretrained(tiny_moe_dir)))
    assert score_completions(model, batch).aux_loss is None
    with_aux = score_completions(model, batch, with_aux_loss=True)
    torch.testing.assert_close(with_aux.aux_loss.detach(), independent_aux_loss(plain, batch), rtol=1e-6, atol=1e-7)
    assert with_aux.aux_loss.requires_grad  # it trains the routers
    torch.testing.assert_close(with_aux.logps, score_completions(model, batch).logps, rtol=1e-5, atol=1e-5)


def random_rows_for(tokenizer, n=3):
    texts = ["the sky is blue", "a prime number", "the sun and the sea", "capital of France", "fine, thanks"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [
        dict(prompt_input_ids=ids[i], chosen_input_ids=ids[i + 1], rejected_input_ids=ids[i + 2]) for i in range(n)
    ]


@pytest.mark.parametrize("coef", [None, 0.5])
def test_moe_loss_adds_the_weighted_load_balancing_loss(tiny_moe_dir, raw_data, tmp_path, mallowspo_cache, coef):
    trainer = trainer_for(tiny_moe_dir, raw_data, tmp_path / "a", router_aux_loss_coef=coef)
    dense_loss = trainer_for(tiny_moe_dir, raw_data, tmp_path / "b", router_aux_loss_coef=0.0)
    batch = next(iter(trainer.get_train_dataloader()))
    plain = AutoModelForCausalLM.from_pretrained(tiny_moe_dir)
    want_aux = independent_aux_loss(plain, batch)
    weight = 0.02 if coef is None else coef  # None: the model config's own coefficient
    trainer.model.train()
    dense_loss.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    preference = dense_loss.compute_loss(dense_loss.model, batch)
    torch.testing.assert_close(loss.detach(), preference.detach() + weight * want_aux, rtol=1e-5, atol=1e-6)
    assert trainer._metrics["train"].pop()["aux_loss"] == pytest.approx(float(want_aux), rel=1e-5)
    assert "aux_loss" not in dense_loss._metrics["train"].pop()  # coef 0: off, and not logged
    trainer.train()
    assert train_logs(trainer)[0]["aux_loss"] == pytest.approx(float(want_aux), rel=1e-5)  # step 1: initial weights


def test_moe_reference_forward_does_not_request_router_logits(tiny_moe_dir, raw_data, tmp_path, mallowspo_cache):
    trainer = trainer_for(tiny_moe_dir, raw_data, tmp_path, precompute_ref_log_probs=False)
    calls = []
    forward = trainer.ref_model.forward
    trainer.ref_model.forward = lambda *a, **k: calls.append(k.get("with_aux_loss")) or forward(*a, **k)
    trainer.train()
    assert calls and not any(calls)
    assert "aux_loss" in train_logs(trainer)[0]


def test_aux_loss_coef_on_a_dense_model_is_refused(tiny_lm_dir, raw_data, tmp_path):
    with pytest.raises(ValueError, match="is not a Mixture-of-Experts model"):
        trainer_for(tiny_lm_dir, raw_data, tmp_path, router_aux_loss_coef=0.1)
    trainer_for(tiny_lm_dir, raw_data, tmp_path / "zero", router_aux_loss_coef=0.0)  # 0 is accepted


def test_moe_first_step_matches_trl_dpo(tiny_moe_dir, raw_data, tmp_path, mallowspo_cache):
    from trl import DPOConfig, DPOTrainer

    common = trl_parity_settings(per_device_train_batch_size=8, max_steps=2, router_aux_loss_coef=0.3)
    raw = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in raw_data])
    tokenizer = AutoTokenizer.from_pretrained(tiny_moe_dir)
    trl = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_moe_dir),
        args=DPOConfig(output_dir=str(tmp_path / "trl"), **common),
        train_dataset=raw,
        processing_class=tokenizer,
    )
    ours = MallowsPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_moe_dir),
        args=MallowsPOConfig(output_dir=str(tmp_path / "ours"), mallows="none", max_prompt_length=None, **common),
        train_dataset=raw,
        processing_class=tokenizer,
    )
    trl.train()
    ours.train()
    trl_logs, our_logs = train_logs(trl), train_logs(ours)
    assert len(trl_logs) == len(our_logs) == 2
    for name in ("loss", "aux_loss", *TOKEN_METRICS, "num_tokens", "rewards/margins"):
        for t, o in zip(trl_logs, our_logs):
            assert o[name] == pytest.approx(t[name], rel=1e-3, abs=1e-3), name
    assert not math.isclose(our_logs[0]["loss"], our_logs[1]["loss"])  # the run moved
