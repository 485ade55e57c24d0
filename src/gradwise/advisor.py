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
from dataclasses import dataclass, field, replace
from typing import Any

from gradwise.facts import Facts
from gradwise.recipe import Recipe

# -- the numbers, with their sources ----------------------------------------------------------

REF_BATCH = 64
"""Batch size at which the base learning rates below hold."""
BASE_LR = {  # AdamW peak learning rate at REF_BATCH, by architecture
    "transformer": 1e-3,  # at TRANSFORMER_REF_WIDTH (nanoGPT's character model: d_model 384, batch 64)
    "rnn": 0.02,  # LSTM/GRU with clipping; Greff et al. 2017 found 1e-3..3e-3 without it, our fit
    # task (an LSTM counting tokens) learns only above 5e-3 in its budget and best at 1e-2 (batch 16)
    "cnn": 0.1,  # CNNs with BatchNorm tolerate high rates (Ioffe & Szegedy 2015); 0.05 at batch 16
    "mlp": 2e-3,  # MLPs without normalisation layers, on standardised features
    "mlp_normalised": 0.2,  # MLPs with LayerNorm/BatchNorm: scale-invariant weights tolerate high
    # rates (Arora, Li & Lyu 2019); the fit tasks were flat from 1e-3 to 0.3 and best near 0.1
}
"""Fitted on the six fit tasks of benchmarks/lr_judgment.py (their searches are in
benchmarks/data/lr_judgment.json; benchmarks/fit_lr_priors.py computes these): the smoothed optimum
of a 20-trial TPE search, undone for batch size (square root) and width (Transformers, 1/width),
one significant figure; a geometric mean where two tasks share an architecture. Nine other tasks
check them (docs/benchmarks.md); advise(probe=True) corrects them per task."""
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
PATIENCE_FRACTION, PATIENCE_MIN = 0.2, 5
"""Early stopping's patience, in evaluations: a fifth of the budget, at least 5, where the validation
metric is precise (Prechelt 1998: patient criteria reach better optima at modest extra cost)..."""
NOISE_REF_VAL = 10_000
"""...on NOISE_REF_VAL validation samples or more: an accuracy on n samples has a standard error of
sqrt(p(1-p)/n), at most 0.5/sqrt(n): 0.5% at 10,000, where a 1% improvement is two standard errors.
On fewer samples the metric is noisier by sqrt(NOISE_REF_VAL / n) (4.7% on 114 samples, where a
1-2% bump is noise), and a real but slow improvement of slope s takes noise/s evaluations to rise
above a lucky earlier best, so the patience grows in proportion, up to PATIENCE_MAX_FRACTION."""
PATIENCE_MAX_FRACTION = 0.5
"""At most half the budget. The zoo MLP on breast_cancer, wine, iris, digits, a noisy synthetic set
and diabetes (seeds 0-2, benchmarks/early_stopping.py, docs/benchmarks.md) reached its best as late
as evaluation 47 of 50, often 20+ evaluations after a lucky earlier one: a fifth of the budget
stopped 8 of 18 runs before their best (3/3 on digits and on the noisy set), half of it 1, for
10-28 more epochs of seconds-long runs."""
CHEAP_RUN_FLOPS = 1e12
"""A run cheaper than this (6 x parameters x samples x epochs, x positions for token data; Kaplan et
al. 2020; an underestimate for convolutions) takes seconds to minutes: stopping early saves little,
while stopping before the best loses accuracy, so it gets PATIENCE_MAX_FRACTION whatever the noise."""
STREAM_EVALUATIONS = 10
"""Data without a length (a stream) is validated this many times in its run (train.eval_steps)."""
VAL_FRACTION_ASSUMED = 0.25
"""Without validation data to count, the advisor assumes a 20/80 split: a quarter of the training
samples."""
BATCH_CHOICES = (128, 64, 32, 16)  # the largest that still gives MIN_STEPS optimizer steps
MIN_STEPS = 500  # fewer updates than this and a smaller batch learns more in the same budget
MEMORY_FRACTION = 0.5  # leave half the memory for activations' peaks and the allocator
ACTIVATION_BYTES, ACTIVATION_COPIES = 4, 8
"""A rough activation estimate per sample: fp32 values of the input's size at every weighted layer,
times 8 for the hidden widths, the nonlinearities and what backward keeps."""
HEAVY_TAIL = 0.01  # regression: > 1% of targets beyond 4 sigma -> Huber loss (Huber 1964)

# fine-tuning (recipe section finetune; facts.finetune is scratch | full | partial | peft)
FINETUNE_LR_FACTOR = 0.1
"""Full fine-tuning: a tenth of the from-scratch rate, a rule of thumb. Pretrained weights sit near a
good solution that large steps destroy: Kornblith et al. 2019 found fine-tuning's best rates below
training from scratch's, and BERT fine-tunes at 2e-5..5e-5, below its pre-training 1e-4..."""
FINETUNE_TRANSFORMER_LR = (2e-5, 1e-4)
"""...and for Transformers the rate stays within AdamW's usual fine-tuning range (BERT: 2e-5, 3e-5,
5e-5; RoBERTa 1e-5..3e-5; 1e-4 for small models)."""
LORA_LR = 5e-4
"""LoRA/DoRA with AdamW at LORA_REF_WIDTH: the adapter starts at zero (B = 0) and holds few
parameters, so it takes rates 10x full fine-tuning's. Hu et al. 2021 trained RoBERTa-base (d 768)
at 4e-4..5e-4; QLoRA (Dettmers et al. 2023) LLaMA-7B/13B (d 4096) at 2e-4 and 33B/65B at 1e-4:
the rate falls about as 1/sqrt(width), within LORA_LR_RANGE. DoRA (Liu et al. 2024) trains at
LoRA's rates (1e-4..2e-4 on LLaMA)."""
LORA_REF_WIDTH = 768
LORA_LR_RANGE = (1e-4, 1e-3)
PEFT_LR = {
    "ia3": 3e-3,  # (IA)3 learns only rescaling vectors near 1: T-Few (Liu et al. 2022) used 3e-3
    "prefix": 1e-2,  # an unprojected prefix at every layer: peft's examples use AdamW 1e-2..3e-2
    "prompt": 3e-2,  # soft prompt embeddings: peft's examples use AdamW 3e-2 (Lester et al. 2021:
    # 0.3 with Adafactor, whose steps are relative to the parameter scale)
}
LORA_RANKS = [(1_000, 4), (10_000, 8), (100_000, 16), (1_000_000, 32), (math.inf, 64)]
"""LoRA rank by training samples: small data needs and supports little capacity (Hu et al. 2021: r
1..8 already matches full fine-tuning of GPT-3 on WikiSQL and MNLI); large data profits from 16..64
(QLoRA: r 64 on every linear layer). At most a quarter of the layer width, so it stays low rank."""
FULL_FT_DATA_RATIO = 0.05
"""Training data per base parameter (tokens for token data, else samples) above which full
fine-tuning can beat LoRA: Biderman et al. 2024 (LoRA Learns Less and Forgets Less) found the gap
widening with data, largest for domains far from pre-training (code, mathematics)."""
FINETUNE_EPOCHS = 3  # Transformers: 2-4 epochs suffice (Devlin et al. 2019)
FINETUNE_WARMUP = 0.06  # fine-tuning Transformers: 6% (RoBERTa, Liu et al. 2019); BERT 10%
FINETUNE_WEIGHT_DECAY = 0.01  # BERT's fine-tuning decay (Devlin et al. 2019)
ULMFIT_DECAY = 2.6  # each layer group's rate is the next higher one's / 2.6 (Howard & Ruder 2018)
ULMFIT_SPREAD_GROUPS = 4  # ULMFiT's spread: 2.6**4 (~46x) from the top group to the bottom one
PROMPT_TUNING_SCALE = 1e9  # below this, prompt tuning trails model tuning (Lester et al. 2021)

# distributed training (recipe section distributed; facts.world_size, device_count, device_memory_gb)
WEIGHT_BYTES, GRAD_BYTES = 4, 4
"""fp32 weights and gradients per parameter: gradwise's mixed precision autocasts the compute and
keeps the weights, and so their gradients, in fp32 (ZeRO's 16 bytes per parameter for mixed-precision
Adam count the same state as fp16 copies plus fp32 master weights, Rajbhandari et al. 2020)."""
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "lion": 4, "sgd": 4}
"""fp32 optimizer state per trainable parameter: Adam and AdamW keep two moments, Lion one, SGD
with momentum its velocity; an optimizer not listed is counted as Adam."""
OPTIMIZER_LABEL = {"adamw": "AdamW", "adam": "Adam", "lion": "Lion", "sgd": "SGD momentum"}
# DDP keeps the whole training state on every rank and must leave MEMORY_FRACTION of a device for
# activations; FSDP divides it by the number of ranks (plus one layer's weights gathered at a time).

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
    "saito": "Saito & Rehmsmeier 2015, The Precision-Recall Plot Is More Informative than the ROC Plot When Evaluating Binary Classifiers on Imbalanced Datasets, PLoS ONE 10(3)",
    "sokolova": "Sokolova & Lapalme 2009, A systematic analysis of performance measures for classification tasks, Information Processing & Management 45(4)",
    "huber": "Huber 1964, Robust Estimation of a Location Parameter",
    "loader": "PyTorch docs, torch.utils.data (num_workers, pin_memory, persistent_workers)",
    "masters": "Masters & Luschi 2018, Revisiting Small Batch Training for Deep Neural Networks, arXiv:1804.07612",
    "halving": "Jamieson & Talwalkar 2016, Non-stochastic Best Arm Identification and Hyperparameter Optimization (successive halving), arXiv:1502.07943",
    "smith": "Smith 2017, Cyclical Learning Rates for Training Neural Networks (LR range test), arXiv:1506.01186",
    "arora": "Arora, Li & Lyu 2019, Theoretical Analysis of Auto Rate-Tuning by Batch Normalization, arXiv:1812.03981",
    "devlin": "Devlin et al. 2019, BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding, arXiv:1810.04805 (fine-tuning: Adam 2e-5..5e-5, 2-4 epochs, weight decay 0.01)",
    "ulmfit": "Howard & Ruder 2018, Universal Language Model Fine-tuning for Text Classification, arXiv:1801.06146 (discriminative rates /2.6 per layer, gradual unfreezing)",
    "kornblith": "Kornblith, Shlens & Le 2019, Do Better ImageNet Models Transfer Better?, arXiv:1805.08974",
    "roberta": "Liu et al. 2019, RoBERTa: A Robustly Optimized BERT Pretraining Approach, arXiv:1907.11692 (fine-tuning warmup 6%)",
    "lora": "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv:2106.09685",
    "dora": "Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation, arXiv:2402.09353",
    "ia3": "Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning ((IA)3, T-Few), arXiv:2205.05638",
    "qlora": "Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs, arXiv:2305.14314 (adapters on every linear layer)",
    "prompt": "Lester, Al-Rfou & Constant 2021, The Power of Scale for Parameter-Efficient Prompt Tuning, arXiv:2104.08691 (lr 0.3 with Adafactor)",
    "prefix": "Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation, arXiv:2101.00190 (an MLP-reparameterised prefix at 5e-5 with AdamW)",
    "peft": "Hugging Face peft examples: prompt and prefix tuning with AdamW at 1e-2..3e-2, https://github.com/huggingface/peft/tree/main/examples",
    "biderman": "Biderman et al. 2024, LoRA Learns Less and Forgets Less, arXiv:2405.09673",
    "sun": "Sun et al. 2019, How to Fine-Tune BERT for Text Classification?, arXiv:1905.05583 (layer-wise decay over 12 layers)",
    "ddp": "Li et al. 2020, PyTorch Distributed: Experiences on Accelerating Data Parallel Training, arXiv:2006.15704",
    "fsdp": "Zhao et al. 2023, PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel, arXiv:2304.11277",
    "zero": "Rajbhandari et al. 2020, ZeRO: Memory Optimizations Toward Training Trillion Parameter Models, arXiv:1910.02054",
}


@dataclass(frozen=True)
class Advice:
    """One advised setting: the value, why, and where that judgment comes from."""

    setting: str
    value: Any
    why: str
    references: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)  # what was measured (the lr probe)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "setting": self.setting,
            "value": self.value,
            "why": self.why,
            "references": self.references,
        }
        return out | ({"evidence": self.evidence} if self.evidence else {})


