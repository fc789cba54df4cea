"""Padding-free batches (``padding_free=True``): which models can run them, checked before training.

In the padding-free layout (``training.collate``) the 2B sequences of a batch share one row,
and the model must keep them apart: each token may attend only to earlier tokens of its own
sequence, positions restart at each sequence, and no state flows from one sequence to the next.
transformers (>= 5) does this from ``position_ids`` when no attention mask is given:

    eager, sdpa, flex_attention    a block-diagonal causal mask built from the restarts of
                                   ``position_ids`` (``masking_utils.find_packed_sequence_indices``);
                                   sdpa and eager on every device (flex_attention's backward needs a GPU);
                                   the mask is dense (N, N) for sdpa and eager, block-sparse for flex
    flash_attention_2 / 3 / 4      the varlen kernels, given ``cu_seq_lens_q/k`` and ``max_length_q/k``
                                   (CUDA; the collator computes them, so no device sync)

Other backends (the paged ones, custom or hub kernels) get no such mask and are refused.
Architectures whose positions or state do not come from ``position_ids`` (learned positions
counted from the attention mask like OPT's, ALiBi like BLOOM's and MPT's, Falcon, recurrent or
hybrid layers like Mamba's, Jamba's and Qwen3-Next's) mix the packed sequences whatever the
backend. No list of them is kept: ``check_packed_model`` runs the model on two short sequences,
packed and one by one, and refuses it when the outputs differ.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mallowspo.training.collate import PreferenceCollator, packed_batch
from mallowspo.training.scoring import layout_inputs

logger = logging.getLogger(__name__)

PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")
# Backends the probe runs only on CUDA: flash attention has no CPU kernel; flex_attention compiles its mask
# with inductor, slow and fragile on CPU, and cannot train there.
CUDA_PROBED = ("flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")
DENSE_MASK = ("sdpa", "eager")  # transformers builds their packed-sequence mask as a dense (N, N) tensor
PROBE_LENGTHS = (12, 4)  # a longer sequence first: whatever leaks from it into the second one shows


def check_packed_attention(attn_implementation: str | None, where: str) -> None:
    """Raise ValueError unless ``attn_implementation`` (None: transformers' default, sdpa or eager)
    keeps packed sequences apart; ``where`` says where the value was set."""
    if attn_implementation is None or attn_implementation in PACKED_ATTENTION:
        return
    raise ValueError(
        f"padding_free needs an attention backend that keeps packed sequences apart, and attn_implementation="
        f"{attn_implementation!r} ({where}) does not: use attn_implementation='sdpa' (any device) or "
        "'flash_attention_2' (CUDA), or padding_free=False"
    )


def check_padding_free_settings(args: Any) -> None:
    """The settings check of ``MallowsPOConfig``: with ``padding_free``, the attention backend of
    ``model_init_kwargs`` (the model itself is checked by ``check_packed_model``)."""
    if not args.padding_free:
        return
    init_kwargs = getattr(args, "model_init_kwargs", None)
    if isinstance(init_kwargs, dict):
        check_packed_attention(init_kwargs.get("attn_implementation"), "in model_init_kwargs")


def preference_collator(
    pad_token_id: int, padding_free: bool, *models: torch.nn.Module | None, pad_to_multiple_of: int | None = None
) -> PreferenceCollator:
    """The trainer's collator; padding-free only after ``check_packed_model`` of each of ``models``
    (the policy and the separate reference, None when there is none)."""
    if padding_free:
        for model in models:
            if model is not None:
                check_packed_model(model)
    return PreferenceCollator(pad_token_id, padding_free=padding_free, pad_to_multiple_of=pad_to_multiple_of)


def check_packed_model(model: torch.nn.Module) -> None:
    """Raise ValueError, naming the model and what to do, unless ``model`` (a transformers causal LM,
    or a PEFT model of one) keeps the sequences of a padding-free row apart: its attention backend
    (``PACKED_ATTENTION``), its adapter (prompt learning prepends virtual tokens to the whole row),
    and its outputs on a packed probe (``packed_probe_error``)."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(
            f"padding_free does not work with a prompt-learning adapter ({peft_config.peft_type}): its virtual "
            "tokens would be prepended to the whole packed row, not to each sequence; use LoRA or padding_free=False"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = f"{type(base).__name__} (model_type {base.config.model_type!r})"
    check_packed_attention(base.config._attn_implementation, f"of {name}")
    if base.config._attn_implementation in DENSE_MASK:
        logger.warning(
            "padding_free with attn_implementation=%r: the packed row's mask is dense, so attention costs grow with "
            "the square of the batch's total tokens (no pad token is computed, but padded rows may be faster); "
            "flash_attention_2 runs packed rows with varlen kernels",
            base.config._attn_implementation,
        )
    reason = probe_skipped(base)
    if reason is not None:
        logger.info("padding_free: %s is not probed with packed sequences (%s)", name, reason)
        return
    error = packed_probe_error(base)
    if error is not None:
        raise ValueError(
            f"padding_free: {name} mixes the sequences of a packed row ({error}): its positions or state do not "
            "restart with position_ids; use padding_free=False"
        )


def probe_skipped(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run the probe here, or None: weights not materialised (meta device,
    DeepSpeed ZeRO-3 shards), or a ``CUDA_PROBED`` backend on weights that are not on a GPU yet."""
    weight = model.get_input_embeddings().weight
    if weight.device.type == "meta" or weight.numel() == 0:
        return "its weights are not materialised on this process"
    if model.config._attn_implementation in CUDA_PROBED and weight.device.type != "cuda":
        return f"{model.config._attn_implementation} is probed on CUDA and the weights are on {weight.device.type}"
    return None


@torch.no_grad()
def packed_probe_error(model: torch.nn.Module) -> str | None:
    """Run ``model`` on two sequences (``PROBE_LENGTHS``), packed in one row and one by one; return
    how far apart the logits are when more than the rounding of the model's dtype allows, else None."""
    vocab = model.get_input_embeddings().weight.size(0)
    device = model.get_input_embeddings().weight.device
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(vocab, (n,), generator=generator) for n in PROBE_LENGTHS]
    packed = packed_batch(sequences, [torch.zeros_like(s) for s in sequences])
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in layout_inputs(packed).items()}
    was_training = model.training
    model.eval()
    try:
        together = model(input_ids=packed["input_ids"].to(device), use_cache=False, **inputs).logits[0].float()
        alone = torch.cat([model(input_ids=s[None].to(device), use_cache=False).logits[0].float() for s in sequences])
    finally:
        model.train(was_training)
    difference, scale = (together - alone).abs().max().item(), alone.abs().max().item()
    tolerance = (1e-3 if model.dtype in (torch.float32, torch.float64) else 3e-2) * max(1.0, scale)
    if difference <= tolerance:
        return None
    return (
        f"on a probe of two sequences, packed logits differ from separate ones by {difference:.3g} (scale {scale:.3g})"
    )
