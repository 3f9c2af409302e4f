"""What each ``qtcompress`` subcommand does: call the library, then print lines or JSON.

The work itself lives in the library (``pipeline``, ``io``, ``onnx``); a command turns flags
into calls and results into output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def cmd_qnn(args: argparse.Namespace) -> int:
    """Simulate a QNN once with qsim, time forward and gradient, show the likeliest states."""
    import torch

    from qtcompress.limits import check_qnn_size
    from qtcompress.qnn import QNN, index_to_bits, make_ansatz

    check_qnn_size(args.qubits, args.layers)
    ansatz = make_ansatz(args.ansatz, args.qubits, args.layers)  # a registered name
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


def cmd_predict(args: argparse.Namespace) -> int:
    """Run an ONNX model with onnxruntime on arrays from a .npy/.npz file."""
    from qtcompress.onnx.runtime import predict_file

    done = predict_file(args.model, args.inputs, args.output, threads=args.threads)
    summary: dict[str, Any] = {
        "model": str(args.model),
        "output": str(args.output),
        "outputs": {k: list(v) for k, v in done.output_shapes.items()},
        "elapsed_ms": round(done.elapsed_ms, 3),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in summary["outputs"].items())
        print(f"wrote {args.output}: {shapes} in {done.elapsed_ms:.2f} ms")
    return EXIT_OK


def _emit(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    """Print a result as JSON (``--json``) or as human-readable lines."""
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show what a generator file holds, without regenerating anything."""
    from pathlib import Path

    from qtcompress.generator_file.load import load_generator

    path = Path(args.file)
    # The full loader: a file whose metadata lies about its generator is refused here too.
    gen = load_generator(path)
    if gen.skeleton is not None:
        # The graph that verify and reconstruct would refuse (unparsable, external data) makes
        # the file corrupt here too.
        gen.checked_skeleton()
    result = gen.describe()
    ansatz, mapping, kinds = result["ansatz"], result["mapping"], result["kinds"]
    per_state = gen.generator.basis_state_text()
    lines = [
        f"{path.name}: {result['file_bytes']:,} bytes, qtcompress {result['qtcompress_version']}",
        f"generates {result['generated_weights']:,} weights from "
        f"{result['generator_parameters']:,} generator parameters "
        f"({result['compression_ratio']}x)",
        f"QNN: {ansatz['n_qubits']} qubits x {ansatz['n_layers']} layers "
        f"({'+'.join(ansatz['rotations'])}, {ansatz.get('entangler', 'chain')}); "
        f"{gen.config.scheme} scheme, mapping {mapping['kind']}, {per_state}",
        f"classical values carried: {result['classical_values']:,}; ONNX graph stored: "
        f"{'yes' if result['onnx_graph'] else 'no'}",
        "generated tensors by kind: "
        + ", ".join(f"{k} {c['tensors']} ({c['values']:,} values)" for k, c in kinds.items())
        + " (keep some classical with --exclude)",
        *[f"  {t['name']} {tuple(t['shape'])} {t['kind']}" for t in result["targets"]],
        f"weights sha256: {result['weights_sha256']}",
    ]
    hf = result["model"].get("hf") if isinstance(result["model"], dict) else None
    if isinstance(hf, dict):
        lines.append(
            f"Hugging Face folder: {hf.get('class')} with {', '.join(hf.get('files', {}))} "
            "(write it with reconstruct --hf-out DIR)"
        )
    _emit(args, result, lines)
    return EXIT_OK


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Regenerate the network from a generator file into ONNX and/or a state dict."""
    from qtcompress.generator_file.load import load_generator

    if not args.onnx and not args.state_dict and not args.hf_out:
        raise UsageError("reconstruct needs --onnx PATH, --state-dict PATH and/or --hf-out DIR")
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
        from qtcompress.io.container import write_safetensors

        state = {k: v.contiguous().clone() for k, v in gen.state_dict().items()}
        write_safetensors(args.state_dict, state)
        result["state_dict"] = args.state_dict
        lines.append(f"wrote {args.state_dict} ({len(state)} tensors)")
    if args.hf_out:
        from qtcompress.generator_file.hf_out import (
            check_hf_folder,
            recorded_folder,
            write_hf_folder,
        )

        written = write_hf_folder(gen, args.hf_out)
        hf_diff = check_hf_folder(gen, args.hf_out)
        cls = recorded_folder(gen)["class"]
        scale = max([1.0] + [float(t.abs().max()) for t in gen.check_outputs if t.numel()])
        if hf_diff is not None and not hf_diff <= args.atol * scale:
            from qtcompress.errors import FormatError

            raise FormatError(
                f"{cls}.from_pretrained({args.hf_out!r}) differs from the outputs recorded in "
                f"{args.file} by {hf_diff:.3g} (allowed {args.atol * scale:.3g})."
            )
        result.update(hf_out=args.hf_out, hf_files=written, hf_max_abs_diff=hf_diff)
        lines.append(
            f"wrote {args.hf_out}/ ({', '.join(written)}); "
            + (
                f"{cls}.from_pretrained vs recorded outputs: max |diff| {hf_diff:.2g}"
                if hf_diff is not None
                else f"load it with transformers' {cls}.from_pretrained"
            )
        )
    _emit(args, result, lines)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Regenerate, check the hash, rebuild ONNX and compare it with torch."""
    import torch

    from qtcompress.errors import FormatError
    from qtcompress.generator_file.load import load_generator

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
    # Float rounding grows with the outputs' size: the bound is atol per unit of the largest
    # recorded output (logits of 15 differ by ~1e-5 between onnxruntime and torch).
    scale = max([1.0] + [float(t.abs().max()) for t in gen.check_outputs if t.numel()])
    tol = args.atol * scale
    if gen.skeleton is not None:
        _, diff = gen.to_onnx(atol=float("inf"))
        result["onnx_vs_recorded_max_abs_diff"] = diff
        lines.append(f"ONNX (onnxruntime) vs outputs recorded at save: max |diff| {diff:.2g}")
        ok = ok and diff <= tol
    if args.factory:
        from qtcompress.io.model_source import build_model

        model = gen.load_into(build_model(args.factory, args.factory_kwargs))
        model.eval()
        if gen.check_inputs:
            with torch.no_grad():
                out = model(*gen.check_inputs)
            diff = gen.compare_outputs(out)
            result["torch_vs_recorded_max_abs_diff"] = diff
            lines.append(f"torch ({args.factory}) vs recorded outputs: max |diff| {diff:.2g}")
            ok = ok and diff <= tol
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
    if args.scheme != "flat" and flat_only:
        raise UsageError(
            f"{' and '.join(flat_only)}: only with --scheme flat; add --scheme flat, or size "
            f"the {args.scheme} scheme with --budget"
        )
    if args.scheme == "flat" and (args.rank is not None or args.budget is not None):
        raise UsageError(
            "--rank and --budget size the rows and hashed schemes; the flat scheme is sized "
            "by --chunk, --hidden and --layers"
        )
    hashed_not = [
        f
        for f, given in (
            ("--rank", args.rank is not None),
            ("--hidden", bool(args.hidden)),
            ("--layers", args.layers is not None),
        )
        if given
    ]
    if args.scheme == "hashed" and hashed_not:
        raise UsageError(
            f"{', '.join(hashed_not)}: not for the hashed scheme (the default), which is sized "
            "by --budget (and --qubits); add --scheme rows to use them"
        )
    if args.values != "qnn" and args.scheme != "hashed":
        raise UsageError("--values: only with --scheme hashed; add --scheme hashed")

    fields: dict[str, Any] = {
        "scheme": args.scheme,
        "budget": args.budget,
        "rank": args.rank,
        "n_qubits": args.qubits,
        "mapping": args.mapping,
        "seed": args.seed,
    }
    if args.layers is not None:
        fields["n_layers"] = args.layers
    if args.ansatz is not None:
        fields["ansatz"] = args.ansatz
    if args.scheme == "hashed":  # layers come from the budget; the rows-only fields stay unset
        fields.pop("rank")
        fields["values"] = args.values
    if args.chunk is not None:
        fields["chunk"] = args.chunk
    if args.hidden is not None:
        fields["hidden"] = tuple(args.hidden)
    if args.target:
        fields["target"] = tuple(args.target)
    if args.exclude:
        fields["exclude"] = tuple(args.exclude)
    config = QTConfig(**fields)
    config.check_registered()  # before any file is touched
    return config


