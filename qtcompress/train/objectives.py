"""How close a compressed student is to its teacher: output kinds, distillation losses, metrics.

A compressed model is judged by its fidelity to the original on held-out inputs, with or
without labels:

* ``logits`` (class scores, softmax): top-1 agreement with the teacher; distilled with
  temperature-softened KL.
* ``probability`` (sigmoid outputs in [0, 1]): agreement of the thresholded decision and
  correlation; distilled with binary cross-entropy against the teacher's probabilities.
* ``embedding`` (unit-norm rows): mean cosine similarity; distilled with cosine distance.
* ``regression`` (anything else): correlation and relative error; distilled with MSE.
* ``ctc`` (per-frame class scores ``(batch, time, classes)``, blank = class 0; named with
  ``--output-kind ctc``, never inferred): the greedy decodes of student and teacher compared
  by character error rate, ``decode_agreement = 1 - CER`` the headline; distilled with
  per-frame KL, like logits.

The kind is inferred from the teacher's outputs (:func:`infer_output_kind`) unless given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from qtcompress.errors import ConfigError
from qtcompress.plugins import Registry

# A student whose outputs vary across inputs less than this fraction of the teacher's is
# treated as constant ("dead"): a collapsed network, not a weak one.
DEGENERATE_RATIO = 0.02
# Fidelity below this (agreement, cosine or correlation) earns a warning in the summary.
POOR_FIDELITY = 0.9
# Weight of the logit-scale anchor added to the KL loss (see :func:`distill_loss`).
LOGIT_ANCHOR = 0.5


def infer_output_kind(teacher: torch.Tensor) -> str:
    """Guess what the teacher's outputs are from their values.

    Rows of unit L2 norm are an ``embedding``; values all in [0, 1] are a ``probability``;
    anything with a class axis (last dimension >= 2) is ``logits``; the rest ``regression``.
    """
    t = teacher.detach().float()
    if t.ndim >= 2 and t.shape[-1] >= 2:
        norms = t.norm(dim=-1)
        if bool(((norms - 1.0).abs() < 1e-3).all()):
            return "embedding"
    if bool(((t >= 0) & (t <= 1)).all()) and (t.ndim < 2 or t.shape[-1] == 1):
        return "probability"
    if t.ndim >= 2 and t.shape[-1] >= 2:
        return "logits"
    return "regression"


def check_kind(kind: str) -> str:
    """Validate an output kind name (a :class:`ConfigError` naming the registered ones)."""
    return _KINDS.check(kind)


def output_kind_names() -> tuple[str, ...]:
    """Registered output kinds, in registration order."""
    return _KINDS.names()


def default_distill_loss(kind: str) -> str:
    """The distillation loss an output kind uses unless ``--distill`` names another."""
    return _KINDS[kind].distill


DistillLoss = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
_LOSSES: Registry[DistillLoss] = Registry("distillation loss")


def register_distill_loss(name: str) -> Callable[[DistillLoss], DistillLoss]:
    """Register ``fn(student, teacher, temperature) -> loss`` as distillation loss ``name``.

    Used as a decorator; the name becomes a ``--distill`` choice and a ``distill=`` value.

    Raises:
        ConfigError: A loss of that name is already registered.
    """

    def register(fn: DistillLoss) -> DistillLoss:
        return _LOSSES.add(name, fn)

    return register


def distill_loss_names() -> tuple[str, ...]:
    """Registered distillation losses, in registration order."""
    return _LOSSES.names()


def check_distill_loss(name: str) -> str:
    """Validate a distillation loss name (a :class:`ConfigError` naming the registered ones)."""
    return _LOSSES.check(name)


@register_distill_loss("kl")
def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-softened KL over the last axis (x T^2) plus the logit-scale anchor."""
    if student.ndim < 2 or student.shape[-1] < 2:
        raise ConfigError(
            "The 'kl' distillation loss needs a class axis (last dimension "
            ">= 2); use --distill mse or bce for scalar outputs."
        )
    t = temperature
    s = F.log_softmax(student.flatten(0, -2) / t, dim=-1)
    q = F.log_softmax(teacher.flatten(0, -2) / t, dim=-1)
    kl = F.kl_div(s, q, log_target=True, reduction="batchmean") * t * t
    sc = student - student.mean(-1, keepdim=True)
    tc = teacher - teacher.mean(-1, keepdim=True)
    return kl + LOGIT_ANCHOR * F.mse_loss(sc, tc) / tc.var().clamp_min(1e-8)


