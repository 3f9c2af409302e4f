"""The hashed generator (``scheme="hashed"``): every weight a signed, scaled shared value.

HashedNets (arXiv 1504.04788) with the shared values made by a QNN. Weight ``j`` of matrix
``t`` (viewed as ``(rows, cols)``, row ``r``) is::

    W_t[r, c] = s_t[r] * sign(t, j) * v[bucket(t, j)]        j = r * cols + c

- ``v``: ``B`` shared values from a source (:mod:`qtcompress.generator.values`): for QT,
  ``v = 2**n p - 1`` with ``p`` the probabilities of an n-qubit circuit, ``B = 2**n``;
- ``bucket`` and ``sign``: a fixed integer hash of ``(seed, t, j)``: they cost nothing to store;
- ``s_t``: one scale per row (or one per tensor where rows would take more than a quarter of the
  budget), trained;
- vectors (biases, norm scales) are held exactly while the budget allows, else hashed with a
  scale and an offset each; every tensor's own values share one flat parameter, ``affine``.

The generator's size is the source's parameters plus the scales plus the vectors, whatever M
is: this is the scheme that reaches the polylog end (0.05-1% of M) where the rows scheme's
rank-1 heads cannot go.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qtcompress import limits
from qtcompress.errors import ConfigError
from qtcompress.generator.common import Generator, check_pretrained
from qtcompress.generator.ranks import row_view
from qtcompress.generator.values import make_values
from qtcompress.qnn import QNN, Ansatz
from qtcompress.qnn.ansatz import angles_per_layer, make_ansatz
from qtcompress.targets import Layout

if TYPE_CHECKING:
    from qtcompress.config import QTConfig

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay inside int64
# Qubits and layers of the QNN source: ``round(log2(allowance))`` qubits (as many buckets as
# parameters, within MIN_QUBITS..MAX_QUBITS), widened by up to WIDE_EXTRA_QUBITS (to at most
# WIDE_MAX_QUBITS, and at most one bucket per WIDE_MIN_SHARE weights) where the model is large
# enough: the same angles over 8x the buckets were 1.2-2.2 points ahead of the log2 register on
# the suite's CNN, LSTM and encoder at 0.5% of M (3 seeds each, tools/bench_wide.py), and 16
# qubits were no better than 14 at 4x the step. Small models keep the log2 register.
MIN_QUBITS, MAX_QUBITS = 4, 12
WIDE_EXTRA_QUBITS, WIDE_MAX_QUBITS, WIDE_MIN_SHARE = 3, 14, 16
# n * L * 2**n gate-amplitude updates per forward pass, at most: bounds the QNN's step, so a
# large budget does not buy a QNN step that dwarfs the model's (the remainder is not spent).
# 1 << 26 admits the 14 x 256 register measured on the encoder (about the 12 x 256 one's step
# there, tools/bench_wide.py).
MAX_QNN_WORK = 1 << 26
# Per-row scales are used while they cost at most this share of the budget left for them.
ROW_SCALE_SHARE = 0.25
# Vectors (biases, norms) stay exact while they cost at most this share of the budget.
EXACT_VECTOR_SHARE = 0.5
# The smallest shared-value allowance the scheme accepts (below it, nothing is learned).
MIN_VALUES = 16
# Without a budget, small models get at least this many parameters (at most a quarter of M):
# 0.5% of a 1e4-weight model is 50 values, too few to learn from; 1,024 is a 10-qubit QNN's
# worth of buckets.
DEFAULT_FLOOR = 1024


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix of non-negative int64 values below 2**32 (platform independent)."""
    x = (((x >> 16) ^ x) * _MUL) & _M32
    x = (((x >> 16) ^ x) * _MUL) & _M32
    return (x >> 16) ^ x


def _hash32_int(x: int) -> int:
    """:func:`hash32` of one Python int (no tensor: it also runs while planning on meta)."""
    x = (((x >> 16) ^ x) * _MUL) & _M32
    x = (((x >> 16) ^ x) * _MUL) & _M32
    return (x >> 16) ^ x


def hash_codes(seed: int, tensor: int, numel: int, buckets: int) -> torch.Tensor:
    """Signed bucket codes of a tensor's weights: ``bucket + buckets * (sign < 0)``, int32.

    The mixing runs in int64 (products of 32-bit values); the codes (below ``2 * buckets``,
    at most 8,192) are kept as int32: 4 bytes a weight, half of int64's at 1e8 weights.
    """
    salt = _hash32_int((seed * 1_000_003 + tensor * 7919) & _M32)
    x = hash32((torch.arange(numel, dtype=torch.int64) + salt) & _M32)
    return ((x & 0x7FFFFFFF) % buckets + buckets * (x >> 31)).to(torch.int32)


