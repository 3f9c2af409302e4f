"""tools/suite.py: model shapes and signatures, data builders and the checkpoint cache.

Nothing is trained here: where the cache path is exercised, the training step is replaced by a
no-op (an untrained model is saved) or by one that fails if it is called.
"""

import dataclasses
import inspect
import json

import pytest
import torch
from torch import nn

from tests.cli_helpers import load_tool


@pytest.fixture(scope="module")
def suite():
    return load_tool("suite")


@pytest.fixture(scope="module")
def split(suite):
    return suite.digits_split()


def test_default_models_have_suite_sizes_and_no_batchnorm(suite):
    expected = {
        "cnn": 421_642,
        "rnn": 335_425,
        "encoder": 804_096,
        "mlp5m": 5_824_522,
        "crnn": 1_487_637,
    }
    assert suite.NAMES == tuple(expected)
    for name, weights in expected.items():
        model = suite._SPECS[name].build()
        assert sum(p.numel() for p in model.parameters()) == weights, name
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_cnn_and_mlp_small_widths(suite):
    cnn = suite.DigitsCNN28(channels=(4, 8), hidden=16, classes=3)
    assert cnn(torch.rand(5, 1, 28, 28)).shape == (5, 3)
    mlp = suite.WideMLP(hidden=(32, 16), classes=3)
    assert mlp(torch.rand(5, 784)).shape == (5, 3)
    assert [type(m) for m in mlp.net] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]


def test_streaming_rnn_carries_its_state(suite):
    model = suite.StreamingRNN(channels=8, hidden=16).eval()
    assert list(inspect.signature(model.forward).parameters) == ["x", "state"]
    x = torch.rand(3, 14, 28)
    zero = model.initial_state(3)
    assert zero.shape == (3, 2, 16) and not zero.any()
    prob, state = model(x, zero)
    assert prob.shape == (3,) and state.shape == (3, 2, 16)
    assert bool(((prob > 0) & (prob < 1)).all())
    # the carried state changes the next window's answer, and equals carried_states()
    assert not torch.allclose(model(x, state)[0], prob)
    assert torch.equal(suite.carried_states(model, x), state)


def test_tiny_encoder_keywords_mask_and_buffers(suite):
    model = suite.TinyEncoder(d_model=16, heads=2, layers=2, ff=32).eval()
    assert list(inspect.signature(model.forward).parameters) == ["input_ids", "attention_mask"]
    tokens = suite.tokenize(torch.rand(4, 1, 8, 8), seed=0)
    emb = model(**tokens)
    assert emb.shape == (4, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    # padded positions do not reach the embedding
    noisy = tokens["input_ids"] + (tokens["attention_mask"] == 0) * 5
    assert torch.allclose(model(noisy, tokens["attention_mask"]), emb, atol=1e-5)
    state = model.state_dict()
    assert state["position_ids"].dtype == torch.int64 and state["position_ids"].shape == (1, 64)
    # layers are initialised one by one, not copies of one layer
    w0, w1 = (model.layers[i].linear1.weight for i in range(2))
    assert not torch.equal(w0, w1)


def test_data_builders(suite, split):
    assert (len(split.x_train), len(split.x_test)) == (1438, 359)
    big = suite.upsample(split.x_test)
    assert big.shape == (359, 1, 28, 28)
    assert 0.0 <= float(big.min()) and float(big.max()) <= 1.0
    w1, w2 = suite.rnn_windows(big)
    assert w1.shape == w2.shape == (359, 14, 28)
    assert torch.equal(torch.cat([w1, w2], dim=1), big[:, 0])

    tokens = suite.tokenize(split.x_test, seed=3)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape == mask.shape == (359, 64) and ids.dtype == mask.dtype == torch.int64
    lengths = mask.sum(1)
    assert int(lengths.min()) >= 40 and int(lengths.max()) <= 64 and len(set(lengths.tolist())) > 5
    assert bool((mask == (torch.arange(64) < lengths[:, None])).all())  # a prefix of real tokens
    assert not ids[mask == 0].any()
    pixels = (split.x_test.flatten(1) * 16).round().long()
    assert torch.equal(ids[mask == 1], pixels[mask == 1] + 1)
    assert torch.equal(suite.tokenize(split.x_test, seed=3)["attention_mask"], mask)
    assert not torch.equal(suite.tokenize(split.x_test, seed=4)["attention_mask"], mask)


def test_input_helpers(suite):
    x = torch.arange(10.0).reshape(5, 2)
    assert torch.equal(suite.index_inputs(x, slice(1, 3)), x[1:3])
    pair = suite.index_inputs((x, x + 1), torch.tensor([4]))
    assert isinstance(pair, tuple) and torch.equal(pair[1], x[4:] + 1)
    kw = suite.index_inputs({"a": x}, slice(0, 2))
    assert torch.equal(suite.call_model(lambda a: a * 2, kw), x[:2] * 2)
    # predict() batches, keeps the first output of a tuple and restores the train mode
    model = nn.Linear(2, 3).train()
    out = suite.predict(_tuple_model(model), (x,), batch_size=2)
    assert torch.allclose(out, model(x)) and model.training
    emb = torch.eye(3)[torch.tensor([0, 1, 2, 0])]
    labels = torch.tensor([0, 1, 2, 0])
    assert suite.centroid_accuracy(emb, labels, emb, labels) == 1.0


def _tuple_model(linear: nn.Module) -> nn.Module:
    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x), x

    return TupleOut().train()


