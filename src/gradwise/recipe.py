"""The Recipe: one validated object that carries every decision of a training run.

The advisor produces one, YAML loads one, the CLI and ``Trainer(**overrides)`` override one, tuning
samples one. Defaults are an expert's, not the framework's; each field says what it does and why.
This module imports no torch, so the CLI can parse and check recipes instantly.
"""

from __future__ import annotations

import contextlib
import os
import re
import types
import typing
from collections import abc
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gradwise.errors import ConfigError, GradwiseError, did_you_mean
from gradwise.optimizers import check_name

Task = Literal[
    "auto", "classification", "binary", "multiclass", "multilabel", "regression", "lm", "custom"
]


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )

    @field_validator("*")
    @classmethod
    def _fits_64_bits(cls, value: Any) -> Any:
        """Integers go to torch, NumPy and itertools, which take 64 bits at most."""
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise ValueError("an integer that fits in 64 bits")
        return value


class ModelSpec(_Section):
    name: str = "mlp"
    """A zoo model (mlp, cnn, resnet, transformer, gpt, rnn) or an import path 'package.module:factory'.
    Size arguments (input features/channels, number of outputs, vocabulary) are inferred from the data."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the model factory, e.g. {hidden: [256, 256], dropout: 0.1}."""


class DataSpec(_Section):
    name: str = "digits"
    """A built-in data set (digits, iris, wine, breast_cancer, diabetes, csv, numpy, image_folder, text,
    synthetic_*) or an import path 'package.module:factory' returning a DataBundle or (X, y) arrays."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the data factory, e.g. {path: data.csv, target: label, val_fraction: 0.2}."""
    batch_size: int = Field(64, gt=0)
    """Micro-batch size per optimizer step (times `train.accumulate` for the effective batch).
    32-256 suits most CNNs and MLPs; larger batches want a proportionally larger learning rate."""
    eval_batch_size: int | None = Field(None, gt=0)
    """Batch size for validation; default 2x batch_size (no gradients are kept, so it fits)."""
    num_workers: Annotated[int, Field(ge=0, le=1024)] | Literal["auto"] = "auto"
    """DataLoader worker processes. auto: 0 for in-memory tensors (workers only add IPC cost there),
    otherwise min(8, CPUs - 1) with persistent workers so they are not respawned every epoch."""
    pin_memory: bool | Literal["auto"] = "auto"
    """Page-locked host memory for faster, asynchronous host-to-GPU copies. auto: on with CUDA."""
    drop_last: bool | Literal["auto"] = "auto"
    """Drop the last incomplete training batch. auto: only when it would hold a single sample,
    which breaks batch normalisation and gives a very noisy step."""
    label_key: str | None = None
    """For batches that are mappings (a tokenizer's output): the key of the target. null: the first
    of labels, label, targets, target, y; the other entries are the model's keyword arguments."""


class OptimSpec(_Section):
    name: str = "adamw"
    """adamw (default; Loshchilov & Hutter 2019, decoupled weight decay), adam, sgd (Nesterov momentum),
    lion (Chen et al. 2023; sign updates, use a 3-10x smaller lr and 3-10x larger weight decay than AdamW),
    a row added with gradwise.optim.register_optimizer, or an import path 'package.module:Optimizer'
    (e.g. torch.optim:RMSprop): any (params, **kwargs) -> Optimizer, given gradwise's parameter groups,
    lr and `kwargs` (betas, eps, momentum and nesterov go to the named optimizers that take them)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """More keyword arguments for the optimizer, e.g. {amsgrad: true} or {alpha: 0.9} for RMSprop."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate (after warmup). Typical: 1e-4..3e-3 for AdamW, 1e-2..1e-1 for SGD."""
    weight_decay: float = Field(0.05, ge=0)
    """Decoupled weight decay, never applied to biases, normalisation parameters or embeddings.
    Typical: 0.01-0.1 for AdamW, 1e-4..5e-4 for SGD."""
    betas: tuple[float, float] | None = None
    """Adam/AdamW/Lion moment coefficients. null: (0.9, 0.999) for Adam/AdamW, (0.9, 0.99) for Lion.
    A beta2 of 0.95 steadies large Transformers."""
    eps: float = Field(1e-8, gt=0)
    """Adam/AdamW denominator term."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    nesterov: bool = True
    """SGD Nesterov momentum (Sutskever et al. 2013): looks ahead, converges a little faster."""

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        return check_name(name)

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, betas: tuple[float, float] | None) -> tuple[float, float] | None:
        if betas is not None and not all(0 <= b < 1 for b in betas):
            raise ValueError("two coefficients, each in [0, 1)")
        return betas


class ScheduleSpec(_Section):
    name: Literal["warmup_cosine", "onecycle", "step", "plateau", "constant"] = "warmup_cosine"
    """warmup_cosine (default): linear warmup then cosine decay to a floor (Loshchilov & Hutter 2017,
    Goyal et al. 2017). onecycle (Smith 2018): warmup and anneal with inverse momentum. step: multiply by
    `gamma` at `milestones`. plateau: multiply by `gamma` when the monitored metric stalls. constant."""
    warmup: float = Field(0.05, ge=0)
    """Warmup length: a fraction of all optimizer steps if < 1, else a number of steps. 5-10% is typical;
    it keeps Adam's early, poorly estimated second moments from taking huge steps."""
    min_lr: float = Field(0.01, ge=0, le=1)
    """Floor of the cosine decay as a fraction of the peak learning rate, reached at the last step."""
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])
    """step: fractions of training at which the learning rate is multiplied by `gamma`."""
    gamma: float = Field(0.1, gt=0, lt=1)
    """step/plateau: multiplicative decay factor."""
    plateau_patience: int = Field(2, ge=0)
    """plateau: evaluations without improvement before decaying."""
    pct_start: float = Field(0.25, gt=0, lt=1)
    """onecycle: fraction of training spent increasing the learning rate."""


class TrainSpec(_Section):
    epochs: int = Field(20, gt=0)
    """Passes over the training set."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps (overrides epochs when smaller); schedules span it."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (Pascanu et al. 2013); null turns clipping off.
    Cheap insurance against loss spikes, essential for RNNs and Transformers."""
    accumulate: int = Field(1, gt=0)
    """Micro-batches per optimizer step (gradient accumulation). The loss is normalised over the whole
    accumulated batch, so k micro-batches give the same update as one k-times larger batch."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on GPUs that support it, fp16 with loss scaling on older CUDA GPUs, fp32 on CPU
    (CPU autocast rarely pays off for small models). bf16 needs no loss scaling: same exponent as fp32."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Classification: mix targets with the uniform distribution (Szegedy et al. 2016); 0.1 is typical."""
    mixup: float = Field(0.0, ge=0)
    """Image classification: Beta(alpha, alpha) mixup of input pairs and their labels (Zhang et al. 2018);
    alpha 0.2-0.4 typical, 0 off."""
    cutmix: float = Field(0.0, ge=0)
    """Image classification: CutMix alpha (Yun et al. 2019); alpha 1.0 typical, 0 off. With both mixup
    and cutmix on, each batch uses one of them at random."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """Keep an exponential moving average of the weights (Polyak averaging) and validate with it;
    0.999 for runs of a few thousand steps, 0.9999 for long runs; null off. The decay warms up as
    min(decay, (1 + n) / (10 + n)) after n updates, so early evaluations are meaningful."""
    loss: str = "auto"
    """auto picks from the task (cross-entropy, BCE-with-logits, MSE); also focal (classification:
    down-weights easy examples, Lin et al. 2017), mse, mae, huber (regression with outliers), or an
    import path 'module:fn' taking (outputs, targets) and returning a scalar loss."""
    focal_gamma: float = Field(2.0, ge=0)
    """Focal loss focusing parameter: 0 is cross-entropy, 2 the usual choice."""
    class_weights: Literal["balanced"] | list[float] | None = None
    """Per-class loss weights for imbalanced classification: balanced (n / (classes * n_class),
    from the training targets), an explicit list, or null. Binary and multilabel use them as
    BCE's pos_weight (positives / negatives)."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu) or a torch device string."""
    deterministic: bool = False
    """Use deterministic algorithms only (slower on GPU); seeds are always set."""
    eval_every: int = Field(1, gt=0)
    """Validate every N epochs."""
    eval_steps: int | None = Field(None, gt=0)
    """Also validate (and checkpoint) every N optimizer steps, within epochs. null: at epoch ends
    only; for data without a length (streams), 10 times in the run."""
    log_every: int = Field(10, gt=0)
    """Record training loss and learning rate every N optimizer steps."""
    activation_checkpointing: bool | list[str] = False
    """Recompute activations in the backward pass instead of keeping them: less memory for ~30%
    more compute. true: every block of the zoo's Transformer, GPT and ResNet; or a list of module
    type names or module-path globs, e.g. [BertLayer] or ["encoder.layer.*"]."""


class EarlyStoppingSpec(_Section):
    monitor: str = "auto"
    """The validation metric that picks the best checkpoint and drives early stopping and plateau decay.
    auto: accuracy for binary/multiclass, f1 for multilabel, loss for regression/custom, perplexity for lm.
    The advisor sets pr_auc (two classes) or f1 (macro, more classes) when classes are imbalanced."""
    mode: Literal["auto", "min", "max"] = "auto"
    """Whether the monitored metric should go down or up; auto knows the metrics gradwise computes."""
    patience: int | None = Field(10, ge=1)
    """Stop after this many evaluations without improvement; null never stops early."""
    min_delta: float = Field(0.0, ge=0)
    """Smallest change that counts as an improvement."""


class CheckpointSpec(_Section):
    keep_last: int = Field(2, ge=1)
    """Recent checkpoints to keep, besides the best one."""
    every_steps: int | None = Field(None, gt=0)
    """Also checkpoint every N optimizer steps (an epoch-end checkpoint is always written)."""


class TrackingSpec(_Section):
    root: str = "runs"
    """Directory that holds run directories, the MLflow database and artifacts."""
    tensorboard: bool | None = None
    """TensorBoard event files in the run directory; null: on when tensorboard is installed."""
    mlflow: bool | None = None
    """MLflow tracking in runs/mlflow.db (SQLite, no server); null: on when mlflow is installed."""
    wandb: bool | None = None
    """Weights & Biases; null: on only when installed and logged in."""
    progress: bool = True
    """Show a live progress bar on a terminal (plain log lines otherwise)."""


class DoctorSpec(_Section):
    mode: Literal["off", "watch", "repair"] = "watch"
    """watch: diagnose the run live (findings in runs/<name>/doctor/, stop on NaN); repair: also roll
    back to the last good state and fix the cause (lower the learning rate, clip gradients, swap
    dying ReLUs for LeakyReLU) when the loss or gradients blow up; off: no doctor."""
    ignore: list[str] = Field(default_factory=list)
    """Rule codes to switch off, e.g. [GW307]."""
    sample_every: int = Field(20, gt=0)
    """Steps between the doctor's more expensive statistics (per-layer norms, update ratios,
    activations); the loss and the global gradient norm are recorded at every step."""
    max_repairs: int = Field(3, ge=0)
    """repair: at most this many repairs in one run."""

    @field_validator("mode", mode="before")
    @classmethod
    def _off(cls, mode: Any) -> Any:
        return "off" if mode is False else mode  # YAML 1.1 reads an unquoted off (or no) as false

    @field_validator("ignore")
    @classmethod
    def _check_codes(cls, codes: list[str]) -> list[str]:
        bad = [c for c in codes if not (len(c) == 5 and c.startswith("GW") and c[2:].isdigit())]
        if bad:
            raise ValueError(f"rule codes like GW307 (not {bad[0]!r})")
        return codes


