"""A matrix-product-state (tensor-network) mapping, in the style of arXiv 2409.06992.

The weight block of basis state ``b_0 ... b_{n-1}`` is ``l^T A_0[b_0] A_1[b_1] ... A_{n-1}[b_{n-1}]
(O_0 + x O_1)``: one ``(D, D)`` matrix per qubit and bit value, a left boundary vector ``l`` and an
output tensor that mixes in the transformed probability ``x``. Parameters grow as ``2 n D^2``,
linearly in the number of qubits, instead of with the hidden widths of an MLP.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qtcompress.errors import ConfigError
from qtcompress.mapping import Mapping


class MPSMapping(Mapping):
    """MPS mapping of bond dimension ``bond_dim``.

    Args:
        n_qubits: n.
        chunk: Weights emitted per basis state.
        bond_dim: Bond dimension D (>= 1).
        seed: Seeds the initial tensors.
    """

    def __init__(self, n_qubits: int, chunk: int = 1, bond_dim: int = 4, seed: int = 0) -> None:
        super().__init__()
        if n_qubits < 1 or chunk < 1 or bond_dim < 1:
            raise ConfigError(
                f"n_qubits, chunk and bond_dim must be >= 1, got {n_qubits}, {chunk}, {bond_dim}."
            )
        self.n_qubits, self.chunk, self.bond_dim = n_qubits, chunk, bond_dim
        g = torch.Generator().manual_seed(seed)
        d = bond_dim
        # Near-identity site matrices keep the product's norm O(1) however many qubits there are.
        eye = torch.eye(d).expand(n_qubits, 2, d, d)
        noise = torch.randn(n_qubits, 2, d, d, generator=g) / math.sqrt(d * max(n_qubits, 1))
        self.sites = nn.Parameter(eye + noise)  # (n, 2, D, D)
        self.left = nn.Parameter(torch.randn(d, generator=g) / math.sqrt(d))  # (D,)
        self.out = nn.Parameter(torch.randn(d, 2, chunk, generator=g))  # (D, 2, chunk)

    def forward(self, bits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Contract the MPS for each state.

        Args:
            bits: ``(S, n)`` +-1 (+1 is bit 0).
            x: ``(S,)`` transformed probabilities.

        Returns:
            ``(S, chunk)``.
        """
        v = self.left.expand(bits.shape[0], -1)  # (S, D)
        for q in range(self.n_qubits):
            # Both products, then select by bit: (S, D) memory instead of gathering (S, D, D).
            v = torch.where(bits[:, q : q + 1] > 0, v @ self.sites[q, 0], v @ self.sites[q, 1])
        feat = torch.stack([torch.ones_like(x), x], dim=1)  # (S, 2)
        return torch.einsum("sd,dfk,sf->sk", v, self.out, feat)
