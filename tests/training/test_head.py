"""mallowspo.training.head: the CPU completion head against plain log_softmax (values and gradients),
and the patched model against TRL's fused head and the model's own forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from trl.trainer.utils import add_fused_lm_head

import mallowspo.training.head as head_module
from mallowspo.training.head import _needs_trl_head, add_completion_head, completion_log_probs

torch.set_num_threads(1)


def naive(hidden, weight, bias, targets):
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    log_p = torch.log_softmax(logits, dim=-1)
    return log_p.gather(1, targets[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1)


def inputs(rows=37, hidden_size=16, vocab=101, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden_size, generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden_size, generator=g, dtype=dtype) * 0.5).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_() if bias else None
    t = torch.randint(vocab, (rows,), generator=g)
    return h, w, b, t


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 1000])  # one chunk; many chunks (9 rows each)
def test_values_and_gradients_match_log_softmax(bias, chunk_elements, monkeypatch):
    monkeypatch.setattr(head_module, "ROW_CHUNK_ELEMENTS", chunk_elements)
    h, w, b, t = inputs(bias=bias)
    log_probs, entropy = completion_log_probs(h, w, b, t, with_entropy=True)
    expected_log_probs, expected_entropy = naive(h, w, b, t)
    torch.testing.assert_close(log_probs, expected_log_probs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, expected_entropy.detach(), rtol=1e-12, atol=1e-12)
    assert not entropy.requires_grad  # a statistic, never a training signal
    upstream = torch.randn(h.size(0), dtype=h.dtype)
    params = [x for x in (h, w, b) if x is not None]
    grads = torch.autograd.grad((log_probs * upstream).sum(), params)
    expected = torch.autograd.grad((expected_log_probs * upstream).sum(), params)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradcheck_against_finite_differences():
    h, w, b, t = inputs(rows=5, hidden_size=4, vocab=7)
    assert torch.autograd.gradcheck(lambda h, w, b: completion_log_probs(h, w, b, t)[0], (h, w, b))


def test_without_gradients_nothing_is_kept_and_values_agree():
    h, w, b, t = inputs()
    with torch.no_grad():
        log_probs, entropy = completion_log_probs(h, w, b, t)
    assert entropy is None and log_probs.grad_fn is None
    torch.testing.assert_close(log_probs, naive(h, w, b, t)[0].detach(), rtol=1e-12, atol=1e-12)


def test_backward_twice_with_retain_graph_gives_the_same_gradient():
    h, w, b, t = inputs()
    loss = completion_log_probs(h, w, b, t)[0].sum()
    first = torch.autograd.grad(loss, w, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(loss, w)[0], first, rtol=0, atol=0)


def test_float32_matches_float64_to_rounding():
    h, w, b, t = inputs()
    got, _ = completion_log_probs(h.float(), w.float(), b.float(), t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive(h, w, b, t)[0].detach(), rtol=1e-5, atol=1e-5)


# ---- the patched model -------------------------------------------------------------------


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **overrides,
    )
    return AutoModelForCausalLM.from_config(config).double()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[2, :3] = 0  # a left-padded row
    labels = ids.clone()
    labels[:, :5] = -100  # prompt positions are not scored
    labels[2, :3] = -100
    return dict(input_ids=ids, attention_mask=attention, labels=labels)


def test_patched_model_matches_trl_fused_head_values_and_gradients():
    ours, trl = tiny_llama(), tiny_llama()
    add_completion_head(ours)
    add_fused_lm_head(trl, outputs=("log_probs", "entropy"))
    inputs_ = batch()
    out = ours(**inputs_, completion_head=True, with_entropy=True)
    ref = trl(**inputs_, fused_lm_head=True)
    mask = inputs_["labels"][:, 1:] != -100
    assert out.log_probs.dtype == torch.float64 and ref.log_probs.dtype == torch.float32  # TRL sums in float32
    torch.testing.assert_close(out.log_probs, ref.log_probs.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.entropy, ref.entropy.double(), rtol=1e-6, atol=1e-6)
    assert bool((out.log_probs[~mask] == 0).all()) and bool((out.log_probs[mask] < 0).all())
    out.log_probs.sum().backward()
    ref.log_probs.sum().backward()
    for (name, p), q in zip(ours.named_parameters(), trl.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_patched_model_matches_its_own_logits_and_leaves_generation_alone():
    model = tiny_llama()
    inputs_ = batch()
    with torch.no_grad():
        plain = model(input_ids=inputs_["input_ids"], attention_mask=inputs_["attention_mask"]).logits
        generated = model.generate(inputs_["input_ids"][:1], max_new_tokens=4, do_sample=False)
    add_completion_head(model)
    add_completion_head(model)  # idempotent
    with torch.no_grad():
        out = model(**inputs_, completion_head=True)
        again = model(input_ids=inputs_["input_ids"], attention_mask=inputs_["attention_mask"]).logits
        assert torch.equal(model.generate(inputs_["input_ids"][:1], max_new_tokens=4, do_sample=False), generated)
    assert out.entropy is None
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    targets = inputs_["input_ids"][:, 1:]
    expected = torch.log_softmax(plain[:, :-1], -1).gather(-1, targets[..., None]).squeeze(-1)
    mask = inputs_["labels"][:, 1:] != -100
    torch.testing.assert_close(out.log_probs[mask], expected[mask], rtol=1e-12, atol=1e-12)


def test_models_with_head_quirks_use_trls_head(monkeypatch):
    assert not _needs_trl_head(tiny_llama().config)
    assert _needs_trl_head(LlamaConfig(vocab_size=97, hidden_size=32, num_attention_heads=4, logit_scale=0.5))
    model = tiny_llama()
    monkeypatch.setattr(head_module, "_needs_trl_head", lambda config: True)
    add_completion_head(model)
    calls = []
    monkeypatch.setattr(head_module, "completion_scores", lambda *a, **k: calls.append(1))
    out = model(**batch(), completion_head=True)
    assert not calls and out.log_probs.shape == (3, 11)  # TRL's head answered
