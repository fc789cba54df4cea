"""Preparing the policy and its reference for training.

The reference is
- ``ref_model`` when given;
- with LoRA (``peft_config`` or a PEFT model): the policy with its adapter disabled;
- for full fine-tuning: the initial policy. The reference pass runs before step 0 on the
  policy itself, so with ``precompute_ref_log_probs=True`` no copy is made; with ``False`` a
  frozen copy is kept for the per-step reference log-probs.
Reference-free objectives (SimPO) still need entropies for the Mallows dispersion: the pass
then uses ``ref_model`` if given, else the initial policy weights (before step 0).

An adapter stores its base model as a hub id or an absolute path (``anchor_adapter_base``), so
that it loads from any working directory.

Loading models and tokenizers is ``training.loading``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from trl.trainer.utils import disable_dropout_in_model

from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.head import add_completion_head

REFERENCE_KINDS = {
    "ref_model": "the given ref_model",
    "copy": "a frozen copy of the initial model",
    "adapter": "the base model with the adapter disabled (no copy)",
    "policy": "the initial policy weights, scored before step 0 (no copy)",
}


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def portable_model_path(name_or_path: str | None) -> str | None:
    """``name_or_path`` as a saved adapter should name its base model: a local directory as its
    absolute path (a relative one would only resolve from the directory the run started in), a
    hub id (or None) unchanged."""
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def anchor_adapter_base(model: torch.nn.Module) -> None:
    """Make each adapter's ``base_model_name_or_path`` (written to adapter_config.json) portable."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = portable_model_path(config.base_model_name_or_path)


def wrap_with_peft(model: PreTrainedModel, peft_config: Any, activation_checkpointing: bool) -> torch.nn.Module:
    """``peft.get_peft_model``, after the completion head was added to the base model."""
    from peft import get_peft_model

    if activation_checkpointing:
        model.enable_input_require_grads()  # LoRA with checkpointing needs grads on the embeddings' output
    return get_peft_model(model, peft_config)


def prepare_models(
    model: torch.nn.Module, ref_model: PreTrainedModel | None, args: MallowsPOConfig, peft_config: Any
) -> tuple[torch.nn.Module, PreTrainedModel | None, str]:
    """Copy the reference if one must be kept, add completion heads, disable dropout, wrap with PEFT.

    Returns the policy, the separate reference (or None) and the key of ``REFERENCE_KINDS``
    that says what the reference is.
    """
    peft = peft_config is not None or is_peft_model(model)
    if peft_config is not None and is_peft_model(model):
        raise ValueError("model is already a PEFT model: pass peft_config=None, or pass the base model")
    online_reference = not args.precompute_ref_log_probs and not args.reference_free
    kind = "ref_model" if ref_model is not None else ("adapter" if peft else "policy")
    if ref_model is None and online_reference and not peft:
        # Full fine-tuning with per-step reference log-probs: keep a frozen copy of the
        # initial weights (made before the head is patched, so each model has its own).
        ref_model = copy.deepcopy(model)
        kind = "copy"
    base = model.get_base_model() if is_peft_model(model) else model
    add_completion_head(base)
    if ref_model is not None:
        add_completion_head(ref_model)
        ref_model.eval().requires_grad_(False)
    if args.disable_dropout:
        disable_dropout_in_model(model)
        if ref_model is not None:
            disable_dropout_in_model(ref_model)
    if peft_config is not None:
        model = wrap_with_peft(model, peft_config, bool(args.activation_checkpointing))
    if peft:
        anchor_adapter_base(model)
    return model, ref_model, kind
