import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qtcompress.errors import ConfigError, FormatError, MissingFileError
from qtcompress.io.container import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SKELETON_TENSOR,
    read_artifact,
    save_artifact,
    sha256_of_tensors,
)
from qtcompress.onnx.skeleton import export_skeleton, fill_skeleton
from tests.tiny_models import TinyMLP, example_input

META = {
    "ansatz": {"qubits": 5, "layers": 3, "gates": ["RY", "CNOT"]},
    "mapping": {"hidden": [8, 8]},
    "layout": [{"name": "net.0.weight", "shape": [16, 13], "dtype": "float32", "offset": 0}],
    "weights_sha256": "0" * 64,
}


def _tensors():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "theta": torch.randn(5, 3),
        "transposed": base.t(),  # non-contiguous
        "view_a": base[0],  # shares storage with view_b
        "view_b": base[1],
        "steps": torch.tensor(7, dtype=torch.int64),  # 0-d
        "half": torch.randn(4, dtype=torch.bfloat16),
    }


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_roundtrip_tensors_metadata(tmp_path):
    tensors = _tensors()
    path = save_artifact(tmp_path / "g.qtc.safetensors", tensors, META)
    art = read_artifact(path)
    loaded, meta = art.tensors, art.metadata
    assert meta == META
    assert sorted(loaded) == sorted(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert torch.equal(loaded[name], t)
    assert _listing(tmp_path) == ["g.qtc.safetensors"]
    with safe_open(str(path), framework="pt") as f:  # readable by plain safetensors
        header = f.metadata()
    assert header["format"] == FORMAT_NAME and header["format_version"] == str(FORMAT_VERSION)
    assert json.loads(header["ansatz"]) == META["ansatz"]
    assert header["tensors_sha256"] == sha256_of_tensors(tensors)


def test_skeleton_roundtrip_refills_and_runs(tmp_path):
    model = TinyMLP().eval()
    sk = export_skeleton(model, example_input(model), verify_atol=None)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    save_artifact(tmp_path / "g.qtc.safetensors", weights, META, skeleton=sk)
    art = read_artifact(tmp_path / "g.qtc.safetensors", expected_tensors=weights)
    assert art.skeleton == sk and SKELETON_TENSOR not in art.tensors
    filled = fill_skeleton(art.skeleton, {k: v.numpy() for k, v in art.tensors.items()})
    sess = ort.InferenceSession(filled.SerializeToString(), providers=["CPUExecutionProvider"])
    x = example_input(model, batch=3)
    with torch.no_grad():
        np.testing.assert_allclose(
            sess.run(None, {"input": x.numpy()})[0], model(x).numpy(), atol=1e-5, rtol=0
        )


def test_sha256_is_order_independent_and_sensitive():
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int32)}
    h = sha256_of_tensors(t)
    assert h == sha256_of_tensors(dict(reversed(list(t.items()))))
    assert h == sha256_of_tensors({"a": t["a"].t().contiguous().t(), "b": t["b"]})
    variants = [
        {"a": t["a"].reshape(3, 2), "b": t["b"]},  # shape
        {"a": t["a"].double(), "b": t["b"]},  # dtype
        {"a": t["a"], "c": t["b"]},  # name
        {"a": t["a"] + 1e-6, "b": t["b"]},  # value
        {"a": t["a"]},  # missing tensor
    ]
    assert len({h, *(sha256_of_tensors(v) for v in variants)}) == len(variants) + 1


def _resave(src, dst, *, drop=None, add=None, header_patch=None):
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for name in drop or ():
        del tensors[name]
    tensors.update(add or {})
    header.update(header_patch or {})
    save_file(tensors, str(dst), metadata=header)


@pytest.fixture()
def good(tmp_path):
    return save_artifact(tmp_path / "good.qtc.safetensors", _tensors(), META, skeleton=b"skel")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"drop": ["theta"]}, r"missing \['theta'\]"),
        ({"add": {"extra": torch.zeros(2)}}, r"undeclared \['extra'\]"),
        ({"header_patch": {"format": "something.else"}}, "not a qtcompress generator"),
        ({"header_patch": {"format_version": "2"}}, "format version 2.*Upgrade"),
        ({"header_patch": {"format_version": "one"}}, "invalid format_version"),
        ({"header_patch": {"ansatz": "{not json"}}, "'ansatz' is not valid JSON"),
        ({"header_patch": {"tensors_sha256": "f" * 64}}, "checksum mismatch"),
        ({"drop": [SKELETON_TENSOR]}, r"missing \['__onnx_skeleton__'\]"),
    ],
)
def test_tampered_files_are_rejected(good, tmp_path, kwargs, fragment):
    bad = tmp_path / "bad.qtc.safetensors"
    _resave(good, bad, **kwargs)
    with pytest.raises(FormatError, match=fragment) as info:
        read_artifact(bad)
    assert "bad.qtc.safetensors" in str(info.value)


