"""Set-up faults: the loop, the model's structure and the optimizer (GW202, GW203, GW207-GW217)."""

from __future__ import annotations

import math
from typing import Any

import torch

from gradwise._format import percent
from gradwise.doctor.findings import rule
from gradwise.doctor.rules._types import Result

STALE_COSINE = 0.999
"""GW202: cosine between .grad and the gradient of this step's backward passes; 1.0 when zeroed."""
STALE_CHECKS = 2
"""GW202: consecutive checks that must show accumulation."""
NO_GRAD_STEPS = 20
"""GW207: steps after which a trainable parameter that never received a gradient is reported."""
BN_DRIFT = 1e-4
"""GW209: relative change of a frozen BatchNorm's running mean or variance between two sampled
steps above which it counts as moving (float rounding stays far below; one training-mode batch at
momentum 0.1 moves them by a tenth of the gap to the batch's statistics)."""
SYNC_RTOL = 1e-6
"""GW210: relative difference between two ranks' fingerprints of a tensor above which they differ
(replicas that DDP keeps in step are bitwise equal; this only forgives rounding in the last bits on
mixed hardware)."""


@rule(
    "GW202",
    "gradients-not-zeroed",
    "error",
    "live",
    explains=("GW301", "GW302", "GW305"),
    fixes=[
        "Call optimizer.zero_grad(set_to_none=True) once per optimizer step, before backward().",
        "If you accumulate gradients on purpose, declare it: Doctor(..., accumulation_steps=k) "
        "(the Trainer does this for train.accumulate), and divide the loss by k.",
    ],
    references=[
        "PyTorch FAQ: zero_grad, https://pytorch.org/docs/stable/generated/torch.optim.Optimizer.zero_grad.html"
    ],
)
def stale_gradients(cosines: list[float]) -> Result:
    """Gradients keep accumulating across steps: .grad still holds earlier steps' gradients.

    ## Why it matters
    backward() adds into .grad. Without zero_grad() every step applies the sum of all gradients so
    far, so updates grow and point in stale directions: training drifts or diverges.

    ## How it is detected
    A tensor hook on one weight records the gradient each backward pass computes; at
    ``doctor.step`` .grad is compared (by cosine, so clipping and loss scaling do not matter) with
    the sum of this step's backward passes. They differ when old gradients were not cleared.
    Under DDP, whose all-reduce replaces .grad with the mean over the ranks, the ranks exchange
    a fixed sample of their fresh gradients at each sampled step and .grad is compared with their
    mean; under FSDP2 (sharded gradients) the check is off.
    """
    recent = cosines[-STALE_CHECKS:]
    if len(recent) == STALE_CHECKS and max(recent) < STALE_COSINE:
        return (
            ".grad holds gradients from earlier steps: zero_grad() is not called between steps",
            {"cosine_to_fresh_gradient": recent[-1]},
        )
    return None


@rule(
    "GW203",
    "eval-in-train-mode",
    "warning",
    "live",
    when="manual",
    fixes=[
        "Call model.eval() before evaluating and model.train() before training again.",
        "Use torch.inference_mode() together with model.eval(): one turns off autograd, the other "
        "switches dropout and batch-norm behaviour.",
    ],
    references=[
        "PyTorch docs, Module.eval: https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.eval"
    ],
)
def eval_in_train_mode(modules: list[str]) -> Result:
    """The model ran without gradients (evaluation) while dropout or batch-norm were in training mode.

    ## Why it matters
    In training mode dropout zeroes random units and batch-norm normalises with the batch's own
    statistics (and updates its running averages with evaluation data): evaluation numbers are
    noisy and wrong, and the model is silently changed by the evaluation.

    ## How it is detected
    A forward pre-hook on the model sees forward passes under ``torch.no_grad()``/``inference_mode``
    while the model is in training mode and contains dropout or batch-norm layers.
    """
    if not modules:
        return None
    return (
        f"evaluation ran with {len(modules)} dropout/batch-norm layers in training mode (e.g. {modules[0]})",
        {"modules_in_training_mode": len(modules)},
    )