def _patch_fit(suite, monkeypatch, name, fit):
    monkeypatch.setitem(suite._SPECS, name, dataclasses.replace(suite._SPECS[name], fit=fit))


def test_rnn_data_are_carried_and_zero_state_pairs(suite, split):
    model = suite.StreamingRNN(channels=8, hidden=16).eval()
    train_in, test_in, y_train, y_test = suite._data_rnn(model, split)
    x, state = test_in
    n = len(split.x_test)
    assert x.shape == (2 * n, 14, 28) and state.shape == (2 * n, 2, 16)
    assert len(train_in[0]) == len(y_train) == 2 * len(split.x_train)
    w1, w2 = suite.rnn_windows(suite.upsample(split.x_test))
    # rows [0, n): window 2 from the carried state; rows [n, 2n): window 1 from zeros
    assert torch.equal(x[:n], w2) and torch.equal(x[n:], w1)
    assert torch.equal(state[:n], suite.carried_states(model, w1)) and not state[n:].any()
    assert torch.equal(y_test[:n], (split.y_test >= 5).long())
    assert torch.equal(y_test[n:], y_test[:n])
    prob, new_state = suite.call_model(model, suite.index_inputs(test_in, slice(0, 4)))
    assert prob.shape == (4,) and new_state.shape == (4, 2, 16)


def test_cache_round_trip(suite, tmp_path, monkeypatch):
    calls = []
    _patch_fit(suite, monkeypatch, "cnn", lambda *args: calls.append(1))
    logs: list[str] = []
    first = suite.load_entry("cnn", cache_dir=tmp_path, log=logs.append)
    assert calls == [1] and first.checkpoint == tmp_path / "cnn.safetensors"
    card = json.loads((tmp_path / "cnn.json").read_text())
    assert card["recipe"] == suite._recipe("cnn") and card["weights"] == 421_642
    assert card["checkpoint_bytes"] == first.checkpoint.stat().st_size
    assert card["accuracy"] == first.accuracy

    def boom(*args):
        raise AssertionError("a cached model must not be retrained")

    _patch_fit(suite, monkeypatch, "cnn", boom)
    entry = suite.load_entry("cnn", cache_dir=tmp_path, log=logs.append)
    assert entry.output == "logits" and not entry.model.training
    assert entry.weights == 421_642 and "421,642" in entry.description
    assert entry.test_inputs.shape == (359, 1, 28, 28) and entry.test_labels.shape == (359,)
    assert entry.accuracy == first.accuracy
    for a, b in zip(
        entry.model.state_dict().values(), first.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)

    # a changed recipe makes the cache stale
    card["recipe"]["epochs"] += 1
    (tmp_path / "cnn.json").write_text(json.dumps(card))
    with pytest.raises(AssertionError, match="must not be retrained"):
        suite.load_entry("cnn", cache_dir=tmp_path, log=logs.append)
    assert any("recipe differs" in line for line in logs)


def test_cli_prints_the_table(suite, tmp_path, monkeypatch, capsys):
    _patch_fit(suite, monkeypatch, "cnn", lambda *args: None)
    assert suite.main(["--only", "cnn", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| cnn | 421,642 | logits |" in out and "CNN conv32-conv64" in out
    with pytest.raises(ValueError, match="unknown suite models"):
        suite.load_suite(["cnn", "nope"], cache_dir=tmp_path)
