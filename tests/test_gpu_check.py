"""experiments/gpu_check.sh on a machine without a GPU: it parses, refuses a wrong subcommand, and checks all it
needs before it runs anything, naming every missing thing in one line. A stand-in python (the real interpreter
without its site-packages, and a stub torch whose CUDA is there or not) shows what it checks, and runs its steps
far enough to fail: the summary and the archive of the logs are all it leaves in OUT."""

import glob
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "experiments", "gpu_check.sh")
BASH = shutil.which("bash")
USAGE = "error: usage: bash experiments/gpu_check.sh {bench|pipeline} [OUT]"
NEED_GIB = {"bench": 4, "pipeline": 32}


def gpu_check(*args, env=None, path=None):
    """(return code, stdout, stderr) of `bash experiments/gpu_check.sh ARGS`; PATH replaced by `path` if given."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHON", "KEEP_WORK")}, "OMP_NUM_THREADS": "1",
           **(env or {})}
    if path is not None:
        env["PATH"] = path
    proc = subprocess.run([BASH, SCRIPT, *map(str, args)], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr


def disk(command):
    """The missing-disk item of the error line on this machine's /tmp, if it lacks the command's space."""
    free = shutil.disk_usage("/tmp").free // 2**30
    return [f"{NEED_GIB[command]} GiB free under /tmp ({free} GiB free)"] if free < NEED_GIB[command] else []


def stand_in(tmp_path, name="python", cuda=False, packages=()):
    """A folder holding `name`, this interpreter without its site-packages (python -S) and with a stub torch of
    version 0.stub, whose torch.cuda.is_available() is `cuda`, and empty stubs of `packages`; the tools the script
    calls beside it."""
    bin_dir, stub = tmp_path / "bin", tmp_path / "stub"
    for package in ("torch", *packages):
        (stub / package).mkdir(parents=True)
        (stub / package / "__init__.py").write_text("")
    (stub / "torch" / "__init__.py").write_text(
        f'__version__ = "0.stub"\n\n\nclass cuda:\n    is_available = staticmethod(lambda: {cuda})\n')
    bin_dir.mkdir()
    (bin_dir / name).write_text(f'#!/bin/sh\nPYTHONPATH={stub} exec {sys.executable} -S "$@"\n')
    (bin_dir / name).chmod(0o755)
    for tool in ("df", "awk", "mkdir", "dirname", "mktemp", "tar", "gzip", "mv", "rm", "tee", "head", "tail",
                 "grep", "date", "cat", "cp", "sed", "kill", "pkill"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_the_script_parses():
    assert subprocess.run([BASH, "-n", SCRIPT], capture_output=True).returncode == 0


def test_a_wrong_subcommand_is_one_line_and_exit_2(tmp_path):
    for args, said in [(["benchmark"], " (got 'benchmark')"), ([], ""),
                       (["bench", tmp_path, "x"], " (got 3 arguments)")]:
        rc, out, err = gpu_check(*args)
        assert (rc, out, err) == (2, "", f"{USAGE}{said}\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run")
def test_without_cuda_bench_stops_before_anything_naming_what_is_missing(tmp_path):
    """This machine's python and torch, no GPU: one line, exit 2, nothing written."""
    before = set(glob.glob("/tmp/gpu-check-*"))
    rc, out, err = gpu_check("bench", tmp_path / "out", env={"PYTHON": sys.executable})
    missing = [f"CUDA (torch {torch.__version__} finds no GPU)"] + disk("bench")
    assert (rc, out, err) == (2, "", f"error: gpu_check.sh bench: missing {', '.join(missing)}\n")
    assert not (tmp_path / "out").exists() and set(glob.glob("/tmp/gpu-check-*")) == before


def test_every_missing_thing_is_named_in_one_line(tmp_path):
    """python3 where there is no python; the packages the steps import, CUDA, an output folder with a summary in
    it already, all in one line."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu-check-pipeline.md").write_text("an earlier run's")
    rc, stdout, err = gpu_check("pipeline", out, path=stand_in(tmp_path, name="python3"))
    missing = ([f"the python package {name}" for name in ("numpy", "PIL", "tqdm", "pytest")]
               + ["CUDA (torch 0.stub finds no GPU)"] + disk("pipeline")
               + [f"a new summary ({out}/gpu-check-pipeline.md exists: give an empty or new output folder)"])
    assert (rc, stdout, err) == (2, "", f"error: gpu_check.sh pipeline: missing {', '.join(missing)}\n")
    assert [p.name for p in out.iterdir()] == ["gpu-check-pipeline.md"]

    rc, stdout, err = gpu_check("bench", out, path=stand_in(tmp_path / "none", name="python2"))
    assert (rc, stdout, err) == (2, "", f"error: gpu_check.sh bench: missing a python with torch (python or python3)"
                                        f"{''.join(', ' + d for d in disk('bench'))}\n")
    rc, stdout, err = gpu_check("bench", out, env={"PYTHON": "no-such-python"})
    assert err.startswith("error: gpu_check.sh bench: missing a python with torch (no-such-python)")


def test_a_failing_step_leaves_the_summary_and_the_logs_alone_in_out(tmp_path):
    """Past the checks (the stubs of torch, with CUDA, and of the packages), a step that fails (it imports what
    the stubs lack) stops the command with its exit status: OUT holds the summary, which says so with the end of
    its log, and the archive of the logs; the work is gone."""
    commands = [(command, failing) for command, failing in (("bench", "bench"), ("pipeline", "data"))
                if not disk(command)]
    if not commands:
        pytest.skip("this machine's /tmp has too little free space for the checks to pass")
    out = tmp_path / "out"
    path = stand_in(tmp_path, cuda=True, packages=("numpy", "PIL", "tqdm", "pytest"))
    before = set(glob.glob("/tmp/gpu-check-*"))
    for command, failing in commands:
        rc, stdout, err = gpu_check(command, out, path=path)
        assert rc == 1, err
        summary = (out / f"gpu-check-{command}.md").read_text()
        assert f"### {failing}\n" in summary and "FAILED (exit status 1)" in summary and "Traceback" in summary
        with tarfile.open(out / f"gpu-check-{command}-logs.tar.gz") as logs:
            names = set(logs.getnames())
        assert f"logs/{failing}.log" in names
    assert sorted(p.name for p in out.iterdir()) == sorted(f"gpu-check-{command}{end}" for command, _ in commands
                                                           for end in (".md", "-logs.tar.gz"))
    assert set(glob.glob("/tmp/gpu-check-*")) == before  # the work folders removed


def test_keep_work_keeps_the_work_folder(tmp_path):
    if disk("bench"):
        pytest.skip("this machine's /tmp has too little free space for the checks to pass")
    path = stand_in(tmp_path, cuda=True, packages=("numpy", "PIL", "tqdm"))
    rc, stdout, err = gpu_check("bench", tmp_path / "out", path=path, env={"KEEP_WORK": "1"})
    kept = stdout.splitlines()[-1].removeprefix("work kept in ")
    assert rc == 1 and kept.startswith("/tmp/gpu-check-bench."), stdout
    try:
        assert os.path.isfile(f"{kept}/logs/bench.log")
    finally:
        shutil.rmtree(kept)
