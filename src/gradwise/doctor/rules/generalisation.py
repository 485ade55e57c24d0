"""Generalisation (GW401-GW403): judged from doctor.validate(), the training loss and the probe set."""

from __future__ import annotations

import itertools
import math

from gradwise.doctor.findings import rule
from gradwise.doctor.rules._types import Result
from gradwise.doctor.signals import Signals

OVERFIT_EVALS = 3
"""GW401: consecutive evaluations with rising validation loss."""
OVERFIT_GAP = 0.05
"""GW401: validation loss this fraction above its best ..."""
OVERFIT_TRAIN_GAP = 0.1
"""GW401: ... and this fraction above the training loss: without a train/validation gap a rising
validation loss is the data's noise or a shift the training loss shares, not memorisation."""
OVERFIT_NOISE = 2.0
"""GW401: the rise above the best must also exceed this many times the evaluations' jitter (the
median distance of each validation loss from the midpoint of its neighbours, which a steady trend
leaves at zero): noise is not a trend."""
CHANCE_FRACTION = 0.95
"""GW404: every validation loss at or above this fraction of the chance-level loss ..."""
LEARNED_FRACTION = 0.7
"""GW404: ... while the training loss fell below this fraction of it (the model fits the
training labels, and nothing of it carries over)."""
CHANCE_EVALS = 2
"""GW404: evaluations needed."""
UNDERFIT_STEPS = 200
"""GW402: steps before judging a loss stuck at chance level."""
UNDERFIT_CHANCE = 0.95
"""GW402: smoothed loss above this fraction of the chance-level loss ln(C)."""
FORGET_RATIO = 1.5
"""GW403: the probe (original-task) loss at a validation above this multiple of its first value.
Fine-tuning at a sensible rate moves a held-out original-task loss by a few percent, while
unprotected sequential training drives it toward chance within an epoch (McCloskey & Cohen 1989;
Kirkpatrick et al. 2017): a 50% rise is far outside the first and early in the second."""
FORGET_NOISE = 2.0
"""GW403: the rise must also exceed this many standard errors of the probe's mean loss at the
baseline (from its batch losses), so that a small probe set, whose mean says little about the
original task, is not over-read..."""
FORGET_MIN_RISE = 0.01
"""...and this absolute floor (a hundredth of a nat for cross-entropy), so that a loss near zero
that doubles is not called forgetting."""


