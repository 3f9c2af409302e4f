"""The ``qtcompress`` command line.

Exit codes: 0 success; 1 a qtcompress error (bad input, bad file, failed check), with a one-line
message on stderr; 2 a usage error (unknown flag or bad flag value); 3 an unexpected internal
error. ``--debug`` shows the full traceback.
"""

from __future__ import annotations

import os

# Idle OpenMP threads spin briefly, then sleep. libgomp's default spin holds a core for long
# after each operator: next to one other busy 2-thread process a 1e6-weight MLP's training
# step took 291 ms instead of 3.8 ms quiet. Sleeping at once (OMP_WAIT_POLICY=PASSIVE, the
# setting before) pays a thread wake-up on every parallel operator: 8.2 ms quiet, 20 ms busy.
# 1000 spins: 5.4 ms quiet, 12.7 ms busy (tools/bench_step.py --wait, docs/benchmarks.md).
# libgomp reads this once, when torch loads: in the CLI, later. A user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from qtcompress import __version__  # noqa: E402
from qtcompress.errors import QTCompressError  # noqa: E402

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

ANSATZ_CHOICES = ("paper", "ry-rz-ring")

# The default recipe of `compress` and `demo`: the generator's sizes come from QTConfig (one
# set of defaults: the rows scheme at DEFAULT_BUDGET); the step counts and learning rates from
# PipelineSettings. Measured on the suite of real-shaped models: docs/benchmarks.md.
DEFAULT_RECIPE: dict[str, Any] = {"layers": 8, "fit_steps": 100, "finetune_steps": 1500}


