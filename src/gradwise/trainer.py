"""The Trainer: a plain, readable training loop with an expert's defaults.

    run = gradwise.Trainer(model, train_data, val_data, task="classification").fit()

Everything it decides comes from one :class:`~gradwise.recipe.Recipe`. Each run writes a run directory
(recipe, metrics, environment, checkpoints) and can be resumed exactly, to the last bit, after a kill.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from gradwise import checkpoint as ckpt
from gradwise import distributed
from gradwise.assemble import (
    OBJECT,
    DataLike,
    assemble,
    autocast,
    check_batch_labels,
    require_object,
)
from gradwise.augment import mix_batch, soft_targets
from gradwise.batch import outputs_of, run_model, split_batch
from gradwise.data.loader import epoch_batches, num_batches, stop_workers
from gradwise.errors import ConfigError, DataError, GradwiseError, GradwiseWarning
from gradwise.finetune import settle_batchnorm
from gradwise.optim import build_optimizer, build_scheduler
from gradwise.progress import Progress
from gradwise.recipe import Recipe, load_recipe, override_paths, set_paths
from gradwise.state import TrainState, scale_lr
from gradwise.tracking import (
    Tracker,
    atomic_write_text,
    new_run_dir,
    read_metrics,
    write_environment,
    write_status,
)
from gradwise.tracking.files import Heartbeat, try_write_status
from gradwise.tracking.system import SystemMetrics


@dataclass
class Run:
    """The outcome of :meth:`Trainer.fit`."""

    dir: Path | None  # None after a quick_check
    history: list[dict[str, float]]  # one entry per evaluation: epoch, step, train_loss, val_*, lr
    monitor: str
    best_metric: float | None
    best_checkpoint: Path | None
    state: str  # finished | stopped_early | stopped (by on_evaluate) | interrupted | diverged
    steps: int
    model: nn.Module = field(repr=False)
    recipe: Recipe = field(repr=False)
    advice: list | None = field(default=None, repr=False)  # the advisor's reasons (recipe="auto")


class Trainer:
    """Train ``model`` on ``train_data`` with the settings of ``recipe`` (plus ``overrides``).

    model: an ``nn.Module``, or None to build ``recipe.model`` from the zoo, sized from the data.
    train_data / val_data: a Dataset, a DataLoader, ``(X, y)`` tensors or arrays, or None to load
    ``recipe.data`` (a built-in data set split into train and validation).
    task: binary, multiclass, multilabel, classification (settled by the targets), regression, lm,
    custom (with ``loss_fn``), or None for the recipe's (default: settled by the data).
    recipe: "auto" (default) asks the advisor for every setting you do not give (the advice is saved
    in the run directory as advice.json); a Recipe, dict or YAML path uses exactly that recipe;
    None uses gradwise's plain defaults.
    advise: True asks the advisor for every setting that the recipe (a dict or YAML path) and the
    overrides do not name, as ``gradwise train RECIPE --advise`` does; default: only for "auto".
    The run says which it did.
    overrides: recipe settings by dotted path or unique name, e.g. ``lr=3e-3, epochs=10``; they
    always win over the advice.
    progress: auto (bar on a terminal, else lines), bar, lines or off.
    on_evaluate: called with each evaluation's history entry (epoch, step, train_loss, val_*, lr);
    returning True stops the run there (state "stopped"), e.g. when a tuner prunes the trial.
    tags / mlflow_uri: tags for the run's MLflow run and the MLflow tracking URI (default: the
    runs root's mlflow.db); a tuner makes its trials child runs with ``mlflow.parentRunId``.
    trust: whether import paths in the recipe (model, data, loss) may be imported; a recipe you
    give is yours, so True; :meth:`resume` passes its own (see :mod:`gradwise.trust`).
    optimizer: your own optimizer instead of the recipe's: an Optimizer over the model's
    parameters, or a callable ``model -> Optimizer`` (needed when the model is built from the
    recipe); the schedule, clipping and checkpoints work on it; pass it again to :meth:`resume`.
    param_groups: your parameter groups for the recipe's optimizer (dicts with "params" and
    per-group settings such as "lr"), or a callable ``model -> groups``.
    callbacks: objects with any of ``on_step_end(trainer)``, ``on_validation_end(trainer,
    entry)``, ``on_epoch_end(trainer)`` (see :class:`Callback`); one that raises is switched off
    with a warning, the run goes on.
    metrics: more validation metrics by name: torchmetrics metrics (updated with the outputs and
    targets of each batch) or functions ``(outputs, targets) -> float`` called on the whole
    validation set; recorded as ``val_<name>`` and usable as the monitor.
    forgetting_probe: samples of the task the model was pretrained on ((inputs, targets), a
    mapping batch or a DataLoader): the doctor reports catastrophic forgetting (GW403) when the
    model's loss on them climbs while it fine-tunes.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        train_data: DataLike = None,
        val_data: DataLike = None,
        task: str | None = None,
        recipe: Recipe | dict | str | Path | None = "auto",
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        progress: str = "auto",
        resume_from: str | Path | None = None,
        on_evaluate: Callable[[dict[str, float]], bool | None] | None = None,
        tags: dict[str, str] | None = None,
        mlflow_uri: str | None = None,
        trust: bool = True,
        advise: bool | None = None,
        optimizer: torch.optim.Optimizer
        | Callable[[nn.Module], torch.optim.Optimizer]
        | None = None,
        param_groups: list[dict[str, Any]] | Callable[[nn.Module], list] | None = None,
        callbacks: list[Any] | None = None,
        metrics: dict[str, Any] | None = None,
        forgetting_probe: Any = None,
        **overrides: Any,
    ) -> None:
        if task is not None:
            overrides["task"] = task
        auto = isinstance(recipe, str) and recipe == "auto"
        self._advise = auto if advise is None else advise
        self._explicit = override_paths(overrides)
        if self._advise and isinstance(recipe, (dict, str, Path)) and not auto:
            self._explicit |= set_paths(recipe)  # the recipe's own settings are the user's
        self.recipe = load_recipe(None if auto else recipe).override(overrides)
        self.advice: list | None = None
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError("loss_fn", loss_fn, "a callable (outputs, targets) -> scalar loss")
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError("model", type(model).__name__, "a torch.nn.Module or None")
        self.model = model
        self._train_data, self._val_data, self._loss_fn = train_data, val_data, loss_fn
        self._progress_mode = (
            "lines" if progress == "auto" and not self.recipe.tracking.progress else progress
        )
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.on_evaluate = on_evaluate
        self.tags, self.mlflow_uri = tags, mlflow_uri
        self.trust = trust
        self._optimizer, self._param_groups = optimizer, param_groups
        if (
            optimizer is not None
            and not callable(optimizer)
            and not isinstance(optimizer, torch.optim.Optimizer)
        ):
            raise ConfigError(
                "optimizer",
                type(optimizer).__name__,
                "a torch.optim.Optimizer or model -> Optimizer",
            )
        if optimizer is not None:  # the recipe records that the optimizer came from Python
            name = (
                optimizer.__class__.__name__
                if isinstance(optimizer, torch.optim.Optimizer)
                else getattr(optimizer, "__name__", type(optimizer).__name__)
            )
            self.recipe = self.recipe.override({"optim.name": f"{OBJECT}{name}"})
        elif self.recipe.optim.name.startswith(OBJECT):
            require_object(self.recipe.optim.name, "optimizer")
        self.callbacks = list(callbacks or [])
        self.user_metrics = dict(metrics or {})
        self.forgetting_probe = forgetting_probe
        self.dist = distributed.SINGLE  # fit() joins the ranks torchrun started
        self._stop_signal: str | None = None
        self._val_limit: int | None = None  # validation batches per evaluation (quick_check)

    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        model: nn.Module | None = None,
        train_data: DataLike = None,
        val_data: DataLike = None,
        *,
        trust: bool = False,
        **kwargs: Any,
    ) -> Trainer:
        """Continue the run in ``run_dir`` from its latest checkpoint, with its own recipe.

        Pass the model and data again when the run was started with Python objects. Import paths
        that the run's recipe names (model, data, loss) are imported only with ``trust=True``: a
        run directory may come from anyone (see :mod:`gradwise.trust`). Settings in
        ``kwargs`` override the recipe, e.g. ``epochs=30`` to extend the budget or ``lr=1e-4`` (the
        optimizer settings lr, weight_decay, betas, eps, momentum and nesterov also replace the
        checkpoint's values in the restored optimizer; a new lr rescales the schedule).
        """
        run_dir = Path(run_dir)
        recipe_file = run_dir / "recipe.yaml"
        if not recipe_file.is_file():
            raise ConfigError("run_dir", str(run_dir), "a gradwise run directory with recipe.yaml")
        if not ckpt.list_checkpoints(run_dir):
            raise DataError(f"{run_dir} has no checkpoint to resume from")
        return cls(
            model,
            train_data,
            val_data,
            recipe=recipe_file,
            resume_from=run_dir,
            trust=trust,
            **kwargs,
        )

    # == setup: everything that can fail on bad input happens before a run directory exists ==

    def _setup(self) -> None:
        """Assemble the run (gradwise.assemble), then the optimizer, schedule, scaler and EMA."""
        a = assemble(
            self.model,
            self._train_data,
            self._val_data,
            self.recipe,
            loss_fn=self._loss_fn,
            advise=self._advise,
            explicit=self._explicit,
            trusted=self.trust,
            metrics=tuple(self.user_metrics),
        )
        self.assembly = a
        self.recipe, self.advice = a.recipe, a.advice
        self.model, self.task, self.info = a.model, a.task, a.info
        self.device, self.precision = a.device, a.precision
        self.train_loader, self.val_loader = a.train_loader, a.val_loader
        self.steps_per_epoch, self.total_steps, self.epochs = (
            a.steps_per_epoch,
            a.total_steps,
            a.epochs,
        )
        self.monitor, self.mode = a.monitor, a.mode
        self.check_batch_labels = a.check_batch_labels
        self.model_loss, self.eval_steps = a.model_loss, a.eval_steps
        self.label_key = self.recipe.data.label_key
        r = self.recipe
        self._check_distributed()
        self.engine = distributed.wrap(self.model, self.dist, self.device, self.precision)
        self.optimizer = self._build_optimizer()
        self.scheduler = build_scheduler(self.optimizer, r.schedule, self.total_steps, self.mode)
        self.per_step_schedule = r.schedule.name != "plateau"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ema = None
        if r.train.ema_decay:
            from torch.optim.swa_utils import AveragedModel

            self.ema = AveragedModel(
                self.model, multi_avg_fn=ema_update(r.train.ema_decay), use_buffers=True
            )
        self.metrics = (
            self.task.metrics(self.device, self.user_metrics)
            if self.val_loader is not None
            else None
        )
        self.mixing = r.train.mixup > 0 or r.train.cutmix > 0
        self.guard = FiniteGuard(self.device, r.train.log_every)
        self.system = SystemMetrics(self.device)  # memory, utilisation, samples/s per rank
        self._logged_at = time.perf_counter()
        self.finetune = a.finetune
        self.unfreezer = a.finetune.unfreezer if a.finetune is not None else None
        self.params = self._clipped()

    def _check_distributed(self) -> None:
        """What does not combine with several ranks fails here, before anything is written."""
        d, r = self.dist, self.recipe
        if not d.active:
            return
        if self._train_data is not None and isinstance(self._train_data, DataLoader):
            raise ConfigError(
                "train_data", "a DataLoader", "a Dataset or arrays under torchrun",
                "gradwise shards a Dataset by rank; a DataLoader of yours would give every rank "
                "all the data",
            )  # fmt: skip
        if r.doctor.mode == "repair":
            raise ConfigError(
                "doctor.mode", "repair", "watch or off with several ranks",
                "a repair rolls one process back; the ranks must move together",
            )  # fmt: skip
        if d.strategy == "fsdp" and (r.train.ema_decay or r.finetune.peft):
            field = "train.ema_decay" if r.train.ema_decay else "finetune.peft"
            raise ConfigError(field, getattr(r.train, "ema_decay", None) or r.finetune.peft,
                              "not set with distributed.strategy: fsdp", "use ddp")  # fmt: skip

    def _clipped(self) -> list[nn.Parameter]:
        """The parameters whose gradients are clipped: every trainable one (with gradual
        unfreezing, every one in the optimizer: a frozen one simply has no gradient yet)."""
        if self.unfreezer is not None:
            return [p for g in self.optimizer.param_groups for p in g["params"]]
        return [p for p in self.model.parameters() if p.requires_grad]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        return autocast(self.device, self.precision)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """Yours (an instance, or built by your callable from the model), else the recipe's over
        gradwise's parameter groups or yours."""
        given = self._optimizer
        if isinstance(given, torch.optim.Optimizer):
            owned = {id(p) for p in self.model.parameters()}
            if not all(id(p) in owned for g in given.param_groups for p in g["params"]):
                raise ConfigError(
                    "optimizer", type(given).__name__, "an optimizer over this model's parameters",
                    "build it after the model, or pass a callable model -> optimizer",
                )  # fmt: skip
            return given
        if given is not None:
            optimizer = given(self.model)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise ConfigError(
                    "optimizer", getattr(given, "__name__", given),
                    "a callable model -> torch.optim.Optimizer",
                    f"it returned {type(optimizer).__name__}",
                )  # fmt: skip
            return optimizer
        groups = (
            self._param_groups(self.model) if callable(self._param_groups) else self._param_groups
        )
        if groups is None and self.assembly.finetune is not None:
            groups = self.assembly.finetune.optimizer_groups(self.recipe.optim)
        return build_optimizer(self.model, self.recipe.optim, groups, trusted=self.trust)

    # == the loop ================================================================================

    def quick_check(self, batches: int = 2) -> Run:
        """Run every part of a real run on ``batches`` training steps and as many validation
        batches, writing nothing that stays and leaving the model's weights as they were: a bug in
        the data, the model, the loss, the metrics or a callback shows in seconds, before the real
        run (Lightning's ``fast_dev_run``). Returns the Run; its ``dir`` is None."""
        if not isinstance(batches, int) or batches < 1:
            raise ConfigError("batches", batches, "a positive number of batches")
        model, recipe = self.model, self.recipe
        before = copy.deepcopy(model.state_dict()) if model is not None else None
        self._val_limit = batches
        with tempfile.TemporaryDirectory(prefix="gradwise-check-") as tmp:
            self.recipe = self.recipe.override(
                {
                    "tracking.root": tmp, "tracking.mlflow": False, "tracking.tensorboard": False,
                    "tracking.wandb": False, "train.max_steps": batches, "train.eval_steps": None,
                }
            )  # fmt: skip
            try:
                run = self.fit()
            finally:  # the Trainer can still fit() for real
                if before is not None:
                    model.load_state_dict(before)
                self.model, self.recipe, self._val_limit = model, recipe, None
        run.dir, run.best_checkpoint = None, None
        return run

    def fit(self) -> Run:
        """Train, validate, checkpoint and track; returns the :class:`Run`."""
        self.dist = distributed.start(self.recipe.distributed, self.recipe.train.device)
        scratch = None if self.dist.main else tempfile.TemporaryDirectory(prefix="gradwise-rank-")
        try:
            return self._fit(scratch)
        finally:
            if scratch is not None:
                scratch.cleanup()
            distributed.stop(self.dist)

    def _fit(self, scratch: tempfile.TemporaryDirectory | None) -> Run:
        self._setup()
        r = self.recipe
        self.state = TrainState(
            self.model, self.optimizer, self.scheduler, self.scaler, self.ema, r.train.grad_clip
        )
        self.state.sharded = self.dist.strategy == "fsdp"
        self.run_dir = None
        if self.resume_from is not None:
            self.run_dir = self.resume_from
        elif self.dist.main:
            self.run_dir = new_run_dir(r.tracking.root, r.name or self._default_name())
            atomic_write_text(self.run_dir / "recipe.yaml", r.to_yaml())
            write_environment(  # lineage: versions, git state, data fingerprints
                self.run_dir, r.seed, self.assembly.train_dataset, self.assembly.val_dataset
            )
            if self.advice is not None:
                advice = [a.to_dict() for a in self.advice]
                atomic_write_text(self.run_dir / "advice.json", json.dumps(advice, indent=2))
        self.run_dir = distributed.broadcast(self.run_dir, self.dist)
        # rank 0 writes the run directory; the other ranks write their logs to a scratch one
        self.dir = self.run_dir if scratch is None else Path(scratch.name)
        if self.resume_from is not None:
            self._restore()
        pos = self.state.position
        write_status(self.dir, "running", monitor=self.monitor, step=pos.step, epoch=pos.epoch)
        main = self.dist.main
        self.tracker = Tracker(
            self.dir,
            params=r.flat(),
            tensorboard=r.tracking.tensorboard if main else False,
            mlflow=r.tracking.mlflow if main else False,
            wandb=r.tracking.wandb if main else False,
            experiment="gradwise",
            mlflow_uri=self.mlflow_uri,
            tags=self.tags,
        )
        mode = self._progress_mode if main else "off"
        self.progress = Progress(self.total_steps, mode=mode, start_step=pos.step)
        if self.resume_from is not None:
            self.progress.line(f"resuming {self.dir} at step {pos.step}")
        else:
            self.progress.line(self._settings_note())
            for line in self.finetune.lines() if self.finetune is not None else ():
                self.progress.line(f"fine-tuning: {line}")
            if self.assembly.checkpointed:
                n = len(self.assembly.checkpointed)
                self.progress.line(f"activation checkpointing: {n} blocks recompute in backward")
            if self.dist.active:
                self.progress.line(
                    f"distributed: {self.dist.strategy} over {self.dist.world} ranks"
                )
        self._start_doctor()
        state = "failed"
        previous_handlers = self._install_signal_handlers()
        heartbeat = Heartbeat(self.dir)  # gradwise runs tells a dead run by it (or its pid)
        try:
            state = self._loop()
            if self.doctor is not None and self.dist.active:
                self.doctor.sync()  # every rank: the last steps' statistics, combined
            result = self._result(state)
            distributed.barrier(self.dist)  # every rank done before the group is torn down
            return result
        # best effort: on a full disk status.json stays "running", and the pid shows it dead
        except GradwiseError as exc:
            try_write_status(self.dir, "failed", message=str(exc))
            raise
        except BaseException as exc:
            try_write_status(self.dir, "failed", message=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            heartbeat.stop()
            for loader in (self.train_loader, self.val_loader):
                stop_workers(loader)  # persistent workers: now, not at a later garbage collection
            # while an error propagates, a cleanup error (a full disk) must not replace it
            quiet = contextlib.suppress(OSError) if sys.exc_info()[1] else contextlib.nullcontext()
            self._restore_signal_handlers(previous_handlers)
            with quiet:
                self._stop_doctor()
            self.progress.close()
            with quiet:
                self.tracker.close(
                    {"failed": "failed", "interrupted": "interrupted", "diverged": "failed"}.get(
                        state, "finished"
                    )
                )

    def _loop(self) -> str:
        r, s = self.recipe, self.state
        pos = s.position
        self.started = time.perf_counter()
        batches = None  # the epoch's iterator, kept across validations within the epoch
        while pos.epoch < self.epochs and pos.step < self.total_steps:
            if batches is None:
                self.progress.update(epoch=f"{pos.epoch + 1}/{self.epochs}")
                batches = self._epoch_iterator()
            stopped = self._train(batches)
            if stopped == "signal":
                self._save()
                return self._interrupted()
            per_epoch = num_batches(self.train_loader)
            end_of_epoch = stopped == "end" or (per_epoch is not None and pos.batch >= per_epoch)
            last = pos.step >= self.total_steps
            evaluate = (
                last
                or stopped == "eval"
                or (end_of_epoch and (pos.epoch + 1) % r.train.eval_every == 0)
            )
            if stopped == "diverged" or (evaluate and not _finite_weights(self.model)):
                return self._diverged()
            if end_of_epoch:
                pos.epoch, pos.batch, batches = pos.epoch + 1, 0, None
            improved = self._evaluate_and_record() if evaluate else False
            self._save(best=improved)
            if self._stop_signal:
                return self._interrupted()
            stop = evaluate and self._call("on_validation_end", s.history[-1])
            if end_of_epoch:
                stop = self._call("on_epoch_end") or stop
            if stop or (
                evaluate and self.on_evaluate is not None and self.on_evaluate(s.history[-1])
            ):
                return "stopped"
            patience = r.early_stopping.patience
            if evaluate and patience is not None and s.bad_evals >= patience:
                self.progress.line(
                    f"early stopping: {self.monitor} did not improve for {patience} evaluations"
                )
                return "stopped_early"
        return "finished"

    def _train(self, batches: Iterator) -> str:
        """Train on ``batches`` (the epoch's iterator) from the state's position.

        Returns "end" (the data ran out), "budget" (the step budget is spent), "eval" (a
        validation is due, ``train.eval_steps``), "signal" or "diverged" (the loss or gradients
        are no longer finite and cannot be repaired).
        """
        r, pos = self.recipe, self.state.position
        k = r.train.accumulate
        self._train_mode()
        while pos.step < self.total_steps:
            if self.unfreezer is not None:
                self._unfreeze()
            window = [split_batch(raw, self.label_key) for raw in itertools.islice(batches, k)]
            counts = [self.task.count(b.target) for b in window]
            total = sum(counts)
            if self.dist.active:  # the ranks agree: end of data, a stop signal, the window's size
                ended, stop, total = self._agree(not window, total)
                if stop and not self._stop_signal:
                    self._stop_signal = "a signal on another rank"
                window = [] if ended else window
            if not window:  # before validating, read the guard on accelerators too
                unseen = self.guard.poll(pos.step, force=True) is not None
                return "diverged" if unseen and self._respond([], pos.step, force=True) else "end"
            fired = self._step(window, counts, total)
            pos.step += 1
            pos.batch += len(window)
            self.progress.advance(pos.step)
            save = bool(r.checkpoint.every_steps) and pos.step % r.checkpoint.every_steps == 0
            # nothing non-finite is logged as recovered, saved or validated: check before those
            force = save or bool(self._stop_signal) or pos.step >= self.total_steps
            if self._respond(fired, pos.step, force=force) == "stop":
                return "diverged"
            if pos.step % r.train.log_every == 0:
                self._log_train()
            if save:
                self._save()
            if self._stop_signal:
                return "signal"
            if self.callbacks and self._call("on_step_end"):
                return "budget"  # a callback asked to stop: validate and end here
            if self.eval_steps and pos.step % self.eval_steps == 0:
                return "eval"
        return "budget"

    def _agree(self, ended: bool, total: float) -> tuple[bool, bool, float]:
        """One small all-reduce per step: whether any rank's data ran out or any rank was asked
        to stop, and the samples (tokens) of the global window."""
        flags = torch.tensor([float(ended), float(bool(self._stop_signal)), float(total)])
        flags = distributed.all_sum(flags, self.dist)
        return bool(flags[0]), bool(flags[1]), float(flags[2])

    def _step(self, window: list, counts: list, total: float) -> list:
        """One optimizer step over the micro-batches of ``window`` (gradient accumulation).

        Each micro-batch's mean loss is weighted by its share of the window's samples (tokens for
        lm), so the step equals one step on the concatenated batch, whatever the micro-batch sizes.
        Over W ranks the share is of the global window and times W (the all-reduce averages), so
        the step equals one process's on the global batch; no all-reduce before the last
        micro-batch.
        """
        s, d = self.state, self.dist
        window_loss = 0.0
        scale = d.world if d.active else 1
        for i, (batch, n) in enumerate(zip(window, counts, strict=True)):
            if self.check_batch_labels:
                check_batch_labels(batch.target, self.task, s.position.step + 1)
            batch = batch.to(self.device)
            x, y = batch.inputs, batch.target
            if self.mixing:
                y = soft_targets(y, self.task.kind, self.task.num_outputs)
                x, y = mix_batch(
                    x, y, mixup=self.recipe.train.mixup, cutmix=self.recipe.train.cutmix
                )
                batch = batch.with_inputs(x)
            with distributed.sync_off(self.engine, d, last=i == len(window) - 1):
                with self.autocast():
                    out, own = outputs_of(
                        run_model(self.engine, batch, with_labels=self.model_loss)
                    )
                    loss = own if self.model_loss else self.task.loss(out, y)
                scaled = loss if len(window) == 1 and scale == 1 else loss * (n * scale / total)
                self.scaler.scale(scaled).backward()
            s.loss_sum += loss.detach() * n
            s.loss_count += n
            window_loss = window_loss + scaled.detach()
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16 loss scaling
        norm = _total_norm(self.params) if s.grad_clip is not None else None
        full = distributed.full_norm(norm)  # FSDP2: a DTensor over the shards
        fired = []
        if self.doctor is not None:  # sees the gradients before clipping
            targets = None if self.mixing else y  # mixed targets are probabilities, not labels
            fired = self.doctor.step(
                window_loss,
                inputs=x,
                outputs=out.detach(),
                targets=targets,
                grad_norm=full,
                grad_clip=s.grad_clip,
            )
        # fp16 loss scaling overflows the gradients now and then by design (the step is skipped)
        self.guard.record(
            s.position.step + 1, window_loss, None if self.scaler.is_enabled() else full
        )
        if s.grad_clip is not None:
            _clip(self.params, s.grad_clip, norm)
            self.grad_norm = full
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.per_step_schedule:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return fired

    def _train_mode(self) -> None:
        """Training mode, with the BatchNorm layers of frozen parts kept in eval mode
        (``finetune.freeze_bn``): their statistics stay those of pre-training."""
        self.model.train()
        if self.finetune is not None and self.finetune.spec.freeze_bn:
            settle_batchnorm(self.model)

    def _unfreeze(self, resumed: bool = False) -> None:
        """Gradual unfreezing: the layer groups due at this position start training now.
        Crossing into fastai's second phase halves every rate, once (a resumed optimizer
        already carries it)."""
        pos, before = self.state.position, self.unfreezer.stage
        if self.unfreezer.target(pos.epoch, pos.step) == before and not resumed:
            return
        opened = self.unfreezer.apply(pos.epoch, pos.step)
        if resumed or not opened:
            self._train_mode()
            return
        if self.unfreezer.second_phase(before):
            scale_lr(self.optimizer, self.scheduler, 0.5)
        if self.dist.strategy == "ddp" and self.dist.active:  # DDP syncs what trained when built
            self.engine = distributed.wrap(self.model, self.dist, self.device, self.precision)
        self._train_mode()  # the unfrozen BatchNorm layers learn their statistics again
        n = len(self.unfreezer.groups)
        self.progress.line(
            f"step {pos.step}: unfroze layer group(s) {', '.join(opened)} "
            f"({self.unfreezer.stage}/{n} groups train)"
        )

    def _epoch_iterator(self) -> Iterator:
        """Batches of the state's epoch after the micro-batches already consumed."""
        s = self.state
        pos = s.position
        if s.epoch_rng is None or pos.batch == 0:
            s.epoch_rng = ckpt.rng_state()
            return epoch_batches(self.train_loader, pos.epoch, pos.batch)
        # resuming mid-epoch: a foreign DataLoader draws its shuffle order from the global RNG when
        # its iterator is created, so recreate it from the epoch-start state, then come back
        current = ckpt.rng_state()
        ckpt.set_rng_state(s.epoch_rng)
        iterator = epoch_batches(self.train_loader, pos.epoch, pos.batch)
        ckpt.set_rng_state(current)
        return iterator

    def _call(self, hook: str, *args: Any) -> bool:
        """Run ``hook`` on every callback that has it; True when one asks to stop. A callback that
        raises is switched off with a warning: it never ends the run."""
        stop = False
        for callback in list(self.callbacks):
            method = getattr(callback, hook, None)
            if method is None:
                continue
            try:
                stop = bool(method(self, *args)) or stop
            except Exception as exc:
                self.callbacks.remove(callback)
                warnings.warn(
                    f"callback {type(callback).__name__}.{hook} raised {type(exc).__name__}: "
                    f"{exc}; it is switched off for the rest of the run",
                    GradwiseWarning,
                    stacklevel=2,
                )
        return stop

    # == evaluation, logging, checkpoints =======================================================

    @torch.inference_mode()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and metrics (with the EMA weights when EMA is on)."""
        if self.val_loader is None:
            return {}
        model = self.ema.module if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        self.metrics.reset()
        for i, raw in enumerate(self.val_loader):
            if self._val_limit is not None and i >= self._val_limit:
                break
            batch = split_batch(raw, self.label_key).to(self.device)
            with self.autocast():
                out, own = outputs_of(run_model(model, batch, with_labels=self.model_loss))
            self.metrics.update(out, batch.target, own if self.model_loss else None)
        model.train(was_training)
        return self.metrics.compute()

    def _evaluate_and_record(self) -> bool:
        """Validate, record the epoch's history entry and say whether the monitor improved."""
        s = self.state
        pos = s.position
        results = self.evaluate()
        total, count = distributed.all_sum(torch.stack([s.loss_sum, s.loss_count]), self.dist)
        train_loss = (total / count.clamp(min=1)).item()
        # the log interval's marks move with the epoch's sums, so the next logged loss stays right
        s.log_sum -= s.loss_sum
        s.log_count -= s.loss_count
        s.loss_sum.zero_()
        s.loss_count.zero_()
        entry = {
            "epoch": pos.epoch,
            "step": pos.step,
            "train_loss": train_loss,
            "lr": self._lr(),
            **results,
            "time_s": time.perf_counter() - self.started,
        }
        s.history.append(entry)
        self.tracker.log(
            pos.step,
            {k: v for k, v in entry.items() if k.startswith("val_")},
            split="val",
            epoch=pos.epoch,
        )
        value = entry[self.monitor]
        if self.doctor is not None:
            self.doctor.validate(loss=results.get("val_loss"), metric=value)
        if not self.per_step_schedule:
            self.scheduler.step(value)
        finite = all(math.isfinite(entry[k]) for k in ("train_loss", "val_loss") if k in entry)
        improved = finite and improves(
            value, s.best, self.mode, self.recipe.early_stopping.min_delta
        )
        if improved:
            s.best, s.best_step, s.bad_evals = value, pos.step, 0
        else:
            s.bad_evals += 1
        self.progress.update(**{self.monitor: value})
        self.progress.epoch_done()
        write_status(self.dir, "running", step=pos.step, epoch=pos.epoch, best_metric=s.best)
        return improved

    def _log_train(self) -> None:
        s = self.state
        total, count = distributed.all_sum(
            torch.stack([s.loss_sum - s.log_sum, s.loss_count - s.log_count]), self.dist
        )
        loss = (total / count.clamp(min=1)).item()
        local = int(s.loss_count - s.log_count)
        s.log_sum.copy_(s.loss_sum)
        s.log_count.copy_(s.loss_count)
        metrics = {"loss": loss, "lr": self._lr()}
        if s.grad_clip is not None:
            metrics["grad_norm"] = float(self.grad_norm)
        now = time.perf_counter()
        metrics |= self.system.sample(local, now - self._logged_at)  # this rank's samples/s
        self._logged_at = now
        self.tracker.log(s.position.step, metrics, split="train", epoch=s.position.epoch)
        self.progress.update(loss=loss, lr=metrics["lr"])

    def _lr(self) -> float:
        """The learning rate logged: the highest group's (with discriminative rates, the top's)."""
        return max(float(g["lr"]) for g in self.optimizer.param_groups)

    def _save(self, best: bool = False) -> Path | None:
        s = self.state
        pos = s.position
        totals = distributed.all_sum(torch.stack(s.totals).cpu(), self.dist)  # every rank's loss
        shards = self._save_shards(pos.step) if s.sharded else None
        if not self.dist.main:
            return None  # rank 0 writes the checkpoint: the ranks hold the same weights
        meta = {"epoch": pos.epoch, "batch": pos.batch, **(s.history[-1] if s.history else {})}
        self.tracker.sync()  # the metrics up to this step survive a kill after the checkpoint
        state = {**s.state_dict(), "loss_sums": totals}
        path = ckpt.save_checkpoint(
            self.dir, pos.step, model=None if s.sharded else self.model, state=state,
            ema=self.ema, meta=meta, sharded=shards,
        )  # fmt: skip
        if best:
            ckpt.mark_best(self.dir, path, self.monitor, s.best)
        ckpt.prune(self.dir, self.recipe.checkpoint.keep_last)
        return path

    def _save_shards(self, step: int) -> Path:
        """FSDP2: every rank writes its shard of weights and optimizer state into a staging
        directory that rank 0's checkpoint then takes in whole."""
        staging = self.run_dir / ckpt.CHECKPOINTS / f".shards-{step:08d}"
        if self.dist.main:
            shutil.rmtree(staging, ignore_errors=True)
        distributed.barrier(self.dist)
        distributed.save_sharded(staging, self.model, self.optimizer)
        distributed.barrier(self.dist)
        return staging

    def _restore(self) -> None:
        """Load the latest checkpoint of the run directory into the training state (rank 0 first:
        it sets damaged checkpoints aside; then the other ranks read the one it chose)."""
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if not self.dist.main:
            distributed.barrier(self.dist)
        state = ckpt.load_checkpoint(  # the newest good one: damaged newer ones are set aside
            self.run_dir, None if self.state.sharded else self.model, ema=self.ema,
            which="latest", map_location=self.device, set_aside=self.dist.main,
        )  # fmt: skip
        if self.dist.main:
            distributed.barrier(self.dist)
        if self.state.sharded:  # weights and optimizer from the shards, on any number of ranks
            distributed.load_sharded(Path(state["path"]) / ckpt.DCP, self.model, self.optimizer)
        self.state.load_state_dict(state)
        if not self.dist.main:  # the checkpoint's loss totals are all ranks': rank 0 holds them
            for total in self.state.totals:
                total.zero_()
        self._apply_optim_overrides(fresh)
        if self.unfreezer is not None:
            self._unfreeze(resumed=True)
        if self.dist.main:
            _truncate_metrics(self.dir, self.state.position.step)

    def _apply_optim_overrides(self, fresh: list[dict[str, Any]]) -> None:
        """Optimizer settings given explicitly when resuming win over the checkpoint's.

        A checkpoint restores the optimizer's hyperparameters along with its state, so without this
        ``Trainer.resume(run_dir, lr=1e-4)`` would silently keep the old rate. ``fresh`` holds the
        param groups built from the recipe. A new ``lr`` is a new peak: the schedule keeps its
        position and scales (the current rate becomes new peak x the schedule's multiplier); a
        plateau schedule restarts at the new rate. Population-based training relies on this.
        """
        groups = self.optimizer.param_groups
        for group, new in zip(groups, fresh, strict=True):
            for path, key in _RESUMABLE_OPTIM_SETTINGS.items():
                if path in self._explicit and key in new:
                    group[key] = new[key]
        if "optim.lr" in self._explicit:
            peak = "initial_lr" if all("initial_lr" in g for g in groups) else "lr"
            factors = [new[peak] / group[peak] for group, new in zip(groups, fresh, strict=True)]
            scale_lr(self.optimizer, self.scheduler, factors)

    def _diverged(self) -> str:
        """Stop a run whose loss or weights are no longer finite; nothing after the fault is kept."""
        first = self.guard.first
        where = f"at step {first}" if first is not None else f"by step {self.state.position.step}"
        self.divergence = (
            f"diverged: the loss, gradients or weights became non-finite {where} (GW301)"
        )
        best = ckpt.best_checkpoint(self.dir)
        kept = f"the best checkpoint ({best.name}) is kept" if best else "no checkpoint is best"
        hint = "" if self.repairer else "; doctor.mode: repair can roll back and fix this"
        self.progress.line(f"stopped, {self.divergence}; {kept}{hint}")
        return "diverged"

    def _settings_note(self) -> str:
        """One line saying where the run's settings came from: the advisor or the recipe."""
        if self.advice is None:
            return (
                "settings: the recipe's, with gradwise's defaults for the rest (the advisor was not "
                "asked: gradwise train --advise, or Trainer(recipe='auto'))"
            )
        chosen = {a.setting: a.value for a in self.advice if a.setting not in self._explicit}
        shown = ", ".join(f"{name} {chosen[k]}" for k, name in _KEY_SETTINGS.items() if k in chosen)
        return (
            f"settings: {len(chosen)} advised for this model and data"
            + (f" ({shown}, ...)" if shown else "")
            + f", the rest yours; the reasons are in {self.dir / 'advice.json'}"
        )

    def _interrupted(self) -> str:
        pos = self.state.position
        write_status(
            self.dir,
            "interrupted",
            step=pos.step,
            epoch=pos.epoch,
            best_metric=self.state.best,
            message=f"stopped by {self._stop_signal}",
        )
        self.progress.line(
            f"interrupted at step {pos.step}; resume with: gradwise resume {self.dir}"
        )
        return "interrupted"

    def _result(self, state: str) -> Run:
        s = self.state
        pos = s.position
        best = ckpt.best_checkpoint(self.run_dir)
        if state != "interrupted":
            write_status(
                self.dir,
                "failed" if state == "diverged" else "finished",
                step=pos.step,
                epoch=pos.epoch,
                best_metric=s.best,
                monitor=self.monitor,
                message=self.divergence if state == "diverged" else state,
            )
        return Run(
            dir=self.run_dir,
            history=s.history,
            monitor=self.monitor,
            best_metric=s.best,
            best_checkpoint=best,
            state=state,
            steps=pos.step,
            model=self.model,
            recipe=self.recipe,
            advice=self.advice,
        )

    def _default_name(self) -> str:
        def short(name: str) -> str:
            return name.rpartition(":")[2].rpartition(".")[2].lower()

        return f"{short(self.recipe.model.name)}-{short(self.recipe.data.name)}"

    # == the doctor ============================================================================

    def _start_doctor(self) -> None:
        """Attach the Doctor (and in repair mode the Repairer); its files go to <run>/doctor/."""
        spec = self.recipe.doctor
        self.doctor = self.repairer = None
        self.doctor_dir = self.dir / "doctor"
        if spec.mode == "off":
            return
        from gradwise.doctor import Doctor
        from gradwise.doctor.findings import check_codes
        from gradwise.doctor.repair import Repairer

        ft = self.finetune
        ignore = check_codes(spec.ignore, "doctor.ignore")
        if ft is not None and not ft.spec.freeze_bn:
            ignore = [*ignore, "GW209"]  # frozen BatchNorm statistics move: as the recipe asks

        self.doctor = Doctor(
            self.model,
            self.optimizer,
            task=self.task.kind,
            loss_fn=self.task,
            ignore=ignore,
            sample_every=spec.sample_every,
            on_finding=self._on_finding,
            loss_scaling=self.precision == "fp16",
            frozen_on_purpose=ft.frozen_on_purpose() if ft is not None else None,
            probe=self.forgetting_probe,
        )
        if spec.mode == "repair":
            self.repairer = Repairer(
                self.state, self.doctor, spec.max_repairs, spec.sample_every, self._on_repair
            )

    def _on_finding(self, finding) -> None:
        self.progress.line(f"doctor: {finding}")
        self._write_doctor_files(telemetry=False)

    def _on_repair(self, record: dict) -> None:
        """After each repair (a rollback to finite weights): say so, and watch afresh."""
        self.guard.reset()
        self.progress.line(
            f"doctor repair at step {record['step']} ({record['code']}): {record['action']}"
        )
        self._write_doctor_files(telemetry=False)

    def _respond(self, fired: list, step: int, *, force: bool = False) -> str | None:
        """React to a step's findings and to a non-finite loss: repair, stop, or carry on.

        ``force`` reads the non-finite guard on the host now (on accelerators it is otherwise read
        every ``log_every`` steps, so that watching costs no synchronisation per step).
        """
        nonfinite = self.guard.poll(step, force=force) is not None
        if nonfinite and self.doctor is not None and all(f.code != "GW301" for f in fired):
            fired = [*fired, *self.doctor.check_finite()]  # GW301 names the step it appeared
        caught = any(f.code == "GW301" for f in fired)
        if self.repairer is None or (nonfinite and not caught):  # no repairs, or GW301 ignored
            return "stop" if nonfinite or caught else None
        if self.repairer.after_step(step, fired) == "stop":
            return "stop"
        return None if self.guard.first is None else "stop"  # a repair rolls back and clears it

    def _write_doctor_files(self, telemetry: bool = True) -> None:
        if self.doctor is None:
            return
        self.doctor_dir.mkdir(exist_ok=True)
        findings = [f.to_dict() for f in self.doctor.findings]
        atomic_write_text(self.doctor_dir / "findings.json", json.dumps(findings, indent=2))
        if self.repairer is not None:
            atomic_write_text(
                self.doctor_dir / "repairs.json", json.dumps(self.repairer.repairs, indent=2)
            )
        if telemetry:
            atomic_write_text(
                self.doctor_dir / "telemetry.json", json.dumps(self.doctor.telemetry())
            )

    def _stop_doctor(self) -> None:
        if self.doctor is not None:
            self._write_doctor_files()
            self.doctor.close()

    # == signals: Ctrl-C and SIGTERM stop at the next step boundary with a checkpoint ============

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum: int, frame: Any) -> None:
            self._stop_signal = signal.Signals(signum).name
            signal.signal(signum, previous[signum])  # a second Ctrl-C stops at once

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# == helpers ======

