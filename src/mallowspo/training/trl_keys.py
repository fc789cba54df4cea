"""TRL's ``DPOConfig`` keys that have no MallowsPO meaning of their own.

``TRLDPOKeys`` is a mixin of ``MallowsPOConfig``: a TRL DPO recipe's keys parse, and each
one is either used with trl 1.16's meaning or refused in one line with the reason
(``check_trl_keys``); none is accepted and ignored. The keys TRL and MallowsPO share with
the same meaning (``beta``, ``loss_type``, ``loss_weights``, ``label_smoothing``, the
lengths, ``padding_free``, the reference pass's) are ``MallowsPOConfig``'s own fields.
README.md's "Coming from TRL" table lists them all.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# TRL 1.16 loss types that MallowsPO does not implement, and what to use instead.
TRL_ONLY_LOSS_TYPES = {
    "exo_pair": "EXO",
    "nca_pair": "NCA",
    "bco_pair": "BCO",
    "sppo_hard": "SPPO",
    "aot": "AOT",
    "aot_unpaired": "AOT (unpaired)",
    "apo_zero": "APO-zero",
    "apo_down": "APO-down",
    "discopop": "DiscoPOP",
    "sigmoid_norm": "length-normalised DPO (here: loss_type sigmoid with length_normalize: true)",
}


@dataclass
class TRLDPOKeys:
    """The ``DPOConfig`` keys of trl 1.16 beyond MallowsPO's own; see the module docstring."""

    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for AutoModelForCausalLM.from_pretrained when the model is given as a path "
            "or hub id (TRL's; a JSON string on the command line)."
        },
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Weight of a Mixture-of-Experts model's load-balancing loss added to the loss (TRL's); default: "
            "the model config's own; 0 disables it. An error with a dense model."
        },
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes for validating and tokenizing the dataset (TRL's)."}
    )
    ld_alpha: float | None = field(
        default=None, metadata={"help": "LD-DPO's weight of the tokens past the shorter response (TRL's); refused."}
    )
    f_divergence_type: str = field(
        default="reverse_kl", metadata={"help": "f-DPO's divergence (TRL's); only reverse_kl (DPO's) is supported."}
    )
    f_alpha_divergence_coef: float = field(
        default=0.5, metadata={"help": "f-DPO's alpha, for f_divergence_type alpha_divergence (refused)."}
    )
    use_weighting: bool = field(default=False, metadata={"help": "WPO's per-pair weights (TRL's); refused."})
    discopop_tau: float = field(default=0.05, metadata={"help": "DiscoPOP's tau, for loss_type discopop (refused)."})
    activation_offloading: bool = field(
        default=False, metadata={"help": "Offload activations to the CPU (TRL's); refused."}
    )
    sync_ref_model: bool = field(
        default=False, metadata={"help": "TR-DPO's reference updates during training (TRL's); refused."}
    )
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO's alpha, with sync_ref_model."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO's tau, with sync_ref_model."})
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={
            "help": "Pad each batch's length to a multiple of this (TRL's); 'auto' (TRL's default): 128 on Neuron, "
            "else no padding beyond the longest sequence."
        },
    )
    pad_token: str | None = field(
        default=None, metadata={"help": "Deprecated in TRL; refused: set the tokenizer's pad_token instead."}
    )


# Refused keys: (name, value that is accepted, why any other value is refused).
_REFUSED = (
    (
        "ld_alpha",
        None,
        "LD-DPO's down-weighting of the tokens past the shorter response is not implemented; "
        "length_normalize: true is the length control MallowsPO offers",
    ),
    (
        "use_weighting",
        False,
        "WPO's weights need each token's sum of squared probabilities, which the completion head does not compute",
    ),
    (
        "activation_offloading",
        False,
        "use activation_checkpointing, which MallowsPO supports on every device",
    ),
    (
        "sync_ref_model",
        False,
        "TR-DPO moves the reference during training, but MallowsPO's reference log-probs and its dispersion "
        "-log phi(x) come from one cached pass of a fixed reference",
    ),
    (
        "pad_token",
        None,
        "TRL deprecated it; set tokenizer.pad_token (mallowspo uses the EOS token when the tokenizer has no pad)",
    ),
)

