"""``QTModel.save`` and ``qtcompress.load``: one round-trip type (issue 13)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qtcompress
from qtcompress import QTConfig, QTModel, compress
from qtcompress.errors import MissingFileError, TargetError
from qtcompress.generator_file.file import GeneratorFile
from tests.tiny_models import TinyCNN, example_input

SMALL = QTConfig(scheme="rows", n_layers=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = example_input(model, batch=16)
    qt = compress(model, SMALL)
    qt.fit_weights(steps=10, progress=False)
    qt.finetune(x, steps=10, progress=False)  # re-estimates the student's BatchNorm statistics
    path = qt.save(tmp_path_factory.mktemp("rt") / "cnn.qtc.safetensors", example_inputs=(x[:3],))
    return model, qt, x, path


def test_load_with_the_model_gives_the_same_qtmodel_back(saved):
    model, qt, x, path = saved
    again = qtcompress.load(path, model)
    assert isinstance(again, QTModel)
    with torch.no_grad():
        assert torch.equal(again(x), qt(x))  # same generator, same student statistics
    for (name, a), b in zip(
        again.materialize().state_dict().items(),
        qt.materialize().state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name
    assert again.report() == qt.report()


def test_a_loaded_model_fine_tunes_further_and_saves_again(saved, tmp_path):
    model, _, x, path = saved
    again = qtcompress.load(path, model)
    before = {n: p.detach().clone() for n, p in again.generator.named_parameters()}
    result = again.finetune(x, steps=5, progress=False)
    assert result.steps == 5
    assert any(not torch.equal(before[n], p) for n, p in again.generator.named_parameters())
    second = again.save(tmp_path / "again.qtc.safetensors", example_inputs=(x[:3],))
    rebuilt = qtcompress.load(second)
    assert isinstance(rebuilt, GeneratorFile)
    assert rebuilt.verify_weights().equivalent
    with torch.no_grad():  # QTModel runs linear layers on the factors: float rounding apart
        torch.testing.assert_close(
            rebuilt.load_into(TinyCNN().eval())(x), again(x), rtol=1e-5, atol=1e-6
        )


def test_load_without_a_model_regenerates_and_exports(saved, tmp_path):
    _, qt, x, path = saved
    stored = qtcompress.load(path)
    assert isinstance(stored, GeneratorFile)
    for name, t in qt.materialize().state_dict().items():
        assert torch.equal(stored.state_dict()[name], t), name
    proto, diff = stored.to_onnx(tmp_path / "cnn.onnx")  # checked on the stored batch
    assert diff <= 1e-4 and (tmp_path / "cnn.onnx").stat().st_size > proto.ByteSize() // 2


def test_a_model_that_does_not_fit_is_named(saved):
    _, _, _, path = saved
    other = TinyCNN(classes=3).eval()
    with pytest.raises(TargetError, match=r"head\.weight \[3, 64\] \(stored \[10, 64\]\)"):
        qtcompress.load(path, other)
    with pytest.raises(TargetError, match=r"missing \['bn1\.bias'.*; unexpected \['0\.bias'"):
        qtcompress.load(path, nn.Sequential(nn.Linear(4, 4)))


def test_load_of_a_missing_file(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist") as info:
        qtcompress.load(tmp_path / "nope.qtc.safetensors")
    assert isinstance(info.value, FileNotFoundError)
