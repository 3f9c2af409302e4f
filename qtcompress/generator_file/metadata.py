"""What a generator file's metadata holds: key prefixes, the JSON schema, layout and fingerprints.

:data:`GENERATOR_SCHEMA` is what every file's metadata must satisfy before anything is built
from it (``docs/format.md``); :func:`fingerprint` summarises regenerated weights per tensor so
that files regenerated on another CPU can be told equal up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from qtcompress import limits
from qtcompress.errors import FormatError, ResourceLimitError
from qtcompress.io.schema import (
    Bool,
    Int,
    Json,
    ListOf,
    MapOf,
    Null,
    Num,
    Obj,
    OneOf,
    Str,
)
from qtcompress.targets import Layout, TensorSpec

if TYPE_CHECKING:
    pass


GENERATOR_PREFIX = "generator."
CLASSICAL_PREFIX = "classical."
CHECK_INPUT_PREFIX = "check.input."
CHECK_OUTPUT_PREFIX = "check.output."

# Relative tolerance for "the same network" when regenerated weights are not bit-identical
# (e.g. another CPU picks another qsim or BLAS kernel): far below any meaningful change.
FINGERPRINT_RTOL = 1e-5

# Floating-point dtypes a generated tensor may have (layout "dtype" names).
_FLOAT_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

# -- the metadata schema (docs/format.md, "Generator fields") ---------------------------------
# Types and signs only: sizes are checked against qtcompress.limits, and the ansatz and mapping
# descriptions against the generator that `config` builds, after this.
_NAME = Str(min_len=1, max_len=1024)
_OPT_INT = OneOf((Null(), Int(min=1)))
_CONFIG_SPEC = Obj(
    {},
    optional={
        "target": OneOf((Null(), ListOf(Str()))),
        "exclude": ListOf(Str()),
        "include_frozen": Bool(),
        "chunk": _OPT_INT,
        "chunk_max_qubits": Int(min=1),
        "max_qubits": Int(min=1),  # its name before config version 3
        "n_layers": Int(min=1),
        "n_qubits": _OPT_INT,
        "ansatz": Str(max_len=64),
        "mapping": Str(max_len=64),
        "hidden": OneOf((Null(), ListOf(Int(min=1), min_len=1))),
        "activation": Str(max_len=64),
        "scheme": Str(max_len=16),
        "budget": OneOf((Null(), Num())),
        "rank": _OPT_INT,
        "ranks": OneOf((Null(), ListOf(Int(min=0), max_len=limits.MAX_LAYOUT_TENSORS))),
        "bond_dim": Int(min=1),
        "prob_transform": Str(max_len=64),
        "train_affine": Bool(),
        "per_tensor_affine": Bool(),  # its name before config version 3
        "standardize": Bool(),
        "backend": Str(max_len=64),
        "block_states": _OPT_INT,
        "seed": Int(min=0, max=limits.MAX_SEED),
        "values": Str(max_len=64),
        "row_scales": OneOf((Null(), Bool())),
        "hashed_vectors": OneOf((Null(), Bool())),
        "allowance": _OPT_INT,
        "version": Int(),
    },
)
_ANSATZ_SPEC = Obj(
    {
        "n_qubits": Int(min=1),
        "n_layers": Int(min=1),
        "rotations": ListOf(Str(max_len=16), min_len=1, max_len=16),
    },
    optional={"version": Int(), "entangler": Str(max_len=64)},
)
_MAPPING_SPEC = Obj(
    {"kind": Str(max_len=64), "chunk": Int(min=1), "n_qubits": Int(min=1)},
    optional={
        "hidden": ListOf(Int(min=1)),
        "activation": Str(max_len=64),
        "bond_dim": Int(min=1),
        "prob_transform": Str(max_len=64),
    },
)
_LAYOUT_SPEC = Obj(
    {
        "total": Int(min=1),
        "tensors": ListOf(
            Obj(
                {
                    "name": _NAME,
                    "dtype": Str(choices=tuple(_FLOAT_DTYPES)),
                    "offset": Int(min=0),
                    "numel": Int(min=0),
                    "aliases": ListOf(_NAME),
                    "shape": ListOf(Int(min=0), max_len=limits.MAX_TENSOR_RANK),
                }
            ),
            min_len=1,
            max_len=limits.MAX_LAYOUT_TENSORS,
        ),
        "classical": ListOf(_NAME),
        "buffers": ListOf(_NAME),
    }
)
GENERATOR_SCHEMA = Obj(
    {
        "config": _CONFIG_SPEC,
        "ansatz": _ANSATZ_SPEC,
        "mapping": _MAPPING_SPEC,
        "layout": _LAYOUT_SPEC,
        "weights_sha256": Str(pattern="[0-9a-f]{64}"),
        "weights_fingerprint": MapOf(ListOf(Num(), min_len=2, max_len=2)),
    },
    optional={
        "qtcompress_version": Str(max_len=64),
        "model": Json(),
        "storage": Str(choices=("float32", "float16", "int8")),
        "check_inputs_float16": Bool(),
    },
)
"""Schema of the generator fields of a generator file's metadata (unknown fields are ignored)."""
REQUIRED_FIELDS = ("config", "ansatz", "mapping", "layout", "weights_sha256", "weights_fingerprint")


