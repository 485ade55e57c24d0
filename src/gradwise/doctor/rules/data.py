"""Data rules (GW1xx): what is wrong with the numbers before any model sees them.

Each check takes tensors (one batch in the live Doctor, the whole data set or a bounded sample of it
in preflight) and returns None when healthy or ``(message, evidence)``. Every threshold is in
:data:`THRESHOLDS`, with the reason for its value; no number inside a check is a tuning knob.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from gradwise._format import percent, times
from gradwise.data.bundle import IGNORE_INDEX
from gradwise.doctor.findings import rule
from gradwise.doctor.rules._types import Result
from gradwise.tasks import imbalanced_monitor

CLASS_INDEX_LOSSES = ("cross_entropy", "nll")
BCE_LOSSES = ("bce", "bce_logits")


@dataclass(frozen=True)
class DataThresholds:
    """Every number the data rules decide with. Change them here, nowhere else."""

    # GW102 unnormalised-inputs ----------------------------------------------------------------
    max_mean_abs: float = 10.0
    """A feature (or image channel) whose mean |x| exceeds this is far from unit scale: raw pixels
    (0-255), years, prices, counts. Standardised data has mean |x| ~0.8, [0, 1] pixels at most 1;
    the factor 10 leaves room for heavy-tailed standardised features in a small batch (an outlier
    at z = 100 in a batch of 32 moves its feature's mean |x| by only ~3). LeCun et al. 1998,
    'Efficient BackProp', section 4.3: inputs should have zero mean and similar, unit variance."""
    max_std_ratio: float = 100.0
    """Largest / smallest per-feature std among continuous features: beyond two orders of magnitude
    one weight must be 100x another to use both features, and a single learning rate cannot suit
    both (LeCun et al. 1998). One-hot/binary (0/1) features, constant features and sparse features
    (see ``dense_fraction``) are left out: their std says nothing about their units."""
    dense_fraction: float = 0.1
    """A feature enters the std-ratio test only if at least this fraction of its values is non-zero:
    a rarely-lit pixel of a [0, 1] image has a tiny std but is perfectly normalised."""
    min_rows_for_ratio: int = 16
    """Values per feature below which a std is too noisy to compare (e.g. a batch of 4 rows)."""
    constant_rel_std: float = 1e-6
    """A feature whose std is below this times max(1, |mean|) is constant (floating-point noise)."""
    raw_pixel_min_max: float = 2.0
    """Images [B, C, H, W] (or larger) holding only non-negative whole numbers with a maximum of at
    least this are raw intensities (0-255 bytes, or 0-16 in scikit-learn's digits); 0/1 masks are
    not. Standardised or [0, 1]-scaled images are never whole numbers."""

    # GW103 class-imbalance --------------------------------------------------------------------
    imbalance_ratio: float = 10.0
    """Majority / minority class count at which plain cross-entropy is dominated by the majority
    class (He & Garcia 2009, 'Learning from Imbalanced Data'; Buda et al. 2018)."""
    imbalance_confidence_ratio: float = 5.0
    """The same ratio computed with pessimistic counts (majority minus, minority plus z square
    roots) must still reach this, so that sampling noise in a small batch never fires the rule:
    a balanced 10-class batch of 32 can show 8 vs 1 by chance, but not with confidence."""
    imbalance_z: float = 2.0
    """Width of the count interval above (Wilson-type square-root interval, ~95%)."""

    # GW104 train-val-leakage ------------------------------------------------------------------
    leak_fraction: float = 0.01
    """Fraction of validation samples that also occur, byte for byte, in the training data above
    which validation is contaminated (Kaufman et al. 2012, 'Leakage in Data Mining')..."""
    leak_excess: float = 0.01
    """... and by how much that fraction must exceed the training data's own duplicate rate: data
    with few distinct values (a handful of categorical columns) repeats rows naturally, inside the
    training set as much as across the split, and that is not leakage ..."""
    leak_z: float = 3.0
    """... and the number of leaked samples must exceed the number that rate predicts by this many
    (Poisson) standard deviations, sqrt(expected + 1): a single natural duplicate (scikit-learn's
    iris has one across its default split) is not evidence of a leaking pipeline."""
    leak_halvings: int = 3
    """Copies made before the split (a class oversampled by duplicating rows, duplicate records)
    escape the rate test above: a random split spreads them over both sides at the training data's
    own duplicate rate. What gives them away is that nothing else resembles them. A natural repeat
    comes from data with few distinct values, so other samples share half of its values; a copy of
    a row of continuous values (or of an image) shares neither half with any other sample. The
    sample's columns (8-byte words) are split into random halves this many times; a leaked sample
    that no other training sample matches on either half of one split is a copy. With 3 of 8
    columns continuous, one split separates two of them with probability 6/7, three splits 99.7%.
    Natural repeats isolated on both halves are rare (with independent halves, a row that matches
    no other sample on a half rarely repeats at all), so, as above, a leak needs copies of more than
    ``leak_z`` distinct rows (a single blank image repeated is not one) in at least ``leak_fraction``
    of the validation samples."""

    # GW105 targets-out-of-range ---------------------------------------------------------------
    prob_tolerance: float = 1e-3
    """Tolerance when deciding that target rows are probability vectors (they sum to 1)."""


THRESHOLDS = DataThresholds()


def _with_thresholds(fn: Callable) -> Callable:
    """Fill the docstring's ``{name}`` fields with :data:`THRESHOLDS`, so that the rule's page
    (built from the docstring when ``@rule`` registers it, below this decorator) shows the values."""
    fn.__doc__ = (fn.__doc__ or "").format(**asdict(THRESHOLDS))
    return fn


# ============================================================================ GW101


@rule(
    "GW101",
    "nonfinite-data",
    "error",
    "preflight",
    when="batch",
    fixes=[
        "Find where the NaN/Inf values come from (missing values in a CSV, a division by zero or a "
        "log of zero in preprocessing) and fix them at the source.",
        "Impute missing values with statistics of the training split (median or mean), and add a "
        "0/1 'was missing' indicator feature if missingness carries information.",
        "Drop the affected samples if they are few and their targets are unreliable.",
    ],
    references=[
        "IEEE 754: any arithmetic with NaN gives NaN, so one NaN input makes the loss NaN",
        "https://pytorch.org/docs/stable/generated/torch.isfinite.html",
    ],
)
def nonfinite_data(inputs: torch.Tensor | None, targets: torch.Tensor | None) -> Result:
    """The inputs or targets contain NaN or infinite values.

    ## Why it matters
    One NaN in a batch makes that batch's loss NaN, its gradients NaN, and after the optimizer step
    every weight NaN: training is over, silently, unless something stops it. Inf does the same
    through ``inf - inf``.

    ## How it is detected
    Detected by counting non-finite values in floating-point inputs and
    targets (integer tensors cannot hold them); the evidence gives NaN and Inf counts, their
    fraction and how many samples are affected.
    """
    evidence: dict[str, float] = {}
    parts = []
    for what, tensor in (("inputs", inputs), ("targets", targets)):
        if tensor is None or not torch.is_tensor(tensor) or not tensor.is_floating_point():
            continue
        if tensor.numel() == 0:
            continue
        nan = torch.isnan(tensor)
        inf = torch.isinf(tensor)
        n_nan, n_inf = int(nan.sum()), int(inf.sum())
        if n_nan + n_inf == 0:
            continue
        bad = (nan | inf).reshape(tensor.shape[0], -1).any(dim=1) if tensor.ndim else nan | inf
        samples = int(bad.sum())
        total = tensor.numel()
        evidence.update(
            {
                f"nan_{what}": n_nan,
                f"inf_{what}": n_inf,
                f"nonfinite_{what}_fraction": (n_nan + n_inf) / total,
                f"samples_with_nonfinite_{what}": samples,
            }
        )
        parts.append(
            f"{n_nan} NaN and {n_inf} Inf values in the {what} "
            f"({(n_nan + n_inf) / total:.2%} of {total} values, in {samples} of "
            f"{tensor.shape[0] if tensor.ndim else 1} samples)"
        )
    if not parts:
        return None
    return "; ".join(parts) + ": the loss and then every weight will become NaN", evidence


# ============================================================================ GW102


def _feature_view(x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``x`` as [values, features] in float64: the last axis for tabular data and sequences
    ([N, F], [N, T, F]), the channel axis for images ([N, C, H, W], [N, C, D, H, W])."""
    x = x.detach().to(torch.float64)
    if x.ndim <= 1:
        return x.reshape(-1, 1), "feature"
    if x.ndim <= 3:
        return x.reshape(-1, x.shape[-1]), "feature"
    return x.transpose(0, 1).reshape(x.shape[1], -1).T, "channel"


@rule(
    "GW102",
    "unnormalised-inputs",
    "warning",
    "preflight",
    fixes=[
        "Standardise each feature (images: each channel) with the mean and std of the training "
        "split: x = (x - mean) / std; gradwise's built-in data sets do this for you.",
        "For images, at least divide raw 0-255 pixels by 255 (torchvision's ToTensor does), then "
        "normalise per channel.",
        "For heavy-tailed positive features (prices, counts), take log1p before standardising.",
        "If a normalisation layer must do it inside the model, put a BatchNorm/LayerNorm directly "
        "on the inputs.",
    ],
    references=[
        "LeCun, Bottou, Orr & Müller 1998, 'Efficient BackProp', section 4.3 (normalising the inputs)",
        "Ioffe & Szegedy 2015, 'Batch Normalization', on the cost of badly scaled layer inputs",
        "https://scikit-learn.org/stable/modules/preprocessing.html#standardization-or-mean-removal-and-variance-scaling",
    ],
)
@_with_thresholds
def unnormalised_inputs(inputs: torch.Tensor, layer_input: torch.Tensor | None = None) -> Result:
    """The inputs are far from zero mean and unit scale, or their features are on wildly different scales.

    ## Why it matters
    Weight initialisations (He, Xavier) and default learning rates assume inputs of roughly unit
    scale. Raw 0-255 pixels or features in the thousands saturate activations and make the first
    layer's gradients huge; features whose scales differ by orders of magnitude force the optimizer
    to take one step size for weights that need very different ones, so training is slow and
    unstable.

    ## How it is detected
    Detected per feature (last axis of tabular data and sequences) or per channel
    (axis 1 of images): raw whole-number image intensities; a mean |x| above
    {max_mean_abs:g}; or a ratio of the largest to the smallest std, among dense
    continuous features, above {max_std_ratio:g}. Integer inputs (token ids), one-hot
    and binary features, constant and sparse features are left alone. A model that standardises
    its raw inputs itself (fixed mean/std buffers, a BatchNorm on the inputs) is judged by what
    its first Linear/Conv layer receives (``layer_input``, seen by the live Doctor's hooks).
    """
    t = THRESHOLDS
    if (
        layer_input is not None
        and layer_input.is_floating_point()
        and layer_input.shape[:1] == getattr(inputs, "shape", (None,))[:1]
        and unnormalised_inputs(layer_input) is None
    ):
        return None
    if not torch.is_tensor(inputs) or not inputs.is_floating_point() or inputs.numel() == 0:
        return None
    x = inputs.detach()
    finite = torch.isfinite(x)
    if not bool(finite.all()):  # NaN/Inf are GW101's business: judge the finite values
        if not bool(finite.any()):
            return None
        x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))

    # raw image intensities: whole numbers >= 0 with a maximum of at least raw_pixel_min_max
    if x.ndim >= 4:
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0 and hi >= t.raw_pixel_min_max and bool((x == torch.round(x)).all()):
            return (
                f"the images hold raw whole-number intensities 0..{hi:g} (shape "
                f"{tuple(x.shape)}): scale them to [0, 1] and standardise per channel",
                {"min": lo, "max": hi, "mean": float(x.double().mean()), "raw_pixels": 1.0},
            )

    v, per = _feature_view(x)
    n, features = v.shape
    mean_abs = v.abs().mean(dim=0)
    worst = int(mean_abs.argmax())
    if float(mean_abs[worst]) > t.max_mean_abs:
        mean = v.mean(dim=0)
        std = v.std(dim=0, unbiased=False) if n > 1 else torch.zeros_like(mean)
        large = int((mean_abs > t.max_mean_abs).sum())
        return (
            f"{large} of {features} {per}s have a mean |x| above {t.max_mean_abs:g}; the largest is "
            f"{per} {worst} with mean {float(mean[worst]):.4g} and std {float(std[worst]):.4g}: "
            "standardise the inputs with training-split statistics",
            {
                "max_mean_abs": float(mean_abs[worst]),
                "feature": worst,
                "feature_mean": float(mean[worst]),
                "feature_std": float(std[worst]),
                "features_above": large,
                "features": features,
                "threshold": t.max_mean_abs,
            },
        )

    if n < t.min_rows_for_ratio or features < 2:
        return None
    mean = v.mean(dim=0)
    std = v.std(dim=0, unbiased=False)
    binary = ((v == 0) | (v == 1)).all(dim=0)
    constant = std <= t.constant_rel_std * torch.clamp(mean.abs(), min=1.0)
    dense = (v != 0).double().mean(dim=0) >= t.dense_fraction
    use = ~binary & ~constant & dense
    if int(use.sum()) < 2:
        return None
    idx = torch.nonzero(use).flatten()
    s = std[idx]
    hi_i, lo_i = int(idx[s.argmax()]), int(idx[s.argmin()])
    ratio = float(std[hi_i] / std[lo_i])
    if ratio <= t.max_std_ratio:
        return None
    return (
        f"the {per}s are on wildly different scales: {per} {hi_i} has std {float(std[hi_i]):.4g} "
        f"but {per} {lo_i} has std {float(std[lo_i]):.4g} ({times(ratio)}, threshold "
        f"{t.max_std_ratio:g}x): standardise each {per}",
        {
            "std_ratio": ratio,
            "max_std": float(std[hi_i]),
            "min_std": float(std[lo_i]),
            "max_std_feature": hi_i,
            "min_std_feature": lo_i,
            "features_compared": int(use.sum()),
            "threshold": t.max_std_ratio,
        },
    )


