"""Stateful models measured as deployed: state links, streams, free-running fidelity."""

import dataclasses

import pytest
import torch
from torch import nn

from qtcompress import QTConfig
from qtcompress.data.batch import Batch
from qtcompress.errors import ConfigError
from qtcompress.train.streams import (
    StateLink,
    detect_state_link,
    free_running_fidelity,
    free_running_outputs,
    parse_state_link,
    stream_rows,
)


class Cell(nn.Module):
    """``forward(x, state) -> (prob, state)``: a tanh RNN cell with a sigmoid read-out."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.rec, self.out = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        with torch.no_grad():
            self.rec.weight.mul_(gain)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.inp(x) + self.rec(state))  # (B, 8)
        return torch.sigmoid(self.out(h)).squeeze(-1), h


def recorded(model: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> Batch:
    """The teacher-forced data: each row with the state ``model`` carried into it."""
    states = torch.zeros(len(x), 8)
    state = torch.zeros(1, 8)
    with torch.no_grad():
        for row in range(len(x)):
            if row == 0 or ids[row] != ids[row - 1]:
                state = torch.zeros(1, 8)
            states[row] = state[0]
            state = model(x[row : row + 1], state)[1]
    return Batch(args=(x, states))


def test_the_obvious_link_is_detected_and_a_link_can_be_named():
    batch = Batch(args=(torch.randn(2, 3), torch.zeros(2, 8)))
    assert detect_state_link(Cell(), batch) == StateLink(input=1, output=1)
    assert detect_state_link(nn.Linear(3, 2), Batch(args=(torch.randn(2, 3),))) is None
    assert parse_state_link("1=1") == StateLink(1, 1)
    with pytest.raises(ConfigError, match="give the positional input fed by an output as IN=OUT"):
        parse_state_link("state")


def test_streams_must_be_consecutive():
    assert [r.tolist() for r in stream_rows(torch.tensor([4, 4, 7, 7, 7, 2]))] == [
        [0, 1],
        [2, 3, 4],
        [5],
    ]
    with pytest.raises(ConfigError, match="Stream 4 continues at row 3 after other streams"):
        stream_rows(torch.tensor([4, 4, 7, 4]))


def test_free_running_replays_each_stream_on_its_own_state():
    teacher = Cell().eval()
    x, ids = torch.randn(30, 3), torch.arange(3).repeat_interleave(10)
    data = recorded(teacher, x, ids)
    # The teacher run free reproduces what it recorded under teacher forcing, row by row.
    free = free_running_outputs(teacher, data, ids, StateLink(1, 1), None)
    torch.testing.assert_close(free, teacher(*data.args)[0])
    exact = free_running_fidelity(teacher, teacher, data, ids, StateLink(1, 1))
    assert exact.agreement == 1.0 and exact.correlation == pytest.approx(1.0)


def test_a_drifting_student_is_worse_free_running_than_teacher_forced():
    teacher, student = Cell().eval(), Cell(gain=3.0).eval()  # a student whose recurrence is off
    x, ids = torch.randn(400, 3), torch.zeros(400, dtype=torch.int64)  # one long stream
    data = recorded(teacher, x, ids)
    with torch.no_grad():
        forced_s, forced_t = student(*data.args)[0], teacher(*data.args)[0]
    forced_corr = torch.corrcoef(torch.stack([forced_s, forced_t]))[0, 1]
    free = free_running_fidelity(student, teacher, data, ids, StateLink(1, 1))
    assert free.correlation < float(forced_corr) - 0.05


class WideCell(nn.Module):
    """``forward(x, state) -> (prob, state)`` with a 32-unit state (about 2K weights)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.inp, self.rec, self.out = nn.Linear(6, 32), nn.Linear(32, 32), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.inp(x) + self.rec(state))  # (B, 32)
        return torch.sigmoid(self.out(h)).squeeze(-1), h


