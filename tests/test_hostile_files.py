"""Issue 11, items 2-6 and 10 on generator files: NaN, memory bombs, hangs, lies, malformed
metadata, byte-reproducible files. Every hostile file gives a typed QTCompressError."""

import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qtcompress.api import compress
from qtcompress.config import QTConfig
from qtcompress.errors import FormatError, QTCompressError, ResourceLimitError
from qtcompress.generator_file.file import WeightCheck
from qtcompress.generator_file.load import load_generator
from qtcompress.generator_file.metadata import fingerprint_distance
from qtcompress.generator_file.save import save_generator
from qtcompress.io.container import read_artifact, save_artifact
from tests.tiny_models import TinyMLP, example_input

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden_mlp.qtc.safetensors"


def remake(dst, *, meta=None, drop=(), tensors=None, skeleton=None):
    """The golden file with metadata fields replaced/dropped or tensors replaced (rehashed)."""
    art = read_artifact(GOLDEN)
    metadata = {k: v for k, v in {**art.metadata, **(meta or {})}.items() if k not in drop}
    save_artifact(
        dst,
        art.tensors if tensors is None else tensors,
        metadata,
        skeleton=art.skeleton if skeleton is None else skeleton,
    )
    return dst


def raw(dst, **fields):
    """The golden file with raw metadata strings replaced (JSON that save_artifact refuses)."""
    with safe_open(str(GOLDEN), "pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    header.update(fields)
    save_file(tensors, str(dst), metadata=header)
    return dst


def golden_meta():
    return json.loads(json.dumps(read_artifact(GOLDEN).metadata))


def load_all(path):
    """Everything a user can do with a file: load, regenerate, verify, rebuild ONNX."""
    gen = load_generator(path)
    gen.verify_weights()
    gen.to_onnx()
    return gen


def with_layer_shape(shape):
    """Layout metadata whose first tensor claims ``shape`` (offsets and total kept coherent)."""
    meta = golden_meta()
    layout = meta["layout"]
    first = layout["tensors"][0]
    numel = math.prod(shape)
    delta = numel - first["numel"]
    first.update(shape=list(shape), numel=numel)
    for t in layout["tensors"][1:]:
        t["offset"] += delta
    layout["total"] += delta
    return {"layout": layout}


# -- item 2: NaN is never "equivalent" -------------------------------------------------------
def test_nan_mapping_weight_is_refused(tmp_path):
    tensors = dict(read_artifact(GOLDEN).tensors)
    w = tensors["generator.mapping.body.0.weight"].clone()
    w[0, 0] = float("nan")
    tensors["generator.mapping.body.0.weight"] = w
    path = remake(tmp_path / "nan.qtc.safetensors", tensors=tensors)
    with pytest.raises(
        FormatError,
        match=r"stored generator holds NaN or Inf: "
        r"mapping.body.0.weight \(1 of 64 values\)",
    ):
        load_generator(path)


def test_weights_that_overflow_when_regenerated_are_refused(tmp_path):
    tensors = dict(read_artifact(GOLDEN).tensors)
    tensors["generator.mapping.head.weight"] = tensors["generator.mapping.head.weight"] * 3e38
    path = remake(tmp_path / "inf.qtc.safetensors", tensors=tensors)
    gen = load_generator(path)  # finite as stored
    with pytest.raises(FormatError, match="regenerated weights hold NaN or Inf"):
        gen.verify_weights()
    with pytest.raises(FormatError, match="regenerated weights hold NaN or Inf"):
        gen.to_onnx()


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_fingerprint_is_refused(tmp_path, value):
    prints = json.dumps(golden_meta()["weights_fingerprint"])
    prints = prints.replace(prints[prints.index("[") + 1 : prints.index(",")], value, 1)
    path = raw(
        tmp_path / "fp.qtc.safetensors",
        weights_fingerprint=prints,
        weights_sha256=json.dumps("0" * 64),
    )
    with pytest.raises(FormatError, match="weights_fingerprint"):
        load_generator(path)


def test_altered_hash_and_fingerprint_is_not_equivalent(tmp_path):
    meta = golden_meta()
    prints = meta["weights_fingerprint"]
    name = next(iter(prints))
    prints[name] = [prints[name][0] + 1.0, prints[name][1] * 2]
    path = remake(
        tmp_path / "alt.qtc.safetensors",
        meta={"weights_sha256": "0" * 64, "weights_fingerprint": prints},
    )
    check = load_generator(path).verify_weights()
    assert not check.identical and not check.equivalent
    assert check.max_fingerprint_rel_diff > 0.1


def test_comparisons_are_nan_aware():
    assert fingerprint_distance({"a": [1.0, 2.0]}, {"a": [float("nan"), 2.0]}) == math.inf
    assert fingerprint_distance({"a": [1.0, 2.0]}, {"b": [1.0, 2.0]}) == math.inf
    assert fingerprint_distance({"a": [1.0, 2.0]}, {"a": [1.0, 2.0]}) == 0.0
    assert not WeightCheck(False, "a", "b", float("nan")).equivalent
    assert not WeightCheck(False, "a", "b", math.inf).equivalent
    assert WeightCheck(False, "a", "b", 1e-7).equivalent


def test_nan_check_output_is_refused(tmp_path):
    tensors = dict(read_artifact(GOLDEN).tensors)
    out = tensors["check.output.0"].clone()
    out[0, 0] = float("nan")
    tensors["check.output.0"] = out
    with pytest.raises(FormatError, match=r"check batch holds NaN or Inf: check.output.0"):
        load_generator(remake(tmp_path / "c.qtc.safetensors", tensors=tensors))


# -- items 3 and 4: memory bombs and hangs, refused before allocating ------------------------
BOMBS = {
    # a few KB claiming a 4.4 TB tensor
    "tb-tensor": lambda: with_layer_shape((1 << 20, 1 << 20)),
    # hidden widths whose weights the file does not store (256 MB if built)
    "hidden-not-stored": lambda: {
        k: {**golden_meta()[k], "hidden": [8000, 8000]} for k in ("config", "mapping")
    },
    # hidden widths over the limit (the 1.1 TB and 4 TB claims)
    "hidden-1e6": lambda: {
        k: {**golden_meta()[k], "hidden": [10**6, 10**6]} for k in ("config", "mapping")
    },
    "n-layers-1e6": lambda: {
        "ansatz": {**golden_meta()["ansatz"], "n_layers": 10**6},
        "config": {**golden_meta()["config"], "n_layers": 10**6},
    },
    "config-n-layers-1e6": lambda: {"config": {**golden_meta()["config"], "n_layers": 10**6}},
    "chunk-1e9": lambda: {k: {**golden_meta()[k], "chunk": 10**9} for k in ("config", "mapping")},
}

_BOMB_SCRIPT = r"""
import json, resource, sys, time
from qtcompress.errors import QTCompressError
from qtcompress.generator_file.load import load_generator

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key + ":"))

load_generator(sys.argv[1]).verify_weights()  # warm: imports, qsim, the first allocations
peak = status("VmHWM")
# Any allocation over 256 MB from here on fails outright instead of filling memory.
limit = status("VmSize") + (256 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
results = {}
for path in sys.argv[2:]:
    start = time.perf_counter()
    try:
        load_generator(path).verify_weights()
        outcome = "loaded"
    except QTCompressError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    except BaseException as exc:
        outcome = f"UNTYPED {type(exc).__name__}: {exc}"
    results[path] = [outcome, time.perf_counter() - start]
print(json.dumps({"results": results, "peak_growth": status("VmHWM") - peak}))
"""


@pytest.mark.slow  # a fresh interpreter: about 3 s of imports first
def test_memory_bombs_and_hangs_are_refused_at_once_without_allocating(tmp_path):
    paths = {}
    for name, build in BOMBS.items():
        paths[name] = remake(tmp_path / f"{name}.qtc.safetensors", meta=build())
        assert paths[name].stat().st_size < 10_000
    run = subprocess.run(
        [sys.executable, "-c", _BOMB_SCRIPT, str(GOLDEN), *map(str, paths.values())],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    expected = {
        "tb-tensor": r"ResourceLimitError: .*layout tensor 'net.0.weight' of shape "
        r"\[1048576, 1048576\] has 1,099,511,627,776 weights, over the limit",
        "hidden-not-stored": r"FormatError: .*generator tensors do not match the metadata",
        "hidden-1e6": r"ResourceLimitError: .*config.hidden = 1,000,000 exceeds the limit",
        "n-layers-1e6": r"ResourceLimitError: .*ansatz.n_layers = 1,000,000 exceeds the limit "
        r"of 256",
        "config-n-layers-1e6": r"ResourceLimitError: .*config.n_layers = 1,000,000 exceeds",
        "chunk-1e9": r"ResourceLimitError: .*config.chunk = 1,000,000,000 exceeds the limit",
    }
    import re

    for name, path in paths.items():
        outcome, seconds = report["results"][str(path)]
        assert re.match(expected[name], outcome), (name, outcome)
        assert seconds < 1.0, (name, seconds)
    assert report["peak_growth"] < 64 << 20, report["peak_growth"]


def test_float_layer_count_is_a_format_error(tmp_path):
    path = remake(
        tmp_path / "f.qtc.safetensors",
        meta={"ansatz": {**golden_meta()["ansatz"], "n_layers": 1e6}},
    )
    with pytest.raises(
        FormatError,
        match=r"ansatz.n_layers: expected an integer >= 1, got "
        r"1000000.0",
    ):
        load_generator(path)


def test_memory_estimate_over_available_is_resource_limit(tmp_path):
    # Within every documented maximum, but 2**31 weights need 30 qubits and ~16 GiB.
    path = remake(tmp_path / "big.qtc.safetensors", meta=with_layer_shape((1 << 21, 1 << 10)))
    with pytest.raises(ResourceLimitError, match=r"(needs about .* GiB of memory|qubits need)"):
        load_generator(path)


# -- item 5: the file cannot lie ------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "change", "match"),
    [
        (
            "ansatz",
            {"rotations": ["ry", "rz"], "entangler": "ring"},
            r"stored ansatz does not match the one its config builds "
            r"\(entangler 'ring' vs 'chain'; "
            r"rotations \['ry', 'rz'\] vs \['ry'\]\)",
        ),
        ("ansatz", {"n_qubits": 8}, r"stored ansatz does not match .*n_qubits 8 vs 7"),
        ("mapping", {"kind": "mps"}, r"stored mapping does not match .*kind 'mps' vs 'mlp'"),
        ("mapping", {"activation": "relu"}, r"stored mapping does not match .*activation"),
        ("config", {"mapping": "mps"}, r"stored mapping does not match .*kind 'mlp' vs 'mps'"),
    ],
    ids=["ansatz-ring", "ansatz-qubits", "mapping-mps", "mapping-activation", "config-mps"],
)
def test_lying_descriptions_are_refused(tmp_path, field, change, match):
    meta = golden_meta()
    path = remake(tmp_path / "lie.qtc.safetensors", meta={field: {**meta[field], **change}})
    with pytest.raises(FormatError, match=match):
        load_generator(path)


# -- item 6: malformed metadata is a typed error, never a builtin one -------------------------
def _deep(n):
    return "[" * n + "]" * n


MALFORMED = [
    ("version-superscript", {"raw": {"format_version": "\u00b2"}}, "invalid format_version"),
    ("version-arabic-digit", {"raw": {"format_version": "\u0661"}}, "invalid format_version"),
    ("version-float", {"raw": {"format_version": "1.0"}}, "invalid format_version"),
    ("version-space", {"raw": {"format_version": " 1"}}, "invalid format_version"),
    ("version-huge", {"raw": {"format_version": "9" * 40}}, "invalid format_version"),
    ("version-negative", {"raw": {"format_version": "-1"}}, "invalid format_version"),
    ("deep-json", {"raw": {"model": _deep(100_000)}}, "'model' is not valid JSON"),
    ("deep-json-under-recursion", {"raw": {"model": _deep(200)}}, "nested 200 deep"),
    ("huge-int-json", {"raw": {"qtcompress_version": "1" * 5000}}, "not valid JSON"),
    (
        "tensors-negative-shape",
        {"raw": {"tensors": json.dumps({"x": {"dtype": "float32", "shape": [-1]}})}},
        r"tensors\['x'\].shape\[0\]",
    ),
    ("tensors-not-object", {"raw": {"tensors": "[]"}}, "tensors: expected an object"),
    (
        "skeleton-bad",
        {"raw": {"skeleton": json.dumps({"tensor": 5, "bytes": 1})}},
        "skeleton.tensor: expected a string",
    ),
    ("layout-missing-total", {"drop_layout": "total"}, r"layout: missing keys \['total'\]"),
    ("layout-missing-tensors", {"drop_layout": "tensors"}, r"layout: missing keys \['tensors'\]"),
    (
        "layout-negative-shape",
        {"layout_tensor": {"shape": [-16, 13]}},
        r"layout.tensors\[0\].shape\[0\]: expected an integer >= 0, got -16",
    ),
    (
        "layout-overflow-shape",
        {"layout_tensor": {"shape": [1 << 70, 1], "numel": 1 << 70}},
        "over the limit",
    ),
    (
        "layout-string-shape",
        {"layout_tensor": {"shape": "16x13"}},
        r"layout.tensors\[0\].shape: expected a list",
    ),
    (
        "layout-bad-dtype",
        {"layout_tensor": {"dtype": "__class__"}},
        r"layout.tensors\[0\].dtype: expected one of",
    ),
    ("layout-rank-40", {"layout_tensor": {"shape": [1] * 40}}, r"expected 0..32 items, got 40"),
    ("layout-duplicate-names", {"layout_tensor": {"aliases": ["net.0.bias"]}}, "appear twice"),
    ("layout-total-string", {"meta": {"layout": "lots"}}, "layout: expected an object"),
    ("config-hidden-string", {"config": {"hidden": "8"}}, "config.hidden: expected null"),
    (
        "config-activation-list",
        {"config": {"activation": ["tanh"]}},
        "config.activation: expected a string",
    ),
    ("config-seed-huge", {"config": {"seed": 1 << 70}}, r"config.seed: expected an integer in"),
    ("config-bool-layers", {"config": {"n_layers": True}}, "config.n_layers: expected an integer"),
    ("config-bad-version", {"config": {"version": 99}}, "stored config is invalid"),
    ("config-bad-backend", {"config": {"backend": "quantum-computer"}}, "inconsistent"),
    ("ansatz-rotations-string", {"ansatz": {"rotations": "ry"}}, "ansatz.rotations: expected a"),
    ("ansatz-zero-qubits", {"ansatz": {"n_qubits": 0}}, "ansatz.n_qubits: expected an integer"),
    ("mapping-kind-number", {"mapping": {"kind": 5}}, "mapping.kind: expected a string"),
    ("sha-not-hex", {"meta": {"weights_sha256": "xyz"}}, "weights_sha256: expected a string"),
    ("fingerprint-short", {"fingerprint": [1.0]}, "expected 2..2 items"),
    ("fingerprint-string", {"fingerprint": ["1", "2"]}, "expected a finite number"),
    (
        "fingerprint-names",
        {"meta": {"weights_fingerprint": {"other": [1.0, 1.0]}}},
        "weights_fingerprint names",
    ),
    ("missing-config", {"drop": ("config",)}, r"metadata \['config'\] missing"),
    ("check-numbering", {"rename": ("check.output.0", "check.output.7")}, "not numbered"),
    ("unknown-tensor", {"rename": ("check.output.0", "bogus.0")}, r"unexpected tensors"),
    ("generator-dtype", {"retype": ("generator.scale", torch.float64)}, "shape mismatches"),
]


def _malformed_file(tmp_path, spec):
    path = tmp_path / "m.qtc.safetensors"
    if "raw" in spec:
        return raw(path, **spec["raw"])
    meta = golden_meta()
    tensors = dict(read_artifact(GOLDEN).tensors)
    if "drop_layout" in spec:
        del meta["layout"][spec["drop_layout"]]
    if "layout_tensor" in spec:
        meta["layout"]["tensors"][0].update(spec["layout_tensor"])
    for key in ("config", "ansatz", "mapping"):
        meta[key].update(spec.get(key, {}))
    if "fingerprint" in spec:
        meta["weights_fingerprint"]["net.0.weight"] = spec["fingerprint"]
    meta.update(spec.get("meta", {}))
    if "rename" in spec:
        old, new = spec["rename"]
        tensors[new] = tensors.pop(old)
    if "retype" in spec:
        name, dtype = spec["retype"]
        tensors[name] = tensors[name].to(dtype)
    return remake(path, meta=meta, drop=spec.get("drop", ()), tensors=tensors)


@pytest.mark.parametrize(
    ("spec", "match"), [(s, m) for _, s, m in MALFORMED], ids=[i for i, _, _ in MALFORMED]
)
def test_malformed_metadata_is_a_typed_error(tmp_path, spec, match):
    path = _malformed_file(tmp_path, spec)
    with pytest.raises(QTCompressError, match=match) as info:
        load_all(path)
    assert isinstance(info.value, (FormatError, ResourceLimitError))
    assert "\n" not in str(info.value)


def _with_check(tmp_path, name, tensor):
    tensors = dict(read_artifact(GOLDEN).tensors)
    tensors[name] = tensor
    return load_generator(remake(tmp_path / "c.qtc.safetensors", tensors=tensors))


def test_wrong_shaped_check_outputs_are_format_errors(tmp_path):
    gen = _with_check(tmp_path, "check.output.0", torch.zeros(3, 3))
    with pytest.raises(
        FormatError,
        match=r"output 0 has shape \[2, 3\], the recorded one "
        r"\[3, 3\]",
    ):
        gen.to_onnx()
    gen = _with_check(tmp_path, "check.output.1", torch.zeros(2, 3))
    with pytest.raises(FormatError, match="the model gives 1 outputs, the file recorded 2"):
        gen.to_onnx()


def test_check_inputs_that_do_not_fit_the_graph_are_format_errors(tmp_path):
    gen = _with_check(tmp_path, "check.input.0", torch.zeros(2, 13, dtype=torch.float64))
    with pytest.raises(FormatError, match="check batch does not fit the stored graph"):
        gen.to_onnx()
    gen = _with_check(tmp_path, "check.input.1", torch.zeros(2, 13))
    with pytest.raises(FormatError, match="2 check inputs for a graph with 1 inputs"):
        gen.to_onnx()


def test_compare_outputs_checks_shapes_and_nan():
    gen = load_generator(GOLDEN)
    model = gen.load_into(TinyMLP()).eval()
    with torch.no_grad():
        assert gen.compare_outputs(model(*gen.check_inputs)) <= 1e-5
    with pytest.raises(FormatError, match="NaN or Inf"):
        gen.compare_outputs(torch.full((2, 3), float("nan")))
    with pytest.raises(FormatError, match="has shape"):
        gen.compare_outputs(torch.zeros(4, 3))


def external_data_file(tmp_path: Path) -> Path:
    """The golden file with a stored graph whose initializer 'ext' reads an external file."""
    proto = onnx.ModelProto()
    proto.ParseFromString(read_artifact(GOLDEN).skeleton)
    ext = proto.graph.initializer.add()
    ext.name, ext.data_type = "ext", onnx.TensorProto.FLOAT
    ext.dims.extend([1])
    ext.data_location = onnx.TensorProto.EXTERNAL
    ext.external_data.add(key="location", value=str(tmp_path / "secret.bin"))
    return remake(tmp_path / "ext.qtc.safetensors", skeleton=proto.SerializeToString())


def test_skeleton_with_external_data_is_refused_unread(tmp_path):
    gen = load_generator(external_data_file(tmp_path))
    with pytest.raises(FormatError, match=r"refers to external data files \(\['ext'\]\)"):
        gen.to_onnx()


def test_corrupt_skeleton_is_format_error(tmp_path):
    path = remake(tmp_path / "s.qtc.safetensors", skeleton=b"\x08\x07garbage-not-onnx")
    with pytest.raises(FormatError, match="the stored ONNX graph cannot be rebuilt"):
        load_generator(path).to_onnx()


# -- item 10: the same run gives the same bytes ---------------------------------------------
def _run_once(path):
    torch.manual_seed(0)
    model = TinyMLP().eval()
    qt = compress(model, QTConfig(scheme="flat", chunk=4, n_layers=2, hidden=(8,)))
    qt.fit_weights(steps=3, progress=False)
    return save_generator(
        qt,
        path,
        example_inputs=(example_input(model, batch=2),),
        model_info={"factory": "tests.tiny_models:TinyMLP", "kwargs": {}},
    )


def test_two_identical_runs_write_identical_bytes(tmp_path):
    first = _run_once(tmp_path / "a.qtc.safetensors").read_bytes()
    second = _run_once(tmp_path / "b.qtc.safetensors").read_bytes()
    assert first == second
    (size,) = struct.unpack("<Q", first[:8])
    header = json.loads(first[8 : 8 + size])
    keys = list(header["__metadata__"])
    assert keys == sorted(keys)
    assert load_generator(tmp_path / "a.qtc.safetensors").verify_weights().identical


def test_refusals_are_fast(tmp_path):
    load_generator(GOLDEN)  # warm
    path = remake(tmp_path / "t.qtc.safetensors", meta=with_layer_shape((1 << 20, 1 << 20)))
    start = time.perf_counter()
    with pytest.raises(ResourceLimitError, match="over the limit"):
        load_generator(path)
    assert time.perf_counter() - start < 1.0


def test_bfloat16_check_batch_is_a_format_error(tmp_path):
    gen = _with_check(
        tmp_path, "check.input.0", read_artifact(GOLDEN).tensors["check.input.0"].to(torch.bfloat16)
    )
    with pytest.raises(FormatError, match="check.input.0 has dtype torch.bfloat16"):
        gen.to_onnx()
    gen = _with_check(tmp_path, "check.output.0", torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(FormatError, match="check.output.0 has dtype torch.bfloat16"):
        gen.to_onnx()
