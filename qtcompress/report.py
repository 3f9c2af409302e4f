"""Pictures of a compression run: loss curves, weight histograms, and a one-page Markdown report.

Needs matplotlib (``pip install "qtcompress[report]"``); everything else in qtcompress works
without it. Files are written atomically, so an interrupted run leaves no half-written image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qtcompress.errors import ConfigError, MissingFileError
from qtcompress.io.atomic import atomic_path, atomic_write_bytes


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed: we only write files
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(
            "Plots need matplotlib: pip install 'qtcompress[report]' (or pip install matplotlib)."
        ) from exc
    return plt


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


def plot_losses(histories: Mapping[str, Sequence[float]], path: Path) -> Path:
    """Plot one loss curve per phase (log scale when all values are positive).

    Args:
        histories: Phase name -> loss per step (or per epoch).
        path: Output PNG path.

    Returns:
        The written path.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, max(len(histories), 1), figsize=(5 * max(len(histories), 1), 3.4), squeeze=False
    )
    for ax, (phase, history) in zip(axes[0], histories.items(), strict=False):
        values = np.asarray(history, dtype=float)
        ax.plot(np.arange(1, len(values) + 1), values, lw=1.4)
        if len(values) and np.all(values > 0):
            ax.set_yscale("log")
        ax.set_title(phase)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_weight_histograms(
    weights: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, bins: int = 40
) -> Path:
    """Overlay histograms of original vs reconstructed weights, one panel per tensor.

    Args:
        weights: Tensor name -> (original, reconstructed) arrays of the same shape.
        path: Output PNG path.
        bins: Histogram bins per panel.

    Returns:
        The written path.
    """
    plt = _pyplot()
    count = max(len(weights), 1)
    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    for ax, (name, (original, rebuilt)) in zip(axes.flat, weights.items(), strict=False):
        original = np.asarray(original, dtype=float).ravel()
        rebuilt = np.asarray(rebuilt, dtype=float).ravel()
        if original.shape != rebuilt.shape:
            raise ConfigError(
                f"Tensor {name!r}: original has {original.size} values, reconstruction "
                f"{rebuilt.size}."
            )
        low, high = (
            float(min(original.min(), rebuilt.min())),
            float(max(original.max(), rebuilt.max())),
        )
        edges = np.linspace(low, high if high > low else low + 1e-6, bins + 1)
        ax.hist(original, bins=edges, alpha=0.55, label="original")
        ax.hist(rebuilt, bins=edges, alpha=0.55, label="reconstructed")
        rel = np.linalg.norm(rebuilt - original) / max(np.linalg.norm(original), 1e-12)
        ax.set_title(f"{name}\nrel. error {rel:.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    out_dir: str | os.PathLike[str],
    summary: Mapping[str, Any],
    histories: Mapping[str, Sequence[float]],
    weights: Mapping[str, tuple[np.ndarray, np.ndarray]],
    title: str = "qtcompress report",
) -> Path:
    """Write ``losses.png``, ``weights.png`` and ``report.md`` linking them into ``out_dir``.

    Args:
        out_dir: Output folder (created if missing; its parent must exist).
        summary: Label -> value rows for the summary table (in order).
        histories: Phase name -> loss values (see :func:`plot_losses`).
        weights: Tensor name -> (original, reconstructed) (see :func:`plot_weight_histograms`).
        title: Heading of the report.

    Returns:
        Path of ``report.md``.
    """
    out = Path(out_dir)
    if not out.parent.exists():
        raise MissingFileError(
            f"Cannot write the report into {out}: its parent folder {out.parent} does not exist."
        )
    out.mkdir(exist_ok=True)
    plot_losses(histories, out / "losses.png")
    plot_weight_histograms(weights, out / "weights.png")
    text = (
        "\n\n".join(
            [
                f"# {title}",
                _markdown_table([(k, v) for k, v in summary.items()], ("", "value")),
                "## Loss curves\n\n![loss curves](losses.png)",
                "## Original vs reconstructed weights\n\n![weight histograms](weights.png)",
            ]
        )
        + "\n"
    )
    return atomic_write_bytes(out / "report.md", text.encode("utf-8"))
