"""The `mallowspo` command line. Each subcommand lives in its own module under
`mallowspo.cli` and exposes `add_arguments(parser)` and `run(args) -> int`.

The error contract is in ``mallowspo.cli.errors``: a user's error is one line and exit
code 2. `--debug` (or MALLOWSPO_DEBUG=1) shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from mallowspo.cli.errors import USER_ERROR_EXIT_CODE, UserError, is_user_facing, one_line

# name -> (module under mallowspo.cli, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "fine-tune a causal LM with MallowsPO (YAML config + --key value overrides)"),
    "dispersion": ("dispersion", "run only the reference pass and report the per-prompt dispersion"),
    "demo": ("demo", "the built-in default job (what `make demo` runs)"),
    "bandit": ("bandit", "reproduce the paper's bandit experiment (section 5.2)"),
    "estimator-check": ("estimator_check", "check the entropy dispersion estimator on Mallows rankings (Fig. 3)"),
    "world": ("world", "build the built-in language world (model, tokenizer, data)"),
    "experiment": ("experiment", "multi-seed experiments reproducing the paper at CPU scale"),
}
DEBUG_FLAG = "--debug"
DEBUG_ENV = "MALLOWSPO_DEBUG"


def _load(module_name: str):
    return importlib.import_module(f"mallowspo.cli.{module_name}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mallowspo", description=__doc__.splitlines()[0])
    parser.add_argument(DEBUG_FLAG, action="store_true", help=f"show the traceback of every error (or {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        # Import only the module that runs, so `mallowspo bandit` never pays for transformers.
        if name == wanted:
            _load(module_name).add_arguments(sp)
    return parser


def take_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Remove our ``--debug`` from argv: anywhere before the command, and after it when no
    value follows (``--debug VALUE`` after `train` is TrainingArguments' own ``debug`` option)."""
    out, found, seen_command = [], False, False
    for i, token in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        if token == DEBUG_FLAG and (not seen_command or following is None or following.startswith("-")):
            found = True
            continue
        seen_command = seen_command or not token.startswith("-")
        out.append(token)
    return out, found


def _debug_from_env() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, debug = take_debug_flag(argv)
    debug = debug or _debug_from_env()
    try:
        return _run(argv)
    except KeyboardInterrupt as interrupt:
        if debug:
            raise
        hint = getattr(interrupt, "hint", None)
        print(f"error: interrupted{f' ({hint})' if hint else ''}", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - user errors become one line; the rest re-raise
        if debug and isinstance(error, UserError) and error.__cause__ is not None:
            raise error.__cause__ from None  # the original error, with its own traceback
        if debug or not is_user_facing(error):
            raise
        hint = ""
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = " (free some space; a training run resumes from its last checkpoint: --resume_from_checkpoint last)"
        print(f"error: {one_line(error)}{hint}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


def _run(argv: list[str]) -> int:
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
