"""train.py on a slice of real Fashion-MNIST codes: every objective, resume, DDP on 2 CPU processes, bad input."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

import train
from conftest import cli, run_cli, workers_said
from dit import DiT
from support import checkpoint

SMALL = ["--model", "DiT-T/1", "--batch-size", "8", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "0"]


def weights(run):
    return torch.load(os.path.join(run, "checkpoints", "last.pt"), map_location="cpu", weights_only=False)


def assert_same_state(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    assert a["step"] == b["step"] and a["data"] == b["data"]
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.mark.parametrize("objective", ["purrception", "cfm", "cfm-endpoint", "dfm"])
def test_each_objective_trains_logs_and_checkpoints(codes_dir, tmp_path, objective):
    run = tmp_path / "run"
    train.main(["--codes", str(codes_dir), "--objective", objective, "--out", str(run), "--steps", "4",
                *SMALL, "--sample-every", "4" if objective == "purrception" else "0", "--keep-every", "2"])
    ckpt = weights(run)
    assert ckpt["step"] == 4 and ckpt["settings"]["objective"] == objective
    assert sorted(os.listdir(run / "checkpoints")) == ["last.pt", "step-0000002.pt", "step-0000004.pt"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(len(r["loss_by_t"]) == 10 and np.isfinite(r["loss"]) for r in records)
    if objective == "purrception":
        assert (run / "samples" / "step-0000004.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_equals_uninterrupted(codes_dir, tmp_path):
    common = ["--codes", str(codes_dir), *SMALL, "--lr", "1e-3", "--ema-decay", "0.9", "--grad-accum", "2"]
    train.main(common + ["--out", str(tmp_path / "full"), "--steps", "6"])
    train.main(common + ["--out", str(tmp_path / "split"), "--steps", "3", "--ckpt-every", "3"])
    train.main(common + ["--out", str(tmp_path / "split"), "--steps", "6", "--resume"])
    assert_same_state(weights(tmp_path / "full"), weights(tmp_path / "split"))


def test_previews_do_not_change_training_and_a_preview_step_resumes_exactly(codes_dir, tmp_path, monkeypatch):
    """A preview draws from its own random state: a run with previews reaches the weights of one without, and a
    run whose checkpoint falls on a preview step resumes to the weights of the uninterrupted run."""
    monkeypatch.setattr(train, "PREVIEW_STEPS", 3)  # a preview still draws noise and solves, in fewer steps
    common = ["--codes", str(codes_dir), *SMALL, "--lr", "1e-3", "--ema-decay", "0.9"]
    train.main(common + ["--out", str(tmp_path / "none"), "--steps", "4"])
    train.main(common + ["--out", str(tmp_path / "full"), "--steps", "4", "--sample-every", "2"])
    train.main(common + ["--out", str(tmp_path / "split"), "--steps", "2", "--sample-every", "2"])
    train.main(common + ["--out", str(tmp_path / "split"), "--steps", "4", "--sample-every", "2", "--resume"])
    assert sorted(os.listdir(tmp_path / "full" / "samples")) == ["step-0000002.png", "step-0000004.png"]
    assert_same_state(weights(tmp_path / "none"), weights(tmp_path / "full"))
    assert_same_state(weights(tmp_path / "full"), weights(tmp_path / "split"))


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_the_step_it_finished(codes_dir, tmp_path, signum, code):
    """Ctrl-C (SIGINT), or SIGTERM as a cluster stops a job, between checkpoints: the run finishes its step, saves
    it, says so in one line, exits 130 or 143, and resumes from there to the uninterrupted run's exact state."""
    common = ["--codes", codes_dir, *SMALL, "--ckpt-every", "1000", "--log-every", "1", "--lr", "1e-3"]
    run = tmp_path / "run"
    log = open(tmp_path / "run.log", "w+")
    cmd, kwargs = cli("train.py", *common, "--out", run, "--steps", 1000)
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, **kwargs)
    wait_for_steps(proc, run, 3)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == code
    log.close()
    step = weights(run)["step"]
    assert 3 <= step < 1000
    text = (tmp_path / "run.log").read_text()
    assert text.rstrip().endswith(f"\ninterrupted: checkpoint saved at step {step}; rerun with --resume to continue")
    assert "Traceback" not in text
    train.main([*map(str, common), "--out", str(run), "--steps", str(step + 2), "--resume"])
    train.main([*map(str, common), "--out", str(tmp_path / "full"), "--steps", str(step + 2)])
    assert_same_state(weights(tmp_path / "full"), weights(run))


