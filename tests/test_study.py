"""study.py: every subcommand at --budget tiny writes its table, JSON and figures; bad input is one line."""

import json

import pytest

import evaluate
import study
import train
import vfm
from conftest import FASHION_MNIST, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


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
    assert record["budget"] == "tiny" and record["seconds"] >= 0 and record["command"].startswith("python study.py")
    return read_table(out / f"{name}.md"), record


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A small classifier file for evaluate.py (512 images, 1 epoch): the scores mean nothing, the code runs."""
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    evaluate.load_classifier("fashion-mnist", FASHION_MNIST, str(path), limit=512, epochs=1)
    return path


def scoring(classifier):
    return ["--data-dir", FASHION_MNIST, "--classifier", str(classifier)]


# ---- the toys --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", [None, "one-run", "per-budget"])
def test_convergence_on_the_toys(tmp_path, schedule):
    study.main(["convergence", "--data", "toy", "--budget", "tiny", "--seed", "1", "--out", str(tmp_path)] +
               (["--schedule", schedule] if schedule else []))
    name = "convergence-toy-per-budget" if schedule == "per-budget" else "convergence-toy"
    (header, rows), record = outputs(tmp_path, name)
    assert record["schedule"] == (schedule or "one-run")
    iters = [str(i) for i in study.CONVERGENCE_TOY["tiny"]["iters"]]
    assert header == ["toy", "metric", "method"] + iters
    for toy in ("checkerboard", "pairs"):
        assert [r[2] for r in rows if r[0] == toy and r[1] == "TV"][:4] == list(vfm.OBJECTIVES)
    assert ["checkerboard", "KL", "purrception"] == rows[-1][:3]
    assert len(record["rows"]) == 2 * 4 * len(iters) and {r["seed"] for r in record["rows"]} == {1}
    assert all(0 <= r["tv"] <= 1 for r in record["rows"])
    kl = [r for r in record["rows"] if "kl" in r]
    assert len(kl) == len(iters) and all(set(r["kl_by_t"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"} for r in kl)


def test_solvers_on_the_toy(tmp_path):
    study.main(["solvers", "--budget", "tiny", "--out", str(tmp_path)])
    (header, rows), record = outputs(tmp_path, "solvers-toy")
    nfe = study.SOLVERS_TOY["tiny"]["nfe"]
    assert header == ["toy", "model", "solver", *(f"NFE {n}" for n in nfe), "µs/sample/NFE"]
    assert len(rows) == 2 * (3 + 3 + 1) and len(record["rows"]) == len(rows) * len(nfe)
    heun = {f"{r['tv']:.3f} ({r['nfe']})" for r in record["rows"] if r["solver"] == "heun"}
    assert heun == {c for r in rows if r[2] == "heun" for c in r[3:-1]}  # Heun's odd NFE in brackets
    assert {(r[0], r[1], r[2]) for r in rows} == {(toy, m, s) for toy in ("checkerboard", "pairs") for m, s in
                                                  [(m, s) for m in ("oracle", "purrception") for s in vfm.SOLVERS] +
                                                  [("dfm", "discrete euler")]}
    for r in record["rows"]:
        solver = "euler" if r["solver"] == "discrete euler" else r["solver"]
        assert r["nfe"] == vfm.num_evaluations(r["steps"], solver) <= r["nfe_target"] or r["steps"] == 1


def test_steps_for_nfe_never_exceed_the_target():
    for nfe in (4, 8, 16, 32, 100):
        for solver in vfm.SOLVERS:
            steps = study.steps_for_nfe(nfe, solver)
            assert nfe - 2 < vfm.num_evaluations(steps, solver) <= nfe


# ---- Fashion-MNIST codes ---------------------------------------------------------------------------------

def test_convergence_on_codes(codes_dir, classifier, tmp_path):
    study.main(["convergence", "--data", "fashion-mnist", "--codes", str(codes_dir), *scoring(classifier),
                "--budget", "tiny", "--out", str(tmp_path)])
    (header, rows), record = outputs(tmp_path, "convergence-fashion-mnist")
    assert header == ["objective", "training steps", "accuracy", "FID-LeNet", "s/step (train)"]
    b = study.CONVERGENCE_IMAGES["tiny"]
    steps = list(range(b["keep_every"], b["train_steps"] + 1, b["keep_every"]))
    assert [(r[0], int(r[1])) for r in rows[:-1]] == [(o, s) for o in vfm.OBJECTIVES for s in steps]
    assert rows[-1][0] == "VQ reconstructions (ceiling)"
    for objective in vfm.OBJECTIVES:
        ckpt = train.load_checkpoint(str(tmp_path / "runs" / objective / "checkpoints" / f"step-{steps[-1]:07d}.pt"))
        assert ckpt["args"]["objective"] == objective and ckpt["args"]["batch_size"] == b["batch_size"]
    assert all(0 <= r["accuracy"] <= 1 and r["fid"] >= 0 for r in record["rows"])


def test_temperature(flow_ckpts, classifier, tmp_path):
    study.main(["temperature", "--ckpt", str(flow_ckpts["purrception"]), *scoring(classifier), "--budget", "tiny",
                "--seed", "2", "--out", str(tmp_path)])
    (header, rows), record = outputs(tmp_path, "temperature", ["temperature-grid"])
    b = study.TEMPERATURE["tiny"]
    assert header == ["temperature"] + [f"{m} (cfg {c:g})" for c in b["cfg_scales"] for m in ("accuracy", "FID")]
    assert [r[0] for r in rows] == list(b["temperatures"] + b["schedules"])
    assert len(record["rows"]) == len(rows) * len(b["cfg_scales"])
    assert record["grid_temperatures"][0] == "0.5" and record["grid_temperatures"][2] == "1.5"


def test_solvers_on_codes(flow_ckpts, classifier, tmp_path):
    study.main(["solvers", "--data", "fashion-mnist", "--ckpt", str(flow_ckpts["purrception"]),
                "--dfm-ckpt", str(flow_ckpts["dfm"]), *scoring(classifier), "--budget", "tiny", "--out", str(tmp_path)])
    (header, rows), record = outputs(tmp_path, "solvers-fashion-mnist")
    assert header == ["model", "solver", "NFE target", "steps", "NFE", "ms/sample", "accuracy", "FID-LeNet"]
    nfe = study.SOLVERS_IMAGES["tiny"]["nfe"]
    assert [(r[0], r[1]) for r in rows] == [("purrception", s) for s in vfm.SOLVERS for _ in nfe] + \
        [("dfm", "discrete euler")] * len(nfe)
    assert all(r["seconds_per_sample"] > 0 for r in record["rows"])


def test_uncertainty(flow_ckpts, tmp_path):
    study.main(["uncertainty", "--ckpt", str(flow_ckpts["purrception"]), "--budget", "tiny", "--out", str(tmp_path)])
    (header, rows), record = outputs(tmp_path, "uncertainty")
    b = study.UNCERTAINTY["tiny"]
    assert header[0] == "sample" and len(header) == 1 + b["times"] and header[1] == "t=0.00"
    assert [r[0] for r in rows] == ["T-shirt: entropy", "Trouser: entropy", "all: entropy",
                                    "all: argmax = final code"]
    maps = record["entropy_maps"]
    assert len(maps) == b["classes"] and len(maps[0]) == b["times"] and len(maps[0][0]) == 7
    assert all(0 <= float(c) <= 5.55 for r in rows[:-1] for c in r[1:])


# ---- bad input: one line on stderr, exit status 2 --------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["temperature"], "temperature needs --ckpt"),
    (["temperature", "--ckpt", "no/such.pt"], "no/such.pt: no such checkpoint"),
    (["temperature", "--ckpt", "{dfm}"], "a checkpoint of dfm; temperature needs purrception"),
    (["uncertainty", "--ckpt", "{dfm}"], "a checkpoint of dfm; uncertainty needs purrception"),
    (["solvers", "--data", "fashion-mnist", "--ckpt", "{purrception}", "--dfm-ckpt", "{purrception}"],
     "a checkpoint of purrception; --dfm-ckpt needs dfm"),
    (["solvers", "--data", "fashion-mnist", "--ckpt", "{purrception}"], "needs --data-dir"),
    (["solvers", "--ckpt", "{purrception}"], "--ckpt and --dfm-ckpt are for --data fashion-mnist"),
    (["convergence", "--data", "fashion-mnist", "--data-dir", FASHION_MNIST], "needs --codes"),
    (["convergence", "--data", "fashion-mnist", "--codes", "{codes}", "--schedule", "per-budget"],
     "--schedule is for --data toy"),
    (["convergence", "--data", "toy", "--codes", "{codes}"], "--codes is for --data fashion-mnist"),
    (["convergence", "--data", "mnist", "--codes", "{codes}", "--data-dir", FASHION_MNIST], "not of --data mnist"),
])
def test_bad_input_is_one_line(flow_ckpts, codes_dir, tmp_path, capsys, argv, message):
    argv = [a.format(codes=codes_dir, **flow_ckpts) for a in argv] + ["--budget", "tiny", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        study.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_bad_input_from_the_command_line(flow_ckpts, tmp_path):
    rc, out, err = run_cli("study.py", "uncertainty", "--ckpt", flow_ckpts["dfm"], "--out", tmp_path)
    assert rc == 2 and "Traceback" not in err
    expected = f"error: {flow_ckpts['dfm']}: a checkpoint of dfm; uncertainty needs purrception"
    assert err.strip().splitlines() == [expected]
