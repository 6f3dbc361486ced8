"""support/checkpoint.py: one resume decision for every rank, checkpoints read without copying them whole, and the
settings a checkpoint holds (the time embedding's scale, flips) checked on resume."""

import dataclasses
import gc
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from conftest import free_port, one_line_error
from support import checkpoint, codesets, files
from support.cli import UserError


def resume_with_blind_rank(rank, world, port, path, blind_rank, results):
    """resume_point on `world` gloo processes, where rank `blind_rank` cannot see `path` (another node's disk)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    exists = os.path.exists
    if rank == blind_rank:
        os.path.exists = lambda p: False if p == path else exists(p)
    try:
        checkpoint.resume_point(train.Settings(codes="C", out="O", resume=True), None, path, rank, world)
        results[rank] = "resumed"
    except UserError as e:
        results[rank] = str(e)
    finally:
        os.path.exists = exists
        dist.destroy_process_group()


@pytest.mark.parametrize("blind_rank", [1, 0])
def test_a_rank_that_cannot_see_the_checkpoint_stops_every_rank(tmp_path, blind_rank):
    path = str(tmp_path / "last.pt")
    torch.save({"format": "not a checkpoint"}, path)  # never read: the ranks disagree before anything is loaded
    results = mp.Manager().dict()
    mp.spawn(resume_with_blind_rank, args=(2, free_port(), path, blind_rank, results), nprocs=2)
    said = ("rank 0 sees it, rank(s) 1 do not" if blind_rank == 1 else "rank 0 does not see it, rank(s) 1 do")
    assert results[0] == results[1] and said in results[0] and "filesystem every node shares" in results[0]


def test_a_checkpoint_is_mapped_not_read(tmp_path):
    path = tmp_path / "big.pt"
    files.save_torch(path, {"w": torch.arange(1000.0)})
    loaded = files.load_torch(path, "a test file", mmap=True)
    assert torch.equal(loaded["w"], torch.arange(1000.0))
    address = loaded["w"].data_ptr()  # backed by a mapping of the file, not by a copy in memory
    mapped = [line.split() for line in open("/proc/self/maps") if line.rstrip().endswith(str(path))]
    assert any(int(lo, 16) <= address < int(hi, 16) for lo, hi in (m[0].split("-") for m in mapped))


def test_the_time_scale_is_the_models_and_is_checked_on_resume(codes_dir, tmp_path, capsys):
    """--time-scale 1 (the authors' embedding of t itself) builds another time embedding than DiT's 1000 t, is
    recorded, and a run resumes only with the scale it started with."""
    settings = dataclasses.asdict(train.Settings(codes="C", out="O"))
    codebook, t = torch.randn(16, 4), torch.tensor([0.3, 0.6])
    models = {}
    for scale in (1000.0, 1.0):
        torch.manual_seed(0)
        models[scale], _ = checkpoint.build(dict(settings, time_scale=scale), codebook, (4, 4), 2)
    models[1.0].load_state_dict(models[1000.0].state_dict())
    embed = {scale: m.t_embedder(t) for scale, m in models.items()}
    assert not torch.allclose(embed[1.0], embed[1000.0])
    common = ["--codes", str(codes_dir), "--out", str(tmp_path), "--model", "DiT-T/1", "--batch-size", "8",
              "--sample-every", "0", "--steps", "1"]
    train.main(common + ["--time-scale", "1", "--no-flip"])
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["settings"]
    assert (saved["time_scale"], saved["no_flip"]) == (1.0, True)
    capsys.readouterr()
    line = one_line_error(capsys, train.main, common + ["--steps", "2", "--resume", "--no-flip"])
    assert "trained with --time-scale 1.0, not 1000.0" in line


def test_no_flip_trains_on_the_first_view_only(tmp_path):
    """A code set of two views (the crop and its flip): batches draw either at random, or only the first with
    --no-flip."""
    codes = np.stack([np.zeros((64, 2, 2)), np.ones((64, 2, 2))], axis=1)  # (n, V = 2, h, w): view v holds code v
    codesets.write_shard(str(tmp_path), 0, codes, np.arange(64) % 4)
    codesets.write_meta(str(tmp_path), np.eye(2, dtype=np.float32), 1, grid=[2, 2], num_classes=4, views=2)
    code_set = codesets.CodeSet(str(tmp_path))
    for flips, seen in ((True, {0, 1}), (False, {0})):
        batches = codesets.Batches(code_set, 16, 0, 1, seed=0, flips=flips)
        drawn = torch.cat([batches.next()[0] for _ in range(8)])  # two epochs
        assert set(drawn.unique().tolist()) == seen


def test_a_resumed_run_lets_go_of_the_checkpoint_it_restored(codes_dir, tmp_path, monkeypatch):
    """--resume maps last.pt to read it; once restored nothing holds it, the optimizer's state included, so that
    the file the next checkpoint replaces frees its disk: at the first step of the resumed run no mapping is left."""
    last = str(tmp_path / "checkpoints" / "last.pt")
    common = ["--codes", str(codes_dir), "--out", str(tmp_path), "--model", "DiT-T/1", "--batch-size", "8",
              "--sample-every", "0"]
    train.main(common + ["--steps", "1"])
    mapped, train_step = [], train.train_step

    def step(*args, **kw):
        gc.collect()
        mapped.append([line for line in open("/proc/self/maps") if line.rstrip().endswith(last)])
        return train_step(*args, **kw)

    monkeypatch.setattr(train, "train_step", step)
    train.main(common + ["--steps", "2", "--resume"])
    assert mapped == [[]]