@rule(
    "GW207",
    "params-without-gradients",
    "warning",
    "live",
    when="manual",
    fixes=[
        "Parameters unfrozen but not in the optimizer: rebuild the optimizer over every parameter "
        "that will ever train (frozen ones have no gradient, so AdamW and SGD skip them until "
        "they are unfrozen), or call optimizer.add_param_group({'params': [...]}) when you "
        "unfreeze them; gradwise's Trainer puts every parameter in the optimizer from the start.",
        "Pass all trainable parameters to the optimizer (model.parameters()), including layers "
        "added after the optimizer was built.",
        "In the optimizer but never a gradient: remove layers that are never used in forward(), "
        "or freeze them (requires_grad_(False)).",
        "Look for .detach(), .data, torch.no_grad() or integer casts that cut the graph.",
    ],
    references=[
        "PyTorch docs, Autograd mechanics: https://pytorch.org/docs/stable/notes/autograd.html",
        "PyTorch docs, Optimizer.add_param_group: https://pytorch.org/docs/stable/generated/torch.optim.Optimizer.add_param_group.html",
    ],
)
def params_without_gradients(
    never: list[str], not_in_optimizer: list[str], total: int, optimizer_known: bool = False
) -> Result:
    """Trainable parameters never receive a gradient, or the optimizer does not update them.

    ## Why it matters
    Such parameters never change: a layer that is unused, cut from the graph by a detach, or
    forgotten when the optimizer was built silently keeps its initial random values. A classic
    case in fine-tuning: the optimizer is built over the trainable parameters only, and layers
    unfrozen later (gradual unfreezing) are then trainable but not in it, so they never update.

    ## How it is detected
    Trainable parameters (``requires_grad``) that belong to none of the optimizer's parameter
    groups, checked at the first step and whenever the set of trainable parameters changes
    (unfrozen but not in the optimizer); and, after the first steps, trainable parameters whose
    ``.grad`` has always been None (in the optimizer but never a gradient: unused or detached).
    See also ``gradwise explain freezing-layers`` and ``gradwise explain gradual-unfreezing``.
    """
    if not_in_optimizer:
        return (
            f"{len(not_in_optimizer)} parameters are unfrozen (requires_grad) but not in the "
            f"optimizer (e.g. {not_in_optimizer[0]}): they will never update; rebuild the "
            "optimizer or add a param group",
            {"not_in_optimizer": len(not_in_optimizer), "trainable": total},
        )
    if never:
        where = "are in the optimizer but " if optimizer_known else ""
        return (
            f"{len(never)} trainable parameters {where}never received a gradient "
            f"(e.g. {never[0]}): unused in forward() or cut from the graph",
            {"without_gradient": len(never), "trainable": total},
        )
    return None


