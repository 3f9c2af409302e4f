"""The fast step paths compute what the plain formulation computes (issue 12).

Phase 1 of the rows scheme is evaluated tensor by tensor (and, above ``STREAM_WEIGHTS``, with
each tensor recomputed in the backward pass) instead of on one concatenated ``(M,)`` vector with
an ``(M,)`` factor vector. The sum runs in another order, so values and gradients match the
plain autograd reference to float32 rounding (1e-6 relative), not bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtcompress import QTConfig, compress
from qtcompress.errors import ConfigError
from qtcompress.generator import weight_loss as losses
from qtcompress.generator.weight_loss import (
    row_weight_loss,
    tensor_normalisers,
    tensor_scales,
    weight_loss,
)
from qtcompress.train.loop import LoopConfig, make_adam, train_loop
from qtcompress.train.weight_fit import relative_errors


def _qt():  # a few tensors of different shapes, vectors included
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(3, 8, 5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 12, 20),
        nn.Tanh(),
        nn.Linear(20, 4),
    )
    qt = compress(model, QTConfig(scheme="rows", n_layers=2, budget=0.5, seed=1))
    with torch.no_grad():  # move away from the least-squares optimum: non-zero gradients
        for p in qt.generator.heads:
            p.add_(0.1 * torch.randn_like(p))
    return qt


def _grads(gen: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in gen.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # rank-0 heads: unused
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@pytest.mark.parametrize("stream", [False, True])
def test_row_weight_loss_matches_the_flat_reference(monkeypatch, stream: bool) -> None:
    qt = _qt()
    gen, target = qt.generator, qt.pretrained
    reference = weight_loss(gen.generate(), target, tensor_normalisers(gen, target))
    ref_grads = _grads(gen, reference)
    if stream:
        monkeypatch.setattr(losses, "STREAM_WEIGHTS", 0)  # checkpoint every tensor's term
    loss = row_weight_loss(gen, target, tensor_scales(gen, target))
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    for got, want in zip(_grads(gen, loss), ref_grads, strict=True):
        if want.numel() == 0:  # a rank-0 head
            continue
        scale = float(want.abs().max()) + 1e-30
        assert float((got - want).abs().max()) / scale < 1e-6


def test_relative_errors_match_the_concatenated_reference() -> None:
    qt = _qt()
    gen, target = qt.generator, qt.pretrained
    got = relative_errors(gen, target)
    with torch.no_grad():
        w = gen.generate()
    assert got["_total"] == pytest.approx(float((w - target).norm() / target.norm()), rel=1e-6)
    for s in gen.layout.specs:
        a, b = w[s.offset : s.offset + s.numel], target[s.offset : s.offset + s.numel]
        assert got[s.name] == pytest.approx(float((a - b).norm() / b.norm()), rel=1e-6)


def test_fused_adam_takes_the_same_steps_as_the_loop_to_rounding() -> None:
    torch.manual_seed(0)
    holder = nn.ParameterList([nn.Parameter(torch.randn(5, 7)), nn.Parameter(torch.randn(7))])
    params = list(holder)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    fused = make_adam(holder, LoopConfig(steps=10, lr=1e-2))
    plain = torch.optim.Adam(twins, lr=1e-2)
    assert fused.defaults["fused"] is True
    for _ in range(10):
        for group in (params, twins):
            for p in group:
                p.grad = torch.sin(p.detach() * 3)
        fused.step()
        plain.step()
    for a, b in zip(params, twins, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_source_can_take_its_own_multiple_of_the_rate() -> None:
    class Gen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.source = nn.Linear(3, 2)  # e.g. a QNN's angles
            self.affine = nn.Parameter(torch.ones(4))  # scales and exact vectors

    gen = Gen()
    one = make_adam(gen, LoopConfig(steps=10, lr=1e-2))
    assert [len(g["params"]) for g in one.param_groups] == [3]
    two = make_adam(gen, LoopConfig(steps=10, lr=1e-2, source_lr_factor=0.3))
    assert [(len(g["params"]), g["factor"]) for g in two.param_groups] == [(1, 1.0), (2, 0.3)]
    assert two.param_groups[1]["params"][0] is gen.source.weight
    with pytest.raises(ConfigError, match="source_lr_factor must be positive and finite"):
        LoopConfig(source_lr_factor=0.0)
    # Adam's first step moves every parameter by its group's rate (the sign of its gradient).
    before = {n: p.detach().clone() for n, p in gen.named_parameters()}
    cfg = LoopConfig(steps=1, lr=1e-2, schedule="constant", source_lr_factor=0.3)
    train_loop(gen, lambda _step: sum(p.sum() for p in gen.parameters()), cfg, progress=False)
    for name, p in gen.named_parameters():
        moved = (before[name] - p.detach()).abs()
        want = 0.3e-2 if name.startswith("source.") else 1e-2
        torch.testing.assert_close(moved, torch.full_like(moved, want), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("shape", [(600, 500), (500, 600)])
@pytest.mark.parametrize("block", [None, 1000])
def test_big_tensors_spectrum_from_randomised_svd_matches_exact(monkeypatch, shape, block):
    # compress() at 1e8 weights spent most of its time in exact svdvals of 7,000 x 7,000
    # layers; past EXACT_SPECTRUM_WEIGHTS only the needed leading values are estimated, on the
    # float32 tensor itself (centring as a rank-one correction, float64 in column blocks).
    import qtcompress.generator.ranks as generator_module

    gen = torch.Generator().manual_seed(0)
    rows, cols = shape
    u, v = torch.randn(rows, 40, generator=gen), torch.randn(40, cols, generator=gen)
    w = (u * torch.logspace(0, -2, 40)) @ v + 1e-3 * torch.randn(rows, cols, generator=gen)
    w += 3.0 * torch.randn(cols, generator=gen)  # column means the head's bias holds
    exact = generator_module.spectrum_gains(w.reshape(-1), shape, 20)
    monkeypatch.setattr(generator_module, "EXACT_SPECTRUM_WEIGHTS", 1000)
    if block is not None:
        monkeypatch.setattr(generator_module, "_PROJECTION_BLOCK", block)
    estimated = generator_module.spectrum_gains(w.reshape(-1), shape, 20)
    assert torch.count_nonzero(estimated[21:]) == 0  # past `need`: never read, not computed
    assert torch.allclose(estimated[:21], exact[:21], rtol=1e-6, atol=1e-12)
    assert float(exact[:21].sum()) > 0.99  # the leading values hold the variance


def test_blocked_moments_match_the_whole_tensor_float64_ones(monkeypatch) -> None:
    # Phase 1's per-tensor scales: above MOMENT_BLOCK weights the moments come from float64
    # blocks (bounded memory); they must equal the whole-tensor float64 ones to rounding.
    torch.manual_seed(0)
    part = torch.randn(10_007) * 0.02 + 3.0  # a large mean: the case where E[x^2]-E[x]^2 fails
    whole = part.double()
    want = (float(whole.var(unbiased=False)), float((whole**2).mean()))
    assert losses._moments(part) == want  # one piece: exactly as before
    monkeypatch.setattr(losses, "MOMENT_BLOCK", 1000)
    got = losses._moments(part)
    assert got[0] == pytest.approx(want[0], rel=1e-9)
    assert got[1] == pytest.approx(want[1], rel=1e-12)
