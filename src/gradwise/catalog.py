"""The built-in models and data sets with their arguments, and what gradwise passes to your own
factories: ``gradwise models``, ``gradwise datasets`` and docs/reference.md, all from the registries.

Regenerate the page with ``python -m gradwise.catalog`` (a test fails when it is stale).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MARKDOWN = Path(__file__).parents[2] / "docs" / "reference.md"  # in a source checkout

USER_DATA = """\
A data factory named by import path (`data: {name: "mypkg.data:load", kwargs: {...}}`) is called
with exactly the recipe's `data.kwargs` and may return:

- a `gradwise.data.DataBundle` (train, val, DataInfo), used as it is;
- a `(train, val)` pair of `torch.utils.data.Dataset`s (`val` may be None);
- a single `Dataset` (no validation set);
- an `(X, y)` pair of arrays or tensors, which gradwise splits (stratified for class labels) with
  `data.kwargs.val_fraction` (default 0.2) and `data.kwargs.seed` (default 0) when the factory
  accepts them.

Samples are `(input, target)` pairs; the task, classes and vocabulary are read from the targets."""


@dataclass(frozen=True)
class Argument:
    name: str
    annotation: str
    default: str  # "required" when there is none
    from_data: bool  # filled from the data when not given (models only)


@dataclass(frozen=True)
class Entry:
    kind: str  # model | data set
    name: str
    summary: str
    doc: str
    arguments: tuple[Argument, ...]

    def text(self) -> str:
        """The entry as plain text for the terminal."""
        lines = [f"{self.name}: {self.summary}", ""]
        for a in self.arguments:
            default = (
                "filled from the data"
                if a.from_data
                else "required"
                if a.default == "required"
                else f"default {a.default}"
            )
            lines.append(f"  {a.name}: {a.annotation} ({default})")
        if self.doc:
            lines += ["", *(f"  {line}" for line in self.doc.splitlines())]
        return "\n".join(lines)

    def markdown(self) -> str:
        rows = [
            f"| `{a.name}` | `{_cell(a.annotation)}` | "
            f"{'filled from the data' if a.from_data else f'`{_cell(a.default)}`'} |"
            for a in self.arguments
        ]
        table = ["| argument | type | default |", "| --- | --- | --- |", *rows] if rows else []
        body = [f"### `{self.name}`", "", self.summary, "", *table]
        return "\n".join([*body, "", self.doc, ""] if self.doc else [*body, ""])


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe inside a Markdown table cell


def _entry(kind: str, name: str, factory: Callable, size_args: frozenset[str]) -> Entry:
    summary, _, doc = inspect.cleandoc(factory.__doc__ or "").partition("\n")
    arguments = []
    for p in inspect.signature(factory).parameters.values():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        annotation = (
            p.annotation
            if isinstance(p.annotation, str)
            else inspect.formatannotation(p.annotation)
        )
        arguments.append(
            Argument(
                name=p.name,
                annotation="" if p.annotation is p.empty else annotation,
                default="required" if p.default is p.empty else repr(p.default),
                from_data=p.name in size_args,
            )
        )
    return Entry(kind, name, summary.strip(), doc.strip(), tuple(arguments))


def models() -> dict[str, Entry]:
    """The model zoo's entries by name."""
    from gradwise.models import MODELS
    from gradwise.models.build import SIZE_ARGS

    return {name: _entry("model", name, MODELS[name], frozenset(SIZE_ARGS)) for name in MODELS}


def datasets() -> dict[str, Entry]:
    """The built-in data sets by name."""
    from gradwise.data import DATASETS

    return {name: _entry("data set", name, DATASETS[name], frozenset()) for name in DATASETS}


def render() -> str:
    """docs/reference.md."""
    from gradwise.models.build import SIZE_ARGS

    sizes = "\n".join(f"- `{name}`: {meaning}" for name, meaning in SIZE_ARGS.items())
    parts = [
        "# Models and data sets\n",
        "Generated from the registries by `python -m gradwise.catalog`; do not edit by hand. The "
        "same in the terminal: `gradwise models [NAME]`, `gradwise datasets [NAME]`.\n",
        "## Your own model factory\n",
        'A model named by import path (`model: {name: "mypkg.models:build", kwargs: {...}}`) is '
        "called with the recipe's `model.kwargs`, plus each of these arguments that the factory "
        "names and the kwargs do not give, derived from the data:\n",
        sizes + "\n",
        "It must return a `torch.nn.Module` whose outputs fit the task (logits for "
        "classification, raw values for regression).\n",
        "## Your own data factory\n",
        USER_DATA + "\n",
        "## Built-in models\n",
        *(entry.markdown() for entry in models().values()),
        "## Built-in data sets\n",
        *(entry.markdown() for entry in datasets().values()),
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    from gradwise.tracking.files import atomic_write_text

    atomic_write_text(MARKDOWN, render())
    print(f"wrote {MARKDOWN}")