@rule(
    "GW208",
    "frozen-by-mistake",
    "warning",
    "live",
    when="manual",
    fixes=[
        "Unfreeze what must learn: module.requires_grad_(True), above all a new head sized for "
        "your classes (in gradwise: finetune.unfreeze: [head] or the module's path).",
        'Freeze only what you mean to, by name: finetune.freeze: ["features.*"] in a recipe, or '
        "tell the doctor what you froze on purpose: Doctor(..., frozen_on_purpose=names).",
        "If nothing is trainable, check for a leftover requires_grad_(False) on the whole model "
        "(or a model loaded for inference) and count trainable parameters before training.",
    ],
    references=[
        "Yosinski et al. 2014, How transferable are features in deep neural networks?, arXiv:1411.1792",
        "PyTorch docs, Module.requires_grad_: https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.requires_grad_",
    ],
)
def frozen_by_mistake(
    total: int, trainable: int, output_layer: str | None, undeclared: list[str]
) -> Result:
    """Parameters that should train are frozen: all of them, the output layer, or undeclared parts.

    ## Why it matters
    A frozen parameter never changes. With every parameter frozen nothing trains (backward()
    fails or the loss stays where it started); with the output layer frozen, a new head keeps
    its random initialisation and the rest of the network must learn to serve random outputs;
    a module frozen by a stray ``requires_grad_(False)`` (a copied fine-tuning snippet, a model
    loaded for inference) silently trains less than intended.

    ## How it is detected
    When the Doctor is built, at the first step and whenever the set of trainable parameters
    changes: no parameter has ``requires_grad``; or the output layer (the last module with
    parameters to run in the forward pass) has all of its parameters frozen while others train
    (not reported for models with PEFT adapters, whose frozen head is by design, unless
    declared otherwise); or, when the caller declared ``frozen_on_purpose`` (parameter names,
    module paths or globs; gradwise's Trainer passes what the recipe's ``finetune`` section
    froze), frozen parameters outside it. See also ``gradwise explain freezing-layers``.
    """
    if total and not trainable:
        return (
            f"every one of the {total:,} parameters is frozen (requires_grad=False): nothing "
            "will train",
            {"trainable": 0, "total": total},
        )
    if output_layer is not None:
        return (
            f"the output layer {output_layer} is frozen while {trainable:,} other parameters "
            "train: it keeps its initial weights; unfreeze it",
            {"trainable": trainable, "total": total, "undeclared_frozen": len(undeclared)},
        )
    if undeclared:
        return (
            f"{len(undeclared)} parameters are frozen but not declared frozen on purpose "
            f"(e.g. {undeclared[0]}): they will not train",
            {"trainable": trainable, "total": total, "undeclared_frozen": len(undeclared)},
        )
    return None


@rule(
    "GW209",
    "frozen-batchnorm-drift",
    "warning",
    "live",
    when="manual",
    fixes=[
        "Keep BatchNorm layers of a frozen backbone in eval mode: gradwise does this with "
        "finetune.freeze_bn: true (the default); in your loop, call module.eval() on them after "
        "every model.train() (or override train() in your model).",
        "If the statistics should adapt to the new data (a large domain shift with big batches), "
        "unfreeze the BatchNorm parameters too and ignore this rule (doctor.ignore: [GW209]).",
    ],
    references=[
        "Ioffe & Szegedy 2015, Batch Normalization, arXiv:1502.03167 (running averages for inference)",
        "PyTorch docs, BatchNorm2d (running statistics are updated in training mode): https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm2d.html",
        "Kolesnikov et al. 2020, Big Transfer (BiT): General Visual Representation Learning, arXiv:1912.11370",
    ],
)
def frozen_batchnorm_drift(drifts: dict[str, float]) -> Result:
    """BatchNorm layers of a frozen backbone run in training mode: their running statistics drift.

    ## Why it matters
    Freezing a BatchNorm layer's weight and bias does not freeze its running mean and variance:
    those are buffers that every training-mode forward pass moves toward the current batch's
    statistics, and in training mode the layer also normalises with the batch's statistics
    instead of the pretrained ones. The "frozen" backbone changes, most with small batches and a
    shifted domain, and evaluation (which uses the drifted averages) disagrees with what the head
    was trained on.

    ## How it is detected
    At each sampled step, the running mean and variance of every BatchNorm whose affine
    parameters are all frozen are compared with their values at the previous sampled step;
    a relative change above ``BN_DRIFT`` means the layer ran in training mode in between. See
    also ``gradwise explain freezing-layers`` and ``gradwise explain batch-normalization``.
    """
    moved = {name: d for name, d in drifts.items() if d > BN_DRIFT}
    if not moved:
        return None
    worst = max(moved, key=moved.__getitem__)
    return (
        f"{len(moved)} BatchNorm layers with frozen weights run in training mode (e.g. {worst}): "
        f"their running statistics moved by {percent(moved[worst])} since the last sample; keep "
        "them in eval mode (finetune.freeze_bn: true, or module.eval())",
        {"drifting_layers": len(moved), "max_relative_drift": moved[worst]},
    )


