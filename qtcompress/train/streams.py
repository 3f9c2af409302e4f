"""Stateful models run as deployed: each model carries its own state from chunk to chunk.

A streaming model is called as ``model(x, state) -> (y, state)``. Data recorded from the
original give every chunk the *original's* state (teacher forcing), which hides how far a
student drifts once it feeds its own state back. :func:`free_running_fidelity` replays held-out
streams the way they are deployed: both the original and the student start each stream from
its recorded first state, then each carries its own.

Streams are rows of the data in order: ``streams`` gives each row its stream id, and the rows
of a stream are consecutive (an ``.npz`` says it with ``stream_test``; see the README).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from qtcompress.constants import ROLLOUT
from qtcompress.data.batch import Batch
from qtcompress.data.model_call import select_output
from qtcompress.errors import ConfigError
from qtcompress.train.objectives import Fidelity, infer_output_kind, measure_fidelity


@dataclass(frozen=True)
class StateLink:
    """Output ``output`` of the model's tuple is fed back as positional input ``input``."""

    input: int
    output: int

    def describe(self) -> str:
        """``output 1 -> input 1`` style text for logs and summaries."""
        return f"output {self.output} -> input {self.input}"


def parse_state_link(text: str) -> StateLink:
    """``"IN=OUT"`` (positional input and output indices) as a :class:`StateLink`.

    Raises:
        ConfigError: Not two non-negative integers joined by ``=``.
    """
    parts = text.split("=")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(
            f"--state {text!r}: give the positional input fed by an output as IN=OUT, e.g. "
            "--state 1=1 for forward(x, state) -> (y, state)."
        )
    return StateLink(int(parts[0]), int(parts[1]))


@torch.no_grad()
def detect_state_link(call: Callable[..., Any], batch: Batch) -> StateLink | None:
    """The obvious ``(x, state) -> (y, state)`` link, or ``None``.

    A positional input after the first whose shape and dtype equal those of an output after
    the first (the model's tuple output) is taken to be that output fed back. Only an
    unambiguous single match counts.
    """
    if batch.kwargs or len(batch.args) < 2:
        return None
    out = batch.call(call)
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        return None
    matches = [
        StateLink(i, j)
        for i, a in enumerate(batch.args)
        for j, o in enumerate(out)
        if i >= 1
        and j >= 1
        and isinstance(a, torch.Tensor)
        and isinstance(o, torch.Tensor)
        and a.shape == o.shape
        and a.dtype == o.dtype
        and a.is_floating_point()
    ]
    return matches[0] if len(matches) == 1 else None


def stream_rows(streams: torch.Tensor) -> list[torch.Tensor]:
    """Row indices of each stream, in order (a stream's rows are consecutive).

    Raises:
        ConfigError: A stream id appears in two separate runs of rows.
    """
    ids = streams.reshape(-1).tolist()
    runs: list[list[int]] = []
    seen: set[Any] = set()
    for row, s in enumerate(ids):
        if runs and ids[row - 1] == s:
            runs[-1].append(row)
            continue
        if s in seen:
            raise ConfigError(
                f"Stream {s} continues at row {row} after other streams; the rows of a stream "
                "must be consecutive, in order."
            )
        seen.add(s)
        runs.append([row])
    return [torch.tensor(r, dtype=torch.int64) for r in runs]


