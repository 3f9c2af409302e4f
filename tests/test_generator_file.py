"""The generator file: save, reload in a fresh process, regenerate, rebuild ONNX, and bad input."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qtcompress.api import compress
from qtcompress.config import QTConfig
from qtcompress.errors import FormatError, MissingFileError
from qtcompress.generator_file.load import load_generator
from qtcompress.generator_file.save import save_generator
from tests.tiny_models import TinyCNN, TinyLSTM, TinyMLP, TinyTransformer, example_input

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden_mlp.qtc.safetensors"
GOLDEN_WEIGHTS = ROOT / "tests" / "data" / "golden_mlp.weights.safetensors"
SMALL = QTConfig(scheme="rows", n_layers=2, hidden=(8,))


def compressed(model_cls, steps=15, seed=0):
    torch.manual_seed(seed)
    model = model_cls().eval()
    qt = compress(model, SMALL)
    qt.fit_weights(steps=steps, progress=False)
    return model, qt


def rewrite(src: Path, dst: Path, *, drop=(), add=None, metadata=None):
    """Copy a safetensors file, dropping/adding tensors or replacing metadata keys."""
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    tensors.update(add or {})
    meta.update(metadata or {})
    save_file(tensors, str(dst), metadata=meta)


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    model, qt = compressed(TinyCNN)
    x = example_input(model, batch=3)
    path = tmp_path_factory.mktemp("gen") / "cnn.qtc.safetensors"
    save_generator(qt, path, example_inputs=(x,))
    return path, qt, x


@pytest.mark.slow  # a fresh interpreter: about 3 s of imports first
def test_round_trip_in_a_fresh_process(cnn_file, tmp_path):
    path, qt, x = cnn_file
    expected = qt.materialize().eval()(x).detach().numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    script = f"""
import json, numpy as np, onnxruntime as ort
from qtcompress.generator_file.load import load_generator
gen = load_generator({str(path)!r})
check = gen.verify_weights()
proto, diff = gen.to_onnx({str(tmp_path / "cnn.onnx")!r})
sess = ort.InferenceSession({str(tmp_path / "cnn.onnx")!r}, providers=["CPUExecutionProvider"])
out = sess.run(None, {{sess.get_inputs()[0].name: np.load({str(tmp_path / "x.npy")!r})}})[0]
np.save({str(tmp_path / "out.npy")!r}, out)
print(json.dumps({{"identical": check.identical, "stored": check.stored_sha256,
                  "actual": check.actual_sha256, "diff": diff}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["identical"] and report["stored"] == report["actual"]
    assert report["diff"] <= 1e-5
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "model_cls", [TinyCNN, TinyMLP, TinyTransformer, TinyLSTM], ids=lambda c: c.__name__
)
def test_architectures_round_trip(model_cls, tmp_path):
    model, qt = compressed(model_cls, steps=5)
    x = example_input(model, batch=3)
    path = save_generator(qt, tmp_path / "m.qtc.safetensors", example_inputs=(x,))
    gen = load_generator(path)
    assert gen.verify_weights().identical
    _, diff = gen.to_onnx(tmp_path / "m.onnx")
    assert diff <= 1e-5 and (tmp_path / "m.onnx").is_file()
    fresh = gen.load_into(model_cls()).eval()
    reference = qt.materialize().eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), reference(x), rtol=0, atol=0)
    # BatchNorm statistics and other classical tensors travel in the file
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)


def test_generator_file_is_much_smaller_than_the_model_it_rebuilds(tmp_path):
    # A 20K-weight model: on a toy of 2K weights the ONNX graph and the check batch that the
    # file carries outweigh the weights themselves.
    model = TinyMLP(features=64, hidden=256, classes=10).eval()
    qt = compress(model, QTConfig())  # the default budget: 5% of M
    x = example_input(model, batch=2)
    path = save_generator(qt, tmp_path / "m.qtc.safetensors", example_inputs=(x,))
    checkpoint = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    assert path.stat().st_size * 4 < checkpoint.stat().st_size  # measured: 5.3x smaller
    gen = load_generator(path)
    assert sum(s.numel for s in gen.layout.specs) == qt.layout.total == 19_722
    assert sum(p.numel() for p in gen.generator.parameters()) < qt.layout.total / 5
    # ...and the small file holds the whole network: every weight comes back from it.
    assert gen.verify_weights().identical
    rebuilt = gen.state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_file_without_example_inputs_rebuilds_state_but_not_onnx(tmp_path):
    model, qt = compressed(TinyMLP, steps=3)
    path = save_generator(qt, tmp_path / "m.qtc.safetensors")
    gen = load_generator(path)
    assert gen.skeleton is None and gen.verify_weights().identical
    with pytest.raises(FormatError, match="holds no ONNX graph"):
        gen.to_onnx()


