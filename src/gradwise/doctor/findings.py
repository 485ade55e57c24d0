"""Findings and the rule registry: every rule has a stable code, a name, a severity and a page.

Like a linter's rules: codes never change meaning and are never renumbered; a rule's docstring is its
documentation page (``gradwise explain GW302``, ``docs/doctor.md``); any rule can be ignored by code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]
Stage = Literal["preflight", "live", "validation"]
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.code} {self.name} ({self.severity}, step {self.step}): {self.message}"


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
        if self.references:
            lines += ["", "**References:**", ""] + [f"- {ref}" for ref in self.references]
        return "\n".join(lines) + "\n"


RULES: dict[str, Rule] = {}


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
) -> Callable[[Callable], Callable]:
    """Register the decorated function as rule ``code``; its docstring is the rule's page."""

    def decorator(fn: Callable) -> Callable:
        if code in RULES:
            raise ValueError(f"rule {code} is already registered")
        summary, _, doc = (fn.__doc__ or "").strip().partition("\n")
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
        )
        return fn

    return decorator


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
    """Errors first, then by the step they were first seen."""
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.step, f.code))
