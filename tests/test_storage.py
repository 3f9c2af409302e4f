"""Generator parameters stored as float16 or int8, the zlib skeleton, and their corrupt forms."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qtcompress import QTConfig, compress, load
from qtcompress.errors import ConfigError, FormatError
from qtcompress.generator_file.storage import decode, encode, rounded
from qtcompress.io.container import read_artifact


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def test_int8_rounding_has_no_negative_zero():
    # -0.0 and +0.0 compare equal but hash differently: the stored hash is over bytes.
    r = rounded(torch.tensor([-1e-6, 1.0]), "int8")
    assert r[0] == 0 and not torch.signbit(r[0])


def test_encodings_round_trip_exactly_once_rounded():
    t = torch.randn(50) * 3
    for storage, dtype in (("float16", torch.float16), ("int8", torch.int8)):
        r = rounded(t, storage)
        assert (r - t).abs().max() <= (0.002 if storage == "float16" else 0.03) * t.abs().max()
        stored = encode({"w": r}, storage)
        assert stored["w"].dtype == dtype
        assert torch.equal(decode(stored, storage, "f")["w"], r)
        with pytest.raises(ConfigError, match=f"not exactly representable as {storage}"):
            encode({"w": t}, storage)


@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_a_rounded_generator_saves_smaller_and_loads_identical(tmp_path, storage):
    qt = compress(model(), QTConfig(scheme="hashed", budget=0.2, values="table"))
    full = qt.save(tmp_path / "full.qtc.safetensors").stat().st_size
    qt.round_to(storage)
    path = qt.save(tmp_path / "small.qtc.safetensors")
    assert path.stat().st_size < full
    stored = load(path)
    assert stored.metadata["storage"] == storage
    assert stored.verify_weights().identical
    before, after = qt.generator.generate_detached(), stored.generator.generate_detached()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert load(path, model()).storage == storage  # saving again keeps the encoding


def test_int8_without_its_scale_is_corrupt(tmp_path):
    qt = compress(model(), QTConfig(scheme="hashed", budget=0.2, values="table"))
    qt.round_to("int8")
    path = qt.save(tmp_path / "g.qtc.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("generator.int8")}
    from qtcompress.io.container import sha256_of_tensors

    meta["tensors_sha256"] = sha256_of_tensors(tensors)
    kept = json.loads(meta["tensors"])
    meta["tensors"] = json.dumps({k: v for k, v in kept.items() if k in tensors})
    bad = tmp_path / "bad.qtc.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(FormatError, match="int8 tensor .* has no float32 scale"):
        load(bad)


def test_the_onnx_skeleton_is_stored_compressed_and_checked(tmp_path):
    qt = compress(model(), QTConfig(scheme="hashed", budget=0.2))
    path = qt.save(tmp_path / "g.qtc.safetensors", example_inputs=torch.randn(2, 16))
    art = read_artifact(path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        packed = f.get_tensor("__onnx_skeleton__")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["skeleton"])
    assert info["encoding"] == "zlib" and info["raw_bytes"] == len(art.skeleton)
    assert packed.numel() == info["bytes"] < len(art.skeleton)
    meta["skeleton"] = json.dumps({**info, "raw_bytes": info["raw_bytes"] - 1})
    bad = tmp_path / "bad.qtc.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(FormatError, match="skeleton decompresses to .* metadata says"):
        read_artifact(bad)