def test_declared_shape_or_dtype_mismatch(good, tmp_path):
    with safe_open(str(good), framework="pt") as f:
        declared = json.loads(f.metadata()["tensors"])
    declared["theta"]["shape"] = [3, 5]
    declared["steps"]["dtype"] = "int32"
    bad = tmp_path / "bad.qtc.safetensors"
    _resave(good, bad, header_patch={"tensors": json.dumps(declared)})
    with pytest.raises(FormatError, match="tensors differ from the metadata") as info:
        read_artifact(bad)
    assert "theta: declared {'dtype': 'float32', 'shape': [3, 5]}" in str(info.value)
    assert "steps: declared {'dtype': 'int32'" in str(info.value)


def test_flipped_data_byte_fails_checksum(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[-10] ^= 0x40  # inside the tensor data (the header comes first)
    bad = tmp_path / "flip.qtc.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum mismatch"):
        read_artifact(bad)


@pytest.mark.parametrize("keep", [0, 7, 100, -5])
def test_truncated_files(good, tmp_path, keep):
    data = good.read_bytes()
    bad = tmp_path / "cut.qtc.safetensors"
    bad.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(FormatError, match="cut.qtc.safetensors.*truncated"):
        read_artifact(bad)


def test_expected_tensors_checked(good):
    with pytest.raises(FormatError, match=r"missing tensors \['other'\].*unexpected.*'half'"):
        read_artifact(
            good, expected_tensors=["theta", "transposed", "view_a", "view_b", "steps", "other"]
        )


def test_bad_inputs_to_save_leave_nothing(tmp_path):
    target = tmp_path / "g.qtc.safetensors"
    with pytest.raises(ConfigError, match=r"\['format'\].*reserved"):
        save_artifact(target, _tensors(), {"format": "x"})
    with pytest.raises(ConfigError, match="'score'.*JSON"):
        save_artifact(target, _tensors(), {"score": float("nan")})
    with pytest.raises(ConfigError, match="'obj'.*JSON"):
        save_artifact(target, _tensors(), {"obj": {1, 2}})
    with pytest.raises(ConfigError, match="not a torch.Tensor"):
        save_artifact(target, {"a": np.zeros(2)}, {})
    with pytest.raises(ConfigError, match="reserved for the ONNX skeleton"):
        save_artifact(target, {SKELETON_TENSOR: torch.zeros(2)}, {})
    with pytest.raises(MissingFileError, match="does not exist"):
        save_artifact(tmp_path / "missing" / "g.qtc.safetensors", _tensors(), {})
    assert _listing(tmp_path) == []


def test_overwrite_is_atomic_and_missing_file(tmp_path):
    target = tmp_path / "g.qtc.safetensors"
    save_artifact(target, {"a": torch.zeros(2)}, {"v": 1})
    save_artifact(target, {"a": torch.ones(3)}, {"v": 2})
    art = read_artifact(target)
    tensors, meta = art.tensors, art.metadata
    assert meta == {"v": 2} and torch.equal(tensors["a"], torch.ones(3))
    assert _listing(tmp_path) == ["g.qtc.safetensors"]
    with pytest.raises(MissingFileError, match="does not exist"):
        read_artifact(tmp_path / "nope.qtc.safetensors")


def test_same_content_same_bytes_readable_by_safetensors(tmp_path):
    from safetensors.torch import load_file

    from qtcompress.io.container import write_safetensors

    tensors = _tensors()
    a = save_artifact(tmp_path / "a.qtc.safetensors", tensors, META, skeleton=b"skel")
    reordered = dict(reversed(list(tensors.items())))
    b = save_artifact(
        tmp_path / "b.qtc.safetensors",
        reordered,
        dict(reversed(list(META.items()))),
        skeleton=b"skel",
    )
    assert a.read_bytes() == b.read_bytes()
    plain = write_safetensors(tmp_path / "p.safetensors", tensors, {"z": "1", "a": "2"})
    loaded = load_file(str(plain))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(str(plain), framework="pt") as f:
        assert f.metadata() == {"z": "1", "a": "2"}
    with pytest.raises(ConfigError, match="metadata must map strings to strings"):
        write_safetensors(tmp_path / "q.safetensors", tensors, {"a": 1})


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"ansatz": "NaN"}, "'ansatz' is not valid JSON"),
        ({"ansatz": "[" * 50 + "]" * 50}, "nested 50 deep"),
        ({"format_version": "\u00b2"}, "invalid format_version"),
        ({"tensors": '{"theta": 5}'}, r"tensors\['theta'\]: expected an object"),
    ],
)
def test_hostile_header_values(good, tmp_path, patch, fragment):
    bad = tmp_path / "bad.qtc.safetensors"
    _resave(good, bad, header_patch=patch)
    with pytest.raises(FormatError, match=fragment):
        read_artifact(bad)
