"""A suite of real-shaped pretrained models, trained offline and deterministically.

The toy examples in ``qtcompress.examples`` are tiny and use BatchNorm, which hides failures of
a compressor. This suite trains four realistic models on scikit-learn's bundled ``load_digits``
(1,797 8x8 images, no download; the seeded 80/20 split of ``qtcompress.examples``), and a
conv + BiLSTM CTC line recogniser (``crnn``) on text lines rendered with Pillow's built-in font
(:func:`render_lines`; seeded, nothing downloaded):

=========  ==============  ==========  =================================================
name       class           weights     inputs (dim 0 = batch)
=========  ==============  ==========  =================================================
cnn        DigitsCNN28     421,642     tensor (B, 1, 28, 28) -> logits (B, 10)
rnn        StreamingRNN    335,425     tuple (x (B, 14, 28), state (B, 2, 256))
                                       -> (probability (B,), new state (B, 2, 256))
encoder    TinyEncoder     804,096     dict input_ids, attention_mask (B, 64)
                                       -> L2-normalised embedding (B, 128)
mlp5m      WideMLP         5,824,522   tensor (B, 784) -> logits (B, 10)
crnn       TextCRNN        1,487,637   tensor (B, 1, 32, 128) grey text line
                                       -> per-frame CTC scores (B, 32, 21), blank = 0
=========  ==============  ==========  =================================================

None of them has BatchNorm. ``crnn``'s labels are the strings' class ids padded with 0 to
:data:`LINE_MAX_LEN` (``(N, 10)`` int64) and its metric is 1 - CER of its greedy decodes
against the true strings (Pillow, which matplotlib installs, is needed to render its data).
Trained weights are cached in ``build/suite/<name>.safetensors`` with a ``<name>.json`` card
(accuracy and its metric, seed, recipe, train time, SHA-256). :func:`load_suite` trains what is
missing or stale and loads the rest; the data tensors are rebuilt each time.

Usage:
    python tools/suite.py                      # train what is missing, print the table
    python tools/suite.py --only cnn rnn       # a subset
    python tools/suite.py --retrain            # ignore the cache

From another tool::

    sys.path.insert(0, str(Path(__file__).parent))
    import suite
    for entry in suite.load_suite(["cnn"]):
        out = suite.predict(entry.model, entry.test_inputs)
"""

# No `from __future__ import annotations`: dataclasses then look the module up in sys.modules,
# which fails when a test loads this file with importlib.util.spec_from_file_location.
import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qtcompress import QTConfig, compress  # noqa: E402
from qtcompress.examples import DigitsCNN28, Split, load_dataset, upsample  # noqa: E402
from qtcompress.io.atomic import atomic_path, atomic_write_bytes  # noqa: E402
from qtcompress.train.objectives import ctc_greedy, edit_distance  # noqa: E402

__all__ = [
    "ALPHABET",
    "CACHE_DIR",
    "LINE_MAX_LEN",
    "NAMES",
    "SEED",
    "DigitsCNN28",
    "StreamingRNN",
    "SuiteEntry",
    "TextCRNN",
    "TinyEncoder",
    "WideMLP",
    "call_model",
    "carried_states",
    "centroid_accuracy",
    "character_error_rate",
    "ctc_decode",
    "digits_split",
    "evaluate",
    "index_inputs",
    "line_split",
    "load_entry",
    "load_suite",
    "predict",
    "render_lines",
    "rnn_windows",
    "tokenize",
    "upsample",
]