def _budget(text: str) -> float | int:
    """``5%`` or ``0.05`` -> a fraction of M; ``20000`` -> a parameter count."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction of M ('5%', '0.05') or a parameter count ('20000'), got {text!r}"
        ) from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"the budget must be positive, got {text!r}")
    if value > 1:
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"a parameter count must be whole, got {text!r}")
        return int(value)
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _one_line_warning(
    message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any
) -> str:
    return f"qtcompress: warning: {message}\n"


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

    from qtcompress.limits import check_qnn_size
    from qtcompress.qnn import QNN, Ansatz, index_to_bits

    check_qnn_size(args.qubits, args.layers)
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
    print(
        f"QNN: {args.ansatz} ansatz, {ansatz.n_qubits} qubits, {ansatz.n_layers} layers, "
        f"{ansatz.num_params} angles, {ansatz.num_states} basis states"
    )
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


def _emit(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    """Print a result as JSON (``--json``) or as human-readable lines."""
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Show what a generator file holds, without regenerating anything."""
    from pathlib import Path

    from qtcompress.generator_file import load_generator
    from qtcompress.targets import kinds_summary, tensor_kind

    path = Path(args.file)
    # The full loader: a file whose metadata lies about its generator is refused here too.
    gen = load_generator(path)
    meta = gen.metadata
    layout, ansatz, mapping = meta["layout"], meta["ansatz"], meta["mapping"]
    gen_params = sum(p.numel() for p in gen.generator.parameters())
    classical = sum(t.numel() for t in gen.classical.values())
    kinds = kinds_summary((t["name"], tuple(t["shape"])) for t in layout["tensors"])
    result: dict[str, Any] = {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "qtcompress_version": meta.get("qtcompress_version"),
        "generated_weights": layout["total"],
        "generator_parameters": gen_params,
        "compression_ratio": round(layout["total"] / max(gen_params, 1), 3),
        "classical_values": classical,
        "qubits": ansatz["n_qubits"],
        "layers": ansatz["n_layers"],
        "ansatz": ansatz,
        "mapping": mapping,
        "scheme": gen.config.scheme,
        "kinds": {k: {"tensors": n, "values": v} for k, (n, v) in kinds.items()},
        "targets": [
            {
                "name": t["name"],
                "shape": t["shape"],
                "aliases": t["aliases"],
                "kind": tensor_kind(t["name"], tuple(t["shape"])),
            }
            for t in layout["tensors"]
        ],
        "onnx_graph": gen.skeleton is not None,
        "weights_sha256": meta["weights_sha256"],
        "model": meta.get("model", {}),
    }
    per_state = (
        f"one basis state per tensor row, ranks up to {mapping.get('rank')}"
        if gen.config.scheme == "rows"
        else f"{mapping['chunk']} weight(s) per basis state"
    )
    lines = [
        f"{path.name}: {result['file_bytes']:,} bytes, qtcompress {result['qtcompress_version']}",
        f"generates {result['generated_weights']:,} weights from "
        f"{gen_params:,} generator parameters ({result['compression_ratio']}x)",
        f"QNN: {ansatz['n_qubits']} qubits x {ansatz['n_layers']} layers "
        f"({'+'.join(ansatz['rotations'])}, {ansatz.get('entangler', 'chain')}); "
        f"{gen.config.scheme} scheme, mapping {mapping['kind']}, {per_state}",
        f"classical values carried: {classical:,}; ONNX graph stored: "
        f"{'yes' if result['onnx_graph'] else 'no'}",
        "generated tensors by kind: "
        + ", ".join(f"{k} {n} ({v:,} values)" for k, (n, v) in kinds.items())
        + " (keep some classical with --exclude)",
        *[f"  {t['name']} {tuple(t['shape'])} {t['kind']}" for t in result["targets"]],
        f"weights sha256: {meta['weights_sha256']}",
    ]
    _emit(args, result, lines)
    return EXIT_OK


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    """Regenerate the network from a generator file into ONNX and/or a state dict."""
    from qtcompress.generator_file import load_generator

    if not args.onnx and not args.state_dict:
        raise _UsageError("reconstruct needs --onnx PATH and/or --state-dict PATH")
    gen = load_generator(args.file)
    check = gen.verify_weights()
    result: dict[str, Any] = {
        "file": args.file,
        "weights_identical": check.identical,
        "weights_equivalent": check.equivalent,
    }
    lines = [
        f"regenerated {gen.layout.total:,} weights: "
        + (
            "hash matches"
            if check.identical
            else f"hash differs, max fingerprint difference {check.max_fingerprint_rel_diff:.2g}"
        )
    ]
    if not check.equivalent:
        from qtcompress.errors import FormatError

        raise FormatError(
            f"regenerated weights do not match {args.file}'s record "
            f"(fingerprint difference {check.max_fingerprint_rel_diff:.3g})."
        )
    if args.onnx:
        _, diff = gen.to_onnx(args.onnx, atol=args.atol)
        result.update(onnx=args.onnx, onnx_max_abs_diff=diff)
        lines.append(f"wrote {args.onnx} (onnxruntime vs recorded outputs: max |diff| {diff:.2g})")
    if args.state_dict:
        from qtcompress.artifact import write_safetensors

        state = {k: v.contiguous().clone() for k, v in gen.state_dict().items()}
        write_safetensors(args.state_dict, state)
        result["state_dict"] = args.state_dict
        lines.append(f"wrote {args.state_dict} ({len(state)} tensors)")
    _emit(args, result, lines)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    """Regenerate, check the hash, rebuild ONNX and compare it with torch."""
    import torch

    from qtcompress.errors import FormatError
    from qtcompress.generator_file import load_generator

    gen = load_generator(args.file)
    check = gen.verify_weights()
    result: dict[str, Any] = {
        "file": args.file,
        "weights_identical": check.identical,
        "stored_sha256": check.stored_sha256,
        "actual_sha256": check.actual_sha256,
        "fingerprint_rel_diff": check.max_fingerprint_rel_diff,
    }
    lines = [
        f"weights: {'identical (sha256 matches)' if check.identical else 'hash differs'}"
        f"; fingerprint difference {check.max_fingerprint_rel_diff:.2g}"
    ]
    ok = check.equivalent
    if gen.skeleton is not None:
        _, diff = gen.to_onnx(atol=float("inf"))
        result["onnx_vs_recorded_max_abs_diff"] = diff
        lines.append(f"ONNX (onnxruntime) vs outputs recorded at save: max |diff| {diff:.2g}")
        ok = ok and diff <= args.atol
    if args.factory:
        from qtcompress.loading import build_model

        model = gen.load_into(build_model(args.factory, args.factory_kwargs))
        model.eval()
        if gen.check_inputs:
            with torch.no_grad():
                out = model(*gen.check_inputs)
            diff = gen.compare_outputs(out)
            result["torch_vs_recorded_max_abs_diff"] = diff
            lines.append(f"torch ({args.factory}) vs recorded outputs: max |diff| {diff:.2g}")
            ok = ok and diff <= args.atol
    result["ok"] = ok
    lines.append("verify: OK" if ok else "verify: FAILED")
    _emit(args, result, lines)
    if not ok:
        raise FormatError(f"{args.file} failed verification (see above).")
    return EXIT_OK


