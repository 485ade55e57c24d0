"""What every doctor shares, whatever it watches: the findings so far, and rules called so that a
failing rule is switched off and reported, never raised into the user's loop.

``gradwise.Doctor`` (hooks on a PyTorch model) and ``gradwise.doctor.numeric.NumericDoctor`` (fed
numbers and arrays by the Keras, JAX, Lightning and Hugging Face integrations) both build on it, so
that a finding is recorded, linked to its cause and reported the same way everywhere.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from gradwise.doctor import dispatch
from gradwise.doctor import rules as _rules  # noqa: F401  (registers every rule)
from gradwise.doctor.findings import (
    RULES,
    Finding,
    Rule,
    When,
    check_codes,
    link_causes,
    sort_findings,
)
from gradwise.doctor.rules import data as data_rules
from gradwise.doctor.signals import Activation, Signals
from gradwise.errors import GradwiseWarning

IMBALANCE_BATCHES = 20  # steps whose targets are pooled before judging class balance (GW103)
DEAD_WINDOW = 5  # batches over which a ReLU unit must stay silent to count as dead (the first
# DEAD_WINDOW steps are all watched, so that a layer dead from the start is named at once)
SATURATION_MARGIN = 0.01  # within 1% of the bounds counts as saturated


class Judging:
    """Findings and guarded rule calls; a subclass sets ``signals`` and calls ``_start_judging``."""

    signals: Signals
    rank: int = 0  # under several ranks rank 0 alone reports
    loss_fn: Callable | None = None

    def _start_judging(
        self, ignore: Iterable[str], on_finding: Callable[[Finding], None] | str | None
    ) -> None:
        self.ignore = set(check_codes(ignore))
        self.on_finding = _print_finding if on_finding == "print" else on_finding
        self._findings: dict[str, Finding] = {}
        self._fired_now: list[Finding] = []
        self._failed: set[str] = set()  # checks switched off after an exception
        self._broken: set[str] = set()  # rules switched off after their check raised
        self._local_codes: dict[str, int] = {}  # fired on this rank since the last exchange
        self._targets_seen: list[torch.Tensor] = []
        self._dead_masks: dict[str, deque] = {}  # per activation: its last units-ever-active

    def _observe_activation(
        self, key: str, kind: str, x: torch.Tensor, family: str | None, unit_dim: int
    ) -> None:
        """Statistics of one activation's output ``x`` (float) at this step: mean and std; for a
        rectifier (family "rectifier") the fraction of units (along ``unit_dim``) silent over the
        last DEAD_WINDOW watched steps, for "sigmoid"/"tanh" the fraction near the bounds."""
        s = self.signals
        stats = s.activations.setdefault(key, Activation(kind))
        stats.mean.append(s.step, float(x.mean()))
        stats.std.append(s.step, float(x.std()) if x.numel() > 1 else 0.0)
        if family == "rectifier":
            active = (x > 0).transpose(unit_dim, -1).reshape(-1, x.shape[unit_dim]).any(0)
            window = self._dead_masks.setdefault(key, deque(maxlen=DEAD_WINDOW))
            window.append(active)
            if len(window) == DEAD_WINDOW:
                ever = torch.stack(list(window)).any(0)
                stats.dead.append(s.step, 1.0 - float(ever.float().mean()))
        elif family == "sigmoid":
            near = (x < SATURATION_MARGIN) | (x > 1 - SATURATION_MARGIN)
            stats.saturated.append(s.step, float(near.float().mean()))
        elif family == "tanh":
            stats.saturated.append(
                s.step, float((x.abs() > 1 - 2 * SATURATION_MARGIN).float().mean())
            )

    def telemetry(self) -> dict:
        """The collected signals in the run directory's ``doctor/telemetry.json`` format."""
        raise NotImplementedError

    def save(self, directory: str | Path, telemetry: bool = True) -> Path:
        """Write ``findings.json`` (and ``telemetry.json``) into ``directory``, a run directory's
        ``doctor/`` (what ``gradwise report`` reads), each file whole or not at all."""
        from gradwise.tracking.files import atomic_write_text

        directory = Path(directory)
        if self.rank != 0:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        findings = [f.to_dict() for f in self.findings]
        atomic_write_text(directory / "findings.json", json.dumps(findings, indent=2))
        if telemetry:
            atomic_write_text(directory / "telemetry.json", json.dumps(self.telemetry()))
        return directory

    def report(self, path: str | Path, **kwargs: Any) -> Path:
        """Write the self-contained HTML report of this run (under several ranks: rank 0 writes,
        the others only return the path)."""
        from gradwise.doctor.report import write_report

        if self.rank != 0:
            return Path(path)
        return write_report(
            path,
            telemetry=self.telemetry(),
            findings=[f.to_dict() for f in self.findings],
            **kwargs,
        )

    @property
    def findings(self) -> list[Finding]:
        """Findings so far, errors first."""
        return sort_findings(self._findings.values())

    def add(self, finding: Finding) -> None:
        """Record a finding made elsewhere (e.g. by preflight checks)."""
        if finding.code not in self.ignore:
            self._record(finding)

    def summary(self) -> str:
        if not self._findings:
            return "gradwise doctor: no findings"
        return "\n".join(["gradwise doctor findings:", *(f"  {f}" for f in self.findings)])

    def _pool_targets(self, step: int, targets: torch.Tensor, outputs: Any) -> None:
        """GW103 needs more than one batch: a single batch is imbalanced by chance. Float targets
        (regression) give the targets' variance instead, the chance level of GW404."""
        if not isinstance(targets, torch.Tensor) or targets.ndim == 0:
            return  # targets of several heads (a dict): no single class balance to judge
        if targets.is_floating_point() and targets.ndim == 2 and targets.shape[1] > 1:
            sums = targets.detach().sum(1)  # one-hot or label-smoothed rows: their classes
            if bool(((sums - 1).abs() < 1e-3).all()) and bool((targets >= 0).all()):
                targets = targets.detach().argmax(1)
        if targets.is_floating_point() and targets.ndim < 2:
            self._targets_seen.append(targets.detach().float().cpu())
            if step == IMBALANCE_BATCHES - 1:
                pooled = torch.cat(self._targets_seen)
                self.signals.target_var = float(pooled.var()) if pooled.numel() > 1 else None
                self._targets_seen.clear()
            return
        if targets.ndim == 1 or (targets.ndim == 2 and not targets.is_floating_point()):
            if targets.ndim == 2 and targets.shape[1] != 1:
                return  # a sequence of labels per sample (tokens, tags): not one class balance
            self._targets_seen.append(targets.detach().reshape(-1).cpu())
        elif targets.ndim == 2:  # multi-label 0/1 rows
            if self._targets_seen and self._targets_seen[0].shape[1:] != targets.shape[1:]:
                return
            self._targets_seen.append(targets.detach().cpu())
        else:
            return
        if step == IMBALANCE_BATCHES - 1 and self._targets_seen:
            pooled = torch.cat([t.reshape(-1, *t.shape[1:]) for t in self._targets_seen])
            classes = (
                outputs.shape[1]
                if isinstance(outputs, torch.Tensor) and outputs.ndim == 2
                else None
            )
            weighted = self.loss_fn is not None and data_rules.loss_is_weighted(self.loss_fn)
            self._judge(data_rules.class_imbalance, pooled, classes, weighted=weighted, step=step)
            if weighted and "GW103" in self._findings:  # weighting is done: metrics come first
                self._findings["GW103"].fixes = data_rules.imbalance_fixes(weighted=True)
            self._targets_seen.clear()

    def _contained(self, what: str) -> contextlib.AbstractContextManager:
        """A failure of the doctor's own measurements is a warning, never an exception in the
        user's loop (and under several ranks never a skipped exchange or step count)."""
        return self._catching(what)

    @contextlib.contextmanager
    def _catching(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self._warn_once(f"step: {what}", f"{what} failed and will be skipped", exc)

    def _warn_once(self, key: str, what: str, exc: Exception) -> None:
        if key in self._failed:
            return
        self._failed.add(key)
        warnings.warn(
            f"gradwise doctor (rank {self.rank}): {what} ({type(exc).__name__}: {exc})",
            GradwiseWarning,
            stacklevel=4,
        )

    def _guarded(self, code: str, check: Callable[[], None], key: str | None = None) -> None:
        """Run a check that feeds rule ``code``; a failure switches the rule off, never raises."""
        key = key or code
        if key in self._failed:
            return
        try:
            check()
        except Exception as exc:
            self._failed.add(key)
            self._rule_failed(RULES[code], exc, self.signals.step)

    def _dispatch(self, when: When, context: dispatch.Context, step: int) -> None:
        dispatch.run(
            when,
            context,
            skip=self.ignore | self._broken,
            on_result=lambda rule, result: self._apply(rule.code, result, step),
            on_failure=lambda rule, exc: self._rule_failed(rule, exc, step),
        )

    def _judge(self, check: Callable, *args: Any, step: int | None = None, **kwargs: Any) -> None:
        """Call one rule's check on measurements made here (a rule dispatched by hand: GW203,
        GW207-GW210, GW213, GW403, GW103), guarded like every dispatch."""
        rule: Rule = check.rule
        step = self.signals.step if step is None else step
        if rule.code in self.ignore or rule.code in self._broken:
            return
        try:
            result = check(*args, **kwargs)
        except Exception as exc:
            self._rule_failed(rule, exc, step)
            return
        self._apply(rule.code, result, step)

    def _rule_failed(self, rule: Rule, exc: Exception, step: int) -> None:
        """A rule's check raised: the rule is off for this run, reported once as an info finding
        under its own code; the user's loop never sees the exception."""
        self._broken.add(rule.code)
        if rule.code in self.ignore or rule.code in self._findings:
            return
        self._record(
            Finding(
                code=rule.code,
                name=rule.name,
                severity="info",
                step=step,
                message=f"the doctor's {rule.code} check failed on this run and is off "
                f"({type(exc).__name__}: {exc}); training is not affected",
                last_step=step,
            )
        )

    def _apply(self, code: str, result: Any, step: int | None = None) -> None:
        if result is None or code in self.ignore:
            return
        message, evidence = result
        self._record(
            RULES[code].finding(self.signals.step if step is None else step, message, evidence)
        )

    def _record(self, finding: Finding) -> None:
        known = self._findings.get(finding.code)
        self._fired_now.append(known or finding)
        if known is not None:
            known.count += 1
            known.last_step = finding.step
            return
        self._findings[finding.code] = finding
        link_causes(self._findings)
        self._local_codes.setdefault(finding.code, finding.step)
        if self.on_finding is not None and self.rank == 0:  # under several ranks rank 0 reports
            self.on_finding(finding)


def _print_finding(finding: Finding) -> None:
    print(f"gradwise doctor: {finding}", file=sys.stderr)
