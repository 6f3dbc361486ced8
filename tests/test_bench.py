"""experiments/bench.py: the table it prints and appends, its errors, and the OOM row. No timing is asserted."""


import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train
from conftest import fill_the_disk
from dit import DiT, build_dit
from experiments import bench

TINY = ["--models", "DiT-T/2", "--batch-size", "2", "--grid", "4", "--codebook-size", "16", "--num-classes", "3",
        "--steps", "1", "--warmup", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """--threads sets torch's global thread count; put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def table_rows(text):
    """The data rows of every markdown table in text, as lists of cells."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows if row[0].strip() != "model"]


def test_appends_a_section_with_one_row_per_config(tmp_path):
    out = tmp_path / "BENCH.md"
    out.write_text("# My benchmarks\n\nkept as is\n")
    bench.main(TINY + ["--dtype", "fp32", "bf16", "--out", out])
    text = out.read_text()
    assert text.startswith("# My benchmarks\n\nkept as is\n")
    assert "| " + " | ".join(bench.COLUMNS) + " |" in text
    assert "python experiments/bench.py --models DiT-T/2 --batch-size 2" in text
    assert f"torch {torch.__version__}" in text and " UTC: " in text
    rows = table_rows(text)
    assert [[r[0], *r[2:6]] for r in rows] == [["DiT-T/2", dtype, "no", "-", "2"] for dtype in ("fp32", "bf16")]
    for row in rows:
        assert len(row) == len(bench.COLUMNS)
        cells = dict(zip(bench.COLUMNS, row))
        steps_per_s, images_per_s = float(cells["steps/s"]), float(cells["images/s"])
        assert steps_per_s > 0 and images_per_s == pytest.approx(2 * steps_per_s, rel=1e-2)  # batch 2; 3 digits each
        assert float(cells["TFLOP/s"]) == pytest.approx(float(cells["GFLOP/image/step"]) * images_per_s / 1e3,
                                                        rel=1.5e-2)
        assert cells["MFU"] == "n/a" and cells["peak mem (GiB)"] == "n/a"  # a CPU without --peak-tflops
        assert float(cells["loss peak (MiB)"]) > 0
        assert float(cells["sampling pass peak"].split()[0]) >= 1  # at least the output itself
    # a second run appends a second section and keeps the first
    bench.main(TINY + ["--dtype", "fp32", "--out", out])
    assert out.read_text().startswith(text) and len(table_rows(out.read_text())) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["BENCH.md"]  # no temporary file left behind


def test_flops_column_is_three_forwards(tmp_path):
    rows = bench.main(TINY + ["--dtype", "fp32", "--peak-tflops", "1"])
    model = build_dit("DiT-T/2", grid_size=4, in_dim=8, out_dim=16, num_classes=3)
    assert float(rows[0]["GFLOP/image/step"]) == pytest.approx(3 * bench.flops_per_forward(model) / 1e9, rel=1e-3)
    assert rows[0]["MFU"].endswith("%")


def test_compile_both_measures_eager_and_compiled(monkeypatch):
    compile, compiled = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or compile(model, backend="eager"))
    rows = bench.main(TINY + ["--dtype", "fp32", "--compile", "both"])
    assert [(r["compile"], r["compiled loss"]) for r in rows] == [("no", "-"), ("yes", "yes")]  # train.py's compile
    assert [type(m) for m in compiled] == [train.NetworkLoss]
    assert all(float(r["steps/s"]) > 0 for r in rows)
    compiled.clear()
    rows = bench.main(TINY + ["--dtype", "fp32", "--compile", "on", "--compiled-loss", "both"])
    assert [(r["compile"], r["compiled loss"]) for r in rows] == [("yes", "no"), ("yes", "yes")]
    assert [type(m) for m in compiled] == [DiT, train.NetworkLoss]


def test_the_model_is_built_as_train_py_builds_it():
    """train.py's default settings, so that torch.compile sees train.py's graph: its time scale is the float 1000.0,
    not the integer 1000 (another constant in the graph); and it is built on the device it runs on."""
    model, objective = bench.build("DiT-T/2", bench.parse_args(TINY), "meta")
    assert type(model.t_embedder.time_scale) is float and model.t_embedder.time_scale == train.Settings.time_scale
    assert objective.name == "purrception" and {p.device.type for p in model.parameters()} == {"meta"}


def test_peak_allocated_on_a_cpu_is_the_most_held_above_the_start():
    """1 MiB and 2 MiB held at once, then freed with a 1 MiB tensor allocated before: 3 MiB above the start, and
    what is held at the end (2 MiB allocated after the frees) does not change it."""
    held = [torch.empty(2**18)]

    def work():
        a, b = torch.empty(2**18), torch.empty(2**19)  # float32: 1 MiB, 2 MiB
        del a, b
        held.clear()
        held.append(torch.empty(2**19))

    assert bench.peak_allocated(work, torch.device("cpu")) == 3 * 2**20


def test_out_of_memory_gives_an_oom_row(monkeypatch, tmp_path):
    def out_of_memory(*args, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench, "time_training", out_of_memory)
    out = tmp_path / "b.md"
    rows = bench.main(TINY + ["--models", "DiT-T/2", "DiT-T/1", "--out", out])
    assert [r["steps/s"] for r in rows] == ["OOM", "OOM"]
    assert "| OOM |" in out.read_text()


