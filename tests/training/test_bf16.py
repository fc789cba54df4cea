"""bf16 on CPU, end to end: ``bf16=True`` with ``use_cpu=True`` runs under transformers' autocast.

What is checked, on the tiny fixtures:

- the completion head under bf16 autocast against an exact float64 head on the same float32
  inputs, within a bound derived from bf16's rounding (``bf16_head_bounds``), values and gradients;
- the patched model under autocast against the float32 model, within the same bound widened by
  the backbone's own bf16 deviation of the hidden states (measured);
- the reference pass under ``mixed_precision="bf16"`` (it really runs in bf16, agrees with the
  float32 pass within those bounds, and has its own cache entry);
- the losses: computed in float32 (the phi link in float64 inside), whatever autocast does;
- a short bf16 training run that learns (loss falls, margins grow), evaluation, and saving
  (the saved weights are the model's float32 master weights).

The bound. bf16 keeps 8 significant bits: rounding a number changes it by at most 2^-9 of its
size. The head computes z_v = h . w_v + b_v from bf16-rounded h, w_v and b_v, accumulates in
float32 and rounds z_v to bf16 (autocast's ``mm``), then does the log-sum-exp in float32. So

    |dz_v| <= eps_v = U (sum_i |h_i w_vi| + |b_v| + |z_v|),   U = 2^-8

(2^-8 covers rounding both factors of each product; the bias and output roundings are 2^-9
terms, so U over-covers them and the float32 accumulation, K 2^-24 relative). With t the target,
log p_t = z_t - logsumexp(z) and logsumexp moves by at most max|dz|, so

    |d log p_t| <= 2 max_v eps_v;
    H = logsumexp(z) - E_p z, dH = -Cov_p(z, dz), so |dH| <= 2 max_v eps_v E_p|z - E_p z|   (first order).

The bounds are worst cases: the errors seen here are 5-10x below them, and 100x above float32's.
What they do not cover, a reduction in bf16 (log-probs summed over a sequence: bf16 spacing at
100 nats is 0.5), is checked by dtype: every sum is float32.
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from mallowspo.links import log_smoothed_phi_link
from mallowspo.losses import preference_loss
from mallowspo.testing.tiny import tiny_run_settings
from mallowspo.training.collate import PreferenceCollator
from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.data import PreferenceDataConfig, load_preference_dataset, prepare_preference_dataset
from mallowspo.training.head import add_completion_head, completion_scores
from mallowspo.training.reference import compute_reference_columns
from mallowspo.training.scoring import score_completions
from mallowspo.training.trainer import MallowsPOTrainer

torch.set_num_threads(1)

U = 2.0**-8  # see the module docstring
FP32_SLACK = 1e-5  # the float32 log-sum-exp after the bf16 projection
DATA_CONFIG = PreferenceDataConfig(max_length=48, max_prompt_length=24)
HEAD_SCALE = 8.0  # the random-init head's logits are ~0.1 wide; x8 makes them peaked, so rounding shows


def bf16_autocast(enabled: bool = True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


@contextmanager
def fresh_accelerator_state():
    """accelerate keeps one process-wide state, and an ``Accelerator()`` that names no precision takes the
    last one's: start from a clean state and leave one, so no later test inherits bf16."""
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def exact_scores(hidden, weight, bias, targets):
    """log p(target), the entropy, the logits and softmax in float64 from the same inputs."""
    z = hidden.double() @ weight.double().t() + (bias.double() if bias is not None else 0.0)
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    return log_p.gather(1, targets[:, None]).squeeze(1), -(p * log_p).sum(-1), z, p


def bf16_head_bounds(hidden, weight, bias, targets, hidden_error=None):
    """(rows,) bounds on |d log p_t| and |dH| of the head in bf16 (module docstring), and eps (rows, V).

    ``hidden_error`` (rows, H): a known deviation of the hidden states themselves (the backbone's
    bf16 rounding), which moves z_v by at most sum_i |dh_i w_vi| more."""
    with torch.no_grad():
        h, w = hidden.double(), weight.double()
        _, _, z, p = exact_scores(hidden, weight, bias, targets)
        eps = U * (h.abs() @ w.abs().t() + z.abs())
        if bias is not None:
            eps = eps + U * bias.double().abs()
        if hidden_error is not None:
            eps = eps + hidden_error.double().abs() @ w.abs().t()
        max_eps = eps.amax(dim=-1)
        spread = (p * (z - (p * z).sum(-1, keepdim=True)).abs()).sum(-1)  # E_p |z - E_p z|
        return 2 * max_eps + FP32_SLACK, 2 * max_eps * spread + FP32_SLACK, eps


