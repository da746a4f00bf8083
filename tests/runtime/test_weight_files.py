"""WeightFiles: file handles for other processes, the latest few kept, an owned directory
removed at the end and a user's left."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from respec.runtime.weight_files import WeightFiles


def test_keeps_the_latest_files_and_removes_its_own_directory():
    files = WeightFiles("", "respec-test-", keep=2)
    paths = [files.save(f"policy-v{v}", {"w": torch.full((2,), float(v))}) for v in range(1, 5)]
    assert [p.exists() for p in paths] == [False, False, True, True]
    assert load_file(paths[-1])["w"].tolist() == [4.0, 4.0]
    files.close()
    assert not files.directory.exists()


def test_a_users_directory_stays_with_the_latest_files(tmp_path):
    files = WeightFiles(str(tmp_path / "weights"), "unused-", keep=1)
    files.save("draft-v1", {"w": torch.zeros(1)})
    latest = files.save("draft-v2", {"w": torch.ones(1)})
    files.close()
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [latest.name]


def test_keep_must_leave_the_latest():
    with pytest.raises(ValueError, match="keep must be >= 1"):
        WeightFiles("", "respec-test-", keep=0)
