"""Tiny models of every common layer type, shared by the tests (each builds in milliseconds)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Conv2d + BatchNorm2d + Linear for 1x8x8 inputs (the digits shape)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 8, 8)
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)  # (B, 8, 4, 4)
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)  # (B, 16, 2, 2)
        return self.head(x.flatten(1))  # (B, classes)


class TinyMLP(nn.Module):
    """Linear + LayerNorm MLP for tabular inputs."""

    def __init__(self, features: int = 13, classes: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, features)
        return self.net(x)


class TinyConv1d(nn.Module):
    """Conv1d + BatchNorm1d over sequences."""

    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, 6, 3, padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, channels, T)
        return self.head(torch.relu(self.bn(self.conv(x))).mean(-1))


class TinyTransformer(nn.Module):
    """Embedding + TransformerEncoder (MultiheadAttention, LayerNorm) + tied output head."""

    def __init__(self, vocab: int = 20, dim: int = 16, layers: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(
            dim, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        # Fresh encoder layers are deep copies with identical values; ONNX exporters merge
        # identical initializers, so give every layer its own values.
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            else:
                nn.init.normal_(p, std=0.02)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, T) int64
        return self.head(self.encoder(self.embed(tokens)).mean(1))  # (B, classes)


class TinyLSTM(nn.Module):
    """Embedding + LSTM + Linear."""

    def __init__(self, vocab: int = 20, dim: int = 8, hidden: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, T) int64
        out, _ = self.lstm(self.embed(tokens))  # (B, T, hidden)
        return self.head(out[:, -1])


class TinyGRU(nn.Module):
    """GRU over float sequences + Linear."""

    def __init__(self, features: int = 4, hidden: int = 6, classes: int = 2) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, features)
        out, _ = self.gru(x)
        return self.head(out[:, -1])


class TiedLM(nn.Module):
    """Embedding whose weight is shared with the output projection (tied parameters)."""

    def __init__(self, vocab: int = 12, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, T)
        return self.out(self.embed(tokens))  # (B, T, vocab)


class TwoInputEncoder(nn.Module):
    """BERT-style: ``forward(input_ids, attention_mask) -> (B, dim)`` unit-norm embedding."""

    def __init__(self, vocab: int = 20, dim: int = 16, max_len: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        self.register_buffer("position_ids", torch.arange(max_len)[None], persistent=True)
        self.layer = nn.TransformerEncoderLayer(
            dim, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.proj = nn.Linear(dim, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = self.position_ids[:, : input_ids.shape[1]]  # (1, T)
        h = self.layer(
            self.embed(input_ids) + self.position(pos), src_key_padding_mask=attention_mask == 0
        )  # (B, T, dim)
        m = attention_mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # masked mean (B, dim)
        return nn.functional.normalize(self.proj(pooled), dim=-1)


class StatefulCell(nn.Module):
    """Streaming: ``forward(x, state) -> (probability, new_state)`` with an LSTMCell."""

    def __init__(self, features: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(features, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state.unbind(1)  # state: (B, 2, hidden)
        for t in range(x.shape[1]):  # x: (B, T, features)
            h, c = self.cell(x[:, t], (h, c))
        return torch.sigmoid(self.out(h)).squeeze(-1), torch.stack([h, c], 1)


class StreamingLSTM(nn.Module):
    """Streaming as shipped: ``forward(x, state) -> (probability, state)``, batch in state's dim 1.

    ``state`` is ``(2 * layers, B, hidden)``: the LSTM's ``h`` and ``c`` stacked, each in
    PyTorch's own ``(layers, batch, hidden)`` layout.
    """

    def __init__(self, features: int = 6, hidden: int = 8, layers: int = 1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state.chunk(2)  # x: (B, T, features)
        y, (h, c) = self.lstm(x, (h.contiguous(), c.contiguous()))
        return torch.sigmoid(self.out(y[:, -1])).squeeze(-1), torch.cat([h, c])


def example_input(model: nn.Module, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """A deterministic example batch for any model in this file (batch >= 2 for ONNX export)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, TinyCNN):
        return torch.randn(batch, 1, 8, 8, generator=g)
    if isinstance(model, TinyMLP):
        return torch.randn(batch, model.net[0].in_features, generator=g)
    if isinstance(model, TinyConv1d):
        return torch.randn(batch, model.conv.in_channels, 10, generator=g)
    if isinstance(model, (TinyTransformer, TinyLSTM, TiedLM)):
        return torch.randint(0, model.embed.num_embeddings, (batch, 7), generator=g)
    if isinstance(model, TinyGRU):
        return torch.randn(batch, 5, model.gru.input_size, generator=g)
    raise TypeError(f"No example input for {type(model).__name__}")


ALL_MODELS = (TinyCNN, TinyMLP, TinyConv1d, TinyTransformer, TinyLSTM, TinyGRU, TiedLM)
