"""Fidelity of a compressed streaming model as deployed: free-running against teacher-forced.

The suite's streaming LSTM (``tools/suite.py``: Conv1d + LSTMCell, ``forward(x, state) ->
(prob, state)``) is compressed and distilled on its training digits, each a stream of two
14-frame chunks: on single chunks with the original's state (teacher-forced pairs), or over
rollouts of both chunks on the student's own state (``rollouts``); then measured on held-out
digits read as streams of 14-frame chunks in two ways:

* **teacher-forced**: every chunk gets the original's state (what the training data hold);
* **free-running**: the original and the student each start a stream from its first recorded
  state and carry their own (:func:`qtcompress.train.streams.free_running_fidelity`).

Two stream layouts: one stream per digit (2 chunks from the zero state, the model's own use)
and one stream of every held-out digit in a row (718 chunks, state never reset).

Run: ``python tools/bench_streams.py`` (a few minutes); writes its section of
docs/benchmarks.md. Threads: torch 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import rounded  # noqa: E402
from benchdoc import machine, write_section  # noqa: E402
from suite import digits_split, load_entry, rnn_windows  # noqa: E402

from qtcompress import QTConfig, compress  # noqa: E402
from qtcompress.data.batch import Batch  # noqa: E402
from qtcompress.examples import upsample  # noqa: E402
from qtcompress.train.objectives import measure_fidelity  # noqa: E402
from qtcompress.train.streams import Rollouts, StateLink, free_running_fidelity  # noqa: E402

LINK = StateLink(input=1, output=1)
CHAINED_ROLLOUT = 8
CHAINED_ORDERS = 4
WINDOWS = 2  # 14-frame chunks: the chunking the model and its training pairs use
# (name, generator, training streams: "pairs" (single chunks with the original's state),
# "rollouts" (rollouts of each digit's 2 chunks), "chained" (rollouts of CHAINED_ROLLOUT chunks
# along the training digits read as one stream, the original's state carried throughout),
# "chained orders" (the same along CHAINED_ORDERS streams: the digits in as many orders))
# Rollouts from the original's state only (own_share 0: the arms measured before rollouts from
# the student's own state became the default)
_OFF = {"own_share": 0.0}
# and Rollouts options: state_weight (the state term), own_share (rollouts from the student's
# own free-running state)
ARMS: tuple[tuple[str, QTConfig, str, dict[str, float]], ...] = (
    ("hashed QNN 0.5% (default)", QTConfig(), "pairs", {}),
    ("hashed QNN 0.5%, rollouts", QTConfig(), "rollouts", _OFF),
    ("hashed QNN 0.5%, rollouts + state", QTConfig(), "rollouts", {**_OFF, "state_weight": 1.0}),
    ("hashed QNN 0.5%, chained rollouts", QTConfig(), "chained", _OFF),
    (
        "hashed QNN 0.5%, chained rollouts + state",
        QTConfig(),
        "chained",
        {**_OFF, "state_weight": 1.0},
    ),
    ("rows 5%", QTConfig(scheme="rows"), "pairs", {}),
    ("hashed QNN 0.5%, rollouts, half own", QTConfig(), "rollouts", {"own_share": 0.5}),
    ("hashed QNN 0.5%, chained rollouts, half own", QTConfig(), "chained", {"own_share": 0.5}),
    (
        "hashed QNN 5% (budget=0.05), chained rollouts, half own",
        QTConfig(budget=0.05),
        "chained",
        {"own_share": 0.5},
    ),
    # The training digits chained in CHAINED_ORDERS orders (streams): more paths of the state.
    (
        f"hashed QNN 0.5%, chained rollouts in {CHAINED_ORDERS} orders, half own",
        QTConfig(),
        "chained orders",
        {"own_share": 0.5},
    ),
)


@torch.no_grad()
def train_streams(model: torch.nn.Module) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The training digits as streams of 2 chunks: (zero state, window 1), (carried, window 2)."""
    w1, w2 = rnn_windows(upsample(digits_split().x_train))
    n = len(w1)
    zero = model.initial_state(n)
    carried = model(w1, zero)[1]
    x = torch.stack([w1, w2], 1).reshape(2 * n, *w1.shape[1:])
    states = torch.stack([zero, carried], 1).reshape(2 * n, *zero.shape[1:])
    return (x, states), torch.arange(n).repeat_interleave(2)


