"""
Files written whole or not at all, and files read with a check.

Every file this repo writes goes through `atomic_write`: the content goes to a temporary file beside the target,
which is then renamed over it, so a crash, a kill or Ctrl-C mid-write leaves the previous file (or none), never
half of one. `load_torch` reads a PyTorch file and says in one message which file is not what was expected.
"""

import errno
import json
import os
import shutil

import numpy as np
import torch


def atomic_write(path, write, mode="wb"):
    """Call write(f) on a temporary file in path's directory, then rename it to `path`."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:  # name the file the user asked for, not the temporary one or none
        e.filename = path
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_npy(path, array):
    atomic_write(path, lambda f: np.save(f, array))


def save_torch(path, obj):
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except RuntimeError:  # torch's zip writer reports a failed write (a full disk) as a RuntimeError
        if shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2**20:
            raise OSError(errno.ENOSPC, "No space left on device", path) from None
        raise


def save_figure(fig, path, **kw):
    """A matplotlib figure as a PNG (110 dpi unless kw says otherwise)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", **{"dpi": 110, **kw}))


def figure(fig, **kw):
    """A writer of a matplotlib figure as a PNG, for write_together (kw: savefig's arguments); it closes the
    figure once written."""
    def write(path):
        save_figure(fig, path, **kw)
        import matplotlib.pyplot as plt  # optional: only the scripts that draw need matplotlib
        plt.close(fig)
    return write


def write_together(writers):
    """{path: write(path)}: each file is first written whole beside its target (with the writers above), then
    all are renamed over their targets. A failure while writing (a full disk) leaves every target as it was."""
    try:
        for path, write in writers.items():
            write(path + ".new")
        for path in writers:
            os.replace(path + ".new", path)
    finally:
        for path in writers:
            if os.path.exists(path + ".new"):
                os.remove(path + ".new")


def copy(source, path):
    with open(source, "rb") as src:
        atomic_write(path, lambda f: shutil.copyfileobj(src, f))


def load_torch(path, expected, weights_only=True, mmap=False):
    """torch.load to the CPU, or FileNotFoundError / ValueError naming `path` and what was `expected` there.
    mmap=True maps the tensors' storage from the file instead of reading it all into memory."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: a directory; expected {expected}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; expected {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as e:  # zip, pickle and torch each raise their own errors for a truncated or foreign file
        raise ValueError(f"{path}: not a readable PyTorch file ({type(e).__name__}); expected {expected}") from None


def markdown_table(header, rows):
    """A markdown table: a header row, then one row per list of cells."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def drop_jsonl_after(path, step):
    """Keep the lines of a JSON-lines log whose "step" is at most `step` (a resumed run trains and logs the steps
    after its checkpoint again); a line cut short by a kill goes too."""
    if not os.path.exists(path):
        return
    kept = []
    for line in open(path, errors="replace").read().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    write_text(path, "".join(kept))