@rule(
    "GW210",
    "ranks-out-of-sync",
    "error",
    "live",
    when="manual",
    fixes=[
        "Build the model identically on every rank: seed every rank with the same seed before "
        "creating it (not seed + rank), and wrap it in DDP before training (DDP broadcasts rank "
        "0's parameters and buffers when it is built).",
        "Change parameters only through DDP's backward and the optimizer: an in-place edit on "
        "one rank (under torch.no_grad(), .data, a rank-dependent re-initialisation, weight tying "
        "redone after wrapping) is never undone; do it on every rank, or before wrapping.",
        "Keep buffers in step: leave DistributedDataParallel(broadcast_buffers=True) (the "
        "default), or use SyncBatchNorm; a rank-dependent buffer (a mask, a cache) must be built "
        "from the same seed on every rank.",
        "Parameters used on some steps only: DistributedDataParallel(find_unused_parameters=True), "
        "or remove them; a parameter without a gradient on one rank is not averaged.",
        "Ranks at different steps: give every rank the same number of batches (DistributedSampler "
        "pads or drop_last=True), or use torch.distributed.algorithms.Join for uneven inputs.",
        "A non-finite loss on one rank only: look at that rank's shard of the data (gradwise "
        "explain GW101) and at non-deterministic or rank-dependent operations; with a NaN on one "
        "rank the all-reduced gradients are NaN everywhere.",
    ],
    references=[
        "PyTorch docs, DistributedDataParallel: https://pytorch.org/docs/stable/generated/torch.nn.parallel.DistributedDataParallel.html",
        "Li et al. 2020, PyTorch Distributed: Experiences on Accelerating Data Parallel Training, arXiv:2006.15704",
        "PyTorch docs, Join (uneven inputs): https://pytorch.org/docs/stable/distributed.algorithms.join.html",
    ],
)
def ranks_out_of_sync(
    steps: list[int],
    names: list[str] | None = None,
    fingerprints: list[list[float]] | None = None,
    loss_finite: list[bool] | None = None,
) -> Result:
    """The ranks of a data-parallel run disagree: different parameters, steps or a non-finite loss.

    ## Why it matters
    Data parallelism is only correct while every rank holds the same model: DDP averages the
    gradients but never compares the weights, so replicas that drift apart (a rank-dependent seed,
    a parameter changed on one rank outside DDP, a buffer that is not broadcast) keep training
    different models, silently; the checkpoint is rank 0's, and the others' work is partly lost.
    Ranks that call the training step a different number of times pair the wrong collectives and
    hang; a non-finite loss on one rank turns every rank's averaged gradient into NaN.

    ## How it is detected
    At every sampled step each rank sums a fixed sample of the entries of every parameter (and of
    every floating-point buffer other than BatchNorm's running statistics, which are per-rank by
    design without SyncBatchNorm) and their squares, in float64; the ranks exchange these
    fingerprints with their step counts and whether their losses were finite, and compare them with
    rank 0's. Parameters are compared when the model is wrapped in DDP, or when every rank held
    the same parameters at the first sampled step (the ranks are replicas); FSDP2's shards differ
    by design and are not compared. See also ``gradwise explain ddp`` and ``gradwise explain fsdp``.
    """
    world = len(steps)
    behind = [r for r in range(1, world) if steps[r] != steps[0]]
    if behind:
        r = behind[0]
        return (
            f"rank {r} is at step {steps[r]} while rank 0 is at step {steps[0]}: the ranks call "
            "the training step a different number of times (uneven data?)",
            {"rank": r, "step_difference": steps[r] - steps[0], "world_size": world},
        )
    if names and fingerprints:
        differ = _differing(names, fingerprints)
        if differ:
            r, index, gap = differ[0]
            which = (
                f"rank {r}" if len(differ) == 1 else "ranks " + ", ".join(str(d[0]) for d in differ)
            )
            verb = "holds" if len(differ) == 1 else "hold"
            return (
                f"{which} {verb} a different model from rank 0, first at {names[index]} (relative "
                f"difference {gap:.2g}): the replicas have drifted apart",
                {"rank": r, "ranks_out_of_sync": len(differ), "relative_difference": gap,
                 "world_size": world},
            )  # fmt: skip
    if loss_finite and not all(loss_finite) and any(loss_finite):
        bad = [r for r, ok in enumerate(loss_finite) if not ok]
        which = f"rank {bad[0]}" if len(bad) == 1 else "ranks " + ", ".join(map(str, bad))
        return (
            f"the loss is not finite on {which} while it is finite on the other ranks",
            {"rank": bad[0], "nonfinite_ranks": len(bad), "world_size": world},
        )
    return None


