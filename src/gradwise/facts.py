"""Facts: what an expert looks at before choosing a recipe, probed without training.

    f = gradwise.facts(model, train_data)
    f.architecture, f.params, f.modality, f.n_samples, f.num_classes, f.imbalance, f.bf16
    f.world_size, f.device_count, f.device_memory_gb
    f.val_samples, f.target_scale  # with val_data; regression targets' mean and std

    f = gradwise.facts(model, train_data, finetune=recipe.finetune)  # after loading and wrapping
    f.finetune, f.peft, f.trainable_params, f.adapter_params, f.head_only, f.layer_groups

The advisor decides from these facts only, so every piece of advice can cite the fact behind it.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from gradwise._lazy import callable_as_namesake
from gradwise.data.bundle import DataInfo
from gradwise.errors import DataError

if TYPE_CHECKING:
    from gradwise.recipe import FinetuneSpec

NORMS = {
    "batchnorm": nn.modules.batchnorm._BatchNorm,
    "layernorm": (nn.LayerNorm, nn.RMSNorm),
    "groupnorm": nn.GroupNorm,
}
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Mish,
)
FEATURE_SAMPLE = 2048  # rows of in-memory tensors read to measure the input scale
DATASET_SAMPLE = 256  # samples read from a generic Dataset (each may load a file)


@dataclass
class Facts:
    """Model, data and hardware facts (see :func:`facts`)."""

    # model
    params: int
    trainable_params: int
    depth: int  # layers with weights (Linear, Conv, recurrent, attention projections)
    kinds: dict[
        str, int
    ]  # conv, linear, batchnorm, layernorm, groupnorm, attention, recurrent, embedding, dropout
    activations: list[str]
    architecture: str  # transformer | rnn | cnn | mlp
    width: int | None  # the most common input width of the Linear layers (d_model in a Transformer)
    # data
    task: str | None
    modality: str  # image | tokens | sequence | tabular
    input_shape: tuple[int, ...]
    n_samples: int
    num_classes: int | None
    class_counts: list[int] | None
    imbalance: float | None  # majority / minority class count
    feature_scale: dict[str, float]  # mean, std, max_abs of the inputs (floating inputs only)
    target_heavy_tail: float | None  # regression: fraction of standardised targets beyond 4 sigma
    # hardware
    device: str
    bf16: bool
    memory_gb: float | None  # available memory for training (GPU memory on CUDA, RAM otherwise)
    cpu_count: int
    # distributed (torchrun): how many processes train together, and the accelerators they share
    world_size: int = 1  # processes in the run: torch.distributed's group, else WORLD_SIZE, else 1
    local_world_size: int = 1  # of them on this machine (LOCAL_WORLD_SIZE; they share its RAM)
    device_count: int = 0  # accelerators (CUDA devices) on this machine; 0 on the CPU
    device_memory_gb: float | None = None  # total memory of one accelerator (GiB); None on the CPU
    # the validation data and the targets' scale
    val_samples: int | None = None  # validation samples (None: no validation data given)
    target_scale: dict[str, float] | None = None  # regression: mean and std of the train targets
    target_standardized: bool = False  # the data set standardised the targets (its preprocessing)
    # fine-tuning (the recipe's finetune section, measured after loading, wrapping and freezing)
    finetune: str = "scratch"  # scratch | full | partial (frozen parts, unfreezing) | peft
    peft: str | None = None  # lora | dora | ia3 | prefix | prompt: chosen, or adapters found
    peft_in_recipe: bool = False  # finetune.peft chose it (else: a model you wrapped yourself)
    adapter_params: int = 0  # parameters of the PEFT adapters (not counting modules_to_save)
    head_only: bool = False  # partial, and only the head trains for the whole run
    layer_groups: int | None = None  # layer groups bottom to top (discriminative rates)
    unfreezing: str | None = None  # gradual (unfreeze_every/_steps) | head_first (head_epochs)
    lr_groups: str | None = None  # the user's discriminative rates: lr_decay | lr_range
    target_modules: list[str] | str | None = None  # the user's PEFT target modules (None: default)
    notes: list[str] = field(default_factory=list)

    @property
    def base_params(self) -> int:
        """Parameters of the model without its PEFT adapters."""
        return self.params - self.adapter_params

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def facts(
    model: nn.Module,
    train_data: Any,
    task: str | None = None,
    info: DataInfo | None = None,
    *,
    finetune: FinetuneSpec | None = None,
    val_data: Any = None,
) -> Facts:
    """Probe ``model`` and ``train_data`` (Dataset, DataLoader or (X, y)) without training.

    finetune: the recipe's fine-tuning section; measure after the pretrained weights are loaded,
    adapters added and parts frozen, so the trainable-parameter counts are the real ones.
    val_data: the validation data, counted (how noisy a validation metric is depends on it); without
    it, the validation split ``info`` records, if any.
    """
    from gradwise.data import as_dataset, describe
    from gradwise.tasks import resolve_kind

    dataset = train_data.dataset if isinstance(train_data, DataLoader) else as_dataset(train_data)
    info = info or describe(dataset, name="train_data")
    kind = resolve_kind(task or "auto", info) if (task or info.task) else None
    kinds, activations = _module_kinds(model)
    x, y = _sample(dataset)
    counts = _class_counts(y, kind, info.num_classes)
    device, bf16, memory = _hardware()
    world, local = world_size(), local_world_size()
    count, device_memory = _devices()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tuning = _finetune_facts(model, finetune, params, trainable)
    return Facts(
        params=params,
        trainable_params=trainable,
        depth=kinds.get("linear", 0) + kinds.get("conv", 0) + kinds.get("recurrent", 0),
        kinds=kinds,
        activations=activations,
        architecture=_architecture(kinds),
        width=_width(model),
        task=kind,
        modality=_modality(info),
        input_shape=tuple(info.input_shape),
        n_samples=info.n_train or _length(dataset),
        num_classes=info.num_classes if kind in ("binary", "multiclass", "multilabel") else None,
        class_counts=counts,
        imbalance=(max(counts) / max(min(counts), 1)) if counts else None,
        feature_scale=_scale(x),
        target_heavy_tail=_heavy_tail(y) if kind == "regression" else None,
        target_scale=_target_scale(y) if kind == "regression" else None,
        target_standardized="target_standardize" in info.preprocessing,
        val_samples=_val_samples(val_data, info),
        device=device,
        bf16=bf16,
        memory_gb=memory,
        cpu_count=os.cpu_count() or 1,
        world_size=world,
        local_world_size=local,
        device_count=count,
        device_memory_gb=device_memory,
        **tuning,
        notes=list(info.notes),
    )


def class_counts(dataset: Dataset, kind: str, num_classes: int | None) -> list[int] | None:
    """Samples per class (positives per label for multilabel); from a sample of large generic sets."""
    return _class_counts(_sample(dataset)[1], kind, num_classes)


# -- fine-tuning --------------------------------------------------------------------------------

PEFT_TYPES = {  # peft's PeftType values -> gradwise's finetune.peft names
    "LORA": "lora",
    "IA3": "ia3",
    "PREFIX_TUNING": "prefix",
    "PROMPT_TUNING": "prompt",
    "P_TUNING": "prompt",
}


def _finetune_facts(
    model: nn.Module, spec: FinetuneSpec | None, params: int, trainable: int
) -> dict[str, Any]:
    """The fine-tuning fields of :class:`Facts`: what the user chose, and what the model shows."""
    found, adapter_params = adapters(model)
    active = spec is not None and spec.active
    method = (spec.peft if spec is not None else None) or found
    unfreezing = None
    if active and (spec.unfreeze_every or spec.unfreeze_steps):
        unfreezing = "gradual"
    elif active and spec.head_epochs:
        unfreezing = "head_first"
    if method:
        mode = "peft"
    elif not active:
        mode = "scratch"  # never invent a pretrained start the user did not declare
    elif trainable < params or unfreezing:
        mode = "partial"
    else:
        mode = "full"
    lr_groups = None
    if active and spec.lr_decay:
        lr_groups = "lr_decay"
    elif active and spec.lr_range:
        lr_groups = "lr_range"
    groups = None
    if mode in ("full", "partial"):
        groups = _layer_groups(model, spec.layer_groups)
    return {
        "finetune": mode,
        "peft": method,
        "peft_in_recipe": bool(spec is not None and spec.peft),
        "adapter_params": adapter_params,
        "head_only": mode == "partial" and not unfreezing and _trains_head_only(model),
        "layer_groups": groups,
        "unfreezing": unfreezing,
        "lr_groups": lr_groups,
        "target_modules": spec.target_modules if spec is not None and method else None,
    }


def adapters(model: nn.Module) -> tuple[str | None, int]:
    """(the PEFT method of the adapters in ``model`` or None, their parameter count).

    Reads Hugging Face peft's own structures without importing peft: ``peft_config`` on a
    PeftModel, and the ``adapter_layer_names`` of its tuner layers (a head kept trainable through
    ``modules_to_save`` is a full copy, not an adapter, and is not counted).
    """
    method = None
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and configs:
        config = configs.get(getattr(model, "active_adapter", None)) or next(iter(configs.values()))
        kind = getattr(config, "peft_type", None)
        kind = str(getattr(kind, "value", kind) or "")
        method = PEFT_TYPES.get(kind, kind.lower() or None)
        if method == "lora" and getattr(config, "use_dora", False):
            method = "dora"
    seen: set[int] = set()
    count = 0
    for module in model.modules():
        names = getattr(module, "adapter_layer_names", None)
        if not isinstance(names, (tuple, list)) or "modules_to_save" in names:
            continue
        for attr in set(names):
            holder = getattr(module, attr, None)
            if isinstance(holder, (nn.Module, nn.ParameterDict)):
                for p in holder.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        count += p.numel()
    prompts = getattr(model, "prompt_encoder", None)
    if isinstance(prompts, nn.Module):
        for p in prompts.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                count += p.numel()
    if method is None and count:
        method = "lora"  # tuner layers without a PeftModel around them (inject_adapter_in_model)
        kinds = {type(m).__module__ for m in model.modules() if hasattr(m, "adapter_layer_names")}
        if any(".ia3" in k for k in kinds):
            method = "ia3"
    return method, count


def _trains_head_only(model: nn.Module) -> bool:
    """Whether every trainable parameter lies in the head (the top layer group)."""
    from gradwise.finetune.layers import head_names, matches

    try:
        head = head_names(model)
    except Exception:  # an unusual model: the facts say "not known to be head-only", never fail
        return False
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return bool(head and trainable) and all(matches(n, head) for n in trainable)


def _layer_groups(model: nn.Module, spec: list[str] | str) -> int | None:
    """How many layer groups finetune.layer_groups makes of the model (None: unknown, e.g. globs
    that do not fit it, which the fine-tuning set-up reports)."""
    from gradwise.finetune.layers import layer_groups

    try:
        return len(layer_groups(model, spec))
    except Exception:  # globs that do not fit, an unusual model: unknown, never a failure here
        return None


def _width(model: nn.Module) -> int | None:
    widths = Counter(m.in_features for m in model.modules() if isinstance(m, nn.Linear))
    return widths.most_common(1)[0][0] if widths else None


def _module_kinds(model: nn.Module) -> tuple[dict[str, int], list[str]]:
    kinds: Counter[str] = Counter()
    activations: list[str] = []
    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kinds["conv"] += 1
        elif isinstance(module, nn.Linear):
            kinds["linear"] += 1
        elif isinstance(module, nn.RNNBase):
            kinds["recurrent"] += 1
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            kinds["embedding"] += 1
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            kinds["dropout"] += 1
        elif isinstance(module, nn.MultiheadAttention) or "Attention" in name:
            kinds["attention"] += 1
        for norm, types in NORMS.items():
            if isinstance(module, types):
                kinds[norm] += 1
        if isinstance(module, ACTIVATIONS) and name not in activations:
            activations.append(name)
    return dict(kinds), activations


def _architecture(kinds: dict[str, int]) -> str:
    if kinds.get("attention"):
        return "transformer"
    if kinds.get("recurrent"):
        return "rnn"
    if kinds.get("conv"):
        return "cnn"
    return "mlp"


def _modality(info: DataInfo) -> str:
    if info.input_dtype == "int64":
        return "tokens"
    if len(info.input_shape) == 3:
        return "image"
    if len(info.input_shape) == 2:
        return "sequence"
    return "tabular"


def _length(dataset: Dataset) -> int:
    """Samples in the data set; 0 for a stream (the advisor then plans by steps)."""
    return 0 if isinstance(dataset, IterableDataset) else len(dataset)


def _sample(dataset: Dataset) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Inputs and targets of the first samples (all targets of in-memory tensors); a stream's first
    ones; (None, None) when they do not stack."""
    from gradwise.data.infer import sample_pair

    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
        return tensors[0][:FEATURE_SAMPLE], tensors[-1]
    try:
        if isinstance(dataset, IterableDataset):
            first = itertools.islice(dataset, DATASET_SAMPLE)
        else:
            first = (dataset[i] for i in range(min(len(dataset), DATASET_SAMPLE)))
        pairs = [sample_pair(sample, "train_data") for sample in first]
        return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])
    except (TypeError, RuntimeError, IndexError, KeyError, DataError):
        return None, None


