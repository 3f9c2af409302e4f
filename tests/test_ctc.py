"""CTC outputs scored by the agreement of decoded sequences (1 - character error rate)."""

import pytest
import torch
from torch import nn

from qtcompress import QTConfig, compress
from qtcompress.errors import ConfigError
from qtcompress.train.objectives import ctc_greedy, edit_distance, measure_fidelity


def scores(paths: list[list[int]], classes: int = 5) -> torch.Tensor:
    """One-hot-ish frame scores ``(B, T, C)`` whose argmax follows ``paths``."""
    out = torch.zeros(len(paths), len(paths[0]), classes)
    for b, path in enumerate(paths):
        for t, c in enumerate(path):
            out[b, t, c] = 5.0
    return out


def test_greedy_decoding_and_edit_distance():
    assert ctc_greedy(scores([[0, 1, 1, 0, 1, 2, 2, 0]])) == [[1, 1, 2]]
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 4]) == 2


def test_ctc_fidelity_is_one_minus_the_character_error_rate():
    teacher = scores([[1, 0, 2, 0, 3], [4, 4, 0, 1, 1]])  # decodes 1 2 3 and 4 1
    student = scores(
        [[1, 0, 2, 2, 0], [4, 0, 4, 1, 1]]
    )  # 1 2 (one deletion), 4 4 1 (one insertion)
    fid = measure_fidelity(student, teacher, "ctc")
    assert fid.headline_name == "decode_agreement"
    assert fid.decode_agreement == pytest.approx(1 - 2 / 5)
    assert fid.agreement == pytest.approx(6 / 10)  # frames whose best class agrees
    assert measure_fidelity(teacher, teacher, "ctc").headline == 1.0
    with pytest.raises(ConfigError, match="CTC outputs must be \\(batch, time, classes\\)"):
        measure_fidelity(teacher[:, 0], teacher[:, 0], "ctc")


class TinyCRNN(nn.Module):
    """Conv over time + GRU + per-frame classes: ``(B, T, 8) -> (B, T, 6)``, class 0 blank."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(8, 32, 3, padding=1)
        self.rnn = nn.GRU(32, 48, batch_first=True, bidirectional=True)
        self.head = nn.Linear(96, 6)
        with torch.no_grad():  # a trained CTC model: confident frames, mostly blank
            self.head.weight.mul_(8.0)
            self.head.bias[0] += 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)  # (B, T, 32)
        return self.head(self.rnn(z)[0])  # (B, T, 6)


@pytest.mark.slow
def test_a_ctc_model_is_distilled_and_scored_on_its_decodes():
    model = TinyCRNN().eval()
    x = torch.randn(96, 20, 8)
    qt = compress(model, QTConfig(scheme="hashed", budget=0.05))
    before = qt.evaluate(x[64:], output_kind="ctc")
    qt.finetune(x[:64], steps=150, output_kind="ctc", progress=False)
    after = qt.evaluate(x[64:], output_kind="ctc")
    assert after.kind == "ctc" and after.decode_agreement is not None
    assert after.decode_agreement > before.decode_agreement + 0.3


def test_an_all_blank_student_is_dead_and_its_decodes_pick_the_best_state():
    from qtcompress.train.objectives import kind_monitor

    teacher = scores([[1, 0, 2, 0, 3], [4, 4, 0, 1, 1], [0, 2, 0, 0, 1]])
    blank = scores([[0, 0, 0, 0, 0]] * 3)
    blank[:, :, 1:] += torch.rand(3, 5, 4)  # frame scores still vary across inputs
    fid = measure_fidelity(blank, teacher, "ctc")
    assert fid.spread_ratio > 0.02 and fid.agreement == pytest.approx(6 / 15)  # blank frames
    assert fid.decode_agreement == 0.0 and fid.degenerate  # nothing the teacher decodes
    assert not measure_fidelity(teacher, teacher, "ctc").degenerate
    monitor = kind_monitor("ctc")
    assert monitor is not None and monitor(blank, teacher) == 1.0
    assert monitor(teacher, teacher) == 0.0
    assert kind_monitor("logits") is None  # the distillation loss picks the best state