def _differing(names: list[str], fingerprints: list[list[float]]) -> list[tuple[int, int, float]]:
    """(rank, index of the first differing tensor, relative difference) for each rank whose
    fingerprints differ from rank 0's; a fingerprint is (entries, sum, sum of squares) per tensor."""
    ref = fingerprints[0]
    out = []
    for r, fp in enumerate(fingerprints[1:], 1):
        for i in range(len(names)):
            n, s0, q0 = ref[3 * i : 3 * i + 3]
            _, s1, q1 = fp[3 * i : 3 * i + 3]
            if _same(s0, s1) and _same(q0, q1):  # equal, or non-finite alike (both diverged)
                continue
            scale = max(math.sqrt(n * max(q0, q1)), 1e-30)  # bounds the sum of |x|
            gap = max(abs(s1 - s0) / scale, abs(q1 - q0) / max(q0, q1, 1e-30))
            if not gap <= SYNC_RTOL:  # NaN differs too
                out.append((r, i, gap))
                break
    return out


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


# ============================================================================ what the loop and the
# model's structure do to samples, state and gradients (GW211-GW217)

ELEMENTWISE_LOSSES = ("mse", "l1", "huber", "bce", "bce_logits")
"""Losses computed per element: their input and target must have the same shape."""
RESET_RATIO = 1e-3
"""GW216: |1 - ||.grad|| / ||this micro-batch's gradient||| below which .grad holds that gradient
alone (a sum over two or more micro-batches differs by far more, unless gradients cancel)."""
RESET_COSINE = 0.9999
"""GW216: ... and the cosine above which they point the same way."""
RESET_CHECKS = 2
"""GW216: micro-batches inside accumulation windows that must all show the reset."""


@rule(
    "GW211",
    "batch-axis-mixing",
    "error",
    "preflight",
    when="first",
    fixes=[
        "Recurrent layers: nn.LSTM/GRU/RNN expect (time, batch, features) unless built with "
        "batch_first=True; pass batch_first=True (or transpose the input) when your tensors are "
        "(batch, time, features).",
        "Softmax, normalisation and reductions: take them over the feature or class dimension "
        "(dim=-1 or dim=1), never over dim=0, the batch.",
        "If mixing is intended (BatchNorm in training mode, contrastive losses, attention across "
        "a set), ignore this rule: doctor.ignore: [GW211].",
    ],
    references=[
        "PyTorch docs, nn.LSTM (batch_first: 'If True, then the input and output tensors are "
        "provided as (batch, seq, feature)'): https://pytorch.org/docs/stable/generated/torch.nn.LSTM.html",
        "Karpathy 2019, A Recipe for Training Neural Networks ('use backprop to chart "
        "dependencies': a sample's gradient must not touch other samples)",
    ],
)
def batch_axis_mixing(mixing: dict[str, float]) -> Result:
    """Samples mix across the batch axis: one sample's output depends on the others in its batch.

    ## Why it matters
    A model must compute each sample's prediction from that sample alone (in evaluation mode).
    When the batch axis is mixed, by a recurrent layer that takes the batch for time or a softmax
    over dim 0, every prediction depends on which other samples share its batch: training learns
    from the wrong dependencies, and predictions change with the batch size and order, so a model
    that looked fine in training is wrong one sample at a time.

    ## How it is detected
    A probe at the first step (and in ``gradwise check``): in eval mode and without gradients, the
    model runs on up to 16 rows of the batch, on the same rows permuted, and on their first half;
    each sample's output must be the same in all three, up to rounding.
    """
    tolerance = mixing["tolerance"]
    moved = max(mixing["permuted"], mixing["halved"])
    if moved <= tolerance:
        return None
    how = "permuted" if mixing["permuted"] >= mixing["halved"] else "halved"
    return (
        f"each sample's output changes when the batch is {how} (by {moved:.2g} of the outputs' "
        f"scale; rounding is below {tolerance:.0e}): samples mix across the batch axis; look for "
        "an RNN without batch_first=True, or a softmax/normalisation over dim 0",
        {"permuted_change": mixing["permuted"], "halved_change": mixing["halved"]},
    )