def _dynamic_axes(specs: list[str]) -> dict[str, dict[int, str]] | None:
    from qtcompress.onnx.export import parse_dynamic_axis

    axes: dict[str, dict[int, str]] = {}
    for spec in specs:
        name, axis, dim = parse_dynamic_axis(spec)
        axes.setdefault(name, {})[axis] = dim
    return axes or None


def _model_output(text: str | None) -> str | int | None:
    """``--model-output``: an index when it is a number, else a name."""
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def _batch_dims(specs: list[str]) -> dict[str, int] | None:
    from qtcompress.data.layout import parse_batch_dim

    return dict(parse_batch_dim(spec) for spec in specs) or None


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
        output=_model_output(args.model_output),
        min_fidelity=args.min_fidelity,
        dynamic_axes=_dynamic_axes(args.dynamic_axis),
        device=args.device,
        progress=not args.json and not args.no_progress and sys.stderr.isatty(),
        report=args.report,
        storage=args.storage,
        time_limit=args.time_limit,
        state=args.state,
        rollout=args.rollout,
        batch_dims=_batch_dims(args.batch_dim),
    )


def _run_and_print(
    args: argparse.Namespace,
    model: Any,
    data: Any,
    name: str,
    checkpoint_bytes: int | None,
    model_info: dict[str, Any],
) -> int:
    from qtcompress.pipeline import run_pipeline
    from qtcompress.summary import format_summary

    settings = _settings_from_args(args)

    def log(line: str) -> None:
        # On a terminal the stage lines come with the progress bars: the stages between the
        # bars (measuring, export, checks) otherwise leave a large model's user a silent minute.
        if (args.verbose or settings.progress) and not args.json:
            print(line, file=sys.stderr)

    result = run_pipeline(
        model,
        _config_from_args(args),
        data,
        args.output,
        name=name,
        settings=settings,
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


def _load_data(spec: str, batch_dims: dict[str, int] | None = None) -> Any:
    from qtcompress.examples import load_dataset
    from qtcompress.io.arrays import load_npz_split

    if spec in ("digits", "wine"):
        return load_dataset(spec)
    return load_npz_split(spec, batch_dims)


# Options of the Hugging Face block of `compress` that mean nothing for another model.
_FOLDER_ONLY = (
    ("hf_class", "--hf-class"),
    ("task", "--task"),
    ("text_column", "--text-column"),
    ("label_column", "--label-column"),
    ("test_data", "--test-data"),
    ("image_size", "--image-size"),
    ("pooling", "--pooling"),
    ("image_mean", "--image-mean"),
    ("image_std", "--image-std"),
)


def _compress_hf_folder(args: argparse.Namespace) -> int:
    """``compress`` of a Hugging Face model folder: its own classes, tokenizer and data."""
    from pathlib import Path

    from qtcompress.data.text import is_text_data, load_text_for_model
    from qtcompress.io.hf_folder import (
        folder_record,
        load_hf_folder,
        load_hf_tokenizer,
        weights_bytes,
    )

    if args.factory or args.factory_kwargs:
        raise UsageError("--factory: not with a model folder (its config.json says what to build)")
    model, built = load_hf_folder(
        args.model, hf_class=args.hf_class, task=args.task, trust_pickle=args.trust_pickle
    )
    facts = {"built": built}
    progress = not args.json and not args.no_progress and sys.stderr.isatty()
    if is_text_data(args.data):
        data, facts["data"] = load_text_for_model(
            args.data,
            model,
            load_hf_tokenizer(args.model),
            max_length=args.max_length,
            text_column=args.text_column,
            label_column=args.label_column,
            test_path=args.test_data,
            test_fraction=args.test_fraction,
            progress=progress,
        )
        if not args.dynamic_axis:  # the ONNX file takes sentences of any length
            args.dynamic_axis = [f"{name}:1=seq" for name in data.x_train]
    elif Path(args.data).is_dir():
        from qtcompress.data.images import image_preprocessing, load_image_split

        prep = image_preprocessing(
            args.model, model.config, args.image_size, args.image_mean, args.image_std
        )
        data, facts["data"] = load_image_split(
            args.data,
            prep,
            test_path=args.test_data,
            test_fraction=args.test_fraction,
            label2id=getattr(model.config, "label2id", None),
            progress=progress,
        )
    else:
        data = _load_data(args.data)
    from qtcompress.data.model_call import check_call, select_output
    from qtcompress.data.pooling import choose_pooling, per_example_output, pooled
    from qtcompress.data.sources import InputSource
    from qtcompress.io.hf_folder import main_output_kind

    sample = check_call(model, InputSource.of(data.x_test).head(2))
    output = _model_output(args.model_output)
    pooling, facts["pooling"] = choose_pooling(args.model, model, args.pooling, output, sample)
    main_kind = main_output_kind(sample)
    trim = None
    if pooling == "none" and per_example_output(model, select_output(sample, output), data.x_test):
        trim = True  # e.g. a classifier's logits: a batch's trailing padding changes nothing
        facts["pooling"] += "; one output per example: each batch's trailing padding is dropped"
    if pooling != "none" or output is not None or trim:
        # The pooled (or selected) tensor is what is distilled, scored and exported.
        model = pooled(model, pooling, output, trim)
        args.model_output = None
        sample = check_call(model, InputSource.of(data.x_test).head(2))
    if args.output_kind is None:
        # Pooled or masked token states, and a named output other than logits, are vectors
        # compared by cosine: a top-1 over hidden features means nothing.
        named = isinstance(output, str) and not output.endswith("logits")
        args.output_kind = "embedding" if pooling != "none" or named else main_kind
    if not args.json:
        for key, line in facts.items():
            print(f"{'model' if key == 'built' else key}: {line}", file=sys.stderr)
    folder = Path(args.model).resolve()
    info = {"source": folder.name, "hf": folder_record(folder, model), **facts}
    name = args.name or folder.name
    return _run_and_print(args, model, data, name, weights_bytes(folder), info)


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress a pretrained model: fit, fine-tune, export ONNX, verify, save, summarise."""
    from pathlib import Path

    from qtcompress.data.text import is_text_data
    from qtcompress.io.hf_folder import is_hf_folder
    from qtcompress.io.model_source import load_model, parse_factory_kwargs

    if is_hf_folder(args.model):
        return _compress_hf_folder(args)
    from qtcompress.data.tables import is_table

    table = is_table(args.data)
    # A table takes its class column and held-out table as text data does.
    table_options = {"label_column", "test_data"} if table else set()
    given = [
        flag
        for key, flag in _FOLDER_ONLY
        if getattr(args, key, None) is not None and key not in table_options
    ]
    if given:
        raise UsageError(
            f"{', '.join(given)}: only with a Hugging Face model folder"
            + (" (or, --label-column and --test-data, a .csv/.parquet table)" if not table else "")
        )
    if is_text_data(args.data) and not table:
        from qtcompress.errors import ConfigError

        raise ConfigError(
            f"{args.data}: text data is tokenized with a Hugging Face model folder's own "
            "tokenizer; give the folder as the model, or tokenize into an .npz with "
            "x_train.input_ids and x_train.attention_mask."
        )
    model = load_model(
        args.model,
        factory=args.factory,
        factory_kwargs=args.factory_kwargs,
        trust_pickle=args.trust_pickle,
        strict=not args.non_strict,
    )
    if table:
        from qtcompress.data.tables import load_table_split

        data, read = load_table_split(
            args.data,
            label_column=args.label_column,
            test_path=args.test_data,
            test_fraction=args.test_fraction,
            progress=not args.json and not args.no_progress and sys.stderr.isatty(),
        )
        if not args.json:
            print(f"data: {read}", file=sys.stderr)
    else:
        data = _load_data(args.data, _batch_dims(args.batch_dim))
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

    return Path(__file__).resolve().parents[2] / "models"


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the shipped digits CNN."""
    from qtcompress.errors import MissingFileError
    from qtcompress.examples import load_dataset
    from qtcompress.io.model_source import load_model

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


class UsageError(Exception):
    """A flag combination argparse cannot express; reported like argparse's own errors."""
