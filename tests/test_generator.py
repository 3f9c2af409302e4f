import math

import pytest
import torch

from qtcompress.api import compress
from qtcompress.config import QTConfig
from qtcompress.errors import ConfigError
from qtcompress.experimental.mps import MPSMapping
from qtcompress.generator import QTGenerator
from qtcompress.mapping import signed_bits, transform_probs
from qtcompress.qnn import bit_matrix
from qtcompress.targets import select_targets
from tests.tiny_models import (
    ALL_MODELS,
    TiedLM,
    TinyCNN,
    TinyConv1d,
    TinyMLP,
    example_input,
)


def _generator(model, **kw):
    layout = select_targets(model)
    gen = QTGenerator(layout, **kw)
    gen.init_affine(layout.flatten(dict(model.named_parameters())))
    return gen


def test_m_not_power_of_two_sizes_and_counts():
    model = TinyCNN()  # M = 1946
    gen = _generator(model, n_layers=2)
    assert gen.total == 1946 and gen.n_qubits == 11 and gen.n_states == 1946
    w = gen.generate()
    assert w.shape == (1946,) and w.dtype == torch.float32 and torch.isfinite(w).all()
    gen4 = _generator(model, chunk=4, n_layers=2)
    assert gen4.n_states == math.ceil(1946 / 4) and gen4.n_qubits == 9
    c = gen4.parameter_counts()
    assert c["qnn"] == 9 * 2 and c["affine"] == 2 * len(gen4.layout.specs)
    assert c["total"] == sum(p.numel() for p in gen4.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="8 qubits give 256 states x chunk 4 < M=1946"):
        _generator(model, chunk=4, n_qubits=8)  # 256 * 4 < 1946
    with pytest.raises(ConfigError, match="chunk must be >= 1, got 0"):
        _generator(model, chunk=0)


def test_signed_bits_match_qnn_basis_convention():
    bits = signed_bits(5, 3, 20)
    ref = torch.from_numpy(bit_matrix(5, 20)[3:]).float()
    assert torch.equal(bits, 1 - 2 * ref)


def test_chunked_streaming_equals_full_generation_values_and_gradients():
    model = TinyCNN()
    full = _generator(model, chunk=8, n_layers=2, seed=3)
    small = _generator(model, chunk=8, n_layers=2, seed=3, block_states=7)  # 35 blocks
    small.load_state_dict(full.state_dict())
    w_full, w_small = full.generate(), small.generate()
    assert torch.allclose(w_full, w_small, atol=1e-6)
    streamed = torch.cat([b for _, b in small.iter_blocks(5)])
    assert streamed.shape == (full.total,) and torch.allclose(streamed, w_full, atol=1e-6)
    starts = [s for s, _ in small.iter_blocks(5)]
    assert starts[:2] == [0, 5 * 8]
    target = torch.linspace(-1, 1, full.total)
    (w_full * target).sum().backward()
    (w_small * target).sum().backward()
    for (n, a), (_, b) in zip(full.named_parameters(), small.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), n


def test_init_affine_sets_tensor_statistics_and_constant_tensors_exact():
    model = TinyMLP()  # LayerNorm weight (ones) and bias (zeros) are constant tensors
    gen = _generator(model, chunk=2, n_layers=2)
    t = gen.generate_named()
    assert torch.equal(t["net.1.weight"], torch.ones(16))
    assert torch.equal(t["net.1.bias"], torch.zeros(16))
    w0 = model.net[0].weight
    assert torch.isclose(gen.offset[0], w0.mean(), atol=1e-6)
    assert torch.isclose(gen.scale[0], w0.std(unbiased=False), atol=1e-6)
    # Standardised outputs: every generated tensor has its pretrained mean and std exactly.
    for name, p in model.named_parameters():
        g = t[name].detach()
        assert torch.isclose(g.mean(), p.mean(), atol=1e-5), name
        assert torch.isclose(g.std(), p.std(), atol=1e-4, rtol=1e-3), name
    plain = _generator(model, chunk=2, n_layers=2, standardize=False)
    assert not torch.isclose(plain.generate_named()["net.0.weight"].std(), w0.std(), rtol=1e-2)


def test_gradients_reach_qnn_and_mapping_and_classical_control_cuts_qnn():
    model = TinyConv1d()
    gen = _generator(model, n_layers=2)
    gen.generate().pow(2).sum().backward()
    assert gen.qnn.angles.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.mapping.parameters())
    ctrl = _generator(model, n_layers=2, prob_transform="none")
    ctrl.generate().pow(2).sum().backward()
    g = ctrl.qnn.angles.grad
    assert g is None or g.abs().sum() == 0


@pytest.mark.parametrize("kind", ["scaled", "paper", "log", "none"])
def test_prob_transforms_finite_and_order_one(kind):
    p = torch.rand(64)
    p = p / p.sum()
    x = transform_probs(p, 6, kind)
    assert x.shape == (64,) and torch.isfinite(x).all() and x.abs().max() < 50
    with pytest.raises(ConfigError, match="Unknown prob_transform 'bogus'"):
        transform_probs(p, 6, "bogus")


