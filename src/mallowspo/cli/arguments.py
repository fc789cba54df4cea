"""Argument types shared by the subcommands' own flags (`mallowspo train` and `mallowspo
dispersion` take HfArgumentParser's ``--key value`` instead)."""

from __future__ import annotations

import argparse


def comma_floats(text: str) -> tuple[float, ...]:
    """``"0.1,0.5"`` -> (0.1, 0.5); at least one number."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def comma_names(text: str) -> tuple[str, ...]:
    """``"dpo, phi"`` -> ("dpo", "phi")."""
    return tuple(x.strip() for x in text.split(",") if x.strip())
