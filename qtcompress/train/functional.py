"""The student: the pretrained model called with generated weights (:class:`FunctionalModel`).

The user's module is never modified: a private copy is called through
:func:`torch.func.functional_call` with the generated tensors in place of its parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from qtcompress.data.batch import Batch
from qtcompress.data.layout import BatchLayout
from qtcompress.data.model_call import check_call
from qtcompress.generator import AnyGenerator
from qtcompress.targets import Layout


class FunctionalModel:
    """Runs a private copy of a model with generated weights via ``torch.func.functional_call``.

    The user's module is never touched: the copy is put in eval mode (dropout off) and its own
    parameters are frozen; generated tensors replace the targeted ones at call time, untargeted
    parameters come from the copy. The student (generated weights) has its own copy of the
    buffers (:attr:`buffers`), so that BatchNorm statistics re-estimated for the generated
    weights never leak into the teacher.

    Args:
        model: The pretrained model (copied).
        generator: Supplies the generated tensors.
        pretrained: Flat ``(M,)`` pretrained weights in the generator's layout, if at hand: the
            copy's generated parameters are made views of it (:meth:`share_pretrained`) as it
            is built, so they are never copied.

    Attributes:
        layout: Inputs and outputs whose batch is not dimension 0 in the model's own calls
            (:class:`~qtcompress.data.layout.BatchLayout`). Calls then take and return them
            batch-first, as the rest of qtcompress does, and the model gets its own layout.
    """

    def __init__(
        self, model: nn.Module, generator: AnyGenerator, pretrained: torch.Tensor | None = None
    ) -> None:
        # Copying the generated parameters, then re-pointing them at the views, held one more
        # copy of the weights at compress()'s peak: the memo hands deepcopy the views instead.
        memo: dict[int, Any] = {}
        if pretrained is not None:
            named = dict(model.named_parameters(remove_duplicate=False))
            for p, view in _shared_views(named, pretrained, generator.layout):
                memo[id(p)] = nn.Parameter(view, requires_grad=False)
        self.module = copy.deepcopy(model, memo).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.generator = generator
        self.fixed: dict[str, torch.Tensor] = dict(
            self.module.named_parameters(remove_duplicate=False)
        )
        self.buffers: dict[str, torch.Tensor] = {
            n: b.detach().clone() for n, b in self.module.named_buffers()
        }
        self.norm_layers = [
            m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self.device = torch.device("cpu")
        self.layout = BatchLayout()

    def check(self, batch: Batch) -> Any:
        """:func:`~qtcompress.data.model_call.check_call` of the model on a batch-first batch."""
        return self.layout.outputs_to_front(
            check_call(self.module, self.layout.batch_to_model(batch))
        )

    def share_pretrained(self, pretrained: torch.Tensor, layout: Layout) -> None:
        """Back the private copy's generated parameters by views of the flat ``pretrained``.

        The copy's tensors and the phase-1 pretrained hold the same values; sharing them saves one
        copy of the generated weights (400 MB at 1e8). Both are read-only here: nothing writes
        to the private copy's parameters, and :meth:`qtcompress.api.QTModel.materialize` writes
        into a deep copy (which clones). Tensors that are not float32 keep their own storage.
        """
        named = dict(self.module.named_parameters(remove_duplicate=False))
        for p, view in _shared_views(named, pretrained, layout):
            p.data = view

    def to(self, device: torch.device) -> FunctionalModel:
        """Move the model copy, its buffers and the student's buffers to ``device``.

        The generator is moved by its owner (:meth:`qtcompress.api.QTModel.to`).
        """
        self.module.to(device)
        self.fixed = dict(self.module.named_parameters(remove_duplicate=False))
        self.buffers = {n: b.to(device) for n, b in self.buffers.items()}
        self.device = device
        return self

    def __call__(
        self,
        *args: Any,
        generated: Mapping[str, torch.Tensor] | None = None,
        batch_stats: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Forward pass with generated weights (generated now if not given).

        Args:
            *args: Model inputs.
            generated: Tensors by name; default ``generator.generate_named(factored=True)`` (linear
                layers run on the low-rank factors, :mod:`qtcompress.lowrank`).
            batch_stats: Run BatchNorm layers in training mode: normalise with batch
                statistics and update the student's running statistics (:attr:`buffers`).
            **kwargs: Model keyword inputs.
        """
        tensors = self.generator.generate_named(factored=True) if generated is None else generated
        if batch_stats:
            for m in self.norm_layers:
                m.train()
        args, kwargs = self.layout.to_model(args, kwargs)
        try:
            return self.layout.outputs_to_front(
                functional_call(
                    self.module,
                    {**self.fixed, **self.buffers, **tensors},
                    args,
                    kwargs,
                    tie_weights=False,
                    strict=False,
                )
            )
        finally:
            for m in self.norm_layers:
                m.eval()

    @torch.no_grad()
    def recalibrate(self, inputs: torch.Tensor, batch_size: int = 256) -> None:
        """Re-estimate the student's BatchNorm running statistics on ``inputs``.

        The generator is not changed: this only makes the normalisation match the generated
        weights (exact cumulative averages over the batches, as with ``momentum=None``).
        """
        if not self.norm_layers:
            return
        tensors = self.generator.generate_named(factored=True)
        momenta = [m.momentum for m in self.norm_layers]
        for m in self.norm_layers:
            m.momentum = None
        for name, b in self.buffers.items():
            if name.endswith("running_mean") or name.endswith("num_batches_tracked"):
                b.zero_()
            elif name.endswith("running_var"):
                b.fill_(1.0)
        try:
            for i in range(0, inputs.shape[0], batch_size):
                self(
                    inputs[i : i + batch_size].to(self.device), generated=tensors, batch_stats=True
                )
        finally:
            for m, momentum in zip(self.norm_layers, momenta, strict=True):
                m.momentum = momentum

    def teacher(self, *args: Any, **kwargs: Any) -> Any:
        """Forward pass of the original (pretrained) weights, without gradients."""
        args, kwargs = self.layout.to_model(args, kwargs)
        with torch.no_grad():
            return self.layout.outputs_to_front(self.module(*args, **kwargs))


def _shared_views(
    named: Mapping[str, nn.Parameter], pretrained: torch.Tensor, layout: Layout
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Each generated parameter that can share ``pretrained``'s storage, with its view there.

    A tensor qualifies when all its parameters (tied names included) have ``pretrained``'s dtype
    and device; others keep their own storage.
    """
    out = []
    for s in layout.specs:
        params = [named[n] for n in s.names if n in named]
        if params and all(
            p.dtype == pretrained.dtype and p.device == pretrained.device for p in params
        ):
            view = pretrained[s.offset : s.offset + s.numel].view(s.shape)
            out += [(p, view) for p in params]
    return out
