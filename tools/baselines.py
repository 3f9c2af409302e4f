"""Classical compression baselines to compare Quantum-Train against at an equal parameter budget.

* :func:`lowrank_factorize`: truncated-SVD factorisation of every ``Linear``/``Conv2d`` weight,
  ranks chosen greedily so that the model's trainable parameters fit a budget.
* :func:`magnitude_prune`: keep the largest-magnitude weights of every ``Linear``/``Conv2d``
  layer (the same fraction in each layer) so that the nonzero trainable parameters fit a budget.
* :func:`random_features_control`: a QT generator whose mapping network is fed a fixed random
  vector instead of the QNN's probabilities (the QNN is cut off and frozen).
* :func:`rounded`: a copy with every parameter rounded to int8 (per tensor) or float16: the
  reference a free-running measurement is read against (how much a stream amplifies a tiny
  weight error).
* :func:`distill_finetune`: the same distillation loss, mini-batch order and learning-rate
  schedule as :meth:`qtcompress.api.QTModel.finetune`, for a plain ``nn.Module``.

Biases and BatchNorm affine parameters stay trainable in the baselines and count towards the
budget, as every generated parameter counts for QT.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from qtcompress.api import QTModel
from qtcompress.data.batch import batch_indices
from qtcompress.errors import ConfigError
from qtcompress.train.loop import LoopConfig
from qtcompress.train.objectives import distill_loss

Factorisable = nn.Linear | nn.Conv2d


def trainable_count(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> int:
    """Trainable parameters of ``model``; masked parameters count only their kept entries."""
    masks = masks or {}
    total = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            total += int(masks[name].sum()) if name in masks else p.numel()
    return total


def _factorisable(model: nn.Module) -> list[tuple[str, Factorisable]]:
    """``Linear`` and ungrouped ``Conv2d`` layers, in module order."""
    out: list[tuple[str, Factorisable]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1):
            out.append((name, mod))
    return out


def _matrix(mod: Factorisable) -> torch.Tensor:
    w = mod.weight.detach()
    return w.reshape(w.shape[0], -1).double()  # (out, in * kh * kw)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _factor_layer(mod: Factorisable, rank: int) -> nn.Module:
    """Replace ``mod`` by two layers initialised from its rank-``rank`` truncated SVD."""
    u, s, vh = torch.linalg.svd(_matrix(mod), full_matrices=False)
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]).float()  # (r, in)
    b = (u[:, :rank] * root[None, :]).float()  # (out, r)
    bias = mod.bias is not None
    first: nn.Module
    second: nn.Module
    if isinstance(mod, nn.Linear):
        first = nn.Linear(mod.in_features, rank, bias=False)
        second = nn.Linear(rank, mod.out_features, bias=bias)
        first.weight.data.copy_(a)
        second.weight.data.copy_(b)
    else:
        assert isinstance(mod, nn.Conv2d)
        # torch types these attributes as tuple[int, ...]; they are 2-tuples for Conv2d.
        first = nn.Conv2d(
            mod.in_channels,
            rank,
            mod.kernel_size,  # type: ignore[arg-type]
            stride=mod.stride,
            padding=mod.padding,  # type: ignore[arg-type]
            dilation=mod.dilation,
            bias=False,  # type: ignore[arg-type]
            padding_mode=mod.padding_mode,
        )
        second = nn.Conv2d(rank, mod.out_channels, 1, bias=bias)
        first.weight.data.copy_(a.reshape(rank, *mod.weight.shape[1:]))
        second.weight.data.copy_(b.reshape(mod.out_channels, rank, 1, 1))
    if mod.bias is not None and second.bias is not None:
        second.bias.data.copy_(mod.bias.detach())
    return nn.Sequential(first, second)


def lowrank_factorize(model: nn.Module, budget: int) -> tuple[nn.Module, dict[str, int]]:
    """A copy of ``model`` with each ``Linear``/``Conv2d`` weight replaced by an SVD factorisation.

    Ranks start at 1 and grow greedily: each step adds one rank to the layer that gains the
    largest share of its own squared Frobenius norm per added parameter, while the model's total
    trainable parameters (factors + biases + every other parameter, e.g. BatchNorm) stay within
    ``budget``. A layer whose factors would cost at least its dense weight is kept dense.

    Args:
        model: The pretrained model (not modified).
        budget: Maximum trainable parameters of the result.

    Returns:
        ``(factorised model, {layer name: rank})``; a dense layer reports its full rank.

    Raises:
        ConfigError: Even rank 1 everywhere exceeds ``budget``.
    """
    layers = _factorisable(model)
    fixed = trainable_count(model) - sum(m.weight.numel() for _, m in layers)
    info: list[tuple[str, Factorisable, int, int, torch.Tensor]] = []
    for name, mod in layers:
        mat = _matrix(mod)
        s2 = torch.linalg.svdvals(mat) ** 2
        info.append((name, mod, mat.shape[0], mat.shape[1], s2 / s2.sum().clamp_min(1e-30)))

    def cost(i: int, r: int) -> int:
        _, _, out, inp, s2 = info[i]
        return out * inp if r >= len(s2) or r * (out + inp) >= out * inp else r * (out + inp)

    ranks = [1] * len(info)
    used = fixed + sum(cost(i, 1) for i in range(len(info)))
    if used > budget:
        raise ConfigError(
            f"Rank 1 in every layer needs {used} parameters, over the budget {budget}."
        )
    while True:
        best, best_gain = -1, 0.0
        for i, (_, _, _, _, s2) in enumerate(info):
            r = ranks[i]
            if r >= len(s2):
                continue
            extra = cost(i, r + 1) - cost(i, r)
            if used + extra > budget:
                continue
            gain = float(s2[r]) / max(extra, 1)
            if best < 0 or gain > best_gain:
                best, best_gain = i, gain
        if best < 0:
            break
        used += cost(best, ranks[best] + 1) - cost(best, ranks[best])
        ranks[best] += 1
    out = copy.deepcopy(model)
    chosen: dict[str, int] = {}
    for i, (name, mod, o, inp, s2) in enumerate(info):
        dense = cost(i, ranks[i]) == o * inp
        chosen[name] = len(s2) if dense else ranks[i]
        if not dense:
            _set_submodule(out, name, _factor_layer(mod, ranks[i]))
    return out, chosen


def magnitude_prune(model: nn.Module, budget: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``model`` with its smallest-magnitude ``Linear``/``Conv2d`` weights set to zero.

    Every such layer keeps the same fraction of its weights (largest magnitude first, at least
    one each), so that the kept weights plus all other trainable parameters (biases, BatchNorm)
    equal ``budget``.

    Args:
        model: The pretrained model (not modified).
        budget: Trainable nonzero parameters of the result.

    Returns:
        ``(pruned model, {parameter name: bool keep-mask})``; keep the masks fixed while
        fine-tuning (see :func:`distill_finetune`).

    Raises:
        ConfigError: The budget cannot cover the unpruned parameters plus one weight per layer.
    """
    out = copy.deepcopy(model)
    layers = _factorisable(out)
    weights = sum(m.weight.numel() for _, m in layers)
    keep_total = budget - (trainable_count(out) - weights)
    if keep_total < len(layers):
        raise ConfigError(f"Budget {budget} leaves {keep_total} weights for {len(layers)} layers.")
    frac = min(1.0, keep_total / weights)
    masks: dict[str, torch.Tensor] = {}
    for name, mod in layers:
        w = mod.weight.detach()
        k = max(1, int(round(frac * w.numel())))
        thresh = w.abs().flatten().kthvalue(w.numel() - k + 1).values if k < w.numel() else -1.0
        mask = w.abs() >= thresh
        # Ties could keep a few more than k: drop the surplus deterministically.
        if int(mask.sum()) > k:
            idx = mask.flatten().nonzero().flatten()[k:]
            mask.view(-1)[idx] = False
        masks[f"{name}.weight" if name else "weight"] = mask
        mod.weight.data.mul_(mask)
    return out, masks