# ---- the head --------------------------------------------------------------------------------------


def head_inputs(rows=37, hidden_size=64, vocab=512, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden_size, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden_size, generator=g) * 0.5).requires_grad_()  # logits ~ N(0, 16): peaked
    b = torch.randn(vocab, generator=g).requires_grad_() if bias else None
    return h, w, b, torch.randint(vocab, (rows,), generator=g)


@pytest.mark.parametrize("bias", [True, False])
def test_head_in_bf16_is_within_the_rounding_bound_of_the_exact_head(bias):
    h, w, b, t = head_inputs(bias=bias)
    with bf16_autocast():
        scores = completion_scores(h, w, b, t, ("entropy",))
    with torch.no_grad():
        fp32 = completion_scores(h, w, b, t, ("entropy",))
    assert scores.log_probs.dtype == torch.float32 and scores.entropy.dtype == torch.float32
    exact_log_p, exact_entropy, _, _ = exact_scores(h, w, b, t)
    log_p_bound, entropy_bound, _ = bf16_head_bounds(h, w, b, t)
    log_p_error = (scores.log_probs.double() - exact_log_p).abs()
    entropy_error = (scores.entropy.double() - exact_entropy).abs()
    assert bool((log_p_error <= log_p_bound).all()), (log_p_error - log_p_bound).max()
    assert bool((entropy_error <= entropy_bound).all()), (entropy_error - entropy_bound).max()
    # bf16 really was used (errors far above float32's), and float32 stays float32-exact
    assert log_p_error.max() > 1e-4
    torch.testing.assert_close(fp32.log_probs.double(), exact_log_p.detach(), rtol=1e-5, atol=1e-5)


def test_head_gradients_in_bf16_are_within_the_rounding_bound():
    """d log p_t / dz = onehot(t) - p. The rounded logits move p_v by at most p_v (e^(2 eps) - 1), so a
    row of the logits gradient (weight g) moves by at most |g| (e^(2 max eps) - 1) in L1. The weight
    gradient is then a float32 product; the hidden gradient a bf16 one (operands and result rounded)."""
    h, w, b, t = head_inputs(bias=False, rows=29)
    g = torch.randn(h.size(0), generator=torch.Generator().manual_seed(1))
    with bf16_autocast():
        log_p = completion_scores(h, w, None, t).log_probs
    grad_h, grad_w = torch.autograd.grad((log_p * g).sum(), (h, w))
    assert grad_h.dtype == torch.float32 and grad_w.dtype == torch.float32  # master weights' dtype

    exact_log_p = exact_scores(h, w, None, t)[0]
    exact_h, exact_w = torch.autograd.grad((exact_log_p * g.double()).sum(), (h, w))
    _, _, eps = bf16_head_bounds(h, w, None, t)
    with torch.no_grad():
        p = exact_scores(h, w, None, t)[3]
        grad_logits = -g.double()[:, None] * p
        grad_logits[torch.arange(h.size(0)), t] += g.double()
        row_error = g.double().abs() * torch.expm1(2 * eps.amax(-1))  # L1 of the logits-gradient error, per row
        w_norms = w.double().norm(dim=1)
        # ||sum_r a_r h_r^T||_F <= sum_r ||a_r||_1 ||h_r||_2
        weight_bound = (row_error * h.double().norm(dim=1)).sum()
        # per row: ||dgl_r @ W|| <= sum_v |dgl_rv| ||w_v||, plus bf16 operands (2^-8 relative) and output (2^-9)
        hidden_bound = row_error * w_norms.max() + U * (grad_logits.abs() @ w_norms) + U * exact_h.norm(dim=1)
    assert (grad_w.double() - exact_w).norm() <= weight_bound
    assert bool(((grad_h.double() - exact_h).norm(dim=1) <= hidden_bound + FP32_SLACK).all())


# ---- the patched model and the reference pass --------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    return AutoTokenizer.from_pretrained(tiny_lm_dir)


@pytest.fixture(scope="module")
def pairs(tiny_prefs_path, tokenizer):
    raw = load_preference_dataset(str(tiny_prefs_path)).select(range(8))
    return prepare_preference_dataset(raw, tokenizer, DATA_CONFIG)[0]


