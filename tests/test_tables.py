"""Tables as data: `.csv` columns as float features, a class column, a held-out split, bad
cells refused with their line and column (``qtcompress/data/tables.py``)."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from qtcompress.data.tables import load_table_split, read_table
from qtcompress.errors import ConfigError, MissingFileError
from qtcompress.examples import load_dataset
from tests.cli_helpers import ROOT, assert_one_line_error

CKPT = ROOT / "models" / "wine_mlp.safetensors"
FAST = ["--fit-steps", "2", "--finetune-steps", "20", "--no-progress"]


def _wine_csv(path, rows=None):
    wine = load_dataset("wine")
    x = torch.cat([wine.x_train, wine.x_test]).numpy()
    y = torch.cat([wine.y_train, wine.y_test]).numpy()
    rows = len(x) if rows is None else rows
    header = [f"f{i}" for i in range(x.shape[1])]
    lines = [",".join([*header[:5], "class", *header[5:]])]
    for xi, yi in zip(x[:rows], y[:rows], strict=True):
        cells = [f"{v:.6g}" for v in xi]
        lines.append(",".join([*cells[:5], str(int(yi)), *cells[5:]]))
    path.write_text("\n".join(lines) + "\n")
    return x[:rows], y[:rows]


def test_a_csv_becomes_float_features_and_labels_with_a_seeded_split(tmp_path):
    x, y = _wine_csv(tmp_path / "wine.csv")
    names, features, labels = read_table(tmp_path / "wine.csv", "class")
    assert names[:5] == ["f0", "f1", "f2", "f3", "f4"] and "class" not in names
    np.testing.assert_allclose(features, x, rtol=1e-5)
    np.testing.assert_array_equal(labels, y)
    split, line = load_table_split(tmp_path / "wine.csv", label_column="class")
    assert split.x_train.dtype == torch.float32 and split.x_train.shape[1] == 13
    assert len(split.x_train) + len(split.x_test) == len(x) and len(split.x_test) == 18
    assert "160 train / 18 test rows of 13 float features (10% held out to test, seed 0)" in line
    again, _ = load_table_split(tmp_path / "wine.csv", label_column="class")
    assert torch.equal(again.x_test, split.x_test)  # the split is seeded
    # Without a label column every column is a feature, and there are no labels.
    unlabelled, _ = load_table_split(tmp_path / "wine.csv")
    assert unlabelled.x_train.shape[1] == 14 and unlabelled.y_train.numel() == 0


@pytest.mark.parametrize(
    ("content", "label", "match"),
    [
        ("a,b\n1,2\n3,x\n", None, r"t.csv line 3, column 'b': 'x' is not a number"),
        ("a,b\n1,2\n3,inf\n", None, r"t.csv line 3, column 'b': 'inf' is not finite"),
        ("a,b\n1,2\n3\n", None, r"t.csv line 3: 1 cells, the header has 2"),
        ("a,b\n1,2\n3,4\n", "c", r"t.csv: no column 'c' \(columns: a, b\)"),
        ("a,b\n1,0.5\n3,4\n", "b", r"t.csv line 2: label '0.5' is not a class index"),
        ("a\n1\n2\n", "a", r"t.csv: no feature column besides the label"),
        ("a,b\n1,2\n", None, r"t.csv: 1 rows; a table needs at least 2"),
        ("", None, r"t.csv: empty; a table needs a header row"),
    ],
)
def test_bad_tables_are_refused_naming_the_place(tmp_path, content, label, match):
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(ConfigError, match=match):
        read_table(tmp_path / "t.csv", label)


def test_a_test_table_must_have_the_same_columns(tmp_path):
    (tmp_path / "a.csv").write_text("a,b\n1,2\n3,4\n5,6\n")
    (tmp_path / "b.csv").write_text("a,c\n1,2\n3,4\n")
    with pytest.raises(ConfigError, match=r"b.csv has columns \['a', 'c'\], a.csv has"):
        load_table_split(tmp_path / "a.csv", test_path=tmp_path / "b.csv")
    with pytest.raises(MissingFileError, match="does not exist"):
        read_table(tmp_path / "none.csv")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow installed")
def test_parquet_without_pyarrow_names_the_install(tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match="reading .parquet needs pyarrow: pip install pyarrow"):
        read_table(tmp_path / "t.parquet")


@pytest.mark.slow
def test_compress_a_model_on_a_csv_table(tmp_path, cli):
    _wine_csv(tmp_path / "wine.csv")
    out = tmp_path / "out"
    factory = ["--factory", "qtcompress.examples:TabularMLP"]
    args = ["--data", tmp_path / "wine.csv", "--label-column", "class", "-o", out, *FAST]
    result = cli("compress", CKPT, *factory, *args)
    assert result.returncode == 0, result.stderr
    assert "data: wine.csv: 160 train / 18 test rows of 13 float features" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_original"] > 0.9  # the labels were read and line up
    assert (out / "wine_mlp.onnx").is_file()
    # A cell that is not a number: exit 1, one line naming the line and column, nothing written.
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,x\n")
    bad = cli("compress", CKPT, *factory, "--data", tmp_path / "bad.csv", "-o", tmp_path / "o2")
    assert_one_line_error(bad, code=1)
    assert "bad.csv line 3, column 'b': 'x' is not a number" in bad.stderr
    assert not (tmp_path / "o2").exists()


def test_a_csv_is_read_in_float32_blocks_with_every_row_kept(tmp_path, monkeypatch):
    from qtcompress.data import tables

    monkeypatch.setattr(tables, "_BLOCK_ROWS", 3)  # 10 rows: three full blocks and one row
    rows = [[i + 0.5, -i, i % 3] for i in range(10)]
    text = "a,b,label\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows)
    (tmp_path / "t.csv").write_text(text)
    names, x, y = tables.read_table(tmp_path / "t.csv", "label")
    assert names == ["a", "b"] and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, np.array([r[:2] for r in rows], np.float32))
    np.testing.assert_array_equal(y, [r[2] for r in rows])


def test_a_parquet_table_is_read_column_by_column_and_a_bad_cell_named(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {"a": [0.5, 1.5, 2.5], "b": [1, 2, 3], "s": ["4", "5.5", "6"], "label": [0, 1, 1]}
    )
    pq.write_table(table, tmp_path / "t.parquet")
    names, x, y = read_table(tmp_path / "t.parquet", "label")
    assert names == ["a", "b", "s"] and x.dtype == np.float32
    np.testing.assert_array_equal(x, [[0.5, 1, 4], [1.5, 2, 5.5], [2.5, 3, 6]])
    np.testing.assert_array_equal(y, [0, 1, 1])
    pq.write_table(pa.table({"a": [0.5, None, 1.0]}), tmp_path / "null.parquet")
    with pytest.raises(ConfigError, match="null.parquet row 2, column 'a': 'None' is not a"):
        read_table(tmp_path / "null.parquet")
    pq.write_table(pa.table({"s": ["1", "two"]}), tmp_path / "text.parquet")
    with pytest.raises(ConfigError, match="text.parquet row 2, column 's': 'two' is not a"):
        read_table(tmp_path / "text.parquet")
    pq.write_table(pa.table({"a": [1.0, float("inf")]}), tmp_path / "inf.parquet")
    with pytest.raises(ConfigError, match="inf.parquet row 2, column 'a': 'inf' is not finite"):
        read_table(tmp_path / "inf.parquet")