@rule(
    "GW212",
    "stateful-module-reused",
    "warning",
    "live",
    when="first",
    fixes=[
        "Give every position its own normalisation layer: self.bn1, self.bn2, ... (or a "
        "ModuleList), instead of calling one BatchNorm module at several depths.",
        "Stateless modules (ReLU, Dropout, pooling) may be reused freely; modules with running "
        "statistics may not.",
    ],
    references=[
        "Ioffe & Szegedy 2015, Batch Normalization, arXiv:1502.03167 (running averages per layer)",
        "PyTorch forum, 'Can I reuse the same BatchNorm layer?': https://discuss.pytorch.org/t/can-i-reuse-the-same-batchnorm-layer/21563",
    ],
)
def stateful_module_reused(reused: dict[str, int]) -> Result:
    """A module with running statistics (BatchNorm) is called at several depths in one forward pass.

    ## Why it matters
    A BatchNorm layer's running mean and variance are one set of averages. Called after several
    layers, it averages the statistics of all of them (and its affine parameters are shared):
    training normalises each depth with its own batch statistics, but evaluation uses the mixed
    running averages, so eval-mode outputs are wrong although training looked fine.

    ## How it is detected
    In the first forward pass, a counting hook on every module with running statistics and on the
    modules that contain it: one called more often than the nearest enclosing module that ran is
    reused inside it (a whole encoder reused, as in Siamese networks, calls both equally and is
    not reported).
    """
    if not reused:
        return None
    name, calls = max(reused.items(), key=lambda kv: kv[1])
    return (
        f"{name} is called {calls} times in one forward pass: one set of running statistics "
        "averages several depths, so evaluation normalises with the wrong statistics; give each "
        "position its own layer",
        {"reused_modules": len(reused), "calls": calls},
    )


@rule(
    "GW213",
    "stochastic-evaluation",
    "warning",
    "live",
    when="manual",
    fixes=[
        "Pass the module's mode to functional dropout: F.dropout(x, p, training=self.training) "
        "(its default is training=True), or use an nn.Dropout module, which model.eval() switches off.",
        "Other randomness in forward (torch.rand, noise injection, sampling) must also check "
        "self.training.",
        "If the model is stochastic on purpose (MC dropout, a VAE's sampling), ignore this rule: "
        "doctor.ignore: [GW213].",
    ],
    references=[
        "PyTorch docs, torch.nn.functional.dropout (training=True by default): https://pytorch.org/docs/stable/generated/torch.nn.functional.dropout.html",
    ],
)
def stochastic_evaluation(repeat: dict[str, float]) -> Result:
    """Evaluation is random: two eval-mode passes over the same inputs give different outputs.

    ## Why it matters
    model.eval() switches off dropout modules, but not ``F.dropout(x, p)`` (its ``training``
    argument defaults to True) nor other randomness in forward(). Validation metrics are then
    noisy and biased downward, checkpoints are chosen by noise, and the deployed model answers
    the same request differently.

    ## How it is detected
    At the first forward pass in eval mode without gradients (a validation), the Doctor runs the
    model a second time on the same inputs (random generators restored afterwards) and compares.
    """
    if repeat["difference"] <= repeat["tolerance"]:
        return None
    return (
        f"two eval-mode passes over the same inputs differ by {repeat['difference']:.2g} of the "
        "outputs' scale: something random runs in evaluation (F.dropout without "
        "training=self.training?)",
        {"difference": repeat["difference"]},
    )