class FinetuneSpec(_Section):
    """Start from pretrained weights and adapt them: freezing, discriminative rates, gradual
    unfreezing, parameter-efficient adapters (PEFT). Empty: train from scratch."""

    pretrained: str | None = None
    """Weights to start from (never downloaded): a gradwise run directory, a .safetensors / .pt /
    .bin state-dict file, or a Hugging Face directory written by save_pretrained."""
    which: Literal["best", "last"] = "best"
    """For a run directory: its best or its latest checkpoint."""
    strict: bool = False
    """true: every key must match. false: load what matches and report missing, unexpected and
    shape-mismatched keys (a head sized for another number of classes starts fresh, and is named)."""
    freeze: list[str] = Field(default_factory=list)
    """Module paths or globs frozen for the whole run, e.g. ["features.*"], or ["*"] with
    unfreeze: [head] to train the head alone ("head": the top layer group, whatever its name)."""
    unfreeze: list[str] = Field(default_factory=list)
    """Module paths or globs kept trainable although `freeze` matches them, e.g. ["head.*"]."""
    layer_groups: list[str] | Literal["auto"] = "auto"
    """Layer groups, bottom to top, as globs of parameter names; auto: the embeddings, each block
    of the model's longest block list (or each top-level child), the head. Used by lr_decay,
    lr_range, head_epochs and unfreeze_every."""
    lr_decay: float | None = Field(None, ge=1)
    """Discriminative learning rates: each group's rate is the next higher group's / lr_decay
    (ULMFiT: 2.6). The top group trains at optim.lr."""
    lr_range: tuple[float, float] | None = None
    """Discriminative learning rates, fastai style: [low, high], groups spaced geometrically from
    the bottom (low) to the top (high); overrides optim.lr for the groups."""
    head_epochs: int | None = Field(None, ge=1)
    """fastai's fine_tune: train the top group (the head) alone for this many epochs, then every
    group at half the rates."""
    unfreeze_every: int | None = Field(None, ge=1)
    """Gradual unfreezing (ULMFiT): start with the top group only, unfreeze one more group every
    this many epochs."""
    unfreeze_steps: int | None = Field(None, ge=1)
    """Gradual unfreezing every this many optimizer steps instead of epochs."""
    freeze_bn: bool = True
    """BatchNorm layers in frozen parts keep their running statistics (stay in eval mode)."""
    peft: Literal["lora", "dora", "ia3", "prefix", "prompt"] | None = None
    """Parameter-efficient fine-tuning with Hugging Face peft: only the adapter (and
    modules_to_save) trains and is checkpointed; the base stays as loaded."""
    lora_r: int = Field(8, ge=1)
    """LoRA/DoRA rank."""
    lora_alpha: float | None = Field(None, gt=0)
    """LoRA/DoRA scaling alpha (the update is scaled by alpha / r). Default: 2 x lora_r."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA/DoRA input."""
    target_modules: list[str] | str | None = None
    """Modules that get adapters: names (["q_proj", "v_proj"]), a regex string matched against the
    full module path, or types (["Linear", "Conv2d"]). Default: every Linear layer but the head."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter. Default: the head (the top group)."""
    virtual_tokens: int = Field(20, ge=1)
    """Prefix and prompt tuning: the number of virtual tokens."""
    adapter: str = "default"
    """The adapter's name: several adapters can sit over one base (gradwise.finetune.load_adapter)."""

    @field_validator("lr_range")
    @classmethod
    def _check_range(cls, lr_range: tuple[float, float] | None) -> tuple[float, float] | None:
        if lr_range is not None and not 0 < lr_range[0] <= lr_range[1]:
            raise ValueError(f"[low, high] with 0 < low <= high (not {list(lr_range)})")
        return lr_range

    @model_validator(mode="after")
    def _one_unfreezing(self) -> FinetuneSpec:
        chosen = [
            k for k in ("head_epochs", "unfreeze_every", "unfreeze_steps") if getattr(self, k)
        ]
        if len(chosen) > 1:
            raise ValueError(f"one of head_epochs, unfreeze_every, unfreeze_steps (not {chosen})")
        if self.lr_decay and self.lr_range:
            raise ValueError("one of lr_decay and lr_range (not both)")
        return self

    @property
    def active(self) -> bool:
        """Whether anything here changes a from-scratch run."""
        return bool(
            self.pretrained
            or self.freeze
            or self.lr_decay
            or self.lr_range
            or self.head_epochs
            or self.unfreeze_every
            or self.unfreeze_steps
            or self.peft
        )


class DistributedSpec(_Section):
    """Several processes (torchrun): data parallel (DDP) or sharded (FSDP2)."""

    strategy: Literal["auto", "ddp", "fsdp", "none"] = "auto"
    """auto: DDP when started with more than one process (torchrun), else none. fsdp: parameters,
    gradients and optimizer state sharded across ranks (torch FSDP2, fully_shard)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto: NCCL on CUDA, gloo on the CPU."""
    timeout_s: int = Field(600, gt=0)
    """How long a collective may wait for the other ranks before the run fails (a dead rank)."""


