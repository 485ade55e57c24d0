"""The ``gradwise`` command line.

Commands import what they need when they run, so ``gradwise --help`` answers without importing torch.
A mistake in the user's input prints one message naming the field, the value and what was expected,
and exits with code 2; ``--debug`` (anywhere on the line, or GRADWISE_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from gradwise import __version__
from gradwise.errors import ConfigError, GradwiseError, GradwiseWarning

app = typer.Typer(
    name="gradwise",
    help="PyTorch training with the judgment of a senior ML engineer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXAMPLES = Path(__file__).parent / "examples"

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a recipe setting: key=value (e.g. optim.lr=3e-4, epochs=5)."
    ),
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="Plain progress lines instead of a live progress bar.")
]
NprocOption = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        min=1,
        help="Processes per machine, launched by torchrun's elastic launcher (distributed: DDP by "
        "default, or distributed.strategy=fsdp).",
    ),
]
NnodesOption = Annotated[
    int, typer.Option("--nnodes", min=1, help="Machines taking part (with --rdzv-endpoint).")
]
RdzvOption = Annotated[
    str | None,
    typer.Option(
        "--rdzv-endpoint", help="HOST:PORT where the machines meet (the same on every machine)."
    ),
]
TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust",
        help="Trust the directory: import the model/data/loss import paths its recipe names and "
        "load .pt2/TorchScript artifacts gradwise did not write for you. Both run its code.",
    ),
]


def _version(value: bool) -> None:
    if value:
        out.print(f"gradwise {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """PyTorch training with the judgment of a senior ML engineer."""


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    name: Annotated[str | None, typer.Option(help="Run name (directory under runs/).")] = None,
    advise: Annotated[
        bool,
        typer.Option(
            "--advise",
            help="Ask the advisor for every setting the recipe and --set do not name, as "
            "Trainer(recipe='auto') does (reasons in the run's advice.json).",
        ),
    ] = False,
    quick_check: Annotated[
        int | None,
        typer.Option(
            "--quick-check",
            min=1,
            help="Run everything on this many training and validation batches and keep nothing: "
            "a bug shows in seconds (Lightning's fast_dev_run).",
        ),
    ] = None,
    quiet: QuietOption = False,
    nproc: NprocOption = None,
    nnodes: NnodesOption = 1,
    rdzv_endpoint: RdzvOption = None,
) -> None:
    """Train the model and data a recipe names; writes runs/<name>/."""
    from gradwise.recipe import load_recipe, parse_assignment

    r = load_recipe(recipe)
    _launch(nproc, nnodes, rdzv_endpoint)
    overrides = dict(parse_assignment(item) for item in set_ or [])
    if name:
        overrides["name"] = name
    if advise:  # the advisor keeps exactly the file's and --set's own settings
        r.override(overrides)  # a bad --set fails here, with its own message
        _fit(_with_overrides(recipe, overrides), quiet, advise=True, quick_check=quick_check)
    else:
        _fit(r.override(overrides), quiet, quick_check=quick_check)


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="Run directory to continue.")],
    set_: SetOption = None,
    quiet: QuietOption = False,
    trust: TrustOption = False,
    nproc: NprocOption = None,
    nnodes: NnodesOption = 1,
    rdzv_endpoint: RdzvOption = None,
) -> None:
    """Continue a run from its latest checkpoint, exactly where it stopped.

    --set changes settings from here on, e.g. train.epochs=30 to extend the budget or
    optim.lr=1e-4 (a new peak: the schedule keeps its position and scales).
    """
    from gradwise.recipe import parse_assignment
    from gradwise.trainer import Trainer

    _launch(nproc, nnodes, rdzv_endpoint)
    overrides = dict(parse_assignment(item) for item in set_ or [])
    progress = "lines" if quiet else "auto"
    _report(Trainer.resume(run_dir, progress=progress, trust=trust, **overrides).fit())


@app.command()
def demo(quiet: QuietOption = False) -> None:
    """Train the bundled example (a CNN on scikit-learn's handwritten digits) and print the result."""
    from gradwise.recipe import load_recipe

    _fit(load_recipe(EXAMPLES / "digits_cnn.yaml"), quiet)


@app.command()
def advise(
    recipe: Annotated[
        Path | None, typer.Argument(help="Recipe YAML naming model and data (optional).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Zoo model or import path 'module:factory'.")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Built-in data set or import path 'module:factory'.")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task (default: settled by the data).")] = None,
    budget: Annotated[
        int | None, typer.Option(help="Epoch budget (default: by data size).")
    ] = None,
    probe: Annotated[
        bool,
        typer.Option(
            help="Refine the learning rate: short runs of rates around the rule's, judged on held-out loss."
        ),
    ] = False,
    write: Annotated[Path | None, typer.Option(help="Save the advised recipe as YAML.")] = None,
) -> None:
    """Advise a complete recipe for a model and data: every setting, why, and the reference."""
    from gradwise.assemble import advise as run_advise
    from gradwise.recipe import load_recipe, set_paths
    from gradwise.tracking import atomic_write_text

    base = load_recipe(recipe)
    explicit = set_paths(recipe) if recipe is not None else set()
    for key, value in (("model", model), ("data", data)):
        if value is not None:
            base = base.override({key: {"name": value, "kwargs": {}}})
    if probe:
        err.print("probing the learning rate: short runs of rates around the rule's ...")
        _show_progress_of("gradwise.lr_probe")
    started = time.perf_counter()
    advised = run_advise(recipe=base, explicit=explicit, task=task, budget=budget, probe=probe)
    if probe:
        err.print(f"advised in {time.perf_counter() - started:.0f} s")
    rows = advised.table()
    if out.is_terminal:
        from rich.table import Table

        table = Table("setting", "value", "why", "reference", show_lines=True)
        for row in rows:
            table.add_row(*row)
        out.print(table)
    else:
        for setting, value, why, ref in rows:
            print(f"{setting} = {value}\n    why: {why}" + (f"\n    ref: {ref}" if ref else ""))
    f = advised.facts
    out.print(
        f"facts: {f.architecture}, {f.params:,} parameters, {f.n_samples:,} {f.modality} samples, "
        f"task {f.task}, device {f.device}",
        soft_wrap=True,
    )
    if write is not None:
        atomic_write_text(write, advised.recipe.to_yaml(comments=True))
        out.print(f"advised recipe written to {write}")