def _stream_data(model: nn.Module, rows: int, streams: int) -> tuple[tuple, torch.Tensor]:
    x = torch.randn(rows, 6)
    ids = torch.arange(streams).repeat_interleave(rows // streams)
    states = torch.zeros(rows, 32)
    with torch.no_grad():
        state = torch.zeros(1, 32)
        for row in range(rows):
            if row == 0 or ids[row] != ids[row - 1]:
                state = torch.zeros(1, 32)
            states[row] = state[0]
            state = model(x[row : row + 1], state)[1]
    return (x, states), ids


@pytest.mark.slow
def test_the_pipeline_reports_free_running_fidelity_as_the_headline(tmp_path):
    import numpy as np

    from qtcompress.io.arrays import load_npz_split
    from qtcompress.pipeline import PipelineSettings, run_pipeline

    model = WideCell().eval()
    (xtr, str_), train_ids = _stream_data(model, 200, 10)
    (xte, ste), ids = _stream_data(model, 120, 4)
    path = tmp_path / "d.npz"
    np.savez(
        path,
        **{"x_train.0": xtr, "x_train.1": str_, "x_test.0": xte, "x_test.1": ste},
        stream_test=ids.numpy(),
        stream_train=train_ids.numpy(),
    )
    data = load_npz_split(path)
    assert torch.equal(data.stream_test, ids) and torch.equal(data.stream_train, train_ids)
    logged: list[str] = []
    settings = PipelineSettings(fit_steps=0, finetune_steps=20, latency_repeats=1)
    r = run_pipeline(
        model, QTConfig(), data, tmp_path / "out", settings=settings, log=logged.append
    )
    assert r.state_link == "output 1 -> input 1"
    assert any("stateful model assumed: output 1 -> input 1" in line for line in logged)
    assert any("distilling over rollouts of 16 chunks" in line for line in logged)  # ROLLOUT
    assert r.fidelity_free_running is not None and r.fidelity_free_running["n"] == 120
    assert r.fidelity_free_running != r.fidelity_finetuned  # measured separately
    # It carries its state: the hashed scheme's lower rate for such models, said in the log
    # and the summary.
    why = "the hashed scheme's rate for a model that carries state"
    assert r.finetune_lr == 3e-3 and r.finetune_lr_reason == why
    assert f"phase 2 learning rate 0.003: {why}" in logged
    from qtcompress.summary import format_summary

    row = f"0.003 ({why})"
    assert any(
        line.startswith("phase 2 learning rate") and line.endswith(row)
        for line in format_summary(r).splitlines()
    )
    assert (r.finetune_steps, r.finetune_steps_reason) == (20, "given")
    assert any(
        line.startswith("phase 2 steps") and line.endswith("20 (given)")
        for line in format_summary(r).splitlines()
    )
    # Without streams, the summary says its fidelity is teacher-forced and how to fix that;
    # distilled on single chunks (no rollouts), the model still carries state: the same rate.
    plain = dataclasses.replace(data, stream_test=None, stream_train=None)
    r = run_pipeline(model, QTConfig(), plain, tmp_path / "out2", settings=settings)
    assert r.fidelity_free_running is None
    assert any("teacher-forced" in w and "stream_test" in w for w in r.warnings)
    assert r.finetune_lr == 3e-3 and r.finetune_lr_reason == why
    np.savez(
        path,
        **{"x_train.0": xtr, "x_train.1": str_, "x_test.0": xte, "x_test.1": ste},
        stream_test=ids.numpy()[:5],
    )
    with pytest.raises(ConfigError, match="stream_test must be a 1-D integer array with one"):
        load_npz_split(path)


@pytest.mark.slow
def test_rollouts_start_inside_a_stream_and_train_on_the_students_own_state():
    from qtcompress import compress
    from qtcompress.train.streams import Rollouts

    rollouts = Rollouts(StateLink(1, 1), torch.tensor([0, 0, 0, 1, 1, 2]), length=2)
    assert rollouts.steps() == 2 and rollouts.starts().tolist() == [0, 1, 3]
    assert Rollouts(StateLink(1, 1), torch.tensor([0, 0, 1]), length=9).steps() == 2
    teacher = WideCell().eval()
    (x, states), ids = _stream_data(teacher, 160, 8)
    data = Batch(args=(x, states))
    qt = compress(teacher, QTConfig(scheme="rows", n_layers=2))
    before = free_running_fidelity(qt.functional, teacher, data, ids, StateLink(1, 1))
    result = qt.finetune(
        (x, states), steps=40, lr=1e-2, progress=False, rollouts=Rollouts(StateLink(1, 1), ids, 4)
    )
    after = free_running_fidelity(qt.functional, teacher, data, ids, StateLink(1, 1))
    assert result.steps == 40 and after.correlation > before.correlation


def test_split_streams_keeps_streams_whole_or_cuts_a_single_one_in_time():
    from qtcompress.train.streams import split_streams

    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    fit, val = split_streams(ids, 0.3, seed=0)
    assert sorted(fit.tolist() + val.tolist()) == list(range(10))
    assert fit.tolist() == sorted(fit.tolist()) and val.tolist() == sorted(val.tolist())
    assert set(ids[fit].tolist()).isdisjoint(ids[val].tolist())  # no stream in both parts
    assert len(set(ids[val].tolist())) == 1  # 30% of 4 streams
    fit, val = split_streams(torch.zeros(20, dtype=torch.int64), 0.15, seed=0)
    assert fit.tolist() == list(range(17)) and val.tolist() == [17, 18, 19]
    with pytest.raises(ConfigError, match="One training stream of 1 chunks is too short"):
        split_streams(torch.zeros(1, dtype=torch.int64), 0.15, seed=0)


@pytest.mark.slow
def test_the_budget_search_of_a_stateful_model_judges_points_free_running(tmp_path):
    from qtcompress.examples import Split
    from qtcompress.pipeline import PipelineSettings, run_pipeline

    model = WideCell().eval()
    (xtr, str_), train_ids = _stream_data(model, 200, 10)
    (xte, ste), ids = _stream_data(model, 80, 4)
    empty = torch.zeros(0)
    data = Split((xtr, str_), empty, (xte, ste), empty, stream_test=ids, stream_train=train_ids)
    logged: list[str] = []
    settings = PipelineSettings(
        fit_steps=0, finetune_steps=10, latency_repeats=1, min_fidelity=0.999, time_limit=0.0
    )
    r = run_pipeline(
        model, QTConfig(), data, tmp_path / "out", settings=settings, log=logged.append
    )
    assert any("validation split (2 training streams, free-running" in line for line in logged)
    (point,) = r.search  # the time limit stops the search after its first point
    assert point["validation"] == "free-running"
    assert r.fidelity_free_running is not None and not r.fidelity_ok


def test_with_rollouts_the_best_state_is_judged_on_rollouts_over_the_streams(monkeypatch):
    from qtcompress import compress
    from qtcompress.train import finetune as finetune_module
    from qtcompress.train.streams import Rollouts

    teacher = WideCell().eval()
    (x, states), ids = _stream_data(teacher, 160, 8)
    seen: list[tuple[int, bool]] = []
    real = finetune_module.rollout_outputs

    def spy(call, data, rows, rollouts, output, states=None, start=None):  # noqa: ANN001, ANN202
        seen.append((len(rows), torch.is_grad_enabled()))
        return real(call, data, rows, rollouts, output, states, start)

    monkeypatch.setattr(finetune_module, "rollout_outputs", spy)
    qt = compress(teacher, QTConfig(scheme="rows", n_layers=2))
    qt.finetune(
        (x, states),
        steps=10,
        progress=False,
        probe_size=40,
        rollouts=Rollouts(StateLink(1, 1), ids, 4),
    )
    probes = [n for n, grad in seen if not grad and n == 10]  # 40 chunks: 10 rollouts of 4
    assert len(probes) >= 2  # the teacher's once, then the student's at every check


def test_state_loss_is_the_squared_error_over_the_originals_mean_square():
    from qtcompress.train.streams import state_loss

    two, three = torch.full((2, 3), 2.0), torch.full((2, 3), 3.0)
    assert float(state_loss([three], [two])) == pytest.approx(0.25)  # 1 / mean(2**2)
    assert float(state_loss([two, two], [two, two])) == 0.0
    # (h, c) states: each tensor scaled by its own size; an all-zero one by 1
    loss = state_loss([(three, torch.ones(2, 3))], [(two, torch.zeros(2, 3))])
    assert float(loss) == pytest.approx((0.25 + 1.0) / 2)
    with pytest.raises(ConfigError, match="holds no floating-point tensor"):
        state_loss([torch.ones(2, dtype=torch.int64)], [torch.ones(2, dtype=torch.int64)])


def test_rollouts_pull_the_students_state_with_the_stated_weight(monkeypatch):
    from qtcompress import compress
    from qtcompress.train import finetune as finetune_module
    from qtcompress.train.streams import Rollouts

    teacher = WideCell().eval()
    (x, states), ids = _stream_data(teacher, 40, 4)
    lengths: list[int] = []
    real = finetune_module.state_loss

    def spy(own, goal):  # noqa: ANN001, ANN202 - records each call
        lengths.append(len(own))
        return real(own, goal)

    monkeypatch.setattr(finetune_module, "state_loss", spy)
    for weight in (0.0, 1.0):
        qt = compress(teacher, QTConfig(scheme="rows", n_layers=2))
        qt.finetune(
            (x, states),
            steps=3,
            progress=False,
            rollouts=Rollouts(StateLink(1, 1), ids, 4, state_weight=weight),
        )
        assert lengths == ([] if weight == 0 else [4, 4, 4])  # a term per step, 4 states each


def test_free_running_states_of_the_original_are_its_recorded_states():
    from qtcompress.train.streams import free_running_states

    teacher = WideCell().eval()
    (x, states), ids = _stream_data(teacher, 40, 4)
    fed = free_running_states(teacher, Batch(args=(x, states)), ids, StateLink(1, 1))
    assert torch.allclose(fed, states, atol=1e-6)  # the recorded data are its own free run
    other = free_running_states(_zero_cell(), Batch(args=(x, states)), ids, StateLink(1, 1))
    firsts = torch.tensor([0, 10, 20, 30])
    assert torch.equal(other[firsts], states[firsts])  # every stream starts as recorded
    assert not torch.allclose(other, states)  # then carries its own (here: zeros)


def _zero_cell():  # noqa: ANN202 - a cell whose state is always zero
    return lambda x, state: (torch.zeros(len(x)), torch.zeros_like(state))


def test_rollouts_from_the_students_own_state_refresh_it_as_stated(monkeypatch):
    from qtcompress import compress
    from qtcompress.train import finetune as finetune_module
    from qtcompress.train.streams import Rollouts

    teacher = WideCell().eval()
    (x, states), ids = _stream_data(teacher, 40, 4)
    refreshed: list[int] = []
    real = finetune_module.free_running_states

    def spy(call, data, streams, link):  # noqa: ANN001, ANN202 - records each refresh
        refreshed.append(len(streams))
        return real(call, data, streams, link)

    monkeypatch.setattr(finetune_module, "free_running_states", spy)
    qt = compress(teacher, QTConfig(scheme="rows", n_layers=2))
    rollouts = Rollouts(StateLink(1, 1), ids, 4, own_share=0.5, own_every=3)
    result = qt.finetune((x, states), steps=7, progress=False, rollouts=rollouts)
    assert result.steps == 7 and refreshed == [40, 40, 40]  # steps 0, 3 and 6


def test_rollouts_refuse_out_of_range_options():
    from qtcompress.train.streams import Rollouts

    ids = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ConfigError, match="own_share in \\[0, 1\\]"):
        Rollouts(StateLink(1, 1), ids, own_share=1.5)
    with pytest.raises(ConfigError, match="length >= 1 and own_every >= 1"):
        Rollouts(StateLink(1, 1), ids, length=0)


