"""The completion head: per-token log-probs (and, on request, entropy) of a causal LM's
labels without building (batch, length, vocab) logits for the whole batch.

``add_completion_head(model)`` patches ``model.forward`` once. Called with
``completion_head=True`` and ``labels`` (-100 where a position is not scored), the forward
runs the backbone and returns a ``trl.trainer.utils.FusedCausalLMOutput`` whose
``log_probs`` (and ``entropy`` when ``with_entropy=True``) score token t + 1 at position t.
Without ``completion_head`` the forward is the model's own, so ``generate`` is unchanged.

Two implementations, chosen per call from where the LM head's weight lives:

- On CUDA/XPU with Triton, TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``):
  Triton kernels over vocabulary tiles, only the scored positions, nothing of size
  (tokens, vocab) kept. It also covers every model-family quirk TRL knows (logit
  soft-capping and scaling, FSDP2 DTensor heads, MoE load-balancing loss); models with
  one of those use it on every device.
- Elsewhere (CPU), ``completion_log_probs``: the scored positions only, projected in row
  chunks with one matrix product, then one max / exp / sum pass shared by the log-probs
  and the entropy. For the backward it keeps exp(z - max) of the scored rows, (scored
  tokens, vocab) in float32, so the gradient costs two matrix products and no
  recomputation. TRL's head without Triton scores every position, prompt included, and
  recomputes the projection in its backward; on CPU it is about 2.5x slower than plain
  logits (benchmarks/README.md, docs/design.md).

The entropy is only computed when asked for (the reference pass needs it for the
dispersion; a training step does not) and never carries a gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers.utils import is_triton_available
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

ROW_CHUNK_ELEMENTS = 1 << 23  # rows x vocab per projection chunk: 32 MiB of float32 buffers (reused, not re-faulted)
_PATCHED = "_mallowspo_completion_head"


# ---------------------------------------------------------------------------------------
# The CPU head: log p(target) of rows of hidden @ weight.T + bias
# ---------------------------------------------------------------------------------------


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of the projection: autocast's when it is on, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _softmax_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of the log-sum-exp and the outputs: at least float32 (float64 stays float64)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _score_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    with_entropy: bool,
    for_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs of ``targets`` and (optionally) entropies of every row, in row chunks; no autograd.

    Per row, with z the logits and m their maximum: e = exp(z - m), S = sum e,
    log p_t = z_t - m - log S and H = log S - sum(e (z - m)) / S. With ``for_backward`` the
    unnormalised ``e`` (rows, vocab) and ``1 / S`` (rows,) are returned too: the softmax is
    e / S, and the backward scales ``e`` once instead of normalising it here."""
    rows, vocab = hidden.size(0), weight.size(0)
    dtype, exact = _compute_dtype(hidden), _softmax_dtype(hidden)
    weight_t = weight.to(dtype).t()
    bias = bias.to(dtype) if bias is not None else None
    log_probs = hidden.new_empty(rows, dtype=exact)
    entropy = hidden.new_empty(rows, dtype=exact) if with_entropy else None
    exps = hidden.new_empty(rows, vocab, dtype=exact) if for_backward else None
    inv_total = hidden.new_empty(rows, dtype=exact) if for_backward else None
    step = max(1, min(rows, ROW_CHUNK_ELEMENTS // max(vocab, 1)))
    # Chunk buffers allocated once: a fresh (step, vocab) tensor per chunk costs page faults on CPU.
    logits_buffer = hidden.new_empty(step, vocab, dtype=dtype)
    exp_buffer = hidden.new_empty(step, vocab, dtype=exact) if with_entropy and exps is None else None
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        h = hidden[lo:hi].to(dtype)
        out = logits_buffer[: hi - lo]
        logits = (torch.addmm(bias, h, weight_t, out=out) if bias is not None else torch.mm(h, weight_t, out=out)).to(
            exact
        )
        target_logits = logits.gather(1, targets[lo:hi, None]).squeeze(1)
        row_max = logits.amax(dim=-1, keepdim=True)
        shifted = logits.sub_(row_max)  # z - m, in place
        if exps is not None:
            e = torch.exp(shifted, out=exps[lo:hi])
        elif exp_buffer is not None:
            e = torch.exp(shifted, out=exp_buffer[: hi - lo])
        else:
            e = shifted.exp_()  # nothing else needs z - m
        total = e.sum(dim=-1)
        log_total = total.log()
        log_probs[lo:hi] = target_logits - row_max.squeeze(1) - log_total
        if entropy is not None:  # shifted is intact here (e is a separate buffer) and not needed after
            expected_shifted = torch.mul(e, shifted, out=shifted).sum(dim=-1)  # sum e (z - m)
            entropy[lo:hi] = log_total - expected_shifted / total
        if inv_total is not None:
            inv_total[lo:hi] = total.reciprocal()
    return log_probs, entropy, exps, inv_total


class _CompletionLogProbs(torch.autograd.Function):
    """``_score_rows`` with a backward: d log p_t / d z = onehot(t) - e / S."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, with_entropy):
        ctx.set_materialize_grads(False)
        log_probs, entropy, exps, inv_total = _score_rows(hidden, weight, bias, targets, with_entropy, True)
        ctx.save_for_backward(hidden, weight, targets, exps, inv_total)
        ctx.has_bias = bias is not None
        ctx.compute_dtype = _compute_dtype(hidden)
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy):
        hidden, weight, targets, exps, inv_total = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if grad_log_probs is None:
            return None, None, None, None, None
        grad = grad_log_probs.to(exps.dtype)
        grad_logits = exps * (-grad * inv_total)[:, None]  # -g softmax (a new buffer: retain_graph may call again)
        grad_logits.scatter_add_(1, targets[:, None], grad[:, None])  # + g onehot(target)
        dtype = ctx.compute_dtype
        grad_hidden = (grad_logits.to(dtype) @ weight.to(dtype)).to(hidden.dtype) if needs_hidden else None
        grad_weight = (grad_logits.t() @ hidden.to(exps.dtype)).to(weight.dtype) if needs_weight else None
        grad_bias = grad_logits.sum(0).to(weight.dtype) if (needs_bias and ctx.has_bias) else None
        return grad_hidden, grad_weight, grad_bias, None, None


def completion_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row log p(target) under softmax(hidden @ weight.T + bias), (rows,), in float32
    (float64 for float64 inputs); and the per-row entropy (no gradient) when
    ``with_entropy``, else None.

    With gradients, exp(z - max) of every row is kept for the backward ((rows, vocab)
    float32); without them (a reference pass) only one row chunk is alive at a time."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        return _CompletionLogProbs.apply(hidden, weight, bias, targets, with_entropy)
    with torch.no_grad():
        return _score_rows(hidden, weight, bias, targets, with_entropy)[:2]


# ---------------------------------------------------------------------------------------
# Patching a model
# ---------------------------------------------------------------------------------------


def _needs_trl_head(config: Any) -> bool:
    """Whether the model's head has a quirk only TRL's fused head implements (then it is used everywhere)."""
    text = config.get_text_config()
    quirks = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    return any(getattr(text, name, None) is not None for name in quirks) or bool(
        getattr(text, "output_router_logits", False)
    )


def _triton_device(device: torch.device) -> bool:
    return device.type in ("cuda", "xpu") and is_triton_available()


def _plain_weight(weight: torch.Tensor) -> bool:
    """A whole (vocab, hidden) tensor here: not an FSDP2 DTensor, not a ZeRO-3 placeholder."""
    return type(weight) is torch.nn.Parameter and weight.dim() == 2 and weight.numel() > 0


def _spread(values: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """Per-row values back to the (batch, length - 1) grid, zero where not scored (still in the graph)."""
    return None if values is None else values.new_zeros(mask.shape).masked_scatter(mask, values)


def _trl_forward(model: torch.nn.Module, outputs: tuple[str, ...]):
    """TRL's fused forward for ``outputs``, captured without leaving ``model`` patched."""
    own = model.__dict__.get("forward")
    add_fused_lm_head(model, outputs=outputs)
    fused = model.forward
    if own is None:
        del model.forward
    else:
        model.forward = own
    return fused


def add_completion_head(model: torch.nn.Module) -> None:
    """Patch ``model.forward`` (a transformers causal LM; add before wrapping with PEFT) so that
    ``model(input_ids=..., attention_mask=..., labels=..., completion_head=True, with_entropy=False)``
    returns per-token label log-probs (see the module docstring). Patching twice is a no-op."""
    if getattr(model, _PATCHED, False):
        return
    original_forward = model.forward
    trl_forwards = {False: _trl_forward(model, ("log_probs",)), True: _trl_forward(model, ("log_probs", "entropy"))}
    always_trl = _needs_trl_head(model.config)

    @functools.wraps(type(model).forward)  # keep the signature: `generate` checks its kwargs against it
    def forward(self, *args, completion_head: bool = False, with_entropy: bool = False, labels=None, **kwargs):
        if not completion_head:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        head = self.get_output_embeddings()
        device = head.weight.device
        if always_trl or _triton_device(device) or not _plain_weight(head.weight):
            return trl_forwards[with_entropy](*args, labels=labels, fused_lm_head=True, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:].to(device)
        mask = targets != -100
        log_probs, entropy = completion_log_probs(
            hidden.to(device)[mask], head.weight, head.bias, targets[mask], with_entropy
        )
        return FusedCausalLMOutput(log_probs=_spread(log_probs, mask), entropy=_spread(entropy, mask), label_mask=mask)

    model.forward = forward.__get__(model)
    setattr(model, _PATCHED, True)
