"""The doctor in a Hugging Face ``Trainer`` run: one callback.

    from transformers import Trainer
    from gradwise.integrations.transformers import DoctorCallback

    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val,
                      callbacks=[DoctorCallback()])
    trainer.train()

The PyTorch ``gradwise.Doctor`` watches the model with every rule. The Trainer hands callbacks
neither the batch nor the loss, so the callback reads both from the model's own forward pass (its
keyword inputs, the ``labels``, and the ``loss`` of its output), and the gradient norm before the
Trainer clips it from the gradients as they are accumulated. One optimizer step is one Doctor step,
under gradient accumulation (micro-batch losses that the model already divides by the window's
token count, ``num_items_in_batch``, are summed, the others averaged). ``eval_loss`` of each
evaluation feeds the overfitting rules. At the end of ``train`` the run directory (``run_dir``, else
``args.output_dir``) gets ``doctor/``, which ``gradwise report`` renders. Nothing the callback does
can stop the run: a failure is one warning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from gradwise.batch import outputs_of
from gradwise.integrations._torch import Watch, Watched


class DoctorCallback(Watched, TrainerCallback):
    """Diagnose a Hugging Face ``Trainer.train`` live.

    run_dir: where ``doctor/findings.json`` and ``doctor/telemetry.json`` go (default:
        ``args.output_dir``). task / loss_fn: what the loss is, when its autograd graph does not
        say (see ``gradwise.Doctor``). val_loss_key / metric_key: keys of the evaluation's metrics
        (default: ``eval_loss``; no metric). ignore, sample_every, on_finding: as ``gradwise.Doctor``.
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
        val_loss_key: str | None = "eval_loss",
        metric_key: str | None = None,
    ) -> None:
        self.watch = Watch(
            "transformers",
            run_dir=run_dir,
            task=task,
            loss_fn=loss_fn,
            ignore=ignore,
            sample_every=sample_every,
            on_finding=on_finding,
            val_loss_key=val_loss_key,
            metric_key=metric_key,
        )
        self._hooks: list[Any] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        if model is None:
            return
        if self.watch.run_dir is None:
            self.watch.run_dir = Path(args.output_dir)
        fp16 = bool(args.fp16)  # gradients are scaled until the Trainer unscales them to clip
        self.watch.start(
            model,
            optimizer,
            loss_scaling=fp16,
            measure_pre_clip=args.max_grad_norm > 0 and not fp16,
        )
        with self.watch.guard("hooking the model"):
            self._hook(self.watch.doctor.model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.watch.optimizer_step(grad_clip=args.max_grad_norm or None)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs) -> None:
        if metrics:
            self.watch.validate(metrics)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self._unhook()
        self.watch.finish()

    def _hook(self, model: Any) -> None:
        """The batch from the model's keyword inputs; the loss from its output."""
        watch = self.watch

        def inputs(module: Any, args: tuple, kwargs: dict) -> None:
            if module.training and not args and isinstance(kwargs, Mapping):
                batch = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
                watch.summed = kwargs.get("num_items_in_batch") is not None
                watch.batch(batch)

        def output(module: Any, args: tuple, kwargs: dict, out: Any) -> None:
            if module.training:
                with watch.guard("reading the model's loss"):
                    _, loss = outputs_of(out)
                    if loss is not None:
                        watch.loss(loss)

        self._hooks = [
            model.register_forward_pre_hook(inputs, with_kwargs=True),
            model.register_forward_hook(output, with_kwargs=True),
        ]

    def _unhook(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
