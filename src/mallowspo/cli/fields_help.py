"""The keys of `mallowspo train` (and `mallowspo dispersion`), grouped for ``--help``:
MallowsPO's own first, then the data, the model, TRL's other keys, and transformers'
``TrainingArguments`` last (as `trl dpo --help` groups DPOConfig's)."""

from __future__ import annotations

import dataclasses
import textwrap

from transformers import TrainingArguments

from mallowspo.training.arguments import ModelArguments, ScriptArguments
from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.trl_keys import TRLDPOKeys

# MallowsPOConfig's own fields by group; a field of its own not listed here goes to "MallowsPO: other".
MALLOWSPO_GROUPS = {
    "MallowsPO: objective": (
        "loss_type",
        "loss_weights",
        "beta",
        "mallows",
        "phi_smoothing",
        "smoothing_eps",
        "label_smoothing",
        "simpo_gamma",
        "length_normalize",
        "ipo_form",
        "objective",
        "listwise_top_k",
        "binarize",
    ),
    "MallowsPO: dispersion -log phi(x)": (
        "dispersion_source",
        "dispersion_normalization",
        "dispersion_clamp",
        "dispersion_constant",
        "dispersion_column",
        "dispersion_votes_column",
        "dispersion_chosen_votes_column",
        "dispersion_rejected_votes_column",
        "dispersion_strengths_column",
        "dispersion_rankings_column",
        "dispersion_consensus",
        "dispersion_format",
    ),
    "Reference pass": ("precompute_ref_log_probs", "precompute_ref_batch_size", "disable_dropout"),
}
DATA_FIELDS = (
    "list_format",
    "responses_column",
    "ranking_column",
    "scores_column",
    "ultrafeedback_score",
    "max_responses",
    "max_length",
    "max_prompt_length",
    "max_completion_length",
    "truncation_mode",
    "padding_free",
    "pad_to_multiple_of",
    "strict_validation",
    "dataset_num_proc",
)
MODEL_FIELDS_OF_CONFIG = ("model_init_kwargs", "router_aux_loss_coef")
HELP_WIDTH = 100


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def field_groups() -> list[tuple[str, list[dataclasses.Field]]]:
    """(title, fields) in the order ``--help`` shows them; every key appears once."""
    config_fields = {f.name: f for f in dataclasses.fields(MallowsPOConfig) if f.init}
    trainer_names = set(_names(TrainingArguments))
    trl_names = set(_names(TRLDPOKeys))
    own = [n for n in config_fields if n not in trainer_names and n not in trl_names]
    grouped: list[tuple[str, list[str]]] = [
        (title, [n for n in names if n in config_fields]) for title, names in MALLOWSPO_GROUPS.items()
    ]
    listed = {n for _, names in grouped for n in names} | set(DATA_FIELDS) | set(MODEL_FIELDS_OF_CONFIG)
    grouped.append(("MallowsPO: other", [n for n in own if n not in listed]))
    model_and_data = {f.name: f for cls in (ModelArguments, ScriptArguments) for f in dataclasses.fields(cls)}
    groups = [(title, [config_fields[n] for n in names]) for title, names in grouped if names]
    groups.append(
        (
            "Data",
            list(dataclasses.fields(ScriptArguments)) + [config_fields[n] for n in DATA_FIELDS if n in config_fields],
        )
    )
    groups.append(
        ("Model", list(dataclasses.fields(ModelArguments)) + [config_fields[n] for n in MODEL_FIELDS_OF_CONFIG])
    )
    shown = {f.name for _, fields in groups for f in fields} | set(model_and_data)
    groups.append(
        (
            "TRL DPOConfig keys MallowsPO refuses (accepted at their defaults only)",
            [config_fields[n] for n in _names(TRLDPOKeys) if n not in shown],
        )
    )
    shown |= trl_names
    groups.append(
        (
            "Training (transformers.TrainingArguments)",
            [config_fields[n] for n in config_fields if n not in shown and n in trainer_names],
        )
    )
    return groups


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _entry(f: dataclasses.Field) -> str:
    help_text = " ".join(str(f.metadata.get("help", "")).split())
    head = f"  --{f.name} (default: {_default(f)!r})"
    body = textwrap.fill(help_text, HELP_WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return f"{head}\n{body}" if help_text else head


def fields_help() -> str:
    """Every key with its default and help, grouped (see the module docstring)."""
    sections = []
    for title, fields in field_groups():
        sections.append(f"{title}:\n" + "\n".join(_entry(f) for f in fields))
    return "keys (in a recipe YAML, or as --key value):\n\n" + "\n\n".join(sections)