def _config_from_args(args: argparse.Namespace) -> Any:
    from qtcompress.config import QTConfig

    flat_only = [
        f
        for f, given in (
            ("--chunk", args.chunk is not None),
            ("--mapping mps", args.mapping == "mps"),
        )
        if given
    ]
    if args.scheme == "rows" and flat_only:
        raise _UsageError(
            f"{' and '.join(flat_only)}: only with --scheme flat; add "
            "--scheme flat, or size the default rows scheme with --budget/--rank"
        )
    if args.scheme == "flat" and (args.rank is not None or args.budget is not None):
        raise _UsageError(
            "--rank and --budget size the rows scheme; the flat scheme is sized by "
            "--chunk, --hidden and --layers"
        )

    fields: dict[str, Any] = {
        "scheme": args.scheme,
        "budget": args.budget,
        "rank": args.rank,
        "n_layers": args.layers,
        "n_qubits": args.qubits,
        "mapping": args.mapping,
        "seed": args.seed,
    }
    if args.chunk is not None:
        fields["chunk"] = args.chunk
    if args.hidden is not None:
        fields["hidden"] = tuple(args.hidden)
    if args.target:
        fields["target"] = tuple(args.target)
    if args.exclude:
        fields["exclude"] = tuple(args.exclude)
    return QTConfig(**fields)


def _dynamic_axes(specs: list[str]) -> dict[str, dict[int, str]] | None:
    from qtcompress.onnx_export import parse_dynamic_axis

    axes: dict[str, dict[int, str]] = {}
    for spec in specs:
        name, axis, dim = parse_dynamic_axis(spec)
        axes.setdefault(name, {})[axis] = dim
    return axes or None


def _settings_from_args(args: argparse.Namespace) -> Any:
    from qtcompress.pipeline import PipelineSettings

    lrs = {
        k: v
        for k, v in (("fit_lr", args.fit_lr), ("finetune_lr", args.finetune_lr))
        if v is not None
    }
    return PipelineSettings(
        fit_steps=args.fit_steps,
        finetune_steps=args.finetune_steps,
        **lrs,
        mode=args.mode,
        batch_size=args.batch_size,
        distill=args.distill,
        output_kind=args.output_kind,
        min_fidelity=args.min_fidelity,
        dynamic_axes=_dynamic_axes(args.dynamic_axis),
        device=args.device,
        progress=not args.json and not args.no_progress and sys.stderr.isatty(),
        report=args.report,
    )


def _run_and_print(
    args: argparse.Namespace,
    model: Any,
    data: Any,
    name: str,
    checkpoint_bytes: int | None,
    model_info: dict[str, Any],
) -> int:
    from qtcompress.pipeline import format_summary, run_pipeline

    def log(line: str) -> None:
        if args.verbose and not args.json:
            print(line, file=sys.stderr)

    result = run_pipeline(
        model,
        _config_from_args(args),
        data,
        args.output,
        name=name,
        settings=_settings_from_args(args),
        checkpoint_bytes=checkpoint_bytes,
        model_info=model_info,
        log=log,
    )
    if args.json:
        from dataclasses import asdict

        print(json.dumps({k: v for k, v in asdict(result).items() if k != "histories"}, indent=2))
    else:
        print(format_summary(result))
        print("files: " + ", ".join(result.files.values()))
    if not result.fidelity_ok:
        from qtcompress.errors import FidelityError

        raise FidelityError(
            f"fidelity {result.fidelity_finetuned['headline']:.4f} is below --min-fidelity "
            f"{result.min_fidelity}; the files were written to {args.output} (see "
            "summary.json); raise --budget or --finetune-steps"
        )
    return EXIT_OK


def _load_data(spec: str) -> Any:
    from qtcompress.examples import load_dataset
    from qtcompress.pipeline import load_npz_split

    if spec in ("digits", "wine"):
        return load_dataset(spec)
    return load_npz_split(spec)


