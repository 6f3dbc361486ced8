"""experiments/study.py and experiments/studies/: every subcommand at --budget tiny writes its table, JSON and figures, and its numbers
are checked against exact answers, bounds that follow from the sample count, or a recomputation through
sample.py and evaluate.py; bad input is one line."""

import json
import math
import os

import numpy as np
import pytest
import torch

import baselines
import evaluate
import sample
import vfm
from conftest import FASHION_MNIST, contents, encode, fill_the_disk, one_line_error, run_cli
from experiments import study
from experiments.studies import codebook, common, convergence, fewstep, guidance, solvers, temperature, uncertainty
from support import checkpoint, lenet
from support.codesets import CodeSet
from toy import run as toy_run
from toy.toys import Oracle, make_toy

PNG = b"\x89PNG\r\n\x1a\n"

# (steps, NFE) of each solver for an NFE target: Heun's last step is an Euler step (2 * steps - 1 evaluations),
# midpoint evaluates twice a step and cannot go below 2.
STEPS_AND_NFE = {
    "euler": {1: (1, 1), 2: (2, 2), 4: (4, 4), 5: (5, 5), 8: (8, 8), 100: (100, 100)},
    "heun": {1: (1, 1), 2: (1, 1), 4: (2, 3), 5: (3, 5), 8: (4, 7), 100: (50, 99)},
    "midpoint": {1: (1, 2), 2: (1, 2), 4: (2, 4), 5: (2, 4), 8: (4, 8), 100: (50, 100)},
}
STEPS_AND_NFE["discrete euler"] = STEPS_AND_NFE["euler"]


