"""Write the golden generator file used by tests/test_generator_file.py (run once per format
version; commit the outputs). Usage: python tools/make_golden.py"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qtcompress.api import compress  # noqa: E402
from qtcompress.config import QTConfig  # noqa: E402
from qtcompress.generator_file.load import load_generator  # noqa: E402
from qtcompress.generator_file.save import save_generator  # noqa: E402
from tests.tiny_models import TinyMLP, example_input  # noqa: E402


def main() -> int:
    torch.manual_seed(0)
    model = TinyMLP().eval()
    qt = compress(model, QTConfig(scheme="rows", n_layers=2, hidden=(8,)))
    qt.fit_weights(steps=30, progress=False)
    out = ROOT / "tests" / "data"
    path = save_generator(
        qt,
        out / "golden_mlp.qtc.safetensors",
        example_inputs=(example_input(model, batch=2),),
        model_info={"factory": "tests.tiny_models:TinyMLP", "kwargs": {}},
    )
    state = load_generator(path).state_dict()
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(out / "golden_mlp.weights.safetensors")
    )
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
