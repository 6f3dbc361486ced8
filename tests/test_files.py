"""support/files.py: a write that fails leaves the earlier file whole and names the file; checked loads name the path."""

import errno

import pytest
import torch

from support import files


def test_a_failed_write_keeps_the_earlier_file_and_names_it(tmp_path):
    path = tmp_path / "out.json"
    files.write_json(str(path), {"step": 1})
    before = path.read_bytes()

    def full_disk(f):
        f.write(b"half of it")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as error:
        files.atomic_write(str(path), full_disk)
    assert error.value.filename == str(path) and error.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_load_torch_names_what_is_wrong(tmp_path):
    expected = "a checkpoint of train.py"
    with pytest.raises(FileNotFoundError, match=f"missing.pt: no such file; expected {expected}"):
        files.load_torch(str(tmp_path / "missing.pt"), expected)
    with pytest.raises(IsADirectoryError, match=f"a directory; expected {expected}"):
        files.load_torch(str(tmp_path), expected)
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match=f"cut.pt: not a readable PyTorch file .*; expected {expected}"):
        files.load_torch(str(tmp_path / "cut.pt"), expected)
    files.save_torch(str(tmp_path / "ok.pt"), {"x": torch.arange(3)})
    assert torch.equal(files.load_torch(str(tmp_path / "ok.pt"), expected)["x"], torch.arange(3))


def test_markdown_table():
    assert files.markdown_table(["a", "b"], [[1, "x"], [2.5, None]]) == \
        "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | None |\n"
