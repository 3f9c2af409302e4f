"""Issue 11, items 3 and 4 on options: sizes over the documented limits are refused at once,
before anything is allocated, naming the value, the limit and the option to change."""

import time

import pytest
import torch

from qtcompress import limits, memory
from qtcompress.config import QTConfig
from qtcompress.errors import ConfigError, ResourceLimitError
from qtcompress.generator import build_generator
from qtcompress.targets import select_targets
from tests.tiny_models import TinyCNN


@pytest.fixture(scope="module")
def layout():
    lay = select_targets(TinyCNN())
    limits.check_config(QTConfig(), lay)  # warm: imports and the first circuit compile
    return lay


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (
            QTConfig(scheme="rows", n_layers=100_000),
            r"n_layers = 100,000 exceeds the limit of 256 QNN layers; "
            r"lower --layers \(QTConfig.n_layers\)",
        ),
        (
            QTConfig(scheme="flat", chunk=10**9),
            r"chunk = 1,000,000,000 exceeds the limit of 65,536 "
            r"weights per basis state; lower --chunk",
        ),
        (
            QTConfig(scheme="flat", hidden=(10**6,)),
            r"hidden = 1,000,000 exceeds the limit of "
            r"16,384 units in a hidden layer; lower --hidden",
        ),
        (QTConfig(scheme="flat", hidden=(16,) * 17), r"hidden = 17 exceeds the limit of 16 hidden"),
        (
            QTConfig(scheme="flat", hidden=(16384, 16384), chunk=4),
            r"params = 268,\d{3},\d{3} exceeds the limit of 268,435,456 generator parameters; "
            r"lower "
            r"--budget",
        ),
        (
            QTConfig(scheme="rows", rank=10**5, budget=None),
            r"rank = 100,000 exceeds the limit of 4,096",
        ),
        (QTConfig(scheme="flat", mapping="mps", bond_dim=10**4), r"bond_dim = 10,000 exceeds"),
    ],
    ids=["layers", "chunk", "hidden-width", "hidden-depth", "params", "rank", "bond-dim"],
)
def test_option_over_a_limit_is_refused_at_once(layout, config, match):
    start = time.perf_counter()
    with pytest.raises(ResourceLimitError, match=match):
        limits.check_config(config, layout)
    assert time.perf_counter() - start < 1.0


def test_memory_check_names_the_fix(layout):
    with pytest.raises(
        ResourceLimitError,
        match=r"fitting 1,946 weights .* needs about .* of "
        r"memory, more than the .* this process may use "
        r"now .*; use a smaller --budget",
    ):
        limits.check_config(QTConfig(), layout, available=1 << 14)


@pytest.mark.parametrize(
    "config",
    [
        QTConfig(),
        QTConfig(scheme="flat", chunk=4, hidden=(8,)),
        QTConfig(scheme="flat", mapping="mps", chunk=4),
    ],
    ids=["default", "flat-mlp", "flat-mps"],
)
def test_plan_matches_the_real_generator_without_memory(layout, config):
    planned = limits.check_config(config, layout)
    assert all(p.device.type == "meta" for p in planned.parameters())
    real = build_generator(layout, config)
    assert {k: v.shape for k, v in planned.state_dict().items()} == {
        k: v.shape for k, v in real.state_dict().items()
    }
    assert memory.estimate_generator_bytes(planned, layout) == memory.estimate_generator_bytes(
        real, layout
    )


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-5, ConfigError, "--fit-steps must be >= 0, got -5"),
        ("3", ConfigError, "--fit-steps must be an integer"),
        (True, ConfigError, "--fit-steps must be an integer"),
        (
            10**12,
            ResourceLimitError,
            "--fit-steps = 1,000,000,000,000 exceeds the limit of 1,000,000,000; lower --fit-steps",
        ),
    ],
)
def test_counts(value, error, match):
    with pytest.raises(error, match=match):
        limits.check_count(value, "--fit-steps", maximum=limits.MAX_STEPS)
    assert limits.check_count(0, "--fit-steps", maximum=limits.MAX_STEPS) == 0


def test_qnn_size_and_memory_helpers():
    limits.check_qnn_size(30, 256)
    with pytest.raises(ResourceLimitError, match=r"n_qubits = 31 exceeds the limit of 30"):
        limits.check_qnn_size(31, 8)
    with pytest.raises(
        ResourceLimitError,
        match=r"f.qtc: ansatz.n_layers = 257 exceeds .* the "
        r"file is corrupt or hostile",
    ):
        limits.check_qnn_size(2, 257, source="f.qtc")
    assert memory.available_memory_bytes() > 0
    memory.check_memory(1 << 20, "x", "y", available=1 << 30)
    with pytest.raises(ResourceLimitError, match=r"^reading x needs about 1.0 GiB .*; fix it\.$"):
        memory.check_memory(1 << 30, "reading x", "fix it", available=1 << 30)


def test_seed_out_of_range(layout):
    with pytest.raises(ConfigError, match="seed = .* is out of range"):
        limits.check_config(QTConfig(seed=1 << 64), layout)
    assert torch.zeros(1).device.type == "cpu"  # the meta device does not leak


def test_qubit_limit_mirrors_the_simulator():
    from qtcompress.qnn import MAX_QUBITS

    assert limits.MAX_QUBITS == MAX_QUBITS