@dataclass
class Advised:
    """The advisor's output: the recipe, the advice behind it, and the facts it was based on."""

    recipe: Recipe
    advice: list[Advice]
    facts: Facts

    @property
    def probe(self) -> dict[str, Any] | None:
        """The learning-rate probe's evidence (candidates, held-out losses, steps, cost), if run."""
        return next(
            (a.evidence for a in self.advice if a.setting == "optim.lr" and a.evidence), None
        )

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
    if not c.budget_given and _short_finetune(c.f):
        return (
            c.epochs,
            f"fine-tuning a pretrained Transformer ({_mode(c.f)}): {FINETUNE_EPOCHS} epochs "
            "(2-4 suffice); more overfit small data and wear away what pre-training learned",
            ["devlin"],
        )
    if c.budget_given:
        return c.epochs, f"the epoch budget you gave ({c.epochs})", []
    n = c.f.n_samples
    limit = next(limit for limit, e in EPOCHS if n < limit)
    table = ", ".join(f"{e} below {limit:,}" for limit, e in EPOCHS if limit != math.inf)
    size = (
        "the data has no length (a stream; train.max_steps bounds the run)"
        if not n
        else f"{n:,} training samples"
        + (f" (below {limit:,})" if limit != math.inf else f" ({EPOCHS[-2][0]:,} or more)")
    )
    return (
        c.epochs,
        f"{size}: {c.epochs} epochs, gradwise's default by data size ({table}, else "
        f"{EPOCHS[-1][1]}): small data needs more passes to learn from",
        [],
    )


def batch_size(c: _Context) -> Decision:
    n, epochs = c.f.n_samples, c.epochs
    reaching = [b for b in BATCH_CHOICES if epochs * math.ceil(n / b) >= MIN_STEPS]
    size = reaching[0] if reaching else BATCH_CHOICES[-1]
    steps = epochs * math.ceil(n / size)
    if not n:
        why = (
            f"the data has no length (a stream), so its steps per epoch are unknown: {size}, the "
            f"smallest of {_choices()}, makes the most optimizer steps of every sample read"
        )
    elif reaching:
        why = (
            f"the largest of {_choices()} that still gives {MIN_STEPS}+ optimizer steps in "
            f"{epochs} epochs of {n:,} samples ({steps:,}): with a small budget, more updates beat "
            "larger batches"
        )
    else:
        why = (
            f"even the smallest of {_choices()}, {size}, gives only {steps:,} optimizer steps in "
            f"{epochs} epochs of {n:,} samples (fewer than the {MIN_STEPS} wanted): with so small "
            "a budget, the smallest batch makes the most updates"
        )
    if c.f.memory_gb:
        values = math.prod(c.f.input_shape)
        layers = max(c.f.depth, 1)
        per_sample_mb = ACTIVATION_BYTES * values * layers * ACTIVATION_COPIES / 2**20
        room_gb = c.f.memory_gb * MEMORY_FRACTION
        fits = int(room_gb * 1024 / max(per_sample_mb, 1e-6))
        if fits < size:
            wanted = size
            size = max(1, 2 ** int(math.log2(max(fits, 1))))
            why = (
                f"memory: {c.f.memory_gb:.1f} GiB free, half kept for the allocator's peaks, leaves "
                f"{room_gb:.3g} GiB; activations take about {per_sample_mb:,.3g} MiB per sample "
                f"({ACTIVATION_BYTES} bytes x {values:,} input values x {layers} weighted layers x "
                f"{ACTIVATION_COPIES}), so {fits:,} samples fit: {size}, the largest power of two "
                f"{'at most that' if fits >= 1 else '(even one sample may not fit)'}, instead of "
                f"the {wanted} the step budget alone would choose"
            )
    return size, why, ["masters"]


def _choices() -> str:
    return "/".join(str(b) for b in BATCH_CHOICES)


def optimizer(c: _Context) -> Decision:
    f = c.f
    if f.finetune == "peft":
        return (
            "adamw",
            f"{_method(f.peft)} adapters: the published PEFT recipes and rates are for Adam-type "
            "optimizers (AdamW; Adafactor for prompt tuning)",
            ["adamw", "lora"],
        )
    large = f"{SGD_MIN_SAMPLES:,}+ samples and {SGD_MIN_EPOCHS}+ epochs"
    if f.architecture == "cnn" and f.n_samples >= SGD_MIN_SAMPLES and c.epochs >= SGD_MIN_EPOCHS:
        return (
            "sgd",
            f"a CNN on {f.n_samples:,} samples for {c.epochs} epochs ({large}): SGD with Nesterov "
            "momentum generalises slightly better than adaptive methods",
            ["sgd", "wilson"],
        )
    why = {
        "transformer": "Transformers need an adaptive optimizer (SGD trains them poorly); decoupled weight decay",
        "rnn": "recurrent nets train far more reliably with Adam-type optimizers",
        "cnn": f"a CNN on {f.n_samples:,} samples for {c.epochs} epochs (SGD pays off from {large}): "
        "AdamW converges fast and is forgiving about the learning rate",
        "mlp": "the robust default for MLPs: fast convergence, forgiving about the learning rate",
    }[f.architecture]
    return "adamw", why, ["adamw"]


def betas(c: _Context) -> Decision:
    if c.chosen["optim.name"] == "sgd":
        return None
    if c.f.architecture == "transformer":
        large = c.f.params > LARGE_TRANSFORMER
        beta2 = 0.95 if large else 0.98
        size = f"{c.f.params:,} parameters, {'above' if large else 'at most'} {LARGE_TRANSFORMER:,}"
        return (
            [0.9, beta2],
            f"Transformers ({size}): a shorter second-moment memory (beta2 {beta2}) damps loss spikes",
            ["vaswani"],
        )
    return [0.9, 0.999], "Adam's standard moments", ["adamw"]


def momentum(c: _Context) -> Decision:
    if c.chosen["optim.name"] != "sgd":
        return None
    return 0.9, "standard heavy-ball momentum with Nesterov look-ahead", ["sgd"]


def learning_rate(c: _Context) -> Decision:
    decision = _scratch_lr(c)
    f = c.f
    if f.finetune == "scratch" or decision is None:
        return decision
    scratch, why, refs = decision
    if f.finetune == "peft":
        return _peft_lr(c, scratch)
    if f.head_only:
        return (
            scratch,
            "only the head trains, on frozen pretrained features (linear probing): a fresh layer "
            f"takes the from-scratch rate; {why}",
            [*refs, "kornblith"],
        )
    lr = float(f"{scratch * FINETUNE_LR_FACTOR:.2g}")
    note = ""
    refs = ["kornblith", "devlin" if f.architecture == "transformer" else "goyal"]
    if f.architecture == "transformer" and c.chosen["optim.name"] != "sgd":
        low, high = FINETUNE_TRANSFORMER_LR
        if not low <= lr <= high:
            lr = min(max(lr, low), high)
            note = f", kept within AdamW's fine-tuning range {low:g}..{high:g}"
    what = "the top layer group's rate (lower groups: finetune.lr_decay)" if f.unfreezing else ""
    return (
        lr,
        f"fine-tuning pretrained weights ({_mode(f)}): a tenth of the from-scratch {scratch:g}"
        f"{note}; large steps destroy the pretrained features" + (f"; {what}" if what else ""),
        refs,
    )


def _peft_lr(c: _Context, scratch: float) -> Decision:
    f, method = c.f, c.f.peft or "lora"
    if method in PEFT_LR:
        lr = PEFT_LR[method]
        why = {
            "ia3": "(IA)3 learns only rescaling vectors that start at 1: T-Few trained them at 3e-3",
            "prefix": "a prefix of virtual keys and values at every layer, optimised directly "
            "(peft has no reparameterisation MLP by default): AdamW 1e-2 as peft's examples "
            "(1e-2..3e-2); Li & Liang's 5e-5 was for a prefix reparameterised through an MLP",
            "prompt": "soft prompt embeddings are the only trainable weights: AdamW 3e-2 as peft's "
            "examples; Lester et al. used 0.3 with Adafactor, whose steps scale with the weights",
        }[method]
        refs = {"ia3": ["ia3"], "prefix": ["prefix", "peft"], "prompt": ["prompt", "peft"]}[method]
        return lr, f"{why}; never the from-scratch {scratch:g}", refs
    width = f.width or LORA_REF_WIDTH
    low, high = LORA_LR_RANGE
    lr = float(f"{min(max(LORA_LR * math.sqrt(LORA_REF_WIDTH / width), low), high):.2g}")
    refs = ["lora", "qlora"] + (["dora"] if method == "dora" else [])
    return (
        lr,
        f"{_method(method)} adapters with AdamW: {LORA_LR:g} at width {LORA_REF_WIDTH}, scaled by "
        f"1/sqrt(width) to {width} within {low:g}..{high:g}; the adapters start at zero and hold "
        f"few parameters, so they take about 10x full fine-tuning's rate, never the from-scratch "
        f"{scratch:g}",
        refs,
    )


def _scratch_lr(c: _Context) -> Decision:
    """The rate for training this model from scratch (the fine-tuning rates derive from it)."""
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
    if c.f.finetune == "peft":
        return (
            0.0,
            f"{_method(c.f.peft)} adapters start at the pretrained function and hold few parameters: "
            "decay would only pull the update back to zero (QLoRA used none)",
            ["qlora"],
        )
    if c.f.finetune in ("full", "partial") and c.f.architecture == "transformer":
        return (
            FINETUNE_WEIGHT_DECAY,
            "fine-tuning a pretrained Transformer: BERT's 0.01, never on norms, biases or embeddings",
            ["devlin", "adamw"],
        )
    if c.epochs <= FEW_EPOCHS:
        return (
            WEIGHT_DECAY["few_epochs"],
            f"only {c.epochs} passes over the data (at most {FEW_EPOCHS}): the model underfits, so "
            f"keep decay light ({WEIGHT_DECAY['few_epochs']:g})",
            ["adamw"],
        )
    if c.chosen["optim.name"] == "sgd":
        return (
            WEIGHT_DECAY["sgd"],
            f"SGD: L2 {WEIGHT_DECAY['sgd']:g} is the standard for CNNs",
            ["goyal"],
        )
    if c.f.architecture == "transformer":
        return (
            WEIGHT_DECAY["adamw_transformer"],
            f"Transformers: {WEIGHT_DECAY['adamw_transformer']:g} (GPT-style), never on norms, "
            "biases or embeddings",
            ["adamw"],
        )
    if 0 < c.f.n_samples < TINY_DATA:
        return (
            WEIGHT_DECAY["adamw_tiny_data"],
            f"only {c.f.n_samples:,} samples (below {TINY_DATA:,}): stronger regularisation, "
            f"{WEIGHT_DECAY['adamw_tiny_data']:g} instead of {WEIGHT_DECAY['adamw']:g}",
            ["adamw"],
        )
    return (
        WEIGHT_DECAY["adamw"],
        f"{WEIGHT_DECAY['adamw']:g}, within AdamW's usual 0.01-0.1; never on norms, biases or "
        "embeddings",
        ["adamw"],
    )


def schedule(c: _Context) -> Decision:
    return (
        "warmup_cosine",
        "linear warmup then cosine decay to 1% of the peak: robust and needs no tuning of milestones",
        ["cosine", "goyal"],
    )


def warmup(c: _Context) -> Decision:
    if c.f.finetune != "scratch" and c.f.architecture == "transformer":
        return (
            FINETUNE_WARMUP,
            "fine-tuning a pretrained Transformer: 6% warmup (RoBERTa; BERT used 10%) lets Adam's "
            "moments settle before full-size steps reach the pretrained weights",
            ["roberta", "devlin"],
        )
    fraction = WARMUP.get(c.f.architecture, WARMUP["default"])
    why = {
        True: f"Transformers: a longer warmup ({fraction:.0%} of the steps) keeps Adam's early, "
        "poorly estimated moments from taking huge steps in attention layers",
        False: f"a short warmup ({fraction:.0%} of the steps) protects the first steps, when the "
        "optimizer's statistics are still noisy",
    }[c.f.architecture == "transformer"]
    return fraction, why, ["popel" if c.f.architecture == "transformer" else "goyal"]


def min_lr(c: _Context) -> Decision:
    return (
        MIN_LR,
        f"decay to {MIN_LR:.0%} of the peak: the last steps refine instead of bouncing",
        ["cosine"],
    )


def grad_clip(c: _Context) -> Decision:
    if c.f.architecture in ("transformer", "rnn"):
        return (
            CLIP,
            f"{c.f.architecture}s have rare, huge gradient spikes: clipping the global norm at "
            f"{CLIP:g} is essential",
            ["pascanu"],
        )
    return (
        CLIP,
        f"clipping the global norm at {CLIP:g}: cheap insurance against a rare bad batch; with "
        "Adam it seldom binds",
        ["pascanu"],
    )


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
        return (
            DROPOUT["transformer"],
            f"Transformers: {DROPOUT['transformer']:g} on attention and MLP outputs",
            ["dropout"],
        )
    n = c.f.n_samples
    if not n:
        return (
            DROPOUT["small"],
            f"the data has no length (a stream): {DROPOUT['small']:g}, the rate for a data set "
            "of unknown, probably not tiny, size",
            ["dropout"],
        )
    size = "tiny" if n < TINY_DATA else "small" if n < SMALL_DATA else "large"
    bounds = {
        "tiny": f"below {TINY_DATA:,}",
        "small": f"{TINY_DATA:,} to {SMALL_DATA:,}",
        "large": f"{SMALL_DATA:,} or more",
    }[size]
    return (
        DROPOUT[size],
        f"{n:,} samples for {c.f.params:,} parameters: a {size} data set ({bounds} samples) "
        f"gets dropout {DROPOUT[size]:g}",
        ["dropout"],
    )