@app.command()
def check(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    plot: Annotated[
        Path | None, typer.Option(help="Where to save the LR range test plot (PNG).")
    ] = Path("lr_range.png"),
    overfit: Annotated[bool, typer.Option(help="Run the overfit-one-batch test.")] = True,
    lr_range: Annotated[bool, typer.Option(help="Run the learning-rate range test.")] = True,
) -> None:
    """Preflight: check data and model, overfit one batch, find a learning rate. Exit 1 on errors."""
    from gradwise.assemble import assemble
    from gradwise.doctor.preflight import check as run_check
    from gradwise.optim import build_optimizer
    from gradwise.recipe import load_recipe, parse_assignment

    r = load_recipe(recipe).override(dict(parse_assignment(item) for item in set_ or []))
    a = assemble(recipe=r)
    report = run_check(
        a.model,
        a.train_dataset,
        a.val_dataset,
        loss_fn=a.task.unsmoothed(),  # overfitting one batch needs a loss that can reach 0
        task=a.task.kind,
        optimizer=build_optimizer(a.model, a.recipe.optim),
        lr=a.recipe.optim.lr,  # the peak: judged against the range test (GW305, GW306)
        batch_size=a.recipe.data.batch_size,
        overfit=overfit,
        lr_range=lr_range,
        plot=plot if lr_range else None,
        ignore=a.recipe.doctor.ignore,
    )
    out.print(str(report), soft_wrap=True)
    if report.lr_range is not None and plot is not None:
        out.print(f"  lr range plot: {plot}")
    if any(f.severity == "error" for f in report.findings):
        raise typer.Exit(1)


@app.command()
def models(
    name: Annotated[str | None, typer.Argument(help="A model, to show its arguments.")] = None,
) -> None:
    """The model zoo: every model with its arguments (and what your own factories receive)."""
    from gradwise.catalog import models as catalog
    from gradwise.models.build import SIZE_ARGS

    _show_catalog(catalog(), name, "model")
    if name is None:
        out.print(
            "\nyour own factory (model.name: 'module:factory') also gets, when it names them:"
        )
        for arg, meaning in SIZE_ARGS.items():
            out.print(f"  {arg}: {meaning}", soft_wrap=True)


@app.command()
def datasets(
    name: Annotated[str | None, typer.Argument(help="A data set, to show its arguments.")] = None,
) -> None:
    """The built-in data sets with their arguments (data.kwargs)."""
    from gradwise.catalog import USER_DATA
    from gradwise.catalog import datasets as catalog

    _show_catalog(catalog(), name, "data set")
    if name is None:
        out.print("\n" + USER_DATA.replace("`", ""), soft_wrap=True)


def _show_catalog(entries: dict, name: str | None, kind: str) -> None:
    from gradwise.errors import did_you_mean

    if name is None:
        for entry in entries.values():
            args = ", ".join(a.name for a in entry.arguments if not a.from_data)
            out.print(f"{entry.name:<26} {entry.summary}", soft_wrap=True)
            out.print(f"{'':<26} arguments: {args or 'none'}", soft_wrap=True)
        return
    if name not in entries:
        raise ConfigError(kind, name, f"one of {', '.join(entries)}", did_you_mean(name, entries))
    out.print(entries[name].text(), soft_wrap=True, markup=False)