def test_the_rollout_length_is_an_option_with_a_clear_error():
    from qtcompress.cli.commands import _settings_from_args
    from qtcompress.cli.parser import build_parser
    from qtcompress.constants import ROLLOUT
    from qtcompress.pipeline import PipelineSettings

    base = ["compress", "m.pt", "--data", "d.npz", "-o", "out"]
    assert _settings_from_args(build_parser().parse_args(base)).rollout == ROLLOUT
    args = build_parser().parse_args([*base, "--rollout", "16"])
    assert _settings_from_args(args).rollout == 16
    with pytest.raises(ConfigError, match=r"^--rollout must be >= 1, got 0"):
        PipelineSettings(rollout=0)


def test_the_data_docs_stream_example_writes_a_file_that_loads(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    from qtcompress.io.arrays import load_npz_split

    doc = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    model = Cell().eval()
    model.initial_state = lambda n: torch.zeros(n, 8)  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(0)
    streams = {"train_streams": torch.randn(3, 5, 3, generator=gen)}
    streams["test_streams"] = torch.randn(2, 4, 3, generator=gen)
    monkeypatch.chdir(tmp_path)
    exec(snippet, {"model": model, **streams})  # noqa: S102 - the repository's own docs
    data = load_npz_split(tmp_path / "data.npz")
    assert data.stream_train.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert data.stream_test.tolist() == [0] * 4 + [1] * 4
    x, states = data.x_test
    assert torch.equal(x, streams["test_streams"].reshape(8, 3))
    # The state before each chunk is the original's, carried from the start of its stream.
    assert torch.allclose(states, recorded(model, x, data.stream_test).args[1])
    assert not torch.equal(states[1], torch.zeros(8))  # carried, not reset per chunk


def test_a_model_distilled_over_its_streams_gets_twice_the_steps_by_default(monkeypatch):
    import qtcompress.api as api
    from qtcompress import compress
    from qtcompress.train.streams import Rollouts

    teacher = WideCell().eval()
    (x, states), ids = _stream_data(teacher, 40, 4)
    ran: list[int] = []

    def count(fmodel, data, labels, cfg, **kwargs):  # noqa: ANN001, ANN003, ANN202
        ran.append(cfg.steps)  # the loop itself is tested elsewhere; here only its length

    monkeypatch.setattr(api, "_finetune", count)
    qt = compress(teacher, QTConfig())
    qt.finetune((x, states), progress=False, rollouts=Rollouts(StateLink(1, 1), ids))
    qt.finetune((x, states), progress=False)
    qt.finetune((x, states), progress=False, steps=7, rollouts=Rollouts(StateLink(1, 1), ids))
    assert ran == [3000, 1500, 7]
