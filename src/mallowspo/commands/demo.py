"""`mallowspo demo`: the built-in default job (what `make demo` runs).

DPO, MallowsPO-theta and MallowsPO-phi trained from the built-in world's base model on its
preference pairs with the same budget, then judged on held-out prompts by the true reward
and the KL to the base model (paper §5.3, Fig. 8c), with the dispersion estimate checked
against the truth (Figs. 3 and 7). One seed, one beta, both prompt families: the smallest
configuration of `mallowspo experiment controllable` (``ControllableConfig.demo()``).
Writes report.md, results.json and the figures to --out.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mallowspo.commands.experiment import add_budget_arguments
    from mallowspo.experiments.controllable import ControllableConfig

    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed (default 0)")
    parser.add_argument("--beta", type=float, default=ControllableConfig.demo().betas[0], help="beta of every method")
    add_budget_arguments(parser, ControllableConfig.demo())


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from mallowspo.commands.experiment import config_from_args, run_and_report
    from mallowspo.experiments.controllable import ControllableConfig

    base = replace(ControllableConfig.demo(), seeds=(args.seed,), betas=(args.beta,))
    config = config_from_args(args, base)
    print(f"mallowspo demo: DPO vs MallowsPO-theta vs MallowsPO-phi in the built-in world -> {args.out}", flush=True)
    return run_and_report(config, args.out, args.world, args.jobs, "mallowspo demo")