@register_distill_loss("bce")
def _bce(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Binary cross-entropy against the teacher's probabilities."""
    del temperature
    if bool(((teacher < 0) | (teacher > 1)).any()):
        raise ConfigError(
            "The 'bce' distillation loss needs teacher outputs in [0, 1] "
            "(probabilities); use --distill mse for other outputs."
        )
    return F.binary_cross_entropy(student.clamp(1e-6, 1 - 1e-6), teacher)


@register_distill_loss("cosine")
def _cosine(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean ``1 - cos`` over the last axis (embeddings)."""
    del temperature
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()


@register_distill_loss("mse")
def _mse(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean squared error divided by the teacher's variance."""
    del temperature
    return F.mse_loss(student, teacher) / teacher.var().clamp_min(1e-8)


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "kl", temperature: float = 2.0
) -> torch.Tensor:
    """Distillation loss between student and teacher outputs of the same shape.

    Args:
        student: Student outputs.
        teacher: Teacher outputs (no gradient).
        kind: A registered loss (:func:`register_distill_loss`): ``"kl"``: temperature-softened
            KL over the last axis, scaled by T^2, plus a small MSE between the centred logits
            divided by the teacher's variance (``LOGIT_ANCHOR``), which holds the student's
            logit scale to the teacher's (KL alone lets it drift without bound). ``"bce"``:
            binary cross-entropy against the teacher's probabilities (sigmoid outputs).
            ``"cosine"``: mean ``1 - cos`` over the last axis (embeddings). ``"mse"``: mean
            squared error divided by the teacher's variance.
        temperature: Softmax temperature for ``"kl"``.
    """
    if student.shape != teacher.shape:
        raise ConfigError(
            f"Student output {tuple(student.shape)} and teacher output "
            f"{tuple(teacher.shape)} differ in shape."
        )
    return _LOSSES[kind](student, teacher, temperature)


@dataclass(frozen=True)
class Fidelity:
    """Student-vs-teacher agreement on one set of inputs (``None`` where it does not apply).

    Attributes:
        kind: The output kind measured.
        n: Number of examples.
        agreement: Fraction of examples (or positions) where the student's decision equals
            the teacher's (top-1 class, or probability > 0.5).
        cosine: Mean cosine similarity of output rows.
        correlation: Pearson correlation of all output values (logits centred per example).
        relative_error: ``||s - t|| / ||t||`` over all output values (logits centred per
            example).
        accuracy: Fraction correct against labels, when labels were given.
        teacher_accuracy: The original's fraction correct on the same inputs and labels.
        spread_ratio: The student's spread of outputs across inputs over the teacher's
            (1 = as varied as the teacher; ~0 = a constant function).
        decode_agreement: ``ctc``: one minus the character error rate of the student's greedy
            decodes against the teacher's (edit distance over the teacher's decode length).
    """

    kind: str
    n: int
    agreement: float | None
    cosine: float | None
    correlation: float
    relative_error: float
    accuracy: float | None
    teacher_accuracy: float | None
    spread_ratio: float
    decode_agreement: float | None = None

    @property
    def degenerate(self) -> bool:
        """The student is dead: outputs (nearly) constant across inputs, or its kind's own test.

        A CTC student that decodes nothing the teacher decodes (all blank, say) is dead even
        though its per-frame scores still vary.
        """
        spec = _KINDS.get(self.kind)
        dead = spec is not None and spec.dead is not None and spec.dead(self)
        return self.spread_ratio < DEGENERATE_RATIO or dead

    @property
    def headline_name(self) -> str:
        """Name of the figure that :attr:`headline` holds."""
        return _KINDS[self.kind].headline

    @property
    def headline(self) -> float:
        """One number per kind, compared with ``--min-fidelity``.

        Agreement for logits and probabilities, cosine for embeddings, correlation otherwise.
        """
        value = getattr(self, self.headline_name)
        return float(value) if value is not None else self.correlation

    def warnings(self, advice: str = "raise --budget or --finetune-steps") -> list[str]:
        """One line per problem: a constant student, or poor fidelity (with ``advice``)."""
        out = []
        if self.degenerate:
            out.append(
                f"the student's outputs are nearly constant across inputs (spread "
                f"{self.spread_ratio:.3g} of the teacher's): it is a dead network"
            )
        elif self.headline < POOR_FIDELITY:
            out.append(
                f"fidelity is poor: {self.headline_name} {self.headline:.3f} < "
                f"{POOR_FIDELITY}; {advice}"
            )
        return out

    def describe(self) -> str:
        """Short text, e.g. ``agreement 97.2%, correlation 0.981``."""
        parts = [
            f"{self.headline_name} "
            + (
                f"{self.headline:.2%}"
                if self.headline_name in ("agreement", "decode_agreement")
                else f"{self.headline:.4f}"
            )
        ]
        if self.headline_name != "correlation":
            parts.append(f"correlation {self.correlation:.3f}")
        parts.append(f"relative error {self.relative_error:.3f}")
        if self.accuracy is not None:
            parts.append(f"accuracy {self.accuracy:.2%}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (with ``headline`` and ``degenerate``)."""
        d = asdict(self)
        d.update(
            headline=self.headline, headline_name=self.headline_name, degenerate=self.degenerate
        )
        return d


def ctc_greedy(scores: torch.Tensor, blank: int = 0) -> list[list[int]]:
    """Greedy CTC decodes of ``(batch, time, classes)`` scores.

    The best class per frame, repeats collapsed, blanks dropped.
    """
    best = scores.argmax(-1)  # (B, T)
    out = []
    for row in best.tolist():
        seq, last = [], None
        for c in row:
            if c != last and c != blank:
                seq.append(c)
            last = c
        out.append(seq)
    return out


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two label sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def decode_agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """``1 - CER`` of the student's greedy decodes against the teacher's (at least 0)."""
    if student.ndim != 3:
        raise ConfigError(
            f"CTC outputs must be (batch, time, classes), got {tuple(student.shape)}; a "
            "time-major model's outputs need their batch moved to dimension 0."
        )
    s, t = ctc_greedy(student), ctc_greedy(teacher)
    errors = sum(edit_distance(a, b) for a, b in zip(s, t, strict=True))
    length = sum(len(b) for b in t)
    return max(0.0, 1.0 - errors / max(1, length))


Scorer = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


@dataclass(frozen=True)
class OutputKind:
    """A registered output kind: how such outputs are distilled and judged.

    Attributes:
        name: ``--output-kind`` value.
        distill: The registered distillation loss used unless one is named.
        headline: The :class:`Fidelity` field that is the kind's one number (``--min-fidelity``).
        decisions: ``outputs -> decisions`` compared for ``agreement`` (and for ``accuracy``
            against labels when ``labelled``); ``None``: no agreement.
        centred: Compare the outputs centred per example (scores defined up to a constant).
        labelled: Labels are decisions of this kind (accuracy is measured).
        score: Extra figures ``(student, teacher) -> {Fidelity field: value}``.
        dead: ``Fidelity -> bool``: a student dead by this kind's own measure (beside outputs
            that are constant across inputs, which every kind checks).
        monitor: ``(student, teacher) -> float``, lower is better: what picks the fine-tune's
            best state and watches for a collapse; ``None``: the distillation loss.
    """

    name: str
    distill: str
    headline: str
    decisions: Callable[[torch.Tensor], torch.Tensor] | None = None
    centred: bool = False
    labelled: bool = False
    score: Scorer | None = None
    dead: Callable[[Fidelity], bool] | None = None
    monitor: Callable[[torch.Tensor, torch.Tensor], float] | None = None


_KINDS: Registry[OutputKind] = Registry("output kind", "An")


def register_output_kind(kind: OutputKind) -> OutputKind:
    """Register an output kind (its name becomes an ``--output-kind`` value).

    Raises:
        ConfigError: The name is taken, or the headline is not a :class:`Fidelity` figure.
    """
    figures = {f.name for f in fields(Fidelity)} - {"kind", "n"}
    if kind.headline not in figures:
        raise ConfigError(
            f"Output kind {kind.name!r}: headline {kind.headline!r} is not one of "
            f"{', '.join(sorted(figures))}."
        )
    return _KINDS.add(kind.name, kind)


def _top1(out: torch.Tensor) -> torch.Tensor:
    return out.argmax(-1)


def _threshold(out: torch.Tensor) -> torch.Tensor:
    return (out > 0.5).long().reshape(out.shape[0], -1).squeeze(-1)


def _ctc_score(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    return {"decode_agreement": decode_agreement(student, teacher)}


def _ctc_dead(fid: Fidelity) -> bool:
    # Nothing of the teacher's decodes survives: an all-blank student scores 78% per-frame
    # agreement on a text-line model (most frames are blank) and a varied spread.
    return fid.decode_agreement is not None and fid.decode_agreement <= 0.0


def _ctc_monitor(student: torch.Tensor, teacher: torch.Tensor) -> float:
    # The decodes, not the per-frame KL: the KL kept falling while a student turned all blank.
    return 1.0 - decode_agreement(student, teacher)


def kind_monitor(kind: str) -> Callable[[torch.Tensor, torch.Tensor], float] | None:
    """The registered kind's own best-state measure, if it has one (see :class:`OutputKind`)."""
    return _KINDS[kind].monitor


for _kind in (
    OutputKind("logits", "kl", "agreement", _top1, centred=True, labelled=True),
    OutputKind("probability", "bce", "agreement", _threshold, labelled=True),
    OutputKind("embedding", "cosine", "cosine"),
    OutputKind("regression", "mse", "correlation"),
    # A CTC frame is a class decision (per-frame agreement); the headline is the decodes'.
    OutputKind(
        "ctc",
        "kl",
        "decode_agreement",
        _top1,
        centred=True,
        score=_ctc_score,
        dead=_ctc_dead,
        monitor=_ctc_monitor,
    ),
):
    register_output_kind(_kind)


@torch.no_grad()
def measure_fidelity(
    student: torch.Tensor, teacher: torch.Tensor, kind: str, labels: torch.Tensor | None = None
) -> Fidelity:
    """Compare student and teacher outputs (dim 0 = examples).

    Args:
        student: Student outputs.
        teacher: Teacher outputs of the same shape.
        kind: A registered output kind (:func:`register_output_kind`).
        labels: Optional labels (class indices for logits, 0/1 for probabilities).
    """
    check_kind(kind)
    if student.shape != teacher.shape:
        raise ConfigError(
            f"Student output {tuple(student.shape)} and teacher output "
            f"{tuple(teacher.shape)} differ in shape."
        )
    spec = _KINDS[kind]
    s, t = student.detach().double(), teacher.detach().double()
    if spec.centred:
        # Scores defined up to a constant per example (softmax ignores it) are compared
        # centred, so a shifted but otherwise identical student scores correlation 1.
        sf = (s - s.mean(-1, keepdim=True)).reshape(-1)
        tf = (t - t.mean(-1, keepdim=True)).reshape(-1)
    else:
        sf, tf = s.reshape(-1), t.reshape(-1)
    sc, tc = sf - sf.mean(), tf - tf.mean()
    denom = float(sc.norm() * tc.norm())
    correlation = float(sc @ tc) / denom if denom > 0 else 0.0
    relative_error = float((sf - tf).norm() / tf.norm().clamp_min(1e-30))
    # Spread across inputs: std over dim 0 per output unit, averaged over units.
    t_spread = (
        float(t.reshape(t.shape[0], -1).std(0, unbiased=False).mean()) if t.shape[0] > 1 else 0.0
    )
    s_spread = (
        float(s.reshape(s.shape[0], -1).std(0, unbiased=False).mean()) if s.shape[0] > 1 else 0.0
    )
    spread = s_spread / t_spread if t_spread > 0 else (1.0 if s_spread == 0 else math.inf)
    agreement = cosine = accuracy = teacher_accuracy = None
    if spec.decisions is not None:
        pred, truth = spec.decisions(s), spec.decisions(t)
        agreement = float((pred == truth).double().mean())
        if labels is not None and labels.numel() > 0 and spec.labelled:
            if pred.shape != labels.shape:
                raise ConfigError(
                    f"Labels of shape {tuple(labels.shape)} do not match the "
                    f"model's decisions {tuple(pred.shape)}."
                )
            gold = labels.to(pred.dtype)
            accuracy = float((pred == gold).double().mean())
            teacher_accuracy = float((truth == gold).double().mean())
    if kind == "embedding" or (s.ndim >= 2 and s.shape[-1] >= 2):
        cosine = float(F.cosine_similarity(s, t, dim=-1).mean())
    extra = spec.score(s, t) if spec.score is not None else {}
    return Fidelity(
        kind,
        int(s.shape[0]),
        agreement,
        cosine,
        correlation,
        relative_error,
        accuracy,
        teacher_accuracy,
        spread,
        **extra,
    )
