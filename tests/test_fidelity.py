"""Issue 9: real models come out alive and faithful; fidelity is measured with or without labels."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qtcompress import QTConfig, compress
from qtcompress.errors import ConfigError, FormatError
from qtcompress.examples import load_dataset
from qtcompress.generator import RowGenerator
from qtcompress.generator.hashed import DEFAULT_FLOOR
from qtcompress.generator.ranks import allocate_ranks, row_generator_size, uniform_ranks
from qtcompress.generator.registry import get_scheme
from qtcompress.io.model_source import load_model
from qtcompress.train.loop import LoopConfig, train_loop
from qtcompress.train.objectives import (
    OutputKind,
    check_kind,
    default_distill_loss,
    distill_loss,
    infer_output_kind,
    measure_fidelity,
    output_kind_names,
    register_output_kind,
)
from tests.cli_helpers import ROOT, assert_one_line_error


class PlainMLP(nn.Module):
    """No BatchNorm: nothing re-centres activations when generated weights are off."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 8, 8)
        return self.net(x)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def plain_mlp(digits):
    torch.manual_seed(0)
    model = PlainMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(digits.x_train), (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx]).backward()
        opt.step()
    return model.eval()


# -- objectives and metrics -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("teacher", "kind"),
    [
        (torch.randn(32, 10) * 3, "logits"),
        (torch.sigmoid(torch.randn(32)), "probability"),
        (nn.functional.normalize(torch.randn(32, 16), dim=-1), "embedding"),
        (torch.randn(32) * 5 + 2, "regression"),
    ],
)
def test_output_kind_is_inferred(teacher, kind):
    assert infer_output_kind(teacher) == kind


def _unit(z: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(z, dim=-1)


@pytest.mark.parametrize(
    ("objective", "width", "head"),
    [
        ("kl", 5, lambda z: z),
        ("bce", 1, torch.sigmoid),
        ("cosine", 5, _unit),
        ("mse", 5, None),
    ],
)
def test_each_distillation_objective_reduces_its_loss(objective, width, head):
    x = torch.randn(64, 8)
    head = head or (lambda z: z)
    with torch.no_grad():  # a teacher the linear student can represent
        teacher = head(nn.Linear(8, width)(x) * 2)
    student = nn.Linear(8, teacher.shape[1])
    opt = torch.optim.Adam(student.parameters(), lr=3e-2)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = distill_loss(head(student(x)), teacher, objective)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    floor = float(distill_loss(teacher, teacher, objective))  # BCE's floor is the entropy
    assert losses[-1] - floor < 0.5 * (losses[0] - floor)


def test_objective_mismatch_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs teacher outputs in \\[0, 1\\]"):
        distill_loss(torch.randn(4, 1), torch.randn(4, 1) * 5, "bce")
    with pytest.raises(ConfigError, match="needs a class axis"):
        distill_loss(torch.randn(4), torch.randn(4), "kl")


def test_distillation_losses_are_registered_in_one_place(cli, tmp_path):
    from qtcompress.train import objectives

    assert objectives.distill_loss_names()[:4] == ("kl", "bce", "cosine", "mse")
    with pytest.raises(ConfigError, match="A distillation loss named 'mse' is already registered"):
        objectives.register_distill_loss("mse")(lambda s, t, temp: (s - t).abs().mean())
    with pytest.raises(ConfigError, match="Unknown distillation loss 'l1'; choose from kl, bce"):
        distill_loss(torch.zeros(2, 3), torch.zeros(2, 3), "l1")
    objectives.register_distill_loss("l1")(lambda s, t, temp: (s - t).abs().mean())
    try:
        assert float(distill_loss(torch.ones(2, 3), torch.zeros(2, 3), "l1")) == 1.0
    finally:
        objectives._LOSSES.pop("l1")
    # The CLI takes the registered names and refuses another before any fitting.
    ckpt = ROOT / "models" / "wine_mlp.safetensors"
    factory = ["--factory", "qtcompress.examples:TabularMLP", "--data", "wine"]
    result = cli("compress", ckpt, *factory, "-o", tmp_path / "o", "--distill", "l2")
    assert result.returncode == 1 and not (tmp_path / "o").exists()
    assert "Unknown distillation loss 'l2'; choose from kl, bce, cosine, mse" in result.stderr
    result = cli("compress", ckpt, *factory, "-o", tmp_path / "o", "--output-kind", "logit")
    assert result.returncode == 1 and not (tmp_path / "o").exists()
    assert "Unknown output kind 'logit'; choose from logits, probability" in result.stderr
    # Registered names of the generator too, before any file is touched.
    for flag, value, said in (
        ("--ansatz", "ry-ring", "Unknown ansatz 'ry-ring'; choose from paper, ry-rz-ring"),
        ("--values", "tabel", "Unknown value source 'tabel'; choose from frozen, mps"),
    ):
        result = cli("compress", ckpt, *factory, "-o", tmp_path / "o", flag, value)
        assert result.returncode == 1 and not (tmp_path / "o").exists()
        assert said in result.stderr


def test_degenerate_warning_fires_on_a_constant_student_only():
    teacher = torch.randn(200, 10) * 3
    constant = measure_fidelity(torch.zeros(200, 10) + torch.randn(1, 10), teacher, "logits")
    assert constant.degenerate
    assert any("constant" in w for w in constant.warnings())
    good = measure_fidelity(teacher + 0.1 * torch.randn(200, 10), teacher, "logits")
    assert not good.degenerate and good.warnings() == []
    assert good.agreement > 0.95 and good.correlation > 0.99


def test_poor_fidelity_says_the_advice_it_is_given():
    teacher = torch.randn(200, 10)
    poor = measure_fidelity(torch.randn(200, 10), teacher, "logits")
    assert not poor.degenerate
    (line,) = poor.warnings()
    assert line.endswith("raise --budget or --finetune-steps")  # the default advice
    (line,) = poor.warnings("raise --finetune-steps or --qubits")  # a budget it cannot spend
    assert line.endswith("raise --finetune-steps or --qubits") and "--budget" not in line


def test_logits_are_compared_up_to_a_shift_per_example():
    teacher = torch.randn(50, 10)
    shifted = teacher + torch.randn(50, 1) * 10  # softmax is blind to this
    fid = measure_fidelity(shifted, teacher, "logits")
    assert fid.agreement == 1.0 and fid.correlation == pytest.approx(1.0)
    assert fid.relative_error == pytest.approx(0.0, abs=1e-6)


def test_accuracy_with_labels_for_probabilities():
    probs = torch.tensor([0.9, 0.2, 0.7, 0.4])
    fid = measure_fidelity(probs, probs, "probability", torch.tensor([1, 0, 0, 0]))
    assert fid.agreement == 1.0 and fid.accuracy == 0.75


# -- phase 1 on a model without BatchNorm ------------------------------------------------------
def test_phase1_error_is_below_one_on_every_tensor(plain_mlp):
    qt = compress(plain_mlp, QTConfig(scheme="rows"))
    qt.fit_weights(steps=20, lr=1e-2, progress=False)
    errors = qt.weight_errors()
    assert isinstance(qt.generator, RowGenerator)
    assert all(e < 1.0 for e in errors.values()), errors
    # Vectors (biases) are held exactly by their heads' biases.
    assert errors["net.1.bias"] < 1e-5


@pytest.mark.slow
def test_model_without_batchnorm_is_alive_and_faithful_after_finetuning(plain_mlp, digits):
    qt = compress(plain_mlp, QTConfig())  # the default: hashed, its 1,024-parameter floor here
    result = qt.finetune(digits.x_train, steps=300, batch_size=64, progress=False)
    fid = qt.evaluate(digits.x_test, digits.y_test)
    assert not fid.degenerate
    # Outputs vary across inputs as much as the teacher's do, and mostly agree with it.
    assert fid.spread_ratio > 0.3
    assert fid.agreement > 0.85, fid
    assert result.restarts == 0


def test_collapse_guard_restores_best_state_and_halves_the_step(plain_mlp, monkeypatch):
    qt = compress(plain_mlp, QTConfig())
    target = qt.pretrained
    cfg = LoopConfig(steps=30, lr=1e-2, eval_every=10)
    lrs, states, checks = [], {}, []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)

    def guard() -> bool:
        checks.append(1)
        return len(checks) == 1  # the first check (after step 20) reports a collapse

    def record(step: int, _loss: float) -> None:
        states[step] = {k: v.clone() for k, v in qt.generator.state_dict().items()}

    result = train_loop(
        qt.generator,
        lambda _s: ((qt.generator.generate() - target) ** 2).mean(),
        cfg,
        guard=guard,
        callback=record,
        progress=False,
    )
    assert result.restarts == 1 and result.steps == 30 and len(checks) == 2

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    # After step 20 the state is back at the best one so far: step 10's, the only check before.
    assert not same(states[19], states[10]) and same(states[20], states[10])
    # From step 20 on, every step is half as large as the schedule says.
    assert lrs == pytest.approx([cfg.lr_at(s) * (0.5 if s >= 20 else 1.0) for s in range(30)])