@app.command()
def explain(
    topic: Annotated[
        str | None,
        typer.Argument(help="A technique (e.g. 'cosine annealing', lora) or a rule code (GW302)."),
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="List every topic and rule.")] = False,
) -> None:
    """Explain a technique (what, math, when, trade-offs, references, runnable example) or a doctor rule."""
    from gradwise.doctor.pages import rule_pages
    from gradwise.errors import ConfigError, did_you_mean
    from gradwise.knowledge import find, load_entries

    rules = rule_pages()
    if list_ or topic is None:
        entries = sorted(load_entries().values(), key=lambda e: (e.category, e.id))
        category = None
        for entry in entries:
            if entry.category != category:
                category = entry.category
                print(f"\n{category}")
            print(f"  {entry.id:<34} {entry.summary[:90]}")
        print("\ndoctor rules")
        for rule in rules.values():
            print(f"  {rule.code}  {rule.name:<28} {rule.summary[:90]}")
        return
    by_name = {r.name: r for r in rules.values()}
    rule = rules.get(topic.upper()) or by_name.get(topic.lower())
    if rule is not None:
        text = rule.page
    else:
        try:
            text = find(topic).markdown()
        except ConfigError as exc:
            close = did_you_mean(topic.upper(), rules) or did_you_mean(topic.lower(), by_name)
            if close is None:
                raise
            raise ConfigError("topic", topic, "a known topic or rule code", close) from exc
    if out.is_terminal:
        from rich.markdown import Markdown

        out.print(Markdown(text))
    else:
        print(text, end="")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="HTML file to write.")
    ] = None,
) -> None:
    """Write the run's self-contained HTML report: curves, findings, gradients, activations."""
    from gradwise.doctor.report import report_run
    from gradwise.errors import ConfigError

    # a gradwise run (status.json), or a run watched by an integration (Lightning, the Hugging
    # Face Trainer, Keras, JAX), which writes only doctor/
    if not (
        (run_dir / "status.json").is_file() or (run_dir / "doctor" / "findings.json").is_file()
    ):
        raise ConfigError(
            "run_dir", str(run_dir), "a gradwise run directory, or one with doctor/findings.json"
        )
    out.print(f"report: {report_run(run_dir, output)}")


