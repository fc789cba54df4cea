"""The command line's error contract.

Errors in what the user gave (settings, paths, data) and in the environment (a full disk)
print one line, `error: <what is wrong and how to fix it>`, and exit with code 2 (Ctrl-C:
one line, code 130); any other exception is a bug and keeps its traceback. See
docs/troubleshooting.md.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager

USER_ERROR_EXIT_CODE = 2
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
    if (
        isinstance(error, OSError)
        and error.strerror
        and error.filename is None
        and error.args[1:] == (error.strerror,)
    ):
        text = error.strerror
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


def is_user_facing(error: BaseException) -> bool:
    """Whether ``error`` is about the user's input or machine (one-line message) rather than a bug."""
    data = sys.modules.get("mallowspo.training.data.validate")  # loaded whenever its error can have been raised
    if data is not None and isinstance(error, data.DataValidationError):
        return True
    checkpoints = sys.modules.get("mallowspo.training.checkpoints")  # likewise
    if checkpoints is not None and isinstance(error, checkpoints.CheckpointError):
        return True
    if isinstance(error, (UserError, FileNotFoundError, FloatingPointError)):
        return True
    return isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS
