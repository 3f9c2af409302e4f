"""One tensor from a model folder's output: a named output, pooled over the tokens kept.

A text model's main output holds one vector per token, padding included. What its users
compare is usually a sentence embedding (the mean of the kept tokens, as a
sentence-transformers folder's ``1_Pooling/config.json`` says) or at least the kept tokens'
states. :class:`PooledOutput` wraps the model so that the pipeline distils, scores and exports
exactly that tensor, with padded positions never counted:

- ``mean`` / ``max`` / ``cls``: one vector per example (``(batch, hidden)``), from the tokens
  whose attention mask is 1 (``cls``: the first token);
- ``masked``: every token's state with padded positions zeroed (``(batch, seq, hidden)``), so
  a cosine or a distillation over it ignores padding;
- ``none``: the selected output unchanged.

The wrapper's ``forward`` has the wrapped model's signature, so keyword inputs, the ONNX
input order and the ``attention_mask`` lookup all follow the model's own parameters.

With one vector per example (``mean``, ``max``, ``cls``, or ``none`` over an output with no
token axis, such as a sequence classifier's logits) the wrapper also drops the columns past a
batch's last kept token before the model runs (:func:`trim_padding`): text is padded to the
longest example of the whole data set, and a batch of short sentences otherwise pays attention
and feed-forward cost for padding whose effect the mask then removes. Not while a graph is
being exported (the ONNX graph takes any length).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtcompress.constants import POOLINGS
from qtcompress.data.model_call import select_output
from qtcompress.errors import ConfigError

MASK_INPUT = "attention_mask"
# Poolings whose result has no token axis: dropping trailing padding cannot change its shape.
_PER_EXAMPLE = ("mean", "max", "cls")


def _exporting() -> bool:
    """Whether a graph is being traced or exported (data-dependent lengths must not be)."""
    return bool(
        torch.compiler.is_exporting()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )


def trim_padding(
    args: tuple[Any, ...], kwargs: dict[str, Any], mask: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` without the token columns past the last one ``mask`` keeps.

    Every tensor input shaped ``(batch, tokens, ...)`` like ``mask`` is cut to the kept
    length (ids, masks, token types, positions, embeddings); other inputs are untouched.
    """
    if mask.dim() != 2 or mask.shape[1] < 2:
        return args, kwargs
    kept = mask.ne(0).any(dim=0).nonzero()
    length = int(kept.max()) + 1 if kept.numel() else 1
    full = tuple(mask.shape)
    if length == full[1]:
        return args, kwargs

    def cut(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and tuple(x.shape[:2]) == full:
            return x[:, :length]
        return x

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


class PooledOutput(nn.Module):
    """``model``'s output ``output``, pooled over the tokens its attention mask keeps.

    Parameter names gain the prefix ``model.``; :func:`unwrapped_name` takes it off again (a
    folder written back must hold the model's own names).

    Args:
        model: The model (e.g. a transformers ``BertModel``).
        pooling: One of :data:`POOLINGS`.
        output: The output to take (name or index, see
            :func:`~qtcompress.data.model_call.select_output`); ``None``: ``logits``, else
            ``last_hidden_state``, else the first tensor.
        trim: Drop each batch's trailing padding before the model runs. ``None``: for the
            poolings with one vector per example; ``True`` is for ``none`` over an output the
            caller knows has no token axis (dropping columns would change a token axis).

    Raises:
        ConfigError: An unknown pooling, or a pooling over tokens for a model whose forward
            takes no ``attention_mask``.
    """

    def __init__(
        self,
        model: nn.Module,
        pooling: str,
        output: str | int | None = None,
        trim: bool | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"Unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}.")
        self.model = model
        self.pooling = pooling
        self.output = output
        # Drop trailing padding before the model runs: never where the output has a token axis.
        self.trim = pooling in _PER_EXAMPLE if trim is None else trim
        params = list(inspect.signature(model.forward).parameters)
        self._mask_at = params.index(MASK_INPUT) if MASK_INPUT in params else None
        if pooling in ("mean", "max", "masked") and self._mask_at is None:
            raise ConfigError(
                f"--pooling {pooling}: {type(model).__name__}.forward takes no {MASK_INPUT}, "
                "so padding cannot be told apart; use --pooling cls or none."
            )

    def _given_mask(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The attention mask among the call's inputs (keyword or positional), or ``None``."""
        mask = kwargs.get(MASK_INPUT)
        if mask is None and self._mask_at is not None and len(args) > self._mask_at:
            mask = args[self._mask_at]
        return mask

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The pooled output: ``(batch, hidden)``, or ``(batch, seq, hidden)`` for masked."""
        given = self._given_mask(args, kwargs)
        if self.trim and isinstance(given, torch.Tensor) and not _exporting():
            args, kwargs = trim_padding(args, kwargs, given)
            given = self._given_mask(args, kwargs)
        h = select_output(self.model(*args, **kwargs), self.output)
        if self.pooling == "none":
            return h
        if h.dim() != 3:
            raise ConfigError(
                f"--pooling {self.pooling} needs a (batch, tokens, features) output; "
                f"{self.output or 'the main output'} is {tuple(h.shape)}: use --pooling none."
            )
        if self.pooling == "cls":
            return h[:, 0]
        mask = given
        if mask is None:  # no mask given: every token is kept, as the model itself assumes
            mask = torch.ones(h.shape[:2], dtype=h.dtype, device=h.device)
        m = mask.to(h.dtype).unsqueeze(-1)  # (batch, seq, 1)
        if self.pooling == "masked":
            return h * m
        if self.pooling == "max":
            return h.masked_fill(m == 0, torch.finfo(h.dtype).min).amax(dim=1)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # mean over kept tokens


def per_example_output(model: nn.Module, out: torch.Tensor, inputs: Any) -> bool:
    """Whether ``out`` has one row per example and no token axis, so trailing padding can go.

    Args:
        model: The model (its ``forward`` must take an attention mask).
        out: Its selected output on a sample of ``inputs``.
        inputs: The model's inputs, a mapping holding ``attention_mask`` (batch, tokens).

    A sequence classifier's ``(batch, classes)`` logits qualify; token states and per-token
    scores (a question-answering head's ``(batch, tokens)``) do not: their width is the
    mask's.
    """
    mask = inputs.get(MASK_INPUT) if isinstance(inputs, Mapping) else None
    takes_mask = MASK_INPUT in inspect.signature(model.forward).parameters
    if not takes_mask or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return False
    return out.dim() == 2 and out.shape[1] != mask.shape[1]


def pooled(
    model: nn.Module, pooling: str, output: str | int | None = None, trim: bool | None = None
) -> PooledOutput:
    """``model`` wrapped in :class:`PooledOutput`, its ``forward`` showing the model's signature.

    The signature matters: the pipeline maps keyword inputs and the ONNX input order by
    ``inspect.signature(model.forward)``.
    """
    inner_sig = inspect.signature(type(model).forward)

    def forward(self: PooledOutput, *args: Any, **kwargs: Any) -> torch.Tensor:
        return PooledOutput.forward(self, *args, **kwargs)

    forward.__signature__ = inner_sig  # type: ignore[attr-defined]
    name = f"{pooling.title()}Pooled{type(model).__name__}"
    cls = type(name, (PooledOutput,), {"forward": forward, "__doc__": PooledOutput.__doc__})
    return cls(model, pooling, output, trim)  # type: ignore[no-any-return]


def unwrapped_name(name: str) -> str:
    """A parameter name of a :class:`PooledOutput` as the wrapped model names it."""
    return name.removeprefix("model.")


def folder_pooling(folder: str | Path) -> str | None:
    """The pooling a sentence-transformers folder declares, or ``None``.

    Read from ``modules.json`` and its Pooling module's ``config.json``.

    Raises:
        ConfigError: The Pooling module asks for a mode this tool does not implement.
    """
    root = Path(folder)
    try:
        modules = json.loads((root / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for module in modules if isinstance(modules, list) else []:
        if not isinstance(module, dict) or not str(module.get("type", "")).endswith("Pooling"):
            continue
        try:
            cfg = json.loads((root / str(module.get("path", "")) / "config.json").read_text())
        except (OSError, ValueError):
            return None
        modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
        known = {
            "pooling_mode_mean_tokens": "mean",
            "pooling_mode_cls_token": "cls",
            "pooling_mode_max_tokens": "max",
        }
        if len(modes) != 1 or modes[0] not in known:
            raise ConfigError(
                f"{root.name}: its Pooling module asks for {modes or 'no mode'}; qtcompress "
                "pools by mean, cls or max: say which with --pooling."
            )
        return known[modes[0]]
    return None


def choose_pooling(
    folder: str | Path, model: nn.Module, given: str | None, output: str | int | None, sample: Any
) -> tuple[str, str]:
    """The pooling for a folder model and one line saying why.

    Args:
        folder: The model folder.
        model: Its model.
        given: ``--pooling``, or ``None``.
        output: ``--model-output``, or ``None``.
        sample: The model's output on two examples.

    ``given`` wins; else the folder's sentence-transformers config; else, where the main
    output is token states (``last_hidden_state`` without ``logits``) and ``forward`` takes an
    attention mask, ``masked``; else ``none``.
    """
    if given is not None:
        return given, f"{given} (--pooling)"
    declared = folder_pooling(folder)
    if declared is not None:
        return declared, f"{declared} (the folder's sentence-transformers config)"
    takes_mask = MASK_INPUT in inspect.signature(model.forward).parameters
    token_states = (
        isinstance(sample, Mapping) and "logits" not in sample and "last_hidden_state" in sample
    )
    if output is None and takes_mask and token_states:
        return "masked", "masked: token states, padding zeroed (--pooling mean: one vector)"
    return "none", "none"