# ============================================================================ GW103


def pessimistic_ratio(majority: float, minority: float, z: float) -> float:
    """Majority/minority ratio with the majority at the low end and the minority at the high end
    of a Wilson-type interval for a count: c + z^2/2 -/+ z * sqrt(c + z^2/4)."""
    lo = majority + z * z / 2 - z * math.sqrt(majority + z * z / 4)
    hi = minority + z * z / 2 + z * math.sqrt(minority + z * z / 4)
    return max(lo, 0.0) / hi


def imbalanced(majority: float, minority: float) -> bool:
    """GW103's verdict on two class counts: the ratio reaches ``imbalance_ratio`` and, with
    pessimistic counts, ``imbalance_confidence_ratio``. The advisor asks the same question before
    it chooses the monitored metric, so the doctor and the advisor never disagree."""
    t = THRESHOLDS
    ratio = majority / minority if minority > 0 else math.inf
    confident = pessimistic_ratio(majority, minority, t.imbalance_z)
    return ratio >= t.imbalance_ratio and confident >= t.imbalance_confidence_ratio


def _class_targets(targets: torch.Tensor) -> torch.Tensor | None:
    """1-D class labels, or None when the targets are not one class per sample."""
    if targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if targets.ndim != 1:
        return None
    if targets.is_floating_point():
        if not bool(((targets == 0) | (targets == 1)).all()):
            return None  # regression targets
        return targets.to(torch.int64)
    if targets.dtype == torch.bool:
        return targets.to(torch.int64)
    return targets.to(torch.int64)


