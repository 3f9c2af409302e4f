"""Issue 24's streaming audio model, compressed and measured free-running on held-out streams.

The voice-activity detector of ``tools/audio_stream.py`` (DFT + Conv1d + Linear front end,
LSTMCell(128, 128) carrying ``(h, c)`` as ``state (B, 2, 128)``, ``forward(x, state) ->
(prob, state)``; 433,009 weights, no BatchNorm) on synthetic 8 kHz audio in 256-sample chunks,
zero-padded chunks included. Each arm compresses it with the real API: ``compress(model,
config)``, ``qt.fit_weights(steps=100)`` (the pipeline's phase 1), then ``qt.finetune(...,
rollouts=Rollouts(link, stream_ids, L))``: distillation over rollouts of ``L`` consecutive
chunks of the training streams, each rollout starting from the original's recorded state and
the student then carrying its own (the "chained" data of ``tools/bench_streams.py``: rows are
``(chunk, original's state before it)`` in stream order with a stream id per row).

Measured on the held-out streams (each 1,875 chunks = 60 s):

* **free-running**: the original and the student each start every stream from the zero state
  and carry their own (:func:`qtcompress.train.streams.free_running_fidelity`): decision
  agreement (prob > 0.5) and Pearson correlation of the probabilities; also the worst stream's
  figures, and each model's accuracy against the chunk labels;
* **teacher-forced**: every chunk gets the original's state (``qt.evaluate``).

References, no training: the original with every weight rounded to int8 (one symmetric scale
per tensor) or to float16, free-running the same way.

Arms (:data:`ARMS`): the hashed default (0.5% of M) and ``budget=0.05`` (which the hashed
scheme resolves to 1.4% of this model: its QNN is capped at 12 qubits x 256 layers) with
``finetune()``'s default ``restore_best=True`` (it ends at the best state on its probe, the
first 256 training rows run teacher-forced) and with ``restore_best=False`` (the last state);
rollouts of 4, 8 or 16 chunks; and the rows scheme at a true 5% with rollouts of 8, 32, 128.

Run: ``python tools/bench_audio_stream.py [--arms 0 2 ...]`` (seed 0; 3 to 12 minutes per arm
on one shared thread, about 1.5 h for all). Appends JSON lines to ``build/audio/runs.jsonl``
and prints a Markdown table of every run there of this seed and step count (the latest per
arm). Threads: torch 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audio_stream import CACHE, CHUNK, load_data, load_model, run_stream, weights  # noqa: E402
from baselines import rounded  # noqa: E402
from benchdoc import machine  # noqa: E402

from qtcompress import QTConfig, compress  # noqa: E402
from qtcompress.data.batch import Batch  # noqa: E402
from qtcompress.train.objectives import Fidelity, measure_fidelity  # noqa: E402
from qtcompress.train.streams import (  # noqa: E402
    Rollouts,
    StateLink,
    free_running_fidelity,
    free_running_outputs,
)

LINK = StateLink(input=1, output=1)
# The arms measured before rollouts from the student's own state became the default keep
# their meaning: rollouts from the original's state only.
_OWN_OFF = {"own_share": 0.0}
_ROWS = QTConfig(scheme="rows", budget=0.05)
FIT_STEPS = 100  # the pipeline's phase 1 default
# (name, config, rollout length, restore_best, Rollouts options): restore_best=True is
# finetune()'s default (end at the best state on its probe: rollouts over the training streams
# since 2026-12-05, single chunks teacher-forced before); False keeps the last state. The first
# arms are the two targets. own_share: a share of the rollouts starts from the
# student's own free-running state (Rollouts.own_share).
ARMS: tuple[tuple[str, QTConfig, int, bool, dict[str, float]], ...] = (
    ("hashed QNN 0.5% (default), rollouts 8", QTConfig(), 8, True, _OWN_OFF),
    ("hashed QNN 5% (budget=0.05), rollouts 8", QTConfig(budget=0.05), 8, True, _OWN_OFF),
    ("hashed QNN 0.5% (default), rollouts 8, last state", QTConfig(), 8, False, _OWN_OFF),
    (
        "hashed QNN 5% (budget=0.05), rollouts 8, last state",
        QTConfig(budget=0.05),
        8,
        False,
        _OWN_OFF,
    ),
    ("hashed QNN 0.5% (default), rollouts 4, last state", QTConfig(), 4, False, _OWN_OFF),
    ("hashed QNN 0.5% (default), rollouts 16, last state", QTConfig(), 16, False, _OWN_OFF),
    (
        "hashed QNN 5% (budget=0.05), rollouts 16, last state",
        QTConfig(budget=0.05),
        16,
        False,
        _OWN_OFF,
    ),
    ("rows 5% (scheme=rows, budget=0.05), rollouts 8, last state", _ROWS, 8, False, _OWN_OFF),
    ("rows 5% (scheme=rows, budget=0.05), rollouts 32, last state", _ROWS, 32, False, _OWN_OFF),
    ("rows 5% (scheme=rows, budget=0.05), rollouts 128, last state", _ROWS, 128, False, _OWN_OFF),
    ("hashed QNN 0.5% (default), rollouts 8, half own", QTConfig(), 8, True, {"own_share": 0.5}),
    (
        "hashed QNN 0.5% (default), rollouts 32, half own",
        QTConfig(),
        32,
        True,
        {"own_share": 0.5},
    ),
    (
        "hashed QNN 5% (budget=0.05), rollouts 8, half own",
        QTConfig(budget=0.05),
        8,
        True,
        {"own_share": 0.5},
    ),
    ("hashed QNN 0.5% (default), rollouts 8, all own", QTConfig(), 8, True, {"own_share": 1.0}),
    ("hashed QNN 0.5% (default), rollouts 16, half own", QTConfig(), 16, True, {"own_share": 0.5}),
    # Where the free-running error comes from: the recurrent matrix (15% of M) or the whole
    # LSTM cell (30%) kept as the original's, the rest generated as in the default arm.
    (
        "hashed QNN 0.5% (default), rollouts 8, half own, cell.weight_hh not generated",
        QTConfig(exclude=("cell.weight_hh",)),
        8,
        True,
        {"own_share": 0.5},
    ),
    (
        "hashed QNN 0.5% (default), rollouts 8, half own, cell not generated",
        QTConfig(exclude=("cell",)),
        8,
        True,
        {"own_share": 0.5},
    ),
    # The pipeline's old rollout length (4) and the 5% budget at 16 and 32.
    ("hashed QNN 0.5% (default), rollouts 4, half own", QTConfig(), 4, True, {"own_share": 0.5}),
    (
        "hashed QNN 5% (budget=0.05), rollouts 16, half own",
        QTConfig(budget=0.05),
        16,
        True,
        {"own_share": 0.5},
    ),
    (
        "hashed QNN 5% (budget=0.05), rollouts 32, half own",
        QTConfig(budget=0.05),
        32,
        True,
        {"own_share": 0.5},
    ),
)


def rows_of(x: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Streams (S, T, ...) as rows in stream order: chunks, states and stream ids."""
    s, t = x.shape[:2]
    ids = torch.arange(s).repeat_interleave(t)
    return x.reshape(s * t, CHUNK), states.reshape(s * t, *states.shape[2:]), ids