class HashedGenerator(Generator):
    """Hashed Quantum-Train generator (see the module docstring).

    Args:
        layout: The generated tensors.
        values: Shared-value source name (``"qnn"``; controls ``"mps"``, ``"table"``,
            ``"frozen"``, ``"zeros"``).
        n_qubits: Qubits of the QNN (``B = 2**n`` buckets for QNN-like sources).
        n_layers: QNN layers.
        allowance: Parameters the source may use (the table's size; the MPS's bond dimension).
        row_scales: One scale per matrix row (``True``) or per tensor.
        hashed_vectors: Vectors are hashed too (a scale and an offset each) instead of exact.
        backend: QNN simulator backend.
        seed: Seeds the hash, the QNN angles and the source.
        ansatz: The QNN's circuit (a name registered in :mod:`qtcompress.qnn.ansatz`); the
            classical controls stand in for it.
    """

    scheme = "hashed"

    def __init__(
        self,
        layout: Layout,
        *,
        values: str = "qnn",
        n_qubits: int,
        n_layers: int,
        allowance: int,
        row_scales: bool = True,
        hashed_vectors: bool = False,
        backend: str = "qsim",
        seed: int = 0,
        ansatz: str = "paper",
    ) -> None:
        super().__init__()
        self.layout = layout
        self.total = layout.total
        self.values_kind = values
        self._n_layers = n_layers
        self._ansatz = ansatz
        self.source = make_values(values, n_qubits, n_layers, allowance, backend, seed, ansatz)
        self.buckets = self.source.n_values
        self.chunk = max(1, math.ceil(self.total / self.buckets))  # weights per value, on average
        self.row_scales = bool(row_scales)
        self.views = [row_view(s.shape) for s in layout.specs]
        self.hashed_vectors = bool(hashed_vectors)
        self.is_vector = [rows <= 1 for rows, _ in self.views]
        self.is_hashed = [not v or self.hashed_vectors for v in self.is_vector]
        # Every tensor's own values live in one flat parameter, ``affine``: a hashed tensor's
        # scales (and a vector's offset), an exact vector's values. One stored tensor instead of
        # two or three per model tensor: a file's header lists each, and for a model of a hundred
        # tensors the header was most of a 0.1% generator's file.
        # Per tensor, (start, length) in affine of its scales (hashed) or its values (exact).
        self._scale_at: list[tuple[int, int]] = []
        self._offset_at: dict[int, int] = {}  # hashed vectors: position of the offset
        self._slot: list[int] = []  # hashed tensors: index of their codes (-1: exact)
        init: list[torch.Tensor] = []
        size = 0
        codes: list[torch.Tensor] = []
        for t, (s, (rows, _)) in enumerate(zip(layout.specs, self.views, strict=True)):
            if not self.is_hashed[t]:
                self._slot.append(-1)
                self._scale_at.append((size, s.numel))
                init.append(torch.zeros(s.numel))
                size += s.numel
                continue
            k = rows if self.row_scales else 1
            self._slot.append(len(codes))
            codes.append(hash_codes(seed, t, s.numel, self.buckets))
            self._scale_at.append((size, k))
            init.append(torch.ones(k))
            size += k
            if self.is_vector[t]:
                self._offset_at[t] = size
                init.append(torch.zeros(1))
                size += 1
        self.affine = nn.Parameter(torch.cat(init) if init else torch.zeros(0))
        self._scales_frozen = False
        starts = [0]
        for c in codes:
            starts.append(starts[-1] + c.numel())
        self._code_starts = starts
        empty = torch.zeros(0, dtype=torch.int32)
        # Rebuilt from the seed on load: never stored.
        self.register_buffer("_codes", torch.cat(codes) if codes else empty, persistent=False)

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def ansatz(self) -> Ansatz:
        """The QNN source's circuit; for a classical control, the circuit it stands in for."""
        qnn = getattr(self.source, "qnn", None)
        if isinstance(qnn, QNN):
            return qnn.ansatz
        return make_ansatz(self._ansatz, max(1, self.n_qubits), max(1, self._n_layers))

    @property
    def n_qubits(self) -> int:
        """Qubits of the QNN source (index bits of the buckets for the controls)."""
        return self.source.n_qubits

    def describe_shape(self) -> str:  # noqa: D102
        scales = "row" if self.row_scales else "tensor"
        vectors = "hashed" if self.hashed_vectors else "exact"
        return (
            f"{self.buckets} shared values from {self.values_kind}, {scales} scales, "
            f"{vectors} vectors"
        )

    def basis_state_text(self) -> str:  # noqa: D102
        # chunk is the average bucket's share of the weights.
        return f"about {self.chunk} weights sharing each basis state's value"

    def file_description(self, config: QTConfig) -> dict[str, Any]:  # noqa: D102
        # Every weight a signed, scaled copy of one of `buckets` values from the source.
        del config
        return {
            "kind": "hashed",
            "scheme": self.scheme,
            "chunk": int(self.chunk),
            "n_qubits": int(self.n_qubits),
            "values": self.values_kind,
            "buckets": int(self.buckets),
            "row_scales": bool(self.row_scales),
            "hashed_vectors": bool(self.hashed_vectors),
        }

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by part and ``total``.

        ``qnn``: the QNN's angles; ``mapping``: a classical source's parameters; ``affine``:
        the scales and the exact vectors.
        """
        src = self.source.count()
        qnn = src if self.values_kind == "qnn" else 0

        counts = {"qnn": qnn, "mapping": src - qnn, "affine": self.affine.numel()}
        counts["total"] = sum(counts.values())
        return counts

    # -- generation -----------------------------------------------------------------------------
    def signed_values(self) -> torch.Tensor:
        """``(2B,)``: the shared values followed by their negatives (codes index into it)."""
        v = self.source()
        return torch.cat([v, -v])

    def _tensor(self, signed: torch.Tensor, t: int) -> torch.Tensor:
        spec, slot = self.layout.specs[t], self._slot[t]
        start, n = self._scale_at[t]
        if not self.is_hashed[t]:
            return self.affine[start : start + n].reshape(spec.shape)
        codes: torch.Tensor = self._codes  # type: ignore[assignment]
        a, b = self._code_starts[slot], self._code_starts[slot + 1]
        rows, cols = self.views[t]
        w = signed.index_select(0, codes[a:b]).view(rows, cols)  # (rows, cols)
        scales = self.affine[start : start + n]
        w = w * (scales.detach() if self._scales_frozen else scales)[:, None]
        if t in self._offset_at:
            w = w + self.affine[self._offset_at[t]]
        return w.reshape(spec.shape)

    def _generate_list(self) -> list[torch.Tensor]:
        signed = self.signed_values()
        return [self._tensor(signed, t) for t in range(len(self.views))]

    def generate(self) -> torch.Tensor:
        """All generated weights as one flat ``(M,)`` float32 vector (differentiable)."""
        return torch.cat([w.reshape(-1) for w in self._generate_list()])

    def generate_named(
        self, flat: torch.Tensor | None = None, *, factored: bool = False
    ) -> dict[str, torch.Tensor]:
        """Generated tensors by name (aliases included), cast to each parameter's dtype.

        ``factored`` is accepted for the common interface; hashed tensors are always dense.
        """
        del factored
        return self._by_name(flat, self._generate_list)

    @torch.no_grad()
    def iter_blocks(self, block_states: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Stream the weights without gradients, one tensor at a time: ``(start, weights)``."""
        del block_states
        signed = self.signed_values()
        for t, s in enumerate(self.layout.specs):
            yield s.offset, self._tensor(signed, t).reshape(-1)

    # -- fitting --------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_pretrained(self, pretrained: torch.Tensor) -> None:
        """Exact vectors; a table source gets its least-squares values; every row its spread.

        Each weight shares its bucket with about ``M / B`` others of random signs, so the
        least-squares values are close to noise: the point of the start is that every row of
        the generated network has its pretrained spread (a network of shrunk rows is dead
        without BatchNorm), and distillation does the rest.
        """
        check_pretrained(pretrained, self.total)
        for t, s in enumerate(self.layout.specs):
            part = pretrained[s.offset : s.offset + s.numel]
            start, n = self._scale_at[t]
            if not self.is_hashed[t]:
                self.affine[start : start + n].copy_(part)
            elif t in self._offset_at:
                self.affine[self._offset_at[t]] = float(part.double().mean())
        table = getattr(self.source, "table", None)
        if isinstance(table, nn.Parameter):
            table.copy_(self._least_squares_values(pretrained))
        self.match_spread(pretrained, always=True)

    def _least_squares_values(self, pretrained: torch.Tensor) -> torch.Tensor:
        """Per-bucket mean of ``sign * w / rms(row)``: the table that best fits the weights."""
        codes: torch.Tensor = self._codes  # type: ignore[assignment]
        total = torch.zeros(2 * self.buckets, dtype=torch.float64)
        for t in range(len(self.layout.specs)):
            if not self.is_hashed[t]:
                continue
            slot = self._slot[t]
            w = self._centred_goal(pretrained, t).double()
            u = w / w.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
            a, b = self._code_starts[slot], self._code_starts[slot + 1]
            total.index_add_(0, codes[a:b], u.reshape(-1))
        n = torch.bincount(codes, minlength=2 * self.buckets).double()
        sums = total[: self.buckets] - total[self.buckets :]
        counts = n[: self.buckets] + n[self.buckets :]
        return (sums / counts.clamp_min(1)).float()

    def weight_fit_objective(
        self, pretrained: torch.Tensor, *, freeze_scale: bool = True
    ) -> Callable[[int], torch.Tensor]:
        """Phase 1's loss: each matrix's squared error over its squared norm, scales frozen.

        The scales stay at their spread-matching values (an MSE-optimal scale shrinks what the
        values cannot reproduce) whatever ``freeze_scale`` says; phase 1 trains the shared
        values only.
        """
        del freeze_scale
        weights = []
        for t, s in enumerate(self.layout.specs):
            if self.is_hashed[t]:
                part = pretrained[s.offset : s.offset + s.numel]
                weights.append((t, part.view(s.shape), 1.0 / float(part.pow(2).sum() + 1e-12)))
        self._scales_frozen = True

        def loss(_step: int) -> torch.Tensor:
            signed = self.signed_values()
            out = signed.new_zeros(())
            for t, goal, k in weights:
                out = out + (self._tensor(signed, t) - goal).pow(2).sum() * k
            return out

        return loss

    @torch.no_grad()
    def weight_fit_done(self, pretrained: torch.Tensor) -> None:
        """After phase 1: scales train again and every row gets its pretrained spread back."""
        self._scales_frozen = False
        self.match_spread(pretrained, always=True)

    @torch.no_grad()
    def match_spread(self, pretrained: torch.Tensor, always: bool = False) -> list[str]:
        """Scale every row (or tensor) so its RMS equals the pretrained row's.

        Args:
            pretrained: Flat ``(M,)`` pretrained weights.
            always: Rescale every matrix; otherwise only those shrunk below 95% of their
                pretrained RMS.

        Returns:
            Names of the tensors that were rescaled.
        """
        signed = self.signed_values()
        changed = []
        for t, s in enumerate(self.layout.specs):
            if not self.is_hashed[t]:
                continue
            start, n = self._scale_at[t]
            goal = self._centred_goal(pretrained, t).float()
            have = self._tensor(signed, t).reshape(self.views[t])
            if t in self._offset_at:
                have = have - self.affine[self._offset_at[t]]
            dims = 1 if self.row_scales else (0, 1)
            want_rms = goal.pow(2).mean(dims).sqrt()
            have_rms = have.pow(2).mean(dims).sqrt().clamp_min(1e-12)
            if not always and bool((have_rms >= 0.95 * want_rms).all()):
                continue
            self.affine[start : start + n].mul_((want_rms / have_rms).reshape(-1))
            changed.append(s.name)
        return changed

    def _centred_goal(self, pretrained: torch.Tensor, t: int) -> torch.Tensor:
        """Tensor ``t``'s pretrained ``(rows, cols)`` view, less its offset if it has one."""
        s = self.layout.specs[t]
        goal = pretrained[s.offset : s.offset + s.numel].view(self.views[t])
        if t in self._offset_at:
            goal = goal - self.affine[self._offset_at[t]].detach()
        return goal

    def revive(self, pretrained: torch.Tensor) -> list[str]:
        """A dead student's rows get their pretrained spread back (see :meth:`match_spread`)."""
        return self.match_spread(pretrained)

    def extra_repr(self) -> str:
        """Summary shown by ``print(module)``."""
        c = self.parameter_counts()
        return (
            f"M={self.total}, values={self.values_kind}, buckets={self.buckets}, "
            f"row_scales={self.row_scales}, "
            f"trainable={c['total']} ({c['total'] / self.total:.2%} of M)"
        )