class Recipe(_Section):
    """Every decision of a training run. YAML round-trips; unknown keys are errors."""

    name: str | None = None
    """Run name; the run directory is runs/<name> (a suffix is added when taken). Default: model-data."""
    task: Task = "auto"
    """What is learned. auto/classification are resolved from the data (binary, multiclass, multilabel)."""
    seed: int = 0
    """Seeds Python, NumPy and torch; the data order and every random choice follow from it."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    doctor: DoctorSpec = Field(default_factory=DoctorSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: dict[str, Any] | None, source: str = "recipe") -> Recipe:
        """Validate a plain dict; errors become a ConfigError naming the field, value and expectation."""
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(source, data, "a mapping of recipe sections")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _config_error(exc, data) from None

    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe") -> Recipe:
        return cls.parse(load_yaml(text, source), source)

    def to_yaml(self, comments: bool = False) -> str:
        """YAML text; with ``comments`` every field is preceded by its documentation."""
        if not comments:
            return yaml.safe_dump(self.to_dict(), sort_keys=False)
        return "".join(_commented(self, indent=""))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted keys to scalar values, e.g. {'optim.lr': 0.001} (for trackers and search spaces)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out

    def override(self, overrides: dict[str, Any] | None = None, **kwargs: Any) -> Recipe:
        """A new Recipe with settings changed.

        Keys are dotted paths (``optim.lr``), a section name with a dict (``optim={'lr': 1e-3}``), or a
        bare field name that is unique across sections (``lr``, ``epochs``, ``batch_size``).
        """
        data = self.to_dict()
        for key, value in {**(overrides or {}), **kwargs}.items():
            path = _resolve_key(key, value)
            target = data
            for part in path[:-1]:
                target = target.setdefault(part, {})
            if isinstance(value, dict) and isinstance(target.get(path[-1]), dict):
                target[path[-1]] = {**target[path[-1]], **value}
            else:
                target[path[-1]] = value
        return Recipe.parse(data)


# -- YAML ---------------------------------------------------------------------------------------

MAX_VALUES = 100_000
"""The most values a YAML document may hold once its aliases are expanded: a 300-byte "billion
laughs" (``a: &a [x, x, ...]``, ``b: &b [*a, *a, ...]``...) would otherwise expand to 10^9."""
MAX_DEPTH = 64  # nesting; a recipe needs about 5


class _TooLarge(Exception):
    pass


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml: fast, bounded nesting
    """PyYAML's safe loader that refuses documents too large or too deep once aliases are expanded.

    The size is counted on the node graph, where an alias is one shared node, so counting costs
    no more than parsing.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _check_size(node)
        return super().construct_document(node)


def _check_size(root: yaml.Node) -> None:
    """Raise _TooLarge for more than MAX_VALUES expanded values, MAX_DEPTH levels or a cycle."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 0, False)]
    while stack:
        node, depth, done = stack.pop()
        children = _children(node)
        if done:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_VALUES:
                raise _TooLarge(
                    f"Its aliases expand it to more than {MAX_VALUES:,} values (the node at "
                    f"line {node.start_mark.line + 1})"
                )
        elif id(node) in on_path:
            raise _TooLarge(f"An alias at line {node.start_mark.line + 1} contains itself")
        elif id(node) not in sizes:
            if depth > MAX_DEPTH:
                raise _TooLarge(f"It nests deeper than {MAX_DEPTH} levels")
            on_path.add(id(node))
            stack.append((node, depth, True))
            stack += [(c, depth + 1, False) for c in children]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def load_yaml(text: str, source: str = "recipe") -> Any:
    """Parse YAML safely: damaged, huge or alias-bombed YAML is one ConfigError, never a hang."""
    try:
        return yaml.load(text, Loader=_Loader)
    except _TooLarge as exc:
        expected = f"YAML of at most {MAX_VALUES:,} values and {MAX_DEPTH} levels, aliases expanded"
        raise ConfigError(source, "<yaml>", expected, str(exc)) from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: a 5,000-digit int
        reason = " ".join(str(exc).replace('in "<unicode string>", ', "").split())
        raise ConfigError(source, "<yaml>", "valid YAML", reason[:300]) from None


# -- factory arguments (model.kwargs, data.kwargs) ----------------------------------------------

