"""Fuzzing recipes: hundreds of damaged example recipes through ``gradwise recipe`` and ``gradwise
train``. Each must end with exit 0, or exit 2 and one ``error:`` line, no traceback, in time.

The mutations are seeded, so every run tries the same recipes. They start from examples/*.yaml and
delete keys, swap value types (text, empty text, unicode, numbers huge, negative and tiny, lists,
mappings, null, booleans), add unknown keys, give the model and data factories wrong arguments,
duplicate keys, damage the YAML syntax and add aliases (billion laughs among them). The cases run
in two worker processes at once (CI's two cores) that import gradwise once and call the real entry
point, ``main()``; the test restarts a worker when a case hangs. A valid mutant trains one step on its
(small) data.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import gradwise_cli

from gradwise.cli import main
from gradwise.errors import ConfigError
from gradwise.recipe import Recipe, load_recipe

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where there: fast
Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
MUTANTS_PER_EXAMPLE = 35  # with the edge cases, 308 recipes: the suite stays inside its budget
CASE_TIMEOUT_S = 60.0
WORKERS = 2  # worker processes at once: CI has two cores, and pytest itself uses one
FAST = ["--set", "train.max_steps=1", "--set", "tracking.mlflow=false"]
FAST += ["--set", "tracking.tensorboard=false", "--set", "tracking.root=runs", "-q"]

VALUES = [
    "", "abc", "δ🙂 ünïcode", "x" * 100_000, 0, -1, 7, 10**30, -(10**30), 0.5, -2.5, 1e-300,
    1e308, [], [1, 2], ["a", None], {}, {"a": 1}, None, True, False,
]  # fmt: skip
KWARGS = [  # arguments of zoo models and built-in data sets, and some that are not
    "dropout", "hidden", "activation", "norm", "channels", "d_model", "n_heads", "n_layers",
    "pos", "mlp", "tie_weights", "max_seq_len", "seed", "val_fraction", "seq_len", "stride",
    "flatten", "encoding", "path", "colour",
]  # fmt: skip
NAMES = {"model": ["mlp", "cnn", "gpt", "rnn", "resnet", "transformer", "nope", "os:system"]}
NAMES["data"] = ["digits", "iris", "text", "diabetes", "csv", "nope", "json:loads"]
FIELDS = sorted(Recipe().flat())
BOMB = [f"{n}: &{n} [" + ", ".join([f"*{p}" if p else '"x"'] * 9) + "]" for p, n in
        zip(["", *"abcdefgh"], "abcdefghi", strict=True)]  # fmt: skip


# -- mutations ----------------------------------------------------------------------------------


def _paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a nested mapping."""
    out = []
    for key, value in tree.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out += _paths(value, (*prefix, key))
    return out


def _parent(tree: dict, path: tuple) -> dict:
    for key in path[:-1]:
        tree = tree[key]
    return tree


def _delete(tree: dict, rng: random.Random) -> None:
    path = rng.choice(_paths(tree))
    del _parent(tree, path)[path[-1]]


def _swap(tree: dict, rng: random.Random) -> None:
    path = rng.choice(_paths(tree))
    _parent(tree, path)[path[-1]] = copy.deepcopy(rng.choice(VALUES))


def _unknown(tree: dict, rng: random.Random) -> None:
    mappings = [()] + [p for p in _paths(tree) if isinstance(_parent(tree, p)[p[-1]], dict)]
    target = tree
    for key in rng.choice(mappings):
        target = target[key]
    target[rng.choice(["colour", "lr", "epoch", "optim", "kwargs", "ünknown"])] = 1


def _kwarg(tree: dict, rng: random.Random) -> None:
    section = tree.setdefault(rng.choice(["model", "data"]), {})
    if not isinstance(section, dict):
        return
    kwargs = section.setdefault("kwargs", {})
    if isinstance(kwargs, dict):
        kwargs[rng.choice(KWARGS)] = copy.deepcopy(rng.choice(VALUES))


def _field(tree: dict, rng: random.Random) -> None:
    """Any setting of the Recipe (most are not in the examples), set to a random value."""
    *sections, key = rng.choice(FIELDS).split(".")
    target = tree
    for section in sections:
        if not isinstance(target.get(section), dict):
            target[section] = {}
        target = target[section]
    target[key] = copy.deepcopy(rng.choice(VALUES))


