"""support/cli.py's run_command, every script's entry point: SIGTERM raises as Ctrl-C does, so cleanups run; a
process that ran a process group ends there without finalizing the interpreter."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import train
from conftest import ROOT, cli, free_port
from support import distributed
from support.cli import UserError, make_dir, run_command


class Unhandled(Exception):
    pass


def test_sigterm_raises_like_ctrl_c_runs_the_cleanups_and_exits_143(capsys):
    """Inside a command SIGTERM is an exception (KeyboardInterrupt's kind), not a silent death: `finally` blocks run,
    the command says "interrupted" and exits 143; afterwards the handler before it is back."""

    def outside(signum, frame):  # stands for whatever handled SIGTERM before the command (here: not a death)
        raise Unhandled

    cleaned = []

    def command():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        finally:
            cleaned.append(True)

    previous = signal.signal(signal.SIGTERM, outside)
    try:
        with pytest.raises(SystemExit) as e:
            run_command(command)
        assert signal.getsignal(signal.SIGTERM) is outside
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.code == 143 and cleaned == [True] and capsys.readouterr().err == "interrupted\n"


def test_a_stop_request_is_noted_and_a_second_signal_quits_at_once():
    """train.py's handler only notes the first signal (the loop saves and stops at its step); a second raises at
    once, except a SIGTERM within a second of the first: the same request twice (SLURM signals every process of a
    job step, and torchrun forwards its own copy to its workers)."""
    stops = distributed.StopRequests(1, torch.device("cpu"))
    assert stops.requested(1) == 0
    stops.on_signal(signal.SIGTERM, None)
    stops.on_signal(signal.SIGTERM, None)
    assert stops.requested(2) == signal.SIGTERM
    stops.since -= 2  # a second later
    with pytest.raises(distributed.Interrupted) as e:
        stops.on_signal(signal.SIGTERM, None)
    assert e.value.signum == signal.SIGTERM
    stops = distributed.StopRequests(1, torch.device("cpu"))
    stops.on_signal(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C twice: out at once, as before
        stops.on_signal(signal.SIGINT, None)


# A command that joins a process group (of one gloo process, as torchrun would set it up), prints a line without
# ending it, and ends as asked; the interpreter would run the atexit handler if it were finalized.
IN_A_PROCESS_GROUP = textwrap.dedent("""
    import atexit, sys
    from support import distributed
    from support.cli import UserError, run_command

    def command():
        with distributed.processes():
            print("said", end="")
            if sys.argv[1] == "user error":
                raise UserError("a mistake")
            if sys.argv[1] == "interrupted":
                raise distributed.Interrupted()

    atexit.register(lambda: print(" and finalized"))
    run_command(command)
""")


@pytest.mark.parametrize("ending, status", [("done", 0), ("user error", 2), ("interrupted", 130)])
def test_a_process_that_ran_a_process_group_ends_unfinalized_with_its_status_and_output(ending, status):
    """Under torchrun a process ends once run_command has said why, without finalizing the interpreter (a gloo
    thread can still be releasing the last collective's tensors, and a thread that asks for the GIL during
    finalization aborts the process): the command's exit status, its output flushed, no atexit handler run."""
    group = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env = {k: v for k, v in dict(os.environ, **group).items() if k != "PYTHONUNBUFFERED"}  # stdout buffered
    proc = subprocess.run([sys.executable, "-c", IN_A_PROCESS_GROUP, ending], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == status and proc.stdout == "said", proc.stderr[-2000:]
    said = {"done": "", "user error": "error: a mistake\n", "interrupted": "interrupted\n"}[ending]
    assert proc.stderr == said


def test_sample_stopped_by_sigterm_keeps_its_batches_and_says_how_to_resume(codes_dir, tmp_path):
    """sample.py stopped by SIGTERM mid-run (as a cluster stops a job): the batches it drew stay in OUT/.parts with
    the record of how they were drawn, no samples.npz is left, whole or half-written, and one line says how to go
    on; exit 143."""
    train.main(["--codes", str(codes_dir), "--out", str(tmp_path / "run"), "--steps", "1", "--model", "DiT-T/1",
                "--batch-size", "8", "--sample-every", "0"])
    out = tmp_path / "s"
    cmd, kwargs = cli("sample.py", "--ckpt", tmp_path / "run" / "checkpoints" / "last.pt", "--num-samples", 100_000,
                      "--batch-size", 10, "--steps", 20, "--out", out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / ".parts").is_dir() and len(os.listdir(out / ".parts")) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    kept = len(os.listdir(out / ".parts")) - 1
    assert sorted(os.listdir(out / ".parts")) == ["drawn-with.json"] + [f"images-{b:06d}.npy" for b in range(kept)]
    assert err.rstrip().splitlines()[-1] == (f"interrupted: {kept} of 10000 batches kept in {out / '.parts'}; rerun "
                                             f"with --resume to continue")
    assert sorted(os.listdir(out)) == [".parts"]


@pytest.mark.parametrize("ending", ["user error", "ctrl-c", "success"])
def test_a_failed_command_leaves_no_empty_directory_it_made(ending, tmp_path, capsys):
    """The output directories make_dir created go again when the command fails with nothing written in them; a
    directory that was there before, one holding a file, and those of a command that succeeded stay."""
    (tmp_path / "was-there").mkdir()

    def command():
        make_dir(tmp_path / "new" / "deep" / "out")
        make_dir(tmp_path / "was-there" / "out")
        make_dir(tmp_path / "kept" / "out")
        (tmp_path / "kept" / "out" / "log.txt").write_text("written")
        make_dir(tmp_path / "kept" / "empty")
        if ending == "user error":
            raise UserError("a mistake")
        if ending == "ctrl-c":
            raise KeyboardInterrupt

    if ending == "success":
        run_command(command)
    else:
        with pytest.raises(SystemExit):
            run_command(command)
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    if ending == "success":
        assert made == ["kept", "kept/empty", "kept/out", "kept/out/log.txt", "new", "new/deep", "new/deep/out",
                        "was-there", "was-there/out"]
    else:
        assert made == ["kept", "kept/out", "kept/out/log.txt", "was-there"]