SEED = 0
CACHE_DIR = ROOT / "build" / "suite"
THREADS = 2  # training thread count: fixed so that a checkpoint does not depend on the machine
VERSION = 1  # bump when a model or its data change in a way the recipe does not show
Inputs = Any  # Tensor | tuple[Tensor, ...] | dict[str, Tensor]; dim 0 = batch


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class StreamingRNN(nn.Module):
    """A streaming binary detector: Conv1d front end + LSTMCell, state carried between calls.

    ``state`` packs the LSTM cell's ``(h, c)`` into one tensor ``(B, 2, hidden)`` so that the
    model has exactly two positional tensor inputs and two tensor outputs, as exported
    streaming models usually do.

    Args:
        features: Features per frame.
        channels: Output channels of the Conv1d front end (kernel 3 over time).
        hidden: LSTM state size.
    """

    def __init__(self, features: int = 28, channels: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.hidden = hidden
        self.frontend = nn.Conv1d(features, channels, 3, padding=1)
        self.cell = nn.LSTMCell(channels, hidden)
        self.head = nn.Linear(hidden, 1)

    def initial_state(self, batch: int) -> torch.Tensor:
        """The zero state ``(batch, 2, hidden)`` a stream starts from."""
        return torch.zeros(batch, 2, self.hidden)

    def logit(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-sigmoid score ``(B,)`` and the new state; see :meth:`forward`."""
        # The conv pads each window on its own: streaming is not the same as one long window.
        z = F.relu(self.frontend(x.transpose(1, 2))).transpose(1, 2)  # (B, T, channels)
        h, c = state[:, 0], state[:, 1]  # (B, hidden) each
        for t in range(z.shape[1]):
            h, c = self.cell(z[:, t], (h, c))
        return self.head(h).squeeze(-1), torch.stack((h, c), dim=1)  # (B,), (B, 2, hidden)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one window of frames from a carried state.

        Args:
            x: Frames ``(B, T, features)``.
            state: ``(B, 2, hidden)``: ``h`` and ``c`` carried out of the previous window
                (zeros at the start of a stream).

        Returns:
            The event probability ``(B,)`` after the window and the new state ``(B, 2, hidden)``.
        """
        score, new_state = self.logit(x, state)
        return torch.sigmoid(score), new_state


class TinyEncoder(nn.Module):
    """A small BERT-style encoder: token + learned position embeddings, post-norm layers.

    Called by keyword like a Hugging Face model: ``model(input_ids=..., attention_mask=...)``.
    The output is the masked mean of the last layer's tokens, L2-normalised (a sentence
    embedding). ``position_ids`` is a persistent integer buffer, as in Hugging Face's BERT, so
    the state dict holds a non-float tensor.

    Args:
        vocab: Vocabulary size (0 = padding).
        max_len: Longest sequence.
        d_model: Model width.
        heads: Attention heads.
        layers: Encoder layers.
        ff: Feed-forward width.
        dropout: Dropout in training.
    """

    position_ids: torch.Tensor  # (1, max_len) int64 buffer

    def __init__(
        self,
        vocab: int = 20,
        max_len: int = 64,
        d_model: int = 128,
        heads: int = 4,
        layers: int = 4,
        ff: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model, padding_idx=0)
        self.positions = nn.Embedding(max_len, d_model)
        self.register_buffer("position_ids", torch.arange(max_len)[None], persistent=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        # A ModuleList of separately initialised layers (nn.TransformerEncoder would deep-copy
        # one layer, so every layer would start from the same values).
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, heads, ff, dropout, activation="gelu", batch_first=True
            )
            for _ in range(layers)
        )
        for module in self.modules():
            _bert_init(module)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed token sequences.

        Args:
            input_ids: Token ids ``(B, L)``, ``L <= max_len``.
            attention_mask: ``(B, L)``, 1 for real tokens and 0 for padding.

        Returns:
            Unit-norm embeddings ``(B, d_model)``.
        """
        positions = self.position_ids[:, : input_ids.shape[1]]  # (1, L)
        x = self.tokens(input_ids) + self.positions(positions)  # (B, L, d_model)
        x = self.dropout(self.norm(x))
        padding = attention_mask == 0  # (B, L), True = ignore
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)  # (B, L, d_model)
        mask = attention_mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        pooled = (x * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, d_model)
        return F.normalize(pooled, dim=-1)


class TextCRNN(nn.Module):
    """A CTC text-line recogniser without BatchNorm: 4 conv layers, a 2-layer BiLSTM, a Linear.

    The convolutions (3x3, ReLU) and max-pools take a ``(B, 1, 32, W)`` line down to one row of
    ``W / 4`` frames (the height collapsed by pooling); the BiLSTM reads the frames left to
    right and right to left; the Linear scores each frame's classes (0 = the CTC blank).

    Args:
        channels: Output channels of the four conv layers.
        hidden: LSTM state size per direction.
        classes: Output classes, blank included.
    """

    def __init__(
        self, channels: tuple[int, ...] = (16, 32, 64, 128), hidden: int = 192, classes: int = 21
    ) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 x W/2
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 x W/4
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d((2, 1)),  # 4 x W/4
            nn.Conv2d(c3, c4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d((4, 1)),  # 1 x W/4: the height collapsed
        )
        self.rnn = nn.LSTM(c4, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame class scores ``(B, W / 4, classes)``, batch-first, of ``(B, 1, 32, W)``."""
        z = self.features(x).squeeze(2).transpose(1, 2)  # (B, T, c4)
        return self.head(self.rnn(z)[0])  # (B, T, classes)


def _bert_init(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        nn.init.normal_(module.in_proj_weight, std=0.02)
        nn.init.zeros_(module.in_proj_bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class WideMLP(nn.Module):
    """A wide MLP without BatchNorm (~5.8M weights) on flattened images.

    Args:
        inputs: Input features (28 * 28).
        hidden: Widths of the hidden layers.
        classes: Output classes.
    """

    def __init__(
        self, inputs: int = 784, hidden: tuple[int, ...] = (2048, 2048), classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(inputs, width), nn.ReLU()]
            inputs = width
        layers.append(nn.Linear(inputs, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes)`` for inputs ``(B, inputs)``."""
        return self.net(x)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def digits_split(seed: int = SEED) -> Split:
    """The seeded 80/20 split of the 1,797 digits: 8x8 images in [0, 1], (N, 1, 8, 8)."""
    return load_dataset("digits", seed=seed, test_fraction=0.2)


# Text lines for the CTC model: class k (1..len(ALPHABET)) is ALPHABET[k - 1]; 0 is the blank.
ALPHABET = "0123456789ACEHKMNPRX"
LINE_HEIGHT, LINE_WIDTH = 32, 128
LINE_MIN_LEN, LINE_MAX_LEN = 3, 10
LINE_DATA = {"train": 4000, "test": 500, "train_seed": 1000, "test_seed": 2000}


def render_lines(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` random strings of ALPHABET as grey text lines, deterministically.

    Each line: 3 to 10 characters in Pillow's built-in scalable font (size 14 to 17) at a random
    offset, with a random gap of 0-2 px after each character and a random vertical jitter of
    up to 1 px per character; light text on a darker background, both at random grey levels,
    then Gaussian pixel noise of random strength; values in [0, 1].

    Returns:
        Images ``(n, 1, 32, 128)`` float32 and labels ``(n, LINE_MAX_LEN)`` int64: class ids
        (1-based into ALPHABET) padded with 0.
    """
    from PIL import Image, ImageDraw, ImageFont  # lazy: only this model's data needs Pillow

    rng = torch.Generator().manual_seed(seed)
    fonts = {size: ImageFont.load_default(size=size) for size in range(14, 18)}
    images = torch.zeros(n, 1, LINE_HEIGHT, LINE_WIDTH)
    labels = torch.zeros(n, LINE_MAX_LEN, dtype=torch.int64)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=rng))

    for i in range(n):
        length = int(torch.randint(LINE_MIN_LEN, LINE_MAX_LEN + 1, (), generator=rng))
        ids = torch.randint(1, len(ALPHABET) + 1, (length,), generator=rng)
        labels[i, :length] = ids
        font = fonts[int(torch.randint(14, 18, (), generator=rng))]
        gaps = [int(torch.randint(0, 3, (), generator=rng)) for _ in range(length)]
        advances = [font.getlength(ALPHABET[k - 1]) for k in ids.tolist()]
        width = sum(advances) + sum(gaps)
        top = font.getbbox("0")[1]
        height = font.getbbox("0")[3] - top
        x = uniform(1.0, max(1.0, LINE_WIDTH - 1 - width))
        y = uniform(2.0, LINE_HEIGHT - 2 - height) - top  # the +-1 px jitter stays inside
        background, ink = uniform(0.0, 0.3), uniform(0.65, 1.0)
        canvas = Image.new("L", (LINE_WIDTH, LINE_HEIGHT), 0)
        draw = ImageDraw.Draw(canvas)
        for k, gap, advance in zip(ids.tolist(), gaps, advances, strict=True):
            dy = uniform(-1.0, 1.0)
            draw.text((x, y + dy), ALPHABET[k - 1], fill=255, font=font)
            x += advance + gap
        glyphs = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).float() / 255
        line = background + (ink - background) * glyphs.view(LINE_HEIGHT, LINE_WIDTH)
        noise = torch.randn(LINE_HEIGHT, LINE_WIDTH, generator=rng) * uniform(0.02, 0.08)
        images[i, 0] = (line + noise).clamp(0.0, 1.0)
    return images, labels


_LINES: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def line_split() -> Split:
    """The seeded train and test text lines (rendered once per process)."""
    for n, seed in (
        (LINE_DATA["train"], LINE_DATA["train_seed"]),
        (LINE_DATA["test"], LINE_DATA["test_seed"]),
    ):
        if (n, seed) not in _LINES:
            _LINES[n, seed] = render_lines(n, seed)
    x_train, y_train = _LINES[LINE_DATA["train"], LINE_DATA["train_seed"]]
    x_test, y_test = _LINES[LINE_DATA["test"], LINE_DATA["test_seed"]]
    return Split(x_train.clone(), y_train.clone(), x_test.clone(), y_test.clone())


def ctc_decode(scores: torch.Tensor) -> list[list[int]]:
    """Greedy CTC decodes of ``(B, T, C)`` scores (blank = class 0): the library's own."""
    return ctc_greedy(scores)


def character_error_rate(decodes: Sequence[Sequence[int]], references: Any) -> float:
    """Total edit distance over total reference length (references: lists, or a 0-padded
    ``(N, L)`` label tensor)."""
    if isinstance(references, torch.Tensor):
        references = [[c for c in row if c != 0] for row in references.tolist()]
    errors = sum(edit_distance(list(d), list(r)) for d, r in zip(decodes, references, strict=True))
    return errors / max(1, sum(len(r) for r in references))


def rnn_windows(images: torch.Tensor, windows: int = 2) -> list[torch.Tensor]:
    """Read ``(N, 1, H, W)`` images row by row as H frames of W features, cut into windows.

    Returns:
        ``windows`` tensors ``(N, H // windows, W)``, in stream order.
    """
    frames = images[:, 0]  # (N, H, W): one frame per row
    return list(frames.chunk(windows, dim=1))


def tokenize(images: torch.Tensor, seed: int, min_len: int = 40) -> dict[str, torch.Tensor]:
    """Turn 8x8 images in [0, 1] into padded token sequences with random (seeded) lengths.

    Pixel intensity k in 0..16 becomes token k + 1 (0 is padding). Each sequence keeps its first
    L tokens, L uniform in ``[min_len, 64]``, and is padded to 64.

    Returns:
        ``{"input_ids": (N, 64) int64, "attention_mask": (N, 64) int64}``.
    """
    ids = (images.flatten(1) * 16).round().long() + 1  # (N, 64) in 1..17
    n, length = ids.shape
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, length + 1, (n,), generator=generator)  # (N,)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()  # (N, 64)
    return {"input_ids": ids * mask, "attention_mask": mask}


