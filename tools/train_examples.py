"""Train the shipped example models on scikit-learn's bundled data and save their checkpoints.

Writes ``models/<name>.safetensors`` (the state dict) and ``models/<name>.json`` (how to rebuild
the model, the data split and the measured accuracy). Deterministic for a given seed.

Usage:
    python tools/train_examples.py            # all examples
    python tools/train_examples.py digits_cnn
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from qtcompress.examples import EXAMPLES, accuracy, load_dataset, train_classifier
from qtcompress.io.atomic import atomic_path, atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]


def ship_suite_cnn(out_dir: Path) -> dict[str, object]:
    """``digits_cnn28``: the suite's 420K CNN without BatchNorm (trained by tools/suite.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import suite

    entry = suite.load_entry("cnn")
    path = out_dir / "digits_cnn28.safetensors"
    with atomic_path(path) as tmp:
        shutil.copyfile(entry.checkpoint, tmp)
    split = load_dataset("digits28", seed=suite.SEED)
    card = {
        "factory": "qtcompress.examples:DigitsCNN28",
        "kwargs": {},
        "dataset": "digits28",
        "split_seed": suite.SEED,
        "test_fraction": 0.2,
        "weights": sum(p.numel() for p in entry.model.parameters()),
        "train_accuracy": round(accuracy(entry.model, split.x_train, split.y_train), 4),
        "test_accuracy": round(accuracy(entry.model, split.x_test, split.y_test), 4),
        "trained_by": "tools/suite.py (model cnn), recipe " + json.dumps(entry.card["recipe"]),
        "checkpoint_bytes": path.stat().st_size,
        "checkpoint_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    atomic_write_bytes(out_dir / "digits_cnn28.json", (json.dumps(card, indent=2) + "\n").encode())
    return card


def train(name: str, out_dir: Path, seed: int) -> dict[str, object]:
    if name == "digits_cnn28":
        return ship_suite_cnn(out_dir)
    model_cls, dataset = EXAMPLES[name]
    torch.manual_seed(seed)
    model = model_cls()
    split = load_dataset(dataset, seed=seed)
    train_classifier(model, split, seed=seed)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    path = out_dir / f"{name}.safetensors"
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    card = {
        "factory": f"qtcompress.examples:{model_cls.__name__}",
        "kwargs": {},
        "dataset": dataset,
        "split_seed": seed,
        "test_fraction": 0.2,
        "weights": sum(p.numel() for p in model.parameters()),
        "train_accuracy": round(accuracy(model, split.x_train, split.y_train), 4),
        "test_accuracy": round(accuracy(model, split.x_test, split.y_test), 4),
        "checkpoint_bytes": path.stat().st_size,
        "checkpoint_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    atomic_write_bytes(out_dir / f"{name}.json", (json.dumps(card, indent=2) + "\n").encode())
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help=f"examples to train: {', '.join(EXAMPLES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "models")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(EXAMPLES)
    if unknown:
        parser.error(f"unknown examples {sorted(unknown)}; choose from {sorted(EXAMPLES)}")
    for name in args.names or sorted(EXAMPLES):
        card = train(name, args.out, args.seed)
        print(
            f"{name}: {card['weights']} weights, test accuracy {card['test_accuracy']:.4f}, "
            f"{card['checkpoint_bytes']} bytes"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
