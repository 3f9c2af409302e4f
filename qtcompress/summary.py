"""The run's summary: its measured result, the printed table and ``summary.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qtcompress.api import QTModel


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
    scheme: str
    shape: str
    budget: str
    generated_kinds: dict[str, list[int]]
    output_kind: str
    accuracy_original: float | None
    accuracy_phase1: float | None
    accuracy_finetuned: float | None
    fidelity_phase1: dict[str, Any]
    fidelity_finetuned: dict[str, Any]
    warnings: list[str]
    min_fidelity: float | None
    fidelity_ok: bool
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
    storage: str = "float32"
    storage_note: str = ""
    search: list[dict[str, Any]] = field(default_factory=list)
    state_link: str | None = None
    fidelity_free_running: dict[str, Any] | None = None
    basis_state: str = ""
    finetune_lr: float | None = None  # phase 2's peak rate (None: no phase 2)
    finetune_lr_reason: str = ""  # where it came from: given, or the default for this model
    finetune_steps: int = 0  # phase 2's step count (0: no phase 2)
    finetune_steps_reason: str = ""  # given, or the default for this run


def shape_of(qt: QTModel) -> str:
    """The generator's shape in a few words (its scheme's ``describe_shape``)."""
    return qt.generator.describe_shape()


def _fidelity_text(fid: dict[str, Any]) -> str:
    name, value = fid["headline_name"], fid["headline"]
    text = f"{value:.2%}" if name in ("agreement", "decode_agreement") else f"{value:.4f}"
    extra = f", correlation {fid['correlation']:.3f}" if name != "correlation" else ""
    dead = " (DEGENERATE: constant outputs)" if fid["degenerate"] else ""
    return f"{name} {text}{extra}{dead}"


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
        "QNN": f"{r.n_qubits} qubits x {r.n_layers} layers, {r.basis_state}",
        "generator": f"{r.scheme} scheme, {r.shape}, budget {r.budget}",
        "generated tensors": ", ".join(
            f"{k} {n} ({v:,})" for k, (n, v) in r.generated_kinds.items()
        ),
        "generator storage": r.storage + (f" ({r.storage_note})" if r.storage_note else ""),
        "checkpoint file": _size(r.checkpoint_bytes),
        "generator file": _size(r.generator_file_bytes),
        "ONNX file": _size(r.onnx_bytes),
        "output kind": r.output_kind,
        "fidelity: phase 1 (weights fitted"
        + (", validation split)" if r.search else ")"): _fidelity_text(r.fidelity_phase1)
        + f" (relative weight error {r.phase1_rel_weight_error:.3f})",
        "fidelity: fine-tuned" + (" (teacher-forced)" if r.state_link else ""): _fidelity_text(
            r.fidelity_finetuned
        ),
        **(
            {"fidelity: free-running (as deployed)": _fidelity_text(r.fidelity_free_running)}
            if r.fidelity_free_running
            else {}
        ),
        "accuracy: original / phase 1 / fine-tuned": " / ".join(
            _pct(a) for a in (r.accuracy_original, r.accuracy_phase1, r.accuracy_finetuned)
        ),
        "ONNX vs torch max |diff|": f"{r.onnx_max_abs_diff:.2g} (outputs up to "
        f"{r.onnx_max_abs_output:.3g}: {relative:.1g} relative)",
    }
    for label in r.latency_torch_ms:
        rows[f"latency {label}: torch / onnxruntime"] = (
            f"{r.latency_torch_ms[label]:.3f} ms / {r.latency_onnx_ms[label]:.3f} ms"
        )
    if r.search:
        tried = ", ".join(f"{p['budget']:.2%}: {p['validation_fidelity']:.4f}" for p in r.search)
        rows["budget search (validation)"] = tried
    for i, w in enumerate(r.warnings):
        rows[f"WARNING {i + 1}"] = w
    if r.finetune_lr is not None:
        rows["phase 2 learning rate"] = f"{r.finetune_lr:g} ({r.finetune_lr_reason})"
    if r.finetune_steps:
        rows["phase 2 steps"] = f"{r.finetune_steps:,} ({r.finetune_steps_reason})"
    rows["time: phase 1 / phase 2 / total"] = (
        f"{r.fit_s:.1f} s / {r.finetune_s:.1f} s / {r.total_s:.1f} s"
    )
    return rows


def format_summary(r: PipelineResult) -> str:
    """The summary as an aligned plain-text table."""
    rows = summary_rows(r)
    width = max(len(k) for k in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows.items())
