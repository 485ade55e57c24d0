"""Assembly: one public step turns a recipe, data and a model into a ready run.

    a = gradwise.assemble(model, train_data, val_data, recipe="recipe.yaml", advise=True)
    a.model, a.task, a.train_loader, a.val_loader, a.recipe, a.advice

In the spirit of torchtune's recipes, one concern per step, each done once and in this order: the
seed, the data (loaded once), the model (built once, sized from the data), the facts and the advice
(when asked), the device and precision, the task, a probe of model and loss on two samples, the
loaders, the step budget and the monitored metric. Everything that can fail on bad input fails here,
before a run directory exists. The Trainer, the advisor's ``advise``, ``gradwise check`` and the
tuner all call :func:`assemble`; the Trainer then only runs the loop.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from gradwise._lazy import callable_as_namesake
from gradwise.advisor import (
    STREAM_EVALUATIONS,
    Advice,
    Advised,
    decide,
    probe_lr,
    respect,
    zoo_kwargs,
)
from gradwise.batch import outputs_of, run_model, split_batch, takes_labels
from gradwise.data.bundle import IGNORE_INDEX, DataInfo
from gradwise.data.loader import make_loader, num_batches, steps_per_epoch
from gradwise.errors import ConfigError, DataError
from gradwise.facts import Facts
from gradwise.finetune import Finetuning
from gradwise.recipe import Recipe, load_recipe, set_paths
from gradwise.tasks import (
    Task,
    balanced_weights,
    check_label_range,
    num_outputs,
    resolve_kind,
    resolve_monitor,
)

OBJECT = "object:"  # recipe model/data names for objects passed from Python

DataLike = Dataset | DataLoader | tuple | None


@dataclass
class Data:
    """The training and validation data, loaded once: datasets, or the user's own loaders."""

    train: Dataset | None  # None when the user gave a DataLoader
    train_loader: DataLoader | None
    val: Dataset | None
    val_loader: DataLoader | None
    info: DataInfo

    @property
    def train_dataset(self) -> Dataset:
        return self.train if self.train is not None else self.train_loader.dataset


@dataclass
class Assembly:
    """A run ready to train: every object the loop needs, and the recipe that describes it."""

    recipe: Recipe  # resolved: the task, the model's full arguments, where model and data came from
    model: nn.Module
    task: Task
    info: DataInfo
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    train_loader: DataLoader
    val_loader: DataLoader | None
    steps_per_epoch: int | None  # None for data without a length
    total_steps: int
    epochs: int
    monitor: str
    mode: str  # min | max
    advice: list[Advice] | None = None
    facts: Facts | None = None
    check_batch_labels: bool = False  # labels the up-front scan did not read: check per batch
    model_loss: bool = False  # train on the loss the model computes from the labels (Hugging Face)
    eval_steps: int | None = None  # validate every N optimizer steps as well (streams: always)
    finetune: Finetuning | None = None  # pretrained weights, adapter, frozen parts, layer groups
    checkpointed: list[str] | None = None  # modules whose activations are recomputed in backward

    @property
    def train_dataset(self) -> Dataset:
        """The training Dataset behind the loader (gradwise wraps in-memory tensors)."""
        dataset = self.train_loader.dataset
        tensors = getattr(dataset, "tensors", None)
        if tensors is not None and not isinstance(dataset, TensorDataset):
            return TensorDataset(*tensors)
        return dataset

    @property
    def val_dataset(self) -> Dataset | None:
        return self.val_loader.dataset if self.val_loader is not None else None

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)