# -- budget ------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.2, 0.5, 3000])
def test_budget_sizes_the_generator(plain_mlp, budget):
    qt = compress(plain_mlp, QTConfig(scheme="rows", budget=budget))
    m = qt.report().generated_weights
    allowed = budget * m if budget <= 1 else budget
    assert qt.report().trainable <= allowed
    # The next rank would not have fitted: the budget is used, not wasted.
    cfg = qt.config
    grown = [
        k + 1 if 0 < k < min(s.shape) - 1 else k
        for k, s in zip(cfg.ranks, qt.layout.specs, strict=True)
    ]
    assert row_generator_size(qt.layout, grown, cfg.n_layers, cfg.hidden) > allowed


def test_default_budget_and_explicit_too_small_budget(plain_mlp):
    rows_default = get_scheme("rows").default_budget
    qt = compress(plain_mlp, QTConfig(scheme="rows"))
    cfg = qt.config
    assert cfg.budget is None and cfg.scheme == "rows"
    # 5% of this 9K-weight model is below the smallest generator: the default then means it.
    smallest = row_generator_size(qt.layout, uniform_ranks(qt.layout, 1), cfg.n_layers, cfg.hidden)
    assert rows_default * qt.report().generated_weights < smallest
    assert qt.report().trainable == smallest
    # An explicit budget below it switches to the hashed scheme, and says so.
    with pytest.warns(UserWarning, match="below the smallest rows generator.*hashed scheme"):
        small = compress(plain_mlp, QTConfig(scheme="rows", budget=0.05))
    assert small.config.scheme == "hashed"
    assert small.report().trainable <= rows_default * small.report().generated_weights
    with pytest.raises(ConfigError, match="below the smallest hashed generator for this model"):
        compress(plain_mlp, QTConfig(budget=10))


def test_default_is_the_hashed_scheme_with_a_floor_on_small_models(plain_mlp):
    qt = compress(plain_mlp)
    m = qt.report().generated_weights
    assert qt.config.scheme == "hashed" and qt.config.budget is None
    # 0.5% of this 9K-weight model is 45 parameters: the default spends the 1,024 floor.
    assert get_scheme("hashed").default_budget * m < DEFAULT_FLOOR < m // 4
    assert DEFAULT_FLOOR - 64 < qt.report().trainable <= DEFAULT_FLOOR
    # A model of 1e6 weights gets 0.5% of M.
    big = compress(nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 10)))
    big_m = big.report().generated_weights
    assert 0.9 * 0.005 * big_m < big.report().trainable <= 0.005 * big_m


def test_leftover_budget_follows_the_weights_spectra():
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64))
    with torch.no_grad():  # first matrix exactly rank 2 (nothing to gain past it), second full
        model[0].weight.copy_(torch.randn(64, 2) @ torch.randn(2, 32))
    qt = compress(model, QTConfig(scheme="rows", rank=1))
    base = row_generator_size(qt.layout, uniform_ranks(qt.layout, 4), 8, (32,))
    # 100 spare parameters: one more rank of the 64-column matrix (64 + 33 for the body's
    # wider output) fits, a whole uniform rank (129) does not.
    ranks = allocate_ranks(qt.layout, qt.pretrained, base + 100, 8, (32,))
    by_name = dict(zip([s.name for s in qt.layout.specs], ranks, strict=True))
    assert by_name["0.bias"] == 0 and by_name["1.bias"] == 0  # vectors: exact, bias only
    assert by_name["0.weight"] == 4 and by_name["1.weight"] == 5