def read_table(path):
    """(header, rows) of the first markdown table in a file."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def outputs(out, name, figures=()):
    """The table and JSON of one subcommand; checks its figures are PNG files."""
    for figure in (name,) + tuple(figures):
        assert (out / f"{figure}.png").read_bytes()[:8] == PNG, figure
    record = json.loads((out / f"{name}.json").read_text())
    assert record["budget"] == "tiny" and record["seconds"] >= 0 and record["command"].startswith("python experiments/study.py")
    return read_table(out / f"{name}.md"), record


def scoring(classifier):
    return ["--data-dir", FASHION_MNIST, "--classifier", str(classifier)]


def sample_py(ckpt, out, *flags):
    """(images, labels) that `python sample.py --ckpt CKPT FLAGS` writes."""
    sample.main(["--ckpt", str(ckpt), "--out", str(out), *map(str, flags)])
    with np.load(out / "samples.npz") as f:
        return f["arr_0"], f["labels"]


def drawn_by(monkeypatch, study_module):
    """The images of every draw a study makes, in the order of its rows."""
    drawn = []

    def timed_draw(*args, **kw):
        images, labels, seconds = common.timed_draw(*args, **kw)
        drawn.append(images)
        return images, labels, seconds

    monkeypatch.setattr(study_module, "timed_draw", timed_draw)
    return drawn


def check_row(row, drawn, ckpt, out, classifier, *flags):
    """A row recomputed the way a user would: its samples are those of `python sample.py FLAGS`, its scores
    those of evaluate.py on them."""
    expected, labels = sample_py(ckpt, out, *flags)
    assert np.array_equal(drawn, expected), flags
    metrics = evaluate.evaluate_images(expected, labels, "fashion-mnist", FASHION_MNIST,
                                       classifier_path=str(classifier))
    assert {k: row[k] for k in ("accuracy", "fid", "coverage")} == dict(
        accuracy=round(float(metrics["accuracy"]), 4), fid=round(float(metrics["fid"]), 3),
        coverage=round(float(metrics["coverage"]), 4)), flags


def sampling_bound(toy, n):
    """1/2 sqrt(M / n) >= 1/2 sum_c sqrt(p_c (1 - p_c) / n) >= E TV(n exact draws, p) for M configurations."""
    return 0.5 * math.sqrt(len(toy.configs) / n)


def toy_tv(toy, method, iters, seed, n, steps, solver="euler"):
    """TV of `method` trained `iters` iterations (the exact posterior for 'oracle'), straight from toy/run.py."""
    objective = baselines.build_objective("purrception" if method == "oracle" else method, toy.codebook)
    model = Oracle(toy, objective.codebook) if method == "oracle" else toy_run.train(toy, objective, iters, seed)
    return round(toy.tv(toy_run.sample(toy, objective, model, n, seed, steps=steps, solver=solver)), 4)


# ---- the toys --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", [None, "one-run", "per-budget"])
def test_convergence_on_the_toys(tmp_path, schedule):
    study.main(["convergence", "--data", "toy", "--budget", "tiny", "--seed", "1", "--out", str(tmp_path)] +
               (["--schedule", schedule] if schedule else []))
    name = "convergence-toy-per-budget" if schedule == "per-budget" else "convergence-toy"
    (header, rows), record = outputs(tmp_path, name)
    assert record["schedule"] == (schedule or "one-run")
    b = convergence.TOY_BUDGETS["tiny"]
    assert header == ["toy", "metric", "method"] + [str(i) for i in b["iters"]]
    for toy in ("checkerboard", "pairs"):
        assert [r[2] for r in rows if r[0] == toy and r[1] == "TV"][:4] == list(baselines.OBJECTIVES)
    assert ["checkerboard", "KL", "purrception"] == rows[-1][:3]
    assert len(record["rows"]) == 2 * 4 * len(b["iters"]) and {r["seed"] for r in record["rows"]} == {1}
    n, steps = b["num_samples"], b["steps"]
    for name in b["toys"]:
        toy, reference = make_toy(name), record["reference"][name]
        assert reference["exact_draws_tv"] < sampling_bound(toy, n), name
        assert reference["oracle_tv"] == toy_tv(toy, "oracle", 0, 1, n, steps)
    # The last point of one run and a run of that length are the same model: both are rows of toy/run.py.
    last = [r for r in record["rows"] if (r["toy"], r["iters"]) == ("pairs", max(b["iters"]))]
    assert {r["method"]: r["tv"] for r in last} == {m: toy_tv(make_toy("pairs"), m, max(b["iters"]), 1, n, steps)
                                                    for m in baselines.OBJECTIVES}
    if schedule == "per-budget":
        first = next(r for r in record["rows"] if (r["toy"], r["method"], r["iters"]) ==
                     ("checkerboard", "cfm", b["iters"][0]))
        assert first["tv"] == toy_tv(make_toy("checkerboard"), "cfm", b["iters"][0], 1, n, steps)
    kl = [r for r in record["rows"] if "kl" in r]
    assert len(kl) == len(b["iters"]) and all(set(r["kl_by_t"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"} for r in kl)
    assert all(v >= 0 for r in kl for v in r["kl_by_t"].values())  # KL(exact || learned) >= 0
    assert all(r["kl"] == pytest.approx(np.mean(list(r["kl_by_t"].values())), abs=1e-4) for r in kl)


def test_solvers_on_the_toy(tmp_path):
    study.main(["solvers", "--budget", "tiny", "--out", str(tmp_path)])
    (header, rows), record = outputs(tmp_path, "solvers-toy")
    b = solvers.TOY_BUDGETS["tiny"]
    assert header == ["toy", "model", "solver", *(f"NFE {n}" for n in b["nfe"]), "µs/sample/NFE"]
    assert len(rows) == 2 * (3 + 3 + 1) and len(record["rows"]) == len(rows) * len(b["nfe"])
    assert [(r[0], r[1], r[2]) for r in rows] == [(toy, m, s) for toy in ("checkerboard", "pairs") for m, s in
                                                  [(m, s) for m in ("oracle", "purrception") for s in vfm.SOLVERS] +
                                                  [("dfm", "discrete euler")]]
    for r in record["rows"]:
        assert (r["steps"], r["nfe"]) == STEPS_AND_NFE[r["solver"]][r["nfe_target"]], r
    for r in rows:  # the NFE a solver used, in brackets, where it misses the target: Heun's 1 and 3
        brackets = [cell.partition(" ")[2] for cell in r[3:-1]]
        assert brackets == (["(1)", "(3)"] if r[2] == "heun" else ["", ""]), r
    for name in b["toys"]:
        assert record["exact_draws_tv"][name] < sampling_bound(make_toy(name), b["num_samples"])
    heun = next(r for r in record["rows"] if (r["toy"], r["model"], r["solver"], r["nfe_target"]) ==
                ("pairs", "oracle", "heun", 4))
    assert heun["tv"] == toy_tv(make_toy("pairs"), "oracle", 0, 0, b["num_samples"], 2, solver="heun")


def test_steps_for_nfe():
    for solver in vfm.SOLVERS:
        for target, (steps, nfe) in STEPS_AND_NFE[solver].items():
            assert solvers.steps_for_nfe(target, solver) == steps, (solver, target)
            assert vfm.num_evaluations(steps, solver) == nfe, (solver, steps)


def test_fewstep_on_the_toys(tmp_path):
    study.main(["fewstep", "--budget", "tiny", "--seed", "2", "--out", str(tmp_path)])
    (header, rows), record = outputs(tmp_path, "fewstep-toy")
    b = fewstep.TOY_BUDGETS["tiny"]
    assert header == ["toy", "model", "solver", *(f"NFE {n}" for n in b["nfe"])]
    assert [tuple(r[:3]) for r in rows] == [(toy, m, s) for toy in b["toys"] for m in ("oracle", "teacher", "student")
                                            for s in vfm.SOLVERS]
    for r in record["rows"]:
        assert (r["steps"], r["nfe"]) == STEPS_AND_NFE[r["solver"]][r["nfe_target"]], r
    # the student's row recomputed from toy/run.py: teacher, couplings from other noise, student from the teacher
    toy = make_toy("pairs")
    objective = baselines.build_objective("purrception", toy.codebook)
    teacher = toy_run.train(toy, objective, b["teacher_iters"], 2)
    codes, z0 = toy_run.sample(toy, objective, teacher, b["couplings"], 102, steps=b["coupling_steps"], couplings=True)
    assert torch.equal(codes, toy_run.sample(toy, objective, teacher, b["couplings"], 102, steps=b["coupling_steps"]))
    student = toy_run.train(toy, objective, b["student_iters"], 2, lr=b["student_lr"], init=teacher,
                            couplings=(codes, z0))
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), teacher.parameters()))
    got = {(r["model"], r["nfe_target"]): r["tv"] for r in record["rows"]
           if (r["toy"], r["solver"]) == ("pairs", "euler")}
    for name, model in (("teacher", teacher), ("student", student)):
        assert got[name, 1] == round(toy.tv(toy_run.sample(toy, objective, model, b["num_samples"], 2, steps=1)), 4)
    assert set(record["costs"]) == set(b["toys"])


# ---- Fashion-MNIST codes ---------------------------------------------------------------------------------

def test_draws_are_those_of_sample_py(flow_ckpts, tmp_path):
    """Two batches of 250, labels cycled, EMA weights: sample i is sample.py's sample i."""
    settings = {"purrception": dict(solver="heun", temperature="0.5", cfg_scale=1.5), "dfm": {}}
    for name, ckpt in flow_ckpts.items():
        images, labels, _ = common.timed_draw(common.load_flow(str(ckpt), (name,), "test"), 260, 3, steps=2,
                                            **settings[name])
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings[name].items()]
        expected, expected_labels = sample_py(ckpt, tmp_path / name, "--num-samples", 260, "--steps", 2,
                                              "--seed", 3, *flags)
        assert np.array_equal(labels, expected_labels) and np.array_equal(labels[:12], [*range(10), 0, 1])
        assert np.array_equal(images, expected), name
        assert len(np.unique(images.reshape(len(images), -1), axis=0)) > 1, "the samples must depend on the noise"


