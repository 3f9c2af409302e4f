import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from qtcompress.errors import (
    ConfigError,
    ExportError,
    FormatError,
    MissingFileError,
    NonFiniteError,
)
from qtcompress.onnx.export import export_onnx, to_onnx_proto
from qtcompress.onnx.parity import compare_with_onnxruntime
from qtcompress.onnx.skeleton import (
    SKELETON_KEY,
    export_skeleton,
    fill_skeleton,
    make_skeleton,
    skeleton_weight_map,
)
from tests.tiny_models import (
    TiedLM,
    TinyCNN,
    TinyConv1d,
    TinyGRU,
    TinyLSTM,
    TinyMLP,
    TinyTransformer,
    example_input,
)

MODELS = [TinyCNN, TinyMLP, TinyConv1d, TinyTransformer, TinyLSTM, TinyGRU, TiedLM]
# Strings that would reveal this machine's layout if left in a shipped file.
LOCAL_PATHS = [str(Path(__file__).resolve().parent.parent).encode(), b"site-packages"]


def _build(cls, seed=0):
    torch.manual_seed(seed)
    m = cls()
    if any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules()):
        m.train()
        with torch.no_grad():  # non-default running stats, so BatchNorm buffers matter
            m(example_input(m, batch=8, seed=seed + 100))
    return m.eval()


def _ort_run(model_or_path, x):
    data = (
        model_or_path.SerializeToString()
        if isinstance(model_or_path, onnx.ModelProto)
        else str(model_or_path)
    )
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module", params=MODELS, ids=lambda c: c.__name__)
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param.__name__)
    model = _build(request.param)
    report = export_onnx(model, example_input(model), folder / "model.onnx")
    return model, report, folder


def test_export_is_single_checked_file_matching_torch(exported):
    model, report, folder = exported
    assert _listing(folder) == ["model.onnx"]  # no .onnx.data sidecar, no temp file
    onnx.checker.check_model(str(report.path), full_check=True)
    assert 0 <= report.max_abs_diff <= 1e-5
    # Independent parity check at another batch size than the export's (4).
    x = example_input(model, batch=3, seed=7)
    with torch.no_grad():
        ref = model(x).numpy()
    got = _ort_run(report.path, x)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5


def test_export_has_dynamic_batch_and_no_local_paths(exported):
    _, report, _ = exported
    proto = onnx.load(str(report.path))
    for inp in proto.graph.input:
        assert inp.type.tensor_type.shape.dim[0].dim_param
    assert all(len(n.metadata_props) == 0 for n in proto.graph.node)
    data = report.path.read_bytes()
    for marker in LOCAL_PATHS:
        assert marker not in data
    assert report.opset >= 18 and report.size_bytes == len(data)


@pytest.fixture(scope="module", params=MODELS, ids=lambda c: c.__name__)
def skeleton(request):
    model = _build(request.param)
    return model, export_skeleton(model, example_input(model))


def test_skeleton_has_no_weight_data(skeleton):
    model, sk = skeleton
    proto = onnx.ModelProto.FromString(sk)
    weight_map = skeleton_weight_map(sk)
    slots = [i for i in proto.graph.initializer if i.name in weight_map]
    assert slots and all(not i.raw_data and not i.float_data for i in slots)
    params = {n for n, _ in model.named_parameters()}
    tied_alias = {"embed.weight"} if isinstance(model, TiedLM) else set()
    covered = set(weight_map.values()) | tied_alias
    assert params <= covered
    for marker in LOCAL_PATHS:
        assert marker not in sk


def test_fill_skeleton_with_other_weights_matches_torch(skeleton):
    model, sk = skeleton
    other = _build(type(model), seed=3)  # different weights and BatchNorm statistics
    weights = {k: v.numpy() for k, v in other.state_dict().items()}
    filled = fill_skeleton(sk, weights)
    onnx.checker.check_model(filled, full_check=True)
    assert all(p.key != SKELETON_KEY for p in filled.metadata_props)
    x = example_input(other, batch=5, seed=9)
    with torch.no_grad():
        ref = other(x).numpy()
    assert np.abs(_ort_run(filled, x) - ref).max() <= 1e-5
    with torch.no_grad():  # and it really is not the exported model's output
        assert np.abs(model(x).numpy() - ref).max() > 1e-3


def test_batchnorm_buffers_are_slots():
    model = _build(TinyCNN)
    sk = export_skeleton(model, example_input(model), verify_atol=None)
    assert {"bn1.running_mean", "bn1.running_var"} <= set(skeleton_weight_map(sk).values())


@pytest.fixture(scope="module")
def mlp_skeleton():
    model = _build(TinyMLP)
    return model, export_skeleton(model, example_input(model), verify_atol=None)