def drop_path(c: _Context) -> Decision:
    if "drop_path" not in c.zoo_kwargs:
        return None
    deep = c.f.depth >= DROP_PATH_MIN_DEPTH
    value = 0.1 if deep else 0.0
    depth = f"{'at least' if deep else 'fewer than'} {DROP_PATH_MIN_DEPTH}"
    return (
        value,
        f"{c.f.depth} weighted layers ({depth}): stochastic depth "
        f"{'regularises deep' if deep else 'does not help shallow'} residual stacks",
        ["droppath"],
    )


def label_smoothing(c: _Context) -> Decision:
    if c.f.task != "multiclass":
        return None
    if (c.f.num_classes or 0) >= LABEL_SMOOTHING_MIN_CLASSES:
        return (
            LABEL_SMOOTHING,
            f"{c.f.num_classes} classes (at least {LABEL_SMOOTHING_MIN_CLASSES}): smoothing "
            f"{LABEL_SMOOTHING:g}, softer targets generalise and calibrate better",
            ["smoothing"],
        )
    return (
        0.0,
        f"only {c.f.num_classes} classes (fewer than {LABEL_SMOOTHING_MIN_CLASSES}): smoothing "
        "brings little",
        ["smoothing"],
    )


def mixup(c: _Context) -> Decision:
    if c.f.modality != "image" or c.f.task not in ("binary", "multiclass", "multilabel"):
        return None
    budget = f"{c.f.n_samples:,} images for {c.epochs} epochs"
    needed = f"{MIXUP_MIN_SAMPLES:,}+ images and {MIXUP_MIN_EPOCHS}+ epochs"
    if c.f.n_samples >= MIXUP_MIN_SAMPLES and c.epochs >= MIXUP_MIN_EPOCHS:
        return (
            MIXUP_ALPHA,
            f"{budget} ({needed}): mixup (alpha {MIXUP_ALPHA:g}) regularises strongly",
            ["mixup"],
        )
    return (
        0.0,
        f"{budget}: mixup and CutMix need data and long schedules to pay off ({needed}); off",
        ["mixup"],
    )


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
    classes = "labels' positives" if f.task == "multilabel" else "classes"
    if (
        f.task in ("binary", "multiclass", "multilabel")
        and f.imbalance
        and f.imbalance >= IMBALANCE_FOCAL
    ):
        return (
            "focal",
            f"the {classes} are {f.imbalance:.0f}:1 imbalanced (focal loss from "
            f"{IMBALANCE_FOCAL:.0f}:1): focal loss down-weights the easy majority examples",
            ["focal"],
        )
    if (
        f.task == "regression"
        and f.target_heavy_tail is not None
        and f.target_heavy_tail > HEAVY_TAIL
    ):
        return (
            "huber",
            f"{f.target_heavy_tail:.1%} of targets lie beyond 4 sigma (more than "
            f"{HEAVY_TAIL:.0%}): Huber is robust to them",
            ["huber"],
        )
    if f.task is None or f.task == "custom":
        return None
    if f.task == "regression":
        return "auto", _regression_loss_why(f), []
    if f.task == "lm":
        return "auto", "cross-entropy over the vocabulary", []
    if f.task == "multiclass":
        return "auto", "cross-entropy on logits (the fused, stable form)", []
    return "auto", "binary cross-entropy on logits (the fused, stable form)", []


TARGET_MEAN_TOL = 0.1
TARGET_STD_RANGE = (0.5, 2.0)
"""Regression targets count as standardised when their mean is within TARGET_MEAN_TOL of 0 and their
standard deviation within TARGET_STD_RANGE (or the data set recorded standardising them): the
zoo's output layers start near 0 with unit-scale outputs, MSE's size and gradients scale with the
targets' variance, and the learning-rate priors were measured on unit-scale targets."""


def _regression_loss_why(f: Facts) -> str:
    scale = f.target_scale
    if f.target_standardized:
        return "MSE on standardised targets (the data set standardised them with train statistics)"
    if scale is None:
        return "MSE; the targets' scale was not measured: standardise them if they are far from unit scale"
    mean, std = scale["mean"], scale["std"]
    low, high = TARGET_STD_RANGE
    measured = f"mean {mean:.3g}, std {std:.3g}"
    if abs(mean) <= TARGET_MEAN_TOL and low <= std <= high:
        return f"MSE on standardised targets ({measured})"
    return (
        f"MSE; note: the targets are not standardised ({measured}): standardise them ((y - "
        "mean) / std with the training split's statistics; predictions map back as p * std + "
        "mean), since MSE's size and gradients grow with the targets' variance and the "
        "learning-rate priors assume unit-scale targets"
    )


def class_weights(c: _Context) -> Decision:
    f = c.f
    if f.task not in ("binary", "multiclass", "multilabel") or not f.imbalance:
        return None
    if f.imbalance >= IMBALANCE_WEIGHTS:
        return (
            "balanced",
            f"classes are {f.imbalance:.0f}:1 imbalanced (weights from {IMBALANCE_WEIGHTS:.0f}:1): "
            "weight each class by n / (C * n_c)"
            if f.task != "multilabel"
            else f"labels' positives are {f.imbalance:.0f}:1 imbalanced (weights from "
            f"{IMBALANCE_WEIGHTS:.0f}:1): weight each label's positives by its negatives / "
            "positives (BCE's pos_weight)",
            ["weights"],
        )
    return None


def ema(c: _Context) -> Decision:
    steps = c.epochs * math.ceil(c.f.n_samples / c.chosen["data.batch_size"])
    if steps >= EMA_MIN_STEPS:
        return (
            0.999,
            f"{steps:,} optimizer steps (at least {EMA_MIN_STEPS:,}): an EMA of the weights "
            "(decay 0.999) evaluates smoother and usually better",
            ["ema"],
        )
    return None


