"""The advisor: a complete recipe for a model and data, with the reason and the reference for every choice.

    advised = gradwise.advise(model, train_data)
    advised.recipe          # a Recipe
    advised.advice          # [Advice(setting, value, why, references), ...]

The knowledge lives in this module, as data and small decision functions that read like an expert's
checklist (the ``RULES`` table at the bottom, one entry per setting). Every number the advisor uses is
in the constants right below, with its source.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gradwise.facts import Facts
from gradwise.recipe import Recipe

# -- the numbers, with their sources ----------------------------------------------------------

REF_BATCH = 64
"""Batch size at which the base learning rates below hold."""
BASE_LR = {  # AdamW peak learning rate at REF_BATCH, by architecture
    "transformer": 1e-3,  # at TRANSFORMER_REF_WIDTH (nanoGPT's character model: d_model 384, batch 64)
    "rnn": 3e-3,  # LSTM/GRU with clipping: 1e-3..3e-3 (Greff et al. 2017, LSTM: a search space odyssey)
    "cnn": 3e-3,  # CNNs with BatchNorm tolerate high rates (Ioffe & Szegedy 2015)
    "mlp": 3e-3,  # MLPs without normalisation layers, on standardised features
    "mlp_normalised": 0.1,  # MLPs with LayerNorm/BatchNorm: scale-invariant weights tolerate, and on
    # small tabular data profit from, high rates (Arora, Li & Lyu 2019); our sweeps of both tabular
    # examples were best at 0.3 (docs/benchmarks.md), 0.1 keeps a 3x margin below it
}
TRANSFORMER_REF_WIDTH = 384
"""Transformers: Adam's stable rate falls as 1/width (muP, Yang et al. 2022), so the base rate is
scaled by TRANSFORMER_REF_WIDTH / d_model, within TRANSFORMER_LR_RANGE."""
TRANSFORMER_LR_RANGE = (1e-4, 1e-2)
LARGE_TRANSFORMER = 10_000_000  # above this many parameters, lower beta2
SGD_LR_PER_256 = 0.1  # SGD with momentum: 0.1 per 256 samples (Goyal et al. 2017)
WEIGHT_DECAY = {
    "adamw": 0.05,
    "adamw_transformer": 0.1,
    "adamw_tiny_data": 0.1,
    "sgd": 5e-4,
    "few_epochs": 0.01,
}
TINY_DATA = 1_000  # samples: strong regularisation
FEW_EPOCHS = 3  # each sample seen this few times: the model underfits, regularisation only slows it
SMALL_DATA = 10_000
SGD_MIN_SAMPLES = 50_000  # SGD+Nesterov pays off for CNNs on large data with long schedules...
SGD_MIN_EPOCHS = 30  # ...and enough epochs (Wilson et al. 2017)
WARMUP = {"transformer": 0.1, "default": 0.05}  # fraction of steps (Goyal 2017; Popel & Bojar 2018)
MIN_LR = 0.01  # cosine floor as a fraction of the peak
CLIP = 1.0  # global gradient-norm clip (Pascanu et al. 2013)
LABEL_SMOOTHING = 0.1  # Szegedy et al. 2016; helps with >= 5 classes (Muller et al. 2019)
LABEL_SMOOTHING_MIN_CLASSES = 5
MIXUP_ALPHA, CUTMIX_ALPHA = 0.2, 1.0  # Zhang et al. 2018; Yun et al. 2019
MIXUP_MIN_SAMPLES, MIXUP_MIN_EPOCHS = 10_000, 30  # mixup needs data and long schedules to pay off
IMBALANCE_WEIGHTS, IMBALANCE_FOCAL = 10.0, 100.0  # majority/minority ratios
DROPOUT = {"tiny": 0.2, "small": 0.1, "large": 0.0, "transformer": 0.1}
DROP_PATH_MIN_DEPTH = 12  # stochastic depth helps deep residual stacks (Huang et al. 2016)
EMA_MIN_STEPS = 5_000  # EMA of weights pays off on longer runs (Polyak & Juditsky 1992)
EPOCHS = [(2_000, 50), (20_000, 30), (200_000, 20), (math.inf, 10)]  # (samples below, epochs)
PATIENCE_FRACTION, PATIENCE_MIN = 0.2, 5  # early stopping: a fifth of the budget, at least 5
BATCH_CHOICES = (128, 64, 32, 16)  # the largest that still gives MIN_STEPS optimizer steps
MIN_STEPS = 500  # fewer updates than this and a smaller batch learns more in the same budget
MEMORY_FRACTION = 0.5  # leave half the memory for activations' peaks and the allocator
HEAVY_TAIL = 0.01  # regression: > 1% of targets beyond 4 sigma -> Huber loss (Huber 1964)

REFS = {
    "adamw": "Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization, arXiv:1711.05101",
    "sgd": "Sutskever et al. 2013, On the importance of initialization and momentum in deep learning",
    "wilson": "Wilson et al. 2017, The Marginal Value of Adaptive Gradient Methods, arXiv:1705.08292",
    "goyal": "Goyal et al. 2017, Accurate, Large Minibatch SGD, arXiv:1706.02677 (linear scaling, warmup)",
    "malladi": "Malladi et al. 2022, On the SDEs and Scaling Rules for Adaptive Gradient Algorithms (square-root scaling for Adam)",
    "vaswani": "Vaswani et al. 2017, Attention Is All You Need, arXiv:1706.03762",
    "mup": "Yang et al. 2022, Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer (muP), arXiv:2203.03466",
    "popel": "Popel & Bojar 2018, Training Tips for the Transformer Model, arXiv:1804.00247",
    "cosine": "Loshchilov & Hutter 2017, SGDR: Stochastic Gradient Descent with Warm Restarts, arXiv:1608.03983",
    "pascanu": "Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural networks",
    "smoothing": "Szegedy et al. 2016, Rethinking the Inception Architecture; Muller et al. 2019, When Does Label Smoothing Help?",
    "mixup": "Zhang et al. 2018, mixup, arXiv:1710.09412; Yun et al. 2019, CutMix, arXiv:1905.04899",
    "focal": "Lin et al. 2017, Focal Loss for Dense Object Detection, arXiv:1708.02002",
    "weights": "King & Zeng 2001, Logistic Regression in Rare Events Data (class weights)",
    "dropout": "Srivastava et al. 2014, Dropout, JMLR 15",
    "droppath": "Huang et al. 2016, Deep Networks with Stochastic Depth, arXiv:1603.09382",
    "ema": "Polyak & Juditsky 1992, Acceleration of Stochastic Approximation by Averaging",
    "amp": "Micikevicius et al. 2018, Mixed Precision Training; Kalamkar et al. 2019, A Study of BFLOAT16",
    "prechelt": "Prechelt 1998, Early Stopping - But When?",
    "huber": "Huber 1964, Robust Estimation of a Location Parameter",
    "loader": "PyTorch docs, torch.utils.data (num_workers, pin_memory, persistent_workers)",
    "masters": "Masters & Luschi 2018, Revisiting Small Batch Training for Deep Neural Networks, arXiv:1804.07612",
    "smith": "Smith 2017, Cyclical Learning Rates for Training Neural Networks (LR range test), arXiv:1506.01186",
    "arora": "Arora, Li & Lyu 2019, Theoretical Analysis of Auto Rate-Tuning by Batch Normalization, arXiv:1812.03981",
}


@dataclass(frozen=True)
class Advice:
    """One advised setting: the value, why, and where that judgment comes from."""

    setting: str
    value: Any
    why: str
    references: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "setting": self.setting,
            "value": self.value,
            "why": self.why,
            "references": self.references,
        }


@dataclass
class Advised:
    """The advisor's output: the recipe, the advice behind it, and the facts it was based on."""

    recipe: Recipe
    advice: list[Advice]
    facts: Facts

    def __iter__(self):  # recipe, advice = gradwise.advise(...)
        return iter((self.recipe, self.advice))

    def table(self) -> list[tuple[str, str, str, str]]:
        return [(a.setting, _show(a.value), a.why, "; ".join(a.references)) for a in self.advice]


