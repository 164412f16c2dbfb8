"""Atomic writes: a reader sees the old file or the whole new one, and a failed write leaves no debris."""
import json
import os

import pytest

from minitagpr import atomic


def test_writes_text_bytes_and_json_whole(tmp_path):
    atomic.atomic_write_text(tmp_path / "a" / "t.txt", "héllo\n")  # parents made
    atomic.atomic_write_bytes(tmp_path / "b.bin", b"\x00\xff")
    atomic.atomic_write_json(tmp_path / "c.json", {"k": "é"}, indent=2)
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == '{\n  "k": "é"\n}'  # non-ASCII kept as is
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["b.bin", "c.json", "t.txt"]


def test_a_failed_rename_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    path.write_text("old")

    def fail(src, dst):
        raise OSError("disk gone")
    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        atomic.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_the_bytes_are_synced_before_the_rename(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: calls.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda s, d: (calls.append("replace"), real_replace(s, d)))
    atomic.atomic_write_json(tmp_path / "y.json", [1])
    assert calls == ["fsync", "replace"]
    assert json.loads((tmp_path / "y.json").read_text()) == [1]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_the_file_gets_the_umasks_modes(tmp_path, umask, mode):
    # two umasks: a fixed chmod 0644 after the write would pass the first one alone
    old = os.umask(umask)
    try:
        path = atomic.atomic_write_text(tmp_path / "m.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode  # mkstemp's files would be 0600