# the advised settings a run names when it starts (all of them are in advice.json)
_KEY_SETTINGS = {
    "optim.name": "optimizer",
    "optim.lr": "lr",
    "data.batch_size": "batch_size",
    "train.epochs": "epochs",
    "optim.weight_decay": "weight_decay",
}

# recipe settings that, given explicitly to Trainer.resume, replace the restored param groups' values
# (optim.lr is handled apart: it also rescales the schedule)
_RESUMABLE_OPTIM_SETTINGS = {
    "optim.weight_decay": "weight_decay",  # the no-decay group keeps its 0 from the fresh groups
    "optim.betas": "betas",
    "optim.eps": "eps",
    "optim.momentum": "momentum",
    "optim.nesterov": "nesterov",
}


class FiniteGuard:
    """Finds the first optimizer step whose loss (or gradient norm) is NaN or infinite.

    On the CPU each step is judged on the host at once, which costs nothing. On an accelerator the
    judgement stays on the device (a host read would synchronise every step) and is read every
    ``every`` steps and whenever :meth:`poll` is forced: before a checkpoint, a validation or a
    logged loss, so that nothing non-finite is saved, validated or reported as recovered.
    """

    def __init__(self, device: torch.device, every: int) -> None:
        self.on_host = device.type == "cpu"
        self.every = 1 if self.on_host else every
        self.first: int | None = None
        self._first_on_device = None if self.on_host else torch.full((), -1, device=device)

    def record(self, step: int, *values: torch.Tensor | None) -> None:
        values = tuple(v for v in values if v is not None)
        if self.on_host:
            if self.first is None and not all(bool(torch.isfinite(v).all()) for v in values):
                self.first = step
            return
        finite = torch.stack([torch.isfinite(v).all() for v in values]).all()
        seen = self._first_on_device >= 0
        self._first_on_device = torch.where(finite | seen, self._first_on_device, step)

    def poll(self, step: int, force: bool = False) -> int | None:
        """The first non-finite step so far, or None; read from the device when due or forced."""
        if self.first is None and not self.on_host and (force or step % self.every == 0):
            first = int(self._first_on_device)
            self.first = first if first >= 0 else None
        return self.first

    def reset(self) -> None:
        """Forget what was seen (after a rollback to a finite state)."""
        self.first = None
        if self._first_on_device is not None:
            self._first_on_device.fill_(-1)