@rule(
    "GW214",
    "requires-grad-attribute",
    "error",
    "preflight",
    when="first",
    fixes=[
        "Freeze with the method: module.requires_grad_(False), or set it on each parameter: "
        "for p in module.parameters(): p.requires_grad = False.",
        "Remove the attribute (del module.requires_grad) so that nobody reads it as the truth.",
    ],
    references=[
        "PyTorch docs, Module.requires_grad_: https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.requires_grad_",
        "PyTorch forum, 'model.requires_grad = False does not freeze': https://discuss.pytorch.org/t/model-requires-grad-false-doesnt-work/127181",
    ],
)
def requires_grad_attribute(model: Any) -> Result:
    """``module.requires_grad = False`` was set on a Module: it freezes nothing.

    ## Why it matters
    ``requires_grad`` is a property of tensors. Assigned on an ``nn.Module`` it just creates a
    plain Python attribute: every parameter inside still trains. The layers you meant to freeze
    change, and the optimizer spends memory and time on them.

    ## How it is detected
    At the first step, any module whose instance dictionary holds a ``requires_grad`` attribute
    while some of its parameters still require gradients.
    """
    stray = [
        name or type(module).__name__
        for name, module in model.named_modules()
        if "requires_grad" in vars(module)
        and not vars(module)["requires_grad"]
        and any(p.requires_grad for p in module.parameters())
    ]
    if not stray:
        return None
    return (
        f"{stray[0]}.requires_grad = False is a plain attribute on a Module: its parameters "
        "still train; use requires_grad_(False)",
        {"modules": len(stray)},
    )


@rule(
    "GW215",
    "broadcast-loss-shapes",
    "error",
    "preflight",
    explains=("GW307", "GW402"),
    fixes=[
        "Make the output and the target the same shape before the loss: out.squeeze(-1) for a "
        "(N, 1) output against (N,) targets, or targets.unsqueeze(-1).",
        "Turn PyTorch's 'Using a target size that is different to the input size' warning into "
        "an error while developing: warnings.simplefilter('error').",
    ],
    references=[
        "PyTorch docs, broadcasting semantics: https://pytorch.org/docs/stable/notes/broadcasting.html",
        "PyTorch forum, 'Using a target size that is different to the input size': https://discuss.pytorch.org/t/userwarning-using-a-target-size-torch-size-1-that-is-different-to-the-input-size-torch-size-1-1/49386",
    ],
)
def broadcast_loss_shapes(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    loss_kind: str,
    loss_graph: Any = None,
    loss_value: float | None = None,
) -> Result:
    """An element-wise loss compares outputs and targets of different shapes that broadcast.

    ## Why it matters
    MSE, L1 and BCE compare their inputs element by element, broadcasting them to a common shape
    first: an (N, 1) output against (N,) targets becomes an (N, N) comparison of every output
    with every target. The loss then rewards predicting the batch mean: the model trains, the
    loss falls a little, and it never learns the task.

    ## How it is detected
    The batch's outputs and targets have different shapes that broadcast to a larger one, for a
    loss of an element-wise kind; and the loss's autograd graph shows the expansion, or the
    loss's value equals the broadcast loss (so the outputs passed to the Doctor are the ones the
    loss saw).
    """
    if loss_kind not in ELEMENTWISE_LOSSES or outputs.shape == targets.shape:
        return None
    try:
        common = torch.broadcast_shapes(outputs.shape, targets.shape)
    except RuntimeError:
        return None
    if math.prod(common) <= max(outputs.numel(), targets.numel()):
        return None
    confirmed = bool(getattr(loss_graph, "broadcast", False))
    if not confirmed and loss_value is not None:
        from gradwise.doctor.graph import kind_from_value

        confirmed = kind_from_value(loss_value, outputs, targets) == loss_kind
    if not confirmed:
        return None
    return (
        f"the loss compares outputs of shape {tuple(outputs.shape)} with targets of shape "
        f"{tuple(targets.shape)}, broadcast to {tuple(common)}: every output is compared with "
        "every target; make the shapes equal (e.g. outputs.squeeze(-1))",
        {"broadcast_elements": math.prod(common), "outputs": outputs.numel()},
    )


