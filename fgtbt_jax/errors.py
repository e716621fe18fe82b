"""The project's own errors and the entry point every script's main runs under.

An :class:`Error` is a problem with what the user gave (an unsafe or malformed checkpoint, a
checkpoint that does not fit the config, a bad dataset file, a bad config value), not a bug:
:func:`run` prints it as one ``error: …`` line on stderr and exits with status 1. Anything else
(a bug) keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Error(Exception):
    """Base of the errors a script reports as one line (the user's input is wrong)."""


class ConfigError(Error, ValueError):
    """A config value is out of range or inconsistent with another one."""


class InputFileError(Error, ValueError):
    """A file given on the command line (e.g. a JSON of face boxes) is malformed."""


# Besides Error: a path the user named that does not exist.
USER_ERRORS: tuple[type[BaseException], ...] = (Error, FileNotFoundError)


def message(e: BaseException) -> str:
    """The one-line report of ``e``, ``error: <first line of its message>``, preceded by the
    message's further lines (details such as a list of mismatched keys) when it has any."""
    first, *details = str(e).splitlines() or [type(e).__name__]
    if details:
        first = first.rstrip(":") + " (details above)"
    return "\n".join([*details, f"error: {first}"])


def exit_on_error(fn: Callable[[], T]) -> T:
    """``fn()``; an :data:`USER_ERRORS` exception is printed as :func:`message` on stderr (its
    last line ``error: …``, no traceback) and the process exits with status 1."""
    try:
        return fn()
    except USER_ERRORS as e:
        print(message(e), file=sys.stderr)
        sys.exit(1)


def run(main: Callable[[list[str]], int | None]) -> None:
    """``absl.app.run(main)`` under :func:`exit_on_error`: what every script's ``__main__``
    calls."""
    from absl import app

    exit_on_error(lambda: app.run(main))