@dataclass
class _Context:
    """What the decision functions read: the facts, the budget and the decisions made so far."""

    facts: Facts
    epochs: int
    budget_given: bool = False
    chosen: dict[str, Any] = field(default_factory=dict)
    zoo_kwargs: set[str] = field(default_factory=set)  # model kwargs the zoo factory accepts

    @property
    def f(self) -> Facts:
        return self.facts


Decision = tuple[Any, str, list[str]] | None  # (value, why, reference keys), or None: no advice


# -- the decisions, one per setting ------------------------------------------------------------


def epochs(c: _Context) -> Decision:
    return (
        c.epochs,
        f"budget for {c.f.n_samples:,} training samples (the epoch budget you gave or a default by data size)",
        [],
    )


def batch_size(c: _Context) -> Decision:
    n, epochs = c.f.n_samples, c.epochs
    size = next(
        (b for b in BATCH_CHOICES if epochs * math.ceil(n / b) >= MIN_STEPS), BATCH_CHOICES[-1]
    )
    steps = epochs * math.ceil(n / size)
    why = (
        f"the largest batch that still gives {MIN_STEPS}+ optimizer steps in {epochs} epochs of "
        f"{n:,} samples ({steps:,}): with a small budget, more updates beat larger batches"
    )
    if c.f.memory_gb:
        per_sample_mb = 4 * math.prod(c.f.input_shape) * max(c.f.depth, 1) * 8 / 2**20
        fits = int(c.f.memory_gb * 1024 * MEMORY_FRACTION / max(per_sample_mb, 1e-6))
        if fits < size:
            size = max(1, 2 ** int(math.log2(max(fits, 1))))
            why = f"the largest power of two that fits in {c.f.memory_gb:.1f} GB with half to spare"
    return size, why, ["masters"]