@app.command()
def tune(
    recipe: Annotated[
        Path | None, typer.Argument(help="Recipe YAML: the base of every trial.")
    ] = None,
    space: Annotated[
        Path | None,
        typer.Option(help="Search space YAML (default: proposed around the advised recipe)."),
    ] = None,
    trials: Annotated[
        int, typer.Option("--trials", "-n", help="Finished trials in all (every worker).")
    ] = 20,
    objective: Annotated[
        list[str] | None,
        typer.Option(
            help="What to optimise: a validation metric (default: the recipe's monitor), params "
            "or latency; repeat for a multi-objective search."
        ),
    ] = None,
    sampler: Annotated[str, typer.Option(help="tpe, random, grid, cmaes or gp.")] = "tpe",
    pruner: Annotated[str, typer.Option(help="asha, hyperband, median or none.")] = "asha",
    storage: Annotated[
        str | None,
        typer.Option(
            help="Study storage: a .journal file or a database URL (postgresql://...); "
            "default runs/tune/<study>.journal."
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Local worker processes on the same study.")] = 1,
    study: Annotated[
        str | None,
        typer.Option(help="Study name (default: <model>-<data>); the same name resumes it."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampler seed (worker i uses seed + i).")] = 0,
    timeout: Annotated[
        float | None, typer.Option(help="Start no trial after this many seconds.")
    ] = None,
    probe: Annotated[
        bool, typer.Option(help="Centre the proposed learning rate on the LR range test.")
    ] = False,
    propose: Annotated[
        bool, typer.Option(help="Print the proposed search space and exit.")
    ] = False,
    report: Annotated[
        str | None,
        typer.Option(help="Show the results of study NAME again and redraw its plots."),
    ] = None,
    root: Annotated[
        Path, typer.Option(help="Runs directory that holds the study (with --report).")
    ] = Path("runs"),
    set_: SetOption = None,
) -> None:
    """Tune hyperparameters with Optuna: trials are runs; best recipe, table, importances, plots."""
    from gradwise.errors import ConfigError
    from gradwise.recipe import load_recipe, parse_assignment

    if report is not None:
        from gradwise.tune import study_report

        _tune_summary(study_report(report, storage=storage, root=root))
        return
    if recipe is None:
        raise ConfigError("recipe", None, "a recipe YAML file (or --report STUDY)")
    load_recipe(recipe)  # a bad recipe fails here, with its own message
    overrides = dict(parse_assignment(item) for item in set_ or [])
    source = _with_overrides(recipe, overrides) if overrides else recipe
    if propose:
        from gradwise.tune import propose_space

        proposed, _ = propose_space(source, probe=probe)
        print(proposed.to_yaml(), end="")
        return
    from gradwise.tune import tune as run_tune

    result = run_tune(
        source,
        space=space,
        trials=trials,
        objective=objective or None,
        sampler=sampler,
        pruner=pruner,
        storage=storage,
        workers=workers,
        study_name=study,
        seed=seed,
        probe=probe,
        timeout=timeout,
    )
    _tune_summary(result)


def _with_overrides(path: Path, overrides: dict) -> dict:
    """The recipe file's own settings plus --set ones, as a dict: the advisor keeps exactly those."""
    from gradwise.recipe import load_yaml, override_paths

    data = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    for key, value in overrides.items():
        for dotted in override_paths({key: value}):
            *parents, last = dotted.split(".")
            target = data
            for part in parents:
                target = target.setdefault(part, {})
            target[last] = value[last] if isinstance(value, dict) and last in value else value
    return data


def _tune_summary(result) -> None:
    header, rows = result.table()
    counts = ", ".join(f"{n} {state}" for state, n in result.counts().items())
    out.print(f"study {result.study_name} ({result.storage}): {counts}", soft_wrap=True)
    if out.is_terminal:
        from rich.table import Table

        table = Table(*header)
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        out.print(table)
    else:
        for row in [header, *rows]:
            print("\t".join(row))
    if result.importances:
        ranked = sorted(result.importances.items(), key=lambda kv: -kv[1])
        text = ", ".join(f"{k} {v:.2f}" for k, v in ranked)
        out.print(f"importance (fANOVA): {text}", soft_wrap=True)
    elif result.importance_note:
        out.print(result.importance_note)
    if len(result.objectives) > 1:
        front = ", ".join(str(t.number) for t in result.pareto)
        out.print(f"Pareto front ({', '.join(result.objectives)}): trials {front}")
    if result.best is not None:
        values = ", ".join(
            f"{name} {value:.4g}"
            for name, value in zip(result.objectives, result.best.values, strict=True)
        )
        out.print(f"best: trial {result.best.number}, {values}", soft_wrap=True)
        out.print(f"best recipe: {result.best_recipe_path}")
    if result.plots:
        out.print(f"plots: {result.plots[0].parent}")
    out.print(f"study folder: {result.dir}")


@app.command()
def export(
    source: Annotated[Path, typer.Argument(help="Run directory or checkpoint directory.")],
    format_: Annotated[
        str, typer.Option("--format", "-f", help="onnx, torch-export or torchscript.")
    ] = "onnx",
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Export directory (default RUN/export/FORMAT)."),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="Also write model.int8.onnx: dynamic, static or qat (quantization-aware fine-tuning)."
        ),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(help="Largest max-absolute difference to eager PyTorch (fp32).")
    ] = 1e-4,
    register: Annotated[
        str | None,
        typer.Option(
            help="Also register the export as a new version of this model in the MLflow registry "
            "(runs/mlflow.db, or MLFLOW_TRACKING_URI)."
        ),
    ] = None,
    alias: Annotated[
        str | None,
        typer.Option(help="With --register: point this alias (e.g. champion) at the new version."),
    ] = None,
    trust: TrustOption = False,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge/--no-merge",
            help="A run with finetune.peft: fold the adapter into the weights (default), or export "
            "the base and write the adapter next to it (peft's adapter_config.json and "
            "adapter_model.safetensors).",
        ),
    ] = True,
) -> None:
    """Export a run's best model with a parity check; writes the artifact, model.json, reference.json."""
    from gradwise.deploy.export import export as run_export

    if alias and not register:
        raise ConfigError("--alias", alias, "--register NAME as well (an alias names a version)")

    artifact = run_export(
        source, format=format_, out=out_dir, quantize=quantize, tolerance=tolerance, trust=trust,
        merge=merge,
    )  # fmt: skip
    p = artifact.parity
    out.print(f"{artifact.format}: {artifact.path}", soft_wrap=True)
    adapter = artifact.card.get("peft")
    if adapter and adapter["merged"]:
        out.print(
            f"{adapter['method']} adapter merged: max abs {adapter['max_abs']:.2e} against the "
            f"model with its adapter (tolerance {adapter['tolerance']:g})"
        )
    out.print(
        f"parity: max abs {p['max_abs']:.2e}, max rel {p['max_rel']:.2e} on {p['samples']} "
        f"{p['inputs']} inputs (tolerance {p['tolerance']:g})"
    )
    q = artifact.quantized
    if q is not None:
        line = f"int8 ({q['mode']}): {artifact.int8_path}, {q['size_bytes']:,} bytes"
        line += f" (fp32 {q['float_size_bytes']:,})"
        if q.get("metric"):
            line += (
                f"; {q['metric']} {q['metric_int8']:.4f} vs {q['metric_float']:.4f} fp32 "
                f"(delta {q['metric_delta']:+.4f})"
            )
        lat = q["latency_ms"]
        line += (
            f"; p50 at batch {lat['batch_size']}: {lat['int8_p50']:.3f} ms vs "
            f"{lat['float_p50']:.3f} ms ({lat['threads']} threads)"
        )
        out.print(line, soft_wrap=True)
    for note in artifact.notes:
        out.print(note, soft_wrap=True)
    out.print(f"model card: {artifact.dir / 'model.json'}", soft_wrap=True)
    if register:
        from gradwise.deploy.registry import register as register_model

        version = register_model(artifact.dir, register, alias=alias)
        at = f"models:/{register}@{alias}" if alias else f"models:/{register}/{version}"
        out.print(f"registered {register} version {version}: gradwise serve {at}", soft_wrap=True)


