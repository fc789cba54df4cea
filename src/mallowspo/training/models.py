"""Loading models and tokenizers, and preparing the policy and its reference for training.

The reference is
- ``ref_model`` when given;
- with LoRA (``peft_config`` or a PEFT model): the policy with its adapter disabled;
- for full fine-tuning: the initial policy. The reference pass runs before step 0 on the
  policy itself, so with ``precompute_ref_log_probs=True`` no copy is made; with ``False`` a
  frozen copy is kept for the per-step reference log-probs.
Reference-free objectives (SimPO) still need entropies for the Mallows dispersion: the pass
then uses ``ref_model`` if given, else the initial policy weights (before step 0).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from trl.trainer.utils import disable_dropout_in_model

from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.data import looks_like_path
from mallowspo.training.head import add_completion_head

logger = logging.getLogger(__name__)

REFERENCE_KINDS = {
    "ref_model": "the given ref_model",
    "copy": "a frozen copy of the initial model",
    "adapter": "the base model with the adapter disabled (no copy)",
    "policy": "the initial policy weights, scored before step 0 (no copy)",
}


def check_model_source(name_or_path: str) -> None:
    """Raise FileNotFoundError, naming the path, when ``name_or_path`` is meant as a local
    model directory (see ``mallowspo.training.data.looks_like_path``) that is not there or holds no model.
    Hub ids ('owner/name') pass; the hub is asked only when they are loaded."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not any((path / marker).is_file() for marker in ("config.json", "adapter_config.json")):
            raise FileNotFoundError(
                f"Model directory {path} holds no config.json: it is not a saved model. Give a directory written "
                "by save_pretrained (config.json, model.safetensors, tokenizer files) or a Hugging Face hub id."
            )
    elif path.exists():
        raise FileNotFoundError(f"Model path {path} is a file; give the directory that holds the model (config.json).")
    elif looks_like_path(name_or_path):  # e.g. 'runs/model' where ./runs exists: not the hub id of an owner "runs"
        raise FileNotFoundError(
            f"Model not found: there is no directory at '{name_or_path}' (resolved to {path.resolve()}). Give a "
            "directory written by save_pretrained, or a Hugging Face hub id such as 'owner/name'."
        )


def load_causal_lm(
    name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False, attn_implementation: str | None = None
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the command line's options.

    Weights are read from safetensors files only (``use_safetensors=True``): pickle weight
    files (``pytorch_model.bin``) can run code when loaded. Remote code runs only with
    ``trust_remote_code=True``.
    """
    check_model_source(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        if not any(Path(name_or_path).expanduser().glob("*.bin")):
            raise
        raise OSError(
            f"{name_or_path} holds only pickle weights (*.bin), and mallowspo loads safetensors only (a pickle file "
            "can run code when loaded). If you trust the file, convert it once: AutoModelForCausalLM.from_pretrained"
            f"('{name_or_path}').save_pretrained('{name_or_path}-safetensors'), and train from the new directory."
        ) from error


def ensure_pad_token(tokenizer: Any) -> None:
    """Use EOS as the pad token when the tokenizer has none (padding is masked out anyway)."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token first")
    tokenizer.pad_token = tokenizer.eos_token
    logger.warning("the tokenizer has no pad token: using its EOS token %r as the pad token", tokenizer.eos_token)


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


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
    return model, ref_model, kind