def optimizer(c: _Context) -> Decision:
    f = c.f
    if f.architecture == "cnn" and f.n_samples >= SGD_MIN_SAMPLES and c.epochs >= SGD_MIN_EPOCHS:
        return (
            "sgd",
            "a CNN on a large data set with a long schedule: SGD with Nesterov momentum generalises slightly better than adaptive methods",
            ["sgd", "wilson"],
        )
    why = {
        "transformer": "Transformers need an adaptive optimizer (SGD trains them poorly); decoupled weight decay",
        "rnn": "recurrent nets train far more reliably with Adam-type optimizers",
        "cnn": "small data or a short schedule: AdamW converges fast and is forgiving about the learning rate",
        "mlp": "the robust default for MLPs: fast convergence, forgiving about the learning rate",
    }[f.architecture]
    return "adamw", why, ["adamw"]


def betas(c: _Context) -> Decision:
    if c.chosen["optim.name"] == "sgd":
        return None
    if c.f.architecture == "transformer":
        beta2 = 0.95 if c.f.params > LARGE_TRANSFORMER else 0.98
        return (
            [0.9, beta2],
            f"Transformers: a shorter second-moment memory (beta2 {beta2}) damps loss spikes",
            ["vaswani"],
        )
    return [0.9, 0.999], "Adam's standard moments", ["adamw"]


def momentum(c: _Context) -> Decision:
    if c.chosen["optim.name"] != "sgd":
        return None
    return 0.9, "standard heavy-ball momentum with Nesterov look-ahead", ["sgd"]


def learning_rate(c: _Context) -> Decision:
    batch = c.chosen["data.batch_size"]
    if c.chosen["optim.name"] == "sgd":
        lr = SGD_LR_PER_256 * batch / 256
        return lr, f"SGD: 0.1 per 256 samples, scaled linearly to batch {batch}", ["goyal"]
    base = BASE_LR[c.f.architecture]
    normalised = c.f.kinds.get("layernorm", 0) + c.f.kinds.get("batchnorm", 0) > 0
    if c.f.architecture == "mlp" and normalised:
        base = BASE_LR["mlp_normalised"]
    width_note, refs = "", ["malladi", "adamw"]
    if c.f.architecture == "transformer" and c.f.width:
        low, high = TRANSFORMER_LR_RANGE
        base = min(max(base * TRANSFORMER_REF_WIDTH / c.f.width, low), high)
        width_note = (
            f" ({BASE_LR['transformer']:g} at width {TRANSFORMER_REF_WIDTH}, scaled by 1/width "
            f"to {c.f.width})"
        )
        refs.append("mup")
    if c.f.architecture == "mlp" and normalised:
        refs.append("arora")
    lr = float(f"{base * math.sqrt(batch / REF_BATCH):.2g}")
    kind = (
        f"normalised {c.f.architecture}"
        if c.f.architecture == "mlp" and normalised
        else c.f.architecture
    )
    why = (
        f"AdamW for {_a(kind)} ({c.f.params:,} parameters): {base:.2g} at batch {REF_BATCH}"
        f"{width_note}, scaled by the square root of the batch ratio to batch {batch}"
    )
    return lr, why, refs


