"""The `mallowspo` command line. Each subcommand lives in its own module under
`mallowspo.commands` and exposes `add_arguments(parser)` and `run(args) -> int`.

Errors in what the user gave (settings, paths, data) and in the environment (a full disk)
print one line, `error: <what is wrong and how to fix it>`, and exit with code 2 (Ctrl-C:
one line, code 130); any other exception is a bug and keeps its traceback. `--debug` (or
MALLOWSPO_DEBUG=1) shows the traceback of every error. See docs/troubleshooting.md.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

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
USER_ERROR_EXIT_CODE = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "MALLOWSPO_DEBUG"
# OSErrors about the machine rather than the code, wherever they happen (e.g. at a checkpoint).
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class UserError(Exception):
    """A problem with what the user gave (settings, paths, data): shown as one line, exit code 2.

    Raised by `user_errors` from the original error (kept as ``__cause__`` for --debug).
    """


@contextmanager
def user_errors() -> Iterator[None]:
    """Treat a ValueError or OSError raised inside as the user's (wrap a command's setup in
    it: checking settings, paths and data, loading; not training, where they would be bugs)."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, OSError) as error:
        raise UserError(one_line(error)) from error


def one_line(error: BaseException) -> str:
    """The error's message on one line (an OSError built as (errno, message) without its '[Errno N]')."""
    text = str(error)
    if isinstance(error, OSError) and error.strerror and error.filename is None and error.args[1:] == (error.strerror,):
        text = error.strerror
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


def is_user_facing(error: BaseException) -> bool:
    """Whether ``error`` is about the user's input or machine (one-line message) rather than a bug."""
    data = sys.modules.get("mallowspo.data")  # loaded whenever its error can have been raised
    if data is not None and isinstance(error, data.DataValidationError):
        return True
    if isinstance(error, (UserError, FileNotFoundError, FloatingPointError)):
        return True
    return isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS


def _load(module_name: str):
    return importlib.import_module(f"mallowspo.commands.{module_name}")


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
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted (a training run resumes from its last checkpoint: --resume_from_checkpoint last)",
              file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