def _rename(tree: dict, rng: random.Random) -> None:
    section = rng.choice(["model", "data"])
    if isinstance(tree.get(section), dict):
        tree[section]["name"] = rng.choice(NAMES[section])


def _duplicate(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    i = rng.randrange(len(lines))
    return "\n".join([*lines[: i + 1], lines[i], *lines[i + 1 :]]) + "\n"


def _damage(text: str, rng: random.Random) -> str:
    i = rng.randrange(len(text))
    kind = rng.randrange(4)
    if kind == 0:
        return text[:i] + text[i + 1 :]
    if kind == 1:
        return text[:i] + rng.choice(":[]{}&*!|>%@`\t\"',-?#") + text[i:]
    if kind == 2:
        return text[:i]
    lines = text.splitlines()
    j = rng.randrange(len(lines))
    lines[j] = " " + lines[j]
    return "\n".join(lines) + "\n"


def _alias(text: str, rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:  # billion laughs, used by a typed field
        return "\n".join(BOMB) + "\n" + text + "seed: *i\n"
    if kind == 1:  # billion laughs in the model's kwargs
        bomb = "\n".join("    " + line for line in BOMB)
        return text + f"model:\n  name: mlp\n  kwargs:\n{bomb}\n"
    if kind == 2:
        return text + "seed: *nowhere\n"
    if kind == 3:
        return text + "extra: &r [*r]\n"
    if kind == 4:  # a harmless anchor and alias
        return text.replace("batch_size: 32", "batch_size: &b 32") + "name: *b\n"
    return "a: " + "[" * 3000 + "]" * 3000 + "\n" + text  # very deep nesting


TREE_MUTATIONS = [_delete, _swap, _unknown, _kwarg, _kwarg, _field, _field, _rename]
TEXT_MUTATIONS = [_duplicate, _damage, _alias]


@functools.cache
def _example(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=Loader)


def _dump(tree: dict) -> str:
    return yaml.dump(tree, Dumper=Dumper, sort_keys=False, allow_unicode=True)


def mutant(example: Path, index: int) -> str:
    """The ``index``-th mutant of ``example``: 1-3 seeded mutations of its tree or text."""
    rng = random.Random(f"{example.name}-{index}")
    tree = copy.deepcopy(_example(example))
    for _ in range(rng.randint(1, 2)):
        rng.choice(TREE_MUTATIONS)(tree, rng)
    text = _dump(tree)
    if rng.random() < 0.4:
        text = rng.choice(TEXT_MUTATIONS)(text, rng)
    return text


# -- running the cases --------------------------------------------------------------------------

_WORKER = """
import contextlib, functools, io, json, os, sys, time, traceback
os.environ["GRADWISE_DEBUG"] = "0"
import typer.main
from gradwise.cli import main
from gradwise.errors import ConfigError
from gradwise.recipe import Recipe, load_recipe
# main() builds the click command from gradwise's typer app at each call (20 ms, half of a refusal);
# a real process calls it once, so build it once here too: parsing and running stay per case
typer.main.get_command = functools.cache(typer.main.get_command)
real_stdout = sys.stdout
for line in sys.stdin:
    case = json.loads(line)
    os.chdir(case["cwd"])
    sys.argv = ["gradwise", *case["args"]]
    out, err = io.StringIO(), io.StringIO()
    start = time.process_time()  # CPU time: other work on the machine does not count
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
            code = "uncaught"
    result = {"code": code, "out": out.getvalue()[-2000:], "err": err.getvalue()[-4000:]}
    result["seconds"] = time.process_time() - start
    real_stdout.write(json.dumps(result) + "\\n")
    real_stdout.flush()
"""


class Worker:
    """One process that runs many CLI invocations through ``main()``; restarted after a hang.

    Use as a context manager: the process (and any data-loader processes it started) is killed
    at the end.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, args: list[str], cwd: Path, timeout: float = CASE_TIMEOUT_S) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True,
            )  # fmt: skip
        self.proc.stdin.write(json.dumps({"args": args, "cwd": str(cwd)}) + "\n")
        self.proc.stdin.flush()
        start = time.monotonic()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 15)  # + import time
        if not ready:
            self.close()
            return {"code": "timeout", "out": "", "err": "", "seconds": time.monotonic() - start}
        line = self.proc.stdout.readline()
        if not line:  # the worker died (killed for memory, a crash in native code)
            self.close()
            return {"code": "died", "out": "", "err": "", "seconds": time.monotonic() - start}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@dataclass
class Outcome:
    case: str
    command: str
    code: object
    err: str
    seconds: float

    def problem(self) -> str | None:
        """What is wrong with this outcome, or None."""
        if self.code == 0:
            return None
        if self.code != 2:
            return f"exit {self.code}"
        if "Traceback" in self.err:
            return "traceback"
        lines = self.err.rstrip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        if len(errors) != 1 or not lines[-1].startswith("error:"):
            return "not one error line"
        if len(errors[0]) > 2000:
            return f"an error line of {len(errors[0])} characters"
        return None


def _run_case(worker: Worker, name: str, text: str, folder: Path) -> list[Outcome]:
    case_dir = folder / name
    case_dir.mkdir()
    (case_dir / "recipe.yaml").write_text(text, encoding="utf-8")
    outcomes = []
    for command, args in (
        ("recipe", ["recipe", "recipe.yaml"]),
        ("train", ["train", "recipe.yaml", *FAST]),
    ):
        r = worker.run(args, case_dir)
        outcomes.append(Outcome(name, command, r["code"], r["err"], r["seconds"]))
    return outcomes


def _report(outcomes: list[Outcome]) -> str:
    lines = []
    for o in outcomes:
        problem = o.problem()
        if problem:
            last = o.err.strip().splitlines()[-1][:200] if o.err.strip() else ""
            lines.append(f"{o.case} {o.command}: {problem} ({o.seconds:.1f}s): {last}")
    return "\n".join(lines)


# each setting is also tried with 10**30 (the value that found most bugs) and one of the others, in
# turn, so every value meets every kind of setting across the fields while CI stays short
EDGES = [10**30, -1, 0, "", None, "y" * 300]


def edge_case(field: str, value: object, example: Path) -> str:
    """``example`` with one setting (a dotted path) set to ``value``."""
    tree = copy.deepcopy(_example(example))
    *sections, key = field.split(".")
    target = tree
    for section in sections:
        target = target.setdefault(section, {})
    target[key] = value
    return _dump(tree)


def _cases() -> list[tuple[str, str]]:
    """Seeded random mutants of each example, then every setting with each edge value."""
    random_cases = [
        (f"{example.stem}-{i:03d}", mutant(example, i))
        for example in EXAMPLES
        for i in range(MUTANTS_PER_EXAMPLE)
    ]
    rest = len(EDGES) - 1
    edges = [
        (f"edge-{field}-{j}", edge_case(field, EDGES[j], EXAMPLES[(i + j) % len(EXAMPLES)]))
        for i, field in enumerate(FIELDS)
        for j in (0, 1 + i % rest)
    ]
    return random_cases + edges


def test_the_mutations_are_seeded_and_varied():
    cases = _cases()
    assert len(cases) >= 300 and cases == _cases()  # the same recipes every run
    texts = {text for _, text in cases}
    assert len(texts) > 0.9 * len(cases)
    assert sum("*i" in text for text in texts) >= 2  # billion laughs among them
    assert sum(_loads(text) is None for text in texts) >= 10  # YAML that does not parse


def _loads(text: str) -> object:
    try:
        return yaml.load(text, Loader=Loader)
    except (yaml.YAMLError, RecursionError, ValueError):
        return None


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_every_mutant_recipe_fails_with_one_line_or_trains(tmp_path):
    cases = _cases()

    def run_share(i: int) -> list[Outcome]:  # every WORKERS-th case, in one worker process
        with Worker() as worker:
            return [
                o
                for name, text in cases[i::WORKERS]
                for o in _run_case(worker, name, text, tmp_path)
            ]

    with ThreadPoolExecutor(WORKERS) as pool:
        outcomes = [o for share in pool.map(run_share, range(WORKERS)) for o in share]
    assert len(outcomes) == 2 * len(cases)
    failed = _report(outcomes)
    trained = sum(o.command == "train" and o.code == 0 for o in outcomes)
    refused = sum(o.command == "train" and o.code == 2 for o in outcomes)
    assert not failed, f"{len(failed.splitlines())} bad outcomes:\n{failed}"
    assert trained >= 20 and refused >= 100  # both kinds are really exercised
    slowest = max((o for o in outcomes if o.code == 2), key=lambda o: o.seconds)
    assert slowest.seconds < 5, f"refusing {slowest.case} took {slowest.seconds:.1f} s of CPU"


@pytest.mark.slow
def test_a_sample_of_mutants_through_real_processes(tmp_path):
    cases = _cases()[7::24][:10]  # ten of them, across the examples

    def run(case: tuple[str, str]) -> Outcome:
        name, text = case
        case_dir = tmp_path / name
        case_dir.mkdir()
        (case_dir / "recipe.yaml").write_text(text, encoding="utf-8")
        start = time.monotonic()
        r = gradwise_cli("train", "recipe.yaml", *FAST, cwd=case_dir, timeout=180)
        return Outcome(name, "train", r.returncode, r.stderr, time.monotonic() - start)

    with ThreadPoolExecutor(WORKERS) as pool:  # WORKERS processes at once
        outcomes = list(pool.map(run, cases))
    assert len(outcomes) == 10 and not _report(outcomes), _report(outcomes)


KNOWN = {  # the tester's cases: alias bombs, factory arguments of the wrong type
    "bomb": ("\n".join(BOMB) + "\nseed: *i\n", "Its aliases expand it to more than 100,000"),
    "kwargs-bomb": (
        "model:\n  name: mlp\n  kwargs:\n" + "\n".join("    " + b for b in BOMB) + "\n",
        "Its aliases expand it to more than 100,000",
    ),
    "dropout": (
        "model: {name: mlp, kwargs: {dropout: ''}}\ndata: {name: iris}\n",
        "error: model.kwargs.dropout: got ''; expected a number",
    ),
    "seed": (
        "data: {name: iris, kwargs: {seed: [1, 2]}}\n",
        "error: data.kwargs.seed: got [1, 2]; expected an integer",
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(KNOWN))
def test_known_damage_fails_fast_with_one_line(name, monkeypatch, capsys):
    text, expected = KNOWN[name]
    Path("recipe.yaml").write_text(text)
    monkeypatch.setattr(sys, "argv", ["gradwise", "train", "recipe.yaml", *FAST])
    monkeypatch.setenv("GRADWISE_DEBUG", "0")
    start = time.process_time()
    with pytest.raises(SystemExit) as exit_:
        main()
    seconds, err = time.process_time() - start, capsys.readouterr().err
    outcome = Outcome(name, "train", exit_.value.code, err, seconds)
    assert outcome.problem() is None and expected in err, err
    assert seconds < 10.0  # a hang is unbounded; kwargs errors come after importing torch, the data
    if "bomb" in name:  # the refusal itself, without the CLI's first imports: well under a second
        start = time.process_time()
        with pytest.raises(ConfigError, match="aliases expand"):
            load_recipe("recipe.yaml")
        assert time.process_time() - start < 1.0


@pytest.mark.timeout(60)
def test_a_bomb_in_a_run_directory_or_a_space_hangs_nothing(tmp_path, monkeypatch, capsys):
    # run directories and search spaces are YAML from anyone: runs, report and tune read them
    from gradwise.doctor.report import report_run
    from gradwise.tracking import list_runs
    from gradwise.tune.space import load_space

    bomb = "\n".join(BOMB) + "\nseed: *i\n"
    run = tmp_path / "runs" / "hostile"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(bomb)
    (run / "status.json").write_text('{"state": "finished", "step": 1}')
    start = time.process_time()
    assert [r.name for r in list_runs(tmp_path / "runs")] == ["hostile"]
    with pytest.warns(UserWarning, match="could not read the recipe"):
        report_run(run, tmp_path / "report.html")
    (tmp_path / "space.yaml").write_text(bomb)
    with pytest.raises(ConfigError, match="aliases expand"):
        load_space(tmp_path / "space.yaml", Recipe())
    assert time.process_time() - start < 5.0
