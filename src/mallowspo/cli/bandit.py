"""`mallowspo bandit`: the paper's bandit experiment (§5.2, App. C.1), DPO against
MallowsPO-phi under each smoothing of the phi link (see ``mallowspo.experiments.bandit``)."""

from __future__ import annotations

import argparse
import json
import time

from mallowspo.cli.arguments import comma_floats, comma_names
from mallowspo.experiments.bandit import DEFAULT_BETAS, METHODS, BanditConfig, run_bandit, write_outputs, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/bandit", help="output directory (default runs/bandit)")
    parser.add_argument("--epochs", type=int, default=500_000, help="SGD steps on the full batch (default 500000)")
    parser.add_argument(
        "--betas",
        type=comma_floats,
        default=None,
        help="comma-separated betas (default 16 log-spaced in [0.01, 10]); 0.05, 0.1, 0.5, 1 are always added",
    )
    parser.add_argument("--lr", type=float, default=5e-3, help="SGD learning rate (default 5e-3)")
    parser.add_argument("--phi", type=float, default=0.05, help="Mallows dispersion of every pair (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (nothing is random; recorded)")
    parser.add_argument(
        "--record_every", "--record-every", type=int, default=100, help="epochs between records (default 100)"
    )
    parser.add_argument(
        "--methods",
        type=comma_names,
        default=tuple(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default all)",
    )
    parser.add_argument(
        "--check_every",
        "--check-every",
        type=int,
        default=10_000,
        help="epochs between checks of the closed-form step against autograd through preference_loss (default 10000)",
    )
    parser.add_argument(
        "--report_only",
        "--report-only",
        action="store_true",
        help="redraw figures and README.md from an existing --out, no training",
    )


def run(args: argparse.Namespace) -> int:
    if args.report_only:
        paths = write_report(args.out)
        print(f"bandit: redrew {', '.join(str(p) for p in paths.values())}")
        return 0
    cfg = BanditConfig(
        epochs=args.epochs,
        betas=args.betas or DEFAULT_BETAS,
        lr=args.lr,
        phi=args.phi,
        seed=args.seed,
        record_every=args.record_every,
        methods=args.methods,
        check_every=args.check_every,
    )
    print(
        f"bandit: {len(cfg.methods)} methods x {len(cfg.betas)} betas, {cfg.epochs} epochs, lr {cfg.lr}, "
        f"phi {cfg.phi}",
        flush=True,
    )
    start = time.perf_counter()
    runs = run_bandit(cfg)
    seconds = time.perf_counter() - start
    paths = write_outputs(cfg, runs, args.out, seconds)

    methods = json.loads(paths["results"].read_text())["methods"]
    for r in methods.values():
        bb, tb = r["best_reward_over_beta"], r["training_frontier"]["best"]
        p05 = " ".join(f"{x:.2f}" for x in r["per_beta"]["0.05"]["final_probs"])
        print(
            f"  {r['label']:<40s} best reward over beta {bb['reward']:.3f} (beta {bb['beta']:g}), "
            f"over training {tb['reward']:.3f}; beta 0.05 arms [{p05}]; "
            f"check vs library {r['library_check']['max_rel_diff']:.1e}"
        )
    print(f"bandit: {seconds:.0f}s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0