def wait_for_steps(proc, run, n, timeout=300):
    """Until the run (--log-every 1: a line per step) has logged n steps, or its process ended."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "log.jsonl").exists() and len((run / "log.jsonl").read_text().splitlines()) >= n:
            return
        time.sleep(0.05)


def children():
    """{pid: [its child processes]} of every process, from /proc."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found.setdefault(ppid, []).append(int(entry))
    return found


def kill_tree(pid):
    """SIGKILL a process and all its descendants, as a lost node would: torchrun starts its workers in sessions
    of their own, so killing torchrun's process group alone leaves them running."""
    tree = children()
    todo, found = [pid], []
    while todo:
        found.append(todo.pop())
        todo += tree.get(found[-1], [])
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def worker_pids(torchrun_pid):
    """{rank: pid} of the workers a torchrun process started: its children, each with RANK in its environment."""
    ranks = {}
    for pid in children().get(torchrun_pid, []):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def test_ddp_sigterm_to_one_worker_stops_every_rank_at_the_same_step(codes_dir, tmp_path):
    """torchrun --nproc_per_node=2 on CPU, SIGTERM sent to rank 1 alone: rank 0 learns of it when the ranks agree
    at the next step, both finish that step, save it together, and each exits non-zero with one line; resumed,
    the run ends exactly where an uninterrupted run does."""
    common = ["--codes", codes_dir, *SMALL, "--ckpt-every", "1000", "--log-every", "1", "--lr", "1e-3"]
    torchrun = "torchrun --standalone --nproc_per_node=2 train.py"
    run = tmp_path / "run"
    cmd, kwargs = cli(torchrun, *common, "--out", run, "--steps", 1000)
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, **kwargs)
    try:
        wait_for_steps(proc, run, 3)
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-2000:]
        os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        kill_tree(proc.pid)
        proc.wait()
        log.close()
    text = (tmp_path / "run.log").read_text()
    step = weights(run)["step"]
    assert 3 <= step < 1000, text[-2000:]
    assert f"interrupted: checkpoint saved at step {step}; rerun with --resume to continue" in text, text[-2000:]
    assert f"interrupted: rank 1 stopped at step {step}" in text and "(exitcode: 143)" in text, text[-2000:]
    assert f'File "{os.path.dirname(train.__file__)}' not in text  # no traceback of a worker (torchrun prints its own)

    rc, out, err = run_cli(torchrun, *common, "--out", run, "--steps", step + 2, "--resume")
    assert rc == 0 and f"resumed at step {step}" in out, workers_said(err)
    rc, out, err = run_cli(torchrun, *common, "--out", tmp_path / "full", "--steps", step + 2)
    assert rc == 0, workers_said(err)
    assert_same_state(weights(tmp_path / "full"), weights(run))


