"""`mallowspo demo`: the built-in default job (what `make demo` runs).

Until the built-in language world and its MallowsPO-vs-DPO comparison land, the demo is
the paper's bandit reproduction (section 5.2), the one experiment that needs no model.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")


def run(args: argparse.Namespace) -> int:
    from mallowspo.cli import main

    print(f"mallowspo demo: running the bandit reproduction into {args.out}/bandit")
    return main(["bandit", "--out", f"{args.out}/bandit"])
