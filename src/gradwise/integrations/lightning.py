"""The doctor in a Lightning run: one callback.

    import lightning as L
    from gradwise.integrations.lightning import DoctorCallback

    trainer = L.Trainer(callbacks=[DoctorCallback("runs/lightning")])
    trainer.fit(model, train_loader, val_loader)

The PyTorch ``gradwise.Doctor`` watches the LightningModule with every rule, under Lightning's
gradient accumulation, mixed precision and DDP (every rank watches its replica; rank 0 reports):
one optimizer step is one Doctor step, taken in ``on_before_optimizer_step`` where the gradients are
accumulated, unscaled and not yet clipped. The validation loss (``val_loss``, or ``val_loss_key``)
of each validation epoch feeds the overfitting rules. Findings print as they fire; at the end of
``fit`` the run directory (``run_dir``, else the trainer's ``log_dir``) gets ``doctor/``, which
``gradwise report`` renders. Nothing the callback does can stop the run: a failure is one warning.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from gradwise.integrations._torch import Watch, Watched


class DoctorCallback(Watched, pl.Callback):
    """Diagnose a Lightning ``fit`` live.

    run_dir: where ``doctor/findings.json`` and ``doctor/telemetry.json`` go (default: the
        trainer's ``log_dir``). task / loss_fn: what the loss is, when its autograd graph does
        not say (see ``gradwise.Doctor``). val_loss_key / metric_key: the logged validation loss
        and metric (default: the first of ``val_loss``, ``val/loss``, ... that was logged).
    ignore, sample_every, on_finding: as ``gradwise.Doctor``.
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        *,
        task: str | None = None,
        loss_fn: Any = None,
        ignore: Iterable[str] = (),
        sample_every: int = 20,
        on_finding: Any = "print",
        val_loss_key: str | None = None,
        metric_key: str | None = None,
        label_key: str | None = None,
    ) -> None:
        self.watch = Watch(
            "lightning",
            run_dir=run_dir,
            task=task,
            loss_fn=loss_fn,
            ignore=ignore,
            sample_every=sample_every,
            on_finding=on_finding,
            val_loss_key=val_loss_key,
            metric_key=metric_key,
        )
        self.label_key = label_key

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.watch.run_dir is None:
            self.watch.run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        precision = str(trainer.precision)
        self.watch.start(pl_module, optimizer, loss_scaling=precision.startswith("16"))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.watch.batch(batch, self.label_key)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any
    ) -> None:
        # automatic optimization divides the loss by the accumulation; the Doctor wants its value
        accumulation = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        self.watch.loss(loss if accumulation == 1 else loss.detach() * accumulation)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        clip = trainer.gradient_clip_val
        norm_clipping = clip and trainer.gradient_clip_algorithm in (None, "norm")
        self.watch.optimizer_step(grad_clip=float(clip) if norm_clipping else None)

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and self.watch.doctor is not None:  # GW203: dropout still training?
            with self.watch.guard("checking evaluation mode"):
                self.watch.doctor.check_eval_mode()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.watch.validate(trainer.callback_metrics)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.watch.finish()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.watch.finish(collective=False)  # another rank may be gone: no collectives