# Keys read only with another key set (which is refused): a changed value would be ignored.
_DEPENDENT = {
    "f_alpha_divergence_coef": ("f_divergence_type", "alpha_divergence"),
    "discopop_tau": ("loss_type", "discopop"),
    "ref_model_mixup_alpha": ("sync_ref_model", True),
    "ref_model_sync_steps": ("sync_ref_model", True),
}
_DEPENDENT_DEFAULTS = {
    "f_alpha_divergence_coef": 0.5,
    "discopop_tau": 0.05,
    "ref_model_mixup_alpha": 0.6,
    "ref_model_sync_steps": 512,
}


def check_trl_keys(args: TRLDPOKeys) -> None:
    """Raise ValueError (one line, naming the key and the reason) for a TRL key set to a value
    MallowsPO does not implement, or set where the key it belongs to is not; parse
    ``model_init_kwargs`` given as a JSON string."""
    for name, accepted, reason in _REFUSED:
        value = getattr(args, name)
        if value != accepted:
            raise ValueError(f"{name}={value!r} is not supported: {reason}")
    if args.f_divergence_type != "reverse_kl":
        raise ValueError(
            f"f_divergence_type={args.f_divergence_type!r} is not supported: the Mallows link and the dispersion are "
            "defined on DPO's reverse-KL reward difference; use reverse_kl (the default)"
        )
    for name, (owner, owner_value) in _DEPENDENT.items():
        if getattr(args, name) != _DEPENDENT_DEFAULTS[name]:
            raise ValueError(f"{name} is only read with {owner}={owner_value!r}, which MallowsPO does not support")
    if args.dataset_num_proc is not None:
        if args.dataset_num_proc < 1:
            raise ValueError(f"dataset_num_proc must be >= 1 or null, got {args.dataset_num_proc}")
        logger.warning(
            "dataset_num_proc=%d has no effect: mallowspo validates the rows in one pass and tokenizes them in "
            "batches with the fast (Rust) tokenizer, which already uses every core",
            args.dataset_num_proc,
        )
    if args.router_aux_loss_coef is not None and not args.router_aux_loss_coef >= 0:
        raise ValueError(f"router_aux_loss_coef must be >= 0 or null, got {args.router_aux_loss_coef}")
    args.model_init_kwargs = parsed_model_init_kwargs(args.model_init_kwargs)
    args.pad_to_multiple_of = resolved_pad_multiple(args.pad_to_multiple_of)
    check_liger(args)


def resolved_pad_multiple(value: int | str | None) -> int | None:
    """``pad_to_multiple_of`` as TRL resolves it: 'auto' is 128 on Neuron (which compiles per shape), else None."""
    if isinstance(value, str):
        if value == "auto":
            return 128 if importlib.util.find_spec("torch_neuronx") is not None else None
        if value.lower() in ("none", "null"):
            return None
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, 'auto' or null, got {value!r}") from None
    if value is not None and value < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive integer, 'auto' or null, got {value}")
    return value


def check_liger(args: TRLDPOKeys) -> None:
    """``use_liger_kernel`` as TRL 1.16 takes it: Liger's layer kernels only. Its fused linear
    cross-entropy replaces the model's forward, which would drop the completion head: refused
    when asked for, switched off otherwise. Raise ValueError without the liger-kernel package."""
    if not getattr(args, "use_liger_kernel", False):
        return
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(
            "use_liger_kernel needs the liger-kernel package (and a GPU with Triton): pip install liger-kernel"
        )
    config = dict(getattr(args, "liger_kernel_config", None) or {})
    if config.get("fused_linear_cross_entropy"):
        raise ValueError(
            "liger_kernel_config fused_linear_cross_entropy=true is not supported: it replaces the model's forward, "
            "which MallowsPO patches with its completion head (the layer kernels are applied)"
        )
    args.liger_kernel_config = {**config, "fused_linear_cross_entropy": False}


def parsed_model_init_kwargs(value: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """``model_init_kwargs`` as a dict: a JSON object string (the command line's) is parsed."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"model_init_kwargs must be a JSON object, got {value!r} ({error.msg})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"model_init_kwargs must be a JSON object, got {value!r}")
    return parsed


def check_trl_loss_type(name: str) -> None:
    """Raise ValueError for a TRL loss type MallowsPO does not implement, naming it."""
    if name in TRL_ONLY_LOSS_TYPES:
        raise ValueError(
            f"loss_type {name!r} ({TRL_ONLY_LOSS_TYPES[name]}) is one of TRL's that MallowsPO does not implement"
        )
