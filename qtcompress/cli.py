"""The ``qtcompress`` command line.

Exit codes: 0 success; 1 a qtcompress error (bad input, bad file, failed check), with a one-line
message on stderr; 2 a usage error (unknown flag or bad flag value); 3 an unexpected internal
error. ``--debug`` shows the full traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from qtcompress import __version__
from qtcompress.errors import QTCompressError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

ANSATZ_CHOICES = ("paper", "ry-rz-ring")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _cmd_qnn(args: argparse.Namespace) -> int:
    """Simulate a QNN once with qsim, time forward and gradient, show the likeliest states."""
    import torch

    from qtcompress.qnn import QNN, Ansatz, index_to_bits

    make = Ansatz.paper if args.ansatz == "paper" else Ansatz.ry_rz_ring
    ansatz = make(args.qubits, args.layers)
    qnn = QNN(ansatz, seed=args.seed, shots=args.shots, cache_size=0)
    start = time.perf_counter()
    probs = qnn()
    forward_s = time.perf_counter() - start
    weights = torch.randn(probs.shape[0], generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    (probs * weights).sum().backward()
    gradient_s = time.perf_counter() - start
    p = probs.detach().numpy()
    top = np.argsort(p)[::-1][: args.top]
    grad = qnn.angles.grad
    top_states = [
        {"index": int(i), "bits": index_to_bits(int(i), ansatz.n_qubits), "p": float(p[i])}
        for i in top
    ]
    result: dict[str, Any] = {
        "ansatz": ansatz.to_dict(),
        "num_params": ansatz.num_params,
        "num_states": ansatz.num_states,
        "forward_ms": round(forward_s * 1e3, 3),
        "gradient_ms": round(gradient_s * 1e3, 3),
        "gradient_norm": float(grad.norm()) if grad is not None else 0.0,
        "top_states": top_states,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(f"QNN: {args.ansatz} ansatz, {ansatz.n_qubits} qubits, {ansatz.n_layers} layers, "
          f"{ansatz.num_params} angles, {ansatz.num_states} basis states")
    print(f"qsim forward  {result['forward_ms']:9.2f} ms")
    norm = result["gradient_norm"]
    print(f"adjoint grad  {result['gradient_ms']:9.2f} ms  (|grad| = {norm:.4g})")
    print("likeliest basis states (qubit 0 first):")
    for row in top_states:
        print(f"  {row['bits']}  index {row['index']:>8}  p = {row['p']:.6f}")
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    """Run an ONNX model with onnxruntime on arrays from a .npy/.npz file."""
    from qtcompress.runtime import OnnxPredictor, load_arrays, save_arrays

    predictor = OnnxPredictor(args.model, threads=args.threads)
    inputs = load_arrays(args.inputs)
    start = time.perf_counter()
    outputs = predictor.run(inputs)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    if not isinstance(outputs, dict):
        outputs = {predictor.output_names[0]: outputs}
    save_arrays(args.output, outputs)
    summary: dict[str, Any] = {
        "model": str(args.model),
        "output": str(args.output),
        "outputs": {k: list(v.shape) for k, v in outputs.items()},
        "elapsed_ms": round(elapsed_ms, 3),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in summary["outputs"].items())
        print(f"wrote {args.output}: {shapes} in {elapsed_ms:.2f} ms")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="qtcompress",
        description="Quantum-Train compression: regenerate a PyTorch model's weights from a "
        "qsim-simulated quantum neural network and a small mapping network.",
        epilog="Exit codes: 0 ok, 1 qtcompress error, 2 usage error, 3 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"qtcompress {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    qnn = sub.add_parser(
        "qnn",
        help="simulate a QNN with qsim and time its forward pass and adjoint gradient",
        description="Simulate the QNN once with qsim, time the forward pass and the adjoint "
        "gradient of a random linear loss, and list the likeliest basis states.",
        epilog="Examples:\n  qtcompress qnn --qubits 13 --layers 8\n"
        "  qtcompress qnn --qubits 6 --layers 2 --ansatz ry-rz-ring --shots 1000 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    qnn.add_argument("--qubits", type=_positive_int, default=10, help="qubits n (default 10)")
    qnn.add_argument("--layers", type=_positive_int, default=4, help="layers L (default 4)")
    qnn.add_argument("--ansatz", choices=ANSATZ_CHOICES, default="paper",
                     help="paper: RY + CNOT chain (default); ry-rz-ring: RY, RZ + CNOT ring")
    qnn.add_argument("--shots", type=_positive_int, default=None,
                     help="estimate probabilities from this many shots (default: exact)")
    qnn.add_argument("--seed", type=int, default=0, help="seed for angles and shots")
    qnn.add_argument("--top", type=_positive_int, default=5, help="basis states to list")
    qnn.add_argument("--json", action="store_true", help="print machine-readable JSON")
    qnn.set_defaults(handler=_cmd_qnn)

    predict = sub.add_parser(
        "predict",
        help="run an ONNX model with onnxruntime on inputs from a .npy/.npz file",
        description="Run an exported ONNX model with onnxruntime. A .npy input feeds a "
        "single-input model; a .npz holds one array per input name. Outputs are written to "
        ".npy (one output) or .npz (keyed by output name).",
        epilog="Examples:\n  qtcompress predict model.onnx images.npy -o logits.npy\n"
        "  qtcompress predict model.onnx inputs.npz -o outputs.npz --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("model", help="the .onnx file")
    predict.add_argument("inputs", help=".npy or .npz input arrays")
    predict.add_argument("-o", "--output", required=True, help=".npy or .npz output file")
    predict.add_argument("--threads", type=_positive_int, default=None,
                         help="onnxruntime threads (default: onnxruntime's choice)")
    predict.add_argument("--json", action="store_true", help="print machine-readable JSON")
    predict.set_defaults(handler=_cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        code: int = args.handler(args)
        return code
    except QTCompressError as exc:
        if args.debug:
            raise
        print(f"qtcompress {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"qtcompress {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last-resort guard so users see one line
        if args.debug:
            raise
        print(f"qtcompress {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
