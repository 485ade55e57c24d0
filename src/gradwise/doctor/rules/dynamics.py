"""Optimisation dynamics, watched live (GW301-GW309): pure functions over the Doctor's signals."""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

from gradwise._format import percent, times
from gradwise.doctor.findings import rule
from gradwise.doctor.rules._types import Result
from gradwise.doctor.signals import Series, Signals


@dataclass(frozen=True)
class Thresholds:
    """Every number the dynamics rules use, in one place (counts are in sampled steps)."""

    explode_factor: float = 10.0
    """GW302: a gradient norm this many times the largest of the preceding steps is a spike
    (healthy mini-batch gradients vary a lot, so the reference is the recent maximum)."""
    explode_history: int = 50
    """GW302: steps of history a spike is compared with."""
    explode_min_history: int = 10
    """GW302: steps of history needed before judging spikes."""
    explode_growth: float = 1e3
    """GW302: growth of the gradient norm by this factor over consecutive rising steps."""
    explode_growth_window: int = 6
    vanish_ratio: float = 1e-3
    """GW303: early layers' relative gradient (||g||/||w||) below this fraction of the late layers'."""
    vanish_samples: int = 3
    """GW303: consecutive samples that must agree."""
    dead_fraction: float = 0.5
    """GW304: fraction of a ReLU layer's units never active over the activation window."""
    dead_samples: int = 2
    dead_at_once: float = 0.9
    """GW304: a layer this dead in its first full window (the first steps) is reported at once:
    healthy initialisations leave almost no unit silent for 5 batches, so this is a dead start
    (a negative bias shift, a bad initialisation), not noise."""
    lr_high_update_ratio: float = 0.05
    """GW305: median update-to-weight ratio far above the ~1e-3 of healthy training (Karpathy 2019)."""
    lr_high_divergence: float = 1.5
    """GW305: smoothed loss this many times its minimum so far means the run is diverging."""
    lr_high_samples: int = 3
    lr_low_update_ratio: float = 1e-5
    """GW306: median update-to-weight ratio this far below ~1e-3."""
    lr_low_loss_change: float = 0.01
    """GW306: relative change of the smoothed loss over the window below this."""
    lr_low_samples: int = 5
    history: int = 1000
    """GW305: steps of loss history examined (bounds the cost of long runs)."""
    min_steps: int = 50
    """GW306/GW307: steps before judging progress (warmup may still be running)."""
    plateau_window: int = 100
    """GW307: steps over which the loss must have stopped improving."""
    plateau_improvement: float = 0.01
    """GW307: relative improvement of the smoothed loss over the window below this."""
    plateau_learned: float = 0.8
    """GW307: ... while the loss is still above this fraction of its initial value (learned little)."""
    oscillation_window: int = 60
    """GW308: recent steps examined."""
    oscillation_amplitude: float = 0.5
    """GW308: 10th-90th percentile spread of the recent losses relative to the initial loss
    (healthy mini-batch noise late in training is small next to the initial loss)."""
    oscillation_peak: float = 1.25
    """GW308: ... with the 90th percentile this far above the initial loss: the swings climb above
    where training started, which noisy but healthy runs do not."""
    saturation_fraction: float = 0.5
    """GW309: fraction of sigmoid/tanh outputs within 1% of their bounds."""
    saturation_samples: int = 2


T = Thresholds()


@rule(
    "GW301",
    "nonfinite-loss-or-gradients",
    "error",
    "live",
    fixes=[
        "Find the first non-finite value: run with torch.autograd.set_detect_anomaly(True) for a few steps.",
        "Guard logs and divisions in custom losses (clamp probabilities, add an epsilon), or use the "
        "fused, stable forms (cross_entropy on logits, BCEWithLogitsLoss).",
        "Lower the learning rate and clip the gradient norm (train.grad_clip: 1.0).",
        "With fp16, use a GradScaler or switch to bf16.",
    ],
    references=[
        "PyTorch autograd anomaly detection: https://pytorch.org/docs/stable/autograd.html#anomaly-detection",
        "Micikevicius et al. 2018, Mixed Precision Training (loss scaling)",
    ],
)
def nonfinite(s: Signals) -> Result:
    """The loss or the gradients became NaN or infinite.

    ## Why it matters
    One non-finite value poisons every weight it reaches through the optimizer: the run is lost from
    that step on. Typical causes are log(0) or division by zero in a hand-written loss, a learning
    rate so high that activations overflow, and fp16 without loss scaling.

    ## How it is detected
    Every sampled step checks the loss values since the last check and the global gradient norm.
    """
    bad = [
        (st, v)
        for st, v in zip(s.loss.steps[s.since :][-50:], s.losses()[-50:], strict=True)
        if not math.isfinite(v)
    ]
    if bad:
        step, value = bad[0]
        return f"the loss is {value} at step {step}", {"loss": value, "step_first_seen": step}
    grads = s.grads()[1]
    if grads and not math.isfinite(grads[-1]) and not s.loss_scaling:
        return "the gradients are not finite", {"grad_norm": grads[-1]}
    return None


