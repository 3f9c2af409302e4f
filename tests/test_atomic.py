import os

import pytest

from qtcompress.errors import ConfigError, MissingFileError
from qtcompress.io.atomic import atomic_path, atomic_write_bytes, check_output_path


def test_write_and_overwrite_leave_only_the_file(tmp_path):
    dest = tmp_path / "out.bin"
    atomic_write_bytes(dest, b"first")
    atomic_write_bytes(dest, b"second")
    assert dest.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_mode_follows_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_missing_folder_names_folder_and_fix(tmp_path):
    dest = tmp_path / "nope" / "out.bin"
    with pytest.raises(MissingFileError, match="folder '.*' does not exist") as info:
        atomic_write_bytes(dest, b"x")
    assert str(tmp_path / "nope") in str(info.value)
    assert "mkdir" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_directory_as_destination(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="is an existing folder, not a file"):
        check_output_path(tmp_path / "d")


def test_failure_removes_temp_and_keeps_old_file(tmp_path):
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"old")
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(dest) as tmp:
            seen.append(tmp)
            assert tmp.parent == tmp_path and tmp.suffix == ".onnx"
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not seen[0].exists()
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
