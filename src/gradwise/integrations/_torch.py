"""The PyTorch Doctor driven by another framework's callbacks: what the Lightning and the Hugging
Face Trainer integrations share.

Those trainers run the forward pass, backward and optimizer step themselves and tell callbacks
about some of it. ``Watch`` collects the rest where the trainer does not hand it over: the model's
output (a forward hook on the model and its direct children, the last call whose output has a row
per sample), the batch (split into inputs and targets as gradwise's own Trainer does), the
micro-batches' losses, and what the gradient norm was before the trainer clipped it. Once the gradients are
final, :meth:`Watch.optimizer_step` gives the Doctor one step; one optimizer step is one Doctor step
whatever the accumulation. Every call is guarded: a failure is one warning, and the trainer's run
goes on untouched.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwise.batch import outputs_of, split_batch
from gradwise.doctor.doctor import Doctor
from gradwise.doctor.findings import Finding
from gradwise.errors import GradwiseWarning

VAL_LOSS_KEYS = ("val_loss", "val/loss", "valid_loss", "validation_loss", "eval_loss", "loss")
"""Where the validation loss is found in a trainer's metrics when no key is given, in this order."""


class Watched:
    """What a framework's DoctorCallback shows of its ``watch``: the Doctor and its findings."""

    watch: Watch

    @property
    def doctor(self) -> Doctor | None:
        return self.watch.doctor

    @property
    def findings(self) -> list[Finding]:
        return self.watch.findings


