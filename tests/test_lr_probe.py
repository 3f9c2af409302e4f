"""The fine-tune's learning-rate probe: trial fits that pick a rate and leave nothing behind."""

import math

import torch
from torch import nn

from qtcompress.api import compress
from qtcompress.config import QTConfig
from qtcompress.train.loop import LoopConfig
from qtcompress.train.lr_probe import probe_learning_rate, trial_steps
from tests.tiny_models import TinyMLP


class _Point(nn.Module):
    """One trainable point whose loss is its squared distance to ``target``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))
        self.register_buffer("calls", torch.zeros(()))


def test_the_probe_picks_the_rate_whose_trial_ends_best_and_restores_the_start():
    point = _Point()
    target = torch.full((4,), 0.5)
    stats = {"seen": torch.zeros(())}

    def loss_at(step: int) -> torch.Tensor:
        stats["seen"] += 1  # a buffer the loss moves, as BatchNorm statistics are moved
        if point.w.detach().abs().max() > 10:  # a rate that blows the point away: NaN
            return point.w.sum() * math.nan
        return ((point.w - target) ** 2).sum()

    def monitor() -> float:
        return float(((point.w.detach() - target) ** 2).sum())

    cfg = LoopConfig(steps=400, lr=0.1, warmup=40)
    resets = []
    got = probe_learning_rate(
        point,
        loss_at,
        cfg,
        monitor,
        factors=(0.001, 1.0, 1000.0),
        extra_state=stats,
        reset=lambda: resets.append(1),
    )
    assert got.steps == trial_steps(400) == 20
    rates = [lr for lr, _ in got.tried]
    values = [v for _, v in got.tried]
    assert rates == [0.1 * 0.001, 0.1, 0.1 * 1000.0]
    # Too small a rate barely moves; the default reaches the target; too large a rate blows
    # up (NaN loss: scored inf, not an error).
    assert values[1] < 0.2 < 0.9 < values[0] and values[2] == math.inf
    assert got.lr == 0.1 and len(resets) == 3
    assert torch.equal(point.w, torch.zeros(4))  # the start state, exactly
    assert float(stats["seen"]) == 0.0  # the buffers too


def test_a_fine_tune_after_the_probe_is_the_run_at_the_chosen_rate():
    torch.manual_seed(0)
    model = TinyMLP()
    x = torch.randn(96, 13)
    config = QTConfig(scheme="hashed", budget=0.3, seed=0)
    common = {"steps": 30, "batch_size": 16, "progress": False}
    probed = compress(model, config)
    # Two trials at the same rate: the first wins the tie, and the run must be the plain
    # run at that rate, bit for bit: the trials leave no trace in the generator or the data.
    result = probed.finetune(x, lr=1e-2, lr_probe=(1.0, 1.0), **common)
    plain = compress(model, config)
    reference = plain.finetune(x, lr=1e-2, **common)
    assert [lr for lr, _ in result.lr_tried] == [1e-2, 1e-2]
    assert result.lr_tried[0][1] == result.lr_tried[1][1]  # the trials are deterministic
    assert reference.lr_tried == [] and result.history == reference.history
    for (name, a), (_, b) in zip(
        probed.generator.state_dict().items(), plain.generator.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    chosen = compress(model, config).finetune(x, lr=1e-2, lr_probe=(0.3, 1.0, 3.0), **common)
    best = min(chosen.lr_tried, key=lambda t: t[1])
    assert len(chosen.lr_tried) == 3 and best[0] in (3e-3, 1e-2, 3e-2)
