"""The report writes real PNG files and a Markdown page that links them."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from qtcompress.errors import ConfigError, MissingFileError  # noqa: E402
from qtcompress.report import write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_writes_pngs_and_markdown(tmp_path):
    rng = np.random.default_rng(0)
    weights = {
        "conv.weight": (rng.normal(size=50), rng.normal(size=50)),
        "head.bias": (rng.normal(size=3), rng.normal(size=3)),
    }
    histories = {"phase 1": [1.0, 0.5, 0.2], "phase 2": [2.0, -1.0, 0.5]}
    report = write_report(tmp_path / "out", {"compression": "5.6x"}, histories, weights)
    text = report.read_text()
    assert "| compression | 5.6x |" in text
    for name in ("losses.png", "weights.png"):
        assert f"]({name})" in text
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "losses.png",
        "report.md",
        "weights.png",
    ]  # no temp files left behind


def test_report_errors(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        write_report(tmp_path / "missing" / "out", {}, {}, {})
    bad = {"w": (np.zeros(4), np.zeros(5))}
    with pytest.raises(ConfigError, match="original has 4 values, reconstruction 5"):
        write_report(tmp_path / "out", {}, {"p": [1.0]}, bad)
    assert not (tmp_path / "out" / "weights.png").exists()