def weight_decay(c: _Context) -> Decision:
    if c.epochs <= FEW_EPOCHS:
        return (
            WEIGHT_DECAY["few_epochs"],
            f"only {c.epochs} passes over the data: the model underfits, so keep decay light",
            ["adamw"],
        )
    if c.chosen["optim.name"] == "sgd":
        return WEIGHT_DECAY["sgd"], "SGD: L2 5e-4 is the standard for CNNs", ["goyal"]
    if c.f.architecture == "transformer":
        return (
            WEIGHT_DECAY["adamw_transformer"],
            "Transformers: 0.1 (GPT-style), never on norms, biases or embeddings",
            ["adamw"],
        )
    if c.f.n_samples < TINY_DATA:
        return (
            WEIGHT_DECAY["adamw_tiny_data"],
            f"only {c.f.n_samples} samples: stronger regularisation",
            ["adamw"],
        )
    return (
        WEIGHT_DECAY["adamw"],
        "AdamW's usual 0.01-0.1; never on norms, biases or embeddings",
        ["adamw"],
    )


def schedule(c: _Context) -> Decision:
    return (
        "warmup_cosine",
        "linear warmup then cosine decay to 1% of the peak: robust and needs no tuning of milestones",
        ["cosine", "goyal"],
    )


def warmup(c: _Context) -> Decision:
    fraction = WARMUP.get(c.f.architecture, WARMUP["default"])
    why = {
        True: "Transformers: a longer warmup keeps Adam's early, poorly estimated moments from taking huge steps in attention layers",
        False: "a short warmup protects the first steps, when Adam's second-moment estimate is still noisy",
    }[c.f.architecture == "transformer"]
    return fraction, why, ["popel" if c.f.architecture == "transformer" else "goyal"]


def min_lr(c: _Context) -> Decision:
    return MIN_LR, "decay to 1% of the peak: the last steps refine instead of bouncing", ["cosine"]


def grad_clip(c: _Context) -> Decision:
    if c.f.architecture in ("transformer", "rnn"):
        return (
            CLIP,
            f"{c.f.architecture}s have rare, huge gradient spikes: clipping the global norm at 1.0 is essential",
            ["pascanu"],
        )
    return CLIP, "cheap insurance against a rare bad batch; with Adam it seldom binds", ["pascanu"]


def precision(c: _Context) -> Decision:
    if c.f.device == "cpu":
        return "fp32", "CPU: autocast to bf16 rarely pays off for small models", ["amp"]
    if c.f.bf16:
        return (
            "bf16",
            f"{c.f.device} supports bfloat16: half the activation memory, no loss scaling needed",
            ["amp"],
        )
    return "fp16", f"{c.f.device} has no bf16: fp16 with dynamic loss scaling", ["amp"]


def dropout(c: _Context) -> Decision:
    if "dropout" not in c.zoo_kwargs:
        return None
    if c.epochs <= FEW_EPOCHS:
        return (
            0.0,
            f"only {c.epochs} passes over the data: the model underfits, dropout would only slow it",
            ["dropout"],
        )
    if c.f.architecture == "transformer":
        return DROPOUT["transformer"], "Transformers: 0.1 on attention and MLP outputs", ["dropout"]
    size = (
        "tiny" if c.f.n_samples < TINY_DATA else "small" if c.f.n_samples < SMALL_DATA else "large"
    )
    return (
        DROPOUT[size],
        f"{c.f.n_samples:,} samples for {c.f.params:,} parameters: {size} data set",
        ["dropout"],
    )


