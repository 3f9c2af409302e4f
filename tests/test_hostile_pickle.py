"""Issue 11, items 1 and 9: no code runs from a model file unless trusted; one-line messages."""

import io
import json
import os
import zipfile

import pytest
import torch

from qtcompress.api import compress
from qtcompress.config import QTConfig
from qtcompress.errors import FormatError, UnsafeFileError
from qtcompress.io.model_source import load_model
from tests.tiny_models import TinyMLP, example_input

REFUSED = r"needs code execution to load; use --trust-pickle .* only if you trust its source"


class _Payload:
    """Unpickling this runs ``touch <marker>``: the stand-in for an attacker's command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _payload_bytes(marker) -> bytes:
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    return buf.getvalue()


def _exported(tmp_path, name="m.pt2"):
    model = TinyMLP().eval()
    x = example_input(model, batch=3)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    path = tmp_path / name
    torch.export.save(program, path)
    return model, x, path


def _rewrite_zip(src, dst, edit):
    """Copy a zip archive, passing each (name, bytes) through ``edit`` (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        entries = [(i.filename, zin.read(i.filename)) for i in zin.infolist()]
        for name, data in edit(entries):
            zout.writestr(name, data)


def _pickled_weight(entries, marker):
    out = []
    for name, data in entries:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            fqn = next(iter(config["config"]))
            target = config["config"][fqn]["path_name"]
            config["config"][fqn]["use_pickle"] = True
            data = json.dumps(config).encode()
        out.append((name, data))
    return [(n, _payload_bytes(marker) if n.endswith("/" + target) else d) for n, d in out]


def _pickled_sample_inputs(entries, marker):
    return [(n, _payload_bytes(marker) if "/data/sample_inputs/" in n else d) for n, d in entries]


def _opaque_constant(entries, marker):
    out = []
    for name, data in entries:
        if name.endswith("_constants_config.json"):
            data = json.dumps(
                {
                    "config": {
                        "evil": {
                            "path_name": "opaque_obj_0",
                            "is_param": False,
                            "use_pickle": True,
                            "tensor_meta": None,
                        }
                    }
                }
            ).encode()
            root = name.split("/", 1)[0]
            out.append((f"{root}/data/constants/opaque_obj_0", _payload_bytes(marker)))
        out.append((name, data))
    return out


@pytest.mark.parametrize(
    "craft",
    [_pickled_weight, _pickled_sample_inputs, _opaque_constant],
    ids=["pickled-weight", "pickled-sample-inputs", "opaque-constant"],
)
def test_crafted_pt2_never_runs_code_without_trust(tmp_path, craft):
    _, _, good = _exported(tmp_path)
    marker = tmp_path / "marker"
    bad = tmp_path / "evil.pt2"
    _rewrite_zip(good, bad, lambda entries: craft(entries, marker))
    with pytest.raises(UnsafeFileError, match=REFUSED) as info:
        load_model(bad)
    assert not marker.exists()
    assert "\n" not in str(info.value)
    if craft is not _opaque_constant:
        # The file really is hostile: torch.export.load itself runs the payload.
        try:
            torch.export.load(bad)
        except Exception:  # noqa: BLE001 - the payload is not a tensor; only the side effect matters
            pass
        assert marker.exists()


def test_valid_pt2_program_runs_and_compresses(tmp_path):
    model, x, path = _exported(tmp_path)
    loaded = load_model(path)
    assert loaded.eval() is loaded and loaded.train() is loaded  # no NotImplementedError
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    qt = compress(loaded, QTConfig(scheme="flat", chunk=4, n_layers=2, hidden=(8,)))
    qt.fit_weights(steps=2, progress=False)
    student = qt.materialize().eval()
    assert student(x).shape == model(x).shape


def test_malicious_pt_is_refused_in_one_line_not_called_corrupt(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, path)
    with pytest.raises(UnsafeFileError, match=REFUSED) as info:
        load_model(path, factory="tests.tiny_models:TinyMLP")
    message = str(info.value)
    assert "\n" not in message and "corrupt" not in message and "weights_only" not in message
    assert not marker.exists()


def test_whole_pickled_model_asks_for_trust(tmp_path):
    torch.save(TinyMLP(), tmp_path / "full.pt")
    with pytest.raises(UnsafeFileError, match=REFUSED):
        load_model(tmp_path / "full.pt")


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_corrupt_pt2_is_one_quiet_format_error(tmp_path, capfd, caplog, recwarn, cut):
    _, _, good = _exported(tmp_path)
    data = good.read_bytes()
    bad = tmp_path / "cut.pt2"
    bad.write_bytes(data[: int(len(data) * cut)])
    caplog.clear()
    capfd.readouterr()
    with pytest.raises(FormatError, match="cut.pt2.*(corrupt|truncated)") as info:
        load_model(bad)
    assert "\n" not in str(info.value)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert not [r for r in caplog.records if r.levelno >= 30]
    assert not [w for w in recwarn if "torch" in str(w.filename)]


def test_pt2_with_broken_program_json_is_format_error(tmp_path, capfd):
    _, _, good = _exported(tmp_path)
    bad = tmp_path / "broken.pt2"
    capfd.readouterr()
    _rewrite_zip(
        good,
        bad,
        lambda entries: [
            (n, b"{not json" if "/models/" in n and n.endswith(".json") else d) for n, d in entries
        ],
    )
    with pytest.raises(FormatError, match="broken.pt2.*torch.export program") as info:
        load_model(bad)
    assert "\n" not in str(info.value)
    assert capfd.readouterr().err == ""


def test_trusted_pt2_still_loads(tmp_path):
    model, x, path = _exported(tmp_path)
    loaded = load_model(path, trust_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
