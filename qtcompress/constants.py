"""Names and hard limits shared across qtcompress, with no heavy imports.

``import qtcompress.config`` (and anything that only validates settings) must not pull in torch,
Cirq or qsim; the values they need live here.
"""

from __future__ import annotations

MAX_QUBITS = 30
"""The simulator's hard ceiling on QNN qubits (memory may allow fewer)."""

ACTIVATION_NAMES = ("tanh", "gelu", "relu", "silu")
"""Activations of the mapping networks (see :data:`qtcompress.mapping.ACTIVATIONS`)."""

PROB_TRANSFORMS = ("scaled", "paper", "log", "none")
"""Transforms of the QNN probabilities into mapping inputs (see
:func:`qtcompress.mapping.transform_probs`)."""
