"""respec.files.write_atomically: the whole text or the old file, nothing left behind."""

from __future__ import annotations

from respec.files import write_atomically


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest"
    path.write_text("old")
    write_atomically(path, "new contents")
    assert path.read_text() == "new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_each_write_has_its_own_temporary_name(tmp_path, monkeypatch):
    """Two processes writing one path must not write into one temporary file (a fixed
    name would let one rename the other's half-written text into place)."""
    import os

    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: (renamed.append(source), real_replace(source, target)))
    path = tmp_path / "cache.json"
    write_atomically(path, "a")
    write_atomically(path, "b")
    assert len(set(renamed)) == 2 and path.read_text() == "b"
