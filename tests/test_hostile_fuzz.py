"""Issue 11: fuzz a valid generator file (metadata, raw header strings, bytes, tensors).

Every outcome must be success or a QTCompressError: never another exception, never a hang.
About 100 examples in all, derandomised (the same cases on every run), each under a deadline.
"""

import atexit
import json
import math
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from qtcompress.errors import QTCompressError
from qtcompress.generator_file.load import load_generator
from qtcompress.io.container import read_artifact, save_artifact, write_safetensors

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden_mlp.qtc.safetensors"
WORK = Path(tempfile.mkdtemp(prefix="qtc-fuzz-"))
atexit.register(shutil.rmtree, WORK, True)
TARGET = WORK / "fuzz.qtc.safetensors"
SECONDS_PER_CASE = 10  # hard stop (a hang fails the test); the deadline below is the budget

# QTC_FUZZ_EXAMPLES=2000 for a deeper local run; CI keeps ~100 examples over the three tests.
FUZZ = settings(
    max_examples=int(os.environ.get("QTC_FUZZ_EXAMPLES", "35")),
    deadline=5000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INTERESTING = [
    0,
    -1,
    1,
    2,
    7,
    255,
    2**31,
    2**63,
    10**6,
    10**12,
    1e6,
    0.5,
    -0.0,
    "",
    "x",
    "mps",
    "ring",
    "float16",
    None,
    True,
    [],
    {},
    [1],
    [-1],
    [0, 0],
    {"a": 1},
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | st.sampled_from(INTERESTING)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@contextmanager
def hard_timeout(seconds):
    def fail(_signum, _frame):
        raise TimeoutError(f"a fuzz case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(path):
    """Load, regenerate, verify, rebuild ONNX: success or a typed error, nothing else."""
    with hard_timeout(SECONDS_PER_CASE):
        try:
            gen = load_generator(path)
            gen.verify_weights()
            if gen.skeleton is not None:
                gen.to_onnx()
            gen.state_dict()
        except QTCompressError as exc:
            if os.environ.get("QTC_FUZZ_LOG"):
                print("FUZZ", type(exc).__name__, str(exc)[:150])
            assert str(exc) and "\n" not in str(exc), repr(exc)
            return type(exc).__name__
    return "ok"


def paths_of(value, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value, the value's own included."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths_of(v, (*prefix, i))
    return out


def set_path(root, path, new, delete=False):
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = new


@pytest.fixture(scope="module", autouse=True)
def warm():
    assert outcome(GOLDEN) == "ok"  # imports, qsim and onnxruntime start-up outside deadlines


@FUZZ
@given(data=st.data())
def test_fuzz_metadata_values(data):
    art = read_artifact(GOLDEN)
    meta = json.loads(json.dumps(art.metadata, sort_keys=True))  # reads come in hash order
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(
            st.sampled_from(sorted((p for p in paths_of(meta) if p), key=repr)), label="path"
        )
        new = data.draw(json_values, label="value")
        set_path(meta, path, new, delete=data.draw(st.booleans(), label="delete"))
    save_artifact(TARGET, art.tensors, meta, skeleton=art.skeleton)
    outcome(TARGET)


@FUZZ
@given(data=st.data())
def test_fuzz_raw_header_and_bytes(data):
    with safe_open(str(GOLDEN), "pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = data.draw(st.sampled_from(sorted(header)), label="key")
    raw = header[key]
    header[key] = data.draw(
        st.one_of(
            st.text(max_size=20),
            st.just(raw[: len(raw) // 2]),
            st.builds(
                lambda i, s: raw[:i] + s + raw[i:],
                st.integers(0, len(raw)),
                st.sampled_from(["NaN", "[", "}", "1e999", "-", "\u00b2", '"', "9" * 30]),
            ),
        ),
        label="raw",
    )
    write_safetensors(TARGET, tensors, header)  # sorted: the same draws give the same bytes
    blob = bytearray(TARGET.read_bytes())
    for _ in range(data.draw(st.integers(0, 3), label="flips")):
        i = data.draw(st.integers(0, len(blob) - 1), label="offset")
        blob[i] ^= data.draw(st.integers(1, 255), label="xor")
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob)), label="length")]
    TARGET.write_bytes(bytes(blob))
    outcome(TARGET)


@FUZZ
@given(data=st.data())
def test_fuzz_tensors(data):
    art = read_artifact(GOLDEN)
    tensors = dict(art.tensors)
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    kind = data.draw(st.sampled_from(["value", "shape", "dtype", "drop"]), label="kind")
    t = tensors[name].clone()
    if kind == "value" and t.numel():
        flat = t.reshape(-1)
        flat[data.draw(st.integers(0, flat.numel() - 1), label="index")] = data.draw(
            st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -3e38, 0.0]), label="v"
        )
        tensors[name] = t
    elif kind == "shape":
        shape = data.draw(st.lists(st.integers(0, 9), max_size=3), label="shape")
        tensors[name] = torch.zeros(shape, dtype=t.dtype)
    elif kind == "dtype":
        dtypes = [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8]
        tensors[name] = t.to(data.draw(st.sampled_from(dtypes), label="dtype"))
    else:
        del tensors[name]
    save_artifact(TARGET, tensors, art.metadata, skeleton=art.skeleton)
    outcome(TARGET)