def test_mps_mapping_generates_and_trains():
    model = TinyMLP()
    gen = _generator(model, chunk=4, n_layers=2, mapping="mps", bond_dim=3)
    assert isinstance(gen.mapping, MPSMapping)
    assert gen.parameter_counts()["mapping"] == gen.n_qubits * 2 * 9 + 3 + 3 * 2 * 4
    w = gen.generate()
    assert w.shape == (gen.total,) and torch.isfinite(w).all()
    w.sum().backward()
    assert gen.mapping.sites.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", ALL_MODELS)
def test_every_layer_type_runs_functionally_and_materializes(cls):
    model = cls().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = example_input(model)
    qt = compress(model, QTConfig(scheme="rows", n_layers=2, hidden=(8,)))
    out = qt(x)
    ref = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()  # gradients flow through the model's own forward
    assert qt.generator.qnn.angles.grad is not None
    mat = qt.materialize()
    assert mat is not model and type(mat) is cls
    with torch.no_grad():
        assert torch.allclose(mat(x), qt(x), atol=1e-5)
    # The user's module is untouched.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # With the exact pretrained weights the functional path reproduces the model.
    exact = qt.layout.split(qt.pretrained)
    with torch.no_grad():
        assert torch.allclose(qt.functional(x, generated=exact), ref, atol=1e-5)


def test_materialize_keeps_ties_buffers_and_mode():
    model = TiedLM().train()
    qt = compress(model, QTConfig(scheme="rows", n_layers=1, hidden=(4,)))
    mat = qt.materialize()
    assert mat.out.weight is mat.embed.weight and mat.training
    cnn = TinyCNN()
    cnn.bn1.running_mean.fill_(0.5)
    mat = compress(cnn.eval(), QTConfig(scheme="rows", n_layers=1)).materialize()
    assert torch.equal(mat.bn1.running_mean, torch.full((8,), 0.5)) and not mat.training
    assert all(p.requires_grad for p in mat.parameters())


@pytest.mark.parametrize("cls", [TiedLM, TinyCNN])
def test_private_copy_is_built_on_the_pretrained_vector_not_copied(cls, monkeypatch):
    # compress() at 1e8 weights peaked at one more copy of the weights while the private copy
    # was deep-copied and then re-pointed at `pretrained`; it is now built on views of it.
    model = cls()
    copied: list[int] = []
    deepcopy = torch.nn.Parameter.__deepcopy__

    def counting(self, memo):
        copied.append(id(self))
        return deepcopy(self, memo)

    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", counting)
    qt = compress(model, QTConfig(scheme="rows", n_layers=1, hidden=(4,)))
    generated = {id(p) for n, p in model.named_parameters() if n in qt.layout.names()}
    assert generated and not generated & set(copied)  # no generated parameter was copied
    start = qt.pretrained.data_ptr()
    end = start + qt.pretrained.numel() * qt.pretrained.element_size()
    named = dict(qt.functional.module.named_parameters(remove_duplicate=False))
    user = dict(model.named_parameters(remove_duplicate=False))
    for s in qt.layout.specs:
        for n in s.names:
            assert start <= named[n].data_ptr() < end, n
            assert not named[n].requires_grad and named[n] is not user[n]
            assert torch.equal(named[n], user[n])
            assert not start <= user[n].data_ptr() < end  # the user's model keeps its own
    if cls is TiedLM:
        assert qt.functional.module.out.weight is qt.functional.module.embed.weight


def test_report_counts_match_generator():
    model = TinyCNN()
    qt = compress(model, QTConfig(scheme="rows", hidden=(8, 8), n_layers=3, exclude=("head",)))
    rep = qt.report()
    assert rep.generated_weights == qt.layout.total == 1946 - 16 * 4 * 10 - 10
    assert rep.classical == 16 * 4 * 10 + 10
    assert rep.trainable == rep.qnn + rep.mapping + rep.affine
    assert rep.trainable == sum(p.numel() for p in qt.generator.parameters())
    assert 0 < rep.ratio < 1 and "generated weights" in str(rep)


@pytest.mark.parametrize("scheme", ["rows", "flat"])
def test_the_three_ways_to_regenerate_agree(scheme):
    # generate() (flat, with gradients), generate_named() (by name, with gradients) and
    # generate_detached() (by name, streamed, no gradients) give the same weights; materialize()
    # writes exactly the detached stream into the model copy.
    torch.manual_seed(0)
    model = TiedLM()
    qt = compress(model, QTConfig(scheme=scheme, n_layers=1))
    gen = qt.generator
    flat = gen.generate()
    named = gen.generate_named()
    detached = gen.generate_detached()
    assert set(detached) == {s.name for s in qt.layout.specs}  # canonical names only
    assert set(named) == {n for s in qt.layout.specs for n in s.names}  # aliases too
    assert flat.requires_grad and all(named[n].requires_grad for n in detached)
    assert not any(t.requires_grad for t in detached.values())
    split = qt.layout.split(flat.detach())
    for s in qt.layout.specs:
        torch.testing.assert_close(detached[s.name], split[s.name], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(detached[s.name], named[s.name].detach(), rtol=1e-6, atol=1e-6)
    params = dict(qt.materialize().named_parameters(remove_duplicate=False))
    for name, tensor in detached.items():
        assert torch.equal(params[name].detach(), tensor)