def test_convergence_on_codes(codes_dir, classifier, tmp_path, monkeypatch):
    drawn = drawn_by(monkeypatch, convergence)
    study.main(["convergence", "--data", "fashion-mnist", "--codes", str(codes_dir), *scoring(classifier),
                "--budget", "tiny", "--out", str(tmp_path), "--codebook-scale", "rms"])
    (header, rows), record = outputs(tmp_path, "convergence-fashion-mnist")
    assert record["codebook_scale"] == "rms"
    assert header == ["objective", "training steps", "accuracy", "FID-LeNet", "s/step (train)"]
    b = convergence.IMAGE_BUDGETS["tiny"]
    steps = list(range(b["keep_every"], b["train_steps"] + 1, b["keep_every"]))
    assert [(r[0], int(r[1])) for r in rows[:-1]] == [(o, s) for o in baselines.OBJECTIVES for s in steps]
    assert rows[-1][0] == "VQ reconstructions (ceiling)"
    for row, images in zip(record["rows"], drawn):
        ckpt = tmp_path / "runs" / row["objective"] / "checkpoints" / f"step-{row['step']:07d}.pt"
        args = checkpoint.load_any(str(ckpt))["settings"]
        assert args["objective"] == row["objective"] and args["batch_size"] == b["batch_size"]
        assert args["codebook_scale"] == "rms"
        if row["step"] == steps[-1]:
            check_row(row, images, ckpt, tmp_path / f"sample-{row['objective']}", classifier,
                      "--num-samples", b["num_samples"], "--steps", b["steps"], "--seed", 0)


def test_convergence_on_codes_resumes_with_the_scores_it_has(codes_dir, classifier, tmp_path, monkeypatch):
    """--objectives runs a subset; a second run reuses the runs and the scores of the first, and a checkpoint
    that changed is scored again."""
    argv = ["convergence", "--data", "fashion-mnist", "--codes", str(codes_dir), *scoring(classifier), "--budget",
            "tiny", "--out", str(tmp_path), "--objectives", "dfm,purrception"]
    drawn = drawn_by(monkeypatch, convergence)
    study.main(argv)
    (_, rows), first = outputs(tmp_path, "convergence-fashion-mnist")
    b = convergence.IMAGE_BUDGETS["tiny"]
    steps = list(range(b["keep_every"], b["train_steps"] + 1, b["keep_every"]))
    assert [(r[0], int(r[1])) for r in rows[:-1]] == [(o, s) for o in ("purrception", "dfm") for s in steps]
    assert len(drawn) == 2 * len(steps)
    assert not (tmp_path / "runs" / "cfm").exists()

    drawn.clear()
    study.main(argv + ["--force"])
    assert drawn == [] and outputs(tmp_path, "convergence-fashion-mnist")[1]["rows"] == first["rows"]

    changed = tmp_path / "runs" / "dfm" / "checkpoints" / f"step-{steps[0]:07d}.pt"
    changed.write_bytes(changed.read_bytes())  # the same weights, written again: a new file
    os.utime(changed, (1, 1))
    study.main(argv + ["--force"])
    assert len(drawn) == 1


