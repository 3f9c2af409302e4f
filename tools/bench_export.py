"""Export once: what the pipeline's save stage costs, against the old path that exported twice.

On the shipped digits CNN (the demo's checkpoint and data), after a short ``compress()``
(training does not change what saving costs), interleaved rounds time:

* **once**, what ``run_pipeline`` does: materialise the student, one ``to_onnx_proto``, then
  ``save_generator(exported=..., materialized=...)`` and ``export_onnx(exported=...)`` share it;
* **twice**, each file on its own, as before issue 12: ``save_generator(example_inputs=...)``
  materialises and exports, and ``export_onnx(qt.materialize(), ...)`` does both again (the
  pipeline then also regenerated the weights twice more; that is not reproduced here).

Each round counts and times the ``torch.onnx.export`` calls and counts the passes over the
generated weights (``iter_blocks``) by wrapping them. ``--demo`` then runs ``qtcompress demo``
in-process once and reports how much of it was spent inside ``torch.onnx.export``.

Threads: torch 2, ``OMP_NUM_THREADS=2``, ``OPENBLAS_NUM_THREADS=2``, ``GOMP_SPINCOUNT=1000``
(as the CLI sets it), qsim's default (one thread at the demo's size).

Usage: python tools/bench_export.py [--rounds 5] [--demo] [--no-write]
"""

from __future__ import annotations

import os

THREADS = 2
for key, value in {
    "OMP_NUM_THREADS": str(THREADS),
    "OPENBLAS_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "GOMP_SPINCOUNT": "1000",
}.items():
    os.environ.setdefault(key, value)  # read when torch loads its OpenMP and BLAS pools

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import qtcompress.onnx.export as onnx_export  # noqa: E402
from qtcompress import QTConfig, compress  # noqa: E402
from qtcompress.examples import load_dataset  # noqa: E402
from qtcompress.generator import Generator  # noqa: E402
from qtcompress.generator_file.save import save_generator  # noqa: E402
from qtcompress.io.model_source import load_model  # noqa: E402
from qtcompress.onnx.export import export_onnx, to_onnx_proto  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import ROOT, machine, write_section  # noqa: E402

CARD = ROOT / "models" / "digits_cnn.json"  # what `qtcompress demo` compresses