FACTORY_ERRORS = (TypeError, ValueError, ArithmeticError, RuntimeError, MemoryError)
"""What a model or data factory raises for arguments it cannot use (besides GradwiseErrors)."""


def call_factory(factory: Callable[..., Any], kwargs: dict[str, Any], field: str, name: str) -> Any:
    """``factory(**kwargs)`` for ``field`` (model.kwargs or data.kwargs) of factory ``name``.

    The arguments of gradwise's own factories are checked against their annotations first; an
    argument the factory then rejects is a ConfigError naming it (when the error names it), so a
    wrong type or value is one line, never a traceback.
    """
    if getattr(factory, "__module__", "").startswith("gradwise."):
        check_argument_types(factory, kwargs, field)
    try:
        return factory(**kwargs)
    except GradwiseError:
        raise
    except FACTORY_ERRORS as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        named = [k for k in kwargs if re.search(rf"\b{re.escape(k)}\b", str(exc))]
        if len(named) == 1:
            key = named[0]
            raise ConfigError(
                f"{field}.{key}", kwargs[key], f"a value {name!r} accepts", reason
            ) from exc
        raise ConfigError(field, kwargs, f"arguments {name!r} accepts", reason) from exc


def check_argument_types(factory: Callable[..., Any], kwargs: dict[str, Any], field: str) -> None:
    """A ConfigError for the first argument whose value does not fit the factory's annotation."""
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # annotations that do not resolve: nothing to check against
        return
    for key, value in kwargs.items():
        if key in hints and not _fits(value, hints[key]):
            raise ConfigError(f"{field}.{key}", value, _describe(hints[key]))


def _fits(value: Any, hint: Any) -> bool:
    """Whether a plain (YAML) value fits a type annotation; unknown kinds of annotation pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _fits(value, args[0])
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is Any:
        return True
    if hint in (type(None), None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is Literal:
        return value in args
    if origin is tuple and args and args[-1] is not Ellipsis:
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(args)
            and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        )
    if origin in (list, tuple, set, frozenset, abc.Sequence, abc.MutableSequence):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value if args)
    if origin in (dict, abc.Mapping, abc.MutableMapping):
        return isinstance(value, dict) and all(
            _fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items() if args
        )
    if isinstance(hint, type):
        return isinstance(value, str if issubclass(hint, os.PathLike) else hint)
    return True


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _describe(hint: Any) -> str:
    """An annotation in words: int | None -> 'an integer or null'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _describe(args[0])
    if origin in (typing.Union, types.UnionType):
        words = [_describe(a) for a in args]
        return ", ".join(words[:-1]) + " or " + words[-1]
    if hint in (type(None), None):
        return "null"
    if hint in _NAMES:
        return _NAMES[hint]
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    items = _PLURALS.get(args[0], "values") if args else "values"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} {items}"
    if origin in (list, tuple, set, frozenset, abc.Sequence, abc.MutableSequence):
        return f"a list of {items}"
    if origin in (dict, abc.Mapping, abc.MutableMapping):
        return "a mapping"
    return f"a {getattr(hint, '__name__', str(hint))}"


def _commented(model: BaseModel, indent: str) -> list[str]:
    lines = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        for doc_line in (field.description or "").splitlines():
            lines.append(f"{indent}# {doc_line.strip()}\n")
        if isinstance(value, _Section):
            lines.append(f"{indent}{name}:\n")
            lines += _commented(value, indent + "  ")
        else:
            dumped = yaml.safe_dump({name: _plain(value)}, default_flow_style=True, width=200)
            lines.append(f"{indent}{dumped.strip().removeprefix('{').removesuffix('}')}\n")
    return lines


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def set_paths(source: dict | str | Path) -> set[str]:
    """Dotted paths of the settings a recipe file or dict names explicitly (kwargs count per key)."""
    data = source if isinstance(source, dict) else load_yaml(Path(source).read_text(), str(source))
    data = data or {}
    paths: set[str] = set()

    def walk(prefix: str, value: Any) -> None:
        if (
            isinstance(value, dict)
            and value
            and (prefix.count(".") < 1 or prefix.endswith("kwargs"))
        ):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            paths.add(prefix)

    walk("", data)
    return paths


