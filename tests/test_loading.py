import json
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file, save_model

from qtcompress.errors import ConfigError, FormatError, MissingFileError, UnsafeFileError
from qtcompress.io.model_source import load_model, parse_factory_kwargs, resolve_factory
from tests.tiny_models import TiedLM, TinyCNN, TinyMLP, example_input

MLP = "tests.tiny_models:TinyMLP"


def _same(a, b, model_like):
    x = example_input(model_like)
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def _trained_cnn():
    torch.manual_seed(1)
    m = TinyCNN()
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 1, 8, 8))  # move BatchNorm running stats away from defaults
    return m.eval()


def test_module_passes_through():
    m = TinyMLP()
    assert load_model(m) is m


def test_pt_state_dict_with_factory_and_json_kwargs(tmp_path):
    m = TinyMLP(features=5)
    torch.save(m.state_dict(), tmp_path / "w.pt")
    loaded = load_model(tmp_path / "w.pt", factory=MLP, factory_kwargs='{"features": 5}')
    assert isinstance(loaded, TinyMLP) and not loaded.training
    _same(m, loaded, m)


def test_wrapped_checkpoint_and_dict_kwargs(tmp_path):
    m = TinyMLP(classes=4)
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, tmp_path / "c.pth")
    loaded = load_model(tmp_path / "c.pth", factory=MLP, factory_kwargs={"classes": 4})
    _same(m, loaded, m)


def test_safetensors_state_dict_with_batchnorm_buffers(tmp_path):
    m = _trained_cnn()
    save_file(m.state_dict(), tmp_path / "w.safetensors")
    loaded = load_model(tmp_path / "w.safetensors", factory="tests.tiny_models:TinyCNN")
    torch.testing.assert_close(loaded.bn1.running_mean, m.bn1.running_mean, rtol=0, atol=0)
    _same(m, loaded, m)


def test_tied_weights_saved_once_by_safetensors(tmp_path):
    m = TiedLM()
    save_model(m, str(tmp_path / "tied.safetensors"))  # keeps one name of the tied pair
    with safe_open(str(tmp_path / "tied.safetensors"), "pt") as f:
        assert len({"embed.weight", "out.weight"} & set(f.keys())) == 1
    loaded = load_model(tmp_path / "tied.safetensors", factory="tests.tiny_models:TiedLM")
    assert loaded.out.weight is loaded.embed.weight
    _same(m, loaded, m)


def test_torch_export_program(tmp_path):
    m = _trained_cnn()
    x = example_input(m)
    batch = {"x": {0: torch.export.Dim("batch")}}  # a fixed batch is refused (test_careless_input)
    torch.export.save(torch.export.export(m, (x,), dynamic_shapes=batch), tmp_path / "m.pt2")
    loaded = load_model(tmp_path / "m.pt2")
    assert loaded.eval() is loaded  # torch's own module raises NotImplementedError here
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="do not give a factory"):
        load_model(tmp_path / "m.pt2", factory=MLP)


def test_pickle_refused_without_trust(tmp_path):
    torch.save(TinyMLP(), tmp_path / "full.pt")
    with pytest.raises(UnsafeFileError, match="this file needs code execution to load") as info:
        load_model(tmp_path / "full.pt")
    assert "--trust-pickle" in str(info.value) and "full.pt" in str(info.value)


def test_pickle_loaded_with_trust_and_warning(tmp_path):
    m = TinyMLP()
    torch.save(m, tmp_path / "full.pt")
    with pytest.warns(UserWarning, match="trust_pickle"):
        loaded = load_model(tmp_path / "full.pt", trust_pickle=True)
    _same(m, loaded, m)


def test_state_dict_load_does_not_warn(tmp_path):
    torch.save(TinyMLP().state_dict(), tmp_path / "w.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_model(tmp_path / "w.pt", factory=MLP, trust_pickle=True)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = TinyMLP().state_dict()
    del sd["net.3.bias"]
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(
        FormatError,
        match=r"does not fit model TinyMLP: missing keys "
        r"\['net\.3\.bias'\], unexpected keys",
    ) as info:
        load_model(tmp_path / "w.pt", factory=MLP)
    msg = str(info.value)
    assert "net.3.bias" in msg and "extra.weight" in msg and "missing" in msg


def test_shape_mismatch_is_named(tmp_path):
    torch.save(TinyMLP(classes=4).state_dict(), tmp_path / "w.pt")
    with pytest.raises(
        FormatError,
        match=r"shape mismatches \[net\.3\.weight: model \(3, 16\) "
        r"vs file \(4, 16\)",
    ) as info:
        load_model(tmp_path / "w.pt", factory=MLP)  # builds classes=3
    assert "net.3.weight" in str(info.value) and "(3, 16)" in str(info.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".pt2"])
def test_truncated_files_raise_format_error_naming_file(tmp_path, suffix):
    m = TinyMLP()
    good = tmp_path / f"good{suffix}"
    if suffix == ".pt":
        torch.save(m.state_dict(), good)
    elif suffix == ".safetensors":
        save_file(m.state_dict(), good)
    else:
        torch.export.save(torch.export.export(m, (example_input(m),)), good)
    data = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    kind = {
        ".pt": "PyTorch file",
        ".safetensors": "safetensors file",
        ".pt2": "torch.export program",
    }[suffix]
    match = "is truncated, corrupt, or not a " + re.escape(kind)
    with pytest.raises(FormatError, match=match) as info:
        load_model(bad, factory=None if suffix == ".pt2" else MLP)
    assert "bad" + suffix in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_garbage_pt_is_format_error(tmp_path, content):
    (tmp_path / "g.pt").write_bytes(content)
    with pytest.raises(FormatError, match="g.pt"):
        load_model(tmp_path / "g.pt", factory=MLP)


def test_state_dict_without_factory(tmp_path):
    torch.save(TinyMLP().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"holds a state dict .*: give a model factory"):
        load_model(tmp_path / "w.pt")


def test_non_state_dict_content(tmp_path):
    torch.save([1, 2, 3], tmp_path / "l.pt")
    with pytest.raises(FormatError, match="not a state dict"):
        load_model(tmp_path / "l.pt", factory=MLP)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        load_model(tmp_path / "missing.pt", factory=MLP)
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"\.h5"):
        load_model(tmp_path / "w.h5", factory=MLP)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("tests.tiny_models.TinyMLP", "one colon"),
        ("no_such_package_xyz:Model", "no_such_package_xyz"),
        ("tests.tiny_models:Nope", "'Nope'"),
        ("tests.tiny_models:ALL_MODELS", "not callable"),
    ],
)
def test_bad_factory_specs(spec, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve_factory(spec)


def test_factory_kwargs_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_factory_kwargs("{features: 5}")
    with pytest.raises(ConfigError, match="JSON object"):
        parse_factory_kwargs(json.dumps([1, 2]))
    assert parse_factory_kwargs("") == {}
    torch.save(TinyMLP().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="rejected kwargs"):
        load_model(tmp_path / "w.pt", factory=MLP, factory_kwargs={"bogus": 1})
    with pytest.raises(ConfigError, match="not an nn.Module"):
        load_model(tmp_path / "w.pt", factory="builtins:dict")