def _class_counts(
    y: torch.Tensor | None, kind: str | None, num_classes: int | None
) -> list[int] | None:
    if y is None or kind not in ("binary", "multiclass", "multilabel"):
        return None
    if kind == "multilabel":
        positives = y.float().reshape(-1, y.shape[-1]).sum(0)
        return [int(v) for v in positives]
    labels = y.reshape(-1).long()
    labels = labels[labels >= 0]  # invalid labels are the Trainer's clear error, not a crash here
    return torch.bincount(labels, minlength=num_classes or 0).tolist()


def _scale(x: torch.Tensor | None) -> dict[str, float]:
    if x is None or not x.is_floating_point() or x.numel() == 0:
        return {}
    x = x.float()
    return {"mean": float(x.mean()), "std": float(x.std()), "max_abs": float(x.abs().max())}


def _target_scale(y: torch.Tensor | None) -> dict[str, float] | None:
    """Mean and standard deviation of floating targets (over every value of every output)."""
    if y is None or not y.is_floating_point() or y.numel() < 2:
        return None
    y = y.double()
    return {"mean": float(y.mean()), "std": float(y.std())}


def _val_samples(val_data: Any, info: DataInfo) -> int | None:
    """Samples of the validation data (None for a stream or none at all)."""
    if val_data is None:
        return info.n_val or None
    from gradwise.data import as_dataset

    dataset = val_data.dataset if isinstance(val_data, DataLoader) else as_dataset(val_data)
    try:
        return _length(dataset) or None
    except TypeError:  # a Dataset without a length
        return None


