"""Plain-torch baselines of the benchmark (not part of the library).

- ``naive_step``: MallowsPO-theta as the authors' code does it. Every step runs the
  policy and the reference with full logits, takes a full float32 ``log_softmax`` of both
  (batch x length x vocab), and recomputes the reference's full-vocabulary entropy from
  those logits to get the dispersion; the loss is ``mallowspo.losses.preference_loss``.
- ``floor_step``: the bare cost of training on the same concatenated batch: one forward
  and backward of the policy with the model's own cross-entropy loss on the completion
  tokens, then the same gradient clipping and AdamW step as the trainers.
"""

from __future__ import annotations

import contextlib

import torch

from mallowspo.dispersion import mean_completion_entropy, neg_log_phi_from_entropy, normalized_entropy
from mallowspo.losses import preference_loss

DISPERSION_CLAMP = (0.05, 20.0)  # mallowspo's default bounds on -log phi(x), applied alike here
MAX_GRAD_NORM = 1.0  # TrainingArguments' default, used by every system


def autocast_context(device: str, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW as ``TrainingArguments(optim="adamw_torch", weight_decay=0.0)`` builds it."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )


def _optimizer_step(model, optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor):
    """Full float32 log-softmax over the vocabulary, then the summed completion log-probs."""
    log_probs = logits[:, :-1].float().log_softmax(-1)  # (2B, T-1, V) materialised
    token_logps = log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), log_probs


def naive_step(policy, ref, batch, optimizer, *, beta: float, phi_star: float, vocab_size: int, autocast) -> float:
    """One MallowsPO-theta training step the naive way; returns the loss."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    mask = batch["completion_mask"][:, 1:].float()
    with autocast:
        logits = policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    policy_logps, _ = _completion_logps(logits, input_ids, mask)

    with torch.no_grad():
        with autocast:
            ref_logits = ref(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        ref_logps, ref_log_probs = _completion_logps(ref_logits, input_ids, mask)
        token_entropy = -(ref_log_probs.exp() * ref_log_probs).sum(-1)  # (2B, T-1), every step
        chosen_entropy, rejected_entropy = mean_completion_entropy(token_entropy, mask).chunk(2)
        hbar = normalized_entropy(chosen_entropy, rejected_entropy, vocab_size)
        neg_log_phi = neg_log_phi_from_entropy(hbar, phi_star).clamp(*DISPERSION_CLAMP)

    policy_chosen, policy_rejected = policy_logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    out = preference_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        loss_type="sigmoid",
        beta=beta,
        mallows="theta",
        neg_log_phi=neg_log_phi,
    )
    loss = out.losses.mean()
    loss.backward()
    _optimizer_step(policy, optimizer)
    return loss.detach()


def floor_step(policy, batch, optimizer, *, autocast) -> float:
    """Forward + backward of the policy with plain cross-entropy on the completion tokens, + AdamW."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with autocast:
        loss = policy(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, use_cache=False
        ).loss
    loss.backward()
    _optimizer_step(policy, optimizer)
    return loss.detach()
