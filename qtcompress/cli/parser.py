"""The command line's grammar (:func:`build_parser`): subcommands, flags, types, defaults."""

from __future__ import annotations

import argparse
from typing import Any

from qtcompress import __version__
from qtcompress.cli.commands import (
    cmd_compress,
    cmd_demo,
    cmd_inspect,
    cmd_predict,
    cmd_qnn,
    cmd_reconstruct,
    cmd_verify,
)
from qtcompress.constants import (
    BATCH_SIZE,
    FINETUNE_STEPS,
    FIT_LR,
    FIT_STEPS,
    HF_TASKS,
    ONNX_ATOL,
    ONNX_RTOL,
    POOLINGS,
    ROLLOUT,
    STATEFUL_FINETUNE_STEPS,
    TEXT_COLUMN,
    TEXT_MAX_LENGTH,
    TEXT_SPLIT_SEED,
    TEXT_TEST_FRACTION,
)

# The default recipe of `compress` and `demo`: the generator's sizes come from QTConfig (one
# set of defaults: the hashed scheme at its registered budget, 0.5% of M); the step counts and
# learning rates from PipelineSettings. Measured on the suite of real-shaped models:
# docs/benchmarks.md.
DEFAULT_RECIPE: dict[str, Any] = {
    "fit_steps": FIT_STEPS,
    "finetune_steps": FINETUNE_STEPS,
    "rollout": ROLLOUT,
}


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
        metavar="NAME",
        default="paper",
        help="a registered ansatz (qnn/ansatz.py): paper: RY + CNOT chain (default); "
        "ry-rz-ring: RY, RZ + CNOT ring",
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
    qnn.set_defaults(handler=cmd_qnn)

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
    predict.add_argument("-o", "--output", "--out", required=True, help=".npy or .npz output file")
    predict.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="onnxruntime threads (default: onnxruntime's choice)",
    )
    predict.add_argument("--json", action="store_true", help="print machine-readable JSON")
    predict.set_defaults(handler=cmd_predict)

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
            "'0.5%%', '0.05') or a parameter count ('20000'); sizes the hashed and "
            "rows schemes (default 0.5%% for hashed, at least 1,024 parameters on small "
            "models; 5%% for rows, whose smallest generator is about 2%% of M: below it "
            "the hashed scheme is used)",
        )
        gen.add_argument(
            "--scheme",
            choices=("hashed", "rows", "flat"),
            default="hashed",
            help="hashed: every weight a signed, scaled shared value from the QNN, "
            "0.05-5%% of M (default); rows: one basis state per tensor row and a head per "
            "tensor; flat: the paper's flat index in chunks (--chunk)",
        )
        gen.add_argument(
            "--values",
            metavar="SOURCE",
            default="qnn",
            help="hashed scheme: where the shared values come from: qnn (Quantum-Train, "
            "default), or a classical control: mps (a Born machine), table (HashedNets), "
            "frozen (a random probability vector), zeros (registered in "
            "generator/values.py)",
        )
        gen.add_argument(
            "--ansatz",
            metavar="NAME",
            default=None,
            help="the QNN's circuit, one registered in qnn/ansatz.py: paper (RY + CNOT chain, "
            "the default) or ry-rz-ring (RY, RZ + CNOT ring: twice the angles a layer)",
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
            default=None,
            help="rows and flat schemes: QNN layers (default 8; the hashed scheme's come "
            "from --budget)",
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
            "--mapping",
            metavar="NAME",
            default="mlp",
            help="flat scheme: the mapping network, one registered in generator/common.py: mlp "
            "(default) or mps",
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
            "--fit-lr", type=float, default=None, help=f"phase-1 learning rate (default {FIT_LR:g})"
        )
        fit.add_argument(
            "--finetune-steps",
            type=int,
            default=None,
            help=f"phase-2 steps (default {defaults['finetune_steps']:,}, "
            f"{STATEFUL_FINETUNE_STEPS:,} for a stateful model with stream_train; 0 skips)",
        )
        fit.add_argument(
            "--finetune-lr",
            type=float,
            default=None,
            help="phase-2 peak learning rate (default: the scheme's, 3e-3 for rows and flat, "
            "1e-2 for hashed or 3e-3 on a model that carries its state; with warm-up, "
            "clipping and a collapse guard)",
        )
        fit.add_argument(
            "--mode",
            choices=("distill", "supervised"),
            default="distill",
            help="phase 2: distil from the original model (default) or use labels",
        )
        fit.add_argument(
            "--batch-size",
            type=_positive_int,
            default=BATCH_SIZE,
            help=f"phase-2 batch size (default {BATCH_SIZE})",
        )
        fit.add_argument(
            "--distill",
            metavar="LOSS",
            default=None,
            help="distillation loss, one of those registered in train/objectives.py: kl, bce, "
            "cosine, mse (default: by output kind: kl for logits, bce for probabilities, "
            "cosine for embeddings, mse otherwise)",
        )
        fit.add_argument(
            "--output-kind",
            metavar="KIND",
            default=None,
            help="what the model outputs, one of those registered in train/objectives.py: "
            "logits, probability, embedding, regression, ctc (default: inferred from the "
            "original model's outputs; ctc: per-frame scores (batch, time, classes), blank 0, "
            "scored by the character error rate of the greedy decodes)",
        )
        fit.add_argument(
            "--model-output",
            metavar="NAME",
            default=None,
            help="which output of the model to distil and compare when it has several: a name "
            "(pooler_output) or an index (default: logits, else last_hidden_state, else the "
            "first)",
        )
        fit.add_argument(
            "--min-fidelity",
            type=_fraction,
            default=None,
            metavar="X",
            help="without --budget: search for the smallest generator whose fidelity "
            "(agreement, cosine or correlation, by output kind) reaches X on a validation "
            "split, and report it on the held-out data; with --budget, a check. Exit 1 "
            "(files still written) when the reported fidelity is below X",
        )
        fit.add_argument(
            "--state",
            default=None,
            metavar="IN=OUT",
            help="a stateful model: positional input IN is fed from output OUT (default: "
            "forward(x, state) -> (y, state) is detected and named; 'none': not stateful). "
            "With stream_test in the .npz the fidelity is measured free-running, as deployed",
        )
        fit.add_argument(
            "--rollout",
            type=int,
            default=defaults["rollout"],
            metavar="N",
            help="a stateful model with stream_train: chunks per distillation rollout on the "
            f"student's own state (default {defaults['rollout']}; longer follows the stream "
            "further per step, at more cost)",
        )
        fit.add_argument(
            "--batch-dim",
            action="append",
            default=[],
            metavar="NAME=DIM",
            help="an input whose batch is not dimension 0, e.g. 1=1 for forward(x, state) "
            "with a state (layers, batch, hidden); NAME as the .npz names it (0, 1, input_ids), "
            "or output.K for an output (a fed-back state output takes its input's). Repeat it. "
            "The ONNX file takes the inputs in this layout",
        )
        fit.add_argument(
            "--time-limit",
            type=float,
            default=1800.0,
            metavar="SECONDS",
            help="with --min-fidelity and no --budget: the budget search keeps its best point "
            "after this many seconds (default 1800)",
        )
        fit.add_argument(
            "--storage",
            choices=("auto", "float32", "float16", "int8"),
            default="auto",
            help="how the generator file stores the generator's parameters (default auto: "
            "int8, else float16, else float32, the first that keeps the fine-tuned fidelity "
            "within 0.005)",
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
            "-v",
            "--verbose",
            action="store_true",
            help="print one line per stage on stderr (on a terminal: always, with the bars)",
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
        " --data data.npz -o out --chunk 16 --report\n"
        "  qtcompress compress my-bert/ --data sentences.txt -o out   (a Hugging Face model "
        'folder; pip install -e ".[hf]")',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compress_cmd.add_argument(
        "model",
        help="checkpoint: state dict (.pt/.pth/.safetensors, "
        "with --factory), torch.export program (.pt2), pickled model "
        "(with --trust-pickle), or a Hugging Face model folder (config.json + "
        "model.safetensors)",
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
        help="'digits', 'wine', an .npz with x_train, x_test [, y_train, y_test], a table "
        "(.csv with a header row, or .parquet: every column a float feature but "
        "--label-column), or for a model folder text: .txt (one example a line), .jsonl or "
        ".csv (see --text-column), or a folder of images (sub-folders as classes)",
    )
    # --out too: as a prefix it was ambiguous with --output-kind (an argparse error)
    compress_cmd.add_argument("-o", "--output", "--out", required=True, help="output folder")
    compress_cmd.add_argument("--name", help="base name of the output files")
    # -- Hugging Face model folders and their text data (qtcompress/io/hf_folder.py,
    # qtcompress/data/text.py); refused with any other model.
    hf = compress_cmd.add_argument_group(
        "Hugging Face model folders",
        "MODEL is a folder with config.json and model.safetensors, built with transformers "
        "from the folder alone; text data is tokenized with the folder's tokenizer, images "
        "are prepared as its preprocessor_config.json says",
    )
    hf.add_argument(
        "--hf-class",
        metavar="CLASS",
        help="transformers model class to build, e.g. BertForMaskedLM (default: the "
        "config's architectures)",
    )
    hf.add_argument(
        "--task",
        choices=sorted(HF_TASKS),
        help="build the Auto class of this task instead (e.g. feature-extraction: AutoModel)",
    )
    hf.add_argument(
        "--pooling",
        choices=POOLINGS,
        help="what is distilled, scored and exported of a text model's token states: mean, "
        "max or cls (one vector per text, padding left out), masked (every token, padding "
        "zeroed), none (the output as it is) (default: the folder's sentence-transformers "
        "pooling, else masked for a base model's last_hidden_state, else none)",
    )
    hf.add_argument(
        "--text-column",
        metavar="COL",
        help=f"the text's key (.jsonl) or column (.csv) (default {TEXT_COLUMN!r})",
    )
    hf.add_argument(
        "--label-column",
        metavar="COL",
        help="class labels' key or column (indices, or the config's label names)",
    )
    hf.add_argument(
        "--max-length",
        type=_positive_int,
        metavar="N",
        default=TEXT_MAX_LENGTH,
        help=f"tokens per example at most, longer ones truncated (default {TEXT_MAX_LENGTH}"
        "; at most the model's positions); examples are padded to the longest",
    )
    hf.add_argument(
        "--image-size",
        type=_positive_int,
        metavar="N",
        help="images (--data DIR/ of image files, sub-folders as classes): resize to NxN "
        "(default: the folder's preprocessor_config.json, else the config's image_size)",
    )
    hf.add_argument(
        "--image-mean",
        type=float,
        nargs="+",
        metavar="M",
        help="images: per-channel mean to normalise with (default: the folder's "
        "preprocessor_config.json, else 0.5)",
    )
    hf.add_argument(
        "--image-std",
        type=float,
        nargs="+",
        metavar="S",
        help="images: per-channel standard deviation (default: as --image-mean)",
    )
    hf.add_argument(
        "--test-data",
        metavar="PATH",
        help="held-out data of the same kind, a file or an image folder (default: a seeded "
        "share of --data)",
    )
    hf.add_argument(
        "--test-fraction",
        type=_fraction,
        metavar="X",
        default=TEXT_TEST_FRACTION,
        help=f"share of --data held out to test without --test-data (default "
        f"{TEXT_TEST_FRACTION}, seed {TEXT_SPLIT_SEED})",
    )
    add_recipe(compress_cmd, DEFAULT_RECIPE)
    compress_cmd.set_defaults(handler=cmd_compress)

    demo = sub.add_parser(
        "demo",
        help="the main job on the shipped 420K-weight CNN (about 2 minutes on 2 cores)",
        description="Compress the shipped, pretrained 420K-weight CNN without BatchNorm "
        "(models/digits_cnn28.safetensors, scikit-learn's digits upsampled to 28x28) to 0.5%% "
        "of its weights: fit, fine-tune, export, verify, and print the summary with fidelity.",
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
        "--out",
        default="qtcompress-demo",
        help="output folder (default ./qtcompress-demo)",
    )
    add_recipe(demo, DEFAULT_RECIPE)
    demo.set_defaults(handler=cmd_demo)

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
        cmd_inspect,
    )
    rec = file_command(
        "reconstruct",
        "regenerate the network from a generator file (ONNX and/or state dict)",
        "Regenerate every weight from the generator file alone (qsim + mapping network), check "
        "the stored hash, and write an ONNX model (checked with onnx.checker and onnxruntime "
        "against the outputs recorded at save time) and/or a safetensors state dict.",
        "  qtcompress reconstruct m.qtc.safetensors --onnx m.onnx\n"
        "  qtcompress reconstruct m.qtc.safetensors --state-dict m.safetensors\n"
        "  qtcompress reconstruct m.qtc.safetensors --hf-out m-compressed/",
        cmd_reconstruct,
    )
    rec.add_argument("--onnx", help="write the ONNX model here")
    rec.add_argument("--state-dict", help="write the state dict (safetensors) here")
    rec.add_argument(
        "--hf-out",
        metavar="DIR",
        help="compressed from a Hugging Face model folder: write a folder transformers loads "
        "(its config and tokenizer files, the regenerated weights as model.safetensors)",
    )
    rec.add_argument(
        "--atol",
        type=float,
        default=ONNX_ATOL,
        help=f"allowed ONNX vs recorded max abs difference, beside {ONNX_RTOL:g} of the "
        f"largest recorded output (default {ONNX_ATOL:g})",
    )
    ver = file_command(
        "verify",
        "regenerate, check the hash, compare ONNX and torch outputs",
        "Regenerate the weights and check them against the stored SHA-256; rebuild the ONNX "
        "model and compare onnxruntime with the outputs recorded at save time; with --factory, "
        "also load the weights into your own model code and compare torch's outputs.",
        "  qtcompress verify m.qtc.safetensors\n"
        "  qtcompress verify m.qtc.safetensors --factory qtcompress.examples:DigitsCNN",
        cmd_verify,
    )
    ver.add_argument("--factory", help="'package.module:callable' building the model")
    ver.add_argument("--factory-kwargs", default="{}", help="JSON keyword arguments")
    ver.add_argument(
        "--atol",
        type=float,
        default=ONNX_RTOL,
        help="allowed max abs difference per unit of the largest recorded output (outputs "
        f"below 1 count as 1; default {ONNX_RTOL:g})",
    )
    return parser
