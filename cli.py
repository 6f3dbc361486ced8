"""
The command-line boundary: where a user's mistake becomes one line and a non-zero exit, never a traceback.

Library code (data.py, vfm.py, the tokenizers, ...) raises ordinary exceptions: ValueError for content that is
not what was expected, OSError (FileNotFoundError, ...) for paths, each with a message that names the file.
The scripts turn those into UserError where they read the user's input (`with user_errors(): ...`), and
`run_command` prints a UserError as `error: <message>` on stderr and exits with status 2.
"""

import contextlib
import os
import sys


class UserError(Exception):
    """A mistake in the user's input: run_command prints its message as one line and exits with status 2."""


@contextlib.contextmanager
def user_errors():
    """Inside this block, a ValueError or OSError from reading the user's files is the user's mistake."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None


def run_command(command, *args):
    """A script's entry point: a UserError becomes one line on stderr (said once, by rank 0, under torchrun, where
    every rank finds the same mistake) and exit status 2; Ctrl-C exits with 130, after whatever the command saves
    on its way out."""
    try:
        return command(*args)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def check_positive(args, *names):
    """--name must be > 0 for each of `names` (None means unset and passes)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} {value}: expected a positive number")


def make_dir(path):
    """Create an output directory, or say in one line why it cannot be."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create the output directory ({e.strerror})") from None