_TWO, _MANY = imbalanced_monitor(2), imbalanced_monitor(3)
IMBALANCE_FIXES = (
    "Weight the loss by inverse class frequency (CrossEntropyLoss(weight=...), or "
    "BCEWithLogitsLoss(pos_weight=negatives/positives) for binary and multilabel targets).",
    "Sample batches with a WeightedRandomSampler so that each class is seen about equally often.",
    "Use focal loss (Lin et al. 2017) to down-weight the many easy majority examples.",
    f"Pick the checkpoint and stop early by {_TWO[1]} for two classes, {_MANY[1]} for more "
    "classes or for multilabel targets, not accuracy (gradwise's advisor does: "
    f"early_stopping.monitor: {_TWO[0]} or {_MANY[0]}); report per-class recall and tune the "
    "decision threshold on validation data.",
)


def imbalance_fixes(weighted: bool) -> list[str]:
    """GW103's fixes in the order that fits: with a class-weighted loss, weighting it is done, so
    the monitored metric and the decision threshold come first (for ``Finding.fixes``)."""
    fixes = list(IMBALANCE_FIXES)
    return [fixes[3], fixes[1], fixes[2], fixes[0]] if weighted else fixes


def loss_is_weighted(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` already weights classes: a loss module or ``functools.partial`` with a
    ``pos_weight`` (BCE) or a class ``weight`` (CrossEntropyLoss, NLLLoss, ...; BCELoss's ``weight``
    rescales samples, not classes), or a gradwise Task with ``class_weights``. Anything else
    (None, names, plain functions) is False."""
    return _weighted(loss_fn, depth=0)


def _weighted(fn: Any, depth: int) -> bool:
    from gradwise.tasks import Task

    if fn is None or depth > 4:
        return False
    if isinstance(fn, Task):
        return fn.class_weights is not None or _weighted(getattr(fn, "_custom", None), depth + 1)
    if isinstance(fn, torch.nn.Module):
        for m in fn.modules():
            if getattr(m, "pos_weight", None) is not None:
                return True
            class_weight = isinstance(m, torch.nn.modules.loss._WeightedLoss) and not isinstance(
                m, torch.nn.BCELoss
            )
            if class_weight and getattr(m, "weight", None) is not None:
                return True
        return False
    if isinstance(fn, functools.partial):
        keywords = fn.keywords or {}
        if keywords.get("pos_weight") is not None:
            return True
        name = getattr(fn.func, "__name__", "")
        if keywords.get("weight") is not None and name != "binary_cross_entropy":
            return True
        return _weighted(fn.func, depth + 1)
    owner = getattr(fn, "__self__", None)  # a bound method: Task.loss, or a module's forward
    return owner is not None and _weighted(owner, depth + 1)


@rule(
    "GW103",
    "class-imbalance",
    "warning",
    "preflight",
    when="manual",  # judged on the first steps' targets pooled, never on one batch
    fixes=IMBALANCE_FIXES,
    references=[
        "He & Garcia 2009, 'Learning from Imbalanced Data', IEEE TKDE",
        "Buda, Maki & Mazurowski 2018, 'A systematic study of the class imbalance problem in CNNs'",
        "Lin et al. 2017, 'Focal Loss for Dense Object Detection'",
        "Cui et al. 2019, 'Class-Balanced Loss Based on Effective Number of Samples'",
    ],
)
@_with_thresholds
def class_imbalance(
    targets: torch.Tensor, num_classes: int | None = None, *, weighted: bool = False
) -> Result:
    """One class outnumbers another by an order of magnitude or more.

    ## Why it matters
    With plain cross-entropy the majority class dominates the gradient, so a model can reach high
    accuracy by (almost) always predicting it, and minority-class recall stays poor. A
    class-weighted loss corrects the gradient, but accuracy stays misleading and the decision
    threshold still needs tuning.

    ## How it is detected
    Detected on
    integer class targets (one per sample; also 0/1 float binary targets) and on 0/1 multilabel
    matrices (per label, positives vs negatives): the majority/minority count ratio must reach
    {imbalance_ratio:g}:1 and, computed with pessimistic counts (a ~95% square-root
    interval), still reach {imbalance_confidence_ratio:g}:1, so a small batch's sampling
    noise never fires it. Classes that never occur count as zero only when ``num_classes`` is given.
    Sequence targets ([B, T] tokens, whose frequencies are naturally skewed) are left alone.
    ``weighted=True`` (the loss already has class weights or a ``pos_weight``) keeps the finding
    but changes the advice from weighting the loss to checking per-class metrics and the threshold.
    """
    t = THRESHOLDS
    if not torch.is_tensor(targets) or targets.numel() == 0:
        return None
    targets = targets.detach()
    if targets.ndim == 2 and targets.shape[1] > 1 and targets.is_floating_point():
        return _multilabel_imbalance(targets, weighted)
    labels = _class_targets(targets)
    if labels is None:
        return None
    labels = labels[labels != IGNORE_INDEX]
    if labels.numel() == 0 or int(labels.min()) < 0:
        return None  # negative labels are GW105's business
    counts = torch.bincount(labels, minlength=num_classes or 0).double()
    present = counts if num_classes else counts[counts > 0]
    classes = torch.arange(len(counts)) if num_classes else torch.nonzero(counts > 0).flatten()
    if present.numel() < 2:
        return None
    major_i, minor_i = int(present.argmax()), int(present.argmin())
    major, minor = float(present[major_i]), float(present[minor_i])
    ratio = major / minor if minor > 0 else math.inf
    confident = pessimistic_ratio(major, minor, t.imbalance_z)
    if not imbalanced(major, minor):
        return None
    major_c, minor_c = int(classes[major_i]), int(classes[minor_i])
    n = float(present.sum())
    n_classes = num_classes or int(present.numel())
    above = int((present * t.imbalance_ratio <= major).sum())
    shown = (
        f"never occurs (0 of {int(n)} samples)"
        if minor == 0
        else f"has {int(minor)} ({percent(minor / n)}): a {_ratio(ratio)} imbalance"
    )
    return (
        f"class {major_c} has {int(major)} samples ({percent(major / n)}) but class {minor_c} "
        f"{shown}"
        + (
            f" ({above} classes at least {t.imbalance_ratio:g}x rarer than the majority)"
            if above > 1
            else ""
        )
        + _imbalance_advice(weighted, "weight the loss or resample", imbalanced_monitor(n_classes)),
        {
            "imbalance_ratio": ratio,
            "pessimistic_ratio": confident,
            "majority_class": major_c,
            "majority_count": major,
            "minority_class": minor_c,
            "minority_count": minor,
            "minority_fraction": minor / n,
            "classes": float(present.numel()),
            "rare_classes": above,
            "samples": n,
            "threshold": t.imbalance_ratio,
            "loss_weighted": float(weighted),
        },
    )


def _ratio(ratio: float) -> str:
    """A majority:minority ratio, readable at any size ("19:1", "2.5e+04:1")."""
    return f"{ratio:.3g}:1" if ratio < 1e4 else f"{ratio:.1e}:1"


def _imbalance_advice(weighted: bool, fix: str, monitor: tuple[str, str, str]) -> str:
    """The finding's advice; ``monitor`` (from :func:`gradwise.tasks.imbalanced_monitor`) is the
    metric the advisor monitors for this problem, named here too so that both say the same."""
    metric, name, _ = monitor
    judge = (
        f"pick the checkpoint by {name}, not accuracy (early_stopping.monitor: {metric}, "
        "gradwise's advisor's choice)"
    )
    if weighted:
        return (
            f"; the loss is already class-weighted, so {judge}, check per-class recall and tune "
            "the decision threshold on validation data"
        )
    return f"; {fix}, and {judge}"


def _multilabel_imbalance(targets: torch.Tensor, weighted: bool = False) -> Result:
    t = THRESHOLDS
    if not bool(((targets == 0) | (targets == 1)).all()):
        return None  # multi-output regression
    pos = targets.double().sum(dim=0)
    neg = targets.shape[0] - pos
    major = torch.maximum(pos, neg)
    minor = torch.minimum(pos, neg)
    ratio = torch.where(minor > 0, major / minor.clamp(min=1), torch.full_like(major, math.inf))
    confident = torch.tensor(
        [
            pessimistic_ratio(float(a), float(b), t.imbalance_z)
            for a, b in zip(major, minor, strict=True)
        ]
    )
    flagged = (ratio >= t.imbalance_ratio) & (confident >= t.imbalance_confidence_ratio)
    if not bool(flagged.any()):
        return None
    worst = int(torch.where(flagged, ratio, torch.zeros_like(ratio)).argmax())
    n = targets.shape[0]
    rarer = "positive" if float(pos[worst]) <= float(neg[worst]) else "negative"
    detail = (
        f"is never {rarer} in {n} samples"
        if float(minor[worst]) == 0
        else f"has {int(minor[worst])} {rarer} of {n} samples ({_ratio(float(ratio[worst]))})"
    )
    return (
        f"{int(flagged.sum())} of {targets.shape[1]} labels are imbalanced; label {worst} "
        f"{detail}"
        + _imbalance_advice(
            weighted,
            "set BCEWithLogitsLoss(pos_weight=negatives/positives) per label",
            imbalanced_monitor(targets.shape[1], multilabel=True),
        ),
        {
            "imbalance_ratio": float(ratio[worst]),
            "pessimistic_ratio": float(confident[worst]),
            "label": worst,
            "minority_count": float(minor[worst]),
            "majority_count": float(major[worst]),
            "imbalanced_labels": int(flagged.sum()),
            "labels": targets.shape[1],
            "samples": n,
            "threshold": t.imbalance_ratio,
            "loss_weighted": float(weighted),
        },
    )


# ============================================================================ GW104


_HASH_SEED = 0x5EED


def _row_bytes(x: torch.Tensor) -> np.ndarray:
    """Each sample as a row of uint64 words (its bytes, zero-padded to a multiple of 8)."""
    arr = x.detach().cpu().contiguous().numpy()
    raw = np.ascontiguousarray(arr.reshape(arr.shape[0], -1)).view(np.uint8)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((raw.shape[0], pad), np.uint8)], axis=1)
    return np.ascontiguousarray(raw).view(np.uint64)


def _multipliers(width: int) -> np.ndarray:
    """One random odd 64-bit multiplier per word (fixed seed)."""
    rng = np.random.default_rng(_HASH_SEED)
    return rng.integers(1, 2**63, size=width, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _word_sums(words: np.ndarray, mult: np.ndarray) -> np.ndarray:
    """Per row, the sum of its words times ``mult`` with wrap-around (linear: the sums over two
    complementary sets of words add up to the sum over all)."""
    h = np.zeros(words.shape[0], np.uint64)
    chunk = max(1, (1 << 22) // max(words.shape[1], 1))
    with np.errstate(over="ignore"):
        for start in range(0, words.shape[0], chunk):
            block = words[start : start + chunk]
            h[start : start + chunk] = (block * mult).sum(axis=1, dtype=np.uint64)
    return h


def _mix(sums: np.ndarray) -> np.ndarray:
    h = sums.copy()
    with np.errstate(over="ignore"):
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
    return h


def _row_hashes(words: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row (random odd multipliers, summed with wrap-around, then mixed)."""
    return _mix(_word_sums(words, _multipliers(words.shape[1])))


def _counts_in(reference: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """How often each of ``keys`` occurs in ``reference`` (hash level)."""
    values, counts = np.unique(reference, return_counts=True)
    if not len(values):
        return np.zeros(len(keys), np.int64)
    pos = np.minimum(np.searchsorted(values, keys), len(values) - 1)
    return np.where(values[pos] == keys, counts[pos], 0)


def _isolated(words_tr: np.ndarray, words_va: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Mask over validation rows: no training row that differs from it matches it on either half
    of one of ``leak_halvings`` random splits of the columns (a copy, not a natural repeat).
    ``same``: each validation row's number of identical training rows. Needs two words or more."""
    width = words_tr.shape[1]
    isolated = np.zeros(len(words_va), bool)
    if width < 2:
        return isolated
    mult = _multipliers(width)
    all_tr, all_va = _word_sums(words_tr, mult), _word_sums(words_va, mult)
    rng = np.random.default_rng(_HASH_SEED + 1)
    for _ in range(THRESHOLDS.leak_halvings):
        half = np.zeros(width, bool)
        half[rng.permutation(width)[: width // 2]] = True
        part = np.where(half, mult, np.uint64(0))
        a_tr, a_va = _word_sums(words_tr, part), _word_sums(words_va, part)
        with np.errstate(over="ignore"):
            b_tr, b_va = all_tr - a_tr, all_va - a_va  # the other half
        isolated |= (_counts_in(_mix(a_tr), _mix(a_va)) == same) & (
            _counts_in(_mix(b_tr), _mix(b_va)) == same
        )
    return isolated


def _exact_matches(
    words_a: np.ndarray, hashes_a: np.ndarray, words_b: np.ndarray, hashes_b: np.ndarray
) -> np.ndarray:
    """Boolean mask over rows of b: an identical row (byte for byte) exists in a."""
    order = np.argsort(hashes_a, kind="stable")
    sorted_h = hashes_a[order]
    pos = np.searchsorted(sorted_h, hashes_b)
    found = np.zeros(len(hashes_b), bool)
    candidates = np.nonzero(
        (pos < len(sorted_h)) & (sorted_h[np.minimum(pos, len(sorted_h) - 1)] == hashes_b)
    )[0]
    for i in candidates:  # confirm byte for byte (hash collisions are possible, if unlikely)
        j = pos[i]
        while j < len(sorted_h) and sorted_h[j] == hashes_b[i]:
            if np.array_equal(words_a[order[j]], words_b[i]):
                found[i] = True
                break
            j += 1
    return found


def _self_duplicate_fraction(words: np.ndarray, hashes: np.ndarray) -> float:
    """Fraction of rows that have an identical twin elsewhere in the same data (hash level)."""
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).mean()) if len(hashes) else 0.0


@rule(
    "GW104",
    "train-val-leakage",
    "error",
    "preflight",
    fixes=[
        "Split before any augmentation, oversampling or windowing, and deduplicate the data before "
        "splitting, so that no sample lands on both sides.",
        "Split by group (patient, user, document, recording) when several samples come from the "
        "same source (scikit-learn's GroupShuffleSplit / GroupKFold).",
        "Check that the validation set is not the training set passed twice (val_data=train_data).",
    ],
    references=[
        "Kaufman, Rosset & Perlich 2012, 'Leakage in Data Mining: Formulation, Detection, and Avoidance'",
        "Barz & Denzler 2020, 'Do We Train on Test Data? Purging CIFAR of Near-Duplicates'",
        "https://scikit-learn.org/stable/common_pitfalls.html#data-leakage",
    ],
)
@_with_thresholds
def leakage(train_inputs: torch.Tensor, val_inputs: torch.Tensor) -> Result:
    """Validation samples also occur, identically, in the training data.

    ## Why it matters
    A validation set that contains training samples measures memorisation, not generalisation:
    validation metrics look better than the model really is, early stopping and model selection
    pick the wrong checkpoint, and overfitting goes unseen. A common cause is resampling before
    the split: oversampling a class by duplicating its rows, then splitting, puts copies of the
    same rows on both sides.

    ## How it is detected
    Detected by hashing every sample's bytes
    (a vectorised 64-bit hash, confirmed byte for byte; ~100k samples take well under a second) and
    counting validation samples with an identical training sample. It fires when that fraction
    reaches {leak_fraction:.0%}, exceeds the training data's own duplicate rate by
    {leak_excess:.0%}, and the count is well above what that rate predicts
    ({leak_z:g} standard deviations), so natural duplicates (data with few distinct
    values, the odd repeated sample) are not mistaken for a leak. It also fires, whatever the
    duplicate rate, when at least {leak_fraction:.0%} of the validation samples are copies of
    more than {leak_z:g} distinct training rows that share neither half of their values (in
    {leak_halvings} random halvings of the columns) with any other training sample: natural
    repeats have look-alikes, copies do not. When those copies are also repeated within a split,
    the data was resampled before it was split.
    """
    t = THRESHOLDS
    if not (torch.is_tensor(train_inputs) and torch.is_tensor(val_inputs)):
        return None
    if len(train_inputs) == 0 or len(val_inputs) == 0:
        return None
    if train_inputs.shape[1:] != val_inputs.shape[1:] or train_inputs.dtype != val_inputs.dtype:
        return None  # samples of different shape or dtype cannot be identical
    words_tr, words_va = _row_bytes(train_inputs), _row_bytes(val_inputs)
    h_tr, h_va = _row_hashes(words_tr), _row_hashes(words_va)
    found = _exact_matches(words_tr, h_tr, words_va, h_va)
    leaked = int(found.sum())
    if leaked == 0:
        return None
    n_val = len(val_inputs)
    fraction = leaked / n_val
    baseline = _self_duplicate_fraction(words_tr, h_tr)
    expected = baseline * n_val
    above_rate = (
        fraction >= t.leak_fraction
        and fraction - baseline >= t.leak_excess
        and leaked > expected + t.leak_z * math.sqrt(expected + 1)
    )
    same = _counts_in(h_tr, h_va)  # identical training rows per validation row
    copy_mask = found & _isolated(words_tr, words_va, same)
    copied, copied_rows = int(copy_mask.sum()), len(np.unique(h_va[copy_mask]))
    copies = copied >= t.leak_fraction * n_val and copied_rows > t.leak_z
    if not (above_rate or copies):
        return None
    repeated = int((copy_mask & ((same >= 2) | (_counts_in(h_va, h_va) >= 2))).sum())
    resampled = copies and repeated > 0
    first = int(np.nonzero(found)[0][0])
    head = f"{leaked} of {n_val} validation samples ({fraction:.1%})"
    copies_note = (
        f"{copied_rows} distinct rows that share neither half of their values with any other "
        "training sample: copies, not natural repeats"
    )
    if resampled:
        message = (
            f"{head} are copies of training samples ({copies_note}), and {repeated} of them are "
            "repeated within the training or validation data too: the data was resampled (e.g. a "
            "class oversampled by duplicating rows) before it was split. Split first, then "
            "resample only the training split; validation metrics will be optimistic"
        )
    elif above_rate:
        message = (
            f"{head} also occur identically in the training data (e.g. validation sample "
            f"{first}); the training data's own duplicate rate is {baseline:.1%}: validation "
            "metrics will be optimistic"
        )
    else:
        message = (
            f"{head} are exact copies of training samples ({copies_note}): the data held "
            "duplicates before it was split (duplicate records, or rows resampled before the "
            "split). Deduplicate, split, then resample only the training split; validation "
            "metrics will be optimistic"
        )
    return (
        message,
        {
            "leaked_samples": leaked,
            "val_samples": n_val,
            "leaked_fraction": fraction,
            "train_duplicate_fraction": baseline,
            "expected_natural_duplicates": expected,
            "first_leaked_val_index": first,
            "copied_samples": copied,
            "copied_rows": copied_rows,
            "repeated_within_splits": repeated,
            "resampled_before_split": float(resampled),
            "threshold": t.leak_fraction,
        },
    )


# ============================================================================ GW105


def class_axis(outputs: torch.Tensor, targets: torch.Tensor) -> int | None:
    """The axis of ``outputs`` that holds the classes for class-index ``targets``, or None.

    torch's layout is [B, C, d1, ...] with targets [B, d1, ...]; language models give
    [B, T, V] for targets [B, T]. The batch axis is not compared, so targets of the whole data set
    can be checked against the outputs of one probe batch.
    """
    if outputs.ndim == targets.ndim + 1:
        if outputs.shape[1:-1] == targets.shape[1:]:
            return outputs.ndim - 1
        if outputs.shape[2:] == targets.shape[1:]:
            return 1
    if outputs.ndim >= 2 and targets.ndim == 1:
        return 1
    return None


def multiclass_indices(targets: torch.Tensor) -> bool:
    """Whole-number targets 0..K with at least three distinct values: class indices of a
    multi-class task (0/1 and 0/255 encodings of a binary target are not)."""
    if targets.dtype == torch.bool or targets.numel() == 0:
        return False
    if targets.is_floating_point() and not bool((targets == torch.round(targets)).all()):
        return False
    if float(targets.min()) < 0 or float(targets.max()) < 2:
        return False
    return int(torch.unique(targets).numel()) >= 3


def is_probability_targets(targets: torch.Tensor, outputs: torch.Tensor | None) -> bool:
    """Float targets with the outputs' shape, in [0, 1], each row summing to 1 (soft labels)."""
    if outputs is None or not targets.is_floating_point() or targets.ndim < 2:
        return False
    if targets.shape[1:] != outputs.shape[1:]:
        return False
    if bool((targets < 0).any()) or bool((targets > 1).any()):
        return False
    dim = 1 if outputs.ndim > 2 and targets.ndim > 2 else -1
    sums = targets.double().sum(dim=dim)
    return bool(((sums - 1).abs() <= THRESHOLDS.prob_tolerance).all())


@rule(
    "GW105",
    "targets-out-of-range",
    "error",
    "preflight",
    fixes=[
        "Map class labels to 0..C-1 (e.g. labels 1..C minus 1, or np.unique(y, return_inverse=True)) "
        "and make the model output C logits.",
        "Give the model as many outputs as there are classes (num_classes = max label + 1).",
        "For binary cross-entropy, use targets in [0, 1] (map -1/+1 labels to 0/1).",
        "Pass class indices as integer (int64) tensors, not floats.",
    ],
    references=[
        "https://pytorch.org/docs/stable/generated/torch.nn.CrossEntropyLoss.html (targets in [0, C), ignore_index)",
        "https://pytorch.org/docs/stable/generated/torch.nn.BCEWithLogitsLoss.html (targets in [0, 1])",
    ],
)
def targets_out_of_range(outputs: torch.Tensor, targets: torch.Tensor, loss_kind: str) -> Result:
    """The targets fall outside what the loss accepts for these outputs.

    ## Why it matters
    Cross-entropy and NLL take class indices in [0, C) (C = the model's number of outputs, with
    ``ignore_index=-100`` positions skipped): an index >= C crashes on CUDA with an opaque
    device-side assert, and labels 1..C silently waste an output and never train class C. Binary
    cross-entropy takes targets in [0, 1]; -1/+1 labels make its loss unbounded below. Float
    class indices (0.0, 1.0, 2.0) are rejected by class-index losses.

    ## How it is detected
    Detected from the targets'
    dtype and range against the outputs' class axis.
    """
    if not (torch.is_tensor(outputs) and torch.is_tensor(targets)) or targets.numel() == 0:
        return None
    targets = targets.detach()
    if loss_kind in CLASS_INDEX_LOSSES:
        if targets.is_floating_point():
            if is_probability_targets(targets, outputs):
                return None
            whole = bool((targets == torch.round(targets)).all())
            if not whole or targets.shape[1:] == outputs.shape[1:]:
                return None  # continuous targets: GW205 (loss-task-mismatch)
            return (
                f"{loss_kind} takes class indices as integers, but the targets are "
                f"{str(targets.dtype).removeprefix('torch.')} (values {_few(targets)}): "
                "convert them with .long()",
                {
                    "float_class_indices": 1.0,
                    "min_target": float(targets.min()),
                    "max_target": float(targets.max()),
                },
            )
        axis = class_axis(outputs, targets)
        if axis is None:
            return None
        classes = outputs.shape[axis]
        valid = targets[targets != IGNORE_INDEX]
        if valid.numel() == 0:
            return None
        bad = (valid < 0) | (valid >= classes)
        n_bad = int(bad.sum())
        if n_bad == 0:
            return None
        lo, hi = int(valid.min()), int(valid.max())
        hint = (
            " (labels look 1-based: subtract 1)"
            if lo == 1 and hi == classes
            else f" (the model needs {hi + 1} outputs)"
            if lo >= 0
            else " (negative labels other than ignore_index -100)"
        )
        return (
            f"targets range over {lo}..{hi} but the model outputs {classes} classes, so valid "
            f"indices are 0..{classes - 1}: {n_bad} targets ({n_bad / valid.numel():.1%}) are out "
            f"of range{hint}",
            {
                "min_target": lo,
                "max_target": hi,
                "num_classes": classes,
                "out_of_range": n_bad,
                "out_of_range_fraction": n_bad / valid.numel(),
            },
        )
    if loss_kind in BCE_LOSSES:
        if targets.dtype == torch.bool:
            return None
        lo, hi = float(targets.min()), float(targets.max())
        if lo >= 0 and hi <= 1:
            return None
        if multiclass_indices(targets):
            return None  # class indices 0..K: GW205 (a multi-class task with BCE)
        bad = (targets < 0) | (targets > 1)
        n_bad = int(bad.sum())
        return (
            f"binary cross-entropy needs targets in [0, 1] but they range over {lo:g}..{hi:g} "
            f"({n_bad} values, {n_bad / targets.numel():.1%}, outside)"
            + (": map -1/+1 labels to 0/1" if lo == -1 and hi == 1 else ""),
            {
                "min_target": lo,
                "max_target": hi,
                "out_of_range": n_bad,
                "out_of_range_fraction": n_bad / targets.numel(),
            },
        )
    return None


def _few(t: torch.Tensor, k: int = 5) -> str:
    values = torch.unique(t.flatten())[:k].tolist()
    return ", ".join(f"{v:g}" for v in values) + (", ..." if torch.unique(t).numel() > k else "")
