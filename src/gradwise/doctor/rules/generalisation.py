"""Generalisation (GW401, GW402): judged from doctor.validate() and the training loss."""

from __future__ import annotations

import itertools
import math

from gradwise.doctor.findings import rule
from gradwise.doctor.rules._types import Result
from gradwise.doctor.signals import Signals

OVERFIT_EVALS = 3
"""GW401: consecutive evaluations with rising validation loss."""
OVERFIT_GAP = 0.05
"""GW401: validation loss this fraction above its best."""
UNDERFIT_STEPS = 200
"""GW402: steps before judging a loss stuck at chance level."""
UNDERFIT_CHANCE = 0.95
"""GW402: smoothed loss above this fraction of the chance-level loss ln(C)."""


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
    The validation loss rose at each of the last evaluations, is clearly above its best, and the mean
    training loss between those evaluations fell.
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
    if rising and train_falling and val[-1] > (1 + OVERFIT_GAP) * best:
        return (
            f"validation loss rose for {OVERFIT_EVALS} evaluations to {val[-1]:.4g} (best {best:.4g}) "
            f"while training loss fell to {train[-1]:.4g}",
            {"val_loss": val[-1], "best_val_loss": best, "train_loss": train[-1]},
        )
    return None


@rule(
    "GW402",
    "underfitting",
    "error",
    "validation",
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