# -- helpers shared by save and load ----------------------------------------------------------
def non_finite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """``"name (k values)"`` for each floating-point tensor holding NaN or Inf."""
    out = []
    for name, t in sorted(tensors.items()):
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                out.append(f"{name} ({bad} of {t.numel()} values)")
    return out


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per-tensor ``[sum, L2 norm]`` in float64.

    Tells "the same network up to rounding" from "a different network" where the hash cannot.
    """
    out = {}
    for name, t in sorted(tensors.items()):
        d = t.detach().double()
        out[name] = [float(d.sum()), float(d.norm())]
    return out


def fingerprint_distance(
    want: Mapping[str, Sequence[float]], have: Mapping[str, Sequence[float]]
) -> float:
    """Largest relative difference between two fingerprints; ``inf`` if any value is not finite.

    NaN-aware on purpose: Python's ``max`` skips NaN (``max(0.0, nan) == 0.0``), which once let
    NaN weights pass as "equivalent".
    """
    if set(want) != set(have):
        return math.inf
    worst = 0.0
    for name, (w_sum, w_norm) in want.items():
        h_sum, h_norm = have[name]
        if not all(math.isfinite(v) for v in (w_sum, w_norm, h_sum, h_norm)):
            return math.inf
        denom = max(abs(w_norm), 1e-12)
        worst = max(worst, abs(h_norm - w_norm) / denom, abs(h_sum - w_sum) / denom)
    return worst


def layout_to_json(layout: Layout) -> dict[str, Any]:
    """The ``layout`` metadata entry (read back by :func:`layout_from_json`)."""
    return {
        "total": layout.total,
        "tensors": [
            {
                "name": s.name,
                "shape": list(s.shape),
                "dtype": str(s.dtype).removeprefix("torch."),
                "offset": s.offset,
                "numel": s.numel,
                "aliases": list(s.aliases),
            }
            for s in layout.specs
        ],
        "classical": list(layout.classical),
        "buffers": list(layout.buffers),
    }


def layout_from_json(data: dict[str, Any], source: str) -> Layout:
    """Rebuild a :class:`Layout` from metadata already checked against ``_LAYOUT_SPEC``."""
    specs = []
    offset = 0
    seen: set[str] = set()
    for item in data["tensors"]:
        shape = tuple(item["shape"])
        numel = math.prod(shape)  # Python ints: a hostile shape cannot overflow
        if numel > limits.MAX_GENERATED_WEIGHTS:
            raise ResourceLimitError(
                f"{source}: layout tensor {item['name']!r} of shape {list(shape)} has {numel:,} "
                f"weights, over the limit of {limits.MAX_GENERATED_WEIGHTS:,}; the file is "
                "corrupt or hostile."
            )
        if numel != item["numel"] or item["offset"] != offset:
            raise FormatError(
                f"{source}: layout tensor {item['name']!r}: shape {list(shape)} and offset "
                f"{item['offset']} do not match numel {item['numel']} / expected offset "
                f"{offset}; the file is corrupt."
            )
        names = (item["name"], *item["aliases"])
        dup = sorted(seen.intersection(names)) or sorted(
            n for n in set(names) if names.count(n) > 1
        )
        if dup:
            raise FormatError(f"{source}: layout names {dup} appear twice; the file is corrupt.")
        seen.update(names)
        specs.append(
            TensorSpec(
                item["name"],
                shape,
                _FLOAT_DTYPES[item["dtype"]],
                offset,
                numel,
                tuple(item["aliases"]),
            )
        )
        offset += numel
    if offset != data["total"]:
        raise FormatError(
            f"{source}: layout tensors add up to {offset} weights, metadata says "
            f"{data['total']}; the file is corrupt."
        )
    return Layout(tuple(specs), offset, tuple(data["classical"]), tuple(data["buffers"]))
