"""`mallowspo experiment`: multi-seed experiments reproducing the paper at CPU scale.

    mallowspo experiment controllable --seeds 3 --betas 0.1,0.5 --family open --out runs/controllable-open

``controllable``: the paper's controllable-generation comparison (§5.3, Fig. 8c) in the
built-in world, DPO against MallowsPO-theta and MallowsPO-phi over several seeds and a beta
grid, with 95% t-intervals over seeds (``mallowspo.experiments.controllable``; the same
pipeline as ``mallowspo demo``). ``--report_only`` redraws the report from results.json.

``annotators``: how well M annotators measure -log phi(x) against the truth and the entropy
estimate, in the world and a Kendall simulation (``mallowspo.cli.annotators_experiment``).

``dispersion_sources``: the controllable experiment with -log phi(x) from the truth, the
annotators, the entropy or a placebo (``mallowspo.experiments.dispersion_sources``).

``listwise``: DPO best-vs-worst against DPO on all pairs, Plackett-Luce, MallowsPO-theta with
Plackett-Luce and MallowsPO-phi on all pairs, on the world's ranked lists
(``mallowspo.experiments.listwise``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from mallowspo.cli import annotators_experiment
from mallowspo.cli.arguments import comma_floats, comma_names
from mallowspo.cli.errors import user_errors
from mallowspo.experiments.controllable import (
    FAMILY_CHOICES,
    METHODS,
    ControllableConfig,
    load_results,
    run_controllable,
    verdict_lines,
    write_outputs,
)
from mallowspo.experiments.world import ensure_world


def add_budget_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """The training and evaluation budget of a controllable run (shared with `mallowspo demo`);
    ``defaults`` is the ``ControllableConfig`` whose values are the defaults."""
    g = parser.add_argument_group("budget (the same for every method)")
    g.add_argument(
        "--steps", type=int, default=defaults.max_steps, help=f"optimizer steps per run (default {defaults.max_steps})"
    )
    g.add_argument(
        "--batch_size",
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"pairs per step (default {defaults.batch_size})",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=defaults.learning_rate,
        help=f"AdamW learning rate (default {defaults.learning_rate:g})",
    )
    g.add_argument(
        "--eval_points",
        "--eval-points",
        type=int,
        default=defaults.eval_points,
        help=f"evaluated checkpoints, step 0 and the last included (default {defaults.eval_points})",
    )
    g.add_argument(
        "--eval_prompts",
        "--eval-prompts",
        type=int,
        default=defaults.eval_prompts,
        help=f"held-out prompts sampled from (default {defaults.eval_prompts})",
    )
    g.add_argument(
        "--samples",
        type=int,
        default=defaults.samples_per_prompt,
        help=f"samples per held-out prompt (default {defaults.samples_per_prompt})",
    )
    g.add_argument(
        "--eval_pairs",
        "--eval-pairs",
        type=int,
        default=defaults.eval_pairs,
        help="held-out pairs for the accuracy (default: all)",
    )
    g.add_argument(
        "--train_rows",
        "--train-rows",
        type=int,
        default=defaults.train_rows,
        help="cap on training pairs (default: all)",
    )
    g.add_argument(
        "--max_new_tokens",
        "--max-new-tokens",
        type=int,
        default=defaults.max_new_tokens,
        help=f"sampling budget per response (default {defaults.max_new_tokens})",
    )
    g.add_argument("--jobs", type=int, default=1, help="runs trained at a time, in worker processes (default 1)")
    g.add_argument(
        "--world", default=None, help="world directory (default: mallowspo.experiments.world.ensure_world())"
    )


def config_from_args(args: argparse.Namespace, base):
    """``base`` (a ``ControllableConfig``) with the budget arguments applied."""
    return replace(
        base,
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        eval_points=args.eval_points,
        eval_prompts=args.eval_prompts,
        samples_per_prompt=args.samples,
        eval_pairs=args.eval_pairs,
        train_rows=args.train_rows,
        max_new_tokens=args.max_new_tokens,
        disable_tqdm=args.jobs > 1,
    )


def run_and_report(config, out: str, world: str | None, jobs: int, title: str) -> int:
    """Run the controllable pipeline, write its outputs, print where they are and the verdict."""
    with user_errors():  # a world directory that is missing or not a directory: the user's
        ensure_world(world)
    start = time.perf_counter()
    results = run_controllable(config, out, world_root=world, jobs=jobs)
    paths = write_outputs(results, out)
    print(f"{title}: done in {time.perf_counter() - start:.0f}s; wrote {', '.join(str(p) for p in paths.values())}")
    for line in verdict_lines(results):
        print(f"  {line.replace('**', '')}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    p = experiments.add_parser(
        "controllable",
        help="§5.3 controllable generation in the built-in world: DPO vs MallowsPO-theta/phi over seeds and betas",
        description="DPO vs MallowsPO-theta vs MallowsPO-phi in the built-in world over seeds and a beta grid "
        "(paper §5.3, Fig. 8c), with 95%% t-intervals over seeds.",
    )
    defaults = ControllableConfig()
    p.add_argument("--seeds", type=int, default=3, help="number of seeds: 0..N-1 (default 3)")
    p.add_argument("--betas", type=comma_floats, default=defaults.betas, help="comma-separated betas (default 0.1)")
    p.add_argument(
        "--family",
        choices=FAMILY_CHOICES,
        default="mix",
        help="train and evaluate on closed prompts, open prompts, or both (default mix)",
    )
    p.add_argument(
        "--methods", type=comma_names, default=defaults.methods, help=f"subset of {','.join(METHODS)} (default all)"
    )
    p.add_argument("--out", default=None, help="output directory (default runs/controllable-FAMILY)")
    p.add_argument(
        "--report_only",
        "--report-only",
        action="store_true",
        help="redraw the report and figures from OUT/results.json",
    )
    add_budget_arguments(p, defaults)
    add_dispersion_sources_arguments(experiments)
    annotators_experiment.add_parser(experiments)
    add_listwise_arguments(experiments)


def run(args: argparse.Namespace) -> int:
    if args.experiment == "annotators":
        return annotators_experiment.run(args)
    if args.experiment == "dispersion_sources":
        return run_dispersion_sources_command(args)
    if args.experiment == "listwise":
        return run_listwise_command(args)
    out = args.out or f"runs/controllable-{args.family}"
    if args.report_only:
        paths = write_outputs(load_results(out), out)
        print(f"experiment controllable: redrew {', '.join(str(p) for p in paths.values())}")
        return 0
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    base = ControllableConfig(
        seeds=tuple(range(args.seeds)), betas=args.betas, methods=args.methods, family=args.family
    )
    config = config_from_args(args, base)
    return run_and_report(config, out, args.world, args.jobs, "experiment controllable")


def add_dispersion_sources_arguments(experiments) -> None:
    """``dispersion_sources``: the controllable experiment over where -log phi(x) comes from."""
    from mallowspo.experiments.dispersion_sources import SOURCES, DispersionSourcesConfig

    p = experiments.add_parser(
        "dispersion_sources",
        help="does knowing the dispersion help? DPO vs MallowsPO-theta/phi with the oracle, annotators, entropy, "
        "placebo dispersion",
        description="The controllable experiment with the dispersion from the world's truth (oracle), the M = 5 "
        "annotators, the entropy, or the oracle shuffled across prompts (placebo); 95%% t-intervals over seeds.",
    )
    defaults = DispersionSourcesConfig()
    p.add_argument("--seeds", type=int, default=3, help="number of seeds: 0..N-1 (default 3)")
    p.add_argument(
        "--beta", "--betas", dest="betas", type=comma_floats, default=defaults.betas, help="beta(s) (default 0.1)"
    )
    p.add_argument("--family", choices=FAMILY_CHOICES, default="mix", help="closed, open or mix (default mix)")
    p.add_argument("--sources", type=comma_names, default=SOURCES, help=f"subset of {','.join(SOURCES)} (default all)")
    p.add_argument(
        "--methods", type=comma_names, default=defaults.methods, help="subset of dpo,theta,phi (default all)"
    )
    p.add_argument("--out", default=None, help="output directory (default runs/dispersion-sources-FAMILY)")
    p.add_argument(
        "--report_only", "--report-only", action="store_true", help="redraw report.md from OUT/results.json"
    )
    add_budget_arguments(p, defaults)


def run_dispersion_sources_command(args: argparse.Namespace) -> int:
    from mallowspo.experiments import dispersion_sources as ds

    out = args.out or f"runs/dispersion-sources-{args.family}"
    if args.report_only:
        paths = ds.write_outputs(ds.load_results(out), out)
        print(f"experiment dispersion_sources: redrew {', '.join(str(p) for p in paths.values())}")
        return 0
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    with user_errors():
        base = ds.DispersionSourcesConfig(
            seeds=tuple(range(args.seeds)), betas=args.betas, methods=args.methods, family=args.family,
            sources=args.sources,
        )  # fmt: skip
        ensure_world(args.world)
    start = time.perf_counter()
    results = ds.run_dispersion_sources(config_from_args(args, base), out, world_root=args.world, jobs=args.jobs)
    paths = ds.write_outputs(results, out)
    print(f"experiment dispersion_sources: done in {time.perf_counter() - start:.0f}s; wrote {paths['report']}")
    for line in ds.verdict_lines(next(iter(results["summary"].values()))):
        print(f"  {line}")
    return 0


def add_listwise_arguments(experiments) -> None:
    """``listwise``: pairs against whole rankings, with and without the Mallows modifier."""
    from mallowspo.experiments.listwise import ARMS, ListwiseConfig

    p = experiments.add_parser(
        "listwise",
        help="DPO best-vs-worst vs DPO all pairs, Plackett-Luce, MallowsPO-theta + PL and MallowsPO-phi all pairs "
        "on the world's ranked lists",
        description="Five arms on the same train lists of the built-in world (same prompts, steps and learning "
        "rate): reward at equal KL, KL, and Kendall's tau on held-out lists; 95%% t-intervals over seeds.",
    )
    defaults = ListwiseConfig()
    p.add_argument("--seeds", type=int, default=3, help="number of seeds: 0..N-1 (default 3)")
    p.add_argument(
        "--beta", "--betas", dest="betas", type=comma_floats, default=defaults.betas, help="beta(s) (default 0.1)"
    )
    p.add_argument("--family", choices=FAMILY_CHOICES, default="mix", help="closed, open or mix (default mix)")
    p.add_argument(
        "--methods", type=comma_names, default=defaults.methods, help=f"subset of {','.join(ARMS)} (default all)"
    )
    p.add_argument(
        "--eval_lists",
        "--eval-lists",
        type=int,
        default=None,
        help="held-out lists for the Kendall tau (default: all)",
    )
    p.add_argument("--out", default=None, help="output directory (default runs/listwise-FAMILY)")
    p.add_argument(
        "--report_only", "--report-only", action="store_true", help="redraw the report from OUT/results.json"
    )
    add_budget_arguments(p, defaults)


def run_listwise_command(args: argparse.Namespace) -> int:
    from mallowspo.experiments import listwise

    out = args.out or f"runs/listwise-{args.family}"
    if args.report_only:
        paths = listwise.write_outputs(listwise.load_results(out), out)
        print(f"experiment listwise: redrew {', '.join(str(p) for p in paths.values())}")
        return 0
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    with user_errors():
        base = listwise.ListwiseConfig(
            seeds=tuple(range(args.seeds)), betas=args.betas, methods=args.methods, family=args.family,
            eval_lists=args.eval_lists,
        )  # fmt: skip
        ensure_world(args.world)
    start = time.perf_counter()
    with user_errors():  # a world without its lists
        results = listwise.run_listwise(config_from_args(args, base), out, world_root=args.world, jobs=args.jobs)
    paths = listwise.write_outputs(results, out)
    print(
        f"experiment listwise: done in {time.perf_counter() - start:.0f}s; wrote {', '.join(str(p) for p in paths.values())}"
    )
    for line in listwise.verdict_lines(next(iter(results["summary"].values()))):
        print(f"  {line}")
    return 0