@rule(
    "GW302",
    "exploding-gradients",
    "error",
    "live",
    fixes=[
        "Clip the global gradient norm (train.grad_clip: 1.0; torch.nn.utils.clip_grad_norm_).",
        "Lower the learning rate 3-10x, or lengthen the warmup.",
        "For RNNs use LSTM/GRU cells and clipping; for deep nets add normalisation and residual connections.",
    ],
    references=[
        "Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural networks",
        "Goodfellow et al. 2016, Deep Learning, section 10.11.1 (clipping gradients)",
    ],
)
def exploding_gradients(s: Signals) -> Result:
    """The gradient norm spiked far above its recent level, or grows by orders of magnitude.

    ## Why it matters
    A huge gradient makes one enormous step that throws the weights far from where training had
    brought them; in RNNs the norm can grow exponentially with sequence length.

    ## How it is detected
    The global gradient norm (before clipping) is recorded at every step. A step whose norm is more
    than 10x the largest of the preceding 50 steps is a spike; a norm rising at every step for
    several steps by a factor of 1000 is a blow-up. When the loop clips (``grad_clip`` given to
    ``Doctor.step``; the Trainer does), spikes are what clipping is for: only a blow-up counts.
    """
    steps, g = s.grads()
    first = max(len(g) - max(s.new_values, 1), T.explode_min_history)
    for i in range(first, len(g) if s.grad_clip is None else first):
        if not math.isfinite(g[i]):
            break  # GW301 reports non-finite values
        previous = max(g[max(0, i - T.explode_history) : i])
        if previous > 0 and g[i] > T.explode_factor * previous:
            return (
                f"the gradient norm jumped to {g[i]:.3g} at step {steps[i]}, "
                f"{times(g[i] / previous)} the largest of the preceding steps ({previous:.3g})",
                {"grad_norm": g[i], "previous_max": previous, "factor": g[i] / previous},
            )
    finite = [v for v in g[-T.explode_history :] if math.isfinite(v)]
    window = finite[-T.explode_growth_window :]
    if len(window) == T.explode_growth_window and window[0] > 0:
        growth = window[-1] / window[0]
        if all(b > a for a, b in itertools.pairwise(window)) and growth > T.explode_growth:
            return (
                f"the gradient norm grew {growth:.3g}x over {len(window)} consecutive steps",
                {"grad_norm": window[-1], "growth": growth},
            )
    return None


