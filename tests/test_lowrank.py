"""Linear layers on the generator's low-rank factors (qtcompress/lowrank.py, issue 12).

The factored product sums in a different order than the dense one, so values agree to float
rounding, not bit for bit: float64 factors pin the math to 1e-12, float32 steps to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from qtcompress import QTConfig, compress
from qtcompress.lowrank import LowRankWeight


def factors(
    rows: int, cols: int, k: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    return tuple(
        torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()
        for shape in ((rows, k), (k, cols), (cols,))
    )


def grads(out: torch.Tensor, leaves: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out.square().sum(), leaves))


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    a, b = a.detach(), b.detach()
    assert float((a - b).abs().max()) <= tol * max(1e-30, float(b.abs().max()))


@pytest.mark.parametrize(("batch_shape", "bias"), [((64,), True), ((3, 5), False), ((1,), True)])
def test_factored_linear_equals_dense_in_values_and_gradients(batch_shape, bias):
    h, a, b = factors(40, 30, 4)
    x = torch.randn(*batch_shape, 30, dtype=torch.float64)
    lin_bias = torch.randn(40, dtype=torch.float64) if bias else None
    w = LowRankWeight(h, a, b, (40, 30))
    out = F.linear(x, w, lin_bias)
    assert w._dense is None  # ran on the factors: nothing materialised
    ref = F.linear(x, torch.addmm(b, h, a), lin_bias)
    assert_close_rel(out, ref, 1e-12)
    for g, r in zip(grads(out, (h, a, b)), grads(ref, (h, a, b)), strict=True):
        assert_close_rel(g, r, 1e-12)


def test_dense_path_when_factors_cost_more():
    # A 4x4 layer at rank 3 and batch 1000: the factored product costs more than W itself.
    h, a, b = factors(4, 4, 3)
    w = LowRankWeight(h, a, b, (4, 4))
    x = torch.randn(1000, 4, dtype=torch.float64)
    out = F.linear(x, w)
    assert w._dense is not None
    assert_close_rel(out, x @ torch.addmm(b, h, a).T, 1e-12)


def test_metadata_does_not_materialise_and_other_uses_see_the_dense_tensor():
    h, a, b = factors(6, 5, 2)
    w = LowRankWeight(h, a, b, (6, 5))
    assert (w.shape, w.dtype, w.device, w.ndim, w.size(), w.dim(), w.numel(), len(w)) == (
        torch.Size([6, 5]),
        torch.float64,
        torch.device("cpu"),
        2,
        torch.Size([6, 5]),
        2,
        30,
        6,
    )
    assert w._dense is None
    dense = torch.addmm(b, h, a)
    assert torch.equal(w.T, dense.T)
    assert torch.equal(w * 2, dense * 2)
    assert torch.equal(F.embedding(torch.tensor([0, 5, 2]), w), dense[[0, 5, 2]])
    assert w.requires_grad  # the dense tensor's: it is differentiable in the factors
    assert "rank=2" in repr(w)


@pytest.mark.parametrize("kind", ["mha", "lstm"])
def test_modules_that_take_weights_apart_get_the_dense_tensor(kind):
    # MultiheadAttention and LSTM never call F.linear on the module's weight directly.
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    if kind == "mha":
        module: nn.Module = nn.MultiheadAttention(16, 2, batch_first=True)
        name, shape, inputs = "in_proj_weight", (48, 16), (x, x, x)
    else:
        module = nn.LSTM(16, 8, batch_first=True)
        name, shape, inputs = "weight_ih_l0", (32, 16), (x,)
    h, a, b = factors(*shape, 4, torch.float32)
    lowrank = functional_call(module, {name: LowRankWeight(h, a, b, shape)}, inputs)[0]
    dense = functional_call(module, {name: torch.addmm(b, h, a)}, inputs)[0]
    assert torch.equal(lowrank, dense)


def test_training_step_gradients_match_the_dense_step():
    # The fine-tuning path (FunctionalModel, factored by default) against the same step with
    # every weight materialised first: the generator's gradients agree to float32 rounding.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10)
    ).eval()
    x = torch.randn(32, 64)
    qt = compress(model, QTConfig(scheme="rows", n_layers=2))
    gen, fm = qt.generator, qt.functional
    factored = gen.generate_named(factored=True)
    assert any(isinstance(t, LowRankWeight) for t in factored.values())
    goal = torch.randn(32, 10)  # far from the student's outputs: gradients well above rounding
    results = []
    for generated in (None, gen.generate_named()):  # None: the default, factored
        gen.zero_grad(set_to_none=True)
        loss = (fm(x, generated=generated) - goal).square().mean()
        loss.backward()
        results.append(
            (
                loss.detach(),
                torch.cat([p.grad.reshape(-1) for p in gen.parameters() if p.grad is not None]),
            )
        )
    (loss_f, grads_f), (loss_d, grads_d) = results
    assert_close_rel(loss_f, loss_d, 1e-6)
    assert grads_f.shape == grads_d.shape and grads_d.abs().max() > 1e-3
    assert float((grads_f - grads_d).norm() / grads_d.norm()) < 1e-5


def test_exported_and_saved_weights_are_dense():
    # Only the training step sees wrappers: materialising gives ordinary parameters.
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4)).eval()
    student = compress(model, QTConfig(scheme="rows", n_layers=1)).materialize()
    assert all(
        type(p) is nn.Parameter and type(p.data) is torch.Tensor for p in student.parameters()
    )
