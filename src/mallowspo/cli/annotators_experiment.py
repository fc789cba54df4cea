"""`mallowspo experiment annotators`: how well M annotators measure -log phi(x), on the built-in
world and on a Kendall Mallows simulation, against the truth and the entropy estimate
(``mallowspo.experiments.annotators``).

    mallowspo experiment annotators --out runs/annotators
"""

from __future__ import annotations

import argparse
import time

from mallowspo.cli.arguments import comma_ints
from mallowspo.cli.errors import user_errors
from mallowspo.experiments.annotators import AnnotatorsConfig, run_annotators, verdict_lines, write_outputs
from mallowspo.experiments.world import ensure_world


def add_parser(experiments) -> None:
    """Add the `annotators` experiment to the `mallowspo experiment` subparsers."""
    defaults = AnnotatorsConfig()
    p = experiments.add_parser(
        "annotators",
        help="how well M annotators estimate -log phi(x), against the truth and the entropy estimate",
        description="Spearman and calibration of the annotator estimates of -log phi(x) for several M, on pairs "
        "and lists of the built-in world and of a Kendall Mallows simulation, next to the entropy estimate.",
    )
    p.add_argument(
        "--annotators",
        type=comma_ints,
        default=defaults.annotators,
        help="comma-separated annotator counts M (default 1,2,3,5,10); beyond the world's 5 more are drawn",
    )
    p.add_argument(
        "--split", choices=("train", "test"), default=defaults.split, help="the world's split (default train)"
    )
    p.add_argument(
        "--max_prompts", "--max-prompts", type=int, default=None, help="the world's first N prompts (default: all)"
    )
    p.add_argument(
        "--list_size",
        "--list-size",
        type=int,
        default=defaults.list_size,
        help=f"K of the world's lists compared separately, and of the simulation (default {defaults.list_size})",
    )
    p.add_argument(
        "--sim_prompts",
        "--sim-prompts",
        type=int,
        default=defaults.sim_prompts,
        help=f"simulated prompts (default {defaults.sim_prompts})",
    )
    p.add_argument(
        "--entropy_samples",
        "--entropy-samples",
        type=int,
        default=defaults.entropy_samples,
        help=f"the simulation's rankings per prompt behind its entropy estimate (default {defaults.entropy_samples})",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the drawn annotators and the simulation")
    p.add_argument("--out", default="runs/annotators", help="output directory (default runs/annotators)")
    p.add_argument(
        "--world", default=None, help="world directory (default: mallowspo.experiments.world.ensure_world())"
    )


def run(args: argparse.Namespace) -> int:
    with user_errors():
        config = AnnotatorsConfig(
            annotators=args.annotators,
            split=args.split,
            max_prompts=args.max_prompts,
            list_size=args.list_size,
            sim_prompts=args.sim_prompts,
            entropy_samples=args.entropy_samples,
            seed=args.seed,
        )
        world = ensure_world(args.world)
    start = time.perf_counter()
    with user_errors():  # the world's files missing or inconsistent
        results = run_annotators(config, world.root)
    paths = write_outputs(results, args.out)
    print(
        f"experiment annotators: done in {time.perf_counter() - start:.0f}s; "
        f"wrote {', '.join(str(p) for p in paths.values())}"
    )
    for line in verdict_lines(results):
        print(f"  {line}")
    return 0