@rule(
    "GW216",
    "zero-grad-in-accumulation",
    "error",
    "live",
    when="batch",
    fixes=[
        "Call optimizer.zero_grad() once per optimizer step, after optimizer.step(), not before "
        "every micro-batch's backward().",
        "The pattern: loss = loss_fn(model(x), y) / k; loss.backward(); every k micro-batches: "
        "optimizer.step(); optimizer.zero_grad().",
    ],
    references=[
        "PyTorch forum, 'Why do we need to set the gradients manually to zero?': https://discuss.pytorch.org/t/why-do-we-need-to-set-the-gradients-manually-to-zero-in-pytorch/4903",
        "Hugging Face Accelerate docs, gradient accumulation: https://huggingface.co/docs/accelerate/usage_guides/gradient_accumulation",
    ],
)
def zero_grad_in_accumulation(accumulation: list[tuple[int, float, float]]) -> Result:
    """Gradients are reset inside an accumulation window: only the last micro-batch counts.

    ## Why it matters
    Gradient accumulation sums k micro-batches' gradients before one optimizer step, to train
    with an effective batch k times larger. A ``zero_grad()`` before each backward() throws the
    sum away: each step uses the last micro-batch alone, so the effective batch is k times
    smaller than intended, and with a loss divided by k, the learning rate is too.

    ## How it is detected
    With ``accumulation_steps`` > 1, a tensor hook on one weight records each micro-batch's
    gradient; at micro-batches past the first of a window, .grad must hold more than the latest
    micro-batch's gradient. Equal norm and direction at every such check: the sum was reset.
    """
    inside = [a for a in accumulation if a[0] > 0]
    if len(inside) < RESET_CHECKS:
        return None
    if all(abs(1 - ratio) < RESET_RATIO and cos > RESET_COSINE for _, ratio, cos in inside):
        return (
            f"at {len(inside)} micro-batches inside accumulation windows .grad held only the "
            "latest micro-batch's gradient: zero_grad() runs before every backward(), so only "
            "the last micro-batch of each window counts",
            {"checks": len(inside), "grad_to_fresh": inside[-1][1]},
        )
    return None


@rule(
    "GW217",
    "orphan-trainable-tensors",
    "error",
    "live",
    when="first",
    fixes=[
        "Register trainable tensors on the model: nn.Parameter attributes, nn.ParameterList or "
        "nn.ModuleList instead of plain Python lists, so model.parameters() (and the optimizer, "
        "checkpoints and .to(device)) see them.",
        "Or pass them to the optimizer explicitly: torch.optim.AdamW([*model.parameters(), *extra]).",
    ],
    references=[
        "PyTorch docs, nn.ParameterList ('a plain Python list is not registered'): https://pytorch.org/docs/stable/generated/torch.nn.ParameterList.html",
        "PyTorch forum, 'Parameters in a list are not registered': https://discuss.pytorch.org/t/when-should-i-use-nn-modulelist-and-when-should-i-use-nn-sequential/5463",
    ],
)
def orphan_trainable_tensors(loss_graph: Any, model: Any, optimizer: Any) -> Result:
    """The loss trains tensors that neither the model nor the optimizer holds: they never update.

    ## Why it matters
    Tensors with ``requires_grad`` kept in a plain Python list or dict (not ``nn.ParameterList``)
    get gradients, but they are not in ``model.parameters()``, so the optimizer built from it
    never updates them, checkpoints do not save them and ``.to(device)`` does not move them.

    ## How it is detected
    At the first step, the loss's autograd graph is walked to its leaves (``AccumulateGrad``
    nodes): leaves that require gradients and are neither among the model's parameters nor in
    any of the optimizer's parameter groups.
    """
    held = {id(p) for p in model.parameters()}
    held |= {id(p) for group in optimizer.param_groups for p in group["params"]}
    orphans = [t for t in loss_graph.leaves if t.requires_grad and id(t) not in held]
    if not orphans:
        return None
    size = sum(t.numel() for t in orphans)
    shapes = ", ".join(str(tuple(t.shape)) for t in orphans[:3])
    return (
        f"{len(orphans)} tensors that the loss trains ({size:,} values; shapes {shapes}) are "
        "neither model parameters nor in the optimizer: they never update; register them "
        "(nn.Parameter, nn.ParameterList)",
        {"orphan_tensors": len(orphans), "orphan_values": size},
    )