def _finite_weights(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite (one fused pass, one sync)."""
    tensors = [
        t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()
    ]
    if not tensors:
        return True
    return bool(torch.stack([n.float() for n in torch._foreach_norm(tensors)]).isfinite().all())


def _total_norm(params: list[nn.Parameter]) -> torch.Tensor | None:
    """The global gradient norm, computed once and shared by clipping and the doctor (torch >= 2.6)."""
    if not hasattr(nn.utils, "get_total_norm"):
        return None
    return nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _clip(params: list[nn.Parameter], max_norm: float, norm: torch.Tensor | None) -> torch.Tensor:
    if norm is None:
        return nn.utils.clip_grad_norm_(params, max_norm)
    nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


EMA_WARMUP = 10
"""EMA warm-up: after n updates the decay is min(decay, (1 + n) / (EMA_WARMUP + n)), as in
TensorFlow's ExponentialMovingAverage(num_updates=...), so a short run is not validated on weights
that are still mostly the initial ones (0.999 needs ~1,000 updates to forget them)."""


def ema_update(decay: float) -> Callable[[list, list, torch.Tensor], None]:
    """``multi_avg_fn`` for ``AveragedModel``: an exponential moving average with a warm-up."""

    @torch.no_grad()
    def update(averages: list, current: list, num_averaged: torch.Tensor) -> None:
        # AveragedModel reads n_averaged on the host at every update anyway; a float weight keeps
        # the fused _foreach_lerp_ (a tensor weight falls back to one lerp_ per parameter)
        n = int(num_averaged)
        weight = 1 - min(decay, (1 + n) / (EMA_WARMUP + n))
        floats = [(a, c) for a, c in zip(averages, current, strict=True) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
        for a, c in zip(averages, current, strict=True):
            if not a.is_floating_point():  # counters such as BatchNorm's num_batches_tracked
                a.copy_(c)

    return update


def improves(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether a monitored value beats the best so far by more than ``min_delta`` (``mode`` min or
    max): it becomes the best checkpoint, else the evaluation counts towards early stopping's
    patience."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint a run resumes from (they will be logged again)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [json.dumps(m) for m in read_metrics(run_dir) if m.get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
