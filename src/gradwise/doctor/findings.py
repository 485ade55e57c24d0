"""Findings and the rule registry: every rule has a stable code, a name, a severity and a page.

Like a linter's rules: codes never change meaning and are never renumbered; a rule's docstring is its
documentation page (``gradwise explain GW302``, ``docs/doctor.md``); any rule can be ignored by code.

A rule declares what it reads by its parameters' names (``inputs``, ``outputs``, ``loss_graph``,
``signals``, ... : the fields of :class:`gradwise.doctor.dispatch.Context`) and when it runs
(``when``); :mod:`gradwise.doctor.dispatch` calls every rule whose time has come and whose
required fields are present, in the live Doctor and in preflight alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]
Stage = Literal["preflight", "live", "validation"]
When = Literal["first", "batch", "early", "sample", "activations", "validate", "manual"]
"""When the dispatcher runs a rule: "first" the first step (and preflight); "batch" every early and
every sampled step; "early" the first few steps (and preflight's probe batch); "sample" the sampled steps; "activations" whenever
new activation statistics are complete (the end of the first window of steps, and sampled steps); "validate" at each
``Doctor.validate``; "manual" only where its measurement is made (the Doctor's own collection)."""
WHEN_OF_STAGE: dict[str, When] = {"preflight": "early", "live": "sample", "validation": "validate"}
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass
class Finding:
    """One diagnosis: what went wrong, where (step), the numbers behind it, and what to do."""

    code: str
    name: str
    severity: Severity
    step: int
    message: str
    evidence: dict[str, float] = field(default_factory=dict)
    fixes: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    count: int = 1  # how many times the rule fired (a finding is reported once, then counted)
    last_step: int | None = None
    explained_by: str | None = None  # the code of a root-cause finding that explains this one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        cause = f" [a consequence of {self.explained_by}]" if self.explained_by else ""
        return f"{self.code} {self.name} ({self.severity}, step {self.step}): {self.message}{cause}"


@dataclass(frozen=True)
class Rule:
    """A registered rule. ``check`` returns ``(message, evidence)`` when the fault is present."""

    code: str
    name: str
    severity: Severity
    stage: Stage
    summary: str  # the first line of the docstring
    doc: str  # the rest of the docstring: why it matters, how it is detected
    fixes: tuple[str, ...]
    references: tuple[str, ...]
    check: Callable[..., tuple[str, dict[str, float]] | None] | None = None
    when: When = "manual"
    needs: tuple[str, ...] = ()  # required parameters: the rule runs only when all are present
    reads: tuple[str, ...] = ()  # every parameter, by name
    defaulted: tuple[str, ...] = ()  # parameters with a default (left out when the field is None)
    explains: tuple[str, ...] = ()  # symptoms this root cause explains (reported below it)

    def finding(self, step: int, message: str, evidence: dict[str, float]) -> Finding:
        return Finding(
            code=self.code,
            name=self.name,
            severity=self.severity,
            step=step,
            message=message,
            evidence={k: float(v) for k, v in evidence.items()},
            fixes=list(self.fixes),
            references=list(self.references),
            last_step=step,
        )

    def page(self) -> str:
        """The rule's documentation page in Markdown."""
        lines = [
            f"## {self.code} {self.name}",
            "",
            f"*{self.severity}, {self.stage}*: {self.summary}",
            "",
        ]
        if self.doc:  # the docstring's sections sit one level below the rule's heading
            lines += [_demote(self.doc), ""]
        lines += ["**Fixes, in order:**", ""] + [
            f"{i}. {fix}" for i, fix in enumerate(self.fixes, 1)
        ]
        from gradwise.doctor.frameworks import where_not_checked

        lines += ["", f"**Where it runs:** {_where(where_not_checked(self.code))}"]
        if self.references:
            lines += ["", "**References:**", ""] + [f"- {ref}" for ref in self.references]
        return "\n".join(lines) + "\n"


RULES: dict[str, Rule] = {}


def _where(missing: dict[str, str]) -> str:
    """Where a rule runs, in words: everywhere, or everywhere but some integrations, with why."""
    everywhere = "plain PyTorch loops, gradwise's Trainer, Lightning, the Hugging Face Trainer"
    if not missing:
        return everywhere + ", Keras and JAX."
    others = [fw for fw in ("keras", "jax") if fw not in missing]
    names = {"keras": "Keras", "jax": "JAX"}
    ran = everywhere + "".join(f", {names[fw]}" for fw in others) + "."
    reasons: dict[str, list[str]] = {}
    for fw, reason in missing.items():
        reasons.setdefault(reason, []).append(names.get(fw, fw))
    return ran + "".join(f" Not in {' or '.join(fws)}: it {r}." for r, fws in reasons.items())


def _demote(markdown: str) -> str:
    return "\n".join(
        "#" + line if line.startswith("## ") else line for line in markdown.splitlines()
    )


def rule(
    code: str,
    name: str,
    severity: Severity,
    stage: Stage,
    *,
    fixes: Iterable[str],
    references: Iterable[str] = (),
    when: When | None = None,
    explains: Iterable[str] = (),
) -> Callable[[Callable], Callable]:
    """Register the decorated function as rule ``code``; its docstring is the rule's page.

    when: see :data:`When` (default: from the stage). explains: codes of the symptoms this rule's
    fault causes: when both fire, the report leads with this one and names it on them.
    """

    def decorator(fn: Callable) -> Callable:
        if code in RULES:
            raise ValueError(f"rule {code} is already registered")
        summary, _, doc = (fn.__doc__ or "").strip().partition("\n")
        params = list(inspect.signature(fn).parameters.values())
        RULES[code] = Rule(
            code=code,
            name=name,
            severity=severity,
            stage=stage,
            summary=summary.strip(),
            doc=_dedent(doc),
            fixes=tuple(fixes),
            references=tuple(references),
            check=fn,
            when=when or WHEN_OF_STAGE[stage],
            needs=tuple(p.name for p in params if p.default is p.empty and not _optional(p)),
            reads=tuple(p.name for p in params),
            defaulted=tuple(p.name for p in params if p.default is not p.empty),
            explains=tuple(explains),
        )
        fn.rule = RULES[code]  # call sites pass the function; its code comes with it
        return fn

    return decorator


def _optional(param: inspect.Parameter) -> bool:
    """A parameter typed ``X | None`` accepts a missing field (the rule judges what it has)."""
    annotation = param.annotation
    return "None" in (annotation if isinstance(annotation, str) else repr(annotation))


def _dedent(text: str) -> str:
    import textwrap

    return textwrap.dedent(text).strip()


def check_codes(codes: Iterable[str], field: str = "ignore") -> tuple[str, ...]:
    """Validate rule codes a user wants to ignore (a typo must not silently ignore nothing)."""
    from gradwise.errors import ConfigError, did_you_mean

    codes = tuple(codes)
    for code in codes:
        if code not in RULES:
            raise ConfigError(field, code, "a rule code such as GW302", did_you_mean(code, RULES))
    return codes


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Errors first, then by the step they were first seen; a finding explained by another comes
    right after its cause, whatever its own severity (the report leads with the cause)."""
    ordered = sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.step, f.code))
    codes = {f.code for f in ordered}
    out: list[Finding] = []

    def place(finding: Finding) -> None:
        out.append(finding)
        for symptom in ordered:
            if symptom.explained_by == finding.code and symptom not in out:
                place(symptom)

    for finding in ordered:
        if finding.explained_by not in codes or finding.explained_by == finding.code:
            place(finding)
    out += [f for f in ordered if f not in out]  # a cycle of explanations: keep them all
    return out


def link_causes(findings: dict[str, Finding]) -> None:
    """Mark each finding whose fault another present finding's rule explains (see ``explains``)."""
    for cause in findings.values():
        rule = RULES.get(cause.code)
        if rule is None or cause.severity == "info":
            continue
        for code in rule.explains:
            symptom = findings.get(code)
            if symptom is not None and symptom.explained_by is None:
                symptom.explained_by = cause.code