def _heavy_tail(y: torch.Tensor | None) -> float | None:
    if y is None or not y.is_floating_point() or y.numel() < 2:
        return None
    z = (y.float() - y.float().mean()) / y.float().std().clamp(min=1e-12)
    return float((z.abs() > 4).float().mean())


def world_size() -> int:
    """Processes training together: torch.distributed's group when one is initialised, else the
    ``WORLD_SIZE`` torchrun sets, else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_count("WORLD_SIZE", 1)


def local_world_size() -> int:
    """Processes of the run on this machine: torchrun's ``LOCAL_WORLD_SIZE``, else the world size
    (one machine)."""
    return _env_count("LOCAL_WORLD_SIZE", world_size())


def _env_count(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value >= 1 else default


def _devices() -> tuple[int, float | None]:
    """(CUDA devices on this machine, total memory of one in GiB, None without CUDA)."""
    if not torch.cuda.is_available():
        return 0, None
    try:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    except (RuntimeError, AssertionError):
        return torch.cuda.device_count(), None
    return torch.cuda.device_count(), math.floor(total / 2**30 * 10) / 10


def _hardware() -> tuple[str, bool, float | None]:
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return torch.cuda.get_device_name(), torch.cuda.is_bf16_supported(), free / 2**30
    try:
        pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = pages * size / 2**30
    except (ValueError, OSError, AttributeError):
        memory = None
    return "cpu", False, memory if memory is None else math.floor(memory * 10) / 10


callable_as_namesake(__name__)  # gradwise.facts(...) is gradwise.facts.facts(...)