def rounded(model: nn.Module, kind: str) -> nn.Module:
    """A copy with every parameter rounded: ``int8`` (symmetric, per tensor) or ``float16``."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if kind == "float16":
                p.copy_(p.half().float())
            else:
                scale = p.abs().max().clamp_min(1e-12) / 127
                p.copy_(torch.round(p / scale).clamp(-127, 127) * scale)
    return out


def random_features_control(qt: QTModel, seed: int = 0) -> QTModel:
    """Cut the QNN off a :class:`QTModel`: the mapping sees a fixed random vector instead.

    The vector is ``Exp(1) - 1`` per basis state, the distribution of the ``"scaled"``
    probability transform for a Haar-random state; it never changes. The QNN angles are frozen,
    so they are not trained and not counted by ``qt.report()``. Modifies ``qt`` in place.

    Args:
        qt: A freshly built QT model (before any fitting).
        seed: Seeds the random vector.

    Returns:
        ``qt``.
    """
    gen = qt.generator
    g = torch.Generator().manual_seed(seed)
    fixed = torch.empty(gen.n_states).exponential_(1.0, generator=g) - 1.0
    for p in gen.qnn.parameters():
        p.requires_grad_(False)
    gen.features = lambda: fixed  # type: ignore[method-assign]
    return qt


def distill_finetune(
    student: nn.Module,
    teacher: nn.Module,
    inputs: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    temperature: float = 2.0,
    masks: dict[str, torch.Tensor] | None = None,
    eval_every: int = 10,
) -> nn.Module:
    """Fine-tune ``student`` to match ``teacher`` as :meth:`QTModel.finetune` does (distill mode).

    Same loss (temperature-softened KL), mini-batches
    (:func:`~qtcompress.data.batch.batch_indices`), Adam with the default warm-up-free cosine
    schedule of :class:`~qtcompress.train.loop.LoopConfig`,
    BatchNorm in batch-statistics mode, and the same best-state rule (lowest exponential moving
    average of the loss, checked every ``eval_every`` steps, restored at the end).

    Args:
        student: Trained in place (its trainable parameters).
        teacher: The pretrained model (run in eval mode, not trained).
        inputs: ``(N, ...)`` training inputs.
        steps: Optimisation steps (one mini-batch each).
        lr: Peak learning rate.
        batch_size: Mini-batch size.
        seed: Seeds the mini-batch order.
        temperature: KL temperature.
        masks: ``{parameter name: bool mask}``; masked-out entries stay zero.
        eval_every: Steps between best-state checks.

    Returns:
        ``student`` in eval mode.
    """
    cfg = LoopConfig(steps=steps, lr=lr, seed=seed)
    masks = masks or {}
    named = {n: p for n, p in student.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(list(named.values()), lr=lr)
    teacher.eval()
    n = inputs.shape[0]
    best, ema, best_state = math.inf, None, None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        student.train()
        x = inputs[batch_indices(step, n, batch_size, seed)]
        with torch.no_grad():
            t_out = teacher(x)
        loss = distill_loss(student(x), t_out, "kl", temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, m in masks.items():
            grad = named[name].grad
            if grad is not None:
                grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for name, m in masks.items():
                named[name].mul_(m)
        value = float(loss.detach())
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            if ema < best * (1.0 - 1e-4) or best == math.inf:
                best = ema
                best_state = copy.deepcopy(student.state_dict())
    if best_state is not None:
        student.load_state_dict(best_state)
    return student.eval()


__all__ = [
    "distill_finetune",
    "lowrank_factorize",
    "magnitude_prune",
    "random_features_control",
    "trainable_count",
]