# -- the CLI: --min-fidelity, summary, non-strict ------------------------------------------------
def test_min_fidelity_exits_1_and_keeps_the_files(tmp_path, cli):
    out = tmp_path / "out"
    result = cli(
        "demo",
        "--example",
        "wine_mlp",
        "-o",
        out,
        "--fit-steps",
        "2",
        "--finetune-steps",
        "3",
        "--min-fidelity",
        "1.0",
        "--no-progress",
    )
    assert_one_line_error(result)
    assert "below --min-fidelity 1.0" in result.stderr and "files were written" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fidelity_ok"] is False and summary["status"] == "complete"
    assert (out / "wine_mlp.onnx").is_file() and (out / "wine_mlp.qtc.safetensors").is_file()
    assert "fidelity: fine-tuned" in result.stdout


def test_non_strict_load_names_the_ignored_key(tmp_path, plain_mlp):
    state = {k: v.contiguous() for k, v in plain_mlp.state_dict().items()}
    state["embeddings.position_ids"] = torch.arange(8)[None]
    path = tmp_path / "ckpt.safetensors"
    save_file(state, str(path))
    factory = "tests.test_fidelity:PlainMLP"
    with pytest.raises(FormatError, match="unexpected keys \\['embeddings.position_ids'\\]"):
        load_model(path, factory=factory)
    ignored = r"ignored unexpected keys \['embeddings.position_ids'\] \(--non-strict\)"
    with pytest.warns(UserWarning, match=ignored):
        model = load_model(path, factory=factory, strict=False)
    assert torch.equal(model.net[1].weight, plain_mlp.net[1].weight)
    del state["net.1.weight"]
    save_file(state, str(path))
    with (
        pytest.warns(UserWarning, match=ignored),
        pytest.raises(FormatError, match="missing keys \\['net.1.weight'\\]"),
    ):
        load_model(path, factory=factory, strict=False)


def test_default_loss_per_kind_is_documented():
    assert {k: default_distill_loss(k) for k in output_kind_names()} == {
        "logits": "kl",
        "probability": "bce",
        "embedding": "cosine",
        "regression": "mse",
        "ctc": "kl",  # per-frame class scores, distilled frame by frame
    }


def test_an_output_kind_is_a_registration_read_by_the_metrics_and_the_settings():
    from qtcompress.pipeline import PipelineSettings
    from qtcompress.train import objectives

    def sign(out: torch.Tensor) -> torch.Tensor:  # one decision per example: the sum's sign
        return (out.sum(-1) > 0).long()

    try:
        register_output_kind(OutputKind("signs", "mse", "agreement", sign, labelled=False))
        assert PipelineSettings(output_kind="signs").output_kind == "signs"
        t = torch.tensor([[1.0, -1.0], [2.0, 3.0], [-1.0, -2.0], [0.5, 0.5]])
        s = t.clone()
        s[0, 1] = 0.5  # the first example's sum turns positive: 3 of 4 decisions agree
        fid = measure_fidelity(s, t, "signs", labels=torch.tensor([1, 1, 0, 1]))
        assert (fid.headline_name, fid.headline) == ("agreement", pytest.approx(0.75))
        assert fid.accuracy is None  # not a labelled kind
        with pytest.raises(ConfigError, match="already registered"):
            register_output_kind(OutputKind("signs", "mse", "agreement"))
    finally:
        objectives._KINDS.pop("signs")
    with pytest.raises(ConfigError, match="Unknown output kind 'signs'; choose from logits"):
        check_kind("signs")
    with pytest.raises(ConfigError, match="headline 'accuracyy' is not one of"):
        register_output_kind(OutputKind("bad", "mse", "accuracyy"))
    with pytest.raises(ConfigError, match="Unknown output kind 'signs'"):
        PipelineSettings(output_kind="signs")