def hashed_fixed_cost(layout: Layout, row_scales: bool, hashed_vectors: bool) -> int:
    """Parameters the hashed scheme spends outside the source: vectors and scales."""
    cost = 0
    for s in layout.specs:
        rows, _ = row_view(s.shape)
        if rows <= 1:
            cost += 2 if hashed_vectors else s.numel  # a scale and an offset, or exact
        else:
            cost += rows if row_scales else 1
    return cost


def log2_qubits(allowance: int) -> int:
    """The register with about as many buckets as ``allowance`` (within 4..12 qubits)."""
    return min(MAX_QUBITS, max(MIN_QUBITS, round(math.log2(max(1, allowance)))))


def default_qubits(allowance: int, weights: int) -> int:
    """The default register: :func:`log2_qubits`, widened where the model has the weights.

    Up to :data:`WIDE_EXTRA_QUBITS` more qubits (at most :data:`WIDE_MAX_QUBITS`) while every
    bucket still has :data:`WIDE_MIN_SHARE` weights to share it; never narrower than the log2
    register.
    """
    n = log2_qubits(allowance)
    room = int(math.floor(math.log2(max(1, weights // WIDE_MIN_SHARE))))
    return max(n, min(n + WIDE_EXTRA_QUBITS, WIDE_MAX_QUBITS, room))


def resolve_hashed(
    config: QTConfig, layout: Layout, pretrained: torch.Tensor | None = None
) -> QTConfig:
    """Fix the hashed scheme's sizes for ``layout``: vectors, scales, qubits, layers.

    The budget pays for the vectors first: exact while they cost at most
    :data:`EXACT_VECTOR_SHARE` of it (a streaming LSTM's gate biases are 0.7% of M), hashed
    with a scale and an offset each otherwise; then per-row scales (per-tensor scales where
    rows would take more than :data:`ROW_SCALE_SHARE` of what is left); then the source: the
    QNN gets :func:`default_qubits` (``round(log2(allowance))`` within 4..12, widened by up to
    3 on models with the weights for it) and as many layers as the
    allowance buys (``n * L`` angles for the paper ansatz, what one layer of the chosen ansatz
    costs otherwise), up to :data:`MAX_QNN_WORK` and
    :data:`qtcompress.limits.MAX_LAYERS` (past those the budget is not all spent).

    Without a budget the scheme's default (0.5% of M) is used, at least :data:`DEFAULT_FLOOR`
    parameters (at most a quarter of M), or the smallest generator where that is larger.

    Raises:
        ConfigError: An explicit budget leaves fewer than :data:`MIN_VALUES` parameters for
            the source.
    """
    del pretrained  # the hash does not look at the weights
    if config.allowance is not None:  # already resolved (a generator file's config)
        return config
    allowed = config.budget_params(layout.total)
    if config.budget is None:
        allowed = max(allowed, min(DEFAULT_FLOOR, layout.total // 4))
    vectors = sum(s.numel for s in layout.specs if row_view(s.shape)[0] <= 1)
    hashed_vectors = config.hashed_vectors
    if hashed_vectors is None:
        hashed_vectors = vectors > EXACT_VECTOR_SHARE * allowed
    rows = config.row_scales
    if rows is None:
        base = hashed_fixed_cost(layout, False, hashed_vectors)
        row_cost = hashed_fixed_cost(layout, True, hashed_vectors) - base
        rows = row_cost <= ROW_SCALE_SHARE * max(0, allowed - base)
    allowance = allowed - hashed_fixed_cost(layout, rows, hashed_vectors)
    smallest = hashed_fixed_cost(layout, False, True) + MIN_VALUES
    if allowance < MIN_VALUES and config.budget is None:  # the default: the smallest generator
        rows, hashed_vectors, allowance = False, True, MIN_VALUES
    if allowance < MIN_VALUES:
        raise ConfigError(
            f"A budget of {allowed:,} parameters is below the smallest hashed generator for "
            f"this model ({smallest:,} = {smallest / layout.total:.3%} of M: a scale per "
            "tensor and 16 shared values); raise --budget or leave tensors classical with "
            "--exclude."
        )
    n = config.n_qubits
    if n is None:
        n = default_qubits(allowance, layout.total)
    layers = config.n_layers  # given: kept (the allowance may then not all be spent)
    if layers is None:
        per_layer = angles_per_layer(config.ansatz, n)  # n for the paper ansatz
        layers = max(1, allowance // per_layer)
        layers = min(layers, max(1, MAX_QNN_WORK // (per_layer * 2**n)), limits.MAX_LAYERS)
    return replace(
        config,
        n_qubits=n,
        n_layers=layers,
        row_scales=rows,
        hashed_vectors=hashed_vectors,
        allowance=allowance,
    )