class Watch:
    """One run's Doctor and what it needs from a trainer's callbacks."""

    def __init__(
        self,
        framework: str,
        *,
        run_dir: str | Path | None,
        task: str | None,
        loss_fn: Any,
        ignore: Iterable[str],
        sample_every: int,
        on_finding: Any,
        val_loss_key: str | None,
        metric_key: str | None,
    ) -> None:
        self.framework = framework
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.task, self.loss_fn, self.ignore = task, loss_fn, tuple(ignore)
        self.sample_every, self.on_finding = sample_every, on_finding
        self.val_loss_key, self.metric_key = val_loss_key, metric_key
        self.doctor: Doctor | None = None
        self._hooks: list[Any] = []
        self._losses: list[torch.Tensor] = []  # the window's micro-batch losses
        self._inputs: Any = None
        self._targets: Any = None
        self._outputs: Any = None
        self._rows: int | None = None
        self._model: nn.Module | None = None
        self._params: list[nn.Parameter] = []
        self._wanted = True  # the Doctor judges this step's batch
        self._witness: torch.Tensor | None = None  # the parameter that measures clipping
        self._witness_norm: torch.Tensor | None = None  # its gradient's norm before clipping
        self._warned: set[str] = set()
        self.summed = False  # the micro-batch losses are fractions of the window's: add them up

    # -- life cycle -----------------------------------------------------------------------------

    def start(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        loss_scaling: bool = False,
        measure_pre_clip: bool = False,
    ) -> None:
        """Build the Doctor on ``model`` (the module the trainer trains, DDP-wrapped or not)."""
        with self.guard("starting the doctor"):
            self.close()
            self.doctor = Doctor(
                model,
                optimizer,
                task=self.task,
                loss_fn=self.loss_fn,
                ignore=self.ignore,
                sample_every=self.sample_every,
                on_finding=self.on_finding,
                loss_scaling=loss_scaling,
            )
            self._model = self.doctor.model
            self._catch_outputs(self._model)
            if measure_pre_clip:
                self._measure_pre_clip(self._model)

    def batch(self, batch: Any, label_key: str | None = None) -> None:
        """A micro-batch starts: its inputs and targets (read only at the steps whose batch the
        Doctor judges: the first ones and the sampled ones)."""
        doctor = self.doctor
        if doctor is None:
            return
        doctor.new_pass()
        self._inputs = self._targets = self._outputs = None
        self._wanted = doctor.wants_batch
        if not self._wanted:
            return
        with self.guard("reading the batch"):
            split = split_batch(batch, label_key)
            self._inputs = split.inputs if not split.kwargs else dict(split.kwargs)
            self._targets = split.target
            main = split.inputs
            self._rows = (
                int(main.shape[0]) if isinstance(main, torch.Tensor) and main.ndim else None
            )

    def loss(self, loss: Any) -> None:
        """A micro-batch's loss (as the model computed it, before any division for accumulation)."""
        if self.doctor is not None and isinstance(loss, torch.Tensor):
            self._losses.append(loss)

    def optimizer_step(self, grad_clip: float | None = None) -> list[Finding]:
        """The gradients are final (accumulated, unscaled): one Doctor step."""
        doctor = self.doctor
        if doctor is None:
            return []
        with self.guard("the doctor's step"):
            losses, self._losses = self._losses, []
            loss = self._window_loss(losses)
            if loss is None:
                return []
            norm = self._unclipped_norm()
            outputs = self._outputs
            if outputs is not None and not isinstance(outputs, torch.Tensor):
                outputs, _ = outputs_of(outputs)
            return doctor.step(
                loss,
                inputs=self._inputs,
                outputs=outputs,
                targets=self._targets,
                grad_norm=norm,
                grad_clip=grad_clip,
            )
        return []

    def validate(self, metrics: Mapping[str, Any]) -> list[Finding]:
        """An evaluation ended with these metrics: the validation loss (``val_loss_key``, else the
        first of VAL_LOSS_KEYS present) and the metric (``metric_key``) go to the Doctor."""
        if self.doctor is None:
            return []
        with self.guard("recording the evaluation"):
            key = self.val_loss_key or next((k for k in VAL_LOSS_KEYS if k in metrics), None)
            loss = _number(metrics.get(key)) if key else None
            metric = _number(metrics.get(self.metric_key)) if self.metric_key else None
            if loss is None and metric is None:
                self._warn(
                    "no validation loss",
                    f"the evaluation's metrics {sorted(metrics)} hold no validation loss "
                    f"({', '.join(VAL_LOSS_KEYS)}); pass val_loss_key= to name it",
                )
                return []
            return self.doctor.validate(loss=loss, metric=metric)
        return []

    def finish(self, collective: bool = True) -> None:
        """Training ended: combine the ranks' statistics, write the run directory, unhook."""
        doctor = self.doctor
        if doctor is None:
            return
        with self.guard("finishing the doctor"):
            if collective:
                doctor.sync()  # every rank calls it: the ranks' last statistics are combined
            if self.run_dir is not None:
                doctor.save(self.run_dir / "doctor")
        self.close()

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self.doctor is not None:
            self.doctor.close()

    @property
    def findings(self) -> list[Finding]:
        return self.doctor.findings if self.doctor is not None else []

    # -- collection ------------------------------------------------------------------------------

    def _window_loss(self, losses: list[torch.Tensor]) -> torch.Tensor | None:
        """The step's loss: the mean of its micro-batches' (their sum when each is already divided
        by the whole window's size); with a single micro-batch the loss itself, whose autograd
        graph tells the Doctor the loss's kind."""
        if not losses:
            return None
        if len(losses) == 1:
            return losses[0]
        stacked = torch.stack([v.detach().float().reshape(()) for v in losses])
        return stacked.sum() if self.summed else stacked.mean()

    def _catch_outputs(self, model: nn.Module) -> None:
        """Forward hooks on the model and its direct children: the model's output for the batch is
        the last of their outputs in a training forward pass with a row per sample."""

        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not (self._wanted and torch.is_grad_enabled() and module.training):
                return
            main = out
            if not isinstance(out, torch.Tensor):
                try:
                    main, _ = outputs_of(out)
                except Exception:
                    return
            if main.ndim and (self._rows is None or main.shape[0] == self._rows):
                self._outputs = out

        for module in (model, *model.children()):
            self._hooks.append(module.register_forward_hook(torch.compiler.disable(hook)))

    def _measure_pre_clip(self, model: nn.Module) -> None:
        """Make the global gradient norm before the trainer clips it recoverable (the Hugging Face
        Trainer clips before any callback sees the gradients). Clipping scales every gradient by
        one factor, so one parameter's gradient norm, read as the gradient is accumulated and
        read again after clipping, gives the factor: the norm before clipping is the norm after
        it divided by the factor. One small norm per backward instead of a second full one."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        matrices = [p for p in trainable if p.ndim >= 2] or trainable
        if not matrices:
            return
        self._params = trainable
        self._witness = matrices[-1]  # the output layer's weight: it always gets a gradient

        def arrived(p: torch.Tensor) -> None:
            self._witness_norm = torch.linalg.vector_norm(p.grad.detach().float())

        self._hooks.append(self._witness.register_post_accumulate_grad_hook(arrived))

    def _unclipped_norm(self) -> torch.Tensor | None:
        """The global gradient norm before the trainer's clipping (a device tensor, no sync)."""
        before, self._witness_norm = self._witness_norm, None
        witness = self._witness
        if before is None or witness is None or witness.grad is None:
            return None
        grads = [p.grad.detach() for p in self._params if p.grad is not None]
        after = torch.linalg.vector_norm(
            torch.stack([n.float() for n in torch._foreach_norm(grads)])
        )
        now = torch.linalg.vector_norm(witness.grad.detach().float())
        return torch.where(now > 0, after * before / now.clamp_min(1e-30), after)

    # -- never break the run ---------------------------------------------------------------------

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self._warn(what, f"{what} failed and is skipped ({type(exc).__name__}: {exc})")

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"gradwise doctor ({self.framework}): {message}", GradwiseWarning, stacklevel=4
            )


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.detach() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError):
        return None
    return number
