"""tools/bench_compare.py (--quick) writes its four tables; the baselines respect their budget."""

import pytest
import torch
from torch import nn

from qtcompress.errors import ConfigError
from qtcompress.examples import DigitsCNN
from tests.cli_helpers import load_tool

# Benchmark-only code: it lives under tools/, not in the package.
_baselines = load_tool("baselines")
distill_finetune = _baselines.distill_finetune
lowrank_factorize = _baselines.lowrank_factorize
magnitude_prune = _baselines.magnitude_prune
random_features_control = _baselines.random_features_control
trainable_count = _baselines.trainable_count


def _rows(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.mark.slow
def test_quick_run_writes_all_tables(tmp_path):
    bench = load_tool("bench_compare")
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    assert bench.main(["--quick", "--models", "wine", "--output", str(out)]) == 0
    text = out.read_text()
    assert "keep me" in text and text.count("<!-- bench_compare:start -->") == 1
    for title in (
        "### 1. QT generators",
        "### 2. Classical baselines",
        "### 3. qsim path",
        "### 4. Generator size",
    ):
        assert title in text
    # 1: the original + the quick grid's generators, wine only
    paper = _rows(text, "| wine | ")
    assert any("original (pretrained)" in r for r in paper)
    assert not _rows(text, "| digits | ")
    # 2: five methods, each with mean +- std cells
    for method in (
        "QT (QNN + MLP mapping)",
        "QNN cut off",
        "fixed random vector",
        "low-rank SVD",
        "magnitude pruning",
    ):
        row = [r for r in paper if method in r]
        assert len(row) == 1 and "+-" in row[0], method
    # 3: the quick simulator cases; 4: the quick sizes
    assert len(_rows(text, "| 6 | 4 |")) == 1 and len(_rows(text, "| 8 | 8 |")) == 1
    assert len(_rows(text, "| 985 |")) == 1 and len(_rows(text, "| 9,985 |")) == 1


def test_lowrank_fits_budget_and_full_rank_is_exact():
    model = DigitsCNN().eval()
    small, ranks = lowrank_factorize(model, 1000)
    assert trainable_count(small) <= 1000 and ranks["conv2"] < 32
    big, ranks = lowrank_factorize(model, trainable_count(model))
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(big.eval()(x), model(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(
        ConfigError, match="Rank 1 in every layer needs 493 parameters, over the budget 100"
    ):
        lowrank_factorize(model, 100)


def test_prune_keeps_exactly_the_budget_and_finetune_keeps_the_mask():
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    student, masks = magnitude_prune(teacher, 60)
    assert trainable_count(student, masks) == 60
    w = teacher[0].weight.detach().abs()
    kept = w[masks["0.weight"]]
    assert kept.min() >= w[~masks["0.weight"]].max()  # the largest magnitudes are kept
    distill_finetune(student, teacher, torch.randn(50, 6), steps=20, lr=1e-2, masks=masks)
    for name, m in masks.items():
        assert (dict(student.named_parameters())[name][~m] == 0).all()


def test_random_features_control_freezes_the_qnn():
    from qtcompress.api import compress
    from qtcompress.config import QTConfig

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    qt = compress(model, QTConfig(scheme="flat", chunk=4, n_layers=2))
    before = qt.report()
    random_features_control(qt, seed=1)
    after = qt.report()
    assert after.trainable == before.trainable - before.qnn
    w1 = qt.generator.generate().detach().clone()
    angles = qt.generator.qnn.angles.detach().clone()
    qt.fit_weights(steps=3, lr=1e-2, progress=False)
    assert not torch.equal(w1, qt.generator.generate().detach())  # the mapping trains...
    assert torch.equal(qt.generator.qnn.angles, angles)  # ...the QNN does not