@torch.no_grad()
def train_chained(
    model: torch.nn.Module, orders: int = 1
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The training digits' chunks as one stream per order, the original's state carried along.

    Order 0 is the digits as stored; each further order a seeded shuffle of the digits (each
    digit's two chunks kept together), so the student sees the state wander along other paths.
    """
    (x, _), _ = train_streams(model)
    n = len(x) // 2
    xs, ids = [], []
    for order in range(orders):
        shuffle = torch.Generator().manual_seed(order)
        perm = torch.arange(n) if order == 0 else torch.randperm(n, generator=shuffle)
        rows = torch.stack([2 * perm, 2 * perm + 1], 1).reshape(-1)
        xs.append(x[rows])
        ids.append(torch.full((len(rows),), order, dtype=torch.int64))
    xo = torch.cat(xs)
    states = torch.zeros(len(xo), 2, model.hidden)
    for order in range(orders):
        state = torch.zeros(1, 2, model.hidden)  # each order from the zero state
        for row in range(order * 2 * n, (order + 1) * 2 * n):
            states[row] = state[0]
            state = model(xo[row : row + 1], state)[1]
    return (xo, states), torch.cat(ids)


@torch.no_grad()
def streams(model: torch.nn.Module, chained: bool, repeat: int = 1) -> tuple[Batch, torch.Tensor]:
    """Held-out digits as 14-frame chunks with the original's states; each row's stream."""
    split = digits_split()
    chunks = rnn_windows(upsample(split.x_test), windows=WINDOWS)  # WINDOWS x (N, T, 28)
    n, frames = chunks[0].shape[0], chunks[0].shape[1]
    x = torch.stack(chunks, 1).reshape(-1, frames, 28)  # (W*N, T, 28): digit by digit, in order
    x = x.repeat(repeat, 1, 1)  # the held-out digits read `repeat` times over, state carried
    rows = WINDOWS * n * repeat
    ids = (
        torch.zeros(rows, dtype=torch.int64)
        if chained
        else torch.arange(n * repeat).repeat_interleave(WINDOWS)
    )
    states = torch.zeros(rows, 2, model.hidden)
    state = torch.zeros(1, 2, model.hidden)
    for row in range(rows):  # the original's own state: what teacher-forced data record
        if not chained and row % WINDOWS == 0:
            state = torch.zeros(1, 2, model.hidden)
        states[row] = state[0]
        state = model(x[row : row + 1], state)[1]
    return Batch(args=(x, states)), ids


def main(argv: list[str] | None = None) -> int:
    """Run every arm, print the table and write it to docs/benchmarks.md."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--arms", nargs="*", type=int, help="indices into ARMS (none: references only)")
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: the API's, 3e-3 with rollouts, 1e-2 without)",
    )
    ap.add_argument(
        "--chained-rollout",
        type=int,
        default=CHAINED_ROLLOUT,
        help=f"chunks per chained rollout ({CHAINED_ROLLOUT})",
    )
    ap.add_argument(
        "--references",
        action="store_true",
        help="also measure the original rounded to int8 and float16 (no training)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    entry = load_entry("rnn", log=lambda _s: None)
    model = entry.model
    data = {
        "per digit": streams(model, False),
        "chained": streams(model, True),
        # The held-out digits twice over: a stream of 1,436 steps, the state never reset.
        "chained twice": streams(model, True, repeat=2),
    }
    train_x, train_ids = train_streams(model)
    orders_x, orders_ids = train_chained(model, CHAINED_ORDERS)
    first = orders_ids == 0  # order 0: the digits as stored, one stream
    chained_x = tuple(t[first] for t in orders_x)
    chained_ids = orders_ids[first]
    rows = []
    rates: dict[str, float] = {}
    if args.references:
        for kind in ("int8", "float16"):
            ref = rounded(model, kind).eval()
            arm = f"original rounded to {kind}" + (" (per-tensor scale)" if kind == "int8" else "")
            for layout, (batch, ids) in data.items():
                with torch.no_grad():
                    forced = measure_fidelity(
                        ref(*batch.args)[0], model(*batch.args)[0], "probability"
                    )
                free = free_running_fidelity(
                    ref, model, batch, ids, LINK, output_kind="probability"
                )
                rows.append((arm, layout, len(ids), int(ids.max()) + 1, forced, free))
                print(
                    f"{arm}, {layout}: teacher-forced agreement {forced.agreement:.4f}; "
                    f"free-running agreement {free.agreement:.4f} corr {free.correlation:.3f}",
                    flush=True,
                )
    chosen = [ARMS[i] for i in args.arms] if args.arms is not None else list(ARMS)
    for arm, config, rollout, options in chosen:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qt = compress(model, config)
            if rollout in ("chained", "chained orders"):
                x_fit: tuple[torch.Tensor, ...] = chained_x
                ids_fit = chained_ids
                if rollout == "chained orders":
                    x_fit, ids_fit = orders_x, orders_ids
                extra = {"rollouts": Rollouts(LINK, ids_fit, args.chained_rollout, **options)}
            else:
                x_fit = train_x
                extra = (
                    {"rollouts": Rollouts(LINK, train_ids, 2, **options)}
                    if rollout == "rollouts"
                    else {}
                )
            tuned = qt.finetune(x_fit, steps=args.steps, lr=args.lr, progress=False, **extra)
        rates[arm] = tuned.lr
        student = partial(qt.functional, generated=qt.generator.generate_named())

        for layout, (batch, ids) in data.items():
            forced = qt.evaluate(batch.args, output_kind="probability")
            free = free_running_fidelity(
                student, qt.teacher, batch, ids, LINK, output_kind="probability"
            )
            rows.append((arm, layout, len(ids), int(ids.max()) + 1, forced, free))
            print(
                f"{arm}, {layout}: teacher-forced agreement {forced.agreement:.4f} corr "
                f"{forced.correlation:.3f}; free-running agreement {free.agreement:.4f} corr "
                f"{free.correlation:.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    lines = [
        f"Measured {machine()}; `python tools/bench_streams.py`, {args.steps} distillation "
        "steps on the training digits (single chunks with the original's state; rollouts of "
        "both chunks on the student's own state; or chained rollouts: rollouts of "
        f"{args.chained_rollout} chunks along the training digits read as one stream, starting "
        "from the original's carried state), seed 0; rate: the peak learning rate it ran at "
        '(the API\'s default unless `--lr` was given). "+ state": the '
        "rollout loss also pulls the student's carried state towards the original's (mean squared "
        'error over the original\'s mean square, weight 1); "half own": half the rollouts start '
        "from the student's own free-running state on the training streams (refreshed every 50 "
        "steps), the targets still the original's outputs. "
        "Agreement: thresholded probabilities equal; correlation of the probabilities.",
        "",
        "| generator | rate | streams | chunks | teacher-forced agreement / corr | free-running "
        "agreement / corr |",
        "|---|---|---|---|---|---|",
    ]
    for arm, layout, chunks, n_streams, forced, free in rows:
        rate = f"{rates[arm]:g}" if arm in rates else "-"
        plural = "s" if n_streams > 1 else ""
        lines.append(
            f"| {arm} | {rate} | {layout} ({n_streams} stream{plural}) | "
            f"{chunks:,} | {forced.agreement:.1%} / {forced.correlation:.3f} | "
            f"{free.agreement:.1%} / {free.correlation:.3f} |"
        )
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        write_section("bench_streams", "Streaming model as deployed: free-running fidelity", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