def _cmd_compress(args: argparse.Namespace) -> int:
    """Compress a pretrained model: fit, fine-tune, export ONNX, verify, save, summarise."""
    from pathlib import Path

    from qtcompress.loading import load_model, parse_factory_kwargs

    model = load_model(
        args.model,
        factory=args.factory,
        factory_kwargs=args.factory_kwargs,
        trust_pickle=args.trust_pickle,
        strict=not args.non_strict,
    )
    data = _load_data(args.data)
    name = args.name or Path(args.model).name.split(".")[0]
    info = {
        "source": Path(args.model).name,
        "factory": args.factory,
        "kwargs": parse_factory_kwargs(args.factory_kwargs),
    }
    return _run_and_print(args, model, data, name, Path(args.model).stat().st_size, info)


def shipped_models_dir() -> Any:
    """The repository's ``models/`` folder (the demo's checkpoints), next to the package."""
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "models"


def _cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the shipped digits CNN."""
    from qtcompress.errors import MissingFileError
    from qtcompress.examples import load_dataset
    from qtcompress.loading import load_model

    card_path = shipped_models_dir() / f"{args.example}.json"
    if not card_path.is_file():
        raise MissingFileError(
            f"The shipped example {card_path} is missing: run the demo from a "
            "source checkout (pip install -e .), or use 'qtcompress compress' "
            "on your own checkpoint."
        )
    card = json.loads(card_path.read_text())
    checkpoint = card_path.with_suffix(".safetensors")
    model = load_model(checkpoint, factory=card["factory"], factory_kwargs=card["kwargs"])
    data = load_dataset(card["dataset"], seed=card["split_seed"])
    info = {"source": checkpoint.name, "factory": card["factory"], "kwargs": card["kwargs"]}
    return _run_and_print(args, model, data, args.example, checkpoint.stat().st_size, info)


class _UsageError(Exception):
    """A flag combination argparse cannot express; reported like argparse's own errors."""


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
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads for torch, qsim and OpenMP (default: all usable cores);"
        " 1 or 2 keeps a shared machine responsive",
    )
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
    qnn.add_argument(
        "--ansatz",
        choices=ANSATZ_CHOICES,
        default="paper",
        help="paper: RY + CNOT chain (default); ry-rz-ring: RY, RZ + CNOT ring",
    )
    qnn.add_argument(
        "--shots",
        type=_positive_int,
        default=None,
        help="estimate probabilities from this many shots (default: exact)",
    )
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
    predict.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="onnxruntime threads (default: onnxruntime's choice)",
    )
    predict.add_argument("--json", action="store_true", help="print machine-readable JSON")
    predict.set_defaults(handler=_cmd_predict)

    def add_recipe(cmd: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
        gen = cmd.add_argument_group("generator")
        gen.add_argument(
            "--qubits",
            type=_positive_int,
            default=None,
            help="QNN qubits (default: the fewest that cover the weights)",
        )
        gen.add_argument(
            "--budget",
            type=_budget,
            default=None,
            help="generator size: a fraction of the generated weights ('5%%', "
            "'0.05') or a parameter count ('20000'); sizes the rows scheme "
            "(default 5%%)",
        )
        gen.add_argument(
            "--scheme",
            choices=("rows", "flat"),
            default="rows",
            help="rows: one basis state per tensor row and a head per tensor "
            "(default); flat: the paper's flat index in chunks (--chunk)",
        )
        gen.add_argument(
            "--rank",
            type=_positive_int,
            default=None,
            help="rows scheme: per-row feature width (default: from --budget)",
        )
        gen.add_argument(
            "--layers",
            type=_positive_int,
            default=defaults["layers"],
            help=f"QNN layers (default {defaults['layers']})",
        )
        gen.add_argument(
            "--chunk",
            type=_positive_int,
            default=None,
            help="flat scheme: weights per basis state (default 1)",
        )
        gen.add_argument(
            "--hidden",
            type=_positive_int,
            nargs="+",
            default=None,
            help="mapping MLP widths (default 32 for rows, 16 16 for flat)",
        )
        gen.add_argument(
            "--mapping", choices=("mlp", "mps"), default="mlp", help="mapping network (default mlp)"
        )
        gen.add_argument(
            "--target",
            nargs="+",
            metavar="PATTERN",
            help="parameters to generate: names, suffixes, or re:REGEX "
            "(default: every trainable parameter)",
        )
        gen.add_argument(
            "--exclude", nargs="+", metavar="PATTERN", help="parameters to keep classical"
        )
        gen.add_argument("--seed", type=int, default=0, help="seed (default 0)")
        fit = cmd.add_argument_group("training")
        fit.add_argument(
            "--fit-steps",
            type=int,
            default=defaults["fit_steps"],
            help=f"phase-1 steps (default {defaults['fit_steps']}; 0 skips)",
        )
        fit.add_argument(
            "--fit-lr", type=float, default=None, help="phase-1 learning rate (default 1e-2)"
        )
        fit.add_argument(
            "--finetune-steps",
            type=int,
            default=defaults["finetune_steps"],
            help=f"phase-2 steps (default {defaults['finetune_steps']}; 0 skips)",
        )
        fit.add_argument(
            "--finetune-lr",
            type=float,
            default=None,
            help="phase-2 peak learning rate (default 3e-3, with warm-up, "
            "clipping and a collapse guard)",
        )
        fit.add_argument(
            "--mode",
            choices=("distill", "supervised"),
            default="distill",
            help="phase 2: distil from the original model (default) or use labels",
        )
        fit.add_argument(
            "--batch-size", type=_positive_int, default=64, help="phase-2 batch size (default 64)"
        )
        fit.add_argument(
            "--distill",
            choices=("kl", "bce", "cosine", "mse"),
            default=None,
            help="distillation loss (default: by output kind: kl for logits, bce "
            "for probabilities, cosine for embeddings, mse otherwise)",
        )
        fit.add_argument(
            "--output-kind",
            choices=("logits", "probability", "embedding", "regression"),
            default=None,
            help="what the model outputs (default: inferred from the original model's outputs)",
        )
        fit.add_argument(
            "--min-fidelity",
            type=_fraction,
            default=None,
            metavar="X",
            help="exit 1 (files still written) when the fine-tuned fidelity "
            "(agreement, cosine or correlation, by output kind) is below X",
        )
        fit.add_argument(
            "--device",
            default=None,
            metavar="DEV",
            help="train the mapping and the model on DEV (cpu, cuda, cuda:N); "
            "the QNN stays on the CPU simulator (default: cpu)",
        )
        out = cmd.add_argument_group("output")
        out.add_argument(
            "--report",
            action="store_true",
            help="also write PNG plots and report.md into OUTPUT/report (needs matplotlib)",
        )
        out.add_argument(
            "--dynamic-axis",
            action="append",
            default=[],
            metavar="IN:AXIS=NAME",
            help="an ONNX input axis beyond the batch that stays symbolic, e.g. "
            "input_ids:1=seq (repeat it; the same NAME means the same length)",
        )
        out.add_argument("--json", action="store_true", help="print the summary as JSON")
        out.add_argument("--no-progress", action="store_true", help="hide progress bars")
        out.add_argument(
            "-v", "--verbose", action="store_true", help="print one line per stage on stderr"
        )

    compress_cmd = sub.add_parser(
        "compress",
        help="compress a pretrained model (generator file + ONNX + summary)",
        description="Load a pretrained model, fit the generator to its weights (phase 1), "
        "fine-tune on data (phase 2, distillation by default), then write OUTPUT/NAME."
        "qtc.safetensors (the generator file), OUTPUT/NAME.onnx (verified with onnxruntime) "
        "and OUTPUT/summary.json, and print the summary table.",
        epilog="Examples:\n  qtcompress compress models/digits_cnn.safetensors "
        "--factory qtcompress.examples:DigitsCNN --data digits -o out\n"
        "  qtcompress compress net.pt --factory mypkg.nets:Net --factory-kwargs '{\"width\": 8}'"
        " --data data.npz -o out --chunk 16 --report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compress_cmd.add_argument(
        "model",
        help="checkpoint: state dict (.pt/.pth/.safetensors, "
        "with --factory), torch.export program (.pt2), or pickled model "
        "(with --trust-pickle)",
    )
    compress_cmd.add_argument("--factory", help="'package.module:callable' that builds the model")
    compress_cmd.add_argument("--factory-kwargs", default=None, help="JSON keyword arguments")
    compress_cmd.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a fully pickled model (runs code from the file)",
    )
    compress_cmd.add_argument(
        "--non-strict",
        action="store_true",
        help="load a checkpoint whose keys do not match the model "
        "exactly: ignore unexpected keys and missing buffers (named in a "
        "warning); missing parameters are still an error",
    )
    compress_cmd.add_argument(
        "--data",
        required=True,
        help="'digits', 'wine', or an .npz with x_train, x_test [, y_train, y_test]",
    )
    compress_cmd.add_argument("-o", "--output", required=True, help="output folder")
    compress_cmd.add_argument("--name", help="base name of the output files")
    add_recipe(compress_cmd, DEFAULT_RECIPE)
    compress_cmd.set_defaults(handler=_cmd_compress)

    demo = sub.add_parser(
        "demo",
        help="the main job on the shipped 420K-weight CNN (about 2 minutes on 2 cores)",
        description="Compress the shipped, pretrained 420K-weight CNN without BatchNorm "
        "(models/digits_cnn28.safetensors, scikit-learn's digits upsampled to 28x28) to 5%% of "
        "its weights: fit, fine-tune, export, verify, and print the summary with fidelity.",
        epilog="Examples:\n  qtcompress demo\n  qtcompress demo -o demo-out --report\n"
        "  qtcompress demo --finetune-steps 500 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--example",
        choices=("digits_cnn28", "digits_cnn", "wine_mlp"),
        default="digits_cnn28",
        help="shipped example: digits_cnn28 (420K weights, no BatchNorm; "
        "default), digits_cnn (6K, BatchNorm) or wine_mlp (1.6K)",
    )
    demo.add_argument(
        "-o",
        "--output",
        default="qtcompress-demo",
        help="output folder (default ./qtcompress-demo)",
    )
    add_recipe(demo, DEFAULT_RECIPE)
    demo.set_defaults(handler=_cmd_demo)

    def file_command(
        name: str, help_text: str, description: str, examples: str, handler: Any
    ) -> argparse.ArgumentParser:
        cmd = sub.add_parser(
            name,
            help=help_text,
            description=description,
            epilog="Examples:\n" + examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_argument("file", help="a generator file (*.qtc.safetensors)")
        cmd.add_argument("--json", action="store_true", help="print machine-readable JSON")
        cmd.set_defaults(handler=handler)
        return cmd

    file_command(
        "inspect",
        "show what a generator file holds",
        "Show sizes, qubits, layers, mapping and generated tensors of a generator file, "
        "without regenerating anything.",
        "  qtcompress inspect digits_cnn.qtc.safetensors\n"
        "  qtcompress inspect digits_cnn.qtc.safetensors --json",
        _cmd_inspect,
    )
    rec = file_command(
        "reconstruct",
        "regenerate the network from a generator file (ONNX and/or state dict)",
        "Regenerate every weight from the generator file alone (qsim + mapping network), check "
        "the stored hash, and write an ONNX model (checked with onnx.checker and onnxruntime "
        "against the outputs recorded at save time) and/or a safetensors state dict.",
        "  qtcompress reconstruct m.qtc.safetensors --onnx m.onnx\n"
        "  qtcompress reconstruct m.qtc.safetensors --state-dict m.safetensors",
        _cmd_reconstruct,
    )
    rec.add_argument("--onnx", help="write the ONNX model here")
    rec.add_argument("--state-dict", help="write the state dict (safetensors) here")
    rec.add_argument(
        "--atol",
        type=float,
        default=1e-5,
        help="allowed ONNX vs recorded max abs difference (default 1e-5)",
    )
    ver = file_command(
        "verify",
        "regenerate, check the hash, compare ONNX and torch outputs",
        "Regenerate the weights and check them against the stored SHA-256; rebuild the ONNX "
        "model and compare onnxruntime with the outputs recorded at save time; with --factory, "
        "also load the weights into your own model code and compare torch's outputs.",
        "  qtcompress verify m.qtc.safetensors\n"
        "  qtcompress verify m.qtc.safetensors --factory qtcompress.examples:DigitsCNN",
        _cmd_verify,
    )
    ver.add_argument("--factory", help="'package.module:callable' building the model")
    ver.add_argument("--factory-kwargs", default="{}", help="JSON keyword arguments")
    ver.add_argument("--atol", type=float, default=1e-5, help="allowed max abs difference")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        # Before torch and qsim load (their imports are lazy): the thread pools read these once.
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
        from qtcompress.qnn.backends import set_threads

        set_threads(args.threads)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    formatter = warnings.formatwarning
    if not args.debug:
        # Library warnings (an ignored checkpoint key, an unknown config key) as one line each.
        warnings.formatwarning = _one_line_warning  # type: ignore[assignment]
    try:
        code: int = args.handler(args)
        return code
    except _UsageError as exc:
        print(f"qtcompress {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
        print(
            f"qtcompress {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    finally:
        warnings.formatwarning = formatter


if __name__ == "__main__":
    sys.exit(main())
