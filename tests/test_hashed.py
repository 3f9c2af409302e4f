"""The hashed scheme: sizes from the budget, the weight formula, controls, files, distillation."""

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from qtcompress import QTConfig, compress, load
from qtcompress.errors import ConfigError
from qtcompress.generator.hashed import HashedGenerator, hash_codes
from qtcompress.generator.ranks import row_view
from qtcompress.generator.values import MPSValues


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).eval()  # 85,002 weights, 522 in biases


def test_hash_codes_are_fixed_integers():
    # Golden values: pure 32-bit integer arithmetic, the same on every platform and torch.
    assert hash_codes(0, 0, 12, 16).tolist() == [0, 7, 8, 21, 17, 2, 24, 3, 19, 11, 4, 12]
    assert hash_codes(7, 3, 12, 1000).tolist() == [
        1572,
        99,
        1186,
        1349,
        614,
        1882,
        1647,
        1566,
        1838,
        1070,
        720,
        421,
    ]
    codes = hash_codes(0, 1, 100_000, 64)
    assert codes.min() >= 0 and codes.max() < 128
    # Buckets and signs are spread evenly (a bad mix would pile weights into a few values).
    counts = torch.bincount(codes, minlength=128).float()
    assert counts.std() / counts.mean() < 0.15
    assert abs(float((codes >= 64).float().mean()) - 0.5) < 0.01


@pytest.mark.parametrize("budget", [0.05, 0.005])
def test_budget_sizes_the_generator(budget):
    model = mlp()
    qt = compress(model, QTConfig(scheme="hashed", budget=budget))
    cfg, g, m = qt.config, qt.generator, qt.layout.total
    assert isinstance(g, HashedGenerator) and cfg.allowance is not None
    counts = g.parameter_counts()
    assert counts["total"] <= budget * m
    assert counts["qnn"] == cfg.n_qubits * cfg.n_layers <= cfg.allowance
    assert g.buckets == 2**cfg.n_qubits
    # 522 bias values fit half of 4,250 parameters, not half of 425: then they are hashed too.
    assert cfg.hashed_vectors is (budget == 0.005)
    with pytest.raises(ConfigError, match="below the smallest hashed generator for this model"):
        compress(model, QTConfig(scheme="hashed", budget=10))


def test_weights_follow_the_formula_and_start_with_the_pretrained_spread():
    model = mlp()
    qt = compress(model, QTConfig(scheme="hashed", budget=0.05))
    g = qt.generator
    assert isinstance(g, HashedGenerator) and g.row_scales and not g.hashed_vectors
    values = g.source().detach()
    named = dict(model.named_parameters())
    out = g.generate_detached()
    for t, s in enumerate(qt.layout.specs):
        rows, cols = row_view(s.shape)
        if rows == 1:  # exact vectors
            assert torch.equal(out[s.name], named[s.name].detach())
            continue
        codes = hash_codes(qt.config.seed, t, s.numel, g.buckets)
        sign = 1.0 - 2.0 * (codes >= g.buckets).float()
        expect = sign * values[codes % g.buckets]
        start, n = g._scale_at[t]  # the tensor's scales in the one flat ``affine``
        expect = expect.view(rows, cols) * g.affine.detach()[start : start + n][:, None]
        torch.testing.assert_close(out[s.name].view(rows, cols), expect, rtol=0, atol=1e-6)
        # Every row has the pretrained row's RMS, so no layer starts shrunk (dead).
        want = named[s.name].detach().view(rows, cols).pow(2).mean(1).sqrt()
        torch.testing.assert_close(expect.pow(2).mean(1).sqrt(), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("values", ["qnn", "table", "mps", "frozen", "zeros"])
def test_every_source_round_trips_through_the_file(tmp_path, values):
    model = mlp()
    qt = compress(model, QTConfig(scheme="hashed", budget=0.005, values=values, seed=3))
    qt.fit_weights(steps=3, progress=False)
    counts = qt.generator.parameter_counts()
    allowance = qt.config.allowance or 0
    source = counts["qnn"] + counts["mapping"]
    expected = {"qnn": (1, allowance), "table": (allowance, allowance), "mps": (1, allowance)}
    lo, hi = expected.get(values, (0, 0))
    assert lo <= source <= hi
    path = qt.save(tmp_path / "g.qtc.safetensors")
    stored = load(path)
    assert stored.config == qt.config
    assert stored.verify_weights().identical
    before = qt.generator.generate_detached()
    after = stored.generator.generate_detached()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = load(path, model)
    assert all(torch.equal(before[k], v) for k, v in again.generator.generate_detached().items())


def test_mps_probabilities_are_the_contracted_products():
    src = MPSValues(3, 2, seed=1)
    values = src().detach()
    cores, left = src.cores.detach(), src.left.detach()
    amps = []
    for b in range(8):
        bits = [(b >> (2 - k)) & 1 for k in range(3)]  # site 0 is the most significant bit
        vec = left
        for k, bit in enumerate(bits):
            vec = vec @ cores[k, bit]
        amps.append(float(vec.sum()))
    p = torch.tensor(amps) ** 2
    torch.testing.assert_close(values, p / p.sum() * 8 - 1, rtol=1e-5, atol=1e-6)
    assert math.isclose(float(values.sum()), 0.0, abs_tol=1e-5)


def test_fields_of_another_scheme_are_refused():
    model = mlp()
    with pytest.raises(ConfigError, match="The hashed scheme does not use hidden \\(rows/flat\\)"):
        compress(model, QTConfig(scheme="hashed", budget=0.01, hidden=(8,)))
    with pytest.raises(ConfigError, match="The rows scheme does not use values \\(hashed\\)"):
        compress(model, QTConfig(scheme="rows", values="table"))
    with pytest.raises(ConfigError, match="Unknown value source 'nope'"):
        compress(model, QTConfig(scheme="hashed", budget=0.01, values="nope"))


@pytest.mark.slow
def test_a_half_percent_generator_distils_a_digits_mlp():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    model = mlp().train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:1400]), y[:1400]).backward()
        opt.step()
    model.eval()
    qt = compress(model, QTConfig(scheme="hashed", budget=0.005))
    start = qt.evaluate(x[1400:]).headline
    qt.finetune(x[:1400], steps=150, lr=1e-2, progress=False)
    fid = qt.evaluate(x[1400:])
    assert not fid.degenerate
    assert fid.headline >= 0.85 and fid.headline > start + 0.3


