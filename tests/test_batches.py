from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from qtcompress.data.batch import Batch, batch_indices
from qtcompress.data.model_call import check_call, select_output
from qtcompress.data.sources import InputSource
from qtcompress.errors import ConfigError, NonFiniteError

N = 10
X = torch.arange(N * 3, dtype=torch.float32).reshape(N, 3)
S = torch.arange(N * 2, dtype=torch.float32).reshape(N, 2) / 7
IDS = torch.arange(N * 5).reshape(N, 5)
MASK = torch.ones(N, 5, dtype=torch.int64)
Y = torch.arange(N) % 3


# -- tiny models and datasets -------------------------------------------------------------------
class StreamingRNN(nn.Module):
    """(x, state) -> (y, state)."""

    def __init__(self, features=28, hidden=16):
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x, state):
        h = torch.tanh(self.inp(x).mean(1) + state.mean(1))
        return self.out(h), torch.stack([h, h], 1)


class KeywordNet(nn.Module):
    """model(input_ids=..., attention_mask=...) -> {'logits', 'last_hidden_state'}."""

    def __init__(self, vocab=64, dim=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        pooled = self.norm(h.mean(1))
        return {"last_hidden_state": h, "logits": self.head(pooled)}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


class DictDataset(Dataset):
    def __init__(self, with_labels=False):
        self.with_labels = with_labels

    def __len__(self):
        return N

    def __getitem__(self, i):
        item = {"input_ids": IDS[i], "attention_mask": MASK[i]}
        if self.with_labels:
            item["labels"] = int(Y[i])
        return item


class ReIterable:
    """Each pass is a fresh generator of dict batches."""

    def __iter__(self):
        for i in range(0, N, 4):
            yield {"input_ids": IDS[i : i + 4], "attention_mask": MASK[i : i + 4]}


class Stream(IterableDataset):
    def __iter__(self):
        yield from X


def _flat(batch):
    """Comparable form of a batch: names and values of its tensors, plus labels."""
    return batch.named_tensors() + ([("labels", batch.labels)] if batch.labels is not None else [])


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert [n for n, _ in fa] == [n for n, _ in fb]
    for (name, ta), (_, tb) in zip(fa, fb, strict=True):
        assert torch.equal(ta, tb), name


POSITIONAL = Batch((X, S))
KEYWORD = Batch((), {"input_ids": IDS, "attention_mask": MASK})

FORMS = {
    "tensor": (lambda: X, {}, Batch((X,)), N),
    "tuple": (lambda: (X, S), {}, POSITIONAL, N),
    "list of tensors": (lambda: [X, S], {}, POSITIONAL, N),
    "dict": (lambda: {"input_ids": IDS, "attention_mask": MASK}, {}, KEYWORD, N),
    "tensor + labels": (lambda: X, {"labels": Y}, Batch((X,), {}, Y), N),
    "tuple with label last": (
        lambda: (X, S, Y),
        {"labels_in_items": True},
        Batch((X, S), {}, Y),
        N,
    ),
    "Batch": (lambda: Batch((X,), {"mask": MASK}, Y), {}, Batch((X,), {"mask": MASK}, Y), N),
    "TensorDataset": (lambda: TensorDataset(X, S), {}, POSITIONAL, N),
    "TensorDataset (x, y)": (
        lambda: TensorDataset(X, Y),
        {"labels_in_items": True},
        Batch((X,), {}, Y),
        N,
    ),
    "TensorDataset + labels": (lambda: TensorDataset(X), {"labels": Y}, Batch((X,), {}, Y), N),
    "dict Dataset": (lambda: DictDataset(), {}, KEYWORD, N),
    "dict Dataset with 'labels'": (
        lambda: DictDataset(True),
        {"labels_in_items": "labels"},
        Batch((), KEYWORD.kwargs, Y),
        N,
    ),
    "DataLoader (x, y)": (
        lambda: DataLoader(TensorDataset(X, Y), batch_size=4),
        {"labels_in_items": True},
        Batch((X,), {}, Y),
        N,
    ),
    "DataLoader of dicts": (lambda: DataLoader(DictDataset(), batch_size=3), {}, KEYWORD, N),
    "list of batches": (
        lambda: [(X[:4], S[:4]), (X[4:7], S[4:7]), (X[7:], S[7:])],
        {},
        POSITIONAL,
        N,
    ),
    "re-iterable of dict batches": (lambda: ReIterable(), {}, KEYWORD, None),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_input_form_gives_the_right_batches(form):
    make, kwargs, full, n = FORMS[form]
    source = InputSource.of(make(), **kwargs)
    assert source.n == n
    parts = list(source.batches(4))
    assert all(len(p) <= 4 for p in parts)
    assert sum(len(p) for p in parts) == N
    for k in (1, 3, 4, 7, N, N + 5):
        _assert_same(source.head(k), full.take(torch.arange(min(k, N))))
    # A second pass gives the same batches (re-iterable).
    for a, b in zip(parts, source.batches(4), strict=True):
        _assert_same(a, b)
    # Every pass, joined, is the whole data.
    offset = 0
    for p in parts:
        _assert_same(p, full.take(torch.arange(offset, offset + len(p))))
        offset += len(p)


@pytest.mark.parametrize(
    "form",
    ["tensor", "tuple", "dict", "TensorDataset (x, y)", "dict Dataset with 'labels'", "Batch"],
)
def test_batch_at_is_a_pure_function_of_step_batch_size_and_seed(form):
    make, kwargs, full, _ = FORMS[form]
    a, b = InputSource.of(make(), **kwargs), InputSource.of(make(), **kwargs)
    assert a.exact_resume
    for step in (0, 1, 2, 3, 7, 2, 0):
        idx = batch_indices(step, N, 4, seed=5)
        expected = full.take(idx)
        _assert_same(a.batch_at(step, 4, seed=5), expected)
        _assert_same(a.batch_at(step, 4, seed=5), b.batch_at(step, 4, seed=5))
    # One epoch (3 steps of <= 4) covers every example once; another seed, another order.
    seen = torch.cat([batch_indices(s, N, 4, seed=5) for s in range(3)])
    assert sorted(seen.tolist()) == list(range(N))
    assert not torch.equal(seen, torch.cat([batch_indices(s, N, 4, seed=6) for s in range(3)]))


def test_loaders_and_iterables_are_cycled_through():
    source = InputSource.of([(X[:4],), (X[4:],)])
    assert not source.exact_resume
    first, second = source.batch_at(0, 99, 0), source.batch_at(1, 99, 0)
    assert source.batch_at(1, 99, 0) is second  # the same step again: the same batch
    assert torch.equal(first.args[0], X[:4]) and torch.equal(second.args[0], X[4:])
    assert torch.equal(source.batch_at(2, 99, 0).args[0], X[:4])  # next pass
    loader = InputSource.of(DataLoader(TensorDataset(X, Y), batch_size=4), labels_in_items=True)
    sizes = [len(loader.batch_at(step, 4, 0)) for step in range(5)]
    assert sizes == [4, 4, 2, 4, 4]


def test_take_on_nested_positional_and_keyword_inputs_keeps_constants():
    h, c = torch.randn(N, 4), torch.randn(N, 4)
    temp = torch.tensor(2.0)
    batch = Batch((X, (h, c)), {"mask": MASK, "temperature": temp, "use_cache": False}, Y)
    idx = torch.tensor([7, 0, 3])
    sub = batch.take(idx)
    assert len(sub) == 3
    assert torch.equal(sub.args[0], X[idx])
    assert isinstance(sub.args[1], tuple)
    assert torch.equal(sub.args[1][0], h[idx]) and torch.equal(sub.args[1][1], c[idx])
    assert torch.equal(sub.kwargs["mask"], MASK[idx])
    assert sub.kwargs["temperature"] is temp and sub.kwargs["use_cache"] is False
    assert torch.equal(sub.labels, Y[idx])
    mask = torch.zeros(N, dtype=torch.bool)
    mask[2:5] = True
    assert len(batch.take(mask)) == 3
    assert batch.to("cpu").kwargs["use_cache"] is False
    assert torch.equal(batch.to("cpu").labels, Y)
    assert batch.call(lambda x, state, **kw: (x.shape[0], len(state), sorted(kw))) == (
        N,
        2,
        ["mask", "temperature", "use_cache"],
    )


@pytest.mark.parametrize(
    "batch, text",
    [
        (
            Batch((torch.zeros(64, 14, 28), torch.zeros(64, 2, 256))),
            "2 positional inputs (64x14x28 float32, 64x2x256 float32)",
        ),
        (Batch((torch.zeros(8, 3),)), "1 positional input (8x3 float32)"),
        (
            Batch(
                (),
                {
                    "input_ids": torch.zeros(64, 64, dtype=torch.int64),
                    "attention_mask": torch.zeros(64, 64, dtype=torch.int64),
                },
            ),
            "keyword inputs input_ids (64x64 int64), attention_mask (64x64 int64)",
        ),
        (
            Batch((torch.zeros(2, 3), (torch.zeros(1, 2), torch.zeros(1, 2))), {"flag": True}),
            "2 positional inputs (2x3 float32, (1x2 float32, 1x2 float32)) and keyword inputs "
            "flag True",
        ),
        (Batch(), "no inputs"),
    ],
)
def test_describe(batch, text):
    assert batch.describe() == text


def test_labels_from_argument_and_from_items():
    src = InputSource.of(X, labels=Y)
    assert torch.equal(src.batch_at(0, 4, 0).labels, Y[batch_indices(0, N, 4, 0)])
    assert InputSource.of(X).head(2).labels is None
    dl = InputSource.of(DataLoader(TensorDataset(X, S, Y), batch_size=5), labels_in_items=True)
    b = dl.head(5)
    assert len(b.args) == 2 and torch.equal(b.labels, Y[:5])
    pair = InputSource.of(DataLoader(TensorDataset(X, Y), batch_size=5)).head(5)
    assert len(pair.args) == 2 and pair.labels is None  # without the flag, y is an input


@pytest.mark.parametrize(
    "data, kwargs, error, match",
    [
        ((X, S[:8]), {}, ConfigError, r"differ in length along dim 0: args\[0\] 10, args\[1\] 8\."),
        (
            {"input_ids": IDS, "attention_mask": MASK[:3]},
            {},
            ConfigError,
            r"differ in length along dim 0: input_ids 10, attention_mask 3",
        ),
        (X, {"labels": Y[:7]}, ConfigError, r"have 10 examples but the labels have 7"),
        (
            TensorDataset(X),
            {"labels": Y[:7]},
            ConfigError,
            r"dataset has 10 examples but the labels have 7",
        ),
        (X[:0], {}, ConfigError, r"empty \(0 examples\)"),
        (torch.tensor(3.0), {}, ConfigError, r"no tensor with a batch dimension"),
        (
            {"input_ids": IDS, "attention_mask": MASK},
            {"labels_in_items": "labels"},
            ConfigError,
            r"must be a dict holding 'labels'",
        ),
        (X, {"labels_in_items": True}, ConfigError, r"not a single tensor; pass labels="),
        (
            TensorDataset(X),
            {"labels_in_items": True},
            ConfigError,
            r"must be a tuple or list \(inputs\.\.\., label\) of at least 2 elements; "
            r"got a list of "
            r"1 item\.$",
        ),
        (Batch((X,), {}, Y), {"labels": Y}, ConfigError, r"already holds labels"),
        (DataLoader(TensorDataset(X)), {"labels": Y}, ConfigError, r"cannot be aligned"),
        (X, {"labels": Y, "labels_in_items": True}, ConfigError, r"not both"),
        ((X, X.clone().fill_(float("nan"))), {}, NonFiniteError, r"NaN or Inf in args\[1\]"),
        (X, {"labels": torch.full((N,), float("inf"))}, NonFiniteError, r"NaN or Inf in labels"),
        (3, {}, ConfigError, r"Cannot use data of type int as model inputs; accepted: a tensor"),
        ("data.npz", {}, ConfigError, r"Cannot use data of type str as model inputs"),
        (X.numpy(), {}, ConfigError, r"ndarray.*torch\.from_numpy"),
        ((b for b in [X]), {}, ConfigError, r"generator can be read only once"),
        (Stream(), {}, ConfigError, r"IterableDataset yields single examples"),
        ([], {}, ConfigError, r"list of batches is empty"),
        (
            [(X[:4],), (S[:3], X[:2])],
            {},
            ConfigError,
            r"inputs of batch 1 differ in length along dim 0: args\[0\] 3, args\[1\] 2",
        ),
    ],
)
def test_bad_inputs_raise_one_line_errors(data, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        InputSource.of(data, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_batches_from_a_loader_are_reported_when_read():
    bad = [(X[:4], S[:3])]
    with pytest.raises(
        ConfigError, match=r"inputs of batch 0 differ in length along dim 0: .* 4, .* 3"
    ):
        InputSource.of(bad)
    src = InputSource.of(DataLoader(TensorDataset(X.clone().fill_(float("nan"))), batch_size=4))
    with pytest.raises(NonFiniteError, match=r"inputs of step 0 hold NaN or Inf"):
        src.batch_at(0, 4, 0)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        InputSource.of(X).batch_at(0, 0, 0)


# -- outputs ------------------------------------------------------------------------------------
A, B, C = torch.zeros(64, 1), torch.ones(64, 2, 256), torch.full((64, 3), 2.0)
Pair = namedtuple("Pair", ["state", "logits"])


@dataclass
class DataOut:
    loss: torch.Tensor | None
    last_hidden_state: torch.Tensor
    hidden: torch.Tensor


class FakeModelOutput(OrderedDict):
    """Like transformers.ModelOutput: a dict whose values are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Attrs:
    def __init__(self):
        self.scores = C
        self.extra = "x"


@pytest.mark.parametrize(
    "out, key, expected",
    [
        (A, None, A),
        ((A, B), None, A),
        ((None, B, C), None, B),
        ((A, B), 1, B),
        ((A, B), -1, B),
        ([A, B], 0, A),
        ({"hidden": B, "logits": C}, None, C),
        ({"hidden": B, "last_hidden_state": A}, None, A),
        ({"x": "text", "hidden": B, "other": C}, None, B),
        ({"hidden": B, "logits": C}, "hidden", B),
        ({"hidden": B, "logits": C}, 1, C),
        (FakeModelOutput(last_hidden_state=B, logits=C), None, C),
        (FakeModelOutput(last_hidden_state=B, logits=C), "last_hidden_state", B),
        (DataOut(None, A, B), None, A),
        (DataOut(None, A, B), "hidden", B),
        (DataOut(None, A, B), 2, B),
        (Pair(A, C), None, C),
        (Pair(A, C), "state", A),
        (Pair(A, C), 0, A),
        (Attrs(), None, C),
        (Attrs(), "scores", C),
    ],
)
def test_select_output(out, key, expected):
    assert select_output(out, key) is expected


@pytest.mark.parametrize(
    "out, key, match",
    [
        (
            (A, B),
            5,
            r"output=5 is not in the model output; output is a tuple of "
            r"\(Tensor 64x1, Tensor 64x2x256\); pass output=0 or 1\.",
        ),
        ((A, B), "logits", r"output='logits' is not in .* pass output=0 or 1"),
        (
            (A, "meta"),
            1,
            r"output=1 is str, not a tensor; output is a tuple of "
            r"\(Tensor 64x1, str\); pass output=0\.",
        ),
        (
            {"loss": None, "text": "hi"},
            None,
            r"holds no tensor; output is a dict with loss \(None\), "
            r"text \(str\); it holds no tensor",
        ),
        ({"hidden": B, "logits": C}, "scores", r"pass output='hidden' or 'logits'"),
        (
            DataOut(None, A, B),
            "loss",
            r"output='loss' is None, not a tensor; output is a DataOut "
            r"with loss \(None\), last_hidden_state \(Tensor 64x1\), "
            r"hidden \(Tensor 64x2x256\); pass output='last_hidden_state' "
            r"or 'hidden'",
        ),
        (A, "logits", r"output='logits' selects nothing: output is a Tensor 64x1"),
        (3.5, None, r"holds no tensor; output is a float"),
        ((A,), True, r"output must be a name or an index"),
    ],
)
def test_select_output_errors_list_what_the_output_holds(out, key, match):
    with pytest.raises(ConfigError, match=match):
        select_output(out, key)


# -- calling ------------------------------------------------------------------------------------
def test_check_call_names_the_signature_when_an_input_is_missing():
    model = StreamingRNN()
    batch = Batch((torch.zeros(8, 14, 28),))
    with pytest.raises(
        ConfigError,
        match=r"^StreamingRNN\.forward\(x, state\) cannot take 1 "
        r"positional input \(8x14x28 float32\): missing a "
        r"required argument: 'state'\.$",
    ):
        check_call(model, batch)


def test_check_call_turns_shape_errors_into_config_errors():
    with pytest.raises(
        ConfigError,
        match=r"^MLP\.forward\(x\) cannot take 1 positional input "
        r"\(4x5 float32\): RuntimeError: mat1 and mat2",
    ):
        check_call(MLP(), Batch((torch.zeros(4, 5),)))
    with pytest.raises(
        ConfigError,
        match=r"too many positional arguments \(if the last input "
        r"is the label, pass labels_in_items=True\)",
    ):
        check_call(MLP(), InputSource.of(TensorDataset(X, Y)).head(4))
    with pytest.raises(
        ConfigError,
        match=r"KeywordNet\.forward\(input_ids, attention_mask=None\)"
        r" cannot take keyword inputs input_ids \(4x5 int64\), "
        r"mask \(4x5 int64\): got an unexpected keyword "
        r"argument 'mask'",
    ):
        check_call(KeywordNet(), Batch((), {"input_ids": IDS[:4], "mask": MASK[:4]}))


def test_check_call_runs_a_keyword_model_without_touching_its_state():
    model = KeywordNet().train()
    stats = model.norm.running_mean.clone()
    out = check_call(model, InputSource.of(DictDataset()).head(4))
    assert select_output(out).shape == (4, 3)
    assert torch.equal(select_output(out), out["logits"])
    assert model.training and model.norm.training  # mode restored
    assert torch.equal(model.norm.running_mean, stats)  # eval mode: statistics untouched
    assert not out["logits"].requires_grad  # no grad


def test_check_call_runs_a_stateful_model_and_the_output_is_selectable():
    model = StreamingRNN()
    source = InputSource.of((torch.randn(N, 14, 28), torch.randn(N, 2, 16)))
    out = check_call(model, source.head(8))
    y, state = out
    assert select_output(out) is y and y.shape == (8, 1)
    assert select_output(out, 1) is state and state.shape == (8, 2, 16)


def test_pieces_compose_into_a_training_step():
    model = KeywordNet()
    source = InputSource.of(DataLoader(DictDataset(True), batch_size=4), labels_in_items="labels")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        batch = source.batch_at(step, 4, seed=0)
        loss = nn.functional.cross_entropy(select_output(batch.call(model)), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.head.weight.grad is not None