def monitor(c: _Context) -> Decision:
    """The metric that picks the best checkpoint and stops early: the task's default (accuracy)
    on balanced classes; PR-AUC (two classes) or macro F1 (more) when the doctor's GW103 would
    call the classes imbalanced, judged by GW103's own thresholds and verdict."""
    from gradwise.doctor.rules.data import THRESHOLDS, imbalanced, pessimistic_ratio
    from gradwise.tasks import TASKS, imbalanced_monitor

    f, t = c.f, THRESHOLDS
    if f.task not in ("binary", "multiclass", "multilabel") or not f.class_counts:
        return None
    default = TASKS[f.task].monitor
    if f.task == "multilabel":
        return (
            "auto",
            f"multilabel: {default} is macro F1 over the labels already: {imbalanced_monitor(2, True)[2]}",
            ["sokolova"],
        )
    present = [n for n in f.class_counts if n > 0]  # as GW103: classes that occur
    if len(present) < 2:
        return None
    major, minor, total = max(present), min(present), sum(present)
    ratio, pessimistic = major / minor, pessimistic_ratio(major, minor, t.imbalance_z)
    measured = (
        f"the classes are {ratio:.3g}:1 apart ({major:,} vs {minor:,} of {total:,} samples; "
        f"{pessimistic:.3g}:1 with pessimistic counts)"
    )
    gw103 = (
        f"GW103's thresholds {t.imbalance_ratio:g}:1 and {t.imbalance_confidence_ratio:g}:1 "
        "pessimistic"
    )
    if not imbalanced(major, minor):
        return (
            "auto",
            f"{measured}, below {gw103}: balanced enough for {default} (the task's default) "
            "to judge the model",
            [],
        )
    metric, name, why = imbalanced_monitor(f.num_classes or len(f.class_counts))
    return (
        metric,
        f"{measured}, at or above {gw103}: always predicting the majority class scores "
        f"{major / total:.1%} accuracy, so accuracy would keep a checkpoint that misses the rare "
        f"class; {name} instead: {why}",
        ["saito", "sokolova"] if metric == "pr_auc" else ["sokolova"],
    )


def early_stopping(c: _Context) -> Decision:
    """Patience in evaluations, scaled by the validation metric's noise and by the run's cost; the
    numbers in the reason are the ones used."""
    f = c.f
    evals = c.epochs if f.n_samples else STREAM_EVALUATIONS
    every = "one per epoch" if f.n_samples else "a stream is validated 10 times in its run"
    if evals < 2 * PATIENCE_MIN:
        return (
            None,
            f"a {c.epochs}-epoch budget is too short for early stopping to save anything",
            ["prechelt"],
        )
    n_val = f.val_samples
    counted = f"{n_val:,} validation samples" if n_val else ""
    if not n_val:
        n_val = max(1, round(f.n_samples * VAL_FRACTION_ASSUMED))
        counted = (
            f"~{n_val:,} validation samples (none given to count: a quarter of the training "
            "samples assumed)"
        )
    noise = math.sqrt(NOISE_REF_VAL / n_val)
    fraction = min(max(PATIENCE_FRACTION * noise, PATIENCE_FRACTION), PATIENCE_MAX_FRACTION)
    if noise <= 1:
        scaled = f"precise enough for {PATIENCE_FRACTION:.0%} of the evaluations"
    else:
        capped = (
            f", capped at {PATIENCE_MAX_FRACTION:.0%}" if fraction == PATIENCE_MAX_FRACTION else ""
        )
        scaled = (
            f"so {PATIENCE_FRACTION:.0%} of the evaluations x {noise:.2g}{capped}: a slow, real "
            "improvement needs that long to rise above a lucky earlier best"
        )
    flops = _run_flops(f, c.epochs)
    if 0 < flops < CHEAP_RUN_FLOPS and fraction < PATIENCE_MAX_FRACTION:
        fraction = PATIENCE_MAX_FRACTION
        scaled += (
            f"; the run is cheap (~{flops:.1g} FLOPs, below {CHEAP_RUN_FLOPS:.0e}): "
            f"{PATIENCE_MAX_FRACTION:.0%}, since stopping early would save little and could lose "
            "the best"
        )
    patience = max(PATIENCE_MIN, round(fraction * evals))
    metric = _monitored(c)
    if metric in ("accuracy", "f1", "auroc", "pr_auc"):
        name = {"accuracy": "an accuracy", "f1": "an F1", "auroc": "an AUROC"}.get(
            metric, "a PR-AUC"
        )
        noisy = (
            f"{name} on {counted} has a standard error of up to "
            f"{0.5 / math.sqrt(n_val):.1%} (sqrt(p(1-p)/n) at p = 0.5), {noise:.2g}x that on "
            f"{NOISE_REF_VAL:,}"
        )
    else:
        noisy = (
            f"a mean {metric.replace('_', ' ')} over {counted} is {noise:.2g}x as noisy as over "
            f"{NOISE_REF_VAL:,} (its standard error falls as 1/sqrt(n))"
        )
    at_least = f", at least {PATIENCE_MIN}" if patience == PATIENCE_MIN else ""
    return (
        patience,
        f"{patience} of the run's {evals} evaluations ({every}; {patience / evals:.0%}{at_least}): "
        f"{noisy}; {scaled}. min_delta stays 0: a noise-sized threshold would only stop sooner, "
        "and the best checkpoint is kept either way",
        ["prechelt"],
    )


def _monitored(c: _Context) -> str:
    """The metric early stopping will watch: the advised monitor or the task's default."""
    from gradwise.tasks import TASKS

    monitor = c.chosen.get("early_stopping.monitor", "auto")
    if monitor == "auto":
        kind = TASKS.get(c.f.task or "")
        monitor = kind.monitor if kind is not None else "val_loss"
    return monitor.removeprefix("val_").removeprefix("train_")


def _run_flops(f: Facts, epochs: int) -> float:
    """About 6 x parameters x samples x epochs (x positions for token sequences) (Kaplan et al.
    2020); 0 when the data has no length."""
    positions = f.input_shape[0] if f.modality == "tokens" and f.input_shape else 1
    return 6.0 * f.params * f.n_samples * epochs * positions


def num_workers(c: _Context) -> Decision:
    return (
        "auto",
        "0 for in-memory tensors (workers only add IPC), else min(8, CPUs-1) persistent workers; pinned memory on CUDA",
        ["loader"],
    )


def peft_note(c: _Context) -> Decision:
    """Your PEFT method, kept, with a note where full fine-tuning can do better (never a switch)."""
    f = c.f
    if not f.peft_in_recipe or not f.peft:
        return None
    method = _method(f.peft)
    base = max(f.base_params, 1)
    tokens = f.modality == "tokens"
    amount = f.n_samples * (math.prod(f.input_shape) if tokens and f.input_shape else 1)
    unit = "tokens" if tokens else "samples"
    ratio = amount / base
    share = f"{f.trainable_params:,} of {f.params:,} parameters train"
    if ratio >= FULL_FT_DATA_RATIO:
        return (
            f.peft,
            f"your choice, kept; note: {amount:,} training {unit} for {base:,} base parameters "
            f"({ratio:.2g} per parameter) is a lot of data for this model: full fine-tuning "
            f"(finetune.peft: null) can beat {method} here, the more so when the target domain is "
            f"far from the pretraining data; {method} uses less memory and forgets less ({share})",
            ["biderman", "lora"],
        )
    if f.peft in ("prefix", "prompt") and base < PROMPT_TUNING_SCALE:
        return (
            f.peft,
            f"your choice, kept; note: on a model of {base:,} parameters {method} usually trails "
            f"LoRA and full fine-tuning (the gap closes only near 10B parameters) ({share})",
            ["prompt", "prefix"],
        )
    return (
        f.peft,
        f"your choice: {amount:,} training {unit} for {base:,} base parameters is little data "
        f"for this model, where {method} matches full fine-tuning and forgets less ({share})",
        ["lora", "biderman"],
    )


