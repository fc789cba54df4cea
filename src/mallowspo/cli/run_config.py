"""The settings of a run: a recipe YAML (or the built-in default) with ``--key value``
overrides on top, read into (``ModelArguments``, ``ScriptArguments``, ``MallowsPOConfig``).

`mallowspo train` and `mallowspo dispersion` read their settings here, so the same keys
mean the same things, with the same defaults, in both.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from mallowspo.cli.defaults import default_run_config
from mallowspo.training.config import MallowsPOConfig, ModelArguments, ScriptArguments

# Other spellings accepted for a few keys (in YAML and on the command line).
KEY_ALIASES = {"torch_dtype": "dtype", "dataset_path": "dataset_name"}


def argument_parser():
    """The HfArgumentParser over (ModelArguments, ScriptArguments, MallowsPOConfig)."""
    return HfArgumentParser((ModelArguments, ScriptArguments, MallowsPOConfig), allow_abbrev=False)


def known_keys(parser) -> set[str]:
    return {f.name for dc in parser.dataclass_types for f in dataclasses.fields(dc) if f.init}


def canonical_key(key: str) -> str:
    return KEY_ALIASES.get(key, key)


def canonical_overrides(overrides: list[str], aliases: dict[str, str] | None = None) -> list[str]:
    """Rewrite aliased ``--key`` tokens (also ``--key=value``) to their canonical names
    (``KEY_ALIASES``, then ``aliases``)."""
    out = []
    for token in overrides:
        if token.startswith("--"):
            key, sep, value = token[2:].partition("=")
            key = canonical_key(key)
            token = f"--{(aliases or {}).get(key, key)}{sep}{value}"
        out.append(token)
    return out


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe YAML as a flat mapping of keys to values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path} must be a mapping of keys to values, got {type(values).__name__}")
    return values


def check_keys(values: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        hints = [
            f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k for k in unknown
        ]
        raise ValueError(f"unknown keys in {where}: {', '.join(hints)}; see `mallowspo train --show_fields`")


def parse_run_config(config_path: str | None, overrides: list[str], aliases: dict[str, str] | None = None):
    """(ModelArguments, ScriptArguments, MallowsPOConfig) from the recipe (or the built-in
    default) with ``--key value`` overrides on top; ``aliases`` maps more override names
    to keys."""
    parser = argument_parser()
    known = known_keys(parser)
    values = load_recipe(config_path) if config_path else default_run_config()
    values = {canonical_key(k): v for k, v in values.items()}
    check_keys(values, known, config_path or "the built-in default")
    parser.set_defaults(**values)
    model_args, script_args, training_args, remaining = parser.parse_args_into_dataclasses(
        args=canonical_overrides(overrides, aliases), return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        flags = [t[2:].partition("=")[0] for t in remaining if t.startswith("--")]
        check_keys(dict.fromkeys(flags), known, "the command line")
        raise ValueError(f"cannot parse these command-line arguments: {' '.join(remaining)}")
    return model_args, script_args, training_args


def setup_logging(verbose: bool = True) -> None:
    """Log lines with a time stamp; the library's at INFO (WARNING when not ``verbose``)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mallowspo").setLevel(logging.INFO if verbose else logging.WARNING)
