"""Issue 11, items 6 and 8 on outputs: read-only folders, full disks and existing files are
typed errors found before any work; killed writers leave nothing behind for long; a failed
run says in summary.json what it wrote and what is missing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from qtcompress.errors import ConfigError, MissingFileError, OutputError
from qtcompress.io.atomic import (
    OutputRecord,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    check_writable_dir,
    remove_stale_temps,
)

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534


def _as_unprivileged(fn, folder: Path) -> str:
    """Run ``fn()`` in a forked child that cannot write ``folder`` (mode 0555); its result.

    Root ignores permission bits, so as root the child drops to ``nobody`` first (a fork, not a
    new interpreter: the interpreter may live where ``nobody`` cannot read it).
    """
    folder.chmod(0o555)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            out = f"{type(exc).__name__}: {exc}"
        os.write(write_end, out.encode())
        os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as fh:
            return fh.read().decode()
    finally:
        os.waitpid(pid, 0)
        folder.chmod(0o755)


@pytest.fixture()
def shared_dir():
    # pytest's tmp folders are 0700 and owned by root: use one that `nobody` can reach.
    base = Path(tempfile.mkdtemp(prefix="qtc-hostile-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _outcome(fn):
    def run():
        try:
            fn()
            return "WROTE"
        except OutputError as exc:
            return f"OutputError: {exc}"

    return run


def test_read_only_output_folder_is_refused_before_any_work(shared_dir):
    out = shared_dir / "out"
    out.mkdir()
    checked = _as_unprivileged(_outcome(lambda: check_writable_dir(out, 1000)), out)
    assert checked.startswith(f"OutputError: Cannot write '{out}': Permission denied"), checked
    written = _as_unprivileged(_outcome(lambda: atomic_write_bytes(out / "m.onnx", b"x")), out)
    assert (
        written.startswith("OutputError: ")
        and "choose a writable output folder or fix its permissions" in written
    ), written
    assert list(out.iterdir()) == []


def test_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="is an existing file; choose a folder name"):
        check_writable_dir(tmp_path / "out")


def test_output_folder_with_missing_parent(tmp_path):
    with pytest.raises(MissingFileError, match="its parent .* does not exist"):
        check_writable_dir(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()


def test_output_folder_without_room(tmp_path):
    with pytest.raises(OutputError, match=r"MiB free, the run needs about .*; free disk space"):
        check_writable_dir(tmp_path / "out", expected_bytes=1 << 60)
    assert check_writable_dir(tmp_path / "out", expected_bytes=1000) == tmp_path / "out"
    assert list((tmp_path / "out").iterdir()) == []  # the probe is gone


def test_full_disk_during_a_write_is_an_output_error(tmp_path):
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"old")
    with pytest.raises(OutputError, match="No space left on device; free disk space"):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"partial")
            with open("/dev/full", "wb") as fh:  # the kernel's own ENOSPC
                fh.write(b"x" * 8192)
                fh.flush()
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


_KILLED_WRITER = """
import sys, time
from qtcompress.io.atomic import atomic_path
with atomic_path(sys.argv[1] + "/model.onnx") as tmp:
    tmp.write_bytes(b"half a model")
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_temp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        leftover = Path(child.stdout.readline().strip())
        assert leftover.exists() and leftover.name.startswith(".model.onnx.")
        # While the writer lives, its temporary file is not touched.
        atomic_write_bytes(tmp_path / "other.bin", b"x")
        assert leftover.exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert leftover.exists()  # kill -9: nothing could clean up
    atomic_write_bytes(tmp_path / "summary.json", b"{}")
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.bin", "summary.json"]


def test_stale_temp_cleanup_only_touches_this_tools_names(tmp_path):
    keep = [".hidden", "notes.tmp", ".m.onnx.short.tmp.onnx", ".m.onnx.abcdefgh.tmp.txt"]
    for name in keep:
        (tmp_path / name).write_text("x")
    (tmp_path / ".m.onnx.abcd1234.tmp.onnx").write_text("stale")
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == [".m.onnx.abcd1234.tmp.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_record_of_a_run_that_fails_between_outputs(tmp_path):
    gen, onnx_path = tmp_path / "m.qtc.safetensors", tmp_path / "m.onnx"
    with pytest.raises(RuntimeError, match="exporter crashed"):
        with OutputRecord(tmp_path, {"generator": gen, "onnx": onnx_path}) as record:
            atomic_write_bytes(gen, b"gen")
            record.wrote("generator")
            raise RuntimeError("exporter crashed")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {
        "status": "partial",
        "written": {"generator": str(gen)},
        "missing": {"onnx": str(onnx_path)},
        "error": "RuntimeError: exporter crashed",
    }


def test_record_of_a_run_in_progress_and_complete(tmp_path):
    gen = tmp_path / "m.qtc.safetensors"
    with OutputRecord(tmp_path, {"generator": gen}) as record:
        running = json.loads((tmp_path / "summary.json").read_text())
        assert running["status"] == "incomplete" and running["missing"] == {"generator": str(gen)}
        atomic_write_bytes(gen, b"gen")
        record.wrote("generator")
        record.complete({"name": "m", "files": {"generator": str(gen)}})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"name": "m", "files": {"generator": str(gen)}, "status": "complete"}
    with pytest.raises(ConfigError, match="Unknown output 'onnx'"):
        OutputRecord(tmp_path, {"generator": gen}).wrote("onnx")


def test_json_outputs_are_deterministic(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    atomic_write_json(tmp_path / "b.json", {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    with pytest.raises(ConfigError, match="not JSON-serialisable"):
        atomic_write_json(tmp_path / "c.json", {"x": float("nan")})