def override_paths(overrides: dict[str, Any]) -> set[str]:
    """Dotted paths that ``Recipe.override`` would set for these overrides."""
    paths = set()
    for key, value in overrides.items():
        path = ".".join(_resolve_key(key, value))
        if isinstance(value, dict) and "." not in path:
            paths |= {f"{path}.{k}" for k in value}
        else:
            paths.add(path)
    return paths


def load_recipe(source: str | Path | dict | Recipe | None) -> Recipe:
    """A Recipe from a YAML file path, a dict, a Recipe, or None (all defaults)."""
    if source is None:
        return Recipe()
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        return Recipe.parse(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError("recipe", str(path), "an existing YAML file")
    return Recipe.from_yaml(path.read_text(), source=str(path))


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is parsed as YAML (numbers, lists, null...)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", text, "key=value, e.g. optim.lr=3e-4")
    try:
        value = load_yaml(raw, f"--set {key}") if raw.strip() else None
    except ConfigError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as text
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip(), value


# -- field paths ------------------------------------------------------------------------------


def _section_fields() -> dict[str, list[str]]:
    return {
        name: list(field.annotation.model_fields)
        for name, field in Recipe.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, _Section)
    }


def _aliases() -> dict[str, tuple[str, str]]:
    """Bare field names that occur in exactly one section -> (section, field)."""
    seen: dict[str, list[tuple[str, str]]] = {}
    for section, fields in _section_fields().items():
        for field in fields:
            seen.setdefault(field, []).append((section, field))
    return {name: paths[0] for name, paths in seen.items() if len(paths) == 1}


def _all_paths() -> list[str]:
    paths = [f"{s}.{f}" for s, fields in _section_fields().items() for f in fields]
    return paths + list(Recipe.model_fields) + list(_aliases())


def _resolve_key(key: str, value: Any) -> list[str]:
    parts = key.split(".")
    sections = _section_fields()
    if parts[0] in Recipe.model_fields:
        section_fields = sections.get(parts[0])
        if len(parts) == 1 or section_fields is None or parts[1] in section_fields:
            return parts
        if parts[1] not in section_fields and len(parts) == 2:
            hint = did_you_mean(parts[1], section_fields) or f"fields: {', '.join(section_fields)}"
            raise ConfigError(key, value, f"a known setting of '{parts[0]}'", hint)
        return parts
    alias = _aliases().get(parts[0])
    if alias and len(parts) == 1:
        return list(alias)
    hint = did_you_mean(key, _all_paths())
    raise ConfigError(key, value, "a known recipe setting such as optim.lr or epochs", hint)


def _config_error(exc: ValidationError, data: dict[str, Any]) -> ConfigError:
    """The first validation problem as one ConfigError (the one a user fixes first)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    field = ".".join(loc) or "recipe"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        section = Recipe.model_fields.get(loc[0]) if len(loc) > 1 else None
        if section is not None and isinstance(section.annotation, type):
            choices = list(section.annotation.model_fields)
        else:
            choices = list(Recipe.model_fields)
        hint = did_you_mean(loc[-1], choices) or f"known: {', '.join(choices)}"
        where = f"a known setting of '{loc[-2]}'" if len(loc) > 1 else "a known recipe section"
        return ConfigError(field, value, where, hint)
    expected = err["msg"]
    for prefix in ("Value error, ", "Input should be "):
        if expected.startswith(prefix):
            expected = expected[len(prefix) :]
    names, annotation = _field_of(loc)
    field = ".".join(names)  # without the union members pydantic names ("constrained-int")
    if err["type"] in ("missing", "too_short", "too_long") and annotation is not None:
        field = ".".join(n for n in names if not n.isdigit())  # a list of fixed length
        value = _lookup(data, field.split("."), value)
        expected = _describe(annotation)
    elif len(names) < len(loc) and err["type"] not in _BOUNDS:  # no member of a union fits
        expected = _describe(annotation)
    return ConfigError(field, value, expected)


_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "value_error")


def _field_of(loc: list[str]) -> tuple[list[str], Any]:
    """The Recipe field a validation error is about: its path (with list indices) and annotation."""
    model: Any = Recipe
    names: list[str] = []
    annotation = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if fields is not None and part in fields:
            annotation = model = fields[part].annotation
            names.append(part)
        elif part.isdigit():
            names.append(part)
    return names or ["recipe"], annotation


def _lookup(data: Any, path: list[str], default: Any) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data
