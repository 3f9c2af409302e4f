"""The shipped example checkpoints load and reproduce the accuracy their model cards record."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtcompress import examples
from qtcompress.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(examples.EXAMPLES))
def test_shipped_checkpoint_matches_its_card(name):
    card = json.loads((ROOT / "models" / f"{name}.json").read_text())
    model_cls, dataset = examples.EXAMPLES[name]
    assert card["factory"] == f"qtcompress.examples:{model_cls.__name__}"
    model = model_cls(**card["kwargs"])
    model.load_state_dict(load_file(ROOT / "models" / f"{name}.safetensors"), strict=True)
    split = examples.load_dataset(card["dataset"], seed=card["split_seed"])
    acc = examples.accuracy(model, split.x_test, split.y_test)
    assert acc == pytest.approx(card["test_accuracy"], abs=1e-4)
    assert acc > 0.9
    assert card["weights"] == sum(p.numel() for p in model.parameters())


def test_digits_split_shapes_and_ranges():
    split = examples.load_dataset("digits", seed=0)
    assert split.x_train.shape[1:] == (1, 8, 8) and split.x_train.dtype == torch.float32
    assert len(split.x_train) + len(split.x_test) == 1797
    assert 0.0 <= float(split.x_train.min()) and float(split.x_train.max()) <= 1.0
    assert set(split.y_test.tolist()) == set(range(10))


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ConfigError, match="Unknown example data set 'mnist'"):
        examples.load_dataset("mnist")