def assemble(
    model: nn.Module | None = None,
    train_data: DataLike = None,
    val_data: DataLike = None,
    recipe: Recipe | dict | str | None = None,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    advise: bool = False,
    explicit: set[str] | frozenset[str] = frozenset(),
    probe: bool = False,
    budget: int | None = None,
    trusted: bool = True,
    metrics: tuple[str, ...] = (),
) -> Assembly:
    """Assemble a run from ``recipe`` (a Recipe, dict or YAML path; None: the defaults).

    model / train_data / val_data: objects, or None to build or load what the recipe names.
    advise: ask the advisor for every setting not in ``explicit`` (dotted paths the user chose; a
    recipe given as a dict or path counts as chosen); ``probe`` refines its learning rate with short
    runs of rates around it (:mod:`gradwise.lr_probe`) and ``budget`` fixes the epochs it plans for. trusted: whether import paths in the
    recipe may be imported (see :mod:`gradwise.trust`). metrics: the names of the user's own
    validation metrics (which the monitor may name).
    """
    if isinstance(recipe, (dict, str, os.PathLike)) and advise:
        explicit = set(explicit) | set_paths(recipe)
    r = load_recipe(recipe)
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError("loss_fn", loss_fn, "a callable (outputs, targets) -> scalar loss")
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError("model", type(model).__name__, "a torch.nn.Module or None")
    seed_everything(r.seed, r.train.deterministic)  # the model's initialisation follows the seed
    data = load_data(r, train_data, val_data, trusted)
    r = _record_sources(r, train_data, model)
    kind = resolve_kind(r.task, data.info)
    width = num_outputs(kind, data.info)
    model = model if model is not None else _build_model(r, data.info, width, trusted)
    if model.__dict__.get("gradwise_build"):
        r = r.override({"model.kwargs": model.gradwise_build["kwargs"]})
    finetune = None
    if r.finetune.active:  # pretrained weights, adapter, frozen parts: before facts and advice
        from gradwise.finetune import prepare

        finetune = prepare(model, r.finetune)
        model = finetune.model
    checkpointed = []
    if r.train.activation_checkpointing:  # recompute the blocks' activations in backward
        from gradwise.memory import apply_activation_checkpointing

        checkpointed = apply_activation_checkpointing(model, r.train.activation_checkpointing)
    device = resolve_device(r.train.device)
    model = model.to(device)

    advice = facts = None
    if advise:  # measuring and probing leave the run's random state as seeded
        with preserved_rng():
            r, advice, facts = _advise(
                r, model, data, kind, width, explicit, budget, probe, loss_fn
            )
        _apply_rates(model, r)
    precision = resolve_precision(r.train.precision, device)
    task = Task(
        kind,
        width,
        loss=loss_fn or r.train.loss,
        label_smoothing=r.train.label_smoothing,
        class_weights=_class_weights(r, kind, data),
        focal_gamma=r.train.focal_gamma,
        trusted=trusted,
    )
    r = r.override(task=kind)
    check_labels, model_loss = _probe(model, data, task, r, device, precision, loss_fn)

    train_loader, val_loader = _loaders(r, data, device)
    per_epoch, total, epochs = _budget(r, train_loader)
    eval_steps = r.train.eval_steps or (None if per_epoch else max(1, total // STREAM_EVALUATIONS))
    monitor, mode = resolve_monitor(task, r.early_stopping, val_loader is not None, metrics)
    return Assembly(
        recipe=r,
        model=model,
        task=task,
        info=data.info,
        device=device,
        precision=precision,
        train_loader=train_loader,
        val_loader=val_loader,
        steps_per_epoch=per_epoch,
        total_steps=total,
        epochs=epochs,
        monitor=monitor,
        mode=mode,
        advice=advice,
        facts=facts,
        check_batch_labels=check_labels,
        model_loss=model_loss,
        eval_steps=eval_steps,
        finetune=finetune,
        checkpointed=checkpointed,
    )


def advise(
    model: nn.Module | None = None,
    train_data: DataLike = None,
    task: str | None = None,
    budget: int | None = None,
    *,
    recipe: Recipe | dict | str | None = None,
    explicit: set[str] | None = None,
    probe: bool = False,
    loss_fn: Callable | None = None,
) -> Advised:
    """A complete recipe for ``model`` and ``train_data``, with the reason for every setting.

    model / train_data: objects, or None to build them from ``recipe``'s model and data sections.
    budget: the epoch budget (default: by data size). explicit: dotted settings the user chose
    (e.g. {"optim.lr"}); the advice keeps them and says what it would have chosen. With a recipe
    file or dict, every setting it names counts as explicit. probe: refine the learning rate with short,
    budgeted runs of candidate rates around the rule's on private copies of the model, judged on
    held-out training samples (:mod:`gradwise.lr_probe`; the evidence is ``advised.probe``). loss_fn: your loss
    for task="custom". The global random generators are left as they were.
    """
    base = load_recipe(recipe) if recipe is not None else Recipe()
    chosen = set(explicit or ()) | (set_paths(recipe) if isinstance(recipe, (dict, str)) else set())
    if task is not None:
        base = base.override(task=task)
    with preserved_rng(), _preserved_determinism():
        a = assemble(
            model,
            train_data,
            None,
            base,
            loss_fn=loss_fn,
            advise=True,
            explicit=chosen,
            probe=probe,
            budget=budget,
        )
    return Advised(a.recipe, a.advice, a.facts)


# -- the steps --------------------------------------------------------------------------------


def load_data(r: Recipe, train_data: DataLike, val_data: DataLike, trusted: bool = True) -> Data:
    """The recipe's data set, or the user's data as datasets (or their own loaders)."""
    from gradwise.data import as_dataset, describe
    from gradwise.data import load_data as load_named

    if train_data is None:
        if val_data is not None:
            raise ConfigError("train_data", None, "training data when val_data is given")
        require_object(r.data.name, "train_data")
        bundle = load_named(r.data.name, r.data.kwargs, trusted=trusted)
        return Data(bundle.train, None, bundle.val, None, bundle.info)
    train_loader = train_data if isinstance(train_data, DataLoader) else None
    train = None if train_loader else as_dataset(train_data)
    val_loader = val_data if isinstance(val_data, DataLoader) else None
    val = None if val_loader or val_data is None else as_dataset(val_data)
    dataset = train if train is not None else train_loader.dataset
    info = describe(dataset, name="train_data", label_key=r.data.label_key)
    return Data(train, train_loader, val, val_loader, info)


def _record_sources(r: Recipe, train_data: DataLike, model: nn.Module | None) -> Recipe:
    """The recipe records that model or data came from Python, not from its own sections."""
    if train_data is not None:
        kind = "arrays" if isinstance(train_data, tuple) else type(train_data).__name__
        r = r.override(data={"name": f"{OBJECT}{kind}", "kwargs": {}})
    if model is not None:
        r = r.override(model={"name": f"{OBJECT}{type(model).__name__}", "kwargs": {}})
    return r


def _build_model(r: Recipe, info: DataInfo, width: int | None, trusted: bool) -> nn.Module:
    from gradwise.models import build_model

    require_object(r.model.name, "model")
    return build_model(r.model.name, r.model.kwargs, info, width, trusted=trusted)


def _advise(
    r: Recipe,
    model: nn.Module,
    data: Data,
    kind: str,
    width: int | None,
    explicit: set[str] | frozenset[str],
    budget: int | None,
    probe: bool,
    loss_fn: Callable | None,
) -> tuple[Recipe, list[Advice], Facts]:
    """The advisor's recipe: facts about this model and data, the rule table, the user's choices."""
    from gradwise.facts import facts as measure

    dataset = data.train_dataset
    val = data.val if data.val is not None else data.val_loader
    f = measure(model, dataset, kind, data.info, finetune=r.finetune, val_data=val)
    zoo = zoo_kwargs(r.model.name) if not r.model.name.startswith(OBJECT) else set()
    epochs = (
        budget if budget is not None else (r.train.epochs if "train.epochs" in explicit else None)
    )
    advice = [respect(a, r, explicit) for a in decide(f, epochs, zoo)]
    if probe and "optim.lr" not in explicit:  # probed with the settings the run will have
        loss = Task(kind, width, loss=loss_fn or "auto").unsmoothed()
        advice = probe_lr(advice, model, dataset, loss, f, seed=r.seed)
    settings = {a.setting: a.value for a in advice if a.setting not in explicit}
    return r.override({**settings, "task": kind}), advice, f


def _apply_rates(model: nn.Module, r: Recipe) -> None:
    """Advised dropout and stochastic-depth rates of a zoo model, set in place (not rebuilt: they
    change no shape and no initial weight)."""
    build = model.__dict__.get("gradwise_build")
    if not build:
        return
    from gradwise.nn import set_rates

    kwargs = r.model.kwargs
    changed = {
        k: kwargs[k]
        for k in ("dropout", "drop_path")
        if build["kwargs"].get(k) != kwargs.get(k) and k in kwargs
    }
    if changed:
        set_rates(model, **changed)
        build["kwargs"] = {**build["kwargs"], **changed}


def _class_weights(r: Recipe, kind: str, data: Data) -> torch.Tensor | None:
    weights = r.train.class_weights
    if weights is None:
        return None
    if weights != "balanced":
        return torch.tensor(weights, dtype=torch.float32)
    from gradwise.facts import class_counts

    dataset = data.train_dataset
    counts = class_counts(dataset, kind, data.info.num_classes)
    if not counts:
        raise ConfigError(
            "train.class_weights", weights, "a classification task", f"this is {kind}"
        )
    return balanced_weights(counts, kind, len(dataset))


def _probe(
    model: nn.Module,
    data: Data,
    task: Task,
    r: Recipe,
    device: torch.device,
    precision: str,
    loss_fn: Callable | None,
) -> tuple[bool, bool]:
    """Model and loss on two samples: a mismatch fails here with a clear message.

    Returns (whether labels must be checked batch by batch, because the up-front scan read only
    part of the data; whether to train on the model's own loss: a model that takes the batch's
    labels, as Hugging Face models do, with no loss of gradwise's asked for)."""
    samples = _first_samples(data.train_dataset, 2)
    batch = split_batch(torch.utils.data.default_collate(samples), r.data.label_key).to(device)
    x, y = batch.inputs, batch.target
    if y is None:
        raise DataError("the training batches carry no target: give (inputs, target) pairs")
    model_loss = (
        loss_fn is None
        and r.train.loss == "auto"
        and not r.train.label_smoothing
        and r.train.class_weights is None
        and not (r.train.mixup or r.train.cutmix)
        and takes_labels(model, batch.label_key)
    )
    was_training = model.training
    rng = torch.get_rng_state()
    model.eval()
    try:
        with torch.no_grad(), autocast(device, precision):
            out, own_loss = outputs_of(run_model(model, batch, with_labels=model_loss))
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
        shape = f"with shape {tuple(x.shape)} ({x.dtype})" if x is not None else ""
        raise DataError(
            f"the model cannot take the data: a batch of inputs {shape} made the model fail: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
    task.check_fit(out, y, data.info)
    if task.kind in ("multiclass", "multilabel", "lm"):
        task.num_outputs = out.shape[-1]  # metrics size to the model's real output
    model_loss = model_loss and own_loss is not None
    if not model_loss:
        _probe_loss(task, out, y, r, loss_fn)
    image_classification = (
        task.kind in ("binary", "multiclass", "multilabel") and x is not None and x.ndim == 4
    )
    if (r.train.mixup or r.train.cutmix) and not image_classification:
        raise ConfigError(
            "train.mixup/cutmix",
            (r.train.mixup, r.train.cutmix),
            "image classification (inputs [batch, channels, height, width])",
            f"this is {task.kind} with inputs of shape {tuple(x.shape) if x is not None else ()}; "
            "set both to 0",
        )
    info = data.info
    check = task.kind in ("multiclass", "lm") and not (
        info.labels_complete and info.label_range is not None
    )
    return check, model_loss


def _first_samples(dataset: Dataset, n: int) -> list:
    """The first ``n`` samples of a map-style data set or a stream."""
    if isinstance(dataset, IterableDataset):
        return list(itertools.islice(dataset, n))
    return [dataset[i] for i in range(min(n, len(dataset)))]


def _probe_loss(
    task: Task, out: torch.Tensor, y: torch.Tensor, r: Recipe, loss_fn: Callable | None
) -> None:
    """The loss must take the model's outputs and the targets and give a number."""
    field, given = ("loss_fn", loss_fn) if loss_fn is not None else ("train.loss", r.train.loss)
    custom = loss_fn is not None or ":" in str(r.train.loss)
    expected = "a loss (outputs, targets) -> scalar tensor"
    try:
        with torch.no_grad():
            loss = task.loss(out.float(), y)
    except Exception as exc:  # a user's loss can raise anything
        if not custom:
            raise
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise ConfigError(field, given, expected, reason) from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ConfigError(field, given, expected, f"it returned {what}")


def _loaders(r: Recipe, data: Data, device: torch.device) -> tuple[DataLoader, DataLoader | None]:
    """gradwise's resumable loaders over the datasets (a plain one over a stream); the user's own
    loaders as they are."""
    from gradwise.distributed import from_env

    settings = {
        "seed": r.seed,
        "num_workers": r.data.num_workers,
        "pin_memory": r.data.pin_memory,
        "device": device,
    }
    rank, world, _ = from_env()  # under torchrun each rank takes its slice of the training data
    bs = r.data.batch_size
    train = data.train_loader or make_loader(
        data.train, bs, shuffle=True, drop_last=r.data.drop_last, rank=rank, world=world,
        **settings,
    )  # fmt: skip
    val = data.val_loader
    if val is None and data.val is not None:
        val = make_loader(
            data.val, r.data.eval_batch_size or 2 * bs, shuffle=False, drop_last=False, **settings
        )
    return train, val


def _budget(r: Recipe, loader: DataLoader) -> tuple[int | None, int, int]:
    """(optimizer steps per epoch or None, total steps, epochs) from epochs, max_steps and the data."""
    batches = num_batches(loader)
    if batches is None and r.train.max_steps is None:
        raise ConfigError(
            "train.max_steps", None, "a step budget", "the training data has no length"
        )
    if batches == 0:
        raise DataError("the training data is empty")
    per_epoch = steps_per_epoch(batches, r.train.accumulate) if batches else None
    total = r.train.epochs * per_epoch if per_epoch else r.train.max_steps
    total = min(total, r.train.max_steps or total)
    # a stream that ends is passed over up to train.epochs times, within max_steps
    epochs = math.ceil(total / per_epoch) if per_epoch else r.train.epochs
    return per_epoch, total, epochs


# -- helpers ----------------------------------------------------------------------------------


def require_object(name: str, argument: str) -> None:
    """A recipe that names a Python object (``object:...``) needs that object passed again."""
    if name.startswith(OBJECT):
        raise ConfigError(
            argument,
            None,
            f"the {name.removeprefix(OBJECT)} object this run was started with",
            "pass it again, e.g. Trainer.resume(run_dir, model, train_data, val_data)",
        )


def check_batch_labels(y: torch.Tensor, task: Task, step: int) -> None:
    """Labels of a batch the up-front scan did not read, checked on the host (never a sync)."""
    if y.device.type != "cpu" or y.is_floating_point():
        return
    labels = y[y != IGNORE_INDEX]
    if labels.numel():
        what = "tokens" if task.kind == "lm" else "classes"
        lowest, highest = int(labels.min()), int(labels.max())
        check_label_range(
            lowest, highest, task.num_outputs, what, f"a training batch at step {step} has"
        )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes (a no-op in fp32)."""
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally allow deterministic kernels only."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave Python's, NumPy's and torch's global random generators as they were."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


@contextlib.contextmanager
def _preserved_determinism() -> Iterator[None]:
    """Leave torch's deterministic-algorithms switch as it was (a recipe with train.deterministic
    sets it for the run it assembles; advice alone must not)."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("train.device", name, "auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device", name, "a device this machine has", "CUDA is not available"
        )
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on GPUs that support it, fp16 (with loss scaling) on older GPUs, fp32 elsewhere."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "train.precision",
            precision,
            "fp32 or bf16 on this device",
            "fp16 loss scaling needs CUDA",
        )
    return precision


callable_as_namesake(__name__)  # gradwise.assemble(...) is its function assemble(...)