@pytest.fixture(scope="module")
def tokenizer_k32(tmp_path_factory):
    """A tokenizer of K = 32 codes on the same 512 images and grid as the session's."""
    import tokenizer
    out = tmp_path_factory.mktemp("vq-k32")
    tokenizer.main(["train", "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST, "--out", str(out), "--limit",
             "512", "--steps", "20", "--batch-size", "64", "--codebook-size", "32"])
    return out / "tokenizer.pt"


@pytest.fixture(scope="module")
def codes_k32(tokenizer_k32, tmp_path_factory):
    """The session's 512 images coded by the tokenizer of K = 32."""
    return encode(tokenizer_k32, tmp_path_factory.mktemp("codes-k32") / "codes", 512)


def test_codebook_sizes(codes_dir, codes_k32, classifier, tmp_path, monkeypatch):
    """Each objective on each code set, smallest K first, its last checkpoint scored as sample.py and evaluate.py
    score it; run again, it reuses the runs and their scores."""
    drawn = drawn_by(monkeypatch, convergence)
    argv = ["codebook", "--codes", f"{codes_dir},{codes_k32}", *scoring(classifier), "--budget", "tiny", "--out",
            str(tmp_path), "--objectives", "dfm,purrception", "--codebook-scale", "rms"]
    study.main(argv)
    (header, rows), record = outputs(tmp_path, "codebook-fashion-mnist")
    assert header == ["K", "objective", "accuracy", "FID-LeNet", "s/step (train)"]
    assert [(int(r[0]), r[1]) for r in rows] == [(k, o) for k in (32, 256) for o in
                                                 ("purrception", "dfm", "VQ reconstructions (ceiling)")]
    references = record["references"]
    assert references["32"]["codes"] == str(codes_k32) and references["256"]["codes"] == str(codes_dir)
    b = codebook.BUDGETS["tiny"]
    assert len(drawn) == 4
    for row, images in zip(record["rows"], drawn):
        k, objective = row["codebook_size"], row["objective"]
        ckpt = tmp_path / "runs" / f"K{k}" / objective / "checkpoints" / f"step-{b['train_steps']:07d}.pt"
        state = checkpoint.load_any(str(ckpt))
        assert state["settings"]["objective"] == objective and state["settings"]["codes"] == str(
            codes_k32 if k == 32 else codes_dir)
        assert state["settings"]["codebook_scale"] == "rms" and record["codebook_scale"] == "rms"
        assert checkpoint.Flow(str(ckpt)).objective.num_codes == k
        if objective == "purrception":
            check_row(row, images, ckpt, tmp_path / f"check-{k}", classifier, "--num-samples", b["num_samples"],
                      "--steps", b["steps"], "--seed", 0)
    drawn.clear()
    study.main(argv + ["--force"])
    assert drawn == [] and outputs(tmp_path, "codebook-fashion-mnist")[1]["rows"] == record["rows"]


def test_codebook_sizes_of_other_images_or_couplings_are_one_line(codes_dir, tokenizer_k32, couplings_dir,
                                                                   tmp_path, capsys):
    fewer = encode(tokenizer_k32, tmp_path / "codes-256-images", 256)
    capsys.readouterr()  # the encoder's progress bar
    for codes, message in [(fewer, f"{fewer}: num_images 256, against 512 in {codes_dir}; the study compares"),
                           (couplings_dir / "couplings", "a coupling set of `sample.py --couplings`")]:
        line = one_line_error(capsys, study.main, ["codebook", "--codes", f"{codes_dir},{codes}", "--data-dir",
                                                   FASHION_MNIST, "--budget", "tiny", "--out", tmp_path / "out"])
        assert message in line
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("spec", ["cfm,nope", ","])
def test_convergence_objectives_must_be_known(spec, tmp_path, capsys):
    line = one_line_error(capsys, study.main, ["convergence", "--data", "toy", "--budget", "tiny", "--out",
                                               str(tmp_path), "--objectives", spec])
    assert "expected a comma-separated list of purrception, cfm, cfm-endpoint, dfm" in line


