"""The Doctor: live diagnosis of a training run, in the Trainer or in any plain PyTorch loop.

    doctor = gradwise.Doctor(model, optimizer, loss_fn=loss_fn)
    for x, y in loader:
        optimizer.zero_grad()
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        doctor.step(loss, inputs=x, outputs=out, targets=y)
        optimizer.step()
    doctor.validate(loss=val_loss, metric=val_acc)
    doctor.findings

Fine-tuning: ``Doctor(model, optimizer, frozen_on_purpose=names, probe=(x_old, y_old))`` also
checks for parameters frozen by mistake (GW208), frozen BatchNorm layers whose statistics drift
(GW209) and the loss on a probe set from the original task at every validate() (GW403).

Under torch.distributed (DDP, or FSDP2's fully_shard) every rank builds its own Doctor on the model
it trains (the DDP wrapper or the module inside it) and calls ``step`` at every step: the ranks
combine their statistics at the sampled steps (the loss is the mean over ranks, the gradient norm
that of the averaged or sharded gradient), rank 0 alone reports, and ranks whose weights, steps or
losses disagree are GW210.

Hooks collect cheap signals; the expensive ones (per-layer gradient and weight norms, activation
statistics) only every ``sample_every`` steps. Rules are pure functions over those signals. The
Doctor never raises into the training loop: a check that fails is switched off with a warning.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradwise.doctor import dispatch, probes, ranks
from gradwise.doctor import rules as _rules  # noqa: F401  (registers every rule)
from gradwise.doctor._judging import DEAD_WINDOW, IMBALANCE_BATCHES, Judging
from gradwise.doctor.findings import (
    RULES,
    Finding,
)
from gradwise.doctor.graph import kind_from_value, read_graph
from gradwise.doctor.rules import data as data_rules
from gradwise.doctor.rules import model as model_rules
from gradwise.doctor.rules.dynamics import nonfinite
from gradwise.doctor.rules.generalisation import forgetting
from gradwise.doctor.rules.model import (
    NO_GRAD_STEPS,
    eval_in_train_mode,
    frozen_batchnorm_drift,
    frozen_by_mistake,
    params_without_gradients,
    ranks_out_of_sync,
    stochastic_evaluation,
)
from gradwise.doctor.signals import Series, Signals
from gradwise.errors import ConfigError, GradwiseWarning

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # outputs whose scale GW204 follows
RECTIFIERS = (nn.ReLU, nn.ReLU6)  # units that can die (GW304)
SQUASHING = (nn.Sigmoid, nn.Tanh)  # units that can saturate (GW309)
ACTIVATIONS = (*RECTIFIERS, *SQUASHING, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU)
STOCHASTIC = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.modules.batchnorm._BatchNorm,
)
STATEFUL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
EARLY_BATCHES = 3  # steps whose inputs, outputs and targets get the data and set-up checks
PARAMETER_EFFICIENT = 0.1  # below this fraction of trainable parameters the frozen rest (the
# output layer included) is parameter-efficient fine-tuning, not a mistake (GW208, undeclared)
ACCUMULATION_WINDOWS = 4  # accumulation windows whose micro-batches are checked for resets (GW216)
PROBE_SAMPLE = 4096  # entries per tensor that estimate its norm and update-to-weight ratio
PROBE_CHUNK = 64  # rows per batch when the forgetting probe is given as tensors (GW403)
PROBE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "nll": F.nll_loss,
    "bce_logits": lambda out, y: F.binary_cross_entropy_with_logits(out, y.to(out.dtype)),
    "bce": lambda out, y: F.binary_cross_entropy(out, y.to(out.dtype)),
    "mse": lambda out, y: F.mse_loss(out, y.to(out.dtype)),
    "l1": lambda out, y: F.l1_loss(out, y.to(out.dtype)),
    "huber": lambda out, y: F.huber_loss(out, y.to(out.dtype)),
}  # the probe's loss by loss kind, when no loss function is given


class Doctor(Judging):
    """Diagnose a training run live; see the module docstring for the loop it expects.

    model: the model being trained (hooks are attached; ``close()`` removes them all).
    optimizer: enables the learning-rate telemetry and the "parameters missing from the optimizer"
        check. task / loss_fn: what the loss is (an nn loss module, a torch.nn.functional function,
        or a task name), so the data rules know what targets to expect.
    ignore: rule codes to switch off, e.g. ["GW307"]. sample_every: steps between the expensive
        statistics. accumulation_steps: declare gradient accumulation (``step`` called per micro-batch).
    on_finding: called with each new Finding (default: print one line to stderr; None: silent).
    loss_scaling: gradients come from an fp16 GradScaler, which skips the occasional step with
        overflowing gradients by design; only a non-finite loss then counts as GW301.
    frozen_on_purpose: parameter names (or module paths, or globs) frozen on purpose, e.g. by the
        recipe's finetune section; frozen parameters outside them are GW208. None: unknown, and
        only the certain cases are reported (nothing trainable, the output layer frozen).
    probe: a probe set from the original task, ``(inputs, targets)`` tensors, a mapping batch or
        a DataLoader: its loss (``loss_fn``, else the loss of the task's kind, else the model's
        own) is measured before the first update and at every ``validate()``; a clear rise is
        GW403 catastrophic forgetting.
    process_group: under torch.distributed, the ranks whose statistics are combined. "auto" (the
        default): the default group when one is initialised with more than one rank. Every rank
        of the group must then build a Doctor and call ``step`` at every step (the sampled steps
        exchange statistics in two small collectives) and ``sync`` where it is called; rank 0
        alone reports findings (``on_finding``, ``report``). None: this process alone, no
        collectives (under DDP the gradient-accumulation check GW202 is then off).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        task: str | None = None,
        loss_fn: Callable | None = None,
        *,
        ignore: Iterable[str] = (),
        sample_every: int = 20,
        accumulation_steps: int = 1,
        on_finding: Callable[[Finding], None] | str | None = "print",
        loss_scaling: bool = False,
        frozen_on_purpose: Iterable[str] | None = None,
        probe: Any = None,
        process_group: Any = "auto",
    ) -> None:
        if sample_every < 1:
            raise ValueError("sample_every must be >= 1")
        model, wrapper = ranks.unwrap(model)  # hooks and names on the module DDP trains
        # (build the Doctor after DDP or fully_shard: fully_shard replaces the parameters)
        self.model, self.optimizer, self.task = model, optimizer, task
        self._group, self.rank, self.world_size = ranks.resolve_group(process_group)
        self._exchange = ranks.Exchange(self._group, self.world_size) if self._group else None
        self._sharded = ranks.sharded(model)  # FSDP2: parameters and gradients are DTensors
        # parameters compared across ranks (GW210): under DDP yes; else decided at the first sample
        self._replicated: bool | None = True if wrapper == "ddp" else None
        self._buffer_prints: torch.Tensor | None = None  # taken before the sampled forward pass
        # under DDP without exchanges the fresh gradient is this rank's, .grad everyone's mean
        self._local_gradient_ok = self._group is not None or ranks.outside_world() == 1
        self._pending_local: list[bool] = []  # per pending grad norm: a shard's sum of squares
        self._pre_snapshot: dict[str, list[torch.Tensor]] | None = None  # FSDP2 update ratios
        self._remote: list[tuple[int, str, int]] = []  # (rank, code, step) seen on another rank
        self._rebase_pending: int | None = None
        self._start_judging(ignore, on_finding)
        self.loss_fn = loss_fn
        self._loss_declared = loss_fn is not None or task is not None  # else read from the loss
        if isinstance(frozen_on_purpose, str):
            frozen_on_purpose = [frozen_on_purpose]
        self.frozen_on_purpose = None if frozen_on_purpose is None else set(frozen_on_purpose)
        self.probe = _check_probe(probe)
        self.sample_every, self.accumulation_steps = sample_every, accumulation_steps
        self.signals = Signals(
            loss_kind=model_rules.loss_kind(loss_fn, task), loss_scaling=loss_scaling
        )
        self._handles: list[Any] = []
        self._pending_loss: list[torch.Tensor] = []
        self._pending_grad: list[torch.Tensor] = []
        self._armed = True  # the first forward is sampled (it also measures the initial scales)
        self._snapshot: dict[str, list[torch.Tensor]] | None = None
        self._probe_index: dict[int, torch.Tensor] = {}
        self._cosines: list[float] = []
        self._fresh: torch.Tensor | None = None
        self._sites: dict[str, int] = {}  # calls of each activation module in this forward pass
        self._order: list[str] = []
        self._eval_in_train: list[str] = []
        self._got_grad: set[str] = set()
        self._grad_seen: dict[str, Any] = {}  # one-shot hooks: parameters yet to get a gradient
        self._seen_count = 0
        self._train_losses_since_val: list[float] = []
        self._closed = False
        self._ran: dict[str, None] = {}  # modules owning parameters, in the order they finished
        self._bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._watch_acts = True  # activation statistics: the first DEAD_WINDOW steps, and samples
        self._probing = False  # a probe is running the model: the hooks stay out of it
        self._calls: dict[str, int] = {}  # forward calls at step 0 of stateful modules (GW212)
        self._micro: torch.Tensor | None = None  # the latest micro-batch's gradient (GW216)
        self._accumulation: list[tuple[int, float, float]] = []
        self._repeat_done = False  # the stochastic-evaluation probe ran (GW213)
        self._layer_input: torch.Tensor | None = None  # the first layer's input at early steps
        self._layer_input_step = -1

        self._layers = _layers(model)
        self._all_params = [p for params in self._layers.values() for p in params]
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._owners = {
            n for n, m in model.named_modules() if n and any(True for _ in m.parameters(False))
        }
        self._trainable = self._trainability()
        self._attach()
        if not any(self._trainable):  # backward() would fail before the first step
            self._guarded("GW208", lambda: self._check_frozen(0))

    # -- public API ----------------------------------------------------------------------------

    def step(
        self,
        loss: torch.Tensor | float,
        inputs: torch.Tensor | None = None,
        outputs: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        grad_norm: torch.Tensor | float | None = None,
        grad_clip: float | None = None,
    ) -> list[Finding]:
        """Record one training step; call after backward() and before the next zero_grad().

        grad_norm: the global gradient norm if you have already computed it (e.g. for clipping),
        which saves the Doctor a pass over the gradients (under FSDP2 the DTensor that
        ``clip_grad_norm_``/``get_total_norm`` return is taken as it is).
        grad_clip: the max norm the gradients are clipped to after this call, if they are: an
        isolated spike that clipping contains is then not GW302 (a sustained blow-up still is).
        Under several ranks every rank calls this at every step; loss: this rank's loss (the
        Doctor records the mean over ranks).

        Returns the findings that fired at this step (new ones, and known ones firing again).
        """
        s = self.signals
        step = s.step
        self._fired_now: list[Finding] = []
        if grad_clip is not None:
            s.grad_clip = float(grad_clip)
        graph_loss = loss if isinstance(loss, torch.Tensor) and step == 0 else None
        loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        self._pending_loss.append(loss)
        shard, norm = False, torch.tensor(float("nan"))
        with self._contained("the gradient norm"):  # under ranks: nothing skips the exchange
            if grad_norm is None:
                norm, shard = self._grad_norm()
            elif ranks.is_dtensor(grad_norm):
                norm = grad_norm.full_tensor()  # get_total_norm's is replicated: no collective
            elif not isinstance(grad_norm, torch.Tensor):
                norm = torch.tensor(float(grad_norm))
            else:
                norm = grad_norm
        self._pending_grad.append(norm.detach())
        self._pending_local.append(shard)
        if self._grad_seen and len(self._got_grad) > self._seen_count:
            for name in self._got_grad & self._grad_seen.keys():
                self._grad_seen.pop(name).remove()
            self._seen_count = len(self._got_grad)
        with self._contained("the batch checks"):
            if self.accumulation_steps > 1:
                self._note_accumulation(step)
            if step < EARLY_BATCHES or self._armed_for(step):
                self._check_batch(step, graph_loss, loss, inputs, outputs, targets)
            if step < IMBALANCE_BATCHES and targets is not None:
                self._pool_targets(step, targets, outputs)
            # the optimizer stepped since the last sample (with accumulation: once a window ends)
            if self._snapshot is not None and step % self.accumulation_steps == 0:
                self._update_ratios(step)
            if step == 0 and self.probe is not None and not len(s.probe_loss):
                self._measure_probe(step)  # the original task's loss before any update
        if self._armed_for(step):
            self.signals.new_values = len(self._pending_loss)
            reduced = self._share(step, full=True) if self._exchange else None
            with self._contained("the sampled checks"):
                self._flush_loss(step)
                self._guarded("GW208", lambda: self._watch_trainability(step), "trainability")
                self._sample_gradients(step, reduced)
                self._guarded("GW209", lambda: self._check_batchnorm(step))
                self._run_live_rules(step)
                self._merge_remote()
        elif step == DEAD_WINDOW - 1:  # the first window of activations is complete
            with self._contained("the activation checks"):
                self._dispatch("activations", self._context(step), step)
        elif (
            self._exchange is None
            and loss.device.type == "cpu"
            and not bool(torch.isfinite(loss).all())
        ):  # free on the CPU: report GW301 at the step it appears (with ranks: at the sample)
            self._check_finite(step)
        if self._exchange is not None and self._sharded and self._armed_for(step + 1):
            with self._contained("the shards' weights"):
                self._take_pre_snapshot()
        s.step += 1
        self._armed = self._armed_for(s.step)
        self._watch_acts = self._armed or s.step < DEAD_WINDOW
        return self._fired_now

    def validate(self, loss: float | None = None, metric: float | None = None) -> list[Finding]:
        """Record an evaluation (validation loss and/or your metric); enables GW401/GW402.

        Under several ranks it communicates nothing (it may be called on rank 0 alone), and the
        training loss it compares with is the ranks' mean up to the last sampled step or ``sync``;
        only a probe set (GW403) under FSDP2 runs the model, which every rank must then do too.
        """
        self._flush_loss(self.signals.step - 1)
        recent = self._train_losses_since_val
        train = sum(recent) / len(recent) if recent else None
        self._train_losses_since_val = []
        entry = {
            "step": self.signals.step,
            "loss": _float(loss),
            "metric": _float(metric),
            "train_loss": train,
        }
        self.signals.val.append(entry)
        before = set(self._findings)
        self._fired_now = []
        self._dispatch("validate", self._context(self.signals.step), self.signals.step)
        if self.probe is not None and self._measure_probe(self.signals.step):
            self._judge(forgetting, self.signals)
        return [self._findings[c] for c in self._findings if c not in before]

    def check_finite(self) -> list[Finding]:
        """Judge the losses recorded so far for non-finite values now, not at the next sampled step.

        The loss of each step stays on its device until a sampled step, so that watching costs no
        synchronisation; a caller that has seen a non-finite loss (the Trainer checks on the host)
        calls this to get GW301 with the step the value first appeared. Under several ranks it
        communicates nothing and judges this rank's own losses (the ranks' combined view comes
        at the next sampled step).
        """
        self._fired_now = []
        if self._exchange is not None:
            self._check_finite_here()
        else:
            self._check_finite(self.signals.step - 1)
        return self._fired_now

    def sync(self) -> list[Finding]:
        """Combine the ranks' statistics now rather than at the next sampled step (e.g. before
        ``telemetry()`` at the end of a run): a collective that every rank must call at the same
        point. Returns the findings it fired (GW210, GW301). A no-op in a single process."""
        self._fired_now = []
        if self._exchange is None:
            self._flush_loss(self.signals.step - 1)
            return []
        self._share(self.signals.step - 1, full=False)
        self._merge_remote()
        return self._fired_now

    def telemetry(self) -> dict:
        """The collected signals in the run directory's ``doctor/telemetry.json`` format."""
        self._flush_loss(self.signals.step - 1)
        return {"sample_every": self.sample_every, **self.signals.to_dict()}

    @property
    def wants_batch(self) -> bool:
        """Whether the next ``step`` reads its ``inputs``/``outputs``/``targets`` (the first
        steps and the sampled ones); a caller that has to work to produce them can skip it."""
        step = self.signals.step
        return step < IMBALANCE_BATCHES or self._armed_for(step)

    def new_pass(self) -> None:
        """A forward pass starts. The Doctor sees one when the model itself is called; a loop that
        calls only parts of it (a LightningModule's ``training_step`` calling ``self.net``) says so
        here, so that a module reused within a pass is still told apart from the next pass."""
        self._sites.clear()

    def rebaseline(self) -> None:
        """Judge the per-step signals afresh from here on (after a rollback: the old spikes and
        losses belong to a state that no longer exists)."""
        if self._exchange is not None and self._pending_loss:  # the rest comes at the exchange
            self._rebase_pending = len(self._pending_loss)
            return
        self._flush_loss(self.signals.step - 1)
        self.signals.since = len(self.signals.loss)

    def reattach(self) -> None:
        """Re-attach the hooks after modules were replaced (e.g. ReLU swapped for LeakyReLU)."""
        self._detach()
        modules = dict(self.model.named_modules())
        for name in list(self.signals.activations):
            module = modules.get(name.split("#")[0])  # "act#2": act, at its second call site
            if type(module).__name__ != self.signals.activations[name].kind:
                del self.signals.activations[name]
                self._dead_masks.pop(name, None)
        self._attach()

    def close(self) -> None:
        """Remove every hook: the model is left exactly as it was."""
        self._detach()
        self._closed = True

    def _detach(self) -> None:
        for handle in [*self._handles, *self._grad_seen.values()]:
            handle.remove()
        self._handles.clear()
        self._grad_seen.clear()

    def __enter__(self) -> Doctor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hooks -----------------------------------------------------------------------------------

    def _attach(self) -> None:
        self._stateful: list[str] = []
        if not _hookable(self.model):  # a TorchScript model takes no Python hooks
            return
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook))
        self._handles.append(self.model.register_forward_hook(self._root_hook, with_kwargs=True))
        stateful = [
            n
            for n, m in self.model.named_modules()
            if isinstance(m, STATEFUL) and getattr(m, "track_running_stats", False)
        ]
        self._stateful = stateful
        counted = {prefix for n in stateful for prefix in _prefixes(n)}
        for name, module in self.model.named_modules():
            if name in counted and _hookable(module):
                self._handles.append(module.register_forward_pre_hook(self._make_counter(name)))
        for name, module in self.model.named_modules():
            if _hookable(module) and (
                isinstance(module, (*WEIGHTED, *ACTIVATIONS))
                or name in self._layers
                or name in self._owners
            ):
                self._handles.append(
                    module.register_forward_hook(self._make_forward_hook(name, module))
                )
        for name, p in self.model.named_parameters():  # GW207: any step's gradient counts
            if p.requires_grad and name not in self._got_grad:
                with contextlib.suppress(RuntimeError):  # a tensor subclass without such hooks
                    self._grad_seen[name] = p.register_post_accumulate_grad_hook(
                        lambda _, name=name: self._got_grad.add(name)
                    )
        watched = _last_matrix(self.model, self.optimizer)
        if watched is not None:
            self._watched = watched
            hook = self._fresh_gradient_hook if self.accumulation_steps == 1 else self._micro_hook
            self._handles.append(watched.register_hook(hook))

    def _root_pre_hook(self, module: nn.Module, args: Any) -> None:
        self._sites.clear()  # call sites are counted per forward pass
        if self._exchange is not None and self._armed and torch.is_grad_enabled():
            try:  # buffers before this forward pass changes them (after DDP broadcast them)
                self._buffer_prints = self._fingerprints(self._compared_buffer_items())
            except Exception:
                self._buffer_prints = None  # the exchange sends none; GW210 judges the weights
        if not torch.is_grad_enabled() and module.training:
            self.check_eval_mode(module)

    def check_eval_mode(self, module: nn.Module | None = None) -> None:
        """GW203: an evaluation pass is about to run; dropout or batch-norm layers of ``module``
        (default: the model) still in training mode are a fault. Called by the Doctor itself when
        the model is called without gradients; a loop that evaluates parts of the model (a
        LightningModule's ``validation_step``) calls it at the start of an evaluation."""
        if "GW203" in self.ignore:
            return
        module = self.model if module is None else module
        stochastic = [
            n for n, m in module.named_modules() if isinstance(m, STOCHASTIC) and m.training
        ]
        if stochastic:
            self._judge(eval_in_train_mode, stochastic)

    def _root_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """GW213: the first eval-mode pass without gradients runs again; the outputs must agree."""
        if (
            self._repeat_done
            or self._probing
            or torch.is_grad_enabled()
            or module.training
            or self._sharded  # a second pass would be a collective on this rank alone
            or {"GW213"} & (self.ignore | self._broken)
        ):
            return
        self._repeat_done = True
        self._probing = True
        try:
            repeat = probes.repeat_forward(module, lambda: module(*args, **kwargs), output)
        except Exception as exc:  # the doctor's failure, never the user's evaluation's
            self._rule_failed(stochastic_evaluation.rule, exc, self.signals.step)
            return
        finally:
            self._probing = False
        if repeat is not None:
            self._judge(stochastic_evaluation, repeat)

    def _make_counter(self, name: str) -> Callable:
        def count(module: nn.Module, args: Any) -> None:
            if self.signals.step == 0 and not self._probing and torch.is_grad_enabled():
                self._calls[name] = self._calls.get(name, 0) + 1

        return count

    def _make_forward_hook(self, name: str, module: nn.Module) -> Callable:
        kind = type(module).__name__
        s = self.signals

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            if not self._watch_acts or not torch.is_grad_enabled() or name in self._failed:
                return
            if self._probing:
                return
            first_layer = self._layer_input_step != s.step and isinstance(mod, WEIGHTED)
            if s.step < EARLY_BATCHES and first_layer and args and torch.is_tensor(args[0]):
                self._layer_input, self._layer_input_step = args[0].detach(), s.step
            try:
                observe(mod, out)
            except Exception as exc:  # a statistic never breaks the user's forward pass
                self._warn_once(name, f"watching {name} failed; it is no longer watched", exc)

        def observe(mod: nn.Module, out: Any) -> None:
            trained = isinstance(out, torch.Tensor) and out.requires_grad
            if s.step == 0 and name in self._owners and trained:  # the output layer: last (GW208)
                self._ran.pop(name, None)
                self._ran[name] = None
            if not isinstance(out, torch.Tensor):
                return
            if name in self._layers and name not in self._order:
                self._order.append(name)
            if not isinstance(mod, (*WEIGHTED, *ACTIVATIONS)) or not out.is_floating_point():
                return
            with torch.no_grad():
                x = out.detach().float()
                std = float(x.std()) if x.numel() > 1 else 0.0
                if s.step == 0 and isinstance(mod, WEIGHTED):
                    s.init_activation_stds.append((name, std))
                if not isinstance(mod, ACTIVATIONS):
                    return
                s.output_module = name
                # one module called at several places in a forward pass (an nn.ReLU reused after
                # several layers) is watched per call site: "act", then "act#2", ...
                site = self._sites[name] = self._sites.get(name, 0) + 1
                key = name if site == 1 else f"{name}#{site}"
                family = (
                    "rectifier"
                    if isinstance(mod, RECTIFIERS)
                    else {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}.get(type(mod))
                )
                self._observe_activation(key, kind, x, family, 1 if x.ndim == 4 else x.ndim - 1)

        return torch.compiler.disable(hook)  # compiled models: no graph breaks or recompiles

    def _fresh_gradient_hook(self, grad: torch.Tensor) -> None:
        if self._armed:
            fresh = grad.detach()
            self._fresh = fresh.clone() if self._fresh is None else self._fresh + fresh

    def _micro_hook(self, grad: torch.Tensor) -> None:
        if self.signals.step < ACCUMULATION_WINDOWS * self.accumulation_steps:
            self._micro = grad.detach().clone()

    def _note_accumulation(self, step: int) -> None:
        """GW216: at a micro-batch past the first of its window, .grad against its own gradient."""
        micro, self._micro = self._micro, None
        watched = getattr(self, "_watched", None)
        position = step % self.accumulation_steps
        if micro is None or watched is None or watched.grad is None or position == 0:
            return
        grad = watched.grad.detach()
        fresh = float(micro.float().norm())
        if fresh == 0.0:
            return
        ratio = float(grad.float().norm()) / fresh
        self._accumulation.append((position, ratio, _agreement(grad, micro)))

    # -- collection ------------------------------------------------------------------------------

    def _armed_for(self, step: int) -> bool:
        return step % self.sample_every == 0

    def _grad_norm(self) -> tuple[torch.Tensor, bool]:
        """The global gradient norm as a device tensor (no synchronisation until the next flush),
        and False; for FSDP2's sharded gradients under exchanges: the sum of squares of this
        rank's shards (the ranks add them up at the next exchange), and True."""
        grads = [_dense(p.grad) for p in self._all_params if p.grad is not None]
        if not grads:
            return torch.tensor(0.0), False
        if self._sharded:
            if self._exchange is not None:
                return ranks.local_squares(grads, self.world_size), True
            return ranks.local_squares(grads).sqrt(), False  # this process's shards alone
        norms = torch._foreach_norm(
            grads
        )  # one fused kernel per device and dtype, as clipping does
        return torch.linalg.vector_norm(torch.stack([n.float() for n in norms])), False

    def _flush_loss(self, last_step: int) -> None:
        """Move the pending per-step losses and gradient norms into their series (one copy).

        Under exchanges the pending values wait for the next exchange (the ranks' mean), which
        moves them itself."""
        if not self._pending_loss or self._exchange is not None:
            return
        pending = self._pending_loss + self._pending_grad
        values = torch.stack([v.float().reshape(()).cpu() for v in pending]).tolist()
        n = len(self._pending_loss)
        self._append_losses(last_step, values[:n], values[n:])

    def _append_losses(self, last_step: int, losses: list[float], grads: list[float]) -> None:
        """Append the per-step values of the steps up to ``last_step``; clear the pending ones."""
        first = last_step - len(losses) + 1
        for i, (loss, grad) in enumerate(zip(losses, grads, strict=True)):
            self.signals.loss.append(first + i, loss)
            self.signals.grad_norm.append(first + i, grad)
        self._train_losses_since_val += [v for v in losses if math.isfinite(v)]
        self._pending_loss.clear()
        self._pending_grad.clear()
        self._pending_local.clear()

    def _sample_gradients(self, step: int, reduced: dict | None = None) -> None:
        """Per-layer relative gradient norms, the global norm, and a weight snapshot (one sync).

        reduced: what the exchange combined over the ranks: for FSDP2's shards, the per-layer
        sums of squares of gradients and weights (``layers``) and of the last update (``ratios``).
        """
        s = self.signals
        reduced = reduced or {}
        if self._order:
            s.layers = list(self._order)
        for name, p in self.model.named_parameters():  # also those unfrozen since the start
            if p.grad is not None:
                self._got_grad.add(name)
        if self._sharded and self._exchange is not None:
            for name, (g2, w2) in (reduced.get("layers") or {}).items():
                relative = math.sqrt(g2) / max(math.sqrt(w2), 1e-12)
                s.layer_grad_norm.setdefault(name, Series()).append(step, relative)
            for name, (d2, w2) in (reduced.get("ratios") or {}).items():
                ratio = math.sqrt(d2) / max(math.sqrt(w2), 1e-12)
                s.update_ratio.setdefault(name, Series()).append(step, ratio)
        else:
            sums = self._layer_squares()
            for name, (g2, w2) in sums.items():
                if w2 == 0.0:  # zero-initialised (LoRA's B): a relative gradient means nothing
                    s.zero_init.add(name)
                relative = math.sqrt(g2) / max(math.sqrt(w2), 1e-12)
                s.layer_grad_norm.setdefault(name, Series()).append(step, relative)
            if sums:
                with torch.no_grad():
                    self._snapshot = {
                        name: [self._probe(p) for p in self._layers[name]] for name in sums
                    }
        if self.optimizer is not None:
            s.lr.append(step, float(self.optimizer.param_groups[0]["lr"]))
        if "cosine" in reduced:
            self._cosines.append(reduced["cosine"])
        elif (
            self._exchange is None
            and self._local_gradient_ok  # under DDP .grad is the ranks' mean, not this rank's
            and self._fresh is not None
            and self._watched.grad is not None
        ):
            self._cosines.append(_agreement(self._watched.grad, self._fresh))
        self._fresh = None

    def _layer_squares(self) -> dict[str, tuple[float, float]]:
        """Per layer with gradients: estimated sums of squares of its gradients and its weights
        (of this rank's shards under FSDP2)."""
        owners = [
            (name, p) for name, params in self._layers.items() for p in params if p.grad is not None
        ]
        if not owners:
            return {}
        grads = _norms([self._probe(p.grad, p) for _, p in owners])
        weights = _norms([self._probe(p) for _, p in owners])
        world = self.world_size if self._sharded and self._exchange is not None else 1
        sums: dict[str, tuple[float, float]] = {}
        for (name, p), g, w in zip(owners, grads, weights, strict=True):
            g2, w2 = sums.get(name, (0.0, 0.0))
            factor = self._scale(p) / ranks.replicas(p, world)
            sums[name] = (g2 + g * g * factor, w2 + w * w * factor)
        return sums

    def _probe(self, t: torch.Tensor, owner: torch.Tensor | None = None) -> torch.Tensor:
        """A fixed random sample of the entries of ``t`` (a parameter or its gradient), copied.

        Norms and update-to-weight ratios of a large tensor are estimated from PROBE_SAMPLE
        entries: accurate to a few percent, and far cheaper than reading or copying the whole model.
        """
        flat = ranks.local(t).detach()
        flat = (flat.to_dense() if flat.is_sparse else flat).reshape(-1)
        if flat.numel() <= PROBE_SAMPLE:
            return flat.clone()
        key = id(t if owner is None else owner)
        index = self._probe_index.get(key)
        if index is None:  # a private generator: the global RNG (and exact resume) is untouched
            generator = torch.Generator().manual_seed(len(self._probe_index))
            # drawn with replacement: a permutation of a large tensor costs ~10 ms per 10^6 entries
            index = torch.randint(flat.numel(), (PROBE_SAMPLE,), generator=generator)
            index = index.to(flat.device)
            self._probe_index[key] = index
        return flat[index]

    @staticmethod
    def _scale(p: torch.Tensor) -> float:
        """Factor that turns a probe's sum of squares into an estimate of the whole tensor's (of
        this rank's shard of a DTensor)."""
        return max(ranks.local(p).numel() / PROBE_SAMPLE, 1.0)

    def _update_ratios(self, step: int) -> None:
        """||w_now - w_sampled|| / ||w_sampled|| per layer: the size of the optimizer's last step."""
        snapshot, self._snapshot = self._snapshot, None
        params = [(name, p) for name in snapshot for p in self._layers[name]]
        with torch.no_grad():
            old = [o for olds in snapshot.values() for o in olds]
            new = [self._probe(p) for _, p in params]
            deltas = _norms([n - o for n, o in zip(new, old, strict=True)])
            norms = _norms(old)
        d2: dict[str, float] = {}
        w2: dict[str, float] = {}
        for (name, p), d, w in zip(params, deltas, norms, strict=True):
            d2[name] = d2.get(name, 0.0) + d * d * self._scale(p)
            w2[name] = w2.get(name, 0.0) + w * w * self._scale(p)
        for name in d2:
            ratio = math.sqrt(d2[name]) / max(math.sqrt(w2[name]), 1e-12)
            self.signals.update_ratio.setdefault(name, Series()).append(step, ratio)

    def _context(self, step: int, **values: Any) -> dispatch.Context:
        return dispatch.Context(
            step=step,
            signals=self.signals,
            model=self.model,
            optimizer=self.optimizer,
            loss_kind=self.signals.loss_kind,
            task=self.task,
            cosines=self._cosines,
            accumulation=self._accumulation or None,
            **values,
        )

    def _check_batch(
        self,
        step: int,
        graph_loss: torch.Tensor | None,
        loss: torch.Tensor,
        raw_inputs: Any,
        outputs: Any,
        targets: Any,
    ) -> None:
        """Data and set-up rules on one batch (the first few steps, then at sampled steps)."""
        inputs = _main_tensor(raw_inputs)
        outputs = _main_tensor(outputs)
        targets = targets if isinstance(targets, torch.Tensor) else None
        early = step < EARLY_BATCHES
        providers: dict[str, Callable[[], Any]] = {}
        values: dict[str, Any] = {"inputs": inputs, "outputs": outputs, "targets": targets}
        if early:
            providers["loss_value"] = lambda: float(loss.float().reshape(()).cpu())
            if inputs is not None:
                values["batch_size"] = inputs.shape[0] if inputs.ndim else None
            if self._layer_input_step == step:
                values["layer_input"] = self._layer_input
                self._layer_input = None
        if step == 0:
            graph = read_graph(graph_loss) if graph_loss is not None else None
            values["loss_graph"] = graph
            if not self._loss_declared:
                self._infer_loss_kind(graph, loss, outputs, targets)
            values["activation_stds"] = self.signals.init_activation_stds or None
            values["reused"] = self._reused()
            if raw_inputs is not None and not self._sharded:
                providers["mixing"] = lambda: self._probe_mixing(raw_inputs)
        context = self._context(step, providers=providers, **values)
        for when in ("first", "batch", "early") if step == 0 else ("batch", "early"):
            if when != "early" or early:
                self._dispatch(when, context, step)
        kind = self.signals.loss_kind
        if early and outputs is not None and kind in ("cross_entropy", "nll") and outputs.ndim >= 2:
            axis = data_rules.class_axis(outputs, targets) if targets is not None else 1
            if axis is not None:
                self.signals.num_classes = outputs.shape[axis]
        if step == 0:
            self._check_optimizer(step)
            self._guarded("GW208", lambda: self._check_frozen(step))

    def _reused(self) -> dict[str, int]:
        """Stateful modules called more often at step 0 than the nearest enclosing module that
        ran (a ModuleList holding them never runs itself)."""
        reused = {}
        for name in self._stateful:
            calls = self._calls.get(name, 0)
            outer = [self._calls.get(p, 0) for p in _prefixes(name)[1:]]
            enclosing = next((c for c in outer if c), 0)
            if enclosing and calls > enclosing:
                reused[name] = calls
        return reused

    def _infer_loss_kind(self, graph: Any, loss: torch.Tensor, outputs: Any, targets: Any) -> None:
        """Without loss_fn or task: the loss's kind from its autograd graph, else from its value."""
        kind = graph.kind if graph is not None else "other"
        if kind == "other":
            value = float(loss.float().reshape(()).cpu())
            kind = kind_from_value(value, outputs, targets) or "other"
        self.signals.loss_kind = kind

    def _probe_mixing(self, inputs: Any) -> dict[str, float] | None:
        """GW211's probe with the doctor's own hooks idle."""
        self._probing = True
        try:
            return probes.batch_mixing(self.model, inputs)
        finally:
            self._probing = False

    def _check_optimizer(self, step: int) -> None:
        if self.optimizer is None:
            return
        in_optimizer = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [
            n
            for n, p in self.model.named_parameters()
            if p.requires_grad and id(p) not in in_optimizer
        ]
        self._judge(params_without_gradients, [], missing, len(self._names), True, step=step)

    def _check_finite(self, step: int) -> None:
        self._flush_loss(step)
        self._judge(nonfinite, self.signals, step=step)

    def _run_live_rules(self, step: int) -> None:
        context = self._context(step)
        self._dispatch("sample", context, step)
        self._dispatch("activations", context, step)
        if step >= NO_GRAD_STEPS:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            never = [n for n, _ in named if n not in self._got_grad]
            known = self.optimizer is not None
            if known and never:  # those missing from the optimizer are the other wording's
                owned = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
                missing = set(never)
                never = [n for n, p in named if n in missing and id(p) in owned]
            self._judge(params_without_gradients, never, [], len(named), known, step=step)

    # -- several ranks: one exchange per sampled step ------------------------------------------------

    def _share(self, last_step: int, full: bool) -> dict[str, Any]:
        """Exchange this rank's measurements with the other ranks and combine them.

        The per-step losses (the ranks' mean) and gradient norms (the norm of the averaged or
        sharded gradient) of the pending steps go into their series; GW210 compares the ranks.
        full (at sampled steps): also FSDP2's per-layer sums over shards and DDP's fresh gradient
        for GW202; returns those, combined, for :meth:`_sample_gradients`. Every rank sends every
        segment, empty when its measurement failed, so the collectives are always the same.
        """
        assert self._exchange is not None
        segments: dict[str, torch.Tensor | None] = {}
        local: dict[str, Any] = {}

        def build(name: str, fn: Callable[[], torch.Tensor | None]) -> None:
            try:
                segments[name] = fn()
            except Exception as exc:  # sent empty: the other ranks still get their exchange
                segments[name] = None
                self._warn_once(f"exchange {name}", f"its {name} could not be measured", exc)

        device = self._exchange.device
        n = len(self._pending_loss)

        def stacked(values: list[torch.Tensor]) -> torch.Tensor | None:
            if not values:
                return None
            return torch.stack([v.float().reshape(()).to(device) for v in values])

        build("loss", lambda: stacked(self._pending_loss))
        build("grad", lambda: stacked(self._pending_grad))
        build("grad_local", lambda: torch.tensor(self._pending_local, dtype=torch.float64))
        param_items = [
            (name, p) for name, p in self.model.named_parameters() if not ranks.is_dtensor(p)
        ]
        buffer_items = self._compared_buffer_items()
        build("fingerprint", lambda: self._fingerprints(param_items))
        prints, self._buffer_prints = self._buffer_prints, None
        build("buffers", lambda: prints if prints is not None else self._fingerprints(buffer_items))
        codes = sorted(RULES)
        mine, self._local_codes = self._local_codes, {}
        build("codes", lambda: torch.tensor([float(mine.get(c, -1)) for c in codes]))
        if full and self._sharded:
            build("layers", lambda: self._shard_layer_sums(local))
            build("ratios", lambda: self._shard_ratio_sums(local))
        if full and not self._sharded:
            build("fresh", lambda: self._fresh_sample(local))
        try:
            steps, got = self._exchange.gather(self.signals.step, segments)
        except Exception as exc:  # a broken process group: go on with this rank's own view
            self._exchange = None
            self._local_gradient_ok = ranks.outside_world() == 1
            self._warn_once(
                "exchange", "the ranks could not exchange statistics; this rank goes on alone", exc
            )
            return {}
        reduced: dict[str, Any] = {}
        loss_finite = None
        with self._contained("combining the losses"):
            loss_finite = self._combine_losses(last_step, n, got)
        if self._pending_loss:  # combining failed: those steps' values are lost
            self._pending_loss.clear()
            self._pending_grad.clear()
            self._pending_local.clear()
        with self._contained("comparing the ranks (GW210)"):
            fingerprints, names = self._comparable(param_items, buffer_items, got)
            self._judge(ranks_out_of_sync, steps, names, fingerprints, loss_finite)
        with self._contained("combining the gradients"):
            if ranks.agreed(got["layers"]) and "layers" in local:
                reduced["layers"] = _summed(local["layers"], got["layers"])
            if ranks.agreed(got["ratios"]) and "ratios" in local:
                reduced["ratios"] = _summed(local["ratios"], got["ratios"])
            if ranks.agreed(got["fresh"]) and "fresh" in local:
                grad, fresh = local["fresh"]
                mean = torch.stack(got["fresh"]).mean(0)
                reduced["cosine"] = max(_agreement(grad, mean), _agreement(grad, fresh))
        for r, row in enumerate(got["codes"]):
            if r == self.rank or row.numel() != len(codes):
                continue
            for code, first in zip(codes, row.tolist(), strict=True):
                if first >= 0:
                    self._remote.append((r, code, int(first)))
        return reduced

    def _combine_losses(
        self, last_step: int, n: int, got: dict[str, list[torch.Tensor]]
    ) -> list[bool] | None:
        """The pending steps' losses as the ranks' mean and gradient norms over the ranks, into
        the series; returns whether each rank's losses were all finite (None: not comparable)."""
        if n == 0:
            return None
        own_loss, own_grad = got["loss"][self.rank], got["grad"][self.rank]
        shards = got["grad_local"][self.rank]
        if len(own_loss) != n or len(own_grad) != n or len(shards) != n:
            # this rank's own values failed to go out: keep them from the pending tensors
            own_loss = torch.stack([v.double().reshape(()).cpu() for v in self._pending_loss])
            own_grad = torch.stack([v.double().reshape(()).cpu() for v in self._pending_grad])
            shards = torch.tensor(self._pending_local, dtype=torch.float64)
        shard = shards.bool()
        finite = None
        if ranks.agreed(got["loss"]) and len(got["loss"][0]) == n:
            table = torch.stack(got["loss"])
            finite = [bool(row.isfinite().all()) for row in table]
            losses = table.mean(0)
        else:
            losses = own_loss
        if ranks.agreed(got["grad"]) and len(got["grad"][0]) == n:
            table = torch.stack(got["grad"])
            grads = torch.where(shard, table.sum(0).sqrt(), table.mean(0))
        else:
            grads = torch.where(shard, own_grad.sqrt(), own_grad)
        before = len(self.signals.loss)
        self._append_losses(last_step, losses.tolist(), grads.tolist())
        if self._rebase_pending is not None:  # a rebaseline() came while these were pending
            self.signals.since = before + self._rebase_pending
            self._rebase_pending = None
        return finite

    def _comparable(
        self,
        param_items: list[tuple[str, torch.Tensor]],
        buffer_items: list[tuple[str, torch.Tensor]],
        got: dict[str, list[torch.Tensor]],
    ) -> tuple[list[list[float]] | None, list[str] | None]:
        """The fingerprints GW210 compares, per rank, and the tensors' names; (None, None) when the
        ranks are not replicas (decided at the first comparison unless the model is DDP's)."""
        params = got["fingerprint"] if ranks.agreed(got["fingerprint"]) else None
        buffers = got["buffers"] if ranks.agreed(got["buffers"]) else None
        if self._replicated is None:
            first = params if params is not None else buffers
            if first is None:
                return None, None
            rows = [row.tolist() for row in first]
            names = [n for n, _ in (param_items if params is not None else buffer_items)]
            self._replicated = not ranks_out_of_sync([0] * len(rows), names, rows)
        if not self._replicated:
            return None, None
        names: list[str] = []
        parts: list[list[torch.Tensor]] = []
        if params is not None:
            names += [n for n, _ in param_items]
            parts.append(params)
        if buffers is not None:
            names += [n for n, _ in buffer_items]
            parts.append(buffers)
        if not parts:
            return None, None
        rows = [torch.cat([part[r] for part in parts]).tolist() for r in range(self.world_size)]
        return rows, names

    def _compared_buffer_items(self) -> list[tuple[str, torch.Tensor]]:
        """Floating-point buffers that replicas must share (BatchNorm's running statistics are
        per-rank by design without SyncBatchNorm, and DTensor shards differ)."""
        items = []
        for prefix, module in self.model.named_modules():
            batchnorm = isinstance(module, nn.modules.batchnorm._BatchNorm)
            for name, b in module.named_buffers(recurse=False):
                if b is None or not b.is_floating_point() or ranks.is_dtensor(b):
                    continue
                if batchnorm and name in ("running_mean", "running_var"):
                    continue
                items.append((f"{prefix}.{name}" if prefix else name, b))
        return items

    @staticmethod
    def _fingerprints(items: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
        """(entries, sum, sum of squares) of a fixed sample of each tensor, in float64."""
        rows = []
        with torch.no_grad():
            for name, t in items:
                flat = t.detach().reshape(-1)
                index = ranks.sample_index(name, flat.numel(), flat.device)
                x = (flat if index is None else flat[index]).double()
                count = torch.full((), float(x.numel()), dtype=torch.float64, device=x.device)
                rows.append(torch.stack([count, x.sum(), x.square().sum()]))
        return torch.cat(rows) if rows else None

    def _fresh_sample(self, local: dict[str, Any]) -> torch.Tensor | None:
        """GW202 under DDP: a fixed sample of this step's fresh gradient of the watched weight (its
        mean over the ranks is what DDP's all-reduce puts in .grad)."""
        fresh, self._fresh = self._fresh, None
        watched = getattr(self, "_watched", None)
        if fresh is None or watched is None or watched.grad is None or not self._local_gradient_ok:
            return None
        name = self._names.get(id(watched), "watched")
        index = ranks.sample_index(name, fresh.numel(), fresh.device)
        pick = (lambda t: t.reshape(-1)) if index is None else (lambda t: t.reshape(-1)[index])
        grad, mine = pick(watched.grad.detach()).double(), pick(fresh).double()
        local["fresh"] = (grad.cpu(), mine.cpu())
        return mine

    def _shard_layer_sums(self, local: dict[str, Any]) -> torch.Tensor | None:
        """FSDP2: per layer, this rank's sums of squares of gradient and weight shards."""
        sums = self._layer_squares()
        names = list(self._layers)
        local["layers"] = [n for n in names if n in sums]
        values = [v for n in local["layers"] for v in sums[n]]
        return torch.tensor(values, dtype=torch.float64) if values else None

    def _take_pre_snapshot(self) -> None:
        """FSDP2: this rank's shards of the weights one step before a sampled step, so that the
        update ratio travels in that step's exchange."""
        with torch.no_grad():
            self._pre_snapshot = {
                name: [self._probe(p) for p in params] for name, params in self._layers.items()
            }

    def _shard_ratio_sums(self, local: dict[str, Any]) -> torch.Tensor | None:
        """FSDP2: per layer, this rank's sums of squares of the last update and of the weights."""
        snapshot, self._pre_snapshot = self._pre_snapshot, None
        if not snapshot or any(name not in self._layers for name in snapshot):
            return None
        params = [(name, p) for name in snapshot for p in self._layers[name]]
        old = [o for olds in snapshot.values() for o in olds]
        if len(old) != len(params):
            return None
        with torch.no_grad():
            new = [self._probe(p) for _, p in params]
            deltas = _norms([a - b for a, b in zip(new, old, strict=True)])
            norms = _norms(old)
        sums: dict[str, tuple[float, float]] = {}
        for (name, p), d, w in zip(params, deltas, norms, strict=True):
            d2, w2 = sums.get(name, (0.0, 0.0))
            factor = self._scale(p) / ranks.replicas(p, self.world_size)
            sums[name] = (d2 + d * d * factor, w2 + w * w * factor)
        local["ratios"] = list(sums)
        return torch.tensor([v for n in sums for v in sums[n]], dtype=torch.float64)

    def _merge_remote(self) -> None:
        """Findings another rank made alone (its own batches, its own activations), once."""
        remote, self._remote = self._remote, []
        for r, code, step in remote:
            if code in self._findings or code in self.ignore or code not in RULES:
                continue
            rule = RULES[code]
            self._apply(code, (f"on rank {r}: {rule.summary}", {"rank": r}), step)

    def _check_finite_here(self) -> None:
        """GW301 from this rank's own pending losses, without communicating."""
        if not self._pending_loss or "GW301" in self.ignore:
            return
        values = torch.stack([v.float().reshape(()).cpu() for v in self._pending_loss]).tolist()
        first = self.signals.step - len(values)
        for i, value in enumerate(values):
            if not math.isfinite(value):
                message = f"the loss is {value} at step {first + i} on rank {self.rank}"
                evidence = {"loss": value, "step_first_seen": first + i, "rank": self.rank}
                self._apply("GW301", (message, evidence), first + i)
                return

    # -- fine-tuning: frozen parts, frozen BatchNorm, the original task ----------------------------

    def _trainability(self) -> tuple[bool, ...]:
        return tuple(p.requires_grad for p in self.model.parameters())

    def _watch_trainability(self, step: int) -> None:
        """When parameters were frozen or unfrozen since the last sample: follow the new trainable
        set, judge the per-step signals afresh, and check the optimizer and the frozen parts."""
        now = self._trainability()
        if now == self._trainable:
            return
        self._trainable = now
        self._layers = _layers(self.model)
        self._all_params = [p for params in self._layers.values() for p in params]
        self._order = []  # rebuilt in forward order at the next sampled forward pass
        self.rebaseline()  # the global gradient norm now covers other parameters
        self._check_optimizer(step)
        self._check_frozen(step)

    def _check_frozen(self, step: int) -> None:
        """GW208: nothing trainable, the output layer frozen, or frozen parts not declared."""
        if "GW208" in self.ignore:
            return
        named = list(self.model.named_parameters())
        total = sum(p.numel() for _, p in named)
        trainable = sum(p.numel() for _, p in named if p.requires_grad)
        declared = self.frozen_on_purpose
        undeclared = []
        if declared is not None:
            undeclared = [n for n, p in named if not p.requires_grad and not _covered(n, declared)]
        output, modules = self._output_layer(), dict(self.model.named_modules())
        frozen_output = None
        params = list(modules[output].parameters(False)) if output in modules else []
        if trainable and params and not any(p.requires_grad for p in params):
            names = [self._names.get(id(p), output) for p in params]
            if declared is None:
                from gradwise.facts import adapters

                # adapters, prompt or prefix tuning, BitFit: a few parameters train on purpose
                efficient = trainable < PARAMETER_EFFICIENT * total
                if not adapters(self.model)[1] and not efficient:
                    frozen_output = output
            elif not all(_covered(n, declared) for n in names):
                frozen_output = output
        self._judge(frozen_by_mistake, total, trainable, frozen_output, undeclared, step=step)

    def _output_layer(self) -> str | None:
        """The module with parameters that finished last in the first forward pass (without one
        seen: the last such module registered)."""
        if self._ran:
            return next(reversed(self._ran))
        owners = [n for n, _ in self.model.named_modules() if n in self._owners]
        return owners[-1] if owners else None

    def _check_batchnorm(self, step: int) -> None:
        """GW209: running statistics of BatchNorm layers with frozen weights, against the last
        sample: the mean's shift in standard deviations and the variance's relative change (root
        mean square over channels)."""
        if "GW209" in self.ignore:
            return
        current: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, m in self.model.named_modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.running_mean is None:
                continue
            params = list(m.parameters(False))
            if params and not any(p.requires_grad for p in params):
                current[name] = (m.running_mean.detach().clone(), m.running_var.detach().clone())
        pairs = [(n, self._bn_stats[n], current[n]) for n in current if n in self._bn_stats]
        self._bn_stats = current
        if not pairs:
            return
        drifts = []
        for _, (mean0, var0), (mean1, var1) in pairs:
            scale = var0.float() + 1e-5
            shift = ((mean1.float() - mean0.float()) ** 2 / scale).mean().sqrt()
            spread = ((var1.float() - var0.float()) / scale).pow(2).mean().sqrt()
            drifts.append(torch.maximum(shift, spread).cpu())
        values = torch.stack(drifts).tolist()
        drift = {name: v for (name, _, _), v in zip(pairs, values, strict=True)}
        self._judge(frozen_batchnorm_drift, drift, step=step)

    def _measure_probe(self, step: int) -> bool:
        """The loss on the probe set, appended to ``signals.probe_loss``; False when the probe
        is off (GW403 ignored, or a failure switched it off with a warning)."""
        if "GW403" in self.ignore or self.probe is None:
            return False
        try:
            loss, noise = self._probe_loss()
        except Exception as exc:  # never into the training loop: the check is switched off
            warnings.warn(
                f"gradwise doctor: the probe set could not be evaluated ({type(exc).__name__}: "
                f"{exc}); the catastrophic-forgetting check (GW403) is off",
                GradwiseWarning,
                stacklevel=3,
            )
            self.probe = None
            return False
        if not len(self.signals.probe_loss):
            self.signals.probe_noise = noise
        self.signals.probe_loss.append(step, loss)
        return True

    def _probe_loss(self) -> tuple[float, float]:
        """(mean loss, its standard error over batches) on the probe set: no gradients, eval mode,
        every module's mode and the random generators restored, the doctor's hooks idle."""
        from gradwise.batch import outputs_of, run_model, split_batch

        model = self.model
        fn = self.loss_fn if callable(self.loss_fn) else PROBE_LOSSES.get(self.signals.loss_kind)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        modes = [(m, m.training) for m in model.modules()]
        cpu_rng = torch.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        cuda_rng = torch.cuda.get_rng_state_all() if cuda else None
        armed, self._armed = self._armed, False
        losses, sizes = [], []
        try:
            model.eval()
            with torch.no_grad():
                for raw in _probe_batches(self.probe):
                    batch = split_batch(raw).to(device)
                    if batch.target is None:
                        raise ValueError("a probe batch without targets")
                    out, own = outputs_of(run_model(model, batch, with_labels=fn is None))
                    loss = fn(out, batch.target) if fn is not None else own
                    if loss is None:
                        raise ValueError("no loss function (pass loss_fn to the Doctor)")
                    losses.append(loss.detach().float().reshape(()).cpu())
                    sizes.append(len(batch.target) if batch.target.ndim else 1)
        finally:
            for m, mode in modes:
                m.training = mode
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            self._armed = armed
        if not losses:
            raise ValueError("the probe set is empty")
        values = torch.stack(losses).double()
        weights = torch.tensor(sizes, dtype=torch.float64)
        mean = float((values * weights).sum() / weights.sum())
        noise = 0.0
        if len(values) > 1:
            var = float((weights * (values - mean) ** 2).sum() / weights.sum())
            noise = math.sqrt(var / len(values))
        return mean, noise


def _hookable(module: nn.Module) -> bool:
    return not isinstance(module, torch.jit.ScriptModule)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A sparse gradient (nn.Embedding(sparse=True)) as the values it holds, else as it is."""
    return t.coalesce().values() if t.is_sparse else t


def _prefixes(name: str) -> list[str]:
    """A module path and its ancestors' paths, innermost first: "a.b.c", "a.b", "a", ""."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _main_tensor(value: Any) -> torch.Tensor | None:
    """The tensor the data rules judge: a tensor as it is; of a tuple, dict or ModelOutput, its
    logits or first tensor (see gradwise.batch.outputs_of)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    from gradwise.batch import outputs_of

    try:
        main, _ = outputs_of(value)
    except Exception:
        return None
    return main if isinstance(main, torch.Tensor) else None


def _covered(name: str, declared: set[str]) -> bool:
    """Whether a parameter name is among ``declared`` names, module paths or globs."""
    return name in declared or any(
        name.startswith(d + ".") or fnmatch.fnmatchcase(name, d) for d in declared
    )


def _check_probe(probe: Any) -> Any:
    """The probe set as given, checked: tensors (inputs..., targets) with as many rows each, a
    mapping batch, or an iterable of batches (a DataLoader)."""
    if probe is None:
        return None
    expected = "(inputs, targets) tensors with as many rows each, a mapping batch or a DataLoader"
    if isinstance(probe, (tuple, list)):
        rows = {t.shape[0] if isinstance(t, torch.Tensor) and t.ndim else None for t in probe}
        if len(probe) < 2 or None in rows or len(rows) != 1 or 0 in rows:
            raise ConfigError("probe", probe, expected)
        return tuple(probe)
    if isinstance(probe, Mapping):
        rows = {v.shape[0] for v in probe.values() if isinstance(v, torch.Tensor) and v.ndim}
        if len(rows) != 1:
            raise ConfigError("probe", probe, expected)
        return probe
    if isinstance(probe, torch.Tensor) or not isinstance(probe, Iterable):
        raise ConfigError("probe", probe, expected, "the targets are needed to measure a loss")
    return probe


def _probe_batches(probe: Any) -> Iterable[Any]:
    """The probe's batches: tensors and mappings in chunks of PROBE_CHUNK rows."""
    if isinstance(probe, tuple):
        for i in range(0, probe[0].shape[0], PROBE_CHUNK):
            yield tuple(t[i : i + PROBE_CHUNK] for t in probe)
    elif isinstance(probe, Mapping):
        n = next(v.shape[0] for v in probe.values() if isinstance(v, torch.Tensor) and v.ndim)
        for i in range(0, n, PROBE_CHUNK):
            yield {
                k: v[i : i + PROBE_CHUNK] if isinstance(v, torch.Tensor) and v.ndim else v
                for k, v in probe.items()
            }
    else:
        yield from probe


def _layers(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Modules that own trainable parameters directly, with those parameters."""
    layers, seen = {}, set()
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        params = [p for p in params if id(p) not in seen]  # a tied weight counts once
        seen.update(id(p) for p in params)
        if params:
            layers[name or type(model).__name__] = params
    return layers


def _last_matrix(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> nn.Parameter | None:
    """The last trainable weight matrix the optimizer updates (so zero_grad clears it); its gradient
    direction varies from batch to batch."""
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]} if optimizer else None
    matrices = [
        p
        for p in model.parameters()
        if p.requires_grad and p.ndim >= 2 and (owned is None or id(p) in owned)
    ]
    return matrices[-1] if matrices else None


def _agreement(grad: torch.Tensor, fresh: torch.Tensor) -> float:
    """Cosine between .grad and this step's fresh gradient (1.0 when both are zero)."""
    a, b = grad.detach().flatten().float(), fresh.flatten().float()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(a @ b) / (na * nb)


def _summed(names: list[str], rows: list[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Pairs of per-name values summed over the ranks."""
    total = torch.stack(rows).sum(0).tolist()
    return {name: (total[2 * i], total[2 * i + 1]) for i, name in enumerate(names)}


def _norms(tensors: list[torch.Tensor]) -> list[float]:
    """L2 norms of many tensors with a single device-to-host copy."""
    if not tensors:
        return []
    return torch.stack([torch.linalg.vector_norm(t.float()).cpu() for t in tensors]).tolist()


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
