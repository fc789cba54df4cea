"""The settings of a run: a recipe YAML (or the built-in default) with ``--key value``
overrides on top, read into (``ModelArguments``, ``ScriptArguments``, ``MallowsPOConfig``).

`mallowspo train` and `mallowspo dispersion` read their settings here, so the same keys
mean the same things, with the same defaults, in both.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from mallowspo.cli.defaults import default_run_config
from mallowspo.training.arguments import ModelArguments, ScriptArguments
from mallowspo.training.config import MallowsPOConfig

# Other spellings accepted for a few keys (in YAML and on the command line).
KEY_ALIASES = {"torch_dtype": "dtype", "dataset_path": "dataset_name"}
# Keys that name what to train on: with either of them, the documented defaults apply, not the built-in run's.
RUN_SUBJECT_KEYS = ("model_name_or_path", "dataset_name")
NULL_WORDS = ("null", "none", "None", "~")  # on the command line; "null" alone for text-valued keys


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


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe YAML as a flat mapping of keys to values.

    Raises FileNotFoundError, or ValueError naming the file (and the line, for YAML errors):
    not UTF-8, a YAML syntax error, a tag such as ``!!python/object`` (never executed), a key
    given twice, or a document that is not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        line = raw.count(b"\n", 0, bad.start) + 1
        raise ValueError(f"recipe {path} is not UTF-8 text (byte 0x{raw[bad.start]:02x} on line {line})") from None
    try:
        values = yaml.load(text, Loader=_RecipeLoader) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error)
        if "could not determine a constructor for the tag" in problem:
            problem = f"{problem}: recipes hold plain values only; tags are refused, never executed"
        raise ValueError(f"recipe {where}: {problem}") from None
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path} must be a mapping of keys to values, got {type(values).__name__}")
    return values


def field_types(parser) -> dict[str, Any]:
    """Every key's type annotation, resolved."""
    hints = {}
    for dataclass_type in parser.dataclass_types:
        resolved = typing.get_type_hints(dataclass_type)
        hints.update({f.name: resolved[f.name] for f in dataclasses.fields(dataclass_type) if f.init})
    return hints


def _type_args(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def is_nullable(hint: Any) -> bool:
    return type(None) in _type_args(hint)


def _value_error(key: str, value: Any, hint: Any) -> str | None:
    """Why ``value`` cannot be the value of a key of type ``hint`` (None when it can, or when
    the type is not a plain one this check knows)."""
    options = [t for t in _type_args(hint) if t is not type(None)]
    if value is None:
        return None if is_nullable(hint) else "it cannot be null"
    if len(options) != 1:
        return None
    kind = options[0]
    origin = typing.get_origin(kind)
    if origin is list:
        inner = typing.get_args(kind)
        if not isinstance(value, list) and not (inner == (str,) and isinstance(value, str)):
            return f"expected a list, got {value!r}"
        values = value if isinstance(value, list) else [value]  # a list of names takes one name (`loss_type: ipo`)
        return next((e for v in values if inner and (e := _value_error(key, v, inner[0]))), None)
    if kind is bool:
        return (
            None
            if isinstance(value, bool) or str(value).lower() in ("true", "false")
            else f"expected true or false, got {value!r}"
        )
    if kind in (int, float):
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            return f"expected a number, got {value!r}"
        try:
            number = kind(value) if not isinstance(value, float) or kind is float else value
        except (TypeError, ValueError):
            return f"expected {'an integer' if kind is int else 'a number'}, got {value!r}"
        if kind is int and isinstance(value, float) and not value.is_integer():
            return f"expected an integer, got {value!r}"
        if isinstance(number, float) and not math.isfinite(number):
            return f"expected a finite number, got {value!r}"
        return None
    if kind is str and isinstance(value, (list, dict)):
        return f"expected a single value, got {value!r}"
    return None


def check_value_types(values: dict[str, Any], types_by_key: dict[str, Any], where: str) -> None:
    """Raise ValueError naming the first key of ``values`` whose value its type cannot take."""
    for key, value in values.items():
        problem = _value_error(key, value, types_by_key[key])
        if problem is not None:
            raise ValueError(f"{key} in {where}: {problem}")


def take_nulls(overrides: list[str], types_by_key: dict[str, Any]) -> tuple[list[str], dict[str, None]]:
    """Split ``--key null`` (or ``--key=null``) out of the command line: those keys are cleared
    (set to None, also over a recipe's value). Raises ValueError for a key that cannot be null."""
    kept, nulls = [], {}
    i = 0
    while i < len(overrides):
        token = overrides[i]
        key, sep, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if not sep and i + 1 < len(overrides):
            value = overrides[i + 1]
        hint = types_by_key.get(key)
        text_valued = hint is not None and str in _type_args(hint)
        if hint is not None and value in (("null",) if text_valued else NULL_WORDS):
            if not is_nullable(hint):
                raise ValueError(f"--{key} cannot be null on the command line")
            nulls[key] = None
            i += 1 if sep else 2
            continue
        kept.append(token)
        i += 1
    return kept, nulls


def builtin_run_applies(config_path: str | None, overrides: list[str]) -> bool:
    """The built-in run's settings apply only without a recipe and when the command line names
    neither a model nor a dataset; otherwise the documented defaults do, as in a recipe."""
    named = {token[2:].partition("=")[0] for token in overrides if token.startswith("--")}
    return config_path is None and not named & set(RUN_SUBJECT_KEYS)


def check_keys(values: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        hints = [
            f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k for k in unknown
        ]
        raise ValueError(f"unknown keys in {where}: {', '.join(hints)}; see `mallowspo train --show_fields`")


class _ParseError(ValueError):
    pass


def _raise_parse_error(message: str):
    raise _ParseError(f"{message} (on the command line)")


def parse_run_config(config_path: str | None, overrides: list[str], aliases: dict[str, str] | None = None):
    """(ModelArguments, ScriptArguments, MallowsPOConfig) from the recipe (or the built-in
    default, see ``builtin_run_applies``) with ``--key value`` overrides on top; ``aliases``
    maps more override names to keys. ``--key null`` clears a key."""
    parser = argument_parser()
    parser.error = _raise_parse_error  # one line naming the flag, instead of the usage and exit 2
    known = known_keys(parser)
    types_by_key = field_types(parser)
    overrides = canonical_overrides(overrides, aliases)
    if config_path:
        values, where = load_recipe(config_path), f"recipe {config_path}"
    elif builtin_run_applies(config_path, overrides):
        values, where = default_run_config(), "the built-in default"
    else:
        values, where = {}, "the command line"
    values = {canonical_key(k): v for k, v in values.items()}
    check_keys(values, known, where)
    check_value_types(values, types_by_key, where)
    overrides, nulls = take_nulls(overrides, types_by_key)
    parser.set_defaults(**{**values, **nulls})
    try:
        model_args, script_args, training_args, remaining = parser.parse_args_into_dataclasses(
            args=overrides, return_remaining_strings=True, look_for_args_file=False
        )
    except _ParseError as error:
        raise ValueError(str(error)) from None
    if remaining:
        flags = [t[2:].partition("=")[0] for t in remaining if t.startswith("--")]
        check_keys(dict.fromkeys(flags), known, "the command line")
        raise ValueError(f"cannot parse these command-line arguments: {' '.join(remaining)}")
    return model_args, script_args, training_args


def setup_logging(main_process: bool = True) -> None:
    """Log lines with a time stamp; the library's at INFO on the main process, errors only on the
    others (so that a multi-process run prints each line once)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mallowspo").setLevel(logging.INFO if main_process else logging.ERROR)
