"""Example models and offline data sets for the demo, the tests and the benchmarks.

The data come from scikit-learn's bundled data sets (no download). The models are small enough
to train in seconds on a laptop CPU; their trained checkpoints ship in the repository's
``models/`` folder (see ``tools/train_examples.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qtcompress.errors import ConfigError


class DigitsCNN(nn.Module):
    """A ~6K-weight CNN with BatchNorm for scikit-learn's 8x8 digits (10 classes).

    Args:
        channels: Channels of the two conv layers.
        classes: Output classes.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.head = nn.Linear(c2 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images of shape ``(B, 1, 8, 8)``."""
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)  # (B, c1, 4, 4)
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)  # (B, c2, 2, 2)
        return self.head(x.flatten(1))  # (B, classes)


class DigitsCNN28(nn.Module):
    """A ~420K-weight CNN **without BatchNorm** for 28x28 images (the demo's default model).

    Real-shaped: nothing re-centres its activations, so a compressed copy whose weights are off
    has no BatchNorm to rescue it. Trained by ``tools/suite.py`` (model ``cnn``) on
    scikit-learn's digits upsampled to 28x28.

    Args:
        channels: Channels of the two 3x3 conv layers.
        hidden: Width of the hidden fully connected layer.
        classes: Output classes.
        size: Input height and width (divisible by 4).
    """

    def __init__(
        self,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
        classes: int = 10,
        size: int = 28,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * (size // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes)`` for images ``(B, 1, size, size)``."""
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)  # (B, c1, 14, 14)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)  # (B, c2, 7, 7)
        x = torch.relu(self.fc1(x.flatten(1)))  # (B, hidden)
        return self.fc2(x)  # (B, classes)


def upsample(images: torch.Tensor, size: int = 28) -> torch.Tensor:
    """Bilinearly upsample ``(N, 1, h, w)`` images in [0, 1] to ``(N, 1, size, size)``."""
    out = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return out.clamp(0.0, 1.0)  # bilinear is a convex mix already; clamp guards rounding


class TabularMLP(nn.Module):
    """A two-hidden-layer MLP for tabular data (scikit-learn's wine: 13 features, 3 classes).

    Args:
        features: Input features.
        classes: Output classes.
        hidden: Width of the hidden layers.
    """

    def __init__(self, features: int = 13, classes: int = 3, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of shape ``(B, features)``."""
        return self.net(x)


@dataclass(frozen=True)
class Split:
    """A train/test split: inputs and labels (empty tensors when there are none).

    Inputs are a tensor (one positional input), a tuple of tensors (positional) or a dict of
    tensors (keyword); see :mod:`qtcompress.data`.
    """

    x_train: Any
    y_train: torch.Tensor
    x_test: Any
    y_test: torch.Tensor
    # Stream id of each test row (rows of a stream consecutive, in order): a stateful model's
    # held-out streams, replayed free-running (qtcompress.train.streams).
    stream_test: torch.Tensor | None = None
    # The same for the training rows: a stateful model then distils over rollouts on its own
    # state (qtcompress.train.streams.Rollouts).
    stream_train: torch.Tensor | None = None


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Split:
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    tx = torch.from_numpy(x.astype(np.float32))
    ty = torch.from_numpy(y.astype(np.int64))
    return Split(tx[train], ty[train], tx[test], ty[test])


def load_dataset(name: str, seed: int = 0, test_fraction: float = 0.2) -> Split:
    """Load an offline scikit-learn classification data set as a seeded train/test split.

    ``"digits"``: images scaled to [0, 1], shape ``(N, 1, 8, 8)``. ``"digits28"``: the same
    split upsampled to ``(N, 1, 28, 28)``. ``"wine"``: 13 features standardised with the
    training split's statistics.

    Args:
        name: ``"digits"``, ``"digits28"`` or ``"wine"``.
        seed: Seed of the shuffled split.
        test_fraction: Fraction held out for testing.

    Returns:
        The split.
    """
    try:
        from sklearn import datasets
    except ImportError as exc:  # an optional extra: only the shipped examples need it
        raise ConfigError(
            f"The example data set {name!r} comes from scikit-learn, which is not installed: "
            'pip install -e ".[examples]".'
        ) from exc

    if name == "digits":
        data = datasets.load_digits()
        x = (data.images / 16.0)[:, None, :, :]
        return _split(x, data.target, test_fraction, seed)
    if name == "digits28":
        split = load_dataset("digits", seed=seed, test_fraction=test_fraction)
        return Split(upsample(split.x_train), split.y_train, upsample(split.x_test), split.y_test)
    if name == "wine":
        data = datasets.load_wine()
        split = _split(data.data, data.target, test_fraction, seed)
        mean, std = split.x_train.mean(0), split.x_train.std(0) + 1e-6
        return Split(
            (split.x_train - mean) / std, split.y_train, (split.x_test - mean) / std, split.y_test
        )
    raise ConfigError(f"Unknown example data set {name!r}; choose 'digits', 'digits28' or 'wine'.")


@torch.no_grad()
def accuracy(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> float:
    """Top-1 accuracy in [0, 1] of a model's logits.

    An ``nn.Module`` is run in eval mode and its train/eval mode restored; any other callable
    (e.g. a ``QTModel``) is called as is.
    """
    if not isinstance(model, nn.Module):
        return float((model(x).argmax(-1) == y).float().mean())
    was_training = model.training
    model.eval()
    try:
        return float((model(x).argmax(-1) == y).float().mean())
    finally:
        model.train(was_training)


def train_classifier(
    model: nn.Module,
    split: Split,
    epochs: int = 40,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Train a classifier with Adam and cross-entropy, deterministically for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(split.x_train), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
            optimizer.step()
        schedule.step()
    model.eval()
    return model


EXAMPLES = {
    "digits_cnn28": (DigitsCNN28, "digits28"),
    "digits_cnn": (DigitsCNN, "digits"),
    "wine_mlp": (TabularMLP, "wine"),
}