@pytest.mark.parametrize("argv, message", [
    (["--models", "DiT-Q/2"], "'DiT-Q/2'"),
    (["--dtype", "fp16"], "'fp16'"),
    (["--models", "DiT-B/2", "--grid", "7"], "patch_size 2 does not divide grid_size 7"),
    (["--steps", "0"], "--steps 0: expected a positive number"),
    (["--device", "meta"], "--device meta"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_bad_input_exits_2_with_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--peak-tflops", "nan"], "--peak-tflops nan: expected a positive number"),
    (["--peak-tflops", "0"], "--peak-tflops 0.0: expected a positive number"),
    (["--threads", "0"], "--threads 0: expected a positive number"),
    (["--warmup", "-1"], "--warmup -1: expected a number >= 0"),
    (["--compiled-loss", "off"], "--compiled-loss off: it chooses what the compiled rows compile; add --compile on or "
                                 "both"),
    (["--seed", "-1"], "--seed -1: expected an integer in [0, 2^32)"),
    (["--out", "{tmp}/no-such-dir/b.md"], "--out {tmp}/no-such-dir/b.md: its directory does not exist"),
    (["--out", "{tmp}/FILE/b.md"], "--out {tmp}/FILE/b.md: its directory does not exist"),
    (["--out", "{tmp}"], "--out {tmp}: a directory; expected a markdown file"),
    (["--out", "{tmp}/binary.pt"], "--out {tmp}/binary.pt: not a text file; expected a markdown file to append to"),
])
def test_bad_numbers_and_paths_are_one_line_before_the_benchmark(tmp_path, monkeypatch, capsys, argv, message):
    (tmp_path / "FILE").write_text("mine")
    (tmp_path / "binary.pt").write_bytes(b"\x80\x02 a pickle")
    monkeypatch.setattr(bench, "time_training", lambda *a, **k: pytest.fail("benchmarked before checking"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(TINY + [a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0] == "error: " + message.format(tmp=tmp_path), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE", "binary.pt"]
    assert (tmp_path / "FILE").read_text() == "mine" and (tmp_path / "binary.pt").read_bytes() == b"\x80\x02 a pickle"


def test_a_cuda_device_this_machine_lacks(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(TINY + ["--device", "cuda:3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == ["error: --device cuda:3: this machine has 1 CUDA device(s)"]


def test_a_full_disk_is_one_line_and_leaves_the_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "BENCH.md"
    out.write_text("# My benchmarks\n")
    fill_the_disk(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(TINY + ["--dtype", "fp32", "--out", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == [f"error: {out}: No space left on device"]
    assert [p.name for p in tmp_path.iterdir()] == ["BENCH.md"] and out.read_text() == "# My benchmarks\n"


def test_cpu_memory_running_out_gives_an_oom_row(monkeypatch):
    def out_of_memory(*args, **kw):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(bench, "time_training", out_of_memory)
    assert [r["steps/s"] for r in bench.main(TINY)] == ["OOM"]
    monkeypatch.setattr(bench, "time_training", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # any other error is a bug, not a row
        bench.main(TINY)


def test_times_train_py_s_own_training_step(monkeypatch):
    """bench.py's steps/s is train.py's: every timed and warm-up step is a call of train.train_step, which moves
    the weights, the optimizer state and the EMA."""
    import train
    calls = []
    step = train.train_step

    def counted(trainee, *args, **kw):
        before = [p.detach().clone() for p in trainee.ema.parameters()]
        grad_norm = step(trainee, *args, **kw)
        calls.append(any(not torch.equal(a, b) for a, b in zip(before, trainee.ema.parameters())))
        return grad_norm

    monkeypatch.setattr(train, "train_step", counted)
    bench.main(TINY + ["--dtype", "fp32", "--steps", "3", "--warmup", "2"])
    assert len(calls) == 5 and all(calls)


# ---- FLOPs -------------------------------------------------------------------------------------------------

def test_flops_dit_xl_2_matches_paper():
    """The DiT paper's 118.6 "Gflops" for XL/2 at 256 tokens are multiply-adds: about 237 GFLOP."""
    with torch.device("meta"):
        model = build_dit("DiT-XL/2", grid_size=32, in_dim=8, out_dim=8, num_classes=1000)
    assert bench.flops_per_forward(model) == pytest.approx(237e9, rel=0.02)


def test_flops_include_the_output_head():
    with torch.device("meta"):
        small = build_dit("DiT-XL/2", grid_size=32, in_dim=8, out_dim=8, num_classes=1000)
        large = build_dit("DiT-XL/2", grid_size=32, in_dim=8, out_dim=16384, num_classes=1000)
    # output head: 256 tokens x 1152 x (4 x K) multiply-adds, 2 FLOPs each
    assert bench.flops_per_forward(large) - bench.flops_per_forward(small) == 2 * 256 * 1152 * 4 * (16384 - 8)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_flops_match_flop_counter(patch_size):
    """torch's FlopCounterMode counts every matrix product; with the math attention kernel it sees the attention
    products as bmm (the fused CPU kernel is not counted), and then it agrees with the analytic count exactly."""
    model = DiT(grid_size=8, in_dim=4, out_dim=16, num_classes=10, patch_size=patch_size, hidden_size=32, depth=2,
                num_heads=4)
    B = 3
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.randn(B, 8, 8, 4), torch.rand(B), torch.randint(0, 11, (B,)))
    assert counter.get_total_flops() / B == pytest.approx(bench.flops_per_forward(model), rel=0.01)