def test_ddp_two_gloo_processes_killed_then_resumed(codes_dir, tmp_path):
    """torchrun --nproc_per_node=2 on CPU, killed (SIGKILL, every process) after its third checkpoint and with a
    half-written checkpoint file beside the last one: resumed, it ends exactly where an uninterrupted run does."""
    common = ["--codes", codes_dir, *SMALL, "--ckpt-every", "1", "--lr", "1e-3"]
    torchrun = "torchrun --standalone --nproc_per_node=2 train.py"
    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.pt"
    cmd, kwargs = cli(torchrun, *common, "--out", killed, "--steps", 1000)
    log = open(tmp_path / "killed.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, **kwargs)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if last.exists() and weights(killed)["step"] >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
    finally:
        kill_tree(proc.pid)
        proc.wait()
        log.close()
    step = weights(killed)["step"]
    assert 3 <= step < 1000
    (killed / "checkpoints" / "last.pt.tmp").write_bytes(b"PK\x03\x04 cut short by the kill")

    rc, out, err = run_cli(torchrun, *common, "--out", killed, "--steps", step + 2, "--resume")
    assert rc == 0, workers_said(err)
    assert f"resumed at step {step}" in out and "2 process(es) on cpu" in out
    rc, out, err = run_cli(torchrun, *common, "--out", tmp_path / "full", "--steps", step + 2)
    assert rc == 0, workers_said(err)
    full, resumed = weights(tmp_path / "full"), weights(killed)
    assert len(full["rng"]) == 2 and len(full["data"]) == 2  # every rank's RNG state and data position
    assert_same_state(full, resumed)


def aot_eager(monkeypatch):
    """torch.compile on AOTAutograd, which traces the forward and backward graphs as inductor does and runs them on
    torch's own kernels, without inductor's C++ code generation (half a minute on a CPU); the GPU check runs
    inductor itself (experiments/gpu_check.sh). Returns the list of what is compiled."""
    compiled, compile_ = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or compile_(model, backend="aot_eager"))
    return compiled


@pytest.mark.parametrize("objective", ["purrception", "dfm"])
def test_compiled_bf16_run_with_every_optimisation_flag_and_its_compiled_loss(codes_dir, tmp_path, monkeypatch,
                                                                               objective):
    """--compile compiles the network and its loss as one graph, the random draws made outside it."""
    what = aot_eager(monkeypatch)
    run = tmp_path / "run"
    train.main(["--codes", str(codes_dir), "--out", str(run), "--steps", "2", *SMALL, "--compile",
                "--precision", "bf16", "--warmup-steps", "10", "--weight-decay", "0.01", "--grad-clip", "0.5",
                "--p-uncond", "0.2", "--z-loss", "1e-4", "--seed", "3", "--objective", objective])
    assert [type(m) for m in what] == [train.NetworkLoss]
    ckpt = weights(run)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])  # the raw module is saved
    assert ckpt["settings"]["precision"] == "bf16" and ckpt["settings"]["seed"] == 3
    record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert record["lr"] == pytest.approx(1e-4 * 2 / 10)  # linear warm-up


