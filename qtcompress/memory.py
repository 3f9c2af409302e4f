"""Memory: what this process may still allocate, what work will need, and giving it back.

Work whose estimated peak does not fit in :data:`MEMORY_FRACTION` of the memory available now
is refused with a :class:`~qtcompress.errors.ResourceLimitError` before anything is allocated
(:func:`check_memory`); :func:`estimate_generator_bytes` plans a generator's peak from a build
on the ``meta`` device. The documented size maxima are in :mod:`qtcompress.limits`.
"""

from __future__ import annotations

import os
import resource
from typing import TYPE_CHECKING, Any

from qtcompress.errors import ResourceLimitError

if TYPE_CHECKING:
    from qtcompress.targets import Layout

__all__ = [
    "MEMORY_FRACTION",
    "available_memory_bytes",
    "check_generator_memory",
    "check_memory",
    "estimate_generator_bytes",
    "return_freed_memory_to_os",
]

MEMORY_FRACTION = 0.8
"""Share of the memory available now that one piece of work may plan to use."""


def _cgroup_bytes() -> int | None:
    """Memory left under this process's cgroup v2 limit, if one is set."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as fh:
            raw = fh.read().strip()
        if raw == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as fh:
            used = int(fh.read().strip())
        return max(int(raw) - used, 0)
    except (OSError, ValueError):
        return None


def available_memory_bytes() -> int:
    """Memory this process can still allocate: MemAvailable, a cgroup limit or RLIMIT_AS.

    Returns:
        Bytes (the smallest of the known bounds).
    """
    bounds: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    bounds.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not bounds:
        try:
            bounds.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (OSError, ValueError, AttributeError):  # not on a POSIX system
            bounds.append(1 << 34)
    cgroup = _cgroup_bytes()
    if cgroup is not None:
        bounds.append(cgroup)
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        # Address space already mapped counts against the limit.
        try:
            with open("/proc/self/statm", encoding="ascii") as fh:
                mapped = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            mapped = 0
        bounds.append(max(soft - mapped, 0))
    return min(bounds)


def check_memory(need_bytes: int, what: str, fix: str, *, available: int | None = None) -> None:
    """Refuse work that would not fit in the memory available now.

    Args:
        need_bytes: Estimated peak bytes of the work.
        what: The work, e.g. ``"regenerating 1e9 weights"``.
        fix: What the user can change, e.g. ``"lower --chunk"``.
        available: Bytes to plan with; default: :func:`available_memory_bytes`.

    Raises:
        ResourceLimitError: ``need_bytes`` exceeds :data:`MEMORY_FRACTION` of the available
            memory.
    """
    free = available_memory_bytes() if available is None else available
    limit = int(free * MEMORY_FRACTION)
    if need_bytes > limit:
        raise ResourceLimitError(
            f"{what} needs about {_gib(need_bytes)} of memory, more than the {_gib(limit)} this "
            f"process may use now ({MEMORY_FRACTION:.0%} of {_gib(free)} available); {fix}."
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**27 else f"{n / 2**20:,.1f} MiB"


def _module_bytes(module: Any) -> tuple[int, int]:
    """``(parameter bytes, buffer bytes)`` of a module (works on the meta device)."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return params, buffers


def estimate_generator_bytes(generator: Any, layout: Layout, *, training: bool = False) -> int:
    """Estimated peak bytes of regenerating (or, with ``training``, fitting) ``generator``.

    Works on a generator built on the meta device, so it costs no memory: counts its parameters
    and buffers, the QNN's state vectors, one streamed block of mapping activations (the widest
    ``nn.Linear`` outputs) and the generated weights (a float32 vector plus the output tensors);
    training adds gradients, Adam's moments and the phase-1 target.

    Args:
        generator: A ``QTGenerator`` or ``RowGenerator`` (any device).
        layout: Its layout.
        training: Plan for fitting rather than regeneration.
    """
    from torch import nn

    params, buffers = _module_bytes(generator)
    n_qubits = int(generator.n_qubits)
    n_states = int(getattr(generator, "n_states", layout.total))
    block = int(getattr(generator, "block_states", n_states) or n_states)
    widths = sum(m.out_features for m in generator.modules() if isinstance(m, nn.Linear))
    activations = min(block, n_states) * (n_qubits + 1 + widths) * 4
    outputs = sum(s.numel * s.dtype.itemsize for s in layout.specs)
    if training:
        states = (1 << n_qubits) * 6 * 8
        return states + params * 4 + buffers + activations * 4 + layout.total * 16 + outputs * 2
    states = (1 << n_qubits) * (2 * 8 + 3 * 4)
    return states + params + buffers + activations * 2 + layout.total * 4 + outputs


def check_generator_memory(
    planned: Any,
    layout: Layout,
    *,
    training: bool = False,
    source: str | None = None,
    available: int | None = None,
) -> None:
    """Refuse a generator whose estimated peak (:func:`estimate_generator_bytes`) does not fit.

    Args:
        planned: The generator, e.g. from :func:`~qtcompress.limits.plan_generator` (meta device).
        layout: Its layout.
        training: Plan for fitting rather than regeneration.
        source: The file it comes from (``None``: command-line options / QTConfig).
        available: Bytes to plan with (default: the memory available now).

    Raises:
        ResourceLimitError: The estimate exceeds the memory available.
    """
    need = estimate_generator_bytes(planned, layout, training=training)
    count = sum(p.numel() for p in planned.parameters())
    work = (
        "fitting" if training else "regenerating"
    ) + f" {layout.total:,} weights ({planned.n_qubits} qubits, {count:,} generator parameters)"
    if source is None:
        fix = "use a smaller --budget, --hidden or --chunk, generate fewer weights, or free memory"
    else:
        work = f"{source}: {work}"
        fix = "free memory or use a machine with more"
    check_memory(need, work, fix, available=available)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_freed_memory_returned = False


def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes and more by ``mmap`` (glibc; once per process).

    glibc keeps freed blocks under its dynamic threshold (up to 32 MiB) in the heap, so the
    transient tensors of a big model's phase 1 stayed resident: a 3e7-weight step peaked at
    3.8x the weights' bytes over the model, and 2.1x with this setting. Each allocation above
    the threshold then costs fresh page faults, so :func:`qtcompress.api.compress` turns it on
    only for models of at least ``qtcompress.generator.weight_loss.STREAM_WEIGHTS`` weights; the CLI
    does the same. Elsewhere (not glibc) nothing happens.

    Returns:
        Whether the setting is in force.
    """
    global _freed_memory_returned
    if _freed_memory_returned:
        return True
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
        _freed_memory_returned = bool(mallopt and mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except OSError:
        _freed_memory_returned = False
    return _freed_memory_returned