def drop_path(c: _Context) -> Decision:
    if "drop_path" not in c.zoo_kwargs:
        return None
    deep = c.f.depth >= DROP_PATH_MIN_DEPTH
    value = 0.1 if deep else 0.0
    return (
        value,
        f"{c.f.depth} weighted layers: stochastic depth {'regularises deep' if deep else 'does not help shallow'} residual stacks",
        ["droppath"],
    )


def label_smoothing(c: _Context) -> Decision:
    if c.f.task != "multiclass":
        return None
    if (c.f.num_classes or 0) >= LABEL_SMOOTHING_MIN_CLASSES:
        return (
            LABEL_SMOOTHING,
            f"{c.f.num_classes} classes: softer targets generalise and calibrate better",
            ["smoothing"],
        )
    return 0.0, f"only {c.f.num_classes} classes: smoothing brings little", ["smoothing"]


def mixup(c: _Context) -> Decision:
    if c.f.modality != "image" or c.f.task not in ("binary", "multiclass", "multilabel"):
        return None
    if c.f.n_samples >= MIXUP_MIN_SAMPLES and c.epochs >= MIXUP_MIN_EPOCHS:
        return (
            MIXUP_ALPHA,
            "images, enough data and a long schedule: mixup regularises strongly",
            ["mixup"],
        )
    return 0.0, "mixup and CutMix need long schedules to pay off; off for this budget", ["mixup"]


def cutmix(c: _Context) -> Decision:
    if c.chosen.get("train.mixup") is None:
        return None
    value = CUTMIX_ALPHA if c.chosen["train.mixup"] else 0.0
    return (
        value,
        "with mixup on, half the batches use CutMix" if value else "off, as mixup",
        ["mixup"],
    )


def loss(c: _Context) -> Decision:
    f = c.f
    if (
        f.task in ("binary", "multiclass", "multilabel")
        and f.imbalance
        and f.imbalance >= IMBALANCE_FOCAL
    ):
        return (
            "focal",
            f"classes are {f.imbalance:.0f}:1 imbalanced: focal loss down-weights the easy majority examples",
            ["focal"],
        )
    if (
        f.task == "regression"
        and f.target_heavy_tail is not None
        and f.target_heavy_tail > HEAVY_TAIL
    ):
        return (
            "huber",
            f"{f.target_heavy_tail:.1%} of targets lie beyond 4 sigma: Huber is robust to them",
            ["huber"],
        )
    if f.task is None:
        return None
    return (
        "auto",
        {
            "regression": "MSE on standardised targets",
            "lm": "cross-entropy over the vocabulary",
        }.get(f.task, "cross-entropy on logits (the fused, stable form)"),
        [],
    )


def class_weights(c: _Context) -> Decision:
    f = c.f
    if f.task not in ("binary", "multiclass", "multilabel") or not f.imbalance:
        return None
    if f.imbalance >= IMBALANCE_WEIGHTS:
        return (
            "balanced",
            f"classes are {f.imbalance:.0f}:1 imbalanced: weight each class by n / (C * n_c)",
            ["weights"],
        )
    return None


def ema(c: _Context) -> Decision:
    steps = c.epochs * math.ceil(c.f.n_samples / c.chosen["data.batch_size"])
    if steps >= EMA_MIN_STEPS:
        return (
            0.999,
            f"{steps:,} optimizer steps: an EMA of the weights evaluates smoother and usually better",
            ["ema"],
        )
    return None


def early_stopping(c: _Context) -> Decision:
    if c.epochs < 2 * PATIENCE_MIN:
        return (
            None,
            f"a {c.epochs}-epoch budget is too short for early stopping to save anything",
            ["prechelt"],
        )
    patience = max(PATIENCE_MIN, round(PATIENCE_FRACTION * c.epochs))
    return (
        patience,
        f"a fifth of the {c.epochs}-epoch budget: long enough to ride out noise, short enough to save compute",
        ["prechelt"],
    )


def num_workers(c: _Context) -> Decision:
    return (
        "auto",
        "0 for in-memory tensors (workers only add IPC), else min(8, CPUs-1) persistent workers; pinned memory on CUDA",
        ["loader"],
    )


