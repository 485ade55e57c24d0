"""The knowledge base: one Markdown file per technique, with front matter, math, practice and examples.

``gradwise explain TOPIC`` finds an entry by id, title or alias (fuzzy); ``load_entries()`` reads
them all. Entries are data (``entries/*.md``), not strings in code, and every code example in them is
run by the test suite.

File format::

    ---
    id: adamw
    title: AdamW (decoupled weight decay)
    category: optimizers
    aliases: [decoupled weight decay]
    summary: One sentence.
    references: ["Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization, arXiv:1711.05101"]
    gradwise: "optim.name: adamw (the default)"   # optional: where gradwise implements it
    related: [adam, weight-decay]                   # optional: other entry ids
    ---
    ## What it is / ## The math / ## When to use it / ## Trade-offs / ## In gradwise / ## Example

Code blocks whose info string starts with ``python example`` are runnable examples; a
``framework=jax|keras|tensorflow`` attribute marks examples for those frameworks (default: torch).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

from gradwise.errors import ConfigError

ENTRIES = Path(__file__).parent / "entries"
REQUIRED_KEYS = ("id", "title", "category", "summary", "references")
REQUIRED_SECTIONS = ("What it is", "The math", "When to use it", "Trade-offs", "Example")
CATEGORIES = (
    "frameworks",
    "architectures",
    "optimizers",
    "schedules",
    "regularisation",
    "normalisation",
    "initialisation",
    "losses",
    "training",
    "tuning",
    "data",
    "imbalance",
    "metrics",
    "debugging",
    "distributed",
    "deployment",
    "transfer",
    "mlops",
    "generative",
)
_EXAMPLE = re.compile(r"^```python example([^\n]*)\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class Example:
    framework: str  # torch | jax | keras | tensorflow
    code: str


@dataclass(frozen=True)
class Entry:
    id: str
    title: str
    category: str
    summary: str
    references: tuple[str, ...]
    body: str
    path: Path
    aliases: tuple[str, ...] = ()
    gradwise: str | None = None
    related: tuple[str, ...] = ()
    examples: tuple[Example, ...] = field(default=(), repr=False)

    def sections(self) -> list[str]:
        return re.findall(r"^## (.+?)\s*$", self.body, re.M)

    def markdown(self) -> str:
        """The whole entry as Markdown, for the terminal or a page."""
        head = [f"# {self.title}", "", f"*{self.category}* · {self.summary}", ""]
        if self.gradwise:
            head += [f"**In gradwise:** `{self.gradwise}`", ""]
        refs = ["", "## References", "", *(f"- {r}" for r in self.references)]
        related = ["", f"Related: {', '.join(self.related)}"] if self.related else []
        return "\n".join([*head, self.body.strip(), *refs, *related]) + "\n"


def parse(path: Path) -> Entry:
    """Read one entry file; a malformed file raises ConfigError naming the file and the problem."""
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ConfigError(str(path), text[:20], "a file starting with '---' front matter")
    try:
        _, front, body = text.split("---\n", 2)
        meta = yaml.safe_load(front) or {}
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(
            str(path), "<front matter>", "valid YAML between '---' lines", str(exc)
        ) from None
    missing = [k for k in REQUIRED_KEYS if not meta.get(k)]
    if missing:
        raise ConfigError(f"{path.name}: {missing[0]}", None, "a value (required front matter key)")
    if meta["category"] not in CATEGORIES:
        raise ConfigError(
            f"{path.name}: category", meta["category"], f"one of {', '.join(CATEGORIES)}"
        )
    examples = tuple(Example(_framework(info), code) for info, code in _EXAMPLE.findall(body))
    return Entry(
        id=str(meta["id"]),
        title=str(meta["title"]),
        category=meta["category"],
        summary=str(meta["summary"]).strip(),
        references=tuple(meta["references"]),
        body=body,
        path=path,
        aliases=tuple(str(a) for a in meta.get("aliases") or ()),
        gradwise=meta.get("gradwise"),
        related=tuple(meta.get("related") or ()),
        examples=examples,
    )


def _framework(info: str) -> str:
    match = re.search(r"framework=(\w+)", info)
    return match.group(1) if match else "torch"


@cache
def load_entries() -> dict[str, Entry]:
    """Every entry by id."""
    entries = {}
    for path in sorted(ENTRIES.glob("*.md")):
        entry = parse(path)
        entries[entry.id] = entry
    return entries


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def find(topic: str) -> Entry:
    """The entry for ``topic``: exact id/title/alias, then a fuzzy match; ConfigError otherwise."""
    entries = load_entries()
    names: dict[str, str] = {}
    for entry in entries.values():
        for name in (entry.id, entry.title, *entry.aliases):
            names.setdefault(_key(name), entry.id)
    key = _key(topic)
    if key in names:
        return entries[names[key]]
    contains = sorted(
        {eid for name, eid in names.items() if key and (key in name.split() or key in name)}
    )
    if len(contains) == 1:
        return entries[contains[0]]
    close = difflib.get_close_matches(key, list(names), n=3, cutoff=0.75)
    if close and (len(close) == 1 or names[close[0]] == names[close[-1]]):
        return entries[names[close[0]]]
    candidates = contains or [names[c] for c in close]
    hint = (
        f"did you mean: {', '.join(dict.fromkeys(candidates))}?"
        if candidates
        else "gradwise explain --list shows every topic"
    )
    raise ConfigError("topic", topic, "a known topic or rule code", hint)