class Meter:
    """Counts and times ``torch.onnx.export`` calls and counts generator passes while active."""

    def __init__(self) -> None:
        self.exports, self.export_s, self.passes = 0, 0.0, 0

    @contextlib.contextmanager
    def active(self) -> Iterator[Meter]:
        real_export = torch.onnx.export
        meter = self

        def timed_export(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return real_export(*args, **kwargs)
            finally:
                meter.exports += 1
                meter.export_s += time.perf_counter() - start

        torch.onnx.export = timed_export  # type: ignore[assignment]
        onnx_export.torch.onnx.export = timed_export  # type: ignore[assignment]
        patched = []
        for cls in Generator.__subclasses__():
            real = cls.iter_blocks
            patched.append((cls, real))
            cls.iter_blocks = _counting(real, self)  # type: ignore[method-assign]
        try:
            yield self
        finally:
            torch.onnx.export = real_export
            onnx_export.torch.onnx.export = real_export
            for cls, real in patched:
                cls.iter_blocks = real  # type: ignore[method-assign]


def _counting(real: Callable[..., Any], meter: Meter) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        meter.passes += 1
        return real(*args, **kwargs)

    return wrapper


def demo_model() -> tuple[Any, Any]:
    """The demo's checkpoint and data split, as ``qtcompress demo`` loads them."""
    card = json.loads(CARD.read_text())
    model = load_model(
        CARD.with_suffix(".safetensors"), factory=card["factory"], factory_kwargs=card["kwargs"]
    )
    return model.eval(), load_dataset(card["dataset"], seed=card["split_seed"])


def save_once(qt: Any, example: torch.Tensor, out: Path) -> None:
    """The pipeline's save stage (``run_pipeline``): one export shared by both files."""
    student = qt.materialize().eval()
    proto = to_onnx_proto(student, example)
    save_generator(
        qt, out / "m.qtc.safetensors", example_inputs=example, exported=proto, materialized=student
    )
    export_onnx(student, example, out / "m.onnx", exported=proto)


def save_twice(qt: Any, example: torch.Tensor, out: Path) -> None:
    """The save stage before issue 12: each file materialises and exports on its own."""
    save_generator(qt, out / "m.qtc.safetensors", example_inputs=example)
    export_onnx(qt.materialize().eval(), example, out / "m.onnx")


def rounds(n: int) -> dict[str, dict[str, float]]:
    """Interleaved rounds of both save paths; medians of time, export time and counts."""
    model, data = demo_model()
    qt = compress(model, QTConfig())
    qt.fit_weights(steps=20, progress=False)
    example = data.x_test[:8]
    samples: dict[str, list[tuple[float, float, int, int]]] = {"once": [], "twice": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n + 1):  # round 0 warms both paths up (imports, registries)
            for name, fn in (("once", save_once), ("twice", save_twice)):
                meter = Meter()
                with meter.active():
                    start = time.perf_counter()
                    fn(qt, example, Path(tmp))
                    total = time.perf_counter() - start
                if i:
                    samples[name].append((total, meter.export_s, meter.exports, meter.passes))
                print(
                    f"round {i} {name:5s} {total:6.2f} s  exports {meter.exports} "
                    f"({meter.export_s:.2f} s)  weight passes {meter.passes}",
                    flush=True,
                )
    return {
        name: {
            "total_s": statistics.median(s[0] for s in rows),
            "export_s": statistics.median(s[1] for s in rows),
            "exports": statistics.median(s[2] for s in rows),
            "passes": statistics.median(s[3] for s in rows),
        }
        for name, rows in samples.items()
    }


def demo_run() -> dict[str, float]:
    """``qtcompress demo`` in-process, with the time inside ``torch.onnx.export`` measured."""
    from qtcompress.cli import main as cli_main

    meter = Meter()
    with tempfile.TemporaryDirectory() as tmp, meter.active():
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli_main(["demo", "-o", str(Path(tmp) / "demo")])
        total = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"qtcompress demo exited with {rc}")
    return {
        "total_s": total,
        "export_s": meter.export_s,
        "exports": meter.exports,
        "passes": meter.passes,
    }


def to_markdown(result: dict[str, dict[str, float]], demo: dict[str, float] | None) -> str:
    once, twice = result["once"], result["twice"]
    lines = [
        f"Saving the compressed digits CNN (the demo's checkpoint, {THREADS} torch threads, "
        "OMP/OpenBLAS 2, GOMP_SPINCOUNT=1000), both paths interleaved in one process, medians "
        f"of the timed rounds after a warm-up round. Measured {machine()}; written by "
        "`tools/bench_export.py`.",
        "",
        "| save stage | time (s) | `torch.onnx.export` calls | time inside them (s) "
        "| passes over the weights |",
        "|---|---|---|---|---|",
        f"| once (the pipeline now) | {once['total_s']:.2f} | {once['exports']:.0f} "
        f"| {once['export_s']:.2f} | {once['passes']:.0f} |",
        "| twice (each file on its own, as before issue 12) "
        f"| {twice['total_s']:.2f} | {twice['exports']:.0f} "
        f"| {twice['export_s']:.2f} | {twice['passes']:.0f} |",
        "",
        f"The second export and the extra passes cost {twice['total_s'] - once['total_s']:.2f} s "
        f"per save ({twice['total_s'] / once['total_s']:.2f}x the stage's time).",
    ]
    if demo is not None:
        lines += [
            "",
            f"`qtcompress demo` run once in the same process: {demo['total_s']:.1f} s in all, "
            f"{demo['exports']:.0f} `torch.onnx.export` call taking {demo['export_s']:.2f} s "
            f"({demo['export_s'] / demo['total_s']:.1%} of the run), "
            f"{demo['passes']:.0f} passes over the generated weights.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per path")
    parser.add_argument("--demo", action="store_true", help="also run qtcompress demo once")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    torch.set_num_threads(THREADS)
    result = rounds(args.rounds)
    demo = demo_run() if args.demo else None
    markdown = to_markdown(result, demo)
    print(markdown)
    if not args.no_write:
        write_section("bench_export", "Export once (`tools/bench_export.py`)", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