Rule = tuple[str, Callable[[_Context], Decision]]
# The table: settings in the order they are decided (later ones may read earlier choices).
RULES: list[Rule] = [
    ("train.epochs", epochs),
    ("data.batch_size", batch_size),
    ("optim.name", optimizer),
    ("optim.betas", betas),
    ("optim.momentum", momentum),
    ("optim.lr", learning_rate),
    ("optim.weight_decay", weight_decay),
    ("schedule.name", schedule),
    ("schedule.warmup", warmup),
    ("schedule.min_lr", min_lr),
    ("train.grad_clip", grad_clip),
    ("train.precision", precision),
    ("model.kwargs.dropout", dropout),
    ("model.kwargs.drop_path", drop_path),
    ("train.label_smoothing", label_smoothing),
    ("train.mixup", mixup),
    ("train.cutmix", cutmix),
    ("train.loss", loss),
    ("train.class_weights", class_weights),
    ("train.ema_decay", ema),
    ("early_stopping.patience", early_stopping),
    ("data.num_workers", num_workers),
]


def default_epochs(n_samples: int) -> int:
    return next(e for limit, e in EPOCHS if n_samples < limit)


def decide(
    facts: Facts, epochs: int | None = None, zoo_kwargs: set[str] | None = None
) -> list[Advice]:
    """Run the table on the facts."""
    context = _Context(
        facts, epochs or default_epochs(facts.n_samples), zoo_kwargs=zoo_kwargs or set()
    )
    advice = []
    for setting, rule in RULES:
        decision = rule(context)
        if decision is None:
            continue
        value, why, refs = decision
        context.chosen[setting] = value
        advice.append(Advice(setting, value, why, [REFS[r] for r in refs]))
    return advice


def _a(noun: str) -> str:
    if len(noun) <= 3:
        noun = noun.upper()
    return f"{'an' if noun[0] in 'aeiouAEIOMR' else 'a'} {noun}"


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# -- the entry point ---------------------------------------------------------------------------


def zoo_kwargs(name: str) -> set[str]:
    """The arguments of zoo model ``name`` (the model kwargs the advisor may set)."""
    import inspect

    from gradwise.models import MODELS

    if name not in MODELS:
        return set()
    return set(inspect.signature(MODELS[name]).parameters)


def respect(advice: Advice, recipe: Recipe, explicit: set[str] | frozenset[str]) -> Advice:
    """A setting the user chose stays theirs; the advice says what it would have been."""
    if advice.setting not in explicit:
        return advice
    value = _get(recipe, advice.setting)
    if value == advice.value:
        return advice
    why = f"kept your setting; the advisor would choose {_show(advice.value)}: {advice.why}"
    return Advice(advice.setting, value, why, advice.references)


def _get(recipe: Recipe, path: str) -> Any:
    value: Any = recipe.to_dict()
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def probe_lr(
    advice: list[Advice], model: Any, dataset: Any, loss_fn: Any, f: Facts
) -> list[Advice]:
    """Replace the rule-based learning rate with the range test's suggestion (within 10x of it),
    measured on a private copy of ``model``."""
    from gradwise.doctor.lr_finder import lr_range_test
    from gradwise.optim import build_optimizer
    from gradwise.recipe import OptimSpec

    chosen = {a.setting: a.value for a in advice}
    spec = OptimSpec(
        name=chosen["optim.name"], lr=chosen["optim.lr"], weight_decay=chosen["optim.weight_decay"]
    )
    result = lr_range_test(
        model,
        dataset,
        loss_fn,
        optimizer=build_optimizer(model, spec),
        batch_size=chosen["data.batch_size"],
        grad_clip=chosen.get("train.grad_clip"),
    )
    rule = chosen["optim.lr"]
    lr = float(f"{min(max(result.suggestion, rule / 10), rule * 10):.2g}")
    why = f"learning-rate range test on a copy of the model: {result.suggestion:.2g} (the rule of thumb said {rule:g})"
    return [
        Advice(a.setting, lr, why, [REFS["smith"]]) if a.setting == "optim.lr" else a
        for a in advice
    ]
