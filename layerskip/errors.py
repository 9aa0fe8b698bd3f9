"""The one exception family users see.

Every error a user can cause (bad files, bad settings, bad prompts) is raised as a
``LayerskipError`` whose message says what is wrong and what to do. The CLI prints the
message on one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

import sys
from collections.abc import Callable


class LayerskipError(Exception):
    """An error caused by input the user can fix; the message names the fix."""


class ConfigError(LayerskipError, ValueError):
    """An impossible or unknown setting."""


class DataError(LayerskipError):
    """Missing, empty or unreadable data."""


class CheckpointError(LayerskipError):
    """A checkpoint that is missing, corrupt or does not match its config."""


class PromptError(LayerskipError, ValueError):
    """A prompt that cannot be generated from (empty, or longer than the context)."""


def run_script(main: Callable[[], int], name: str) -> int:
    """Run a standalone script's main as the CLI runs a command: a user error is one line and status 2."""
    try:
        return main()
    except LayerskipError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