@rule(
    "GW303",
    "vanishing-gradients",
    "warning",
    "live",
    fixes=[
        "Use ReLU-family activations instead of sigmoid/tanh in hidden layers, with He initialisation.",
        "Add normalisation (BatchNorm/LayerNorm) and residual connections.",
        "For recurrent models use LSTM/GRU rather than a vanilla RNN.",
    ],
    references=[
        "Hochreiter 1991; Bengio, Simard & Frasconi 1994, Learning long-term dependencies is difficult",
        "Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward networks",
        "He et al. 2016, Deep Residual Learning",
    ],
)
def vanishing_gradients(s: Signals) -> Result:
    """Early layers receive gradients orders of magnitude smaller than late layers: they barely learn.

    ## Why it matters
    Backpropagation multiplies by each layer's Jacobian; with saturating activations or poor scaling
    the product shrinks geometrically with depth, and the first layers stop learning.

    ## How it is detected
    Each layer's relative gradient ||g|| / ||w|| in forward order; the smallest among the first third
    of layers is compared with the median of the last third, over consecutive samples.
    """
    # a zero-initialised layer (LoRA's B) and the layer it gates (A) learn slowly at first by
    # design, not because depth shrinks their gradients
    layers = [n for n in s.layers if len(s.layer_grad_norm.get(n, ())) and n not in s.zero_init]
    if s.zero_init:
        layers = [n for n in layers if not any(_siblings(n, z) for z in s.zero_init)]
    if len(layers) < 3:
        return None
    third = max(1, len(layers) // 3)
    ratios = []
    for i in range(1, T.vanish_samples + 1):
        series = [s.layer_grad_norm[name].values for name in layers]
        if any(len(v) < i for v in series):
            return None
        # exactly zero: a gradient blocked by design (LoRA's A under a zero-initialised B), not
        # one that vanished on its way down
        early = min((v[-i] for v in series[:third] if v[-i] > 0), default=None)
        if early is None:
            return None
        late = statistics.median(v[-i] for v in series[-third:])
        if late <= 0:
            return None
        ratios.append(early / late)
    if max(ratios) < T.vanish_ratio:
        return (
            f"the first layers' relative gradients are {ratios[0]:.1e} of the last layers'",
            {"early_to_late_ratio": ratios[0], "layers": len(layers)},
        )
    return None


@rule(
    "GW304",
    "dying-relu",
    "warning",
    "live",
    fixes=[
        "Lower the learning rate (large updates push pre-activations permanently negative).",
        "Use LeakyReLU/GELU/SiLU, which keep a gradient for negative inputs.",
        "Use He initialisation and zero (not negative) biases; add normalisation before the ReLU.",
    ],
    when="activations",
    explains=("GW303", "GW306", "GW307", "GW402"),
    references=[
        "Lu et al. 2019, Dying ReLU and Initialization: Theory and Numerical Examples",
        "Maas, Hannun & Ng 2013, Rectifier Nonlinearities Improve Neural Network Acoustic Models (LeakyReLU)",
    ],
)
def dying_relu(s: Signals) -> Result:
    """A large fraction of a ReLU layer's units output zero for every input: they are dead.

    ## Why it matters
    A dead unit has zero gradient for every example and never recovers: the network has lost that
    capacity. It usually follows a too-large learning rate or a negative bias shift.

    ## How it is detected
    Forward hooks on ``nn.ReLU`` modules record, per unit (channel), whether it was active for any
    input over a window of 5 batches (the first 5 steps, then sampled steps); the fraction never
    active is compared with a threshold over consecutive samples, or, for a layer almost entirely
    dead in its first window, at once: a dead start is the cause that vanishing gradients, a
    too-low learning rate and a plateau then show as symptoms, and it is reported as such.
    """
    dead = {name: a.dead for name, a in s.activations.items()}
    worst = _worst_sustained(dead, T.dead_samples, T.dead_fraction)
    if worst is None:
        start = [
            (n, v.values[0]) for n, v in dead.items() if len(v) and v.values[0] >= T.dead_at_once
        ]
        if not start:
            return None
        name, fraction = max(start, key=lambda hit: hit[1])
        return (
            f"{fraction:.0%} of the units of {name} never activated from the first steps: they "
            "were dead from the start (a negative bias or a bad initialisation), so the layers "
            "below get no gradient",
            {"dead_fraction": fraction, "from_start": 1.0},
        )
    name, fraction = worst
    return f"{fraction:.0%} of the units of {name} never activate", {"dead_fraction": fraction}


@rule(
    "GW305",
    "learning-rate-too-high",
    "error",
    "live",
    explains=("GW301", "GW304", "GW308"),
    fixes=[
        "Lower the learning rate 3-10x (gradwise check runs a learning-rate range test).",
        "Use warmup (schedule.warmup: 0.05) and clip the gradient norm.",
        "With SGD, lower the momentum or the learning rate together.",
    ],
    references=[
        "Smith 2017, Cyclical Learning Rates for Training Neural Networks (LR range test)",
        "Karpathy 2019, A Recipe for Training Neural Networks (update-to-weight ratio ~1e-3)",
    ],
)
def lr_too_high(s: Signals) -> Result:
    """Updates are far too large for the weights, and the loss is diverging.

    ## Why it matters
    When each step changes the weights by a large fraction of their size, the optimizer overshoots:
    the loss rises or jumps around instead of falling, and later blows up.

    ## How it is detected
    Both must hold: the median over layers of the update-to-weight ratio ||w_t+1 - w_t|| / ||w_t||
    is far above the ~1e-3 of healthy training, and the smoothed training loss has risen well
    above its minimum so far.
    """
    ratio = s.median_update_ratio(T.lr_high_samples)
    if ratio is None or ratio < T.lr_high_update_ratio or len(s.loss) < 10:
        return None
    smoothed = s.smoothed_losses()[-T.history :]
    if not smoothed:
        return None
    best, now = min(smoothed), smoothed[-1]
    if best > 0 and now > T.lr_high_divergence * best:
        return (
            f"updates are {ratio:.2g} of the weights' size (healthy: ~1e-3) and the loss rose to "
            f"{times(now / best)} its minimum",
            {"update_ratio": ratio, "loss_to_min": now / best},
        )
    return None


@rule(
    "GW306",
    "learning-rate-too-low",
    "warning",
    "live",
    fixes=[
        "Raise the learning rate 10x, or run the learning-rate range test (gradwise check).",
        "Check that the scheduler is not stuck at its floor and that warmup is not too long.",
    ],
    references=[
        "Karpathy 2019, A Recipe for Training Neural Networks (update-to-weight ratio ~1e-3)",
        "Smith 2017, Cyclical Learning Rates for Training Neural Networks",
    ],
)
def lr_too_low(s: Signals) -> Result:
    """Updates are tiny compared with the weights and the loss barely moves.

    ## Why it matters
    Training spends its budget without learning: a learning rate far too low looks like a plateau.

    ## How it is detected
    After warmup, the median update-to-weight ratio stays far below ~1e-3 over several samples and
    the smoothed loss changed by less than 1% over the same stretch.
    """
    if s.step < T.min_steps:
        return None
    ratio = s.median_update_ratio(T.lr_low_samples)
    if ratio is None or ratio > T.lr_low_update_ratio:
        return None
    recent = s.smoothed_losses()[-T.plateau_window :]
    if len(recent) < 2 or recent[0] == 0:
        return None
    change = abs(recent[-1] - recent[0]) / abs(recent[0])
    if change < T.lr_low_loss_change:
        return (
            f"updates are only {ratio:.1e} of the weights' size and the loss changed {change:.2%}",
            {"update_ratio": ratio, "loss_change": change},
        )
    return None


@rule(
    "GW307",
    "loss-plateau",
    "warning",
    "live",
    fixes=[
        "Check the data and labels: a model that cannot fit one batch has a bug (gradwise check).",
        "Raise the learning rate, or use a schedule with warmup; try Adam/AdamW if on SGD.",
        "Increase model capacity; check for saturated activations (GW309) or dead units (GW304).",
    ],
    references=["Karpathy 2019, A Recipe for Training Neural Networks"],
)
def plateau(s: Signals) -> Result:
    """The loss stopped improving while it is still close to where it started.

    ## Why it matters
    The run is stuck early: more steps will not help, something in the set-up has to change.
    A run that has already learned (loss far below its initial value) and then flattens is
    converging, not stuck, and is not flagged.

    ## How it is detected
    Over the last window of steps the smoothed loss improved by less than 1%, while it is still
    above 80% of its initial value. For classification the initial value is at least the
    chance-level loss ln(C): a fine-tuned model starts far below chance, and a flat loss there
    has been learned already.
    """
    if s.step < max(T.min_steps, T.plateau_window) or len(s.loss) < T.plateau_window:
        return None
    first = [v for v in s.losses()[:10] if math.isfinite(v)]
    window = s.smoothed_losses()[-T.plateau_window :]
    if len(window) < T.plateau_window or not first:
        return None
    initial = _reference(s, statistics.mean(first))
    start, now = window[len(window) // 5], window[-1]  # skip the EMA's start-up
    if initial <= 0 or start <= 0:
        return None
    improvement = (start - now) / start
    if improvement < T.plateau_improvement and now > T.plateau_learned * initial:
        return (
            f"the loss has not improved over the last {T.plateau_window} steps and is still "
            f"{percent(now / initial)} of its initial value",
            {"loss": now, "initial_loss": initial, "improvement": improvement},
        )
    return None


@rule(
    "GW308",
    "oscillating-loss",
    "warning",
    "live",
    fixes=[
        "Lower the learning rate 2-3x; with SGD, reduce momentum or use Nesterov momentum.",
        "Increase the batch size (or accumulate gradients) to reduce gradient noise.",
        "Use a decaying schedule (cosine) so late steps are smaller.",
    ],
    references=[
        "Goodfellow et al. 2016, Deep Learning, section 8.3 (learning-rate and momentum effects)",
        "Smith 2018, A disciplined approach to neural network hyper-parameters",
    ],
)
def oscillating(s: Signals) -> Result:
    """The loss swings up and down by a large fraction of its value without trending down.

    ## Why it matters
    The optimizer bounces instead of descending: the learning rate is too high for the curvature,
    batches are too small and noisy, or the data arrive in an order (sorted, never shuffled) that
    makes every batch pull the model somewhere else.

    ## How it is detected
    Over the recent steps the spread of the loss (10th to 90th percentile) is a large fraction of
    the initial loss, its peaks climb well above the initial loss, and the loss is not falling.
    For classification the initial loss is at least the chance-level loss ln(C), so the ordinary
    batch-to-batch noise of a fine-tuned model, which starts far below chance, is not a swing.
    """
    values = [v for v in s.losses()[-T.oscillation_window :] if math.isfinite(v)]
    first = [v for v in s.loss.values[:10] if math.isfinite(v)]
    if len(values) < T.oscillation_window or s.step < T.min_steps or not first:
        return None
    initial = _reference(s, statistics.mean(first))
    deciles = statistics.quantiles(values, n=10)
    amplitude = (deciles[-1] - deciles[0]) / initial if initial > 0 else 0.0
    third = len(values) // 3
    falling = statistics.mean(values[-third:]) < 0.9 * statistics.mean(values[:third])
    peaks = deciles[-1] > T.oscillation_peak * initial
    if amplitude > T.oscillation_amplitude and peaks and not falling:
        return (
            f"the loss swings over {percent(amplitude)} of its initial value without falling",
            {"amplitude": amplitude, "loss_p10": deciles[0], "loss_p90": deciles[-1]},
        )
    return None


@rule(
    "GW309",
    "saturated-activations",
    "warning",
    "live",
    explains=("GW303",),
    fixes=[
        "Use ReLU-family activations in hidden layers, or normalise before sigmoid/tanh.",
        "Use Xavier/Glorot initialisation for tanh/sigmoid layers and standardise the inputs.",
        "Lower the learning rate if saturation appears during training rather than at the start.",
    ],
    references=[
        "Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward networks"
    ],
)
def saturated(s: Signals) -> Result:
    """Hidden sigmoid/tanh units sit at their bounds, where their gradient is nearly zero.

    ## Why it matters
    A saturated sigmoid or tanh passes almost no gradient, so the layers below stop learning.

    ## How it is detected
    Forward hooks on ``nn.Sigmoid``/``nn.Tanh`` modules measure the fraction of outputs within 1% of
    the bounds over consecutive samples. The model's final module is exempt: a confident output
    sigmoid is expected.
    """
    hidden = {name: a.saturated for name, a in s.activations.items() if name != s.output_module}
    worst = _worst_sustained(hidden, T.saturation_samples, T.saturation_fraction)
    if worst is None:
        return None
    return f"{worst[1]:.0%} of the outputs of {worst[0]} are saturated", {
        "saturated_fraction": worst[1]
    }


def _siblings(a: str, b: str) -> bool:
    """Modules with the same parent (lora_A and lora_B of one adapted layer)."""
    return a.rpartition(".")[0] == b.rpartition(".")[0]


def _reference(s: Signals, initial: float) -> float:
    """The loss scale GW307 and GW308 judge against: the initial loss, and for classification at
    least the chance-level loss ln(C) (a pretrained model starts far below it)."""
    if s.loss_kind in ("cross_entropy", "nll") and s.num_classes and s.num_classes >= 2:
        return max(initial, math.log(s.num_classes))
    return initial


def _worst_sustained(
    series: dict[str, Series], samples: int, threshold: float
) -> tuple[str, float] | None:
    """The layer whose last ``samples`` values all exceed ``threshold``, with the highest latest value."""
    hits = [
        (name, values.last(samples)[-1])
        for name, values in series.items()
        if len(values) >= samples and min(values.last(samples)) > threshold
    ]
    return max(hits, key=lambda hit: hit[1]) if hits else None