def split_streams(
    streams: torch.Tensor, share: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``(fit, validation)`` that keep streams whole, each part in row order.

    A seeded ``share`` of the streams (at least one, never all) is held out; a single stream
    is cut in time instead, its last ``share`` of chunks validating (from the recorded state
    there).

    Raises:
        ConfigError: A single stream too short to cut in two.
    """
    runs = stream_rows(streams)
    if len(runs) >= 2:
        held = min(len(runs) - 1, max(1, round(len(runs) * share)))
        order = torch.randperm(len(runs), generator=torch.Generator().manual_seed(seed))
        chosen = set(order[:held].tolist())
        fit = [r for i, r in enumerate(runs) if i not in chosen]
        val = [r for i, r in enumerate(runs) if i in chosen]
        return torch.cat(fit), torch.cat(val)
    (run,) = runs
    held = max(1, round(len(run) * share))
    if held >= len(run):
        raise ConfigError(
            f"One training stream of {len(run)} chunks is too short to hold out a validation "
            "part; give more training chunks or --budget."
        )
    return run[: len(run) - held], run[len(run) - held :]


@torch.no_grad()
def _free_run(
    call: Callable[..., Any],
    data: Batch,
    streams: torch.Tensor,
    link: StateLink,
    output: str | int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of ``call`` over every stream on its own state, and the state fed to each row.

    All streams advance together: step ``t`` runs the ``t``-th chunk of every stream still
    going as one batch. Both results are in the data's row order.
    """
    runs = stream_rows(streams)
    if not runs:
        raise ConfigError("Free-running needs at least one stream.")
    first = torch.stack([r[0] for r in runs])
    state = data.args[link.input].index_select(0, first)  # (S, ...): recorded first states
    fed = torch.empty_like(data.args[link.input])
    outs: list[torch.Tensor | None] = [None] * len(data)
    for t in range(max(len(r) for r in runs)):
        live = [s for s, r in enumerate(runs) if len(r) > t]
        rows = torch.stack([runs[s][t] for s in live])
        step = data.take(rows)
        args = list(step.args)
        live_idx = torch.tensor(live, dtype=torch.int64)
        args[link.input] = state.index_select(0, live_idx)
        fed.index_copy_(0, rows.to(fed.device), args[link.input].to(fed.dtype))
        out = call(*args, **step.kwargs)
        if not isinstance(out, (tuple, list)) or len(out) <= link.output:
            raise ConfigError(
                f"The model returned {type(out).__name__}, without output {link.output} to "
                "carry as state; check --state."
            )
        state = state.index_copy(0, live_idx, out[link.output].to(state.dtype))
        y = select_output(out, output).cpu()
        for k, row in enumerate(rows.tolist()):
            outs[row] = y[k]
    return torch.stack([o for o in outs if o is not None]), fed


def free_running_outputs(
    call: Callable[..., Any],
    data: Batch,
    streams: torch.Tensor,
    link: StateLink,
    output: str | int | None,
) -> torch.Tensor:
    """Outputs of ``call`` over every stream, carrying its own state; in the data's row order.

    All streams advance together: step ``t`` runs the ``t``-th chunk of every stream still
    going as one batch.
    """
    return _free_run(call, data, streams, link, output)[0]


def free_running_states(
    call: Callable[..., Any], data: Batch, streams: torch.Tensor, link: StateLink
) -> torch.Tensor:
    """The state ``call`` carries into each row when it runs every stream on its own state.

    Each stream starts from its recorded first state, as in :func:`free_running_outputs`.
    """
    return _free_run(call, data, streams, link, None)[1]


def free_running_fidelity(
    student: Callable[..., Any],
    teacher: Callable[..., Any],
    data: Batch,
    streams: torch.Tensor,
    link: StateLink,
    *,
    output: str | int | None = None,
    output_kind: str | None = None,
    labels: torch.Tensor | None = None,
) -> Fidelity:
    """Fidelity of ``student`` to ``teacher`` when each runs the streams on its own state."""
    t = free_running_outputs(teacher, data, streams, link, output)
    s = free_running_outputs(student, data, streams, link, output)
    return measure_fidelity(s, t, output_kind or infer_output_kind(t), labels)


# Half the rollouts start from the student's own free-running state: on the streaming VAD
# (tools/bench_audio_stream.py, default generator, rollouts of 8) free-running agreement rose
# from 76.0% / 0.688 to 87.9% / 0.838 on one generator seed and from 55.7% / 0.266 to
# 62.1% / 0.417 on another; all rollouts from its own state did worse (72.5%). The state
# term did not help the streaming LSTM (tools/bench_streams.py), so it is off.
OWN_STATE_SHARE = 0.5
OWN_STATE_EVERY = 50


@dataclass(frozen=True)
class Rollouts:
    """Distillation over rollouts: ``length`` consecutive chunks of a training stream.

    The student starts each rollout from the original's recorded state and then carries its
    own, so it learns to stay close on its own state (truncated backpropagation through
    ``length`` steps); the original's outputs on the recorded data are its own free-running
    outputs, since the recorded states are its own.

    The student's carried state can also be pulled towards the original's at every step
    (``state_weight``; off by default: on the streaming LSTM it made free-running worse).

    Attributes:
        link: Which output feeds which input.
        streams: Stream id of each training row (rows of a stream consecutive, in order).
        length: Chunks per rollout (capped at the longest stream).
        state_weight: Weight of the state term (mean squared error between the two carried
            states, over the original's mean square) beside the output loss; 0 turns it off.
        own_share: Share of the rollouts that start from the state the *student* carries
            into that chunk when it runs the training streams free (refreshed every
            ``own_every`` steps), the rest from the original's recorded state. The student
            then learns to come back from where its own state drifts in use, not only to
            stay close from where the original's state starts it (as DAgger does for
            imitation); the targets stay the original's outputs along its own states.
        own_every: Steps between refreshes of the student's free-running states.
    """

    link: StateLink
    streams: torch.Tensor
    length: int = ROLLOUT
    state_weight: float = 0.0
    own_share: float = OWN_STATE_SHARE
    own_every: int = OWN_STATE_EVERY

    def __post_init__(self) -> None:
        if self.length < 1 or self.own_every < 1:
            raise ConfigError(
                f"Rollouts need length >= 1 and own_every >= 1, got {self.length} and "
                f"{self.own_every}."
            )
        if not 0.0 <= self.own_share <= 1.0 or not self.state_weight >= 0.0:
            raise ConfigError(
                f"Rollouts need own_share in [0, 1] and state_weight >= 0, got "
                f"{self.own_share} and {self.state_weight}."
            )

    @cached_property
    def _runs(self) -> list[torch.Tensor]:
        # Computed once: rollout_outputs asks for steps() every training step, and
        # stream_rows is a Python pass over every training row.
        return stream_rows(self.streams)

    def starts(self) -> torch.Tensor:
        """Rows where a rollout of :meth:`steps` chunks fits inside one stream."""
        k = self.steps()
        return torch.cat([r[: len(r) - k + 1] for r in self._runs if len(r) >= k])

    def steps(self) -> int:
        """The rollout length used: ``length``, or the longest stream if shorter."""
        return max(1, min(self.length, max(len(r) for r in self._runs)))


def rollout_outputs(
    call: Callable[..., Any],
    data: Batch,
    start_rows: torch.Tensor,
    rollouts: Rollouts,
    output: str | int | None,
    states: list[Any] | None = None,
    start: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``call``'s outputs over rollouts from ``start_rows``, carrying its own state (with grad).

    Args:
        call: The model (or the student's functional call) as ``call(*args, **kwargs)``.
        data: Every training row; a rollout reads ``start_rows + t`` at step ``t``.
        start_rows: First row of each rollout (the recorded state there starts it).
        rollouts: The link and the rollout length.
        output: Which output to return (see :func:`select_output`).
        states: Where given, the state ``call`` carries out of each step is appended to it.
        start: The states the rollouts start from; default the recorded ones at ``start_rows``.
    """
    link = rollouts.link
    state = data.args[link.input].index_select(0, start_rows) if start is None else start
    outs = []
    for t in range(rollouts.steps()):
        step = data.take(start_rows + t)
        args = list(step.args)
        args[link.input] = state
        out = call(*args, **step.kwargs)
        state = out[link.output]
        if states is not None:
            states.append(state)
        outs.append(select_output(out, output))
    return outs


def _leaves(x: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a state (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _leaves(item)]
    return []


def state_loss(student: list[Any], teacher: list[Any]) -> torch.Tensor:
    """Mean over steps and state tensors of ``MSE(student, teacher) / mean(teacher**2)``.

    Scaled by the original's own magnitude so one weight serves states of any size; a state
    that is all zeros counts its plain mean square.
    """
    terms = []
    for s_step, t_step in zip(student, teacher, strict=True):
        for s, t in zip(_leaves(s_step), _leaves(t_step), strict=True):
            t = t.to(s.dtype)
            scale = t.pow(2).mean().clamp_min(1e-12) if bool(t.any()) else t.new_tensor(1.0)
            terms.append((s - t).pow(2).mean() / scale)
    if not terms:
        raise ConfigError("The carried state holds no floating-point tensor to match.")
    return torch.stack(terms).mean()