def small_flow(num_codes=64):
    """Purrception's DiT-T/2 on 4 x 4 grids of num_codes codes in 3 classes, built as train.py builds it, its
    weights drawn at random (not adaLN-Zero's zero output), and its objective."""
    settings = dict(dataclasses.asdict(train.Settings(codes="", out="")), model="DiT-T/2")
    model, objective = checkpoint.build(settings, torch.randn(num_codes, 8), (4, 4), 3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model, objective


def bf16_trainee(model, raw_model, scores):
    return train.Trainee(model, raw_model, None, None, torch.amp.GradScaler("cpu", enabled=False),
                         torch.autocast("cpu", dtype=torch.bfloat16), scores)


def test_compiled_loss_and_its_gradients_are_the_eager_ones_in_bf16(monkeypatch):
    """The network and the loss compiled as one graph (train.NetworkLoss), on the draws made eagerly: from the same
    random state it trains at the same times on the same noise, and under bf16 autocast its loss is the eager
    loss to 2^-7 (two bf16 ulps) and its gradients to 2^-5 of each one's largest entry: the rounding of a bf16
    backward through four blocks, which inductor fuses otherwise than eager (1 to 2% on this network; aot_eager,
    used here, runs the eager kernels)."""
    compiled = aot_eager(monkeypatch)
    raw, objective = small_flow()
    codes, y = torch.randint(64, (4, 4, 4)), torch.randint(3, (4,))
    runs = []
    for model, scores in ((raw, False), train.compile_trainee(raw, objective)):
        torch.manual_seed(1)
        loss, per_sample, t = train.forward_backward(bf16_trainee(model, raw, scores), objective, codes, y, None)
        runs.append((loss, t, [p.grad for p in raw.parameters()]))
        raw.zero_grad(set_to_none=True)
    assert [type(m) for m in compiled] == [train.NetworkLoss]
    (eager, t_eager, grads_eager), (loss, t, grads) = runs
    assert torch.equal(t, t_eager)
    assert abs(loss.item() - eager.item()) <= 2**-7 * eager.item()
    for g, g_eager in zip(grads, grads_eager, strict=True):
        assert (g - g_eager).abs().max() <= 2**-5 * g_eager.abs().max()


def test_compiled_loss_keeps_no_float32_copy_of_the_logits_for_the_backward(monkeypatch):
    """The tensors the backward keeps (saved_tensors_hooks), under bf16 autocast: the eager loss keeps the float32
    logits (B, *S, K); the compiled one keeps the bf16 logits and no float32 tensor of their size (K = 1000: no
    weight has that size)."""
    aot_eager(monkeypatch)
    raw, objective = small_flow(num_codes=1000)
    codes, y = torch.randint(1000, (4, 4, 4)), torch.randint(3, (4,))
    kept = {}
    for model, scores in ((raw, False), train.compile_trainee(raw, objective)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            train.forward_backward(bf16_trainee(model, raw, scores), objective, codes, y, None)
        kept[scores] = {x.dtype for x in saved if x.numel() == codes.numel() * 1000}
    assert kept == {False: {torch.float32}, True: {torch.bfloat16}}


def test_compiled_loss_accumulates_bf16_logits_in_float32(monkeypatch):
    """Logits near 10 in bf16 (whose logsumexp, near 17, bf16 resolves only to 0.06): the compiled loss takes them
    to float32 inside its graph and scores them as float64 arithmetic on the same bf16 values does, to 1e-6."""
    aot_eager(monkeypatch)
    _, objective = small_flow(num_codes=1024)
    codes, y = torch.randint(1024, (4, 4, 4)), torch.randint(3, (4,))
    logits = (10 + torch.randn(4, 4, 4, 1024)).bfloat16()  # (B, *S, K)

    class Network(torch.nn.Module):
        def forward(self, x, t, y):
            return logits

    per_sample = torch.compile(train.NetworkLoss(Network(), objective))(codes, *objective.draw(codes, y))
    lse = logits.double().logsumexp(-1)  # (B, *S)
    ce = lse - logits.double().gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    expected = (ce + objective.z_loss_weight * lse.pow(2)).flatten(1).mean(1)  # (B,)
    torch.testing.assert_close(per_sample.double(), expected, rtol=1e-6, atol=0)
    assert per_sample.dtype == torch.float32


def test_batch_not_divisible_by_world_size(codes_dir, tmp_path):
    rc, _, err = run_cli("torchrun --standalone --nproc_per_node=2 train.py", "--codes", codes_dir, *SMALL,
                         "--batch-size", "7", "--out", tmp_path / "run", "--steps", "1")
    assert rc != 0 and "--batch-size 7 is not divisible by world size 2" in err
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_existing_run_is_not_overwritten_without_resume(codes_dir, tmp_path):
    run = tmp_path / "run"
    train.main(["--codes", str(codes_dir), "--out", str(run), "--steps", "2", *SMALL])
    before = (run / "checkpoints" / "last.pt").read_bytes()
    rc, _, err = run_cli("train.py", "--codes", codes_dir, "--out", run, "--steps", "4", *SMALL)
    assert rc == 2 and "pass --resume" in err and "Traceback" not in err
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_with_other_codes_or_a_corrupt_checkpoint(codes_dir, tmp_path):
    run = tmp_path / "run"
    train.main(["--codes", str(codes_dir), "--out", str(run), "--steps", "2", *SMALL])
    other = tmp_path / "other-codes"
    shutil.copytree(codes_dir, other)
    np.save(other / "codebook.npy", np.load(other / "codebook.npy")[::-1].copy())
    rc, _, err = run_cli("train.py", "--codes", other, "--out", run, "--steps", "4", "--resume", *SMALL)
    assert rc == 2 and "does not match the codebook of the codes (the same shape (256, 8), other vectors" in err and "Traceback" not in err
    rc, _, err = run_cli("train.py", "--codes", codes_dir, "--out", run, "--steps", "4", "--resume", *SMALL,
                         "--objective", "cfm")
    assert rc == 2 and "trained with --objective purrception" in err
    rc, _, err = run_cli("train.py", "--codes", codes_dir, "--out", run, "--steps", "4", "--resume", *SMALL,
                         "--codebook-scale", "rms")
    assert rc == 2 and "trained with --codebook-scale raw, not rms" in err
    ckpt = weights(run)
    ckpt["model"]["final_layer.linear.bias"] = torch.zeros(3)  # weights that do not fit the model
    torch.save(ckpt, run / "checkpoints" / "last.pt")
    rc, _, err = run_cli("train.py", "--codes", codes_dir, "--out", run, "--steps", "4", "--resume", *SMALL)
    assert rc == 2 and "last.pt: its weights do not fit DiT-T/1 for purrception" in err and "Traceback" not in err
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    rc, _, err = run_cli("train.py", "--codes", codes_dir, "--out", run, "--steps", "4", "--resume", *SMALL)
    assert rc == 2 and "last.pt: not a readable PyTorch file" in err and len(err.strip().splitlines()) == 1


def test_time_dist_trains_on_its_times_and_is_checked_on_resume(codes_dir, tmp_path):
    """--time-dist is recorded, changes the weights a run reaches (the same run, seed and data, only the times
    differ), and a run resumes only with the distribution it started with."""
    common = ["--codes", str(codes_dir), *SMALL, "--steps", "2"]
    train.main(common + ["--out", str(tmp_path / "uniform")])
    train.main(common + ["--out", str(tmp_path / "ln"), "--time-dist", "logit-normal:0.5:1"])
    uniform, ln = weights(tmp_path / "uniform"), weights(tmp_path / "ln")
    assert uniform["settings"]["time_dist"] == "uniform" and ln["settings"]["time_dist"] == "logit-normal:0.5:1"
    assert not torch.equal(uniform["model"]["final_layer.linear.weight"], ln["model"]["final_layer.linear.weight"])
    rc, _, err = run_cli("train.py", *common, "--out", tmp_path / "ln", "--resume")
    assert rc == 2 and "trained with --time-dist logit-normal:0.5:1, not uniform" in err


@pytest.mark.parametrize("args,message", [
    (["--model", "DiT-Q/3"], "invalid choice: 'DiT-Q/3'"),
    (["--objective", "gan"], "invalid choice: 'gan'"),
    (["--steps", "0"], "--steps 0: expected a positive number"),
    (["--ckpt-every", "4", "--keep-every", "6"], "--keep-every 6: expected a multiple of --ckpt-every 4"),
    (["--lr", "inf"], "--lr inf: expected a positive number"),
    (["--lr", "nan"], "--lr nan: expected a positive number"),
    (["--z-loss", "nan"], "--z-loss nan: expected a number >= 0"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: expected a number > 0"),
    (["--ema-decay", "1.5"], "--ema-decay 1.5: expected a number in [0, 1]"),
    (["--p-uncond", "-0.1"], "--p-uncond -0.1: expected a number in [0, 1]"),
    (["--sample-every", "-5"], "--sample-every -5: expected a number >= 0"),
    (["--time-dist", "gauss"], "--time-dist: bad training-time distribution 'gauss'"),
    (["--time-dist", "logit-normal:0:0"], "--time-dist: bad training-time distribution 'logit-normal:0:0'"),
])
def test_bad_flags(codes_dir, tmp_path, args, message):
    rc, _, err = run_cli("train.py", "--codes", codes_dir, "--out", tmp_path / "run", *args)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything was made


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(codes_dir, tmp_path):
    run = tmp_path / "run"
    common = ["--codes", codes_dir, "--out", run, *SMALL, "--log-every", "1"]
    train.main([str(a) for a in common] + ["--steps", "2"])
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    rc, _, err = run_cli("train.py", *common, "--steps", "6", "--resume", "--lr", "1e30")  # weights overflow
    assert rc == 2 and "not a finite number" in err and "the last checkpoint, of step 2, is kept" in err
    step = int(err.split("error: step ")[1].split(":")[0])
    assert 3 <= step <= 6
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]  # strict JSON: no NaN
    assert [r["step"] for r in records] in (list(range(1, step)), list(range(1, step + 1)))
    assert all(np.isfinite(r["loss"]) for r in records)


def test_a_non_finite_gradient_stops_training_but_a_skipped_fp16_step_does_not(codes_dir, tmp_path):
    common = ["--codes", codes_dir, *SMALL, "--log-every", "1"]
    # a z-loss of 1e20 keeps the loss finite (about 3e21) but overflows its gradient at the first step
    rc, _, err = run_cli("train.py", *common, "--out", tmp_path / "a", "--steps", "3", "--z-loss", "1e20")
    assert rc == 2 and "error: step 1: the loss or its gradient is not a finite number" in err
    assert "no checkpoint was written" in err
    assert not (tmp_path / "a" / "checkpoints" / "last.pt").exists()
    # fp16 loss scaling starts at 2^16 and skips the steps whose gradients overflow (with a z-loss of 100, the first
    # three): the run goes on
    train.main([str(a) for a in common] + ["--out", str(tmp_path / "b"), "--steps", "3", "--precision", "fp16",
                                           "--z-loss", "100"])
    records = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and None in [r["grad_norm"] for r in records]


def test_resume_drops_log_lines_after_the_checkpoint(codes_dir, tmp_path):
    """A run killed after step 3 but checkpointed at step 2 logs steps 3 and 4 once each after its resume."""
    run = tmp_path / "run"
    common = ["--codes", str(codes_dir), "--out", str(run), *SMALL, "--log-every", "1", "--keep-every", "2"]
    train.main(common + ["--steps", "2"])
    shutil.copyfile(run / "checkpoints" / "last.pt", run / "at-2.pt")
    train.main(common + ["--steps", "3", "--resume"])
    shutil.copyfile(run / "at-2.pt", run / "checkpoints" / "last.pt")  # as if killed after logging step 3
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # and cut short mid-line
    train.main(common + ["--steps", "4", "--resume"])
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_with_no_checkpoint_says_it_starts_fresh(codes_dir, tmp_path):
    rc, _, err = run_cli("train.py", "--codes", codes_dir, "--out", tmp_path / "run", *SMALL, "--steps", "1",
                         "--resume")
    assert rc == 0 and "no checkpoint at" in err and "starts from step 0" in err


def test_resume_checks_the_grid_and_the_classes(codes_dir, tmp_path):
    from support import codesets
    run = tmp_path / "run"
    train.main(["--codes", str(codes_dir), "--out", str(run), "--steps", "2", *SMALL])
    before = (run / "checkpoints" / "last.pt").read_bytes()
    codebook = np.load(codes_dir / "codebook.npy")
    for name, grid, classes in (("grid", 8, 10), ("classes", 7, 5)):
        other = tmp_path / name
        codesets.write_shard(str(other), 0, np.random.randint(0, 256, (16, 1, grid, grid)), np.arange(16) % classes)
        codesets.write_meta(str(other), codebook, 1, grid=[grid, grid], num_classes=classes, views=1)
        rc, _, err = run_cli("train.py", "--codes", other, "--out", run, "--steps", "4", "--resume", *SMALL)
        what = "code grid [7, 7]" if name == "grid" else "number of classes 10"
        assert rc == 2 and f"trained on codes with {what}" in err and len(err.strip().splitlines()) == 1
        assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_an_out_that_is_a_file_is_one_line(codes_dir, tmp_path):
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        rc, _, err = run_cli("train.py", "--codes", codes_dir, "--out", out, *SMALL, "--steps", "1")
        assert rc == 2 and str(tmp_path / "file") in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "file").read_text() == "mine"
    for name in ("checkpoints", "log.jsonl"):  # a file where a directory goes, and the other way round
        run = tmp_path / name.replace(".", "-")
        (run / name).mkdir(parents=True) if "." in name else (run.mkdir(), (run / name).write_text("mine"))
        rc, _, err = run_cli("train.py", "--codes", codes_dir, "--out", run, *SMALL, "--steps", "1")
        assert rc == 2 and str(run / name) in err and len(err.strip().splitlines()) == 1


def test_missing_codes_dir(tmp_path):
    rc, _, err = run_cli("train.py", "--codes", tmp_path / "nope", "--out", tmp_path / "run")
    assert rc == 2 and "nope/meta.json: missing" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("objective", ["purrception", "dfm"])
def test_logged_loss_and_loss_by_t_at_the_initial_zero_logits(codes_dir, tmp_path, objective):
    """adaLN-Zero starts every output at 0: with --lr 1e-30 the logits stay 0 to float precision, so every logged
    loss (averaged over steps, micro-batches and ranks) and every loss-by-t bin is the cross-entropy of a uniform
    posterior, log K, plus the z-loss 1e-5 * log(K)^2."""
    run = tmp_path / "run"
    train.main(["--codes", str(codes_dir), "--objective", objective, "--out", str(run), "--steps", "6", *SMALL,
                "--log-every", "3", "--lr", "1e-30", "--grad-accum", "2"])
    log_k = np.log(256)
    expected = log_k + 1e-5 * log_k ** 2
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        assert r["loss"] == pytest.approx(expected, abs=1e-5)
        filled = [v for v in r["loss_by_t"] if v != 0]  # 48 samples over 10 bins: a bin may stay empty
        assert len(filled) >= 5 and filled == pytest.approx([expected] * len(filled), abs=1e-4)


def test_codes_out_of_range_and_a_checkpoint_missing_its_parts_are_one_line(codes_dir, tmp_path):
    from support import codesets
    codebook = np.load(codes_dir / "codebook.npy")
    for name, codes, labels, message in (
            ("codes", np.full((16, 1, 7, 7), 300), np.arange(16) % 10, "a code index 300 is out of range"),
            ("labels", np.zeros((16, 1, 7, 7)), np.arange(16) % 10 + 5, "labels in [5, 14], outside the 10 classes")):
        other = tmp_path / name
        codesets.write_shard(str(other), 0, codes, labels)
        codesets.write_meta(str(other), codebook, 1, grid=[7, 7], num_classes=10, views=1)
        rc, _, err = run_cli("train.py", "--codes", other, "--out", tmp_path / f"run-{name}", *SMALL, "--steps", "2")
        assert rc == 2 and message in err and "Traceback" not in err
    run = tmp_path / "run"
    train.main(["--codes", str(codes_dir), "--out", str(run), "--steps", "2", *SMALL])
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    del ckpt["codes_meta"]
    torch.save(ckpt, tmp_path / "partial.pt")
    rc, _, err = run_cli("sample.py", "--ckpt", tmp_path / "partial.pt", "--out", tmp_path / "s")
    assert rc == 2 and "partial.pt: no codes_meta in it" in err and len(err.strip().splitlines()) == 1


def test_lr_final_decays_the_rate_along_the_schedule_and_ema_warmup_follows_the_weights(codes_dir, tmp_path):
    """--lr-final 0.1: the logged rate of every step is schedule.learning_rate's cosine from --lr down to a tenth.
    --ema-warmup: the first step's EMA decay is min(0.9999, 1 / 10), so the EMA holds 9/10 of the new weights."""
    from support.schedule import learning_rate
    train.main(["--codes", str(codes_dir), "--out", str(tmp_path / "decay"), "--steps", "5", *SMALL,
                "--log-every", "1", "--lr", "1e-3", "--warmup-steps", "2", "--lr-final", "0.1"])
    logged = [json.loads(line)["lr"] for line in (tmp_path / "decay" / "log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([learning_rate(s, 5, 1e-3, 2, final=0.1) for s in range(5)], rel=1e-6)
    assert logged[-1] < logged[1] and logged[-1] >= 1e-4
    for name, extra in (("plain", []), ("warm", ["--ema-warmup"])):
        train.main(["--codes", str(codes_dir), "--out", str(tmp_path / name), "--steps", "1", *SMALL, *extra])
    plain, warm = weights(tmp_path / "plain"), weights(tmp_path / "warm")
    for key, w in warm["model"].items():
        assert torch.equal(w, plain["model"][key])  # the same step; only the EMA differs
        init = (plain["ema"][key].double() - 1e-4 * w.double()) / 0.9999
        assert torch.allclose(warm["ema"][key].double(), init + (w.double() - init) * (1 - 1 / 10), atol=1e-6), key


def test_a_student_on_couplings_trains_on_their_noise_from_its_teachers_weights(flow_ckpts, couplings_dir, tmp_path,
                                                                               monkeypatch):
    import vfm
    from support.codesets import CodeSet
    pairs = CodeSet(str(couplings_dir / "couplings"))
    codes, labels = pairs.get(np.arange(len(pairs)))
    noise = pairs.get_noise(np.arange(len(pairs)))
    seen, loss = [], vfm.Purrception.loss

    def recording(self, model, c, y=None, generator=None, z0=None):
        seen.append((c, y, z0))
        return loss(self, model, c, y, generator, z0=z0)

    monkeypatch.setattr(vfm.Purrception, "loss", recording)
    student = ["--codes", str(couplings_dir / "couplings"), "--init", str(flow_ckpts["purrception"]),
               "--codebook-scale", "rms", *SMALL]
    train.main(student + ["--out", str(tmp_path / "s"), "--steps", "3"])
    assert len(seen) == 3
    for c, y, z0 in seen:  # every row is one coupling: its noise, its codes, its label
        for row in range(len(c)):
            i = int(np.nonzero((noise == z0[row].numpy()).all(axis=(1, 2, 3)))[0][0])
            assert np.array_equal(c[row].numpy(), codes[i]) and y[row].item() == labels[i]

    # --init starts from the teacher's EMA weights (one step at a negligible rate leaves them where they were)
    teacher = weights(os.path.dirname(os.path.dirname(flow_ckpts["purrception"])))["ema"]
    train.main(student + ["--out", str(tmp_path / "init"), "--steps", "1", "--lr", "1e-12"])
    train.main(student[:2] + student[4:] + ["--out", str(tmp_path / "fresh"), "--steps", "1", "--lr", "1e-12"])
    for run, close in (("init", True), ("fresh", False)):
        state = weights(tmp_path / run)["model"]
        assert all(torch.allclose(state[k], teacher[k], atol=1e-6) for k in teacher) == close, run
    assert weights(tmp_path / "init")["settings"]["init"] == str(flow_ckpts["purrception"])


@pytest.mark.parametrize("extra,message", [
    (["--objective", "dfm"], "DFM starts from masks, not noise"),
    ([], "couplings of a teacher on the rms codebook, not --codebook-scale raw"),
    (["--codebook-scale", "rms", "--init", "{dfm}"], "trained with --objective dfm, not purrception"),
    (["--codebook-scale", "rms", "--init", "{missing}"], "missing.pt: no such file"),
])
def test_couplings_and_init_that_do_not_fit_are_one_line(flow_ckpts, couplings_dir, tmp_path, extra, message):
    extra = [a.format(dfm=flow_ckpts["dfm"], missing=tmp_path / "missing.pt") for a in extra]
    rc, _, err = run_cli("train.py", "--codes", couplings_dir / "couplings", *SMALL, "--steps", 1,
                         "--out", tmp_path / "run", *extra)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