@rule(
    "GW401",
    "overfitting",
    "warning",
    "validation",
    fixes=[
        "Keep the best checkpoint and stop early (early_stopping.patience).",
        "Add regularisation: weight decay, dropout, label smoothing, data augmentation (mixup/CutMix).",
        "Get more data or use a smaller model.",
    ],
    references=[
        "Prechelt 1998, Early Stopping - But When?",
        "Zhang et al. 2017, Understanding deep learning requires rethinking generalization",
    ],
)
def overfitting(s: Signals) -> Result:
    """Training loss keeps falling while validation loss rises: the model memorises the training set.

    ## How it is detected
    The validation loss rose at each of the last evaluations, is clearly above its best (beyond the
    epoch-to-epoch noise of the evaluations before) and clearly above the training loss, and the
    mean training loss between those evaluations fell.
    """
    evals = [v for v in s.val if v.get("loss") is not None]
    if len(evals) < OVERFIT_EVALS + 1:
        return None
    recent = evals[-OVERFIT_EVALS - 1 :]
    val = [v["loss"] for v in recent]
    train = [v.get("train_loss") for v in recent]
    best = min(v["loss"] for v in evals)
    rising = all(b > a for a, b in itertools.pairwise(val))
    train_falling = None not in train and train[-1] < train[0]
    history = [v["loss"] for v in evals]
    jitter = sorted(
        abs(b - (a + c) / 2) for a, b, c in zip(history, history[1:], history[2:], strict=False)
    )
    noise = jitter[len(jitter) // 2] if jitter else 0.0
    gap = None not in train and val[-1] > (1 + OVERFIT_TRAIN_GAP) * train[-1]
    beyond_noise = val[-1] - best > OVERFIT_NOISE * noise
    if rising and train_falling and gap and beyond_noise and val[-1] > (1 + OVERFIT_GAP) * best:
        return (
            f"validation loss rose for {OVERFIT_EVALS} evaluations to {val[-1]:.4g} (best {best:.4g}) "
            f"while training loss fell to {train[-1]:.4g}",
            {"val_loss": val[-1], "best_val_loss": best, "train_loss": train[-1]},
        )
    return None


def _chance_loss(s: Signals) -> float | None:
    """The loss of a model that ignores its inputs: ln(C) for C balanced classes, the targets'
    variance for MSE (known from the first steps' targets)."""
    if s.loss_kind in ("cross_entropy", "nll") and s.num_classes and s.num_classes >= 2:
        return math.log(s.num_classes)
    if s.loss_kind == "mse" and s.target_var:
        return s.target_var
    return None


@rule(
    "GW404",
    "labels-independent-of-inputs",
    "error",
    "validation",
    explains=("GW401",),
    fixes=[
        "Check that inputs and labels stay paired: shuffle them together (one permutation "
        "indexing both, or a Dataset returning (x, y)), never one without the other.",
        "Check the label source: joins on the wrong key, a label column off by one row, labels "
        "read in another order (sorted file names against unsorted labels).",
        "Look at a few (input, label) pairs by eye.",
    ],
    references=[
        "Zhang et al. 2017, Understanding deep learning requires rethinking generalization "
        "(networks memorise random labels: training loss falls, test stays at chance)",
        "Karpathy 2019, A Recipe for Training Neural Networks ('visualize just before the net')",
        "A reported case: https://github.com/DrexelChatbotGroup/DrexelChatbot/issues/15",
    ],
)
def labels_independent(s: Signals) -> Result:
    """Validation stays at chance from the first evaluation while the training loss falls.

    ## Why it matters
    A network can memorise any labels, even random ones: the training loss falls as usual. If
    the labels do not depend on the inputs (features shuffled apart from their labels, a
    misaligned join), nothing it learns carries over, and validation sits at chance from the
    start. That is not overfitting (validation never improved), and no regularisation helps.

    ## How it is detected
    At least two evaluations; every validation loss at or above ``CHANCE_FRACTION`` of the
    chance-level loss (ln C for C classes; for MSE the targets' variance), and the training loss
    below ``LEARNED_FRACTION`` of it.
    """
    chance = _chance_loss(s)
    evals = [v for v in s.val if v.get("loss") is not None and v.get("train_loss") is not None]
    if chance is None or len(evals) < CHANCE_EVALS:
        return None
    best_val = min(v["loss"] for v in evals)
    train = evals[-1]["train_loss"]
    if best_val >= CHANCE_FRACTION * chance and train < LEARNED_FRACTION * chance:
        return (
            f"validation loss never went below chance ({best_val:.3g}; chance {chance:.3g}) in "
            f"{len(evals)} evaluations while the training loss fell to {train:.3g}: the model "
            "memorises labels that do not depend on the inputs; check that inputs and labels "
            "stay paired",
            {"best_val_loss": best_val, "chance_loss": chance, "train_loss": train},
        )
    return None


@rule(
    "GW402",
    "underfitting",
    "error",
    "validation",
    when="sample",  # the training loss alone decides; preflight's overfit test reports it too
    fixes=[
        "Check that labels line up with inputs (shuffling one without the other is a classic bug).",
        "Make sure the model can fit one batch (gradwise check runs this test); if not, look for a "
        "graph cut (.detach(), .data) or a wrong loss.",
        "Increase model capacity, raise the learning rate, or train longer.",
    ],
    references=["Karpathy 2019, A Recipe for Training Neural Networks (overfit one batch)"],
)
def underfitting(s: Signals) -> Result:
    """The model does not learn: the training loss stays at chance level.

    ## How it is detected
    Live: for classification with C classes, the smoothed training loss after many steps is still at
    the loss of uniform guessing, ln(C). Preflight (``gradwise check``): the model cannot drive the
    loss on one batch close to zero.
    """
    if (
        s.loss_kind != "cross_entropy"
        or not s.num_classes
        or s.num_classes < 2
        or s.step < UNDERFIT_STEPS
    ):
        return None
    smoothed = s.smoothed_losses()
    if not smoothed:
        return None
    now, chance = smoothed[-1], math.log(s.num_classes)
    if now > UNDERFIT_CHANCE * chance:
        return (
            f"after {s.step} steps the loss {now:.3g} is still at chance level (ln {s.num_classes} = {chance:.3g})",
            {"loss": now, "chance_loss": chance, "steps": s.step},
        )
    return None


@rule(
    "GW403",
    "catastrophic-forgetting",
    "warning",
    "validation",
    when="manual",  # judged when the probe set was measured
    fixes=[
        "Lower the learning rate (fine-tuning rates are about a tenth of training from scratch; "
        "gw.advise suggests one) or train fewer epochs.",
        "Freeze the lower layers (finetune.freeze), unfreeze gradually (finetune.unfreeze_every) "
        "with discriminative rates (finetune.lr_decay: 2.6), or train a LoRA adapter "
        "(finetune.peft: lora), which leaves the pretrained weights as they were.",
        "Mix some of the original task's data into the fine-tuning batches (rehearsal), or add a "
        "penalty that keeps important weights near their pretrained values (EWC).",
    ],
    references=[
        "McCloskey & Cohen 1989, Catastrophic Interference in Connectionist Networks: The Sequential Learning Problem",
        "Kirkpatrick et al. 2017, Overcoming catastrophic forgetting in neural networks (EWC), PNAS, arXiv:1612.00796",
        "Biderman et al. 2024, LoRA Learns Less and Forgets Less, arXiv:2405.09673",
    ],
)
def forgetting(s: Signals) -> Result:
    """The loss on a probe set from the original task rises clearly: fine-tuning overwrites it.

    ## Why it matters
    Gradient descent on a new task moves the shared weights wherever the new loss wants them,
    with nothing holding the old task in place: the network can lose the original ability within
    a few hundred steps while the new task's metrics look fine. When the original ability still
    matters (a general model specialised on a narrow domain, a head reused for several tasks),
    that loss is silent until someone tests it.

    ## How it is detected
    Give the Doctor a probe set from the original task, ``Doctor(..., probe=(inputs, targets))``
    or a DataLoader. Its loss is measured without gradients and in eval mode (training modes and
    random generators restored) at the first step, before any update, and at every
    ``doctor.validate()``. The rule fires when it exceeds ``FORGET_RATIO`` times that first value
    and the rise exceeds ``FORGET_NOISE`` standard errors of the first measurement and
    ``FORGET_MIN_RISE``. See also ``gradwise explain catastrophic-forgetting``.
    """
    if len(s.probe_loss) < 2:
        return None
    first, now = s.probe_loss.values[0], s.probe_loss.values[-1]
    if not math.isfinite(first):
        return None
    rise = now - first
    clear = rise > max(FORGET_NOISE * s.probe_noise, FORGET_MIN_RISE)
    if math.isfinite(now) and not (now > FORGET_RATIO * first and clear):
        return None
    return (
        f"the loss on the original task's probe set rose from {first:.4g} (step "
        f"{s.probe_loss.steps[0]}) to {now:.4g}: fine-tuning is overwriting what the model knew",
        {
            "probe_loss": now,
            "first_probe_loss": first,
            "noise": s.probe_noise,
            **({"ratio": now / first} if first > 0 and math.isfinite(now) else {}),
        },
    )
