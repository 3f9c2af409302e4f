"""qtcompress: Quantum-Train compression of PyTorch models."""

__version__ = "0.1.0"