def _weights(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_fill_missing_weight_named(mlp_skeleton):
    model, sk = mlp_skeleton
    w = _weights(model)
    del w["net.1.bias"]
    with pytest.raises(FormatError, match=r"missing weights \['net.1.bias'\]"):
        fill_skeleton(sk, w)


def test_fill_extra_weight_named(mlp_skeleton):
    model, sk = mlp_skeleton
    w = _weights(model)
    w["bogus.weight"] = np.zeros(3, np.float32)
    with pytest.raises(FormatError, match=r"unknown weights \['bogus.weight'\]"):
        fill_skeleton(sk, w)


def test_fill_wrong_shape_and_dtype_named(mlp_skeleton):
    model, sk = mlp_skeleton
    w = _weights(model)
    w["net.0.weight"] = w["net.0.weight"].T.copy()
    with pytest.raises(FormatError, match=r"net.0.weight.*\(13, 16\).*\(16, 13\)"):
        fill_skeleton(sk, w)
    w = _weights(model)
    w["net.0.bias"] = w["net.0.bias"].astype(np.float64)
    with pytest.raises(FormatError, match=r"net.0.bias.*float64.*float32"):
        fill_skeleton(sk, w)


def test_fill_non_finite_and_torch_tensors(mlp_skeleton):
    model, sk = mlp_skeleton
    filled = fill_skeleton(sk, dict(model.state_dict()))  # torch tensors are accepted
    x = example_input(model)
    with torch.no_grad():
        assert np.abs(_ort_run(filled, x) - model(x).numpy()).max() <= 1e-5
    w = _weights(model)
    w["net.3.weight"][0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="net.3.weight"):
        fill_skeleton(sk, w)


def test_fill_rejects_corrupt_and_foreign_bytes(mlp_skeleton, tmp_path):
    model, sk = mlp_skeleton
    with pytest.raises(FormatError, match="ONNX skeleton is corrupt"):
        fill_skeleton(b"\xff\xff\xff\xff garbage", _weights(model))
    plain = to_onnx_proto(model, example_input(model)).SerializeToString()
    with pytest.raises(FormatError, match=SKELETON_KEY):
        fill_skeleton(plain, _weights(model))


def test_transformed_initializer_is_rejected():
    model = _build(TinyMLP)
    proto = to_onnx_proto(model, example_input(model))
    init = next(i for i in proto.graph.initializer if i.name == "net.0.weight")
    init.CopyFrom(
        numpy_helper.from_array(numpy_helper.to_array(init) * 2, name="net.0.weight")
    )  # like a folded/rescaled weight
    with pytest.raises(ExportError, match="net.0.weight.*optimize=False"):
        make_skeleton(proto, model)


def test_merged_initializers_are_rejected():
    model = _build(TinyMLP)
    with torch.no_grad():  # two LayerNorm-sized vectors with identical values
        model.net[0].bias.copy_(model.net[1].bias)
    proto = to_onnx_proto(model, example_input(model))
    # Simulate an exporter that merged the two: point users of net.0.bias at net.1.bias.
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name == "net.0.bias":
                node.input[i] = "net.1.bias"
    keep = [
        onnx.TensorProto.FromString(i.SerializeToString())
        for i in proto.graph.initializer
        if i.name != "net.0.bias"
    ]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    with pytest.raises(ExportError, match="net.0.bias.*merged"):
        make_skeleton(proto, model)


def test_skeleton_metadata_lists_ignored_entries():
    model = _build(TinyCNN)
    sk = export_skeleton(model, example_input(model), verify_atol=None)
    info = json.loads(
        next(
            p.value for p in onnx.ModelProto.FromString(sk).metadata_props if p.key == SKELETON_KEY
        )
    )
    assert "bn1.num_batches_tracked" in info["ignored"]


def test_batch_of_one_refused_and_nothing_written(tmp_path):
    model = _build(TinyMLP)
    with pytest.raises(ConfigError, match=r"the first \(batch\) axis must be 2 or more"):
        export_onnx(model, example_input(model, batch=1), tmp_path / "m.onnx")
    assert _listing(tmp_path) == []


def test_missing_folder_refused_and_nothing_written(tmp_path):
    model = _build(TinyMLP)
    with pytest.raises(MissingFileError, match="does not exist"):
        export_onnx(model, example_input(model), tmp_path / "sub" / "m.onnx")
    assert _listing(tmp_path) == []


def test_parity_failure_writes_nothing(tmp_path):
    model = _build(TinyCNN)
    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(model, example_input(model), tmp_path / "m.onnx", atol=1e-12, rtol=0.0)
    assert _listing(tmp_path) == []


def test_mode_restored_and_names_used(tmp_path):
    model = _build(TinyMLP).train()
    report = export_onnx(
        model,
        example_input(model),
        tmp_path / "m.onnx",
        input_names=["features"],
        output_names=["logits"],
    )
    assert model.training and all(m.training for m in model.modules())
    assert report.input_names == ("features",) and report.output_names == ("logits",)


class _AddsFixedBatch(torch.nn.Module):
    def forward(self, x):
        return x + torch.ones(4, 3)  # broadcasting pins the batch size to 4


class _ReshapesByBatch(torch.nn.Module):
    def forward(self, x):
        return x.reshape(4, -1)  # exports, but only runs for batches divisible by 4


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (_AddsFixedBatch, r"graph input 'input' has a fixed batch axis \(4\)"),
        (_ReshapesByBatch, r"does not run on inputs of shapes \(5, 3\) in torch or onnxruntime"),
    ],
    ids=["fixed-batch", "reshape-by-batch"],
)
def test_batch_dependent_model_is_rejected(tmp_path, module, match):
    with pytest.raises(ExportError, match=match):
        export_onnx(module(), torch.randn(4, 3), tmp_path / "m.onnx")
    assert _listing(tmp_path) == []


def test_skeleton_check_scales_with_large_outputs():
    """Float32 rounding grows with the outputs: a trained net's large logits must not be
    mistaken for a weight baked into the graph (the check is relative above |output| = 1)."""
    model = _build(TinyCNN)
    with torch.no_grad():
        model.head.weight.mul_(300.0)  # logits in the hundreds
    x = example_input(model)
    with torch.no_grad():
        peak = float(model.eval()(x).abs().max())
    assert peak > 100
    skeleton = export_skeleton(model, x)
    filled = fill_skeleton(skeleton, _weights(model))
    assert compare_with_onnxruntime(filled, model, x) <= 1e-5 * peak