def _digits_split():
    from qtcompress.examples import Split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return Split(x[:1200], y[:1200], x[1200:], y[1200:])


@pytest.mark.slow
def test_min_fidelity_without_budget_searches_the_smallest_generator(tmp_path):
    from qtcompress.pipeline import PipelineSettings, run_pipeline

    model = mlp()  # untrained: the student only has to follow its outputs
    settings = PipelineSettings(fit_steps=0, finetune_steps=60, min_fidelity=0.5)
    logged: list[str] = []
    r = run_pipeline(
        model, QTConfig(), _digits_split(), tmp_path / "a", settings=settings, log=logged.append
    )
    assert r.search and r.search[-1]["reached"] and not any(p["reached"] for p in r.search[:-1])
    assert r.search[-1]["validation_fidelity"] >= 0.5
    assert r.scheme == "hashed" and r.generator_params == r.search[-1]["generator_params"]
    assert any("validation split" in line for line in logged)
    assert (tmp_path / "a" / "model.qtc.safetensors").is_file()
    # An unreachable target keeps the best point, writes its files and says the run failed.
    settings = PipelineSettings(fit_steps=0, finetune_steps=10, min_fidelity=1.0, time_limit=0.0)
    r = run_pipeline(model, QTConfig(), _digits_split(), tmp_path / "b", settings=settings)
    assert len(r.search) == 1 and not r.search[0]["reached"]  # the time limit stopped it
    assert r.fidelity_ok is False and (tmp_path / "b" / "model.onnx").is_file()
    # With a budget, --min-fidelity stays a check.
    r = run_pipeline(
        model,
        QTConfig(scheme="hashed", budget=0.01),
        _digits_split(),
        tmp_path / "c",
        settings=PipelineSettings(fit_steps=0, finetune_steps=5, min_fidelity=0.1),
    )
    assert r.search == []


def test_a_budget_the_generator_cannot_spend_is_said():
    from qtcompress.data.sources import InputSource
    from qtcompress.pipeline import PipelineSettings, train_generator

    model = torch.nn.Sequential(torch.nn.Linear(400, 300), torch.nn.Tanh(), torch.nn.Linear(300, 4))
    x = InputSource.of(torch.randn(32, 400))
    logged: list[str] = []
    settings = PipelineSettings(fit_steps=0, finetune_steps=0, storage="float32")
    trained = train_generator(model, QTConfig(budget=0.5), x, x, settings, logged.append)
    assert trained.unspent.startswith("the generator uses ")
    assert "of the 60,752 parameters its budget allows" in trained.unspent  # M = 121,504
    assert any(line.startswith("note: the generator uses") for line in logged)
    small = train_generator(model, QTConfig(), x, x, settings, logged.append)
    assert small.unspent == ""  # the default budget is spent


def test_models_that_carry_state_get_the_hashed_schemes_lower_default_rate():
    from qtcompress.generator.registry import get_scheme
    from tests.tiny_models import TinyGRU

    hashed, rows = get_scheme("hashed"), get_scheme("rows")
    assert hashed.default_lr() == (1e-2, "the hashed scheme's default")
    assert hashed.default_lr(stateful=True) == (
        3e-3,
        "the hashed scheme's rate for a model that carries state",
    )
    assert rows.default_lr(stateful=True) == (rows.finetune_lr, "the rows scheme's default")
    # A recurrent layer over a whole sequence does not carry state: the general rate (the CTC
    # recogniser's BiLSTM was worse at 3e-3). A fine-tune without a rate says what it ran at.
    qt = compress(TinyGRU(), QTConfig(scheme="hashed", budget=0.5))
    assert qt.default_finetune_lr() == hashed.default_lr()
    x = torch.randn(16, 5, 4)
    assert qt.finetune(x, steps=2, batch_size=8, progress=False).lr == 1e-2
    assert qt.finetune(x, steps=2, batch_size=8, lr=1e-3, progress=False).lr == 1e-3
