"""Argument types shared by the subcommands' own flags (`mallowspo train` and `mallowspo
dispersion` take HfArgumentParser's ``--key value`` instead)."""

from __future__ import annotations

import argparse


def _comma_separated(text: str, kind, what: str) -> tuple:
    """``text`` split at commas and each piece read by ``kind``; at least one value."""
    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}s, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one {what}")
    return values


def comma_floats(text: str) -> tuple[float, ...]:
    """``"0.1,0.5"`` -> (0.1, 0.5); at least one number."""
    return _comma_separated(text, float, "number")


def comma_ints(text: str) -> tuple[int, ...]:
    """``"1,2,5"`` -> (1, 2, 5); at least one integer."""
    return _comma_separated(text, int, "integer")


def comma_names(text: str) -> tuple[str, ...]:
    """``"dpo, phi"`` -> ("dpo", "phi")."""
    return tuple(x.strip() for x in text.split(",") if x.strip())