def per_stream(s: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """The worst stream's free-running agreement and correlation."""
    agree, corr = [], []
    for i in ids.unique():
        m = ids == i
        f = measure_fidelity(s[m], t[m], "probability")
        agree.append(f.agreement)
        corr.append(f.correlation)
    return {"worst_agreement": min(agree), "worst_correlation": min(corr)}


def fid_dict(f: Fidelity) -> dict[str, Any]:
    """The figures kept in the JSON lines."""
    return {
        "agreement": f.agreement,
        "correlation": f.correlation,
        "relative_error": f.relative_error,
        "accuracy": f.accuracy,
        "teacher_accuracy": f.teacher_accuracy,
        "spread_ratio": f.spread_ratio,
        "n": f.n,
    }


def measure(
    student: Any, teacher: Any, test: Batch, ids: torch.Tensor, labels: torch.Tensor
) -> tuple[Fidelity, dict[str, float]]:
    """Free-running fidelity (the API's) and the worst stream's figures."""
    free = free_running_fidelity(
        student, teacher, test, ids, LINK, output_kind="probability", labels=labels
    )
    s = free_running_outputs(student, test, ids, LINK, None)
    t = free_running_outputs(teacher, test, ids, LINK, None)
    return free, per_stream(s, t, ids)


@torch.no_grad()
def forced_reference(
    student: torch.nn.Module, model: torch.nn.Module, test: Batch, labels: torch.Tensor
) -> Fidelity:
    """Teacher-forced fidelity of a plain module (every chunk with the original's state)."""
    x, st = test.args
    s = torch.cat([student(x[i : i + 2048], st[i : i + 2048])[0] for i in range(0, len(x), 2048)])
    t = torch.cat([model(x[i : i + 2048], st[i : i + 2048])[0] for i in range(0, len(x), 2048)])
    return measure_fidelity(s, t, "probability", labels)


def table_rows(
    path: Path, seed: int, steps: int, fallback: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every run in ``path`` of this seed and step count (the latest per arm), references first."""
    if not path.exists():
        return fallback
    latest: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["seed"] == seed and r.get("finetune_steps", steps) == steps:
            latest[r["arm"]] = r
    return sorted(latest.values(), key=lambda r: r["kind"] != "reference")


def main(argv: list[str] | None = None) -> int:
    """Run the references and every arm; JSON lines and a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500, help="fine-tuning steps per arm")
    ap.add_argument("--fit-steps", type=int, default=FIT_STEPS)
    ap.add_argument("--train-streams", type=int, default=32, help="training streams distilled on")
    ap.add_argument("--arms", type=int, nargs="*", default=None, help="indices into ARMS")
    ap.add_argument("--seed", type=int, default=0, help="data and model seed (retrains)")
    ap.add_argument(
        "--generator-seed", type=int, default=None, help="QTConfig seed of every arm (default 0)"
    )
    ap.add_argument("--lr", type=float, default=None, help="peak rate (default: the scheme's)")
    ap.add_argument(
        "--source-lr-factor", type=float, default=1.0, help="the shared values' rate multiple"
    )
    ap.add_argument("--out", type=Path, default=CACHE / "runs.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    model = load_model(args.seed)
    card = json.loads((CACHE / "vad.json").read_text())
    train, test = load_data(args.seed)

    # Distillation data: the first training streams, each chunk with the original's own state
    # before it (the original run free from the zero state), and its stream id.
    _, st_train = run_stream(model, train.x[: args.train_streams])
    x_fit, s_fit, ids_fit = rows_of(train.x[: args.train_streams], st_train)
    # Held-out: every test stream (1,875 chunks each) from the zero state.
    probs_test, st_test = run_stream(model, test.x)
    x_test, s_test, ids_test = rows_of(test.x, st_test)
    labels = test.y.reshape(-1)
    test_batch = Batch(args=(x_test, s_test))
    n_streams, chunks = test.x.shape[:2]
    print(
        f"model: {weights(model):,} weights; held-out {n_streams} streams x {chunks:,} chunks; "
        f"original's accuracy {float(((probs_test > 0.5).float() == test.y).float().mean()):.4f}"
        f"; distilling on {args.train_streams} training streams ({len(x_fit):,} chunks)",
        flush=True,
    )
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    common = {
        "date": stamp,
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "model_weights": weights(model),
        "model_test_acc": card["test_acc"],
        "test_streams": n_streams,
        "test_chunks_per_stream": chunks,
        "train_streams_distilled": args.train_streams,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []

    def record(row: dict[str, Any]) -> None:
        results.append(row)
        with args.out.open("a") as fh:
            fh.write(json.dumps({**common, **row}) + "\n")

    for kind in ("int8", "float16"):
        t0 = time.perf_counter()
        ref = rounded(model, kind).eval()
        free, worst = measure(ref, model, test_batch, ids_test, labels)
        forced = forced_reference(ref, model, test_batch, labels)
        row = {
            "arm": f"original rounded to {kind} (per-tensor scale)"
            if kind == "int8"
            else "original rounded to float16",
            "kind": "reference",
            "free": fid_dict(free),
            "forced": fid_dict(forced),
            **worst,
            "seconds": time.perf_counter() - t0,
        }
        record(row)
        print(
            f"{row['arm']}: free-running agreement {free.agreement:.4f} corr "
            f"{free.correlation:.4f} (worst stream {worst['worst_agreement']:.4f} / "
            f"{worst['worst_correlation']:.4f}); teacher-forced {forced.agreement:.4f} / "
            f"{forced.correlation:.4f}",
            flush=True,
        )

    arms = [ARMS[i] for i in args.arms] if args.arms is not None else list(ARMS)
    for name, config, length, restore, options in arms:
        if args.generator_seed is not None:
            config = dataclasses.replace(config, seed=args.generator_seed)
            name = f"{name}, generator seed {args.generator_seed}"
        if args.lr is not None:
            name = f"{name}, lr {args.lr:g}"
        if args.source_lr_factor != 1.0:
            name = f"{name}, source lr x{args.source_lr_factor:g}"
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qt = compress(model, config)
            rep = qt.report()
            r1 = qt.fit_weights(steps=args.fit_steps, progress=False) if args.fit_steps else None
            t_fit = time.perf_counter() - t0
            err1 = qt.weight_errors()["_total"]
            with torch.no_grad():
                gen1 = qt.generator.generate_named()
            free1 = free_running_fidelity(
                partial(qt.functional, generated=gen1),
                qt.teacher,
                test_batch,
                ids_test,
                LINK,
                output_kind="probability",
                labels=labels,
            )
            forced1 = qt.evaluate(test_batch.args, labels, output_kind="probability")
            t1 = time.perf_counter()
            r2 = qt.finetune(
                (x_fit, s_fit),
                steps=args.steps,
                progress=False,
                rollouts=Rollouts(LINK, ids_fit, length, **options),
                restore_best=restore,
                lr=args.lr,
                source_lr_factor=args.source_lr_factor,
            )
            t_tune = time.perf_counter() - t1
        with torch.no_grad():
            gen = qt.generator.generate_named()
        student = partial(qt.functional, generated=gen)
        free, worst = measure(student, qt.teacher, test_batch, ids_test, labels)
        forced = qt.evaluate(test_batch.args, labels, output_kind="probability")
        row = {
            "arm": name,
            "kind": "qtcompress",
            "config": config.to_dict(),
            "rollout": length,
            "rollout_options": options,
            "restore_best": restore,
            "fit_steps": args.fit_steps,
            "finetune_steps": args.steps,
            "finetune_lr": r2.lr,  # the rate it ran at (default: 3e-3, it carries state)
            "generated_weights": rep.generated_weights,
            "generator_params": rep.trainable,
            "generator_ratio": rep.ratio,
            "qubits": rep.n_qubits,
            "layers": rep.n_layers,
            "phase1_weight_error": err1,
            "weight_error_after_finetune": qt.weight_errors()["_total"],
            "phase1_free": fid_dict(free1),
            "phase1_forced": fid_dict(forced1),
            "free": fid_dict(free),
            "forced": fid_dict(forced),
            **worst,
            "fit_s": t_fit,
            "finetune_s": t_tune,
            "finetune_best_step": r2.best_step,
            "finetune_restarts": r2.restarts,
            "finetune_skipped": r2.skipped_steps,
            "revived": list(qt.revived),
            "phase1_final_loss": r1.final_loss if r1 else None,
            "warnings": sorted({str(w.message)[:300] for w in caught}),
            "seconds": time.perf_counter() - t0,
        }
        record(row)
        print(
            f"{name}: {rep.trainable:,} generator params ({rep.ratio:.2%}); phase 1 free "
            f"{free1.agreement:.4f}/{free1.correlation:.4f}; free-running agreement "
            f"{free.agreement:.4f} corr {free.correlation:.4f} (worst stream "
            f"{worst['worst_agreement']:.4f} / {worst['worst_correlation']:.4f}); teacher-forced "
            f"{forced.agreement:.4f} / {forced.correlation:.4f}; acc {free.accuracy:.4f} vs "
            f"{free.teacher_accuracy:.4f}; fit {t_fit:.0f} s, fine-tune {t_tune:.0f} s "
            f"(best step {r2.best_step}, restarts {r2.restarts}, skipped {r2.skipped_steps})",
            flush=True,
        )
        for w in row["warnings"]:
            print(f"  warning: {w}", flush=True)

    lines = [
        f"Measured {stamp} on {machine()}, torch threads {torch.get_num_threads()}; "
        f"`python tools/bench_audio_stream.py --steps {args.steps}`, seed {args.seed}. Model: "
        f"tools/audio_stream.py VADStream, {weights(model):,} weights, held-out accuracy "
        f"{card['test_acc']:.1%} (free-running from the zero state). Each arm: compress(), "
        f"fit_weights({args.fit_steps} steps), finetune({args.steps} steps, the scheme's "
        f"learning rate, batch 64, rollouts of L chunks on the student's own state, starting "
        f"from the original's state) on {args.train_streams} training streams "
        f"({len(x_fit):,} chunks). Held out: {n_streams} streams x {chunks:,} chunks "
        "(60 s each, zero-padded chunks at the end), every model from the zero state carrying "
        "its own state (free-running); teacher-forced: every chunk with the original's state. "
        "Agreement: prob > 0.5 equal; corr: Pearson correlation of the probabilities.",
        "",
        "| arm | generator params (of M) | fine-tune s (best step) | free-running agreement / "
        "corr | worst stream agreement / corr | teacher-forced agreement / corr | "
        "accuracy student / original | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table_rows(args.out, args.seed, args.steps, results):
        f, fo = r["free"], r["forced"]
        params = (
            f"{r['generator_params']:,} ({r['generator_ratio']:.2%})"
            if r["kind"] == "qtcompress"
            else "-"
        )
        tune = (
            f"{r['finetune_s']:.0f} ({r['finetune_best_step']})"
            if r["kind"] == "qtcompress"
            else "-"
        )
        lines.append(
            f"| {r['arm']} | {params} | {tune} | {f['agreement']:.1%} / {f['correlation']:.3f} | "
            f"{r['worst_agreement']:.1%} / {r['worst_correlation']:.3f} | "
            f"{fo['agreement']:.1%} / {fo['correlation']:.3f} | "
            f"{f['accuracy']:.1%} / {f['teacher_accuracy']:.1%} | {r['seconds']:.0f} s |"
        )
    print("\n".join(lines))
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
