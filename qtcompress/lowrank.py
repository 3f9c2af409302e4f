"""A generated weight held as its low-rank factors, so ``nn.Linear`` can skip materialising it.

:class:`~qtcompress.generator.RowGenerator` makes every matrix as ``W = H @ A + 1 b^T`` (``H``
the rows' features, ``A`` the tensor's head, ``b`` its bias). Materialising ``W`` costs
``rows * k * cols`` multiply-adds per step, about ``k / B`` of the model's own matmuls at
batch ``B``: on a 1e7-weight MLP (rank 96, batch 64) that made a QT step 2x the plain step.
A linear layer does not need ``W``:

    x @ W^T = (x @ A^T) @ H^T + (x @ b) 1^T      # (B, cols) -> (B, k) -> (B, rows)

which costs ``B * k * (rows + cols)``. :class:`LowRankWeight` is a tensor that carries the
factors and routes ``F.linear`` through that product when it is cheaper; every other use
(a convolution, an embedding lookup, an LSTM, ``.T``, arithmetic) gets the dense tensor,
materialised once per weight object and reused. Autograd sees only ordinary operations on the
factors: the wrapper itself never reaches the dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

# Calls answered from the wrapper's own metadata (shape, dtype, device), never materialising.
_METADATA_CALLS = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.element_size,
    torch.Tensor.get_device,
    torch.Tensor.__len__,
}
_METADATA_ATTRIBUTES = {
    "shape",
    "dtype",
    "device",
    "ndim",
    "layout",
    "is_cuda",
    "is_cpu",
    "is_sparse",
    "is_meta",
    "is_quantized",
    "is_nested",
    "is_mps",
    "is_xpu",
}


def _is_metadata(func: Callable[..., Any]) -> bool:
    if func in _METADATA_CALLS:
        return True
    owner = getattr(func, "__self__", None)  # a property getter: Tensor.shape.__get__
    return (
        getattr(func, "__name__", "") == "__get__"
        and getattr(owner, "__name__", None) in _METADATA_ATTRIBUTES
    )


class LowRankWeight(torch.Tensor):
    """A float tensor ``(H @ A + b).reshape(shape)`` that keeps ``H``, ``A`` and ``b``.

    Args:
        features: ``H``, shape ``(rows, k)``.
        head: ``A``, shape ``(k, cols)``.
        bias: ``b``, shape ``(cols,)``.
        shape: The tensor's shape (``rows * cols`` elements).
    """

    features: torch.Tensor
    head: torch.Tensor
    bias: torch.Tensor
    _dense: torch.Tensor | None

    @staticmethod
    def __new__(
        cls, features: torch.Tensor, head: torch.Tensor, bias: torch.Tensor, shape: tuple[int, ...]
    ) -> LowRankWeight:
        """A wrapper without storage: it answers metadata; values come from :meth:`dense`."""
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined,no-any-return]
            cls, shape, dtype=head.dtype, device=head.device, requires_grad=False
        )

    def __init__(
        self, features: torch.Tensor, head: torch.Tensor, bias: torch.Tensor, shape: tuple[int, ...]
    ) -> None:
        self.features, self.head, self.bias = features, head, bias
        self._dense = None

    def dense(self) -> torch.Tensor:
        """The materialised tensor (differentiable in the factors; computed once)."""
        if self._dense is None:
            with torch._C.DisableTorchFunctionSubclass():
                w = torch.addmm(self.bias, self.features, self.head)  # (rows, cols)
                self._dense = w.reshape(self.shape)
        return self._dense

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, self, bias)`` through the factors when that is cheaper."""
        rows, k = self.features.shape
        cols = self.head.shape[1]
        batch = x.numel() // max(1, cols)
        factored = batch * (k * (rows + cols) + cols)
        dense = rows * k * cols + batch * rows * cols
        with torch._C.DisableTorchFunctionSubclass():
            if factored >= dense:
                return F.linear(x, self.dense(), bias)
            y = torch.matmul(torch.matmul(x, self.head.T), self.features.T)  # (..., rows)
            y = y + torch.matmul(x, self.bias).unsqueeze(-1)
            return y if bias is None else y + bias

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]  # noqa: D105
        k = self.features.shape[1]
        return f"LowRankWeight(shape={tuple(self.shape)}, rank={k})"

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        """Factored ``F.linear``; metadata from the wrapper; anything else on the dense tensor."""
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
            if (
                isinstance(weight, LowRankWeight)
                and weight.ndim == 2
                and not isinstance(x, LowRankWeight)
            ):
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return weight.linear(x, bias.dense() if isinstance(bias, LowRankWeight) else bias)
        if _is_metadata(func):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)

        def dense(v: Any) -> Any:
            return v.dense() if isinstance(v, LowRankWeight) else v

        with torch._C.DisableTorchFunctionSubclass():
            return func(*tree_map(dense, args), **tree_map(dense, kwargs))

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls,
        func: Any,
        types: Any,
        args: Any = (),
        kwargs: Any = None,
    ) -> Any:
        """Never reached: ``__torch_function__`` hands every operation a dense tensor."""
        raise RuntimeError(
            f"LowRankWeight reached the dispatcher in {func}; this is a bug in "
            "qtcompress.lowrank (an operation was not intercepted)."
        )
