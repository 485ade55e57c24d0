"""Search spaces: which recipe settings a tuner varies, over what range, and under which condition.

A space is YAML (or a dict) keyed by recipe settings, by dotted path or by the bare names the Recipe
accepts (``lr``, ``epochs``); model and data factory arguments go through ``model.kwargs.<arg>``::

    optim.lr: {type: log_uniform, low: 1.0e-4, high: 1.0e-1}
    data.batch_size: {type: categorical, choices: [16, 32, 64]}   # or just [16, 32, 64]
    train.epochs: {type: int, low: 2, high: 8, step: 2}
    optim.name: {type: categorical, choices: [adamw, sgd]}
    optim.momentum: {type: uniform, low: 0.8, high: 0.99, when: {optim.name: sgd}}

Everything is checked against the recipe when the space is parsed (unknown settings with a
did-you-mean, bounds the recipe would reject, log scales over non-positive numbers, conditions on
unknown parameters), so a bad space fails before any trial starts. This module imports no Optuna:
:meth:`SearchSpace.sample` only calls a trial's ``suggest_*`` methods.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from gradwise.errors import ConfigError, did_you_mean
from gradwise.recipe import Recipe, load_yaml, override_paths

# type name -> (kind of parameter, log scale); "log: true" may also switch uniform and int to log
TYPES: dict[str, tuple[str, bool]] = {
    "uniform": ("float", False),
    "log_uniform": ("float", True),
    "int": ("int", False),
    "categorical": ("categorical", False),
}
KEYS: dict[str, tuple[str, ...]] = {  # the keys each kind of parameter takes, besides type
    "float": ("low", "high", "step", "log", "when"),
    "int": ("low", "high", "step", "log", "when"),
    "categorical": ("choices", "when"),
}
SCALAR = (bool, int, float, str, type(None))  # what Optuna stores as a categorical choice


@dataclass(frozen=True)
class Param:
    """One searched setting: its recipe path, distribution and (optional) condition."""

    path: str  # canonical dotted recipe path, also the Optuna parameter name
    kind: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # path -> allowed values

    @property
    def labels(self) -> tuple[Any, ...]:
        """Categorical choices as Optuna stores them: lists and dicts become their YAML text."""
        return tuple(c if isinstance(c, SCALAR) else _flow(c) for c in self.choices)

    def value(self, stored: Any) -> Any:
        """The recipe value of a stored (Optuna) value: a label back to its list or dict."""
        if self.kind == "categorical" and stored in self.labels:
            return self.choices[self.labels.index(stored)]
        return stored

    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial for a value of this parameter."""
        if self.kind == "categorical":
            return self.value(trial.suggest_categorical(self.path, list(self.labels)))
        if self.kind == "int":
            return trial.suggest_int(
                self.path, self.low, self.high, step=self.step or 1, log=self.log
            )
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)

    def active(self, values: dict[str, Any]) -> bool:
        """Whether the condition holds for the values sampled so far."""
        return all(values.get(path, _UNSET) in allowed for path, allowed in self.when.items())

    def grid(self) -> list[Any]:
        """Every value of a discrete parameter (for grid search)."""
        if self.kind == "categorical":
            return list(self.labels)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise ConfigError(
                f"sampler grid: {self.path}",
                self.to_dict(),
                "discrete values (categorical, int, or a range with a step)",
                "grid search cannot enumerate a continuous range",
            )
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            out: dict[str, Any] = {"type": "categorical", "choices": list(self.choices)}
        else:
            out = {"type": "int" if self.kind == "int" else "uniform"}
            if self.kind == "float" and self.log:
                out["type"] = "log_uniform"
            out |= {"low": self.low, "high": self.high}
            if self.step is not None:
                out["step"] = self.step
            if self.kind == "int" and self.log:
                out["log"] = True
        if self.when:
            out["when"] = {k: v[0] if len(v) == 1 else list(v) for k, v in self.when.items()}
        return out


_UNSET = object()  # a parameter not sampled (its own condition was false)


