"""The generator: QNN probabilities + mapping network -> every generated weight of a model.

Three schemes, chosen by :attr:`QTConfig.scheme` and registered in ``registry.py``
(:func:`register_scheme`; :func:`build_generator` builds any of them from a config):

- ``hashed.py``: :class:`HashedGenerator` (the default), every weight a signed, scaled shared
  value, the values made by the QNN (``values.py``: the QNN and its classical controls);
  reaches 0.05% of M.
- ``rows.py``: :class:`RowGenerator`, one basis state per tensor row and one low-rank head per
  tensor; ``ranks.py`` spends a parameter budget on those ranks.
- ``flat.py``: :class:`QTGenerator`, the paper's flat index cut into ``chunk``-sized pieces.
- ``common.py``: what both share: :class:`Generator`, the three ways to regenerate the weights
  (``generate``, ``generate_named``, ``generate_detached``), the QNN's size, the mapping by
  name, checks on the weights.
"""

from qtcompress.generator.common import (
    Generator,
    all_finite,
    check_pretrained,
    make_mapping,
    qubits_for,
)
from qtcompress.generator.flat import QTGenerator
from qtcompress.generator.hashed import HashedGenerator
from qtcompress.generator.registry import build_generator, register_scheme, scheme_names
from qtcompress.generator.rows import RowGenerator

# Any built-in generator scheme (each a Generator; see registry.py for adding one).
AnyGenerator = QTGenerator | RowGenerator | HashedGenerator

__all__ = [
    "AnyGenerator",
    "Generator",
    "HashedGenerator",
    "QTGenerator",
    "RowGenerator",
    "all_finite",
    "build_generator",
    "check_pretrained",
    "make_mapping",
    "qubits_for",
    "register_scheme",
    "scheme_names",
]
