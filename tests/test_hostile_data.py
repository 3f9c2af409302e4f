"""Issue 11, items 3, 6 and 7 on input data and models: array headers that lie, data that
would be silently mangled, factories that raise, half-precision models."""

import json
import struct
import time
import zipfile

import numpy as np
import pytest
import torch

from qtcompress.errors import ConfigError, FormatError, NonFiniteError
from qtcompress.io.arrays import check_dataset, check_label_range, load_arrays
from qtcompress.io.model_source import build_model, load_model
from qtcompress.io.state_dict import check_model_dtypes
from tests.tiny_models import TinyMLP

TIB = 1 << 40


def _npy_bytes(shape, dtype="<f4", data=b""):
    """A version-1.0 .npy file whose header claims ``shape``, followed by ``data``."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


# -- item 3: array headers are claims, checked before allocating ------------------------------
def test_npy_header_claiming_terabytes_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.npy"
    path.write_bytes(_npy_bytes((1 << 20, 1 << 20), data=b"\0" * 64))  # 4 TiB of float32
    start = time.perf_counter()
    with pytest.raises(
        FormatError,
        match=r"header claims a \[1048576, 1048576\] array of "
        r"4,398,046,511,104 bytes but the file holds 64",
    ):
        load_arrays(path)
    assert time.perf_counter() - start < 1.0


def test_npz_member_header_claiming_terabytes_is_refused(tmp_path):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x_train.npy", _npy_bytes((1 << 20, 1 << 20), data=b"\0" * 64))
    with pytest.raises(FormatError, match=r"member 'x_train.npy': its header claims"):
        load_arrays(path)


def test_npz_with_a_non_array_member_is_refused(tmp_path):
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "hello")
    with pytest.raises(FormatError, match="'notes.txt' is not an .npy array"):
        load_arrays(path)


@pytest.mark.parametrize(
    "content",
    [
        b"\x93NUMPY\x01\x00\xff\xff{",
        b"\x93NUMPY\x09\x00",
        _npy_bytes((-1, 3)),
        _npy_bytes((2,), dtype="|O"),
    ],
    ids=["cut-header", "version-9", "negative-shape", "object"],
)
def test_corrupt_npy_headers_are_format_errors(tmp_path, content):
    path = tmp_path / "x.npy"
    path.write_bytes(content)
    with pytest.raises(FormatError, match="x.npy"):
        load_arrays(path)


def test_honest_arrays_still_load(tmp_path):
    np.savez_compressed(
        tmp_path / "d.npz", x_train=np.ones((4, 3), np.float32), y_train=np.arange(4)
    )
    arrays = load_arrays(tmp_path / "d.npz")
    assert arrays["x_train"].shape == (4, 3) and arrays["y_train"].tolist() == [0, 1, 2, 3]
    np.save(tmp_path / "x.npy", np.zeros((0, 5), np.float64))
    assert load_arrays(tmp_path / "x.npy").shape == (0, 5)


# -- items 6 and 7: data that would be mangled or crash later ---------------------------------
def _data(**changes):
    rng = np.random.default_rng(0)
    base = {
        "x_train": rng.normal(size=(8, 3)).astype(np.float32),
        "y_train": np.arange(8) % 3,
        "x_test": rng.normal(size=(4, 3)).astype(np.float32),
        "y_test": np.arange(4) % 3,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


BAD_DATA = [
    (
        "inf-in-x-test",
        {"x_test": np.array([[0, np.inf, 0]] * 4, np.float32)},
        NonFiniteError,
        r"x_test holds NaN or Inf \(4 values, first at index \(0, 1\)\)",
    ),
    (
        "nan-in-x-train",
        {"x_train": np.full((8, 3), np.nan, np.float32)},
        NonFiniteError,
        "x_train holds NaN or Inf",
    ),
    (
        "complex",
        {"x_train": np.ones((8, 3), np.complex64)},
        ConfigError,
        "x_train is complex .*real and imaginary parts",
    ),
    ("strings", {"x_test": np.array([["a"] * 3] * 4)}, ConfigError, "x_test has dtype <U1"),
    (
        "float-labels",
        {"y_train": np.array([0.0, 0.7, 1, 2, 0, 1, 2, 0])},
        ConfigError,
        r"y_train holds non-integer values \(1 values, first at index \(1,\)\)",
    ),
    (
        "nan-labels",
        {"y_test": np.array([0.0, np.nan, 1, 2])},
        NonFiniteError,
        "y_test holds NaN or Inf",
    ),
    ("negative-labels", {"y_test": np.array([0, -1, 1, 2])}, ConfigError, "negative labels"),
    ("label-count", {"y_train": np.arange(5)}, ConfigError, "y_train has 5 labels for 8"),
    (
        "shape-mismatch",
        {"x_test": np.zeros((4, 5), np.float32)},
        ConfigError,
        r"x_train examples have shape \[3\] but x_test examples \[5\]",
    ),
    (
        "one-test-example",
        {"x_test": np.zeros((1, 3), np.float32), "y_test": np.zeros(1, int)},
        ConfigError,
        "x_test has 1 examples; at least 2",
    ),
    (
        "empty-train",
        {"x_train": np.zeros((0, 3), np.float32), "y_train": None},
        ConfigError,
        "x_train is empty",
    ),
    ("scalar", {"x_train": np.float32(3.0), "y_train": None}, ConfigError, "x_train is empty"),
]


@pytest.mark.parametrize(
    ("changes", "error", "match"), [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA]
)
def test_bad_data_is_refused_up_front(changes, error, match):
    with pytest.raises(error, match=match):
        check_dataset(_data(**changes), source="data.npz")


def test_good_data_passes_including_tensors_and_integral_float_labels():
    check_dataset(_data(y_train=(np.arange(8) % 3).astype(np.float64)))
    check_dataset({k: torch.from_numpy(np.asarray(v)) for k, v in _data().items()})
    check_dataset(_data(y_train=None, y_test=None))  # distillation without labels


def test_label_range():
    check_label_range(np.array([0, 2, 1]), 3)
    with pytest.raises(
        ConfigError,
        match=r"y_test range from 0 to 7, but the model outputs 3 "
        r"classes \(0..2\)",
    ):
        check_label_range(torch.tensor([0, 7]), 3, name="y_test")


# -- item 6: factories that raise, bad kwargs, half-precision models --------------------------
def _raising_factory(**_kwargs):
    raise RuntimeError("no GPU here\nsecond line")


def test_factory_that_raises_is_a_config_error(tmp_path):
    torch.save(TinyMLP().state_dict(), tmp_path / "w.pt")
    with pytest.raises(
        ConfigError, match="failed with RuntimeError: no GPU here; fix the factory"
    ) as info:
        load_model(tmp_path / "w.pt", factory=_raising_factory)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"bogus": 1}', "rejected kwargs"),
    ],
)
def test_build_model_bad_kwargs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_model("tests.tiny_models:TinyMLP", kwargs)


def test_build_model_good():
    assert isinstance(build_model("tests.tiny_models:TinyMLP", json.dumps({"classes": 4})), TinyMLP)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused_with_the_fix(tmp_path, dtype):
    with pytest.raises(ConfigError, match=f"{str(dtype)[6:]} parameters; .*model.float()"):
        check_model_dtypes(TinyMLP().to(dtype))
    torch.save(TinyMLP().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="parameters; qtcompress compresses float32"):
        load_model(tmp_path / "w.pt", factory=lambda: TinyMLP().to(dtype))


def test_half_precision_state_dict_into_float32_model_is_fine(tmp_path):
    torch.save(TinyMLP().half().state_dict(), tmp_path / "w.pt")
    model = load_model(tmp_path / "w.pt", factory="tests.tiny_models:TinyMLP")
    assert next(model.parameters()).dtype == torch.float32
