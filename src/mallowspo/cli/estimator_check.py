"""`mallowspo estimator-check`: the paper's Fig. 3 check of the entropy dispersion
estimator on rankings drawn from Kendall Mallows models (see
``mallowspo.experiments.estimator_check``)."""

from __future__ import annotations

import argparse
import time

from mallowspo.experiments.estimator_check import run_estimator_check, write_outputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=10, help="number of ranked items (default 10)")
    parser.add_argument("--samples", type=int, default=2000, help="rankings drawn per grid point (default 2000)")
    parser.add_argument(
        "--grid_points",
        "--grid-points",
        type=int,
        default=26,
        help="values of the true -log phi, evenly spaced on [0, 5] (default 26)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--out", default="runs/estimator-check", help="output directory (default runs/estimator-check)"
    )


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    result = run_estimator_check(n=args.n, samples=args.samples, grid_points=args.grid_points, seed=args.seed)
    paths = write_outputs(result, args.out)
    print(
        f"estimator-check: n={result.n}, {result.samples} draws x {result.grid_points} grid points, "
        f"{time.perf_counter() - start:.1f}s\n"
        f"  Spearman {result.spearman:.4f}  Pearson {result.pearson:.4f}\n"
        f"  phi* (mean) {result.phi_star_mean:.4f}  RMSE {result.rmse_mean:.4f}\n"
        f"  phi* (least squares) {result.phi_star_lsq:.4f}  RMSE {result.rmse_lsq:.4f}\n"
        f"  wrote {', '.join(str(p) for p in paths.values())}"
    )
    return 0