def target_modules(c: _Context) -> Decision:
    f = c.f
    if not f.peft_in_recipe or f.peft not in ("lora", "dora"):
        return None
    if f.target_modules is not None:
        return (
            f.target_modules,
            "your choice, kept; note: unless these are all the linear layers, QLoRA found that "
            "adapting every linear layer (target_modules: null, gradwise's default) is what "
            "matches full fine-tuning; the query and value projections alone fall short",
            ["qlora"],
        )
    return (
        None,
        "every Linear layer but the head (gradwise's default): QLoRA found adapters on all linear "
        "layers needed to match full fine-tuning, where LoRA's original query and value "
        "projections alone fall short",
        ["qlora", "lora"],
    )


def lora_rank(c: _Context) -> Decision:
    f = c.f
    if not f.peft_in_recipe or f.peft not in ("lora", "dora"):
        return None
    rank = next(r for limit, r in LORA_RANKS if f.n_samples < limit)
    size = "little data needs little capacity" if rank <= 8 else "more data profits from capacity"
    amount = f"{f.n_samples:,} training samples" if f.n_samples else "data of unknown length"
    why = f"{amount}: rank {rank} ({size}); lora_alpha defaults to 2 x rank"
    cap = max(1, (f.width or 0) // 4)
    if f.width and rank > cap:
        why = f"{amount}: rank {rank}, capped at a quarter of the width {f.width}: rank {cap}"
        rank = cap
    return rank, why, ["lora", "qlora"]


def lr_decay(c: _Context) -> Decision:
    f = c.f
    if f.finetune != "partial" or not f.unfreezing or f.lr_groups == "lr_range":
        return None
    groups = f.layer_groups or ULMFIT_SPREAD_GROUPS + 1
    if groups - 1 <= ULMFIT_SPREAD_GROUPS:
        return (
            ULMFIT_DECAY,
            f"gradual unfreezing over {groups} layer groups: each group trains at the rate of the "
            f"one above / 2.6, so the general lower layers move least (ULMFiT)",
            ["ulmfit"],
        )
    decay = round(ULMFIT_DECAY ** (ULMFIT_SPREAD_GROUPS / (groups - 1)), 2)
    return (
        decay,
        f"gradual unfreezing over {groups} layer groups: /{decay:g} per group keeps ULMFiT's spread "
        f"of 2.6^{ULMFIT_SPREAD_GROUPS} (~{ULMFIT_DECAY**ULMFIT_SPREAD_GROUPS:.0f}x) from the head to "
        f"the bottom; 2.6 per group would leave the bottom at 1/{ULMFIT_DECAY ** (groups - 1):.2g} "
        "of the head's rate",
        ["ulmfit", "sun"],
    )


def strategy(c: _Context) -> Decision:
    """DDP where every rank holds the whole training state with room to spare; FSDP where it does
    not; none for one process. The memory arithmetic is in the reason."""
    f = c.f
    need, formula = _training_state(f, c.chosen.get("optim.name", "adamw"))
    if f.world_size <= 1:
        why = f"one process (world size 1): nothing to distribute; the training state is {formula}"
        if f.device_count > 1 and f.device != "cpu":
            choice, reason = _sharding(f, need, f.device_count, f.device_count)
            why += (
                f". This machine has {f.device_count} GPUs: gradwise train --nproc "
                f"{f.device_count} would train on all of them with {choice.upper()}: {reason}"
            )
            return "none", why, ["ddp", "fsdp", "zero"]
        if f.device == "cpu":
            why += (
                "; on the CPU, more processes (gradwise train --nproc N) would share the same cores"
            )
        return "none", why, []
    choice, reason = _sharding(f, need, f.world_size, f.local_world_size)
    return (
        choice,
        f"{f.world_size} processes: {formula} per rank with DDP; {reason}",
        [
            "ddp",
            "fsdp",
            "zero",
        ],
    )


def _training_state(f: Facts, optimizer: str) -> tuple[float, str]:
    """Bytes of weights, gradients and optimizer state of one full copy, and the arithmetic."""
    state = OPTIMIZER_STATE_BYTES.get(optimizer, OPTIMIZER_STATE_BYTES["adam"])
    label = OPTIMIZER_LABEL.get(optimizer, f"{optimizer} (as Adam)")
    total, trainable = f.params, f.trainable_params
    need = WEIGHT_BYTES * total + (GRAD_BYTES + state) * trainable
    if trainable == total:
        formula = (
            f"{_count(total)} params x ({WEIGHT_BYTES} weights + {GRAD_BYTES} grads + "
            f"{state} {label}) = {_bytes(need)}"
        )
    else:
        formula = (
            f"{_count(total)} params x {WEIGHT_BYTES} weights + {_count(trainable)} trainable x "
            f"({GRAD_BYTES} grads + {state} {label}) = {_bytes(need)}"
        )
    return need, formula


def _sharding(f: Facts, need: float, ranks: int, local: int) -> tuple[str, str]:
    """("ddp" | "fsdp", why) for ``ranks`` processes, ``local`` of them on this machine."""
    if f.device != "cpu" and f.device_memory_gb:
        per_device = max(1, math.ceil(local / max(f.device_count, 1)))
        memory = f.device_memory_gb / per_device
        where = f"{f.device_memory_gb:g} GiB of one GPU" + (
            f" shared by {per_device} ranks" if per_device > 1 else ""
        )
    elif f.memory_gb:
        memory = f.memory_gb / max(local, 1)
        where = f"{f.memory_gb:g} GiB of free RAM" + (
            f" shared by {local} ranks" if local > 1 else ""
        )
    else:
        return "ddp", (
            "the device memory is unknown: DDP, the simpler and faster; choose fsdp if it runs "
            "out of memory (Li et al. 2020; Zhao et al. 2023)"
        )
    room = MEMORY_FRACTION * memory * 2**30
    half = f"half of {where} ({_bytes(room)}; the rest for activations)"
    sharded = need / ranks
    if need <= room:
        return "ddp", (
            f"fits in {half}: DDP, which only all-reduces gradients (Li et al. 2020); FSDP would "
            f"shard it to {_bytes(sharded)} per rank over {ranks} ranks, at the cost of gathering "
            "the weights in every forward and backward pass (Zhao et al. 2023)"
        )
    fits = (
        "which fits"
        if sharded <= room
        else f"still more than {_bytes(room)}: add ranks, set train.activation_checkpointing "
        "or train a smaller model"
    )
    return "fsdp", (
        f"more than {half}: FSDP shards weights, gradients and optimizer state to "
        f"{_bytes(sharded)} per rank over {ranks} ranks, {fits} (Zhao et al. 2023)"
    )


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = n / size
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"
    return f"{n:.0f} bytes"


def _short_finetune(f: Facts) -> bool:
    """Fine-tuning a Transformer that needs only a few epochs (not prompt/prefix tuning, which
    learn slowly, nor gradual unfreezing, which needs an epoch per layer group)."""
    return (
        f.finetune != "scratch"
        and f.architecture == "transformer"
        and f.peft not in ("prefix", "prompt")
        and f.unfreezing is None
    )


def _mode(f: Facts) -> str:
    return {
        "full": "every parameter trains",
        "partial": f"{f.trainable_params:,} of {f.params:,} parameters train now",
        "peft": f"{_method(f.peft)} adapters",
    }.get(f.finetune, f.finetune)


def _method(peft: str | None) -> str:
    names = {
        "lora": "LoRA",
        "dora": "DoRA",
        "ia3": "(IA)3",
        "prefix": "prefix tuning",
        "prompt": "prompt tuning",
    }
    return names.get(peft or "", str(peft))


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
    ("early_stopping.monitor", monitor),
    ("early_stopping.patience", early_stopping),
    ("data.num_workers", num_workers),
    ("finetune.peft", peft_note),
    ("finetune.target_modules", target_modules),
    ("finetune.lora_r", lora_rank),
    ("finetune.lr_decay", lr_decay),
    ("distributed.strategy", strategy),
]


