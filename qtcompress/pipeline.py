"""The whole job: compress a model, fine-tune it, export and verify it, and summarise the run.

Used by ``qtcompress compress`` and ``qtcompress demo``; callable from Python as
:func:`run_pipeline`. Every output is written atomically into one folder:

* ``<name>.qtc.safetensors`` — the generator file (regenerates the whole network);
* ``<name>.onnx`` — the reconstructed classical network, checked with onnxruntime;
* ``summary.json`` — the numbers of the summary table;
* ``report/`` — plots and a Markdown page, when asked for (needs matplotlib).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qtcompress.api import QTModel, compress
from qtcompress.atomic import atomic_write_bytes
from qtcompress.config import QTConfig
from qtcompress.errors import ConfigError
from qtcompress.examples import Split, accuracy


@dataclass(frozen=True)
class PipelineSettings:
    """How long and how hard to train, and what to write.

    Attributes:
        fit_steps: Phase-1 steps (reproduce the pretrained weights); 0 skips phase 1.
        fit_lr: Phase-1 peak learning rate.
        finetune_steps: Phase-2 steps (one mini-batch each); 0 skips phase 2.
        finetune_lr: Phase-2 peak learning rate.
        mode: ``"distill"`` (teacher = the original model) or ``"supervised"`` (labels).
        batch_size: Phase-2 mini-batch size.
        progress: Show progress bars.
        report: Also write plots and a Markdown report (needs matplotlib).
        latency_repeats: Timed runs per latency figure.
    """

    fit_steps: int = 300
    fit_lr: float = 2e-2
    finetune_steps: int = 1500
    finetune_lr: float = 1e-2
    mode: str = "distill"
    batch_size: int = 64
    progress: bool = False
    report: bool = False
    latency_repeats: int = 50


@dataclass
class PipelineResult:
    """Everything the summary table shows (all measured in this run).

    Sizes are in bytes, times in seconds unless named ``_ms``; accuracies in [0, 1] or ``None``
    when the data set has no labels.
    """

    name: str
    original_params: int
    generated_weights: int
    generator_params: int
    compression_ratio: float
    n_qubits: int
    n_layers: int
    chunk: int
    checkpoint_bytes: int | None
    generator_file_bytes: int
    onnx_bytes: int
    accuracy_original: float | None
    accuracy_phase1: float | None
    accuracy_finetuned: float | None
    phase1_rel_weight_error: float
    onnx_max_abs_diff: float
    onnx_max_abs_output: float
    latency_torch_ms: dict[str, float]
    latency_onnx_ms: dict[str, float]
    fit_s: float
    finetune_s: float
    total_s: float
    files: dict[str, str]
    histories: dict[str, list[float]] = field(default_factory=dict, repr=False)


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _latencies(model: nn.Module, onnx_path: Path, x: torch.Tensor,
               repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    from qtcompress.runtime import OnnxPredictor

    predictor = OnnxPredictor(onnx_path)
    torch_ms, onnx_ms = {}, {}
    for label, batch in (("batch 1", x[:1]), (f"batch {min(64, len(x))}", x[:64])):
        with torch.no_grad():
            torch_ms[label] = _median_ms(partial(model, batch), repeats)
        onnx_ms[label] = _median_ms(partial(predictor.run, batch.numpy()), repeats)
    return torch_ms, onnx_ms


def run_pipeline(
    model: nn.Module,
    config: QTConfig,
    data: Split,
    out_dir: str | Path,
    *,
    name: str = "model",
    settings: PipelineSettings | None = None,
    checkpoint_bytes: int | None = None,
    model_info: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> PipelineResult:
    """Compress ``model``, fine-tune, export ONNX, verify, save, and measure everything.

    Args:
        model: The pretrained model (not modified).
        config: Generator settings.
        data: Train/test data; labels may be empty tensors when unknown (then accuracies are
            ``None`` and fine-tuning must be ``"distill"``).
        out_dir: Existing or creatable folder (its parent must exist) for all outputs.
        name: Base name of the output files.
        settings: Training and output settings.
        checkpoint_bytes: Size of the original checkpoint file, for the summary.
        model_info: JSON facts stored in the generator file (e.g. the model factory).
        log: Receives one line per stage (the CLI prints them unless quiet).

    Returns:
        The measured :class:`PipelineResult` (also written to ``summary.json``).
    """
    from qtcompress.generator_file import save_generator
    from qtcompress.onnx_export import export_onnx

    settings = settings or PipelineSettings()
    out = Path(out_dir)
    if not out.parent.exists():
        raise ConfigError(f"Cannot create {out}: its parent folder {out.parent} does not exist.")
    out.mkdir(exist_ok=True)
    labelled = data.y_test.numel() > 0 and data.y_train.numel() > 0
    if settings.mode == "supervised" and not labelled:
        raise ConfigError("Supervised fine-tuning needs labels; use mode 'distill' or give labels.")
    start = time.perf_counter()
    model = model.eval()

    def acc(m: Any) -> float | None:
        return accuracy(m, data.x_test, data.y_test) if labelled else None

    accuracy_original = acc(model)
    qt: QTModel = compress(model, config)
    rep = qt.report()
    log(f"compressing {rep.generated_weights:,} weights with {rep.trainable:,} generator "
        f"parameters ({rep.n_qubits} qubits x {rep.n_layers} layers, chunk {rep.chunk})")
    histories: dict[str, list[float]] = {}
    fit_s = finetune_s = 0.0
    if settings.fit_steps > 0:
        r1 = qt.fit_weights(steps=settings.fit_steps, lr=settings.fit_lr,
                            progress=settings.progress)
        fit_s, histories["phase 1: reproduce weights"] = r1.elapsed_s, r1.history
    phase1_error = qt.weight_errors()["_total"]
    accuracy_phase1 = acc(qt.materialize().eval())
    log(f"phase 1: relative weight error {phase1_error:.3f}"
        + (f", accuracy {accuracy_phase1:.2%}" if accuracy_phase1 is not None else ""))
    if settings.finetune_steps > 0:
        labels = data.y_train if settings.mode == "supervised" else None
        r2 = qt.finetune(data.x_train, labels, mode=settings.mode, steps=settings.finetune_steps,
                         lr=settings.finetune_lr, batch_size=settings.batch_size,
                         progress=settings.progress)
        finetune_s, histories[f"phase 2: fine-tune ({settings.mode})"] = r2.elapsed_s, r2.history
    student = qt.materialize().eval()
    accuracy_finetuned = acc(student)
    if accuracy_finetuned is not None:
        log(f"phase 2: accuracy {accuracy_finetuned:.2%}")

    example = data.x_test[:2]
    gen_path = out / f"{name}.qtc.safetensors"
    onnx_path = out / f"{name}.onnx"
    save_generator(qt, gen_path, example_inputs=(example,), model_info=model_info)
    export = export_onnx(student, (example,), onnx_path)
    torch_ms, onnx_ms = _latencies(student, onnx_path, data.x_test, settings.latency_repeats)
    log(f"wrote {gen_path.name} ({gen_path.stat().st_size:,} bytes) and {onnx_path.name} "
        f"(onnxruntime vs torch max |diff| {export.max_abs_diff:.2g})")
    files = {"generator": str(gen_path), "onnx": str(onnx_path),
             "summary": str(out / "summary.json")}
    result = PipelineResult(
        name=name,
        original_params=sum(p.numel() for p in model.parameters()),
        generated_weights=rep.generated_weights,
        generator_params=rep.trainable,
        compression_ratio=rep.generated_weights / rep.trainable,
        n_qubits=rep.n_qubits, n_layers=rep.n_layers, chunk=rep.chunk,
        checkpoint_bytes=checkpoint_bytes,
        generator_file_bytes=gen_path.stat().st_size,
        onnx_bytes=onnx_path.stat().st_size,
        accuracy_original=accuracy_original,
        accuracy_phase1=accuracy_phase1,
        accuracy_finetuned=accuracy_finetuned,
        phase1_rel_weight_error=phase1_error,
        onnx_max_abs_diff=export.max_abs_diff,
        onnx_max_abs_output=export.max_abs_output,
        latency_torch_ms=torch_ms, latency_onnx_ms=onnx_ms,
        fit_s=fit_s, finetune_s=finetune_s, total_s=0.0, files=files, histories=histories)
    if settings.report:
        from qtcompress.report import write_report

        original = dict(model.named_parameters())
        rebuilt = dict(student.named_parameters())
        weights = {s.name: (original[s.name].detach().numpy(), rebuilt[s.name].detach().numpy())
                   for s in qt.layout.specs}
        report = write_report(out / "report", summary_rows(result), histories, weights,
                              title=f"qtcompress report: {name}")
        files["report"] = str(report)
    result.total_s = time.perf_counter() - start
    payload = {k: v for k, v in asdict(result).items() if k != "histories"}
    atomic_write_bytes(out / "summary.json", (json.dumps(payload, indent=2) + "\n").encode())
    return result


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _size(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,} B"


def summary_rows(r: PipelineResult) -> dict[str, str]:
    """The summary table as ordered label -> value strings."""
    relative = r.onnx_max_abs_diff / max(r.onnx_max_abs_output, 1e-30)
    rows = {
        "original parameters": f"{r.original_params:,}",
        "generated weights (M)": f"{r.generated_weights:,}",
        "generator parameters (trainable)": f"{r.generator_params:,} "
        f"({r.generator_params / r.generated_weights:.1%} of M)",
        "compression ratio (M / generator)": f"{r.compression_ratio:.2f}x",
        "QNN": f"{r.n_qubits} qubits x {r.n_layers} layers, {r.chunk} weights per basis state",
        "checkpoint file": _size(r.checkpoint_bytes),
        "generator file": _size(r.generator_file_bytes),
        "ONNX file": _size(r.onnx_bytes),
        "accuracy: original": _pct(r.accuracy_original),
        "accuracy: phase 1 (weights fitted)": _pct(r.accuracy_phase1)
        + f" (relative weight error {r.phase1_rel_weight_error:.3f})",
        "accuracy: fine-tuned": _pct(r.accuracy_finetuned),
        "ONNX vs torch max |diff|": f"{r.onnx_max_abs_diff:.2g} (outputs up to "
        f"{r.onnx_max_abs_output:.3g}: {relative:.1g} relative)",
    }
    for label in r.latency_torch_ms:
        rows[f"latency {label}: torch / onnxruntime"] = (
            f"{r.latency_torch_ms[label]:.3f} ms / {r.latency_onnx_ms[label]:.3f} ms")
    rows["time: phase 1 / phase 2 / total"] = f"{r.fit_s:.1f} s / {r.finetune_s:.1f} s / " \
        f"{r.total_s:.1f} s"
    return rows


def format_summary(r: PipelineResult) -> str:
    """The summary as an aligned plain-text table."""
    rows = summary_rows(r)
    width = max(len(k) for k in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows.items())


def load_npz_split(path: str | Path) -> Split:
    """Read a data set from ``.npz`` with ``x_train``, ``x_test`` and optional labels.

    Labels (``y_train``, ``y_test``) may be absent: then only distillation is possible.
    """
    from qtcompress.runtime import load_arrays

    arrays = load_arrays(path)
    if not isinstance(arrays, dict):
        raise ConfigError(f"{path}: expected an .npz with x_train and x_test arrays.")
    missing = [k for k in ("x_train", "x_test") if k not in arrays]
    if missing:
        raise ConfigError(f"{path}: missing arrays {missing} (found {sorted(arrays)}).")

    def tensor(key: str, labels: bool) -> torch.Tensor:
        if key not in arrays:
            return torch.empty(0, dtype=torch.int64)
        array = np.ascontiguousarray(arrays[key])
        # Integer inputs (token ids) stay integers; everything else becomes float32.
        if labels or np.issubdtype(array.dtype, np.integer):
            return torch.from_numpy(array).to(torch.int64)
        return torch.from_numpy(array).to(torch.float32)

    return Split(tensor("x_train", False), tensor("y_train", True),
                 tensor("x_test", False), tensor("y_test", True))
