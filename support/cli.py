"""
The command-line boundary: where a user's mistake becomes one line and a non-zero exit, never a traceback.

Library code (support/datasets.py, vfm.py, the tokenizers, ...) raises ordinary exceptions: ValueError for content
that is
not what was expected, OSError (FileNotFoundError, ...) for paths, each with a message that names the file.
The scripts turn those into UserError where they read the user's input (`with user_errors(): ...`), and
`run_command` prints a UserError as `error: <message>` on stderr and exits with status 2.
"""

import argparse
import contextlib
import errno
import math
import os
import signal
import sys

from support import distributed

DISK_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM)
_made = []  # the output directories this command created (make_dir), removed again if it fails with them empty


class UserError(Exception):
    """A mistake in the user's input: run_command prints its message as one line and exits with status 2.

    Under torchrun every rank usually finds the same mistake, and rank 0 alone says it. An error only one rank can
    meet (an unreadable image in its shard, its disk full) is raised with rank_local=True: that rank says it."""

    def __init__(self, message, rank_local=False):
        super().__init__(message)
        self.rank_local = rank_local


class ArgumentParser(argparse.ArgumentParser):
    """argparse, saying a mistake on the command line in one line (with a pointer to --help) rather than after
    the whole usage block; under torchrun, rank 0 alone says it."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def user_errors():
    """Inside this block, a ValueError or OSError from reading the user's files is the user's mistake."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None


def run_command(command, *args):
    """A script's entry point: a UserError becomes one line on stderr and exit status 2. SIGTERM (a cluster or
    torchrun stopping the job) raises as Ctrl-C does, so that cleanups and saves on the way out run; either exits
    with one line and 128 + the signal (130 for Ctrl-C, 143 for SIGTERM). Once the command has returned or raised,
    signals are ignored while the process says why and leaves: torchrun signals every other worker as soon as one
    exits, which must not cut that line short. A process that ran a process group (torchrun) ends here, with that
    status (distributed.end_process)."""
    try:
        result = _run_command(command, *args)
    except SystemExit as e:
        distributed.end_process(e.code)
        raise
    distributed.end_process(0)
    return result


def _run_command(command, *args):
    rank = int(os.environ.get("RANK", "0"))
    _made.clear()
    with distributed.signal_handlers(distributed.interrupt, (signal.SIGTERM,)):
        try:
            try:
                result = command(*args)
                _made.clear()
                return result
            finally:
                distributed.ignore_signals()
                remove_empty_made()
        except UserError as e:
            if e.rank_local and rank != 0:
                print(f"error: rank {rank}: {e}", file=sys.stderr)
            elif rank == 0:
                print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except distributed.PeerStopped as e:  # said once, by rank 0, after the process that stopped said why
            if rank == 0:
                print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as e:  # Ctrl-C, or distributed.Interrupted: a signal, and what was saved
            print(getattr(e, "message", "interrupted"), file=sys.stderr)
            sys.exit(128 + getattr(e, "signum", signal.SIGINT))
        except MemoryError:
            print("error: out of memory: ask for less (fewer samples, steps or a smaller batch)", file=sys.stderr)
            sys.exit(2)
        except OSError as e:  # the disk filled up or a path is not writable: what was written before is intact
            if e.errno not in DISK_FAULTS:
                raise
            print(f"error: {e.filename or 'writing a file'}: {e.strerror}", file=sys.stderr)
            sys.exit(2)


# ---- Checks of numbers and paths, before any work is done ------------------------------------------------

def _flag(name):
    return "--" + name.replace("_", "-")


def check_positive(args, *names):
    """--name must be a finite number > 0 for each of `names` (None means unset and passes)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UserError(f"{_flag(name)} {value}: expected a positive number")


def check_non_negative(args, *names):
    """--name must be a finite number >= 0."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise UserError(f"{_flag(name)} {value}: expected a number >= 0")


def check_finite(args, *names):
    """--name must be a finite number (not nan, not inf)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"{_flag(name)} {value}: expected a finite number")


def check_seed(args, name="seed"):
    """--seed must be an integer in [0, 2^32), the range every random generator here takes."""
    value = getattr(args, name)
    if not 0 <= value < 2**32:
        raise UserError(f"{_flag(name)} {value}: expected an integer in [0, 2^32)")


def check_fraction(args, *names):
    """--name must lie in [0, 1]."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f"{_flag(name)} {value}: expected a number in [0, 1]")


def parse_classes(spec):
    """'1,5,207' -> [1, 5, 207]; None -> None (every class)."""
    if spec is None:
        return None
    try:
        classes = [int(c) for c in str(spec).split(",")]
    except ValueError:
        classes = []
    if not classes or min(classes) < 0:
        raise UserError(f"--classes {spec}: expected class indices separated by commas, such as 1,5,207")
    return classes


def make_dir(path):
    """Create an output directory and check that files can be written in it, or say in one line why not:
    before a long computation, not after it. A command that then fails leaves no empty directory it made."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path}: exists and is not a directory (expected an output directory)")
    top = os.path.abspath(path)
    while not os.path.exists(os.path.dirname(top)):
        top = os.path.dirname(top)
    if not os.path.exists(top):
        _made.append(top)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create the output directory ({e.strerror})") from None
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("x")
    except OSError as e:
        raise UserError(f"{path}: cannot write in the output directory ({e.strerror})") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def remove_empty_made():
    """Remove the directories make_dir created for a command that failed, where nothing was written in them."""
    for top in reversed(_made):
        for root, _, _ in os.walk(top, topdown=False):  # the deepest first
            with contextlib.suppress(OSError):  # not empty: something was written there, and it stays
                os.rmdir(root)
    _made.clear()


def check_output_files(directory, *names):
    """The files a command will write in `directory` must not be directories (or anything but files)."""
    for name in names:
        path = os.path.join(directory, name)
        if os.path.exists(path) and not os.path.isfile(path):
            raise UserError(f"{path}: not a file, so it cannot be written; move it away or choose another --out")


def refuse_overwrite(path, flag="--force"):
    """A file an earlier run wrote stays unless the user says otherwise."""
    if os.path.exists(path):
        raise UserError(f"{path} exists: pass {flag} to replace it, or choose another --out")