# -- bad input --------------------------------------------------------------------------------
def test_truncated_and_corrupt_files(cnn_file, tmp_path):
    path, _, _ = cnn_file
    data = path.read_bytes()
    (tmp_path / "trunc.qtc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="trunc.qtc.safetensors"):
        load_generator(tmp_path / "trunc.qtc.safetensors")
    (tmp_path / "junk.qtc.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(
        FormatError,
        match=r"junk\.qtc\.safetensors' is truncated, corrupt, or "
        r"not a safetensors file",
    ):
        load_generator(tmp_path / "junk.qtc.safetensors")
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # a weight byte: the container's tensor hash catches it
    (tmp_path / "flip.qtc.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(FormatError, match=r"flip\.qtc\.safetensors': tensor checksum mismatch"):
        load_generator(tmp_path / "flip.qtc.safetensors")
    header_len = struct.unpack("<Q", data[:8])[0]
    assert header_len < len(data)


def test_wrong_format_version(cnn_file, tmp_path):
    path, _, _ = cnn_file
    rewrite(path, tmp_path / "v.qtc.safetensors", metadata={"format_version": "99"})
    with pytest.raises(FormatError, match="has format version 99; this qtcompress reads versions"):
        load_generator(tmp_path / "v.qtc.safetensors")


def test_missing_and_extra_tensors_are_named(cnn_file, tmp_path):
    path, _, _ = cnn_file
    gen_meta_ok = tmp_path / "ok.qtc.safetensors"
    # Remove a generator tensor and fix up the container's own records so that only the
    # generator-level check can notice.
    from qtcompress.io.container import read_artifact, save_artifact

    art = read_artifact(path)
    tensors = dict(art.tensors)
    tensors.pop("generator.qnn.angles")
    save_artifact(gen_meta_ok, tensors, art.metadata, skeleton=art.skeleton)
    with pytest.raises(FormatError, match=r"missing \['generator.qnn.angles'\]"):
        load_generator(gen_meta_ok)
    tensors = dict(art.tensors)
    tensors["generator.stowaway"] = torch.zeros(3)
    save_artifact(gen_meta_ok, tensors, art.metadata, skeleton=art.skeleton)
    with pytest.raises(FormatError, match=r"unexpected \['generator.stowaway'\]"):
        load_generator(gen_meta_ok)


def test_metadata_that_does_not_match_the_tensors(cnn_file, tmp_path):
    from qtcompress.io.container import read_artifact, save_artifact

    path, _, _ = cnn_file
    art = read_artifact(path)
    bad = tmp_path / "bad.qtc.safetensors"
    layout = json.loads(json.dumps(art.metadata["layout"]))
    layout["total"] += 1
    save_artifact(bad, art.tensors, {**art.metadata, "layout": layout}, skeleton=art.skeleton)
    with pytest.raises(FormatError, match="add up to"):
        load_generator(bad)
    mapping = {**art.metadata["mapping"], "chunk": 1}  # not what the config builds
    save_artifact(bad, art.tensors, {**art.metadata, "mapping": mapping}, skeleton=art.skeleton)
    with pytest.raises(FormatError, match=r"stored mapping does not match .*\(chunk 1 vs"):
        load_generator(bad)
    config = {**art.metadata["config"], "hidden": [9]}  # config and mapping disagree
    save_artifact(bad, art.tensors, {**art.metadata, "config": config}, skeleton=art.skeleton)
    with pytest.raises(FormatError, match=r"stored mapping does not match .*hidden \[8\] vs \[9\]"):
        load_generator(bad)
    mapping = {**art.metadata["mapping"], "hidden": [9]}  # both agree, the tensors do not fit
    save_artifact(
        bad,
        art.tensors,
        {**art.metadata, "config": config, "mapping": mapping},
        skeleton=art.skeleton,
    )
    with pytest.raises(FormatError, match="do not match the metadata: .*shape mismatches"):
        load_generator(bad)
    meta = dict(art.metadata)
    meta.pop("weights_sha256")
    save_artifact(bad, art.tensors, meta, skeleton=art.skeleton)
    with pytest.raises(FormatError, match=r"\['weights_sha256'\] missing"):
        load_generator(bad)


def test_model_that_does_not_fit_the_layout(cnn_file):
    path, _, _ = cnn_file
    gen = load_generator(path)
    with pytest.raises(FormatError, match="does not fit model TinyCNN") as info:
        gen.load_into(TinyCNN(classes=7))
    assert "head.weight: model (7, 64) vs file (10, 64)" in str(info.value)
    with pytest.raises(FormatError, match="missing keys .*unexpected keys"):
        gen.load_into(TinyMLP())


def test_output_in_missing_folder_writes_nothing(cnn_file, tmp_path):
    _, qt, x = cnn_file
    with pytest.raises(MissingFileError, match="does not exist"):
        save_generator(qt, tmp_path / "nope" / "m.qtc.safetensors", example_inputs=(x,))
    assert not (tmp_path / "nope").exists()
    save_generator(qt, tmp_path / "m.qtc.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.qtc.safetensors"]


# -- golden file ------------------------------------------------------------------------------
def test_golden_file_always_loads():
    """A file written by an earlier qtcompress must keep loading and regenerating the same net.

    Regenerated weights are compared with the stored reference to float32 rounding: another
    CPU may pick other qsim/BLAS kernels, so bit-identity is reported, not required here.
    """
    gen = load_generator(GOLDEN)
    assert gen.metadata["config"]["version"] == 1  # written before the version-3 renames
    assert gen.config.version == 6 and gen.config.chunk_max_qubits == 16
    check = gen.verify_weights()
    assert check.equivalent, check
    reference = load_file_tensors(GOLDEN_WEIGHTS)
    state = gen.state_dict()
    assert set(state) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6)
    _, diff = gen.to_onnx()
    assert diff <= 1e-5
    model = gen.load_into(TinyMLP())
    assert isinstance(model, TinyMLP)


def load_file_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
