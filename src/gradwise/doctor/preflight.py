"""Preflight: check a model and its data before any compute is spent on training.

    report = gradwise.doctor.check(model, train_data, val_data)
    print(report)

Runs the data rules (GW101-GW105) on the whole data (a bounded sample of very large sets), the
model rules (GW201, GW204-GW206, GW211, GW213-GW215: the batch-axis and stochastic-evaluation
probes among them) on a probe batch, through the same dispatch as the live Doctor; checks that the
optimizer holds every trainable parameter (GW207), tries to overfit one batch (GW402 when it
cannot) and runs a learning-rate range test, judged against the planned learning rate. The user's model, optimizer and global RNG state are never modified: every forward pass and
every training step runs on a private copy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import gradwise.doctor.rules  # noqa: F401  (registers every rule, the lead's GW207/GW402 included)
from gradwise.doctor import dispatch, probes
from gradwise.doctor.findings import RULES, Finding, Rule, When, check_codes, sort_findings
from gradwise.doctor.lr_finder import (
    LRComparison,
    LRRangeResult,
    batch_at,
    forward,
    lr_range_test,
    model_device,
    peak_lr,
    private_copy,
    to_dataset,
    to_device,
)
from gradwise.doctor.rules import data as data_rules
from gradwise.doctor.rules import model as model_rules
from gradwise.errors import DataError

# ---------------------------------------------------------------------------- thresholds and budgets

MAX_TENSOR_SAMPLES = 100_000
"""Samples read from in-memory data (TensorDataset and the like) for the data rules; larger sets
are subsampled (fixed seed). Hashing 100k samples for GW104 takes well under a second."""
MAX_LOADED_SAMPLES = 5_000
"""Samples read one by one from other Datasets (files on disk, transforms): a bounded sample."""
MAX_STAT_ELEMENTS = 20_000_000
"""Values of the inputs that GW102's per-feature statistics read at most (rows are subsampled)."""
OVERFIT_STEPS = 200
"""Step budget of the overfit-one-batch test with one target per sample (Karpathy 2019: a healthy
set-up memorises one batch quickly). Measured with gradwise's zoo and examples: real labels take
2-60 steps (MLP, CNN, ResNet, LSTM and Transformer classifiers, regression), while a 32-unit MLP
needs 280-390 steps to memorise 32 labels shuffled against their inputs, so the budget also
catches misaligned labels when the model is small relative to the batch."""
OVERFIT_SEQUENCE_STEPS = 400
"""Step budget when each sample has a sequence of class targets (tokens): a language model must
learn to use positions and context before it can memorise, and the character-level GPT example
takes 100-200 steps on 8 windows of 128 characters (memorising shuffled tokens is as fast, so no
budget could catch them)."""
OVERFIT_MAX_TARGETS = 1024
"""The overfit batch holds at most this many target values (e.g. 8 windows of 128 tokens): the
test is about whether the model can fit at all, and a full batch of long sequences only makes
it slower."""
OVERFIT_LR = 3e-3
"""Adam learning rate of the test: fast enough to memorise real labels in tens of steps, slow
enough that a small model cannot memorise labels shuffled against their inputs in the budget."""
OVERFIT_RELATIVE = 0.05
"""Pass when the loss falls below this fraction of its initial value ..."""
OVERFIT_FLOOR = 0.02
"""... or below this absolute value (cross-entropy in nats, or MSE on standardised targets), for
losses that start out already small."""
PROBE_SEED = 0
"""Seed of the probe batch's sample indices and of the private copies' training."""


@dataclass
class OverfitResult:
    """The overfit-one-batch test: did the loss on one batch go (close) to zero?"""

    passed: bool
    steps: int
    initial_loss: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    target: float = math.nan
    lr: float = OVERFIT_LR
    batch_size: int = 0
    error: str | None = None  # why the test could not train (a detached graph, a NaN loss)

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        detail = f" ({self.error})" if self.error else ""
        return (
            f"overfit one batch of {self.batch_size}: {verdict}{detail}, loss "
            f"{self.initial_loss:.4g} -> {self.final_loss:.4g} in {self.steps} steps "
            f"(target {self.target:.3g})"
        )


