"""`mallowspo world`: build the built-in world (base model, tokenizer, preference data).

    mallowspo world build [--out DIR] [--seed S] [--data_seed S] [--no_data] [--mini]
    mallowspo world data  [--world DIR] [--seed S] [--out DIR] [--responses K] [--annotators M]
    mallowspo world info  [--world DIR]

`build` rebuilds everything from scratch; `data` redraws the preference data from a built
world's model. Both write to the user world directory ($MALLOWSPO_WORLD_DIR, else
~/.cache/mallowspo/world), which the library then uses instead of the shipped world;
`data --out DIR` writes only the data files to DIR. To refresh the world shipped with the
package, from a source checkout: `mallowspo world build --out src/mallowspo/experiments/world/assets`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from transformers.utils import logging as hf_logging

from mallowspo.cli.errors import user_errors
from mallowspo.experiments.world.build import WorldConfig, build_world_model
from mallowspo.experiments.world.data import WorldDataConfig, generate_preference_data
from mallowspo.experiments.world.paths import ASSETS_DIR, WorldPaths, locate_world, user_world_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="rebuild the world from scratch: corpus, tokenizer, base model, data")
    build.add_argument("--out", type=Path, default=None, help="world directory (default: the user world directory)")
    build.add_argument("--seed", type=int, default=0, help="seed of the title split, corpus and training (default 0)")
    build.add_argument(
        "--data_seed", "--data_seed", type=int, default=0, help="seed of the preference data (default 0)"
    )
    build.add_argument("--no_data", "--no_data", action="store_true", help="build the model only")
    build.add_argument("--mini", action="store_true", help="a miniature world (seconds; for tests and smoke runs)")

    data = actions.add_parser("data", help="redraw the preference data from a built world's base model")
    data.add_argument("--world", type=Path, default=None, help="world whose model samples (default: the one in use)")
    data.add_argument("--seed", type=int, default=0, help="seed of sampling and annotators (default 0)")
    data.add_argument("--out", type=Path, default=None, help="write only the data files to this directory")
    data.add_argument("--responses", type=int, default=None, help="K, responses one annotator ranks (default 4)")
    data.add_argument(
        "--annotators", type=int, default=None, help="M, annotators ranking each prompt's responses (default 5)"
    )

    info = actions.add_parser("info", help="print where the world is and its build and data reports")
    info.add_argument("--world", type=Path, default=None, help="world directory (default: the one in use)")


def run(args: argparse.Namespace) -> int:
    hf_logging.disable_progress_bar()

    if args.action == "build":
        root = args.out if args.out is not None else user_world_dir()
        config = WorldConfig.mini(seed=args.seed) if args.mini else WorldConfig(seed=args.seed)
        build_world_model(root, config)
        if not args.no_data:
            generate_preference_data(root, WorldDataConfig(seed=args.data_seed))
        print(f"world written to {root}")
        return 0

    if args.action == "data":
        source = WorldPaths(args.world) if args.world is not None else locate_world()
        if args.world is None and not source.has_model():  # an empty user directory: use the shipped model
            source = WorldPaths(ASSETS_DIR)
        if not source.has_model():
            print(f"no built world at {source.root}; run `mallowspo world build` first")
            return 1
        fields = {"seed": args.seed}
        if args.responses is not None:
            fields["responses_per_prompt"] = args.responses
        if args.annotators is not None:
            fields["annotators_per_prompt"] = args.annotators
        with user_errors():  # a K or M out of range: one line naming it
            WorldDataConfig(**fields)
        if args.out is not None:
            generate_preference_data(source.root, WorldDataConfig(**fields), out_dir=args.out)
            return 0
        target = WorldPaths(args.world) if args.world is not None else WorldPaths(user_world_dir())
        if target.root.resolve() != source.root.resolve():  # e.g. the shipped world: copy its model out
            shutil.copytree(source.model_dir, target.model_dir, dirs_exist_ok=True)
            shutil.copy2(source.manifest, target.manifest)
        generate_preference_data(target.root, WorldDataConfig(**fields))
        return 0

    paths = WorldPaths(args.world) if args.world is not None else locate_world()
    state = lambda present: "yes" if present else "missing"  # noqa: E731
    print(f"world: {paths.root}  (model: {state(paths.has_model())}, data: {state(paths.has_data())})")
    for report in (paths.manifest, paths.data_report):
        if report.is_file():
            print(f"--- {report}")
            print(json.dumps(json.loads(report.read_text()), indent=2))
    return 0