@torch.no_grad()
def carried_states(model: StreamingRNN, first_window: torch.Tensor) -> torch.Tensor:
    """The state ``(N, 2, hidden)`` a model carries out of a first window run from zeros."""
    return model(first_window, model.initial_state(len(first_window)))[1].detach()


def index_inputs(inputs: Inputs, idx: torch.Tensor | slice) -> Inputs:
    """Select rows (dim 0) of a tensor, a tuple of tensors or a dict of tensors."""
    if isinstance(inputs, torch.Tensor):
        return inputs[idx]
    if isinstance(inputs, Mapping):
        return {k: v[idx] for k, v in inputs.items()}
    return tuple(v[idx] for v in inputs)


def _rows(inputs: Inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return len(inputs)
    return len(next(iter(inputs.values() if isinstance(inputs, Mapping) else inputs)))


def call_model(model: Callable[..., Any], inputs: Inputs) -> Any:
    """Call a model the suite's way: tensor -> positional, tuple -> ``*args``, dict -> kwargs."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


@torch.no_grad()
def predict(model: nn.Module, inputs: Inputs, batch_size: int = 256) -> torch.Tensor:
    """The model's main output (the first one when it returns a tuple) for all rows, in batches.

    The model is run in eval mode and its mode restored.
    """
    was_training = model.training
    model.eval()
    try:
        outs = []
        for start in range(0, _rows(inputs), batch_size):
            out = call_model(model, index_inputs(inputs, slice(start, start + batch_size)))
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs)
    finally:
        model.train(was_training)


def centroid_accuracy(
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    test_emb: torch.Tensor,
    test_labels: torch.Tensor,
) -> float:
    """Nearest-class-centroid accuracy (cosine) of test embeddings against train centroids."""
    classes = int(train_labels.max()) + 1
    centroids = torch.stack([train_emb[train_labels == k].mean(0) for k in range(classes)])
    similarity = F.normalize(test_emb, dim=-1) @ F.normalize(centroids, dim=-1).T  # (N, C)
    return float((similarity.argmax(-1) == test_labels).float().mean())


def evaluate(
    model: nn.Module,
    output: str,
    train_inputs: Inputs,
    train_labels: torch.Tensor,
    test_inputs: Inputs,
    test_labels: torch.Tensor,
) -> float:
    """The suite's test metric for an output kind.

    ``"logits"``: top-1 accuracy; ``"probability"``: accuracy of ``p > 0.5``; ``"embedding"``:
    :func:`centroid_accuracy` (the only kind that needs the train inputs); ``"ctc"``: 1 - the
    character error rate of the greedy decodes against the 0-padded label strings.
    """
    out = predict(model, test_inputs)
    if output == "ctc":
        return 1.0 - character_error_rate(ctc_decode(out), test_labels)
    if output == "logits":
        return float((out.argmax(-1) == test_labels).float().mean())
    if output == "probability":
        return float(((out > 0.5).long() == test_labels).float().mean())
    if output == "embedding":
        return centroid_accuracy(predict(model, train_inputs), train_labels, out, test_labels)
    raise ValueError(f"unknown output kind {output!r}")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _fit(
    module: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    recipe: Mapping[str, Any],
    log: Callable[[str], None],
    name: str,
) -> None:
    """AdamW with linear warm-up then cosine decay over minibatches of ``range(n)``."""
    epochs, batch_size = recipe["epochs"], recipe["batch_size"]
    steps = epochs * math.ceil(n / batch_size)
    warmup = recipe.get("warmup", 0)
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=recipe["lr"], weight_decay=recipe.get("weight_decay", 0.0)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / (warmup + 1)) * 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    generator = torch.Generator().manual_seed(recipe["seed"])
    module.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = loss_fn(idx)
            optimizer.zero_grad()
            loss.backward()
            # Clipping keeps the post-norm transformer and the LSTM stable without tuning.
            nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        log(f"  {name} epoch {epoch + 1}/{epochs}: loss {total / n:.4f}")
    module.eval()


def _fit_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Mapping[str, Any],
    log: Callable[[str], None],
    name: str,
) -> None:
    _fit(model, lambda idx: F.cross_entropy(model(x[idx]), y[idx]), len(x), recipe, log, name)


def _fit_cnn(
    model: nn.Module, split: Split, recipe: Mapping[str, Any], log: Callable[[str], None]
) -> None:
    _fit_classifier(model, upsample(split.x_train), split.y_train, recipe, log, "cnn")


def _fit_mlp(
    model: nn.Module, split: Split, recipe: Mapping[str, Any], log: Callable[[str], None]
) -> None:
    _fit_classifier(model, upsample(split.x_train).flatten(1), split.y_train, recipe, log, "mlp5m")


def _fit_rnn(
    model: nn.Module, split: Split, recipe: Mapping[str, Any], log: Callable[[str], None]
) -> None:
    assert isinstance(model, StreamingRNN)
    w1, w2 = rnn_windows(upsample(split.x_train))
    y = (split.y_train >= 5).float()

    def loss(idx: torch.Tensor) -> torch.Tensor:
        # Both windows are supervised: the stream must be right after window 1 (from zeros)
        # and after window 2 (from the carried state, backpropagated through both windows).
        s1, state = model.logit(w1[idx], model.initial_state(len(idx)))
        s2, _ = model.logit(w2[idx], state)
        bce = F.binary_cross_entropy_with_logits
        return 0.5 * (bce(s1, y[idx]) + bce(s2, y[idx]))

    _fit(model, loss, len(w1), recipe, log, "rnn")


def _fit_crnn(
    model: nn.Module, split: Split, recipe: Mapping[str, Any], log: Callable[[str], None]
) -> None:
    assert isinstance(model, TextCRNN)
    lines = line_split()  # the digits split is not used
    x, y = lines.x_train, lines.y_train
    lengths = (y != 0).sum(1)  # (N,)
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)

    def loss(idx: torch.Tensor) -> torch.Tensor:
        scores = model(x[idx])  # (b, T, C)
        log_probs = scores.log_softmax(-1).transpose(0, 1)  # (T, b, C)
        frames = torch.full((len(idx),), scores.shape[1], dtype=torch.int64)
        return ctc(log_probs, y[idx], frames, lengths[idx])

    _fit(model, loss, len(x), recipe, log, "crnn")


class _CosineClassifier(nn.Module):
    """Training wrapper: a temperature-scaled cosine classifier on the encoder's embedding."""

    def __init__(self, encoder: TinyEncoder, classes: int, scale: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.weight = nn.Parameter(torch.randn(classes, encoder.tokens.embedding_dim) * 0.02)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        emb = self.encoder(input_ids, attention_mask)  # (B, D), unit norm
        return self.scale * emb @ F.normalize(self.weight, dim=-1).T  # (B, classes)


def _fit_encoder(
    model: nn.Module, split: Split, recipe: Mapping[str, Any], log: Callable[[str], None]
) -> None:
    assert isinstance(model, TinyEncoder)
    full = tokenize(split.x_train, seed=recipe["seed"], min_len=64)  # no cropping
    wrapper = _CosineClassifier(model, classes=10, scale=recipe["scale"])
    y = split.y_train
    generator = torch.Generator().manual_seed(recipe["seed"] + 1)

    def loss(idx: torch.Tensor) -> torch.Tensor:
        # A fresh crop length per sample and step (augmentation): the model sees each digit
        # at many lengths instead of memorising one fixed crop.
        ids = full["input_ids"][idx]  # (b, 64)
        lengths = torch.randint(40, ids.shape[1] + 1, (len(idx),), generator=generator)
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()  # (b, 64)
        logits = wrapper(input_ids=ids * mask, attention_mask=mask)
        return F.cross_entropy(logits, y[idx], label_smoothing=recipe["label_smoothing"])

    _fit(wrapper, loss, len(y), recipe, log, "encoder")


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteEntry:
    """One trained model of the suite with its data.

    Attributes:
        name: ``"cnn"``, ``"rnn"``, ``"encoder"``, ``"mlp5m"`` or ``"crnn"``.
        description: One line for benchmark tables: architecture, weights, data.
        model: The trained model, in eval mode.
        train_inputs: A tensor (one positional input), a tuple of tensors (positional) or a
            dict of tensors (keyword); dim 0 = batch. Call with :func:`call_model`.
        test_inputs: The same structure, held out.
        train_labels: Labels of the train rows (int64 classes; 0/1 for ``"probability"``;
            0-padded class-id strings ``(N, LINE_MAX_LEN)`` for ``"ctc"``).
        test_labels: Labels of the test rows.
        output: ``"logits"``, ``"probability"``, ``"embedding"`` or ``"ctc"`` (the model's
            output, or its first output when it returns a tuple).
        checkpoint: The safetensors file the weights were loaded from.
        accuracy: The test metric of the model (see :func:`evaluate`).
    """

    name: str
    description: str
    model: nn.Module
    train_inputs: Any
    test_inputs: Any
    train_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    output: str
    checkpoint: Path
    accuracy: float | None

    @property
    def weights(self) -> int:
        """Number of trainable parameters (buffers such as ``position_ids`` excluded)."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def card(self) -> dict[str, Any]:
        """The JSON card saved next to the checkpoint (train time, recipe, hash)."""
        return json.loads(self.checkpoint.with_suffix(".json").read_text())


Data = tuple[Inputs, Inputs, torch.Tensor, torch.Tensor]


def _data_cnn(model: nn.Module, split: Split) -> Data:
    return upsample(split.x_train), upsample(split.x_test), split.y_train, split.y_test


def _data_mlp(model: nn.Module, split: Split) -> Data:
    return (
        upsample(split.x_train).flatten(1),
        upsample(split.x_test).flatten(1),
        split.y_train,
        split.y_test,
    )


def _data_rnn(model: nn.Module, split: Split) -> Data:
    assert isinstance(model, StreamingRNN)

    def pairs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Rows [0, N): window 2 from the state the trained model carried out of window 1;
        # rows [N, 2N): window 1 from the zero state.
        w1, w2 = rnn_windows(upsample(images))
        carried = carried_states(model, w1)
        return torch.cat([w2, w1]), torch.cat([carried, model.initial_state(len(w1))])

    def labels(y: torch.Tensor) -> torch.Tensor:
        return (y >= 5).long().repeat(2)

    return pairs(split.x_train), pairs(split.x_test), labels(split.y_train), labels(split.y_test)


def _data_encoder(model: nn.Module, split: Split) -> Data:
    # Distinct seeds so that train and test lengths are independent draws.
    return (
        tokenize(split.x_train, seed=SEED),
        tokenize(split.x_test, seed=SEED + 1),
        split.y_train,
        split.y_test,
    )


def _data_crnn(model: nn.Module, split: Split) -> Data:
    lines = line_split()  # rendered text lines, not the digits
    return lines.x_train, lines.x_test, lines.y_train, lines.y_test


@dataclass(frozen=True)
class _Spec:
    build: Callable[[], nn.Module]
    output: str
    fit: Callable[[nn.Module, Split, Mapping[str, Any], Callable[[str], None]], None]
    data: Callable[[nn.Module, Split], Data]
    describe: str  # formatted with weights=, train=, test=
    recipe: Mapping[str, Any]


_SPECS: dict[str, _Spec] = {
    "cnn": _Spec(
        DigitsCNN28,
        "logits",
        _fit_cnn,
        _data_cnn,
        "CNN conv32-conv64-fc128-fc10, ReLU+maxpool, no BatchNorm, {weights:,} weights; "
        "digits upsampled to 28x28, {train:,}/{test:,} images",
        {"epochs": 15, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4, "seed": SEED},
    ),
    "rnn": _Spec(
        StreamingRNN,
        "probability",
        _fit_rnn,
        _data_rnn,
        "streaming Conv1d(28->64)+LSTMCell(256), state (B,2,256) in and out, {weights:,} "
        "weights; 28x28 digit rows as 2 windows of 14 frames, digit>=5, {train:,}/{test:,} "
        "windows (carried + zero state)",
        {"epochs": 15, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "seed": SEED},
    ),
    "encoder": _Spec(
        TinyEncoder,
        "embedding",
        _fit_encoder,
        _data_encoder,
        "BERT-style encoder 4 layers d128 h4 ff512, input_ids+attention_mask by keyword, "
        "{weights:,} weights; 64 pixel tokens cropped to 40-64, {train:,}/{test:,} sequences",
        {
            "epochs": 12,
            "batch_size": 32,
            "lr": 1e-3,
            "weight_decay": 1e-2,
            "warmup": 50,
            "scale": 16.0,
            "label_smoothing": 0.1,
            "seed": SEED,
        },
    ),
    "mlp5m": _Spec(
        WideMLP,
        "logits",
        _fit_mlp,
        _data_mlp,
        "MLP 784-2048-2048-10, ReLU, no BatchNorm, {weights:,} weights; flattened 28x28 "
        "digits, {train:,}/{test:,} images",
        {"epochs": 8, "batch_size": 64, "lr": 5e-4, "weight_decay": 1e-4, "seed": SEED},
    ),
    "crnn": _Spec(
        TextCRNN,
        "ctc",
        _fit_crnn,
        _data_crnn,
        "CRNN conv16-conv32-conv64-conv128 (ReLU, max-pool collapsing the height) + 2-layer "
        "BiLSTM(192) + Linear, no BatchNorm, {weights:,} weights; CTC over 32 frames, 21 "
        "classes (blank + 10 digits + 10 letters); rendered 32x128 text lines of 3-10 "
        "characters, {train:,}/{test:,} lines; metric 1 - CER",
        {
            "epochs": 30,
            "batch_size": 32,
            "lr": 2e-3,
            "weight_decay": 1e-4,
            "warmup": 100,
            "seed": SEED,
            "data": {
                **LINE_DATA,
                "alphabet": ALPHABET,
                "size": [LINE_HEIGHT, LINE_WIDTH],
                "length": [LINE_MIN_LEN, LINE_MAX_LEN],
            },
        },
    ),
}
NAMES: tuple[str, ...] = tuple(_SPECS)


def _recipe(name: str) -> dict[str, Any]:
    return {"version": VERSION, "split_seed": SEED, **_SPECS[name].recipe}


@contextlib.contextmanager
def _training_env(seed: int) -> Iterator[None]:
    """Fixed threads and seed for training; the caller's RNG and thread count are restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train(
    name: str, split: Split, weights: Path, log: Callable[[str], None]
) -> tuple[nn.Module, float]:
    """Train a model from its seed and save its state dict; returns it and the seconds taken."""
    spec, recipe = _SPECS[name], _recipe(name)
    log(f"training {name} ({recipe['epochs']} epochs)")
    start = time.perf_counter()
    with _training_env(recipe["seed"]):
        model = spec.build()
        spec.fit(model, split, recipe, log)
    seconds = time.perf_counter() - start
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    return model.eval(), seconds


_METRICS = {
    "logits": "top-1 accuracy",
    "probability": "accuracy of p > 0.5",
    "embedding": "nearest-centroid accuracy",
    "ctc": "1 - character error rate of greedy decodes against the true strings",
}


def _write_card(
    name: str, model: nn.Module, paths: tuple[Path, Path], seconds: float, accuracy: float
) -> None:
    weights, card_path = paths
    recipe = _recipe(name)
    card = {
        "name": name,
        "class": type(model).__name__,
        "weights": sum(p.numel() for p in model.parameters()),
        "accuracy": accuracy,
        "metric": _METRICS[_SPECS[name].output],
        "seed": recipe["seed"],
        "recipe": recipe,
        "train_seconds": round(seconds, 2),
        "threads": THREADS,
        "torch": torch.__version__,
        "checkpoint_bytes": weights.stat().st_size,
        "checkpoint_sha256": _sha256(weights),
    }
    # Written after the checkpoint: a checkpoint without a matching card counts as missing.
    atomic_write_bytes(card_path, (json.dumps(card, indent=2) + "\n").encode())


def _load_cached(
    name: str, paths: tuple[Path, Path], log: Callable[[str], None]
) -> nn.Module | None:
    """The cached model, or None (with the reason logged) when it is missing or stale."""
    weights, card_path = paths
    if not (weights.exists() and card_path.exists()):
        return None
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError:
        log(f"{name}: unreadable {card_path.name}; retraining")
        return None
    if card.get("recipe") != _recipe(name):
        log(f"{name}: cached recipe differs from the current one; retraining")
        return None
    if card.get("checkpoint_sha256") != _sha256(weights):
        log(f"{name}: {weights.name} does not match its card's SHA-256; retraining")
        return None
    model = _SPECS[name].build()
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:  # the architecture changed without a VERSION bump
        log(f"{name}: checkpoint does not fit the model ({str(exc).splitlines()[0]}); retraining")
        return None
    return model.eval()


def load_entry(
    name: str,
    cache_dir: Path = CACHE_DIR,
    retrain: bool = False,
    log: Callable[[str], None] = print,
) -> SuiteEntry:
    """Load one suite model from the cache, training it first if missing, stale or asked to.

    Args:
        name: One of :data:`NAMES`.
        cache_dir: Folder of ``<name>.safetensors`` and ``<name>.json`` (created if missing).
        retrain: Train even if a valid checkpoint is cached.
        log: Receives progress lines.

    Returns:
        The entry, with data rebuilt deterministically and the test metric measured on it.

    Raises:
        ValueError: ``name`` is not a suite model.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown suite model {name!r}; choose from {', '.join(NAMES)}")
    spec = _SPECS[name]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = (cache_dir / f"{name}.safetensors", cache_dir / f"{name}.json")
    split = digits_split(SEED)
    model = None if retrain else _load_cached(name, paths, log)
    seconds = None
    if model is None:
        model, seconds = _train(name, split, paths[0], log)
    train_in, test_in, y_train, y_test = spec.data(model, split)
    acc = evaluate(model, spec.output, train_in, y_train, test_in, y_test)
    if seconds is not None:
        _write_card(name, model, paths, seconds, acc)
        log(f"trained {name} in {seconds:.1f} s: test accuracy {acc:.4f}")
    elif acc != json.loads(paths[1].read_text())["accuracy"]:
        # Same weights and data, so only a different CPU/BLAS path can move the metric.
        log(f"{name}: test accuracy {acc:.4f} differs from the card's; kept the measured one")
    description = spec.describe.format(
        weights=sum(p.numel() for p in model.parameters()), train=len(y_train), test=len(y_test)
    )
    return SuiteEntry(
        name=name,
        description=description,
        model=model,
        train_inputs=train_in,
        test_inputs=test_in,
        train_labels=y_train,
        test_labels=y_test,
        output=spec.output,
        checkpoint=paths[0],
        accuracy=acc,
    )


def load_suite(
    names: Sequence[str] | None = None,
    cache_dir: Path = CACHE_DIR,
    retrain: bool = False,
    log: Callable[[str], None] = print,
) -> list[SuiteEntry]:
    """Load the suite (or ``names`` of it, in that order), training whatever is missing.

    Args:
        names: Models to load; all of :data:`NAMES` when None.
        cache_dir: Checkpoint folder.
        retrain: Train every requested model even if cached.
        log: Receives progress lines.

    Returns:
        One entry per name.

    Raises:
        ValueError: An unknown name (checked before anything is trained).
    """
    names = list(NAMES if names is None else names)
    unknown = [n for n in names if n not in _SPECS]
    if unknown:
        raise ValueError(f"unknown suite models {unknown}; choose from {', '.join(NAMES)}")
    return [load_entry(n, cache_dir=cache_dir, retrain=retrain, log=log) for n in names]


def format_table(entries: Sequence[SuiteEntry]) -> str:
    """A Markdown table: name, weights, output kind, test accuracy, train s, checkpoint bytes."""
    lines = [
        "| name | weights | output | test accuracy | train s | checkpoint bytes |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for e in entries:
        card = e.card
        acc = "-" if e.accuracy is None else f"{100 * e.accuracy:.2f}%"
        lines.append(
            f"| {e.name} | {e.weights:,} | {e.output} | {acc} | "
            f"{card['train_seconds']:.1f} | {e.checkpoint.stat().st_size:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=NAMES,
        metavar="NAME",
        help=f"models to load/train: {', '.join(NAMES)} (default: all)",
    )
    parser.add_argument("--retrain", action="store_true", help="train even if cached")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    entries = load_suite(args.only, cache_dir=args.cache_dir, retrain=args.retrain)
    print()
    print(format_table(entries))
    print()
    for e in entries:
        print(f"{e.name}: {e.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def capped_layers(model: nn.Module, config: QTConfig, max_layers: int) -> QTConfig:
    """``config`` on the register it resolves to for ``model``, its QNN at most ``max_layers``
    deep (the rest of the budget unspent): what the circuit's depth, which a step's cost grows
    with, buys."""
    resolved = compress(model, config).config
    assert resolved.n_qubits is not None and resolved.n_layers is not None
    return replace(config, n_qubits=resolved.n_qubits, n_layers=min(max_layers, resolved.n_layers))