def test_fewstep_on_codes(flow_ckpts, classifier, tmp_path, monkeypatch):
    drawn = drawn_by(monkeypatch, fewstep)
    teacher = flow_ckpts["purrception"]
    argv = ["fewstep", "--data", "fashion-mnist", "--ckpt", str(teacher), *scoring(classifier), "--budget", "tiny",
            "--seed", "3", "--out", str(tmp_path)]
    study.main(argv)
    (header, rows), record = outputs(tmp_path, "fewstep-fashion-mnist")
    b = fewstep.IMAGE_BUDGETS["tiny"]
    assert header == ["model", "solver", "guidance", "NFE", "network passes", "ms/sample", "accuracy", "FID-LeNet",
                      "coverage"]
    per_scale = [("teacher", "euler", 1), ("teacher", "euler", 2), ("teacher", "midpoint", 2), ("student", "euler", 1),
                 ("student", "euler", 2), ("student", "midpoint", 2), ("teacher", "euler", b["reference_steps"])]
    assert [(r[0], r[1], float(r[2]), int(r[3])) for r in rows] == [(m, s, c, n) for c in b["cfg_scales"]
                                                                   for m, s, n in per_scale]
    assert [int(r[4]) for r in rows] == [int(r[3]) * (2 if float(r[2]) != 1 else 1) for r in rows]  # passes
    pairs = CodeSet(str(tmp_path / "couplings" / "couplings"))
    assert pairs.has_noise and len(pairs) == b["couplings"]
    assert {k: pairs.meta["teacher"][k] for k in ("steps", "solver", "cfg_scale", "seed")} == dict(
        steps=b["coupling_steps"], solver=b["coupling_solver"], cfg_scale=b["coupling_cfg"], seed=3)
    student = tmp_path / "runs" / "student" / "checkpoints" / "last.pt"
    args = checkpoint.load(str(student))["settings"]
    assert args["init"] == str(teacher) and args["codes"] == str(tmp_path / "couplings" / "couplings")
    assert args["steps"] == b["student_steps"] and args["codebook_scale"] == "rms"
    row = next(i for i, r in enumerate(record["rows"]) if (r["model"], r["nfe"], r["cfg_scale"]) == ("student", 1, 2.0))
    check_row(record["rows"][row], drawn[row], student, tmp_path / "check", classifier, "--num-samples",
              b["num_samples"], "--steps", 1, "--cfg-scale", 2, "--seed", 3)

    # run again: the couplings and the student are reused, the rows are the same
    monkeypatch.setattr(fewstep.sample, "sample", lambda *a: pytest.fail("drew the couplings again"))
    before = student.read_bytes()
    study.main(argv + ["--force"])
    assert student.read_bytes() == before  # the finished student is not trained again
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "ms_per_sample"} for r in rows]  # noqa: E731
    assert timeless(outputs(tmp_path, "fewstep-fashion-mnist")[1]["rows"]) == timeless(record["rows"])


def test_studies_refuse_a_run_of_other_settings_and_retrain_a_student_of_other_couplings(
        flow_ckpts, codes_dir, classifier, tmp_path, monkeypatch, capsys):
    argv = ["convergence", "--data", "fashion-mnist", "--codes", str(codes_dir), *scoring(classifier), "--budget",
            "tiny", "--out", str(tmp_path), "--objectives", "cfm"]
    study.main(argv)
    monkeypatch.setitem(convergence.IMAGE_BUDGETS, "tiny", dict(convergence.IMAGE_BUDGETS["tiny"], lr=2e-4))
    capsys.readouterr()
    line = one_line_error(capsys, study.main, argv + ["--force"])
    assert f"{tmp_path / 'runs' / 'cfm'}: a run with --lr 0.0001, not 0.0002 as this study asks" in line

    argv = ["fewstep", "--data", "fashion-mnist", "--ckpt", str(flow_ckpts["purrception"]), *scoring(classifier),
            "--budget", "tiny", "--out", str(tmp_path / "f")]
    study.main(argv)
    student = tmp_path / "f" / "runs" / "student" / "checkpoints" / "last.pt"
    first = checkpoint.load(str(student))["model"]
    monkeypatch.setitem(fewstep.IMAGE_BUDGETS, "tiny", dict(fewstep.IMAGE_BUDGETS["tiny"], coupling_cfg=1.0))
    study.main(argv + ["--force"])  # other couplings: drawn again, and the student trained again on them
    assert CodeSet(str(tmp_path / "f" / "couplings" / "couplings")).meta["teacher"]["cfg_scale"] == 1.0
    assert any(not torch.equal(v, first[k]) for k, v in checkpoint.load(str(student))["model"].items())


def test_guidance_windows(flow_ckpts, classifier, tmp_path, monkeypatch):
    drawn = drawn_by(monkeypatch, guidance)
    ckpt = flow_ckpts["purrception"]
    study.main(["guidance", "--ckpt", str(ckpt), *scoring(classifier), "--budget", "tiny", "--seed", "1", "--out",
                str(tmp_path)])
    (header, rows), record = outputs(tmp_path, "guidance")
    b = guidance.BUDGETS["tiny"]
    assert header[:4] == ["guidance", "window [lo, hi] of t", "network passes", "passes saved"]
    assert [(r[0], r[1]) for r in rows] == [("1", "[0, 1]")] + [(f"{b['cfg_scale']:g}", f"[{lo:g}, {hi:g}]")
                                                               for lo, hi in b["windows"]]
    times = vfm.evaluation_times(b["steps"], "midpoint")
    for r in record["rows"][1:]:
        lo, hi = r["window"]
        assert r["passes"] == sum(2 if lo <= t <= hi else 1 for t in times)
    check_row(record["rows"][-1], drawn[-1], ckpt, tmp_path / "check", classifier, "--num-samples", b["num_samples"],
              "--steps", b["steps"], "--solver", "midpoint", "--cfg-scale", b["cfg_scale"], "--cfg-interval",
              "{}:{}".format(*b["windows"][-1]), "--seed", 1)