@dataclass
class SearchSpace:
    """The parameters of a search, ordered so that every condition's parameter comes first."""

    params: list[Param]

    def __iter__(self):
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, path: str) -> Param:
        return next(p for p in self.params if p.path == path)

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.params]

    def sample(self, trial: Any) -> dict[str, Any]:
        """Recipe overrides for one trial: each active parameter suggested by ``trial``."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(values):
                values[p.path] = p.suggest(trial)
        return values

    def values(self, stored: dict[str, Any]) -> dict[str, Any]:
        """Recipe overrides from a finished trial's stored parameters."""
        by_path = {p.path: p for p in self.params}
        return {k: by_path[k].value(v) if k in by_path else v for k, v in stored.items()}

    def grid(self) -> dict[str, list[Any]]:
        """The search space of Optuna's GridSampler: every value of every parameter."""
        return {p.path: p.grid() for p in self.params}

    def to_dict(self) -> dict[str, Any]:
        return {p.path: p.to_dict() for p in self.params}

    def to_yaml(self) -> str:
        lines = [
            f"{path}: {_flow(spec)}\n" for path, spec in self.to_dict().items()
        ]  # one flow mapping per line, as people write spaces
        return "".join(lines)


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1000).strip()


# -- a proposed space -------------------------------------------------------------------------

DROPOUT_RANGE = (0.0, 0.5)
WARMUP_MAX = 0.3  # fraction of the steps


