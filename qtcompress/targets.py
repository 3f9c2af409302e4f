"""Which parameters of a model the generator produces, and where each sits in the flat vector.

Patterns (used by ``target`` and ``exclude``):

* ``"re:<regex>"``: :func:`re.search` against the full parameter name.
* anything else: a dotted name whose components appear as a contiguous run in the parameter
  name's components. So ``"weight"`` matches ``"conv1.weight"`` (suffix), ``"conv1"`` matches
  ``"conv1.weight"`` and ``"conv1.bias"`` (module prefix), ``"net.0.weight"`` matches exactly,
  but ``"weight"`` does not match ``"lstm.weight_ih_l0"`` (components compare whole).

Tied parameters (one tensor under several names) are generated once, under the first name
PyTorch reports; the other names are kept as aliases and receive the same tensor. Buffers
(BatchNorm running statistics and the like) are never generated: they stay classical.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qtcompress.errors import ConfigError, NonFiniteError, TargetError

REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class TensorSpec:
    """One generated tensor.

    Attributes:
        name: Canonical parameter name (first name PyTorch reports for the tensor).
        shape: Tensor shape.
        dtype: Tensor dtype (floating point).
        offset: Index of the tensor's first element in the flat generated vector.
        numel: Number of elements.
        aliases: Other names under which the same tensor is registered (tied weights).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    numel: int
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Canonical name followed by every alias."""
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class Layout:
    """The generated tensors in flat-vector order, plus the names that stay classical.

    Attributes:
        specs: Generated tensors, contiguous in the flat vector, in model order.
        total: M, the number of generated weights.
        classical: Names of parameters that are not generated (kept from the model).
        buffers: Names of buffers (carried along unchanged).
    """

    specs: tuple[TensorSpec, ...]
    total: int
    classical: tuple[str, ...] = ()
    buffers: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.specs)

    def names(self) -> list[str]:
        """Canonical names of the generated tensors."""
        return [s.name for s in self.specs]

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat ``(M,)`` vector as named tensors (aliases included).

        Args:
            flat: Shape ``(M,)``.

        Returns:
            ``name -> view`` for every canonical name and alias; tied names share one view.
        """
        if flat.ndim != 1 or flat.shape[0] != self.total:
            raise ConfigError(
                f"Expected a flat vector of {self.total} weights, got shape {tuple(flat.shape)}."
            )
        out: dict[str, torch.Tensor] = {}
        for s in self.specs:
            view = flat[s.offset : s.offset + s.numel].view(s.shape)
            for n in s.names:
                out[n] = view
        return out

    def require_same(self, stored: Layout) -> None:
        """Check that this model's generated tensors are ``stored``'s (names and shapes).

        Raises:
            TargetError: They differ; the message names the missing and unexpected tensors
                and the shape differences.
        """
        have = {s.name: tuple(s.shape) for s in self.specs}
        want = {s.name: tuple(s.shape) for s in stored.specs}
        if have == want:
            return
        missing = sorted(set(want) - set(have))
        unexpected = sorted(set(have) - set(want))
        shapes = [
            f"{n} {list(have[n])} (stored {list(want[n])})"
            for n in sorted(set(have) & set(want))
            if have[n] != want[n]
        ]
        parts = (
            ([f"missing {missing[:5]}"] if missing else [])
            + ([f"unexpected {unexpected[:5]}"] if unexpected else [])
            + ([f"shapes differ: {', '.join(shapes[:5])}"] if shapes else [])
        )
        raise TargetError(
            f"The model does not fit the stored generator: {'; '.join(parts)}. Pass "
            "the pretrained model the file was made from."
        )

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate named tensors (by canonical name) into a flat float32 ``(M,)`` vector.

        This is where a model's pretrained weights enter qtcompress, so they are checked here,
        once, before anything (rank allocation's SVDs, the fit) computes with them.

        Raises:
            TargetError: A tensor is missing or has another shape than the layout's.
            NonFiniteError: A tensor holds NaN or Inf (or float64 values beyond float32's
                range); the message names each such tensor and its count.
        """
        missing = [s.name for s in self.specs if s.name not in tensors]
        if missing:
            raise TargetError(f"Missing tensors for the layout: {missing}.")
        parts = []
        for s in self.specs:
            t = tensors[s.name]
            if tuple(t.shape) != s.shape:
                raise TargetError(
                    f"Tensor {s.name!r} has shape {tuple(t.shape)}, the layout expects {s.shape}."
                )
            parts.append(t.detach().reshape(-1).to(torch.float32))
        flat = torch.cat(parts)
        if non_finite_count(flat):
            self._raise_non_finite(flat, tensors)
        return flat

    def _raise_non_finite(self, flat: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        """Raise :class:`NonFiniteError` naming every tensor of ``flat`` with NaN or Inf."""
        bad = []
        for s in self.specs:
            count = non_finite_count(flat[s.offset : s.offset + s.numel])
            if count:
                # A finite float64 value can still overflow float32, the dtype of the fit.
                overflow = count > non_finite_count(tensors[s.name].detach())
                why = ", beyond float32's range" if overflow else ""
                bad.append(f"{s.name} ({count:,} of {s.numel:,} values{why})")
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(
            f"The pretrained model's weights hold NaN or Inf: {shown}; the model itself is "
            "broken (a diverged training run or a damaged save): compress a checkpoint saved "
            "while its weights were finite."
        )


def non_finite_count(t: torch.Tensor, block: int = 1 << 22) -> int:
    """How many values of ``t`` are NaN or Inf (0 for integer tensors).

    Counted in blocks: ``torch.isfinite`` over a whole 1e8-weight vector allocates a
    temporary of 1e8 bytes, and the common answer, 0, needs no more than one block at a time.
    """
    if not (t.is_floating_point() or t.is_complex()):
        return 0
    flat = t.reshape(-1)
    return sum(
        int((~torch.isfinite(flat[i : i + block])).sum()) for i in range(0, flat.numel(), block)
    )


def _components_match(pattern: str, name: str) -> bool:
    pat, parts = pattern.split("."), name.split(".")
    k = len(pat)
    return any(parts[i : i + k] == pat for i in range(len(parts) - k + 1))


def matches(pattern: str, name: str) -> bool:
    """Whether one pattern matches one parameter name (see the module docstring).

    Args:
        pattern: ``"re:<regex>"`` or a dotted name.
        name: Full parameter name, e.g. ``"encoder.layers.0.linear1.weight"``.

    Returns:
        True if the pattern selects the name.
    """
    if pattern.startswith(REGEX_PREFIX):
        return re.search(pattern[len(REGEX_PREFIX) :], name) is not None
    return _components_match(pattern, name)


def _check_patterns(patterns: Iterable[str] | None, what: str) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        # A bare string would be iterated character by character: almost surely a mistake.
        raise ConfigError(f"{what} must be a list of patterns, got the string {patterns!r}.")
    out = list(patterns)
    for p in out:
        if not isinstance(p, str) or not p or p == REGEX_PREFIX:
            raise ConfigError(f"Every {what} pattern must be a non-empty string, got {p!r}.")
        if p.startswith(REGEX_PREFIX):
            try:
                re.compile(p[len(REGEX_PREFIX) :])
            except re.error as exc:
                raise ConfigError(f"Invalid regex in {what} pattern {p!r}: {exc}.") from exc
    return out


def select_targets(
    model: nn.Module,
    target: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    include_frozen: bool = False,
) -> Layout:
    """Choose the parameters to generate and lay them out in one flat vector.

    Args:
        model: Any PyTorch module.
        target: Patterns of parameters to generate; ``None`` selects every trainable parameter.
        exclude: Patterns removed from the selection (applied after ``target``).
        include_frozen: Also generate parameters with ``requires_grad=False``.

    Returns:
        The :class:`Layout`; M is ``layout.total``.

    Raises:
        TargetError: A ``target`` pattern matches no parameter, or nothing is left to generate.
        ConfigError: A pattern is malformed.
    """
    targets = _check_patterns(target, "target")
    excludes = _check_patterns(exclude, "exclude")

    # Group names by tensor identity so that tied parameters are generated once.
    groups: dict[int, list[str]] = {}
    tensors: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
        tensors[id(p)] = p
    all_names = [n for names in groups.values() for n in names]

    unmatched = [p for p in targets if not any(matches(p, n) for n in all_names)]
    if unmatched:
        raise TargetError(
            f"Target pattern(s) {unmatched} match no parameter. Available parameters: {all_names}."
        )

    specs: list[TensorSpec] = []
    classical: list[str] = []
    offset = 0
    for key, names in groups.items():
        p = tensors[key]
        selected = (not targets) or any(matches(t, n) for t in targets for n in names)
        selected = selected and not any(matches(e, n) for e in excludes for n in names)
        selected = selected and (include_frozen or p.requires_grad)
        if selected and not p.dtype.is_floating_point:
            raise TargetError(f"Parameter {names[0]!r} has non-float dtype {p.dtype}; exclude it.")
        if not selected or p.numel() == 0:
            classical.extend(names)
            continue
        specs.append(
            TensorSpec(names[0], tuple(p.shape), p.dtype, offset, p.numel(), tuple(names[1:]))
        )
        offset += p.numel()

    if not specs:
        raise TargetError(
            f"No parameter left to generate (target={targets or 'all trainable'}, "
            f"exclude={excludes}, include_frozen={include_frozen}). Available parameters: "
            f"{all_names}."
        )
    buffers = tuple(n for n, _ in model.named_buffers())
    return Layout(tuple(specs), offset, tuple(classical), buffers)


TENSOR_KINDS = ("weight", "embedding", "norm", "bias")


def tensor_kind(name: str, shape: tuple[int, ...]) -> str:
    """What a parameter is, from its name and shape: weight, embedding, norm or bias.

    A heuristic for summaries (``inspect``, the compress summary) that tell users which tensors
    they may want to keep classical (``--exclude``): names ending in ``bias`` are biases, other
    vectors are normalisation scales, matrices whose name mentions ``embed`` are embeddings.
    """
    leaf = name.rsplit(".", 1)[-1].lower()
    if leaf.endswith("bias"):
        return "bias"
    if len(shape) <= 1:
        return "norm"
    if "embed" in name.lower():
        return "embedding"
    return "weight"


def kinds_summary(tensors: Iterable[tuple[str, tuple[int, ...]]]) -> dict[str, tuple[int, int]]:
    """``kind -> (number of tensors, number of values)`` for :func:`tensor_kind`."""
    out: dict[str, tuple[int, int]] = {}
    for name, shape in tensors:
        kind = tensor_kind(name, shape)
        n, values = out.get(kind, (0, 0))
        out[kind] = (n + 1, values + math.prod(shape))
    return {k: out[k] for k in TENSOR_KINDS if k in out}
