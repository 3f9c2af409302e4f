"""How a generator file stores the generator's parameters: float32, float16, or int8 with a scale.

A generator of 0.5% of M is a few thousand numbers, so their encoding is a large part of the
file. The rounding is applied to the generator itself first (:func:`round_parameters`), so the
weights regenerated from the stored values, their hash and the exported ONNX model all come from
the same rounded generator: a file never claims weights it cannot regenerate.

- ``float32``: as trained (the default, and every file written before version 4 of the config);
- ``float16``: IEEE half precision, 2 bytes a value;
- ``int8``: ``round(x / s)`` with ``s = max|x| / 127`` per tensor, 1 byte a value and the scale
  stored as ``int8_scale.<name>`` (float32).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from qtcompress.errors import ConfigError, FormatError

STORAGES = ("float32", "float16", "int8")
BYTES_PER_VALUE = {"float32": 4, "float16": 2, "int8": 1}
SCALE_PREFIX = "int8_scale."


def check_storage(storage: str) -> str:
    """``storage`` if it is a known encoding.

    Raises:
        ConfigError: Unknown encoding (names the known ones).
    """
    if storage not in STORAGES:
        raise ConfigError(f"Unknown storage {storage!r}; choose from {', '.join(STORAGES)}.")
    return storage


def rounded(t: torch.Tensor, storage: str) -> torch.Tensor:
    """``t`` (float32) rounded to what ``storage`` can hold, as float32."""
    if storage == "float32" or not t.is_floating_point() or t.numel() == 0:
        return t
    if storage == "float16":
        return t.to(torch.float16).to(t.dtype)
    scale = t.abs().max().clamp_min(1e-30) / 127.0
    # "+ 0.0" turns -0.0 (round of a small negative) into the +0.0 that decoding gives: the
    # stored hash is over bytes, and the two zeros differ in their sign bit.
    return (torch.round(t / scale).clamp(-127, 127) * scale + 0.0).to(t.dtype)


@torch.no_grad()
def round_parameters(module: nn.Module, storage: str) -> None:
    """Round every floating parameter of ``module`` in place to ``storage``'s values."""
    check_storage(storage)
    for p in module.parameters():
        p.copy_(rounded(p, storage))


def encode(state: Mapping[str, torch.Tensor], storage: str) -> dict[str, torch.Tensor]:
    """The tensors to store for a state dict already rounded by :func:`round_parameters`.

    Raises:
        ConfigError: A value is not exactly representable (the generator was not rounded).
    """
    check_storage(storage)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if storage == "float32" or t.dtype != torch.float32 or t.numel() == 0:
            out[name] = t
            continue
        if storage == "float16":
            code = t.to(torch.float16)
            back = code.float()
        else:
            scale = t.abs().max().clamp_min(1e-30) / 127.0
            code = torch.round(t / scale).clamp(-127, 127).to(torch.int8)
            back = code.float() * scale + 0.0
            out[SCALE_PREFIX + name] = scale.reshape(1).float()
        if not torch.equal(back, t):
            raise ConfigError(
                f"Generator tensor {name!r} is not exactly representable as {storage}; round "
                f"the generator first (QTModel.round_to({storage!r}))."
            )
        out[name] = code
    return out


def decode(
    stored: Mapping[str, torch.Tensor], storage: str, source: str
) -> dict[str, torch.Tensor]:
    """Float32 tensors back from :func:`encode`'s output (scales consumed).

    Raises:
        FormatError: A tensor's dtype does not match the declared storage, or an int8 tensor
            has no scale.
    """
    if storage not in STORAGES:
        raise FormatError(f"{source}: unknown storage {storage!r}; the file is corrupt.")
    out: dict[str, torch.Tensor] = {}
    for name, t in stored.items():
        if name.startswith(SCALE_PREFIX):
            continue
        if storage == "float16" and t.dtype == torch.float16:
            out[name] = t.float()
        elif storage == "int8" and t.dtype == torch.int8:
            scale = stored.get(SCALE_PREFIX + name)
            if scale is None or scale.shape != (1,) or scale.dtype != torch.float32:
                raise FormatError(
                    f"{source}: int8 tensor {name!r} has no float32 scale "
                    f"{SCALE_PREFIX + name!r}; the file is corrupt."
                )
            out[name] = t.float() * scale + 0.0
        else:
            out[name] = t
    return out
