"""Where the classical part runs: the mapping, the model and the loss.

The QNN is always simulated on the CPU (qsim); only its ``(2**n,)`` probability vector moves to
the device and its gradient back, so a GPU speeds up what dominates at scale (the heads' and the
model's matmuls) and the simulator needs no GPU build.
"""

from __future__ import annotations

import torch

from qtcompress.errors import ConfigError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable ``torch.device`` from a user's spelling, checked before anything moves.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a ``torch.device`` or ``None``
            (the CPU).

    Raises:
        ConfigError: The spelling is not a device, or this machine / torch build lacks it.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"Unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'."
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"Device {device!r} asked for, but CUDA is not available to this "
                f"torch (build {torch.__version__}); use device 'cpu'."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"Device {device!r} asked for, but this machine has {count} CUDA "
                f"device(s) (cuda:0..cuda:{count - 1})."
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(
                f"Device {device!r} asked for, but MPS is not available here; use device 'cpu'."
            )
    elif dev.type != "cpu":
        raise ConfigError(f"Device type {dev.type!r} is not supported; use 'cpu', 'cuda' or 'mps'.")
    return dev