@dataclass
class CheckReport:
    """What :func:`check` found: findings (errors first), the overfit test, the lr range test and
    the planned learning rate judged against it (None without a planned rate or a range test)."""

    findings: list[Finding]
    overfit: OverfitResult | None
    lr_range: LRRangeResult | None
    lr_comparison: LRComparison | None = None

    @property
    def ok(self) -> bool:
        """No errors and no warnings, and the overfit test (when run) passed."""
        return not any(f.severity in ("error", "warning") for f in self.findings) and (
            self.overfit is None or self.overfit.passed
        )

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def __str__(self) -> str:
        errors = sum(f.severity == "error" for f in self.findings)
        warnings = sum(f.severity == "warning" for f in self.findings)
        infos = len(self.findings) - errors - warnings
        lr = self.lr_comparison
        clean = not self.findings and not (lr is not None and lr.problem)  # GW305 ignored
        head = "gradwise check: " + (
            "no problems found"
            if clean
            else f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
            + (f", {infos} info" if infos else "")
        )
        lines = [head]
        for f in self.findings:
            lines.append(f"  {f.code} {f.name} ({f.severity}): {f.message}")
            if f.fixes:
                lines.append(f"      fix: {f.fixes[0]}")
        if self.overfit is not None:
            lines.append(f"  {self.overfit}")
        if self.lr_range is not None:
            lines.append(f"  {self.lr_range}")
        if lr is not None and lr.code not in self.codes:  # a finding already says it
            lines.append(f"  {lr}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- data access


def _subsample(n: int, limit: int) -> torch.Tensor | None:
    if n <= limit:
        return None
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randperm(n, generator=generator)[:limit].sort().values


def _materialise(dataset: Dataset) -> tuple[Any, Any, bool]:
    """(inputs, targets, complete) of a data set as tensors, bounded; (None, None, False) when the
    samples cannot be stacked (dict inputs, ragged shapes)."""
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
        x, y = tensors[0], tensors[-1]
        pick = _subsample(len(x), MAX_TENSOR_SAMPLES)
        return (x, y, True) if pick is None else (x[pick], y[pick], False)
    base = getattr(dataset, "dataset", None)
    indices = getattr(dataset, "indices", None)
    base_tensors = getattr(base, "tensors", None)
    if isinstance(base_tensors, (tuple, list)) and len(base_tensors) >= 2 and indices is not None:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        pick = _subsample(len(idx), MAX_TENSOR_SAMPLES)
        idx = idx if pick is None else idx[pick]
        return base_tensors[0][idx], base_tensors[-1][idx], pick is None
    n = len(dataset)
    pick = _subsample(n, MAX_LOADED_SAMPLES)
    idx = torch.arange(n) if pick is None else pick
    try:
        x, y = batch_at(dataset, idx)
    except (TypeError, RuntimeError, ValueError, IndexError):
        return None, None, False
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        return None, None, False
    return x, y, pick is None


def _stat_rows(x: torch.Tensor) -> torch.Tensor:
    """A row subsample of ``x`` with at most MAX_STAT_ELEMENTS values."""
    per_row = max(1, x[0].numel()) if len(x) else 1
    limit = max(2, MAX_STAT_ELEMENTS // per_row)
    pick = _subsample(len(x), limit)
    return x if pick is None else x[pick]


def _standardised(x: torch.Tensor) -> torch.Tensor:
    """``x`` standardised per feature (last axis) or per channel (images), for measuring the
    initialisation's scale independently of the data's (GW204 when GW102 fired)."""
    dims = [0, *range(2, x.ndim)] if x.ndim >= 4 else list(range(x.ndim - 1))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True).clamp(min=1e-8)
    return (x - mean) / std


# ---------------------------------------------------------------------------- the overfit test


def _quiet_stochastic(model: nn.Module) -> None:
    """Dropout and stochastic depth off (eval mode) in ``model``; normalisation stays in training."""
    from gradwise.nn import DropPath

    for m in model.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, DropPath)):
            m.eval()


