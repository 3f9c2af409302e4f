"""The row-factorised generator (``scheme="rows"``, the default).

One basis state per tensor row, a shared mapping body and one low-rank head per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qtcompress.errors import ConfigError
from qtcompress.generator.common import FIT_BLOCK, Generator, check_pretrained, qnn_for
from qtcompress.generator.ranks import max_rank, row_view
from qtcompress.generator.weight_loss import row_weight_loss, tensor_scales
from qtcompress.lowrank import LowRankWeight
from qtcompress.mapping import signed_bits, transform_probs
from qtcompress.targets import Layout

if TYPE_CHECKING:
    from qtcompress.config import QTConfig


class RowGenerator(Generator):
    """Row-factorised Quantum-Train generator: one basis state per tensor row.

    Every generated tensor is viewed as a ``(rows, columns)`` matrix (:func:`row_view`). Basis
    state ``i`` is row ``i`` of the concatenated rows of all matrices; its bits and transformed
    probability go through a shared MLP (the mapping body) to a feature ``h_i``, and a
    per-tensor head emits the row: ``W_t[r] = h_{i(r)}[:k_t] @ A_t + b_t``, with ``k_t`` the
    tensor's rank. This is QPA-style chunked generation with the chunk aligned to each
    tensor's rows and one output head per tensor, so a tensor is a rank-``k_t`` product whose
    left factor comes from the QNN + mapping. Rows are where trained weights carry structure
    (per-unit scale, low rank), which a flat index cut into fixed chunks cannot see: on a
    420K-weight CNN without BatchNorm the flat scheme fits nothing (relative error 1.34) and
    its distilled student collapsed; this one is below 1 after phase 1 and agrees with the
    teacher on 95% of test images after 400 steps at 4.4% of M. Vectors (biases, norm
    scales) are one row whose head is a bias only: they are held exactly.

    Args:
        layout: The generated tensors.
        ranks: One rank per tensor (:func:`allocate_ranks`, :func:`uniform_ranks`).
        n_layers: QNN layers.
        n_qubits: Qubits; ``None``: the fewest that cover all rows.
        hidden: Hidden widths of the mapping body before the feature layer.
        activation: Body activation.
        prob_transform: See :func:`~qtcompress.mapping.transform_probs`.
        backend: QNN simulator backend.
        seed: Seeds the QNN angles, the body and the heads.
        ansatz: The QNN's circuit (a name registered in :mod:`qtcompress.qnn.ansatz`).
    """

    scheme = "rows"

    def __init__(
        self,
        layout: Layout,
        *,
        ranks: Sequence[int],
        n_layers: int = 8,
        n_qubits: int | None = None,
        hidden: tuple[int, ...] = (32,),
        activation: str = "tanh",
        prob_transform: str = "scaled",
        backend: str = "qsim",
        seed: int = 0,
        ansatz: str = "paper",
    ) -> None:
        super().__init__()
        from qtcompress.mapping import ACTIVATIONS

        if len(ranks) != len(layout.specs):
            raise ConfigError(
                f"ranks lists {len(ranks)} tensors, the layout has {len(layout.specs)}."
            )
        for k, s in zip(ranks, layout.specs, strict=True):
            if not isinstance(k, int) or not 0 <= k <= max(1, max_rank(s.shape)):
                raise ConfigError(
                    f"rank {k!r} for {s.name} {s.shape} is outside 0..{max(1, max_rank(s.shape))}."
                )
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"Unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}."
            )
        self.layout = layout
        self.total = layout.total
        self.ranks = tuple(int(k) for k in ranks)
        self.views = [row_view(s.shape) for s in layout.specs]
        starts = [0]
        for (rows, _), k in zip(self.views, self.ranks, strict=True):
            starts.append(starts[-1] + (rows if k > 0 else 0))
        self.row_starts = starts
        self.n_states = max(1, starts[-1])
        self.prob_transform = prob_transform
        self.chunk = max(c for _, c in self.views)  # the longest row: weights per basis state
        self.qnn = qnn_for(
            self.n_states,
            n_qubits,
            n_layers,
            prob_transform,
            backend,
            seed,
            f"< {self.n_states} rows",
            "",
            ansatz,
        )
        n = self.qnn.n_qubits
        width_out = max(1, *self.ranks)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            width = n + 1
            for h in (*hidden, width_out):
                layers += [nn.Linear(width, int(h)), ACTIVATIONS[activation]()]
                width = int(h)
            self.body = nn.Sequential(*layers)
            # One head per tensor: (rank, columns) weights and a (columns,) bias.
            self.heads = nn.ParameterList(
                [
                    nn.Parameter(torch.randn(k, c) / math.sqrt(max(1, k)))
                    for (_, c), k in zip(self.views, self.ranks, strict=True)
                ]
            )
            self.biases = nn.ParameterList([nn.Parameter(torch.zeros(c)) for _, c in self.views])
        self.register_buffer("_bits", signed_bits(n, 0, self.n_states), persistent=False)

    @property
    def n_qubits(self) -> int:
        """Number of qubits of the QNN."""
        return self.qnn.n_qubits

    @property
    def rank(self) -> int:
        """The widest per-tensor rank (the mapping body's feature width)."""
        return max(1, *self.ranks)

    def weight_fit_objective(  # noqa: D102
        self, pretrained: torch.Tensor, *, freeze_scale: bool = True
    ) -> Callable[[int], torch.Tensor]:
        del freeze_scale  # the heads are fitted in closed form afterwards
        scales = tensor_scales(self, pretrained)
        return lambda _step: row_weight_loss(self, pretrained, scales)

    def weight_fit_done(self, pretrained: torch.Tensor) -> None:
        """The heads' least-squares optimum for the trained features: never worse than zeros."""
        self.fit_heads(pretrained)

    def describe_shape(self) -> str:  # noqa: D102
        ranks = [k for k in self.ranks if k > 0]
        return (
            f"one basis state per tensor row, ranks {min(ranks, default=0)}.."
            f"{max(ranks, default=0)}"
        )

    def basis_state_text(self) -> str:  # noqa: D102
        return (
            f"one basis state per tensor row (up to {self.chunk} weights), ranks up to {self.rank}"
        )

    def file_description(self, config: QTConfig) -> dict[str, Any]:  # noqa: D102
        # Its own MLP body (no MPS) and a per-row feature of width rank.
        hidden = config.hidden if config.hidden is not None else config.resolve(self.layout).hidden
        return {
            "kind": "mlp",
            "chunk": int(self.chunk),
            "n_qubits": int(self.n_qubits),
            "hidden": [int(h) for h in hidden or ()],
            "activation": config.activation,
            "prob_transform": config.prob_transform,
            "scheme": self.scheme,
            "rank": int(self.rank),
        }

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by part and ``total``.

        ``mapping``: the body and the heads' weights; ``affine``: the heads' biases (per-column
        offsets, and the exact values of vectors).
        """

        def count(ps: Iterator[nn.Parameter]) -> int:
            return sum(p.numel() for p in ps if p.requires_grad)

        counts = {
            "qnn": count(self.qnn.parameters()),
            "mapping": count(self.body.parameters()) + count(self.heads.parameters()),
            "affine": count(self.biases.parameters()),
        }
        counts["total"] = sum(counts.values())
        return counts

    def features(self) -> torch.Tensor:
        """Per-row features ``h``, shape ``(n_states, rank)`` (differentiable)."""
        probs = self.qnn()  # (2^n,)
        x = transform_probs(probs, self.n_qubits, self.prob_transform)[: self.n_states]
        bits: torch.Tensor = self._bits  # type: ignore[assignment]
        return self.body(torch.cat([bits, x[:, None]], dim=1))  # (S, rank)

    def _tensor(self, h: torch.Tensor, i: int, factored: bool = False) -> torch.Tensor:
        k, shape = self.ranks[i], self.layout.specs[i].shape
        if k == 0:
            return self.biases[i].expand(self.views[i]).reshape(shape)
        a, b = self.row_starts[i], self.row_starts[i + 1]
        if factored and len(shape) == 2:
            return LowRankWeight(h[a:b, :k], self.heads[i], self.biases[i], shape)
        w = torch.addmm(self.biases[i], h[a:b, :k], self.heads[i])  # (rows, columns)
        return w.reshape(shape)

    def row_block_error(
        self, h: torch.Tensor, i: int, start: int, goal: torch.Tensor
    ) -> torch.Tensor:
        """Squared error of some rows of tensor ``i`` against ``goal``.

        Rows ``start:start + len(goal)`` of the tensor's ``(rows, cols)`` view; phase 1 of big
        models streams these blocks (see :func:`qtcompress.generator.weight_loss.row_weight_loss`).
        """
        k = self.ranks[i]
        if k == 0:
            w = self.biases[i].expand(goal.shape)
        else:
            a = self.row_starts[i] + start
            w = torch.addmm(self.biases[i], h[a : a + goal.shape[0], :k], self.heads[i])
        return torch.nn.functional.mse_loss(w, goal, reduction="sum")

    def _generate_list(self, factored: bool = False) -> list[torch.Tensor]:
        """Every generated tensor in layout order (float32, differentiable).

        Args:
            factored: Matrices as :class:`~qtcompress.lowrank.LowRankWeight` (see
                :meth:`generate_named`).
        """
        h = self.features()
        return [self._tensor(h, i, factored) for i in range(len(self.views))]

    def generate(self) -> torch.Tensor:
        """All generated weights as one flat ``(M,)`` float32 vector (differentiable)."""
        return torch.cat([t.reshape(-1) for t in self._generate_list()])

    def generate_named(
        self, flat: torch.Tensor | None = None, *, factored: bool = False
    ) -> dict[str, torch.Tensor]:
        """Generated tensors by name (aliases included), cast to each parameter's dtype.

        Args:
            flat: A vector from :meth:`generate`; generated now if ``None``.
            factored: Hand 2-D float32 tensors over as
                :class:`~qtcompress.lowrank.LowRankWeight`, so that ``nn.Linear`` layers run
                on the factors instead of materialising the matrix (a training step's fast
                path; any other use materialises it). Values equal the dense tensors' up to
                float rounding (a different order of sums).
        """
        return self._by_name(flat, lambda: self._generate_list(factored))

    @torch.no_grad()
    def iter_blocks(self, block_states: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Stream the weights without gradients, one tensor at a time: ``(start, weights)``."""
        h = self.features()
        for i, s in enumerate(self.layout.specs):
            yield s.offset, self._tensor(h, i).reshape(-1)

    @torch.no_grad()
    def fit_heads(self, pretrained: torch.Tensor) -> None:
        """Least-squares heads for the current features: the best this body can do per tensor.

        With the bias column, each tensor's fit is a projection of the pretrained, so its relative
        error is at most 1 (never worse than all-zero weights); vectors are reproduced exactly.
        A projection shrinks what it cannot reproduce: without BatchNorm the shrinkage compounds
        through the layers, and the network can come out nearly constant. Fine-tuning then
        starts from :meth:`match_spread` (see :meth:`qtcompress.api.QTModel.finetune`).

        Args:
            pretrained: Flat ``(M,)`` pretrained weights.
        """
        check_pretrained(pretrained, self.total)
        h = self.features().double()
        for i, s in enumerate(self.layout.specs):
            flat = pretrained[s.offset : s.offset + s.numel].to(h.device)
            rows = self.views[i][0]
            k = self.ranks[i]
            if k == 0:
                self.biases[i].copy_(self._as_view(flat.double(), i).mean(0).float())
                continue
            a, b = self.row_starts[i], self.row_starts[i + 1]
            design = torch.cat([h[a:b, :k], h.new_ones(rows, 1)], dim=1)
            # Ridge-regularised normal equations: stable when features are nearly collinear.
            gram = design.T @ design
            gram += (
                1e-6
                * (gram.diagonal().mean() + 1e-12)
                * torch.eye(k + 1, dtype=torch.float64, device=h.device)
            )
            sol = torch.linalg.solve(gram, self._moments(design, flat, i))  # (k + 1, cols)
            self.heads[i].copy_(sol[:-1].float())
            self.biases[i].copy_(sol[-1].float())

    def _moments(self, design: torch.Tensor, flat: torch.Tensor, i: int) -> torch.Tensor:
        """``design.T @ goal`` in float64, ``goal`` being tensor ``i``'s ``(rows, cols)`` view.

        Big tensors go in column blocks of about ``FIT_BLOCK`` weights, so the float64 copy of
        the goal never exceeds one block (a 49M-weight layer's would be 390 MB).
        """
        goal = self._as_view(flat, i)  # (rows, cols), pretrained dtype
        rows, cols = goal.shape
        if goal.numel() <= FIT_BLOCK:
            return design.T @ goal.double()
        step = max(1, FIT_BLOCK // rows)
        return torch.cat(
            [design.T @ goal[:, c : c + step].double() for c in range(0, cols, step)], dim=1
        )

    def _as_view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """A tensor's flat values as its generated ``(rows, columns)`` matrix."""
        return flat.reshape(self.views[i])

    def init_from_pretrained(self, pretrained: torch.Tensor) -> None:
        """Least-squares heads for the initial features (:meth:`fit_heads`)."""
        self.fit_heads(pretrained)

    def revive(self, pretrained: torch.Tensor) -> list[str]:
        """Restore shrunk tensors' spread (:meth:`match_spread`)."""
        return self.match_spread(pretrained)

    @torch.no_grad()
    def match_spread(self, pretrained: torch.Tensor) -> list[str]:
        """Rescale each tensor's head so its spread matches the pretrained tensor's.

        A least-squares fit shrinks a tensor it cannot reproduce towards its mean; without
        BatchNorm to re-centre, a network of shrunk tensors can be dead (constant output). This
        restores every tensor's standard deviation while keeping its direction and mean.

        Returns:
            Names of the tensors that were rescaled.
        """
        h = self.features()
        changed = []
        for i, s in enumerate(self.layout.specs):
            if self.ranks[i] == 0 or s.numel < 2:
                continue
            want = float(pretrained[s.offset : s.offset + s.numel].std(unbiased=False))
            w = self._tensor(h, i)
            have = float(w.std(unbiased=False))
            if have > 1e-12 and want > 1.05 * have:
                mean = w.mean()
                self.heads[i].mul_(want / have)
                # Keep the tensor's mean: the bias absorbs the shift that the scaling made.
                self.biases[i].add_(mean - self._tensor(h, i).mean())
                changed.append(s.name)
        return changed

    def extra_repr(self) -> str:
        """Summary shown by ``print(module)``."""
        c = self.parameter_counts()
        return (
            f"M={self.total}, rows={self.n_states}, ranks={list(self.ranks)}, "
            f"trainable={c['total']} ({c['total'] / self.total:.1%} of M)"
        )
