import pytest
import torch
from torch import nn

from qtcompress.errors import ConfigError, TargetError
from qtcompress.targets import matches, select_targets
from tests.tiny_models import ALL_MODELS, TiedLM, TinyCNN, TinyLSTM, TinyMLP, TinyTransformer


@pytest.mark.parametrize("cls", ALL_MODELS)
def test_default_selects_every_unique_trainable_parameter(cls):
    model = cls()
    layout = select_targets(model)
    unique = {id(p): p for p in model.parameters() if p.requires_grad}
    assert layout.total == sum(p.numel() for p in unique.values())
    # Offsets are contiguous and in order.
    off = 0
    for s in layout.specs:
        assert s.offset == off
        off += s.numel
    assert off == layout.total


def test_pattern_kinds():
    assert matches("weight", "conv1.weight")
    assert matches("conv1", "conv1.weight") and matches("conv1", "conv1.bias")
    assert matches("net.0.weight", "net.0.weight")
    assert matches("0.weight", "net.0.weight")
    assert not matches("weight", "lstm.weight_ih_l0")
    assert not matches("conv", "conv1.weight")
    assert matches("re:^conv\\d\\.", "conv2.bias")
    assert not matches("re:^bn", "conv2.bias")


def test_target_and_exclude():
    model = TinyCNN()
    layout = select_targets(model, target=["conv1", "head.weight"])
    assert layout.names() == ["conv1.weight", "conv1.bias", "head.weight"]
    layout = select_targets(model, target=["weight"], exclude=["re:^bn"])
    assert layout.names() == ["conv1.weight", "conv2.weight", "head.weight"]
    assert "bn1.weight" in layout.classical and "conv1.bias" in layout.classical
    # BatchNorm running statistics are buffers: carried, never generated.
    assert "bn1.running_mean" in layout.buffers


def test_lstm_and_attention_names():
    layout = select_targets(TinyLSTM(), target=["lstm"])
    assert all(n.startswith("lstm.") for n in layout.names()) and len(layout.names()) == 4
    layout = select_targets(TinyTransformer(), target=["self_attn"])
    assert any(n.endswith("self_attn.in_proj_weight") for n in layout.names())


def test_tied_parameters_counted_once():
    model = TiedLM()
    layout = select_targets(model)
    assert layout.total == model.embed.weight.numel()
    (spec,) = layout.specs
    assert spec.names == ("embed.weight", "out.weight")
    views = layout.split(torch.arange(layout.total, dtype=torch.float32))
    assert views["embed.weight"] is views["out.weight"]
    # Selecting by the alias selects the shared tensor too.
    assert select_targets(model, target=["out.weight"]).total == layout.total


def test_frozen_parameters():
    model = TinyMLP()
    model.net[0].weight.requires_grad_(False)
    layout = select_targets(model)
    assert "net.0.weight" not in layout.names() and "net.0.weight" in layout.classical
    assert "net.0.weight" in select_targets(model, include_frozen=True).names()


def test_nothing_matches_lists_patterns_and_names():
    with pytest.raises(TargetError, match=r"pattern\(s\) \['conv9'\] match no parameter") as info:
        select_targets(TinyCNN(), target=["conv9"])
    msg = str(info.value)
    assert "conv9" in msg and "conv1.weight" in msg
    with pytest.raises(
        TargetError,
        match=r"No parameter left to generate \(target=\['conv1'\], "
        r"exclude=\['conv1'\]",
    ):
        select_targets(TinyCNN(), target=["conv1"], exclude=["conv1"])
    with pytest.raises(TargetError, match=r"No parameter left to generate \(target=all trainable"):
        select_targets(nn.Linear(2, 2).requires_grad_(False))


def test_bad_patterns():
    with pytest.raises(ConfigError, match="list of patterns, got the string 'conv1'"):
        select_targets(TinyCNN(), target="conv1")  # a string, not a list
    with pytest.raises(ConfigError, match=r"Invalid regex in target pattern 're:\('"):
        select_targets(TinyCNN(), target=["re:("])
    with pytest.raises(ConfigError, match="Every exclude pattern must be a non-empty string"):
        select_targets(TinyCNN(), exclude=[""])


def test_split_flatten_round_trip_and_shape_errors():
    model = TinyCNN()
    layout = select_targets(model)
    flat = layout.flatten(dict(model.named_parameters()))
    views = layout.split(flat)
    for name, p in model.named_parameters():
        assert torch.equal(views[name], p.detach())
    with pytest.raises(ConfigError, match=r"flat vector of 1946 weights, got shape \(1945,\)"):
        layout.split(flat[:-1])
    with pytest.raises(TargetError, match=r"Missing tensors for the layout: \['conv1\.bias'"):
        layout.flatten({"conv1.weight": torch.zeros(1)})