def _overfit_batch(inputs: Any, targets: Any) -> tuple[Any, Any, int]:
    """The overfit test's batch (at most OVERFIT_MAX_TARGETS target values) and its step budget."""
    if not isinstance(targets, torch.Tensor) or targets.ndim < 2 or targets.is_floating_point():
        return inputs, targets, OVERFIT_STEPS
    per_sample = max(1, targets[0].numel())
    keep = max(1, min(len(targets), OVERFIT_MAX_TARGETS // per_sample))
    if isinstance(inputs, torch.Tensor):
        inputs = inputs[:keep]
    return inputs, targets[:keep], OVERFIT_SEQUENCE_STEPS


def overfit_one_batch(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    steps: int = OVERFIT_STEPS,
    lr: float = OVERFIT_LR,
    seed: int = PROBE_SEED,
) -> OverfitResult:
    """Train a private copy of ``model`` on one batch with Adam until the loss is close to zero.

    Passes when the loss falls below ``max(OVERFIT_RELATIVE * initial, OVERFIT_FLOOR)`` within
    ``steps`` steps (Karpathy 2019, 'A Recipe for Training Neural Networks': overfit one batch).
    Dropout is off in the copy. A loss that has no gradient (a graph cut by ``.detach()`` or
    ``.data``) or becomes non-finite fails the test with the reason in ``error``.
    """
    device = model_device(model)
    cuda = [device.index or 0] if device.type == "cuda" else []
    batch = len(targets) if hasattr(targets, "__len__") else 0
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        clone = private_copy(model)
        clone.train()
        _quiet_stochastic(clone)
        params = [p for p in clone.parameters() if p.requires_grad]
        if not params:
            return OverfitResult(
                False, 0, math.nan, math.nan, [], math.nan, lr, batch, "no trainable parameters"
            )
        opt = torch.optim.Adam(params, lr=lr)
        losses: list[float] = []
        target = math.nan
        error = None
        for step in range(steps + 1):
            loss = loss_fn(forward(clone, inputs), targets)
            value = float(loss.detach())
            losses.append(value)
            if not math.isfinite(value):
                error = "the loss became non-finite"
                break
            if step == 0:
                target = max(OVERFIT_RELATIVE * value, OVERFIT_FLOOR)
            if value <= target:
                return OverfitResult(True, step, losses[0], value, losses, target, lr, batch)
            if step == steps:
                break
            if not loss.requires_grad:
                error = "the loss has no gradient: the graph is cut (.detach(), .data, no_grad)"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return OverfitResult(
        False, len(losses) - 1, losses[0], losses[-1], losses, target, lr, batch, error
    )


def _overfit_finding(result: OverfitResult) -> Finding:
    best = min((v for v in result.losses if math.isfinite(v)), default=math.nan)
    hints = [
        "are the labels aligned with the inputs (shuffled separately, or sorted differently)?",
        "is the loss the right one for the task and the model's outputs?",
        "is part of the graph cut (.detach(), .data, torch.no_grad(), integer casts)?",
        "is the model too small, or does its output layer squash (softmax/sigmoid into a logits loss)?",
    ]
    why = f" ({result.error})" if result.error else ""
    message = (
        f"the model cannot overfit one batch of {result.batch_size} samples{why}: in "
        f"{result.steps} steps of Adam (lr {result.lr:g}) the loss went from "
        f"{result.initial_loss:.4g} to {result.final_loss:.4g} (best {best:.4g}; target "
        f"{result.target:.3g}). Check: " + " ".join(hints)
    )
    return _finding(
        "GW402",
        message,
        {
            "initial_loss": result.initial_loss,
            "final_loss": result.final_loss,
            "best_loss": best,
            "target_loss": result.target,
            "steps": result.steps,
            "batch_size": result.batch_size,
            "lr": result.lr,
        },
    )


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _loss_value(loss: Callable, outputs: torch.Tensor | None, targets: Any) -> float | None:
    """The training loss on the probe batch, for rules that confirm what the loss computes."""
    if outputs is None or not isinstance(targets, torch.Tensor):
        return None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns of the broadcasting GW215 looks for
            return float(loss(outputs, targets))
    except Exception:  # a loss that cannot take them: GW105/GW205 or the overfit test say why
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


CRASHED = "the training step raised an error"


def _crashed(result: OverfitResult) -> bool:
    return bool(result.error) and result.error.startswith(CRASHED)


# ---------------------------------------------------------------------------- findings


_FALLBACK = {  # only used if the rule modules that own these codes are not importable
    "GW207": ("params-without-gradients", "warning"),
    "GW402": ("underfitting", "error"),
}


def _finding(code: str, message: str, evidence: dict[str, float]) -> Finding:
    if code in RULES:
        return RULES[code].finding(0, message, evidence)
    name, severity = _FALLBACK[code]
    return Finding(code, name, severity, 0, message, {k: float(v) for k, v in evidence.items()})


def _missing_from_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> Finding | None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [(n, p) for n, p in trainable if id(p) not in held]
    if not missing:
        return None
    numel = sum(p.numel() for _, p in missing)
    total = sum(p.numel() for _, p in trainable)
    names = ", ".join(n for n, _ in missing[:5]) + (" ..." if len(missing) > 5 else "")
    return _finding(
        "GW207",
        f"{len(missing)} of {len(trainable)} trainable parameters ({numel} of {total} values) are "
        f"not in the optimizer and will never change: {names}",
        {
            "not_in_optimizer": len(missing),
            "trainable": len(trainable),
            "values_not_in_optimizer": numel,
            "fraction_not_in_optimizer": numel / max(total, 1),
        },
    )


# ---------------------------------------------------------------------------- check


def check(
    model: nn.Module,
    train_data: Any,
    val_data: Any = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    task: str | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    batch_size: int | None = 32,
    overfit: bool = True,
    lr_range: bool = True,
    plot: str | Path | None = None,
    ignore: Iterable[str] = (),
    lr: float | None = None,
) -> CheckReport:
    """Check ``model`` and its data before training; returns a :class:`CheckReport`.

    train_data / val_data: a Dataset, a DataLoader (its dataset is checked) or ``(X, y)``.
    loss_fn: the training loss; None for the task's (as the Trainer chooses it). task: as for the
    Trainer (binary, multiclass, multilabel, regression, lm, classification or None/auto: settled
    by the targets). optimizer: the optimizer that will train the model (GW207, and the range test
    copies its class and hyperparameters); None for gradwise's AdamW. batch_size: the training
    batch size (GW206, the probe and overfit batch, the range test); None takes a DataLoader's.
    plot: where to save the range test's curve (PNG). ignore: rule codes not to report.
    lr: the (peak) learning rate training will use, judged against the range test (GW305 when it
    is above where the loss diverged or far above the suggestion); None takes the optimizer's.

    Nothing here modifies ``model`` (weights, buffers, training mode, requires_grad),
    ``optimizer`` or the global RNG state.
    """
    from gradwise.data import describe
    from gradwise.tasks import Task, num_outputs, resolve_kind

    ignored = set(check_codes(ignore)) if ignore else set()
    if batch_size is None:
        loader_bs = train_data.batch_size if isinstance(train_data, DataLoader) else None
        batch_size = loader_bs or 32
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if lr is not None and not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a positive finite learning rate (the run's peak); got {lr!r}")
    if lr is None and optimizer is not None and optimizer.param_groups:
        lr = peak_lr(optimizer.param_groups[0])
        lr = lr if 0 < lr < math.inf else None  # lr 0 (a frozen group): nothing to judge
    train_ds = to_dataset(train_data)
    val_ds = to_dataset(val_data) if val_data is not None else None
    info = describe(train_ds, name="train_data")
    kind = getattr(task, "kind", None) or resolve_kind(task or "auto", info)
    width = num_outputs(kind, info)
    task_obj = None
    if loss_fn is None:
        task_obj = task if hasattr(task, "loss") else Task(kind, width)
        loss = task_obj.loss
        kind_of_loss = model_rules.loss_kind(task_obj, kind)
    else:
        loss = loss_fn
        kind_of_loss = model_rules.loss_kind(loss_fn, kind)

    findings: dict[str, Finding] = {}

    def apply(code: str, result: Any) -> None:
        if result is None or code in ignored or code in findings:
            return
        message, evidence = result
        findings[code] = _finding(code, message, evidence)

    def failed(rule: Rule, exc: Exception) -> None:  # as in the live Doctor: info, never raised
        message = f"the {rule.code} check failed and was skipped ({type(exc).__name__}: {exc})"
        findings.setdefault(rule.code, Finding(rule.code, rule.name, "info", 0, message))

    def judge(when: When, context: dispatch.Context) -> None:
        dispatch.run(
            when,
            context,
            skip=ignored | set(findings),
            on_result=lambda rule, result: apply(rule.code, result),
            on_failure=failed,
        )

    def judge_one(check: Callable, *args: Any, prefix: str = "", **kwargs: Any) -> None:
        rule = check.rule  # a rule measured here by hand (GW101 on the validation split, GW103)
        if rule.code in ignored or rule.code in findings:
            return
        try:
            result = check(*args, **kwargs)
        except Exception as exc:
            failed(rule, exc)
            return
        if result is not None:
            apply(rule.code, (prefix + result[0], result[1]))

    device = model_device(model)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        # -- data rules on the whole data (bounded) ------------------------------------------
        x_all, y_all, _ = _materialise(train_ds)
        x_val, y_val, _ = _materialise(val_ds) if val_ds is not None else (None, None, False)
        if isinstance(x_all, torch.Tensor):
            judge("batch", dispatch.Context(step=0, inputs=x_all, targets=y_all))
            if x_val is not None:
                judge_one(data_rules.nonfinite_data, x_val, y_val, prefix="validation data: ")
            if kind in ("binary", "multiclass", "multilabel"):
                # only the classes present: absent ones are GW105's or describe()'s business
                weighted = data_rules.loss_is_weighted(loss)
                judge_one(data_rules.class_imbalance, y_all, weighted=weighted)
                if weighted and "GW103" in findings:
                    findings["GW103"].fixes = data_rules.imbalance_fixes(weighted=True)

        # -- a probe batch through a private copy of the model ------------------------------
        n = len(train_ds)
        generator = torch.Generator().manual_seed(PROBE_SEED)
        index = torch.randperm(n, generator=generator)[: min(batch_size, n)]
        xb, yb = batch_at(train_ds, index)
        xb, yb = to_device(xb, device), to_device(yb, device)
        clone = private_copy(model)
        try:
            outputs, final_op = model_rules.probe_forward(clone, xb)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            shape = tuple(xb.shape) if isinstance(xb, torch.Tensor) else type(xb).__name__
            raise DataError(
                f"the model cannot take the data: a batch of inputs with shape {shape} made the "
                f"model fail: {_first_line(exc)}"
            ) from None
        outputs = outputs if isinstance(outputs, torch.Tensor) else None
        # the rules of the first steps: on the whole data where they judge data (GW102, GW104,
        # and targets against the probe's outputs), else on the probe batch
        whole = isinstance(x_all, torch.Tensor)
        judge(
            "early",
            dispatch.Context(
                step=0,
                model=clone,
                inputs=_stat_rows(x_all) if whole else None,
                outputs=outputs,
                targets=y_all if isinstance(y_all, torch.Tensor) else yb,
                loss_kind=kind_of_loss,
                task=kind,
                final_op=final_op,
                batch_size=batch_size,
                train_inputs=x_all if whole else None,
                val_inputs=x_val if whole and isinstance(x_val, torch.Tensor) else None,
            ),
        )
        scale_inputs = xb
        if "GW102" in findings and isinstance(xb, torch.Tensor) and xb.is_floating_point():
            scale_inputs = _standardised(xb)  # measure the init, not the data's scale
        providers = {
            "activation_stds": lambda m=clone: model_rules.activation_stds(m, scale_inputs),
            "mixing": lambda m=clone: probes.batch_mixing(m, xb),
            "loss_value": lambda: _loss_value(loss, outputs, yb),
        }
        if not isinstance(scale_inputs, torch.Tensor):
            del providers["activation_stds"]
        judge(
            "first",
            dispatch.Context(
                providers,
                step=0,
                model=clone,
                inputs=xb if isinstance(xb, torch.Tensor) else None,
                outputs=outputs,
                targets=yb if isinstance(yb, torch.Tensor) else None,
                loss_kind=kind_of_loss,
                task=kind,
            ),
        )
        if outputs is not None:
            try:  # the stochastic-evaluation probe: a second eval pass must agree
                repeat = probes.repeat_forward(clone, lambda m=clone: _call(m, xb), outputs)
            except Exception as exc:
                failed(model_rules.stochastic_evaluation.rule, exc)
                repeat = None
            if repeat is not None:
                judge_one(model_rules.stochastic_evaluation, repeat)
            if task_obj is not None and isinstance(yb, torch.Tensor):
                try:  # the Trainer's own probe: outputs that cannot serve the task's loss
                    task_obj.check_fit(outputs, yb, info)
                except DataError:
                    if not any(f.severity == "error" for f in findings.values()):
                        raise
        if optimizer is not None and "GW207" not in ignored:
            missing = _missing_from_optimizer(model, optimizer)
            if missing is not None:
                findings["GW207"] = missing

        # -- overfit one batch ---------------------------------------------------------------
        # A loss that raises (labels out of range, a wrong dtype) is explained by the error
        # findings above; without one, the failure is itself the finding.
        explained = any(f.severity == "error" for f in findings.values())
        overfit_result = None
        if overfit:
            xo, yo, budget = _overfit_batch(xb, yb)
            try:
                overfit_result = overfit_one_batch(clone, xo, yo, loss, steps=budget)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                overfit_result = OverfitResult(
                    passed=False,
                    steps=0,
                    initial_loss=math.nan,
                    final_loss=math.nan,
                    target=math.nan,
                    batch_size=len(yo),
                    error=f"{CRASHED}: {_first_line(exc)}",
                )
            crashed = _crashed(overfit_result)
            if not overfit_result.passed and not (crashed and explained) and "GW402" not in ignored:
                findings.setdefault("GW402", _overfit_finding(overfit_result))
        del clone

        # -- learning-rate range test --------------------------------------------------------
        lr_result = None
        if lr_range and (overfit_result is None or not _crashed(overfit_result)):
            try:
                lr_result = lr_range_test(
                    model,
                    train_ds,
                    loss,
                    optimizer=optimizer if optimizer is not None else "adamw",
                    batch_size=batch_size,
                    seed=PROBE_SEED,
                )
            except (RuntimeError, ValueError, TypeError, IndexError):
                if not explained:
                    raise
            if lr_result is not None and plot is not None:
                lr_result.plot(plot)
        comparison = lr_result.compare(lr) if lr_result is not None and lr is not None else None
        if comparison is not None and comparison.code is not None:
            apply(comparison.code, (comparison.message, comparison.evidence))
            if comparison.code in findings:  # GW305 is an error only when the sweep diverged
                findings[comparison.code] = replace(
                    findings[comparison.code], severity=comparison.severity
                )
    return CheckReport(sort_findings(findings.values()), overfit_result, lr_result, comparison)


__all__ = ["CheckReport", "OverfitResult", "check", "overfit_one_batch"]