def propose_space(
    recipe: Recipe | dict | str | Path | None = None, probe: bool = False
) -> tuple[SearchSpace, Recipe]:
    """A search space around the advised recipe, and that recipe (the trials' starting point).

    Learning rate a decade either side of the advice (or of the learning-rate range test's value
    with ``probe``), weight decay a decade either side, half and twice the batch size, warmup up to
    twice the advice, and dropout when the model takes it: the settings that matter most in
    practice (Bergstra & Bengio 2012; Godbole et al. 2023, Deep Learning Tuning Playbook).
    Settings a recipe file or dict names stay as given; a Recipe object is advised in full.
    """
    from gradwise.assemble import advise

    if isinstance(recipe, Path):  # the advisor keeps the settings a file names (given as str)
        recipe = str(recipe)
    advised = advise(recipe=recipe, probe=probe)
    r = advised.recipe
    space: dict[str, Any] = {}
    lr = r.optim.lr
    space["optim.lr"] = {"type": "log_uniform", "low": _round(lr / 10), "high": _round(lr * 10)}
    wd = r.optim.weight_decay
    low, high = (wd / 10, min(wd * 10, 1.0)) if wd > 0 else (1e-5, 0.1)
    space["optim.weight_decay"] = {"type": "log_uniform", "low": _round(low), "high": _round(high)}
    bs = r.data.batch_size
    sizes = sorted({max(1, bs // 2), bs, bs * 2})
    fitting = [b for b in sizes if b <= max(advised.facts.n_samples, 1)] or [bs]
    if len(fitting) > 1:
        space["data.batch_size"] = {"type": "categorical", "choices": fitting}
    warmup = r.schedule.warmup
    if r.schedule.name == "warmup_cosine":
        if warmup < 1:
            top = round(min(WARMUP_MAX, max(0.1, 2 * warmup)), 3)
            space["schedule.warmup"] = {"type": "uniform", "low": 0.0, "high": top}
        else:
            space["schedule.warmup"] = {"type": "int", "low": 0, "high": int(2 * warmup)}
    if "dropout" in (_factory_arguments("model", r) or []):
        low, high = DROPOUT_RANGE
        space["model.kwargs.dropout"] = {"type": "uniform", "low": low, "high": high}
    return parse_space(space, r, "proposed space"), r


def _round(x: float) -> float:
    return float(f"{x:.2g}")


# -- parsing ----------------------------------------------------------------------------------


def load_space(
    source: str | Path | dict | SearchSpace, recipe: Recipe, name: str = "space"
) -> SearchSpace:
    """A SearchSpace from a YAML file, a dict or a SearchSpace, checked against ``recipe``."""
    if isinstance(source, SearchSpace):
        return parse_space(source.to_dict(), recipe, name)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError("--space", str(path), "an existing YAML file with a search space")
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))  # no alias bomb hangs
        return parse_space(data, recipe, str(path))
    return parse_space(source, recipe, name)


def parse_space(
    data: Any, recipe: Recipe, source: str = "space", *, trusted: bool = True
) -> SearchSpace:
    """Validate a space mapping; every problem is a ConfigError naming the parameter and key.

    ``trusted=False`` (a recipe read back from a study's storage) never imports the modules its
    import paths name to check factory arguments (see :mod:`gradwise.trust`).
    """
    if not isinstance(data, dict) or not data:
        raise ConfigError(source, data, "a mapping of recipe settings to ranges, e.g. optim.lr")
    params: dict[str, Param] = {}
    raw_when: dict[str, Any] = {}
    for key, spec in data.items():
        path = _path(str(key), recipe, source, trusted)
        if path in params:
            raise ConfigError(f"{source}: {key}", spec, "each setting once", f"{path} is repeated")
        param, raw_when[path] = _param(path, str(key), spec, recipe, source)
        params[path] = param
    for path, when in raw_when.items():
        if when is not None:
            params[path] = _with_condition(params[path], when, params, recipe, source)
    return SearchSpace(_ordered(params, source))


def _path(key: str, recipe: Recipe, source: str, trusted: bool) -> str:
    """The canonical dotted path of a setting named in the space (did-you-mean when unknown)."""
    try:
        (path,) = override_paths({key: 0})
    except ConfigError as exc:
        raise ConfigError(f"{source}: {key}", key, exc.expected, exc.hint) from None
    parts = path.split(".")
    sections = {n for n, f in Recipe.model_fields.items() if _is_section(f.annotation)}
    if parts[0] in sections and len(parts) == 1:
        raise ConfigError(f"{source}: {key}", key, f"one setting of {key!r}, e.g. {key}.<field>")
    if len(parts) >= 3 and parts[1] != "kwargs":
        raise ConfigError(f"{source}: {key}", key, "a recipe setting such as optim.lr")
    if parts[1:2] == ["kwargs"]:
        if len(parts) != 3:
            raise ConfigError(
                f"{source}: {key}", key, f"one factory argument: {parts[0]}.kwargs.<argument>"
            )
        _check_factory_argument(parts[0], parts[2], recipe, source, trusted)
    return path


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and hasattr(annotation, "model_fields")


def _factory_arguments(section: str, recipe: Recipe, trusted: bool = True) -> list[str] | None:
    """The arguments of the model or data factory the recipe names; None when anything goes."""
    from gradwise.registry import resolve

    if section == "model":
        from gradwise.models import MODELS as registry
    else:
        from gradwise.data import DATASETS as registry
    try:
        factory = resolve(
            registry, getattr(recipe, section).name, f"{section}.name", trusted=trusted
        )
        params = inspect.signature(factory).parameters
    except (ConfigError, TypeError, ValueError):
        return None  # the recipe check reports a bad factory; without a signature anything goes
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL]


def _check_factory_argument(
    section: str, argument: str, recipe: Recipe, source: str, trusted: bool
) -> None:
    """model.kwargs.X / data.kwargs.X must be an argument the named factory takes."""
    named = _factory_arguments(section, recipe, trusted)
    if named is None or argument in named:
        return
    name = getattr(recipe, section).name
    hint = did_you_mean(argument, named) or f"{name} accepts: {', '.join(named)}"
    raise ConfigError(
        f"{source}: {section}.kwargs.{argument}", argument, f"an argument of {name!r}", hint
    )


