"""The `mallowspo` command line. Each subcommand lives in its own module under
`mallowspo.commands` and exposes `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module under mallowspo.commands, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "fine-tune a causal LM with MallowsPO (YAML config + --key value overrides)"),
    "dispersion": ("dispersion", "run only the reference pass and report the per-prompt dispersion"),
    "demo": ("demo", "the built-in default job (what `make demo` runs)"),
    "bandit": ("bandit", "reproduce the paper's bandit experiment (section 5.2)"),
    "estimator-check": ("estimator_check", "check the entropy dispersion estimator on Mallows rankings (Fig. 3)"),
    "world": ("world", "build the built-in language world (model, tokenizer, data)"),
    "experiment": ("experiment", "multi-seed experiments reproducing the paper at CPU scale"),
}


def _load(module_name: str):
    return importlib.import_module(f"mallowspo.commands.{module_name}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mallowspo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        # Import only the module that runs, so `mallowspo bandit` never pays for transformers.
        if name == wanted:
            _load(module_name).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = _load(SUBCOMMANDS[args.command][0])
    if extra and not getattr(module, "ACCEPTS_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
