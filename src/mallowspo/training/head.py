"""The completion head: per-token log-probs (and, on request, TRL's per-token statistics) of a
causal LM's labels without building (batch, length, vocab) logits for the whole batch.

``add_completion_head(model)`` patches ``model.forward`` once. Called with
``completion_head=True`` and ``labels`` (-100 where a position is not scored), the forward
runs the backbone and returns a ``trl.trainer.utils.FusedCausalLMOutput`` whose
``log_probs`` score token t + 1 at position t; with ``with_entropy=True`` its ``entropy``,
with ``with_token_metrics=True`` its ``mean_logits`` (the mean logit over the vocabulary)
and ``is_top1`` (whether the label is the most likely token), and with ``with_aux_loss=True``
(Mixture-of-Experts models) its ``aux_loss``, the router load-balancing loss.
Without ``completion_head`` the forward is the model's own, so ``generate`` is unchanged.

Two implementations, chosen per call from where the LM head's weight lives:

- On CUDA/XPU with Triton, TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``):
  Triton kernels over vocabulary tiles, only the scored positions, nothing of size
  (tokens, vocab) kept. It also covers every model-family quirk TRL knows (logit
  soft-capping and scaling, FSDP2 DTensor heads, the MoE load-balancing loss); models with
  a logit quirk use it on every device, and so does a call that asks for the MoE loss.
- Elsewhere (CPU), ``completion_scores``: the scored positions only, projected in row
  chunks with one matrix product, then one max / exp / sum pass shared by the log-probs
  and the statistics. For the backward it keeps exp(z - max) of the scored rows, (scored
  tokens, vocab) in float32, so the gradient costs two matrix products and no
  recomputation. TRL's head without Triton scores every position, prompt included, and
  recomputes the projection in its backward; on CPU it is about 2.5x slower than plain
  logits (benchmarks/README.md, docs/design.md).

The statistics are only computed when asked for (the reference pass needs the entropy for
the dispersion; a training step logs all three) and never carry a gradient.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
from transformers.utils import is_triton_available
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

ROW_CHUNK_ELEMENTS = 1 << 23  # rows x vocab per projection chunk: 32 MiB of float32 buffers (reused, not re-faulted)
STATISTICS = ("entropy", "mean_logits", "is_top1")  # the optional per-row outputs, TRL's names
_PATCHED = "_mallowspo_completion_head"


# ---------------------------------------------------------------------------------------
# The CPU head: log p(target) of rows of hidden @ weight.T + bias
# ---------------------------------------------------------------------------------------


class RowScores(NamedTuple):
    """Per-row outputs of the head, each (rows,); a statistic not asked for is None.

    log_probs: log p(target), float32 or wider (carries gradient through ``completion_scores``).
    entropy: the entropy of the next-token distribution, in nats.
    mean_logits: the mean of the logits over the vocabulary.
    is_top1: whether the target's logit is the largest (bool). A tie for the largest counts, where TRL's
        kernel (and argmax) count only the first of the tied tokens: they differ on exact ties only.
    """

    log_probs: torch.Tensor
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of the projection: autocast's when it is on, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _softmax_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of the log-sum-exp and the outputs: at least float32 (float64 stays float64)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _row_buffers(hidden: torch.Tensor, rows: int, dtype: torch.dtype, statistics: tuple[str, ...]) -> RowScores:
    """Uninitialised (rows,) buffers for the log-probs and the asked-for chunk-loop ``statistics``."""
    new = functools.partial(hidden.new_empty, rows)
    return RowScores(
        log_probs=new(dtype=dtype),
        entropy=new(dtype=dtype) if "entropy" in statistics else None,
        is_top1=new(dtype=torch.bool) if "is_top1" in statistics else None,
    )


def _mean_logits(
    hidden: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """(rows,) mean over the vocabulary of hidden @ weight_t + bias, by linearity: hidden @ (row sums of
    weight_t) + sum(bias), over V. Summed in ``dtype`` (at least float32)."""
    vocab = weight_t.size(1)
    total = hidden.to(dtype) @ weight_t.to(dtype).sum(dim=1)
    if bias is not None:
        total = total + bias.to(dtype).sum()
    return total / vocab


def _score_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    statistics: tuple[str, ...] = (),
    for_backward: bool = False,
) -> tuple[RowScores, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs of ``targets`` and the asked-for ``statistics`` (of ``STATISTICS``) of every row, in row
    chunks; no autograd.

    Per row, with z = W h + b the logits (V of them), m their maximum and t the target:
    e = exp(z - m), S = sum e, log p_t = z_t - m - log S, H = log S - sum(e (z - m)) / S,
    top-1 = (z_t >= m) and mean logit = sum z / V = (h . sum_v W_v + sum b) / V. The entropy costs
    one multiply-sum over the chunk; the top-1 nothing (m and z_t are there); the mean logit one
    (rows, hidden) product, not a pass over the vocabulary. With ``for_backward`` the unnormalised
    ``e`` (rows, vocab) and ``1 / S`` (rows,) are returned too: the softmax is e / S, and the
    backward scales ``e`` once instead of normalising it here."""
    rows, vocab = hidden.size(0), weight.size(0)
    dtype, exact = _compute_dtype(hidden), _softmax_dtype(hidden)
    weight_t = weight.to(dtype).t()
    bias = bias.to(dtype) if bias is not None else None
    out = _row_buffers(hidden, rows, exact, statistics)
    if "mean_logits" in statistics:
        out = out._replace(mean_logits=_mean_logits(hidden, weight_t, bias, exact))
    exps = hidden.new_empty(rows, vocab, dtype=exact) if for_backward else None
    inv_total = hidden.new_empty(rows, dtype=exact) if for_backward else None
    step = max(1, min(rows, ROW_CHUNK_ELEMENTS // max(vocab, 1)))
    # Chunk buffers allocated once: a fresh (step, vocab) tensor per chunk costs page faults on CPU.
    logits_buffer = hidden.new_empty(step, vocab, dtype=dtype)
    upcast_buffer = hidden.new_empty(step, vocab, dtype=exact) if dtype != exact else None  # bf16 -> float32
    needs_shifted = out.entropy is not None and exps is None  # then e gets its own buffer
    exp_buffer = hidden.new_empty(step, vocab, dtype=exact) if needs_shifted else None
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        h = hidden[lo:hi].to(dtype)
        projected = logits_buffer[: hi - lo]
        if bias is not None:
            torch.addmm(bias, h, weight_t, out=projected)
        else:
            torch.mm(h, weight_t, out=projected)
        logits = projected if upcast_buffer is None else upcast_buffer[: hi - lo].copy_(projected)
        target_logits = logits.gather(1, targets[lo:hi, None]).squeeze(1)
        row_max = logits.amax(dim=-1, keepdim=True)
        if out.is_top1 is not None:
            out.is_top1[lo:hi] = target_logits >= row_max.squeeze(1)
        shifted = logits.sub_(row_max)  # z - m, in place
        if exps is not None:
            e = torch.exp(shifted, out=exps[lo:hi])
        elif exp_buffer is not None:
            e = torch.exp(shifted, out=exp_buffer[: hi - lo])
        else:
            e = shifted.exp_()  # nothing else needs z - m
        total = e.sum(dim=-1)
        log_total = total.log()
        out.log_probs[lo:hi] = target_logits - row_max.squeeze(1) - log_total
        if out.entropy is not None:  # shifted is intact here (e is a separate buffer) and not needed after
            expected_shifted = torch.mul(e, shifted, out=shifted).sum(dim=-1)  # sum e (z - m)
            out.entropy[lo:hi] = log_total - expected_shifted / total
        if inv_total is not None:
            inv_total[lo:hi] = total.reciprocal()
    return out, exps, inv_total


class _CompletionLogProbs(torch.autograd.Function):
    """``_score_rows`` with a backward: d log p_t / d z = onehot(t) - e / S (the statistics have none)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, statistics):
        ctx.set_materialize_grads(False)
        out, exps, inv_total = _score_rows(hidden, weight, bias, targets, statistics, True)
        ctx.save_for_backward(hidden, weight, targets, exps, inv_total)
        ctx.has_bias = bias is not None
        ctx.compute_dtype = _compute_dtype(hidden)
        ctx.mark_non_differentiable(*(x for x in out[1:] if x is not None))
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_log_probs, *_grad_statistics):
        hidden, weight, targets, exps, inv_total = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if grad_log_probs is None:
            return None, None, None, None, None
        grad = grad_log_probs.to(exps.dtype)
        grad_logits = exps * (-grad * inv_total)[:, None]  # -g softmax (a new buffer: retain_graph may call again)
        grad_logits.scatter_add_(1, targets[:, None], grad[:, None])  # + g onehot(target)
        # Both products in the forward's compute dtype (bf16 under autocast, as autocast's own linear
        # backward), from one converted copy of the (rows, vocab) gradient; the bias sum stays exact.
        dtype = ctx.compute_dtype
        grad_logits_c = grad_logits.to(dtype) if (needs_hidden or needs_weight) else None
        grad_hidden = (grad_logits_c @ weight.to(dtype)).to(hidden.dtype) if needs_hidden else None
        grad_weight = (grad_logits_c.t() @ hidden.to(dtype)).to(weight.dtype) if needs_weight else None
        grad_bias = grad_logits.sum(0).to(weight.dtype) if (needs_bias and ctx.has_bias) else None
        return grad_hidden, grad_weight, grad_bias, None, None


def completion_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    statistics: tuple[str, ...] = (),
) -> RowScores:
    """Per-row log p(target) under softmax(hidden @ weight.T + bias), (rows,), in float32 (float64 for
    float64 inputs), and the asked-for ``statistics`` (names of ``STATISTICS``; no gradient).

    With gradients, exp(z - max) of every row is kept for the backward ((rows, vocab)
    float32); without them (a reference pass) only one row chunk is alive at a time."""
    unknown = set(statistics) - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown head statistics {sorted(unknown)}; choose from {STATISTICS}")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        return RowScores(*_CompletionLogProbs.apply(hidden, weight, bias, targets, tuple(statistics)))
    with torch.no_grad():
        return _score_rows(hidden, weight, bias, targets, tuple(statistics))[0]


def completion_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``completion_scores``' log-probs (rows,) and, when ``with_entropy``, the entropies (else None)."""
    scores = completion_scores(hidden, weight, bias, targets, ("entropy",) if with_entropy else ())
    return scores.log_probs, scores.entropy


# ---------------------------------------------------------------------------------------
# Patching a model
# ---------------------------------------------------------------------------------------


def _needs_trl_head(config: Any) -> bool:
    """Whether the model's logits have a quirk only TRL's fused head implements (then it is used everywhere)."""
    text = config.get_text_config()
    quirks = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    return any(getattr(text, name, None) is not None for name in quirks)


def is_moe(config: Any) -> bool:
    """Whether the model is a Mixture-of-Experts one that can return its router logits (TRL's test)."""
    return hasattr(config.get_text_config(), "output_router_logits")


def _triton_device(device: torch.device) -> bool:
    return device.type in ("cuda", "xpu") and is_triton_available()


def _plain_weight(weight: torch.Tensor) -> bool:
    """A whole (vocab, hidden) tensor here: not an FSDP2 DTensor, not a ZeRO-3 placeholder."""
    return type(weight) is torch.nn.Parameter and weight.dim() == 2 and weight.numel() > 0


def _spread(values: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """Per-row values back to the (batch, length - 1) grid, zero where not scored (still in the graph)."""
    return None if values is None else values.new_zeros(mask.shape).masked_scatter(mask, values)


def _statistics(with_entropy: bool, with_token_metrics: bool) -> tuple[str, ...]:
    """The ``STATISTICS`` a call asks for: the entropy; the mean logit and top-1 of TRL's token metrics."""
    return ("entropy",) * with_entropy + ("mean_logits", "is_top1") * with_token_metrics


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
    ``model(input_ids=..., attention_mask=..., labels=..., completion_head=True, with_entropy=False,
    with_token_metrics=False, with_aux_loss=False)`` returns per-token label log-probs and the asked-for
    statistics (see the module docstring). ``with_aux_loss`` is for MoE models only (ValueError otherwise);
    an MoE model's router logits are requested exactly when it is set. The other keyword arguments go to
    the backbone as they are: a padding-free batch's ``position_ids`` and varlen ``cu_seq_lens_*`` /
    ``max_length_*`` (``training.scoring.layout_inputs``) in place of the attention mask; the head
    itself is per position, so the shifted labels alone say what is scored. Patching twice is a no-op."""
    if getattr(model, _PATCHED, False):
        return
    original_forward = model.forward
    trl_forwards = {
        statistics: _trl_forward(model, ("log_probs", *statistics))
        for statistics in {_statistics(a, b) for a in (False, True) for b in (False, True)}
    }
    always_trl, moe = _needs_trl_head(model.config), is_moe(model.config)

    @functools.wraps(type(model).forward)  # keep the signature: `generate` checks its kwargs against it
    def forward(
        self,
        *args,
        completion_head: bool = False,
        with_entropy: bool = False,
        with_token_metrics: bool = False,
        with_aux_loss: bool = False,
        labels=None,
        **kwargs,
    ):
        if not completion_head:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        if moe:
            kwargs["output_router_logits"] = with_aux_loss
        elif with_aux_loss:
            raise ValueError(f"with_aux_loss: {type(self).__name__} is not a Mixture-of-Experts model")
        statistics = _statistics(with_entropy, with_token_metrics)
        head = self.get_output_embeddings()
        device = head.weight.device
        if with_aux_loss or always_trl or _triton_device(device) or not _plain_weight(head.weight):
            return trl_forwards[statistics](*args, labels=labels, fused_lm_head=True, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:].to(device)
        mask = targets != -100
        scores = completion_scores(hidden.to(device)[mask], head.weight, head.bias, targets[mask], statistics)
        return FusedCausalLMOutput(
            **{name: _spread(value, mask) for name, value in scores._asdict().items()}, label_mask=mask
        )

    model.forward = forward.__get__(model)
    setattr(model, _PATCHED, True)