def test_temperature(flow_ckpts, classifier, tmp_path, monkeypatch):
    drawn = drawn_by(monkeypatch, temperature)
    study.main(["temperature", "--ckpt", str(flow_ckpts["purrception"]), *scoring(classifier), "--budget", "tiny",
                "--seed", "2", "--out", str(tmp_path)])
    (header, rows), record = outputs(tmp_path, "temperature", ["temperature-grid"])
    b = temperature.BUDGETS["tiny"]
    assert header == ["temperature"] + [f"{m} (cfg {c:g})" for c in b["cfg_scales"] for m in ("accuracy", "FID")]
    assert [r[0] for r in rows] == list(b["temperatures"] + b["schedules"])
    assert len(record["rows"]) == len(rows) * len(b["cfg_scales"])
    assert record["grid_temperatures"][0] == "0.5" and record["grid_temperatures"][2] == "1.5"
    for row, images in zip(record["rows"], drawn):
        spec, cfg = row["temperature"], row["cfg_scale"]
        if (spec, cfg) in (("1.0", 1.0), ("linear:1.2:0.8", 2.0)):  # rows whose samples the seed and cfg change
            check_row(row, images, flow_ckpts["purrception"], tmp_path / f"sample-{spec}-{cfg}", classifier,
                      "--num-samples", b["num_samples"], "--steps", b["steps"], "--seed", 2,
                      f"--temperature={spec}", "--cfg-scale", cfg)


def test_solvers_on_codes(flow_ckpts, classifier, tmp_path, monkeypatch):
    drawn = drawn_by(monkeypatch, solvers)
    study.main(["solvers", "--data", "fashion-mnist", "--ckpt", str(flow_ckpts["purrception"]),
                "--dfm-ckpt", str(flow_ckpts["dfm"]), *scoring(classifier), "--budget", "tiny", "--seed", "1",
                "--out", str(tmp_path)])
    (header, rows), record = outputs(tmp_path, "solvers-fashion-mnist")
    assert header == ["model", "solver", "NFE target", "steps", "NFE", "ms/sample", "accuracy", "FID-LeNet"]
    nfe = solvers.IMAGE_BUDGETS["tiny"]["nfe"]
    assert [(r[0], r[1], int(r[2])) for r in rows] == [("purrception", s, n) for s in vfm.SOLVERS for n in nfe] + \
        [("dfm", "discrete euler", n) for n in nfe]
    assert all((int(r[3]), int(r[4])) == STEPS_AND_NFE[r[1]][int(r[2])] for r in rows)
    assert all(r["seconds_per_sample"] > 0 for r in record["rows"])
    for row, images in zip(record["rows"], drawn):
        if (row["solver"], row["nfe_target"]) in (("heun", 4), ("midpoint", 4), ("discrete euler", 4)):
            solver = "euler" if row["model"] == "dfm" else row["solver"]
            check_row(row, images, flow_ckpts[row["model"]], tmp_path / f"sample-{row['solver']}", classifier,
                      "--num-samples", 20, "--steps", STEPS_AND_NFE[row["solver"]][4][0], "--seed", 1,
                      "--solver", solver)


def test_uncertainty(flow_ckpts, tmp_path):
    study.main(["uncertainty", "--ckpt", str(flow_ckpts["purrception"]), "--budget", "tiny", "--seed", "4",
                "--out", str(tmp_path)])
    (header, rows), record = outputs(tmp_path, "uncertainty")
    b = uncertainty.BUDGETS["tiny"]
    assert header[0] == "sample" and len(header) == 1 + b["times"] and header[1] == "t=0.00"
    assert [r[0] for r in rows] == ["T-shirt: entropy", "Trouser: entropy", "all: entropy",
                                    "all: argmax = final code"]
    maps = torch.tensor(record["entropy_maps"])  # (classes, times, h, w)
    assert maps.shape == (b["classes"], b["times"], 7, 7)
    # The first evaluation, at t = 0 on the seed's noise, recomputed with torch's categorical entropy.
    flow, first = checkpoint.Flow(str(flow_ckpts["purrception"])), []
    flow.objective.sample(flow.model, (b["classes"], *flow.grid), y=torch.arange(b["classes"]), steps=b["steps"],
                          generator=torch.Generator().manual_seed(4),
                          callback=lambda t, z, logits: first.append(logits.clone()) if not first else None)
    expected = torch.distributions.Categorical(logits=first[0].double()).entropy()
    assert torch.allclose(maps[:, 0].double(), expected, atol=1e-5)
    assert maps.min() >= 0 and maps.max() <= math.log(flow.objective.num_codes) + 1e-5  # 0 <= H <= log K
    assert [float(c) for c in rows[-2][1:]] == [round(float(maps[:, j].mean()), 2) for j in range(b["times"])]


# ---- bad input: one line on stderr, exit status 2, before any work, files left as they were -----------------