def default_epochs(n_samples: int, facts: Facts | None = None) -> int:
    """The epoch budget by data size; a few epochs when fine-tuning a Transformer (``facts``)."""
    if facts is not None and _short_finetune(facts):
        return FINETUNE_EPOCHS
    return next(e for limit, e in EPOCHS if n_samples < limit)


def decide(
    facts: Facts, epochs: int | None = None, zoo_kwargs: set[str] | None = None
) -> list[Advice]:
    """Run the table on the facts."""
    context = _Context(
        facts,
        epochs or default_epochs(facts.n_samples, facts),
        budget_given=bool(epochs),
        zoo_kwargs=zoo_kwargs or set(),
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


PREPARED = ("finetune.",)
"""Settings the model is already built with when the advisor runs (the assembly loads the weights,
wraps the adapter and sets the layer groups first, so the facts count the real trainable
parameters): advice on them is reported, and applied only by the next run that sets it."""


RECOMMENDED = ("distributed.strategy",)
"""Settings the advisor recommends and never writes into the recipe: how the run is launched decides
them (``auto``: DDP under torchrun with more than one process, else none)."""


def respect(
    advice: Advice,
    recipe: Recipe,
    explicit: set[str] | frozenset[str],
    prepared: tuple[str, ...] = PREPARED,
) -> Advice:
    """A setting the user chose stays theirs; the advice says what it would have been. Settings
    under ``prepared`` prefixes stay as the recipe has them too (the model was built with them),
    and so do the ``RECOMMENDED`` ones (advice only)."""
    if advice.setting in RECOMMENDED and advice.setting not in explicit:
        value = _get(recipe, advice.setting)
        if value == advice.value:
            return advice
        if value == "auto" and advice.value in ("ddp", "none"):  # what auto resolves to here
            return replace(advice, value=value, why=f"auto chooses {advice.value}: {advice.why}")
        why = (
            f"recommended, not applied: the recipe keeps {_show(value)}; set {advice.setting}: "
            f"{_show(advice.value)} to follow it: {advice.why}"
        )
        return replace(advice, value=value, why=why)
    fixed = any(advice.setting.startswith(prefix) for prefix in prepared)
    if advice.setting not in explicit and not fixed:
        return advice
    value = _get(recipe, advice.setting)
    if value == advice.value:
        return advice
    if advice.setting in explicit:
        why = f"kept your setting; the advisor would choose {_show(advice.value)}: {advice.why}"
    else:
        why = (
            f"kept: the model was prepared with {_show(value)}; set {advice.setting}: "
            f"{_show(advice.value)} to follow the advice: {advice.why}"
        )
    return replace(advice, value=value, why=why)


def _get(recipe: Recipe, path: str) -> Any:
    value: Any = recipe.to_dict()
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def probe_lr(
    advice: list[Advice], model: Any, dataset: Any, loss_fn: Any, f: Facts, seed: int = 0
) -> list[Advice]:
    """Replace the rule's learning rate with a budgeted probe of rates around it
    (:mod:`gradwise.lr_probe`), run on private copies of ``model``; the evidence goes with it."""
    from gradwise.lr_probe import probe_lr as probe
    from gradwise.lr_probe import too_short
    from gradwise.recipe import OptimSpec, ScheduleSpec

    chosen = {a.setting: a.value for a in advice}
    optim = OptimSpec(
        name=chosen["optim.name"],
        lr=chosen["optim.lr"],
        weight_decay=chosen["optim.weight_decay"],
        betas=chosen.get("optim.betas"),
        momentum=chosen.get("optim.momentum", 0.9),
    )
    schedule = ScheduleSpec(
        name=chosen["schedule.name"],
        warmup=chosen["schedule.warmup"],
        min_lr=chosen["schedule.min_lr"],
    )
    batch = chosen["data.batch_size"]
    run_steps = chosen["train.epochs"] * math.ceil(f.n_samples / batch)
    result = probe(
        model,
        dataset,
        loss_fn,
        prior=chosen["optim.lr"],
        optim=optim,
        schedule=schedule,
        batch_size=batch,
        run_steps=run_steps,
        grad_clip=chosen.get("train.grad_clip"),
        seed=seed,
    )
    rule = next(a for a in advice if a.setting == "optim.lr")
    if result is None:
        why = f"{rule.why}; {too_short(run_steps)}"
        return [replace(a, why=why) if a is rule else a for a in advice]
    why = f"{result.summary()}; the rule of thumb said {rule.value:g} ({rule.why})"
    refs = [REFS["halving"], *rule.references]
    probed = Advice("optim.lr", result.chosen, why, refs, result.to_dict())
    return [probed if a.setting == "optim.lr" else a for a in advice]
