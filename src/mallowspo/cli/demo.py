"""`mallowspo demo`: the built-in default job (what `make demo` runs).

DPO, MallowsPO-theta and MallowsPO-phi trained from the built-in world's base model on its
preference pairs with the same budget, then judged on held-out prompts by the true reward
and the KL to the base model (paper §5.3, Fig. 8c), with the dispersion estimate checked
against the truth (Figs. 3 and 7). One seed, one beta, both prompt families: the smallest
configuration of `mallowspo experiment controllable` (``demo_config()``).
Writes report.md, results.json and the figures to --out.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from mallowspo.cli.experiment import add_budget_arguments, config_from_args, run_and_report
from mallowspo.experiments.controllable import ControllableConfig


def demo_config() -> ControllableConfig:
    """The built-in demo: one seed, beta 0.1, both families (what `make demo` runs)."""
    return ControllableConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed (default 0)")
    parser.add_argument("--beta", type=float, default=demo_config().betas[0], help="beta of every method")
    add_budget_arguments(parser, demo_config())


def run(args: argparse.Namespace) -> int:
    base = replace(demo_config(), seeds=(args.seed,), betas=(args.beta,))
    config = config_from_args(args, base)
    print(f"mallowspo demo: DPO vs MallowsPO-theta vs MallowsPO-phi in the built-in world -> {args.out}", flush=True)
    return run_and_report(config, args.out, args.world, args.jobs, "mallowspo demo")