@pytest.fixture(scope="module")
def bad(flow_ckpts, tmp_path_factory):
    """Files that are not what a flag expects: half a checkpoint, samples, a directory, a file, a DFM checkpoint
    of another dataset."""
    bad = tmp_path_factory.mktemp("bad")
    ckpt = flow_ckpts["purrception"].read_bytes()
    (bad / "truncated.pt").write_bytes(ckpt[:len(ckpt) // 2])
    np.savez(bad / "samples.npz", arr_0=np.zeros((2, 28, 28, 1), np.uint8))
    (bad / "empty").mkdir()
    (bad / "FILE").write_text("mine")
    dfm = checkpoint.load(str(flow_ckpts["dfm"]))
    dfm["codes_meta"]["dataset"] = "mnist"
    torch.save(dfm, bad / "dfm-mnist.pt")
    return bad


@pytest.mark.parametrize("argv, message", [
    (["temperature"], "temperature needs --ckpt"),
    (["temperature", "--ckpt", "no/such.pt"], "no/such.pt: no such file"),
    (["temperature", "--ckpt", "{dfm}"], "a checkpoint of dfm; temperature needs purrception"),
    (["uncertainty", "--ckpt", "{dfm}"], "a checkpoint of dfm; uncertainty needs purrception"),
    (["solvers", "--data", "fashion-mnist", "--ckpt", "{purrception}", "--dfm-ckpt", "{purrception}"],
     "a checkpoint of purrception; --dfm-ckpt needs dfm"),
    (["solvers", "--data", "fashion-mnist", "--ckpt", "{purrception}"], "needs --data-dir"),
    (["solvers", "--ckpt", "{purrception}"], "--ckpt and --dfm-ckpt are for --data fashion-mnist"),
    (["convergence", "--data", "fashion-mnist", "--data-dir", FASHION_MNIST], "needs --codes"),
    (["fewstep", "--ckpt", "{purrception}"], "--ckpt is for --data fashion-mnist or mnist"),
    (["fewstep", "--data", "fashion-mnist", "--data-dir", FASHION_MNIST], "fewstep --data fashion-mnist needs --ckpt"),
    (["fewstep", "--data", "fashion-mnist", "--ckpt", "{dfm}"], "a checkpoint of dfm; fewstep needs purrception"),
    (["fewstep", "--data", "mnist", "--ckpt", "{purrception}"], "trained on fashion-mnist codes, not --data mnist"),
    (["guidance"], "guidance needs --ckpt"),
    (["convergence", "--data", "fashion-mnist", "--codes", "{codes}", "--schedule", "per-budget"],
     "--schedule is for --data toy"),
    (["convergence", "--data", "toy", "--codes", "{codes}"], "--codes is for --data fashion-mnist"),
    (["convergence", "--data", "mnist", "--codes", "{codes}", "--data-dir", FASHION_MNIST], "not of --data mnist"),
    (["codebook", "--data-dir", FASHION_MNIST], "codebook needs --codes"),
    (["codebook", "--codes", "{codes}", "--data-dir", FASHION_MNIST], "expected two or more code sets"),
    (["codebook", "--codes", "{codes},{codes}", "--data-dir", FASHION_MNIST],
     "{codes}: K = 256, as {codes}; give one code set per codebook size"),
    (["codebook", "--data", "mnist", "--codes", "{codes},{codes}", "--data-dir", FASHION_MNIST],
     "{codes}: a code set of fashion-mnist, not of --data mnist"),
    (["codebook", "--codes", "{codes},{bad}/empty", "--data-dir", FASHION_MNIST],
     "{bad}/empty/meta.json: missing; expected a code set"),
    # numbers
    (["uncertainty", "--ckpt", "{purrception}", "--seed", "-1"], "--seed -1: expected an integer in [0, 2^32)"),
    (["solvers", "--seed", str(2**32)], f"--seed {2**32}: expected an integer in [0, 2^32)"),
    # --out
    (["solvers", "--out", "{bad}/FILE"], "{bad}/FILE: exists and is not a directory"),
    (["solvers", "--out", "{bad}/FILE/out"], "{bad}/FILE/out: cannot create the output directory"),
    # checkpoints and code sets that are something else
    (["uncertainty", "--ckpt", "{bad}/truncated.pt"], "truncated.pt: not a readable PyTorch file"),
    (["uncertainty", "--ckpt", "{tokenizer}"], "tokenizer.pt: not a checkpoint of train.py"),
    (["temperature", "--ckpt", "{bad}/samples.npz"], "samples.npz: not a readable PyTorch file"),
    (["temperature", "--ckpt", "{bad}/empty"], "{bad}/empty: a directory; expected a checkpoint of train.py"),
    (["solvers", "--data", "fashion-mnist", "--ckpt", "{purrception}", "--dfm-ckpt", "{bad}/truncated.pt"],
     "truncated.pt: not a readable PyTorch file"),
    (["solvers", "--data", "fashion-mnist", "--ckpt", "{purrception}", "--dfm-ckpt", "{bad}/dfm-mnist.pt"],
     "dfm-mnist.pt: trained on mnist codes, not --data fashion-mnist"),
    (["convergence", "--data", "fashion-mnist", "--codes", "{bad}/empty", "--data-dir", FASHION_MNIST],
     "{bad}/empty/meta.json: missing; expected a code set"),
    (["convergence", "--data", "fashion-mnist", "--codes", "{bad}/FILE", "--data-dir", FASHION_MNIST],
     "{bad}/FILE/meta.json: missing; expected a code set"),
    # scoring: the IDX files and the classifier, before any training or sampling
    (["temperature", "--ckpt", "{purrception}", "--data-dir", "{bad}/empty", "--classifier", "{classifier}"],
     "{bad}/empty/t10k-images-idx3-ubyte[.gz]: missing fashion-mnist test file"),
    (["solvers", "--data", "fashion-mnist", "--ckpt", "{purrception}", "--data-dir", "{bad}/empty"],
     "{bad}/empty/t10k-images-idx3-ubyte[.gz]: missing fashion-mnist test file"),
    (["convergence", "--data", "fashion-mnist", "--codes", "{codes}", "--data-dir", "{bad}/no-such-dir"],
     "{bad}/no-such-dir: no such directory"),
    (["temperature", "--ckpt", "{purrception}", "--data-dir", FASHION_MNIST, "--classifier", "{bad}/samples.npz"],
     "expected a classifier file of evaluate.py"),
    (["convergence", "--data", "fashion-mnist", "--codes", "{codes}", "--data-dir", FASHION_MNIST,
      "--classifier", "{bad}/FILE/classifier.pt"], "{bad}/FILE: exists and is not a directory"),
])
def test_bad_input_is_one_line(flow_ckpts, codes_dir, tokenizer_run, classifier, bad, tmp_path, monkeypatch, capsys,
                               argv, message):
    for module in (convergence, temperature, solvers):
        monkeypatch.setattr(module, "timed_draw", lambda *a, **k: pytest.fail("sampled before checking the input"))
    monkeypatch.setattr(common.train, "train", lambda *a, **k: pytest.fail("trained before checking the input"))
    monkeypatch.setattr(lenet, "train_classifier", lambda *a, **k: pytest.fail("trained a classifier first"))
    names = dict(codes=codes_dir, bad=bad, tokenizer=tokenizer_run / "tokenizer.pt", classifier=classifier,
                 **flow_ckpts)
    out, bad_before = tmp_path / "out", contents(bad)
    err = one_line_error(capsys, study.main, [argv[0], "--budget", "tiny", "--out", out] + [a.format(**names) for a in argv[1:]])
    assert message.format(**names) in err
    assert contents(bad) == bad_before and contents(out) == {}


def test_bad_input_from_the_command_line(flow_ckpts, tmp_path):
    rc, out, err = run_cli("experiments/study.py", "uncertainty", "--ckpt", flow_ckpts["dfm"], "--out", tmp_path)
    assert rc == 2 and "Traceback" not in err
    expected = f"error: {flow_ckpts['dfm']}: a checkpoint of dfm; uncertainty needs purrception"
    assert err.strip().splitlines() == [expected]


# ---- an earlier run's outputs: kept unless --force, and whole whatever happens to a later run --------------

def test_an_earlier_run_is_kept_unless_force(flow_ckpts, tmp_path, capsys):
    argv = ["uncertainty", "--ckpt", flow_ckpts["purrception"], "--budget", "tiny", "--out", tmp_path]
    study.main([str(a) for a in argv])
    before = contents(tmp_path)
    assert list(before) == ["uncertainty.json", "uncertainty.md", "uncertainty.png"]
    err = one_line_error(capsys, study.main, argv + ["--seed", 1])
    assert f"{tmp_path}/uncertainty.md exists (an earlier run): pass --force" in err
    assert contents(tmp_path) == before
    study.main([str(a) for a in argv + ["--seed", 1, "--force"]])
    assert list(contents(tmp_path)) == list(before)
    assert json.loads((tmp_path / "uncertainty.json").read_text())["command"].endswith("--seed 1 --force")


def test_a_run_stopped_before_its_end_leaves_the_earlier_outputs(flow_ckpts, tmp_path, monkeypatch, capsys):
    """Ctrl-C once the figure is drawn, before the table: nothing is written until every output exists."""
    argv = ["uncertainty", "--ckpt", flow_ckpts["purrception"], "--budget", "tiny", "--out", tmp_path]
    study.main([str(a) for a in argv])
    before = contents(tmp_path)

    def ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(uncertainty.files, "markdown_table", ctrl_c)
    one_line_error(capsys, study.main, argv + ["--seed", 1, "--force"], code=130)
    assert contents(tmp_path) == before


def test_a_full_disk_is_one_line_and_leaves_the_earlier_outputs(flow_ckpts, tmp_path, monkeypatch, capsys):
    """The disk fills up while the last output is written: the table and JSON, already written beside theirs,
    do not replace them either."""
    argv = ["uncertainty", "--ckpt", flow_ckpts["purrception"], "--budget", "tiny", "--out", tmp_path]
    study.main([str(a) for a in argv])
    before = contents(tmp_path)
    fill_the_disk(monkeypatch, at=".png")
    err = one_line_error(capsys, study.main, argv + ["--seed", 1, "--force"])
    assert err.startswith(f"error: {tmp_path}/uncertainty.png") and err.endswith(": No space left on device")
    assert contents(tmp_path) == before  # no other file, no temporary one