@app.command()
def bench(
    artifact_dir: Annotated[Path, typer.Argument(help="Export directory (with model.json).")],
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32,128",
    threads: Annotated[
        int | None,
        typer.Option(help="Threads for PyTorch and ONNX Runtime alike (default: torch's)."),
    ] = None,
    seconds: Annotated[float, typer.Option(help="Timed seconds per backend and batch size.")] = 1.0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results as JSON.")
    ] = None,
    trust: TrustOption = False,
) -> None:
    """Latency percentiles and throughput: eager PyTorch, ONNX Runtime fp32 and int8, interleaved."""
    from gradwise.deploy.bench import bench as run_bench
    from gradwise.errors import ConfigError
    from gradwise.tracking import atomic_write_text

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise ConfigError("--batch-sizes", batch_sizes, "integers like 1,8,32,128") from None
    result = run_bench(artifact_dir, sizes, threads=threads, seconds=seconds, trust=trust)
    out.print(f"{result.dir}: {result.threads} threads, {result.seconds:g} s per measurement")
    header, rows = result.table()
    if out.is_terminal:
        from rich.table import Table

        table = Table(*header)
        for row in rows:
            table.add_row(*row)
        out.print(table)
    else:
        for row in [header, *rows]:
            print("\t".join(row))
    for entry in result.ratios():
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in entry.items() if k != "batch_size")
        if ratios:
            out.print(f"batch {entry['batch_size']}: {ratios}")
    for note in result.notes:
        out.print(note)
    if json_out is not None:
        import json

        atomic_write_text(json_out, json.dumps(result.to_dict(), indent=2))
        out.print(f"results: {json_out}")