@pytest.fixture(scope="module")
def peaked_model(tiny_lm_dir):
    """The tiny model with its (tied) head scaled, so that next-token distributions are peaked."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_SCALE)
    add_completion_head(model)
    return model.eval()


def token_bounds(model, batch):
    """Per scored position: the bounds of the model in bf16 against the float32 model, with the
    hidden states' own bf16 deviation (measured) added to the head's; and the scored mask."""
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        hidden = model.base_model(**inputs).last_hidden_state[:, :-1]
        with bf16_autocast():
            hidden_bf16 = model.base_model(**inputs).last_hidden_state[:, :-1]
    mask = batch["completion_mask"][:, 1:].bool()
    head = model.get_output_embeddings()
    targets = batch["input_ids"][:, 1:][mask]
    log_p_bound, entropy_bound, _ = bf16_head_bounds(
        hidden[mask], head.weight, head.bias, targets, hidden_error=(hidden_bf16 - hidden)[mask]
    )
    return log_p_bound, entropy_bound, mask


def test_patched_model_in_bf16_is_within_the_bound_of_the_float32_model(peaked_model, pairs, tokenizer):
    batch = PreferenceCollator(tokenizer.pad_token_id)([pairs[i] for i in range(len(pairs))])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    seen = []
    hook = peaked_model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        with torch.no_grad():
            fp32 = peaked_model(**inputs, completion_head=True, with_entropy=True)
            with bf16_autocast():
                bf16 = peaked_model(**inputs, completion_head=True, with_entropy=True)
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]  # the backbone ran in bf16 under autocast
    assert bf16.log_probs.dtype == torch.float32 and bf16.entropy.dtype == torch.float32
    log_p_bound, entropy_bound, mask = token_bounds(peaked_model, batch)
    log_p_error = (bf16.log_probs - fp32.log_probs)[mask].double().abs()
    entropy_error = (bf16.entropy - fp32.entropy)[mask].double().abs()
    assert bool((log_p_error <= log_p_bound).all()), (log_p_error - log_p_bound).max()
    assert bool((entropy_error <= entropy_bound).all()), (entropy_error - entropy_bound).max()

    # Summed per sequence in float32 (a bf16 sum of ~100 nats would lose whole nats).
    with torch.no_grad(), bf16_autocast():
        scores = score_completions(peaked_model, batch, with_entropy=True)
    assert scores.logps.dtype == torch.float32 and scores.mean_entropy.dtype == torch.float32


def test_reference_pass_in_bf16(peaked_model, pairs, tokenizer):
    collator = PreferenceCollator(tokenizer.pad_token_id)
    vocab = peaked_model.config.vocab_size
    seen = []
    hook = peaked_model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        with fresh_accelerator_state():
            fp32 = compute_reference_columns(peaked_model, pairs, collator, Accelerator(cpu=True), 8, vocab)
        with fresh_accelerator_state():
            bf16 = compute_reference_columns(
                peaked_model, pairs, collator, Accelerator(cpu=True, mixed_precision="bf16"), 8, vocab
            )
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    # Per sequence: the sum (log-probs) and mean (entropies) of the per-token bounds.
    batch = collator([pairs[i] for i in range(len(pairs))])
    log_p_bound, entropy_bound, mask = token_bounds(peaked_model, batch)
    rows = torch.arange(mask.size(0))[:, None].expand_as(mask)[mask]
    seq_log_p_bound = torch.zeros(mask.size(0), dtype=torch.float64).index_add(0, rows, log_p_bound)
    seq_entropy_bound = torch.zeros(mask.size(0), dtype=torch.float64).index_add(0, rows, entropy_bound)
    seq_entropy_bound = seq_entropy_bound / mask.sum(1)
    n = len(pairs)
    for side, sl in (("chosen", slice(0, n)), ("rejected", slice(n, 2 * n))):
        for column, bound in (("logps", seq_log_p_bound[sl]), ("entropy", seq_entropy_bound[sl])):
            name = f"ref_{side}_{column}"
            error = torch.as_tensor(bf16[name] - fp32[name]).abs()
            assert bf16[name].dtype == fp32[name].dtype  # float64 columns either way
            assert bool((error <= bound).all()), (name, error, bound)


def test_losses_are_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    logps = [(-100 * torch.rand(6, generator=g)).requires_grad_() for _ in range(4)]
    neg_log_phi = 0.2 + torch.rand(6, generator=g)
    for mallows in ("none", "theta", "phi"):
        expected = preference_loss(*logps, mallows=mallows, neg_log_phi=neg_log_phi)
        with bf16_autocast():
            out = preference_loss(*logps, mallows=mallows, neg_log_phi=neg_log_phi)
        for field in ("losses", "chosen_rewards", "rejected_rewards", "margins"):
            value = getattr(out, field)
            assert value.dtype == torch.float32, (mallows, field)
            torch.testing.assert_close(value, getattr(expected, field), rtol=0, atol=0)
        out.losses.sum().backward()
        assert all(x.grad.dtype == torch.float32 and bool(torch.isfinite(x.grad).all()) for x in logps[:2])
    # the phi link itself: float64 inside, the input's dtype out, untouched by autocast
    z = torch.linspace(-3, 3, 13)
    with bf16_autocast():
        inside = log_smoothed_phi_link(z, torch.full((13,), 0.7))
    torch.testing.assert_close(inside, log_smoothed_phi_link(z, torch.full((13,), 0.7)), rtol=0, atol=0)
    assert inside.dtype == torch.float32


# ---- the trainer ---------------------------------------------------------------------------------------


def bf16_config(tmp_path, **overrides) -> MallowsPOConfig:
    fields = dict(
        output_dir=str(tmp_path / "out"),
        bf16=True,
        use_cpu=True,
        max_steps=20,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        logging_steps=5,
        learning_rate=5e-3,  # high: 20 steps must move the metrics
        mallows="phi",
        eval_strategy="no",
    )
    return MallowsPOConfig(**tiny_run_settings(**{**fields, **overrides}))


@pytest.fixture(scope="module")
def trained(tiny_lm_dir, tiny_prefs_path, tmp_path_factory):
    """A 20-step bf16 run (phi) on 32 pairs, evaluated on 16 others and saved."""
    tmp_path = tmp_path_factory.mktemp("bf16_run")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("MALLOWSPO_CACHE", str(tmp_path / "cache"))
    raw = load_preference_dataset(str(tiny_prefs_path))
    state = fresh_accelerator_state()
    state.__enter__()
    trainer = MallowsPOTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
        args=bf16_config(tmp_path),
        train_dataset=raw.select(range(32)),
        eval_dataset=raw.select(range(32, 48)),
        processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
    )
    initial = copy.deepcopy(trainer.model.state_dict())
    seen = []
    hook = trainer.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train()
    hook.remove()
    metrics = trainer.evaluate()
    trainer.save_model()
    yield dict(trainer=trainer, initial=initial, seen=seen, metrics=metrics, out=tmp_path / "out")
    state.__exit__(None, None, None)
    monkeypatch.undo()


def test_bf16_config_runs_under_cpu_autocast(trained):
    trainer = trained["trainer"]
    assert trainer.args.bf16 and trainer.args.use_cpu and trainer.accelerator.mixed_precision == "bf16"
    assert trained["seen"] and set(trained["seen"]) == {torch.bfloat16}  # every training forward in bf16
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights
    batch = next(iter(trainer.get_train_dataloader()))
    with trainer.compute_loss_context_manager():
        loss, output = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert loss.dtype == torch.float32 and output.losses.dtype == torch.float32
    for field in ("losses", "chosen_rewards", "rejected_rewards", "margins"):
        assert getattr(output.preference, field).dtype == torch.float32, field


def test_bf16_training_learns(trained):
    logs = [h for h in trained["trainer"].state.log_history if "loss" in h]
    assert len(logs) == 4 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"] and logs[0]["loss"] < math.log(2)
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] > 0
    assert logs[-1]["rewards/accuracies"] >= logs[0]["rewards/accuracies"]
    changed = [
        k for k, v in trained["trainer"].model.state_dict().items() if not torch.equal(v, trained["initial"][k])
    ]
    assert changed  # the optimizer stepped the float32 weights


def test_bf16_evaluation_and_saving(trained, tiny_lm_dir):
    metrics = trained["metrics"]
    assert math.isfinite(metrics["eval_loss"]) and "eval_rewards/margins" in metrics
    assert "eval_mallows/neg_log_phi_mean" in metrics
    out = trained["out"]
    with safe_open(out / "model.safetensors", framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"F32"}  # the model's dtype (the master weights), not the autocast dtype
    assert json.loads((out / "config.json").read_text()).get("dtype", "float32") == "float32"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    state = trained["trainer"].model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())


def test_bf16_reference_pass_has_its_own_cache_entry(trained, tiny_lm_dir, tiny_prefs_path, tmp_path):
    """The bf16 run's reference columns are not reused by a float32 run (the key holds the precision)."""
    bf16_result = trained["trainer"].reference_results["train"]
    assert not bf16_result.reused
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("MALLOWSPO_CACHE", str(bf16_result.cache_dir.parent.parent))  # <root>/reference/<key>
    try:
        fp32 = MallowsPOTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
            args=bf16_config(tmp_path, bf16=False, max_steps=1),
            train_dataset=load_preference_dataset(str(tiny_prefs_path)).select(range(32)),
            processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
        )
    finally:
        monkeypatch.undo()
    result = fp32.reference_results["train"]
    assert result.cache_dir.parent == bf16_result.cache_dir.parent  # the same cache, another key
    assert not result.reused and result.cache_dir.name != bf16_result.cache_dir.name
