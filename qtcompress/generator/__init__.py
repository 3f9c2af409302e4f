"""The generator: QNN probabilities + mapping network -> every generated weight of a model.

Two schemes, chosen by :attr:`QTConfig.scheme`:

- ``rows.py``: :class:`RowGenerator` (the default), one basis state per tensor row and one
  low-rank head per tensor; ``ranks.py`` spends a parameter budget on those ranks.
- ``flat.py``: :class:`QTGenerator`, the paper's flat index cut into ``chunk``-sized pieces.
  :meth:`QTGenerator.from_config` builds either scheme from a config.
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
from qtcompress.generator.rows import RowGenerator

# Either generator scheme (both are Generators and add parameter_counts(), features(), ...).
AnyGenerator = QTGenerator | RowGenerator

__all__ = [
    "AnyGenerator",
    "Generator",
    "QTGenerator",
    "RowGenerator",
    "all_finite",
    "check_pretrained",
    "make_mapping",
    "qubits_for",
]