@app.command()
def recipe(
    path: Annotated[
        Path | None, typer.Argument(help="Recipe YAML to show resolved (default: the defaults).")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Print a complete recipe with every setting documented: a starting point to edit."""
    from gradwise.recipe import load_recipe, parse_assignment

    r = load_recipe(path).override(dict(parse_assignment(item) for item in set_ or []))
    print(r.to_yaml(comments=True), end="")


@app.command()
def runs(
    names: Annotated[
        list[str] | None,
        typer.Argument(
            help="Runs to compare (names under --root or run directories).", show_default=False
        ),
    ] = None,
    root: Annotated[Path, typer.Option(help="Directory that holds the runs.")] = Path("runs"),
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Compare the runs named side by side: recipe settings that differ, data "
            "fingerprints, code version, package versions, best and last metrics.",
        ),
    ] = False,
) -> None:
    """List runs with their state and best metric, newest first; or compare runs side by side."""
    from rich.table import Table

    from gradwise.tracking import list_runs

    if compare or names:
        from gradwise.tracking.runs import compare_runs

        c = compare_runs(list(names or []), root)
        header = ["", *c.runs, "compare"]
        rows = [[what, *values, verdict] for what, values, verdict in c.rows]
        if not out.is_terminal:  # piped: tab-separated lines, easy to grep and cut
            for row in [header, *rows]:
                print("\t".join(row))
            return
        table = Table(*map(escape, header))
        for row in rows:
            table.add_row(*map(escape, row))
        out.print(table)
        return
    found = list_runs(root)
    if not found:
        out.print(f"no runs under {root}")
        return
    header = ["run", "state", "task", "model", "data", "step", "best", "monitor", "started"]
    rows = [
        [
            run.name, run.state, run.task or "", run.model or "", run.data or "", str(run.step or ""),
            "" if run.best_metric is None else f"{run.best_metric:.4g}", run.monitor or "",
            run.started.strftime("%Y-%m-%d %H:%M") if run.started else "",
        ]
        for run in found
    ]  # fmt: skip
    if not out.is_terminal:  # piped: tab-separated lines, easy to grep and cut
        for row in [header, *rows]:
            print("\t".join(row))
        return
    table = Table(*header)
    for row in rows:
        table.add_row(*row)
    out.print(table)


@app.command()
def serve(
    ctx: typer.Context,
    artifact: Annotated[
        str,
        typer.Argument(
            help="Export directory (gradwise export), or models:/NAME@ALIAS or models:/NAME/VERSION."
        ),
    ],
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="GRADWISE_TOKEN",
            show_envvar=True,
            help="Bearer token every endpoint but /health requires. Set it in the environment "
            "or use --token-file: on the command line, any user can read it in the process list.",
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the bearer token (first line); chmod 600 it."),
    ] = None,
    max_batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="Most rows in one model call (larger requests are split); 1 turns "
            "micro-batching off.",
        ),
    ] = 32,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="Longest wait for a micro-batch to fill, in ms.")
    ] = 5.0,
    max_rows: Annotated[
        int, typer.Option(min=1, help="Most instances in one request (more: 413).")
    ] = 10_000,
    max_body_mb: Annotated[
        float, typer.Option(min=0.001, help="Largest request body, in MiB (bigger: 413).")
    ] = 16.0,
    header_timeout: Annotated[
        float,
        typer.Option(min=0.001, help="Seconds a client has to send its request headers (408)."),
    ] = 10.0,
    body_timeout: Annotated[
        float,
        typer.Option(
            min=0.001, help="Seconds a client has to send its request body after the headers (408)."
        ),
    ] = 30.0,
    max_connections: Annotated[
        int,
        typer.Option(
            min=1,
            help="Open connections per worker; at the cap the one idle longest is closed, or the "
            "new one gets 503.",
        ),
    ] = 1000,
    int8: Annotated[bool, typer.Option("--int8", help="Serve model.int8.onnx.")] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1, help="ONNX Runtime intra-op threads per worker (default: cores / workers)."
        ),
    ] = None,
) -> None:
    """Serve an exported model over HTTP: /v1/predict, /health, /v1/model, /v1/drift, /metrics."""
    from gradwise.deploy.serve import read_token
    from gradwise.deploy.serve import serve as run_serve

    source = ctx.get_parameter_source("token")
    on_command_line = getattr(source, "name", None) == "COMMANDLINE"  # typer vendors click
    if token_file is not None:
        if on_command_line:
            raise ConfigError("token", "--token and --token-file", "one of them")
        token = read_token(token_file)
    elif token and on_command_line:
        warnings.warn(
            "--token on the command line is visible to every user in the process list (ps); "
            "use --token-file PATH or the GRADWISE_TOKEN environment variable",
            GradwiseWarning,
            stacklevel=1,
        )

    def banner(url: str) -> None:
        out.print(
            f"serving {artifact} on {url} (docs: /docs; Ctrl-C or SIGTERM stops after answering "
            "the requests received)",
            soft_wrap=True,
        )

    run_serve(
        artifact,
        host=host,
        port=port,
        workers=workers,
        token=token or None,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_rows=max_rows,
        max_body_mb=max_body_mb,
        int8=int8,
        threads=threads,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_connections=max_connections,
        announce=banner,
    )


def _show_progress_of(name: str) -> None:
    """Print the INFO progress lines of logger ``name`` on stderr (a long step says it is alive)."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    log = logging.getLogger(name)
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _fit(recipe, quiet: bool, advise: bool = False, quick_check: int | None = None) -> None:
    from gradwise.trainer import Trainer

    trainer = Trainer(recipe=recipe, progress="lines" if quiet else "auto", advise=advise)
    if quick_check is None:
        _report(trainer.fit())
        return
    run = trainer.quick_check(quick_check)
    entry = run.history[-1] if run.history else {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k.startswith(("train_", "val_")))
    out.print(
        f"quick check passed: {run.steps} training steps and validation on {quick_check} "
        f"batches ({shown}); nothing was kept",
        soft_wrap=True,
    )


def _launch(nproc: int | None, nnodes: int, endpoint: str | None) -> None:
    """With --nproc, run this same command in ``nproc`` processes per machine under torchrun's
    elastic launcher (it restarts nothing: a failed rank ends the job, every rank stops) and exit
    with its status; without, or when already a torchrun worker, return and train here."""
    if nproc is None or "LOCAL_RANK" in os.environ:
        return
    if nnodes > 1 and not endpoint:
        raise ConfigError("--rdzv-endpoint", None, "HOST:PORT with --nnodes > 1")
    import subprocess

    args, skip = [], False
    for arg in sys.argv[1:]:  # the same command, without the launcher's options
        if skip:
            skip = False
        elif arg in ("--nproc", "--nnodes", "--rdzv-endpoint"):
            skip = True
        elif not arg.startswith(("--nproc=", "--nnodes=", "--rdzv-endpoint=")):
            args.append(arg)
    where = (
        ["--standalone"]
        if nnodes == 1 and not endpoint
        else ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(endpoint)]
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    launcher += [f"--nnodes={nnodes}", *where, "-m", "gradwise", *args]
    raise typer.Exit(subprocess.call(launcher))


def _report(run) -> None:
    if int(os.environ.get("RANK", 0)) != 0:
        return  # rank 0 reports for all
    best = "n/a" if run.best_metric is None else f"{run.best_metric:.4f}"
    out.print(f"{run.state}: best {run.monitor} {best} after {run.steps} steps")
    out.print(f"run directory: {run.dir}")
    if run.best_checkpoint is not None:
        out.print(f"best checkpoint: {run.best_checkpoint}")
    if run.state == "interrupted":
        raise typer.Exit(130)  # like a process stopped by Ctrl-C; the run can be resumed


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Recoveries (GradwiseWarning) as one ``warning:`` line; other warnings as Python shows them."""
    if issubclass(category, GradwiseWarning):
        err.print(f"[yellow]warning:[/] {escape(str(message))}", soft_wrap=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


@app.command()
def predict(
    source: Annotated[
        Path, typer.Argument(help="Run directory (or checkpoint) or export directory.")
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            "-d",
            help="CSV, .npy/.npz file or folder of images (not for language models).",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Predictions CSV (default predictions.csv); LM: the text."
        ),
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="A run's best or last checkpoint.")] = "best",
    prompt: Annotated[str | None, typer.Option(help="Language models: text to continue.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Language models: tokens to generate.")] = 200,
    temperature: Annotated[
        float, typer.Option(help="Language models: sampling temperature (0: greedy).")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Language models: sampling seed.")] = 0,
    trust: TrustOption = False,
) -> None:
    """Predict labels with calibrated probabilities (or values) for new data; LMs generate text."""
    from gradwise.predict import predict as run_predict

    if output is None and data is not None:
        output = Path("predictions.csv")
    result = run_predict(
        source, data, output, checkpoint=checkpoint, prompt=prompt, max_tokens=max_tokens,
        temperature=temperature, seed=seed, trust=trust,
    )  # fmt: skip
    for note in result.notes:
        out.print(note, soft_wrap=True)
    if result.task == "lm":
        print(result.full_text)
        if result.output is not None:
            out.print(f"text: {result.output}", soft_wrap=True)
        return
    if result.labels is not None and result.task != "multilabel":
        from collections import Counter

        counts = Counter(result.labels).most_common(5)
        out.print("predicted: " + ", ".join(f"{label} {n}" for label, n in counts), soft_wrap=True)
    out.print(f"{len(result.index)} predictions: {result.output}", soft_wrap=True)


@app.command()
def cv(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    folds: Annotated[
        int,
        typer.Option("--folds", "-k", help="Number of folds K (K runs, each validated on 1/K)."),
    ] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the folds' shuffle.")] = 0,
    against: Annotated[
        Path | None,
        typer.Option(help="A second recipe on the same data: same folds, corrected paired t-test."),
    ] = None,
    group: Annotated[
        str | None,
        typer.Option(help="csv data: a column whose values never cross folds (GroupKFold)."),
    ] = None,
    set_: SetOption = None,
    quiet: QuietOption = False,
) -> None:
    """Cross-validate a recipe on K folds of its training data (stratified for classes): mean,
    spread and 95% interval of every validation metric; writes runs/<name>-cv/ and its cv.json."""
    from gradwise.cv import cv as run_cv
    from gradwise.recipe import parse_assignment

    overrides = dict(parse_assignment(item) for item in set_ or [])
    result = run_cv(
        recipe, folds, seed=seed, against=against, group=group, overrides=overrides,
        progress="lines" if quiet else "auto", announce=lambda line: out.print(line, soft_wrap=True),
    )  # fmt: skip
    info = result.info
    out.print(f"{info['splitter']}, {folds} folds of {info['samples']} samples: {info['why']}")

    def interval(s: dict) -> str:
        lo, hi = s["ci95"]
        return f"{s['mean']:.4f} +- {s['std']:.4f} (95% CI {lo:.4f}..{hi:.4f})"

    if result.comparison is None:
        for metric, s in result.summary.items():
            if s["mean"] is not None:
                out.print(f"{metric:<18} {interval(s)}", soft_wrap=True)
    else:
        names = info["recipes"]
        for metric, c in result.comparison.items():
            if c.get("difference") is None:
                continue
            a, b = result.summary[metric], result.against["summary"][metric]
            lo, hi = c["ci95"]
            better = (
                f", {names['ab'.index(c['better'])]} (recipe {c['better']}) is better"
                if (c["better"] and c["verdict"] == "significant")
                else ""
            )
            out.print(
                f"{metric:<18} a {a['mean']:.4f}  b {b['mean']:.4f}  difference "
                f"{c['difference']:+.4f} (95% CI {lo:+.4f}..{hi:+.4f}), p = {c['p_value']:.3g}: "
                f"{c['verdict']}{better}",
                soft_wrap=True,
            )
        out.print(f"test: {next(iter(result.comparison.values()))['test']}, alpha 0.05")
    out.print("intervals use the corrected variance (1/K + n_val/n_train) s^2 (Nadeau & Bengio)")
    out.print(f"cv: {result.dir / 'cv.json'}", soft_wrap=True)


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="Run directory A.")],
    run_b: Annotated[Path, typer.Argument(help="Run directory B (same validation samples).")],
    metric: Annotated[
        str | None, typer.Option(help="Validation metric (default: A's monitored metric).")
    ] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the resampling.")] = 0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the result as JSON.")
    ] = None,
    trust: TrustOption = False,
) -> None:
    """Is run A better than run B? A paired bootstrap of their best checkpoints' metric on the
    same validation samples: the difference, its 95% interval, the p-value and the verdict."""
    from gradwise.compare import compare as run_compare
    from gradwise.tracking import atomic_write_text

    r = run_compare(run_a, run_b, metric=metric, resamples=resamples, seed=seed, trust=trust)
    lo, hi = r["ci95"]
    better = (
        f" ({r['run_' + r['better']]} is better)"
        if (r["better"] and r["verdict"] == "significant")
        else ""
    )
    out.print(
        f"{r['metric']}: A {r['a']:.4f}  B {r['b']:.4f}  difference {r['difference']:+.4f} "
        f"(95% CI {lo:+.4f}..{hi:+.4f}), p = {r['p_value']:.3g} over {r['samples']} paired "
        f"samples, {r['resamples']} resamples: {r['verdict']} at alpha {r['alpha']}{better}",
        soft_wrap=True,
    )
    if json_out is not None:
        import json

        atomic_write_text(json_out, json.dumps(r, indent=2))
        out.print(f"result: {json_out}")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.")],
    data: Annotated[
        str | None,
        typer.Option(
            help="val (default), train, or a .npz file with raw inputs x and targets y "
            "(preprocessed with the run's training statistics)."
        ),
    ] = None,
    checkpoint: Annotated[
        str, typer.Option(help="best, last, or the step of a checkpoint.")
    ] = "best",
    slice_: Annotated[
        list[str] | None,
        typer.Option("--slice", help="Metrics per group: label, or a column name (repeatable)."),
    ] = None,
    resamples: Annotated[int, typer.Option(min=0, help="Bootstrap resamples (0: none).")] = 1000,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate/--no-calibrate",
            help="Fit a temperature on the validation split (evaluation/calibration.json).",
        ),
    ] = True,
    trust: TrustOption = False,
) -> None:
    """Evaluate a run in depth: metrics with 95% bootstrap intervals, calibration, error analysis,
    plots and one HTML page, written to RUN/evaluation/ (and logged to the run's MLflow run)."""
    from gradwise.evaluate.run import evaluate as run_evaluate

    if checkpoint not in ("best", "last", "latest") and not checkpoint.isdigit():
        raise ConfigError("--checkpoint", checkpoint, "best, last, or a step number")
    result = run_evaluate(
        run_dir, data, checkpoint=checkpoint, slices=slice_ or None, trust=trust,
        calibrate=calibrate, resamples=resamples,
    )  # fmt: skip
    m = result.metrics
    out.print(f"{result.task}: {m['samples']:,} samples ({result.source['data']}), checkpoint "
              f"{result.source['checkpoint']}")  # fmt: skip
    for name, v in m["headline"].items():
        ci = "" if v["ci_low"] is None else f"  (95% CI {v['ci_low']:.4f}..{v['ci_high']:.4f})"
        out.print(f"  {name:<24} {v['value']:.4f}{ci}")
    c = result.calibration
    if c:
        out.print(
            f"temperature {c['temperature']:.3f}: ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}, "
            f"NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f} (fitted on {c['samples']} "
            "validation samples)"
        )
    for note in result.notes:
        out.print(note, soft_wrap=True)
    out.print(f"evaluation: {result.dir / 'index.html'}", soft_wrap=True)


def main() -> None:
    """Entry point: user errors exit with code 2 and one message; tracebacks only with --debug."""
    debug = "--debug" in sys.argv or os.environ.get("GRADWISE_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    warnings.showwarning = _show_warning
    try:
        app(standalone_mode=True)
    except GradwiseError as exc:
        if debug:
            raise
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        err.print("interrupted")
        sys.exit(130)
    except OSError as exc:  # a full disk, a read-only or missing directory: one line, no traceback
        if debug:
            raise
        err.print(f"[bold red]error:[/] {escape(_os_error(exc))}", soft_wrap=True)
        sys.exit(2)


_NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large"}
if hasattr(errno, "EDQUOT"):
    _NO_ROOM[errno.EDQUOT] = "disk quota exceeded"
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _os_error(exc: OSError) -> str:
    """An OSError as one line: what went wrong, on which file, and what to do."""
    file = f" {exc.filename}" if exc.filename else ""
    if exc.errno in _NO_ROOM:
        return (
            f"{_NO_ROOM[exc.errno]} while writing{file or ' the run directory'}: "
            "free space or set tracking.root to a disk with room"
        )
    reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
    hint = ": check its permissions or set tracking.root" if exc.errno in _READ_ONLY else ""
    return f"{reason}{':' if file else ''}{file}{hint}"


if __name__ == "__main__":
    main()