def _param(path: str, key: str, spec: Any, recipe: Recipe, source: str) -> tuple[Param, Any | None]:
    where = f"{source}: {key}"
    if isinstance(spec, list):  # shorthand: a list of choices
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(
            where, spec, "a mapping like {type: log_uniform, low: 1e-4, high: 1e-1} or a list"
        )
    type_name = spec.get("type")
    if type_name not in TYPES:
        hint = (did_you_mean(str(type_name), TYPES) if type_name else None) or (
            f"types: {', '.join(TYPES)}"
        )
        raise ConfigError(f"{where}.type", type_name, f"one of {', '.join(TYPES)}", hint)
    kind, log = TYPES[type_name]
    for k in spec:
        if k != "type" and k not in KEYS[kind]:
            hint = did_you_mean(str(k), KEYS[kind]) or f"{type_name} takes: {', '.join(KEYS[kind])}"
            raise ConfigError(f"{where}.{k}", spec[k], f"a key of a {type_name} parameter", hint)
    when = spec.get("when")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices", choices, "a non-empty list of values")
        labels = [c if isinstance(c, SCALAR) else _flow(c) for c in choices]
        if len(set(map(repr, labels))) != len(labels):
            raise ConfigError(f"{where}.choices", choices, "distinct values")
        for i, choice in enumerate(choices):
            _check_value(path, choice, recipe, f"{where}.choices[{i}]")
        return Param(path, kind, choices=tuple(choices)), when
    log = bool(spec.get("log", log))
    low, high, step = spec.get("low"), spec.get("high"), spec.get("step")
    number = int if kind == "int" else (int, float)
    expected = "an integer" if kind == "int" else "a number"
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, number):
            raise ConfigError(f"{where}.{name}", value, expected)
    if low > high:
        raise ConfigError(f"{where}.low", low, f"at most high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{where}.low", low, "a positive number on a log scale")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
            raise ConfigError(f"{where}.step", step, f"a positive {expected.split()[-1]}")
        if log:
            raise ConfigError(f"{where}.step", step, "no step on a log scale (Optuna's rule)")
    current = recipe.flat().get(path)
    if kind == "float" and isinstance(current, int) and not isinstance(current, bool):
        raise ConfigError(
            f"{where}.type", type_name, f"int or categorical: {path} is an integer setting"
        )
    _check_value(path, low, recipe, f"{where}.low")
    _check_value(path, high, recipe, f"{where}.high")
    return Param(path, kind, low=low, high=high, step=step, log=log), when


def _check_value(path: str, value: Any, recipe: Recipe, where: str) -> None:
    """The recipe must accept ``value`` at ``path`` (e.g. a learning rate must be > 0)."""
    try:
        recipe.override({path: value})
    except ConfigError as exc:
        raise ConfigError(where, value, exc.expected, exc.hint) from None


def _with_condition(
    param: Param, when: Any, params: dict[str, Param], recipe: Recipe, source: str
) -> Param:
    where = f"{source}: {param.path}.when"
    if not isinstance(when, dict) or not when:
        raise ConfigError(where, when, "a mapping of a categorical parameter to its value(s)")
    condition: dict[str, tuple[Any, ...]] = {}
    for key, allowed in when.items():
        try:
            (path,) = override_paths({str(key): 0})
        except ConfigError:
            path = str(key)
        other = params.get(path)
        if other is None or path == param.path:
            hint = did_you_mean(str(key), [p for p in params if p != param.path])
            raise ConfigError(
                f"{where}", key, "another (categorical) parameter of this space", hint
            ) from None
        if other.kind != "categorical":
            raise ConfigError(
                f"{where}.{key}", allowed, f"a categorical parameter ({path} is {other.kind})"
            )
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        for value in values:
            if value not in other.choices:
                raise ConfigError(f"{where}.{key}", value, f"one of {list(other.choices)}")
        condition[path] = values
    return replace(param, when=condition)


def _ordered(params: dict[str, Param], source: str) -> list[Param]:
    """Parameters in file order, moved after the parameters their conditions depend on."""
    done: dict[str, Param] = {}
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in done:
            return
        if path in visiting:
            raise ConfigError(f"{source}: {path}.when", path, "conditions without a cycle")
        visiting.add(path)
        for dependency in params[path].when:
            visit(dependency)
        visiting.discard(path)
        done[path] = params[path]

    for path in params:
        visit(path)
    return list(done.values())
