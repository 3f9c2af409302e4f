"""The device argument: where the mapping, the model and the loss run (issue 10, item 6).

These tests run on the CPU (CI has no GPU): they check that asking for a device is validated
before anything is built, that ``device="cpu"`` is the default path bit for bit, and that saving
from a model moved with :meth:`QTModel.to` works. The CUDA path itself is checked on a GPU
machine only (see the README's "Devices" paragraph for what was run).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtcompress import QTConfig, compress, load
from qtcompress.device import resolve_device
from qtcompress.errors import ConfigError
from tests.cli_helpers import main_result

NO_CUDA = not torch.cuda.is_available()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).eval()


def test_resolve_device_defaults_to_cpu() -> None:
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize(
    ("spelling", "message"),
    [
        ("gpu0", "Unknown device 'gpu0'"),
        ("cuda:x", "Unknown device 'cuda:x'"),
        ("meta", "Device type 'meta' is not supported"),
    ],
)
def test_resolve_device_rejects_bad_spellings(spelling: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_device(spelling)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error_before_anything_is_built() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available to this torch"):
        compress(_model(), QTConfig(scheme="rows", n_layers=1), device="cuda")


def test_device_cpu_is_the_default_path_bit_for_bit() -> None:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    states = []
    for kwargs in ({}, {"device": "cpu"}):
        qt = compress(_model(), QTConfig(scheme="rows", n_layers=1, seed=3), **kwargs)
        assert qt.device == torch.device("cpu")
        qt.finetune(x, steps=4, batch_size=16)
        states.append(qt.generator.state_dict())
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k


def test_to_returns_the_model_and_on_cpu_restores_the_device(tmp_path) -> None:
    qt = compress(_model(), QTConfig(scheme="rows", n_layers=1))
    assert qt.to("cpu") is qt
    with qt.on_cpu() as same:
        assert same is qt and qt.device.type == "cpu"
    x = torch.randn(4, 8)
    path = qt.save(tmp_path / "g.qtc.safetensors", example_inputs=x)
    assert load(path).verify_weights().identical


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_cuda_training_saves_a_file_that_verifies_on_the_cpu(tmp_path) -> None:
    x = torch.randn(128, 8)
    qt = compress(_model(), QTConfig(scheme="rows", n_layers=1), device="cuda")
    assert next(qt.generator.body.parameters()).device.type == "cuda"
    assert qt.generator.qnn().device.type == "cuda"  # simulated on the CPU, moved once
    qt.finetune(x, steps=20, batch_size=32)
    fid = qt.evaluate(x)
    assert fid.agreement > 0.5
    path = qt.save(tmp_path / "g.qtc.safetensors", example_inputs=x[:4])
    assert qt.device.type == "cuda"  # saving moved it back
    assert load(path).verify_weights().identical


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu0", "Unknown device 'gpu0'"),
        pytest.param(
            "cuda",
            "CUDA is not available",
            marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA"),
        ),
    ],
)
def test_cli_bad_device_exits_1_before_fitting(capsys, tmp_path, device: str, message: str) -> None:
    code, err = main_result(capsys, "demo", "--output", str(tmp_path / "out"), "--device", device)
    assert code == 1, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
