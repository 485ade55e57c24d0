"""``gradwise predict``: a trained run or an export applied to new data, with calibrated probabilities.

    result = gradwise.predict("runs/iris-mlp", "new.csv", output="predictions.csv")
    result.labels[:3], result.probabilities[:3]         # class names, softmax(logits / T)
    gradwise.predict("runs/shakespeare-gpt", prompt="ROMEO:", max_tokens=200).text

The source is a run directory (or one of its checkpoints: the model is rebuilt from ``recipe.yaml``
and the checkpoint's safetensors weights, and the raw inputs get the preprocessing the run's
training split defined, rebuilt as ``gradwise export`` rebuilds it) or an export directory (the
artifact run on ONNX Runtime, or PyTorch for ``.pt2``/``.ts``, with the model card's
preprocessing). Its sha256 and the checkpoint's manifest are checked first: nothing is unpickled.

The data is a CSV file (a header row; the feature columns the model was trained on, matched by name
when the run recorded names and by count otherwise; a label column is ignored), a ``.npy`` array or
an ``.npz`` archive (``[N, *sample shape]``), or a folder of images (sub-folders per class allowed),
resized and standardised as the run's ``image_folder`` data was.

Probabilities are calibrated: ``softmax(logits / T)`` (``sigmoid(logit / T)`` for binary with one
logit and multilabel) with the temperature ``T`` that ``gradwise evaluate`` fitted on validation
data (``RUN/evaluation/calibration.json``; an export carries it in its model card). Without one,
``T = 1`` and the result says so. Temperature scaling never changes which class is predicted, only
how confident the probabilities are (Guo et al. 2017, On Calibration of Modern Neural Networks).

Language-model runs (task lm) generate instead: ``max_tokens`` tokens after ``prompt``, sampled
at ``temperature`` (0: greedy) with a seeded generator.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradwise._lazy import callable_as_namesake
from gradwise.errors import ConfigError, DataError

CALIBRATION = Path("evaluation") / "calibration.json"  # written by gradwise evaluate
CHECKPOINTS = ("best", "last")
LABEL_COLUMNS = ("label", "labels", "target", "y", "class")  # ignored when the CSV has one more
ARRAY_KEYS = ("X", "x", "inputs", "features")  # the inputs of an .npz archive, in this order
DATA_KINDS = "a .csv, .npy or .npz file, or a folder of images"
CHUNK = 256  # rows per model call
DEFAULT_MAX_TOKENS = 200
DIGITS = ".8g"  # probabilities and values in the CSV: 8 significant digits (float32 has ~7)


@dataclass
class Predictions:
    """What :func:`predict` computed (and wrote to ``output`` when given)."""

    task: str
    source: str  # "run" or "export"
    temperature: float  # the calibration temperature applied (1.0 when there is none)
    calibrated: bool
    index: list[str] = field(default_factory=list)  # row numbers or image files
    outputs: np.ndarray | None = field(default=None, repr=False)  # raw logits or values
    predictions: list[Any] = field(default_factory=list)  # class index, 0/1 list or value(s)
    labels: list[Any] | None = None  # class names (classification), when known
    probabilities: np.ndarray | None = field(default=None, repr=False)
    class_names: list[str] | None = None
    output: Path | None = None
    notes: list[str] = field(default_factory=list)
    text: str | None = None  # language models: the generated continuation
    tokens: list[int] | None = None  # language models: the generated token ids
    prompt: str | None = None
    separator: str = ""  # between tokens: "" for characters, " " for token ids

    @property
    def full_text(self) -> str:
        """Language models: the prompt followed by the generated text."""
        prompt, text = self.prompt or "", self.text or ""
        return prompt + (self.separator if prompt and text else "") + text


@dataclass
class _Model:
    """A model to run on model inputs, and what predict needs to know about it."""

    source: str
    name: str
    run: Callable[[np.ndarray], np.ndarray]  # model inputs [N, ...] -> raw outputs
    task: str
    sample_shape: list[int | None]
    input_dtype: str
    preprocessing: dict[str, Any]
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    target: str | None = None  # the training label column (CSV runs)
    npz_key: str | None = None
    temperature: float | None = None
    temperature_from: str = ""
    context: int | None = None  # language models: longest context the model takes
    fixed_length: bool = False  # an export's sequence axis is fixed: pad on the right
    vocab_size: int | None = None  # language models: token ids are below it


# -- the public API ------------------------------------------------------------------------------


def predict(
    run_or_export: str | Path,
    data: str | Path | None = None,
    output: str | Path | None = None,
    *,
    checkpoint: str = "best",
    prompt: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = 1.0,
    seed: int = 0,
    trust: bool = False,
) -> Predictions:
    """Predictions of a run (its ``checkpoint``: best or last) or an export on ``data``.

    data: a CSV, ``.npy``/``.npz`` file or a folder of images (not needed for language models).
    output: where to write the predictions CSV (language models: the generated text); atomic.
    prompt, max_tokens, temperature, seed: text generation for language-model runs (temperature
    is the sampling temperature here, 0 for greedy; the calibration temperature is the run's).
    trust: import the model and data import paths the run's recipe names, and load ``.pt2``/
    TorchScript artifacts gradwise did not write (both run code; see :mod:`gradwise.trust`).
    """
    model = _open(Path(run_or_export), checkpoint, trust)
    if model.task == "lm":
        result = generate(model, prompt, max_tokens, temperature, seed)
        if output is not None:
            from gradwise.tracking.files import atomic_write_text

            result.output = Path(output)
            atomic_write_text(result.output, result.full_text)
        return result
    if data is None:
        raise ConfigError("data", None, DATA_KINDS, "the rows to predict")
    index, raw = read_inputs(Path(data), model)
    x = _model_inputs(raw, model)
    from gradwise.deploy.formats import run_chunked

    outputs = np.asarray(run_chunked(model.run, x, CHUNK), dtype=np.float64)
    result = _interpret(model, outputs, index)
    if output is not None:
        result.output = Path(output)
        _write_csv(result.output, *table(result))
    return result


def probabilities(logits: np.ndarray, task: str, temperature: float = 1.0) -> np.ndarray:
    """Calibrated probabilities ``[N, K]`` of raw outputs: ``softmax(logits / T)`` for multiclass
    (and binary with two logits), ``[1 - p, p]`` with ``p = sigmoid(logit / T)`` for binary with
    one logit, ``sigmoid(logits / T)`` per label for multilabel."""
    from scipy.special import expit, softmax

    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or not (
        temperature > 0
    ):
        raise ConfigError("temperature", temperature, "a finite number > 0")
    z = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1) / float(temperature)
    if task == "multilabel":
        return expit(z)
    if task == "binary" and z.shape[1] == 1:
        p = expit(z[:, 0])
        return np.stack([1 - p, p], axis=1)
    return softmax(z, axis=1)


def read_temperature(run_dir: str | Path) -> float | None:
    """The fitted temperature of a run (None without ``evaluation/calibration.json``)."""
    from gradwise.evaluate.calibration import read_temperature as read

    return read(Path(run_dir))


def read_calibration(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``evaluation/calibration.json``, validated, or None without one."""
    from gradwise.evaluate.calibration import read_calibration as read

    return read(Path(run_dir))


# -- opening a run or an export -----------------------------------------------------------------


def _open(path: Path, checkpoint: str, trust: bool) -> _Model:
    if checkpoint not in CHECKPOINTS:
        raise ConfigError("checkpoint", checkpoint, " or ".join(CHECKPOINTS))
    if not path.exists():
        raise DataError(f"{path} does not exist: expected a run directory or an export directory")
    from gradwise.deploy.card import CARD

    if (path / CARD).is_file():
        return _open_export(path, trust)
    return _open_run(path, checkpoint, trust)


def _open_run(path: Path, checkpoint: str, trust: bool) -> _Model:
    from gradwise.assemble import OBJECT
    from gradwise.checkpoint import resolve_checkpoint
    from gradwise.data import load_data
    from gradwise.deploy.export import run_eager
    from gradwise.deploy.source import load_model, load_source

    if not path.is_dir():
        raise DataError(f"{path} is not a directory: expected a run directory or an export")
    ckpt = resolve_checkpoint(path, "best" if checkpoint == "best" else "latest")
    source = load_source(ckpt, trust)
    recipe = source.recipe
    if recipe.data.name.startswith(OBJECT):
        raise ConfigError(
            "data.name", recipe.data.name, "a data set gradwise can rebuild",
            "the run was trained on a Python object, so its preprocessing is unknown: export the "
            "model with a sample and predict with the export",
        )  # fmt: skip
    model = load_model(source)
    info = load_data(recipe.data.name, recipe.data.kwargs, trusted=trust).info
    calibration = read_calibration(source.run_dir)
    max_len = getattr(model, "max_seq_len", None)
    return _Model(
        source="run",
        name=source.run_dir.name,
        run=lambda x: run_eager(model, x),
        task=recipe.task,
        sample_shape=list(info.input_shape),
        input_dtype=info.input_dtype,
        preprocessing=info.preprocessing,
        class_names=[str(c) for c in info.class_names] if info.class_names else None,
        feature_names=list(info.feature_names) if info.feature_names else None,
        target=recipe.data.kwargs.get("target"),
        npz_key=recipe.data.kwargs.get("x_key"),
        temperature=calibration["temperature"] if calibration else None,
        temperature_from=str(source.run_dir / CALIBRATION),
        context=max_len if isinstance(max_len, int) else info.seq_len,
        vocab_size=info.vocab_size,
    )


def _open_export(path: Path, trust: bool) -> _Model:
    from gradwise.deploy.card import card_temperature, inside, load_card, load_reference
    from gradwise.deploy.formats import load_runner

    card = load_card(path)  # every file's sha256 checked
    runner = load_runner(inside(path, card.get("artifact"), "model.json: artifact"), trusted=trust)
    spec = (card.get("inputs") or [{}])[0]
    shape = spec.get("shape") or [None]
    sample = [d if isinstance(d, int) else None for d in shape[1:]]
    try:
        reference = load_reference(path)
        names = (
            [f["name"] for f in reference["features"]] if reference["kind"] == "features" else None
        )
    except (ConfigError, DataError, KeyError, TypeError):
        names = None
    kwargs = ((card.get("recipe") or {}).get("data") or {}).get("kwargs") or {}
    labels = card.get("class_labels")
    task = card.get("task") or "multiclass"
    return _Model(
        source="export",
        name=card.get("name") or path.name,
        run=runner,
        task=task,
        sample_shape=sample,
        input_dtype=str(spec.get("dtype", "float32")),
        preprocessing=card.get("preprocessing") or {},
        class_names=[str(c) for c in labels] if labels else None,
        feature_names=names,
        target=kwargs.get("target"),
        npz_key=kwargs.get("x_key"),
        temperature=card_temperature(card),
        temperature_from=f"{path / 'model.json'} (calibration)",
        context=sample[0] if task == "lm" and sample and sample[0] else None,
        fixed_length=task == "lm" and bool(sample and sample[0]),
        vocab_size=_export_vocab(card),
    )


def _export_vocab(card: dict[str, Any]) -> int | None:
    pre = card.get("preprocessing") or {}
    if pre.get("vocab_size") or pre.get("char_vocab"):
        return int(pre.get("vocab_size") or len(pre["char_vocab"]))
    last = ((card.get("outputs") or [{}])[0].get("shape") or [None])[-1]
    return last if isinstance(last, int) else None


# -- reading the data -----------------------------------------------------------------------------


def read_inputs(path: Path, model: _Model) -> tuple[list[str], np.ndarray]:
    """Row names and raw inputs ``[N, *sample shape]`` from a CSV, NumPy file or image folder."""
    if not path.exists():
        raise DataError(f"--data: {path} does not exist; expected {DATA_KINDS}")
    if path.is_dir():
        return _read_images(path, model)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        raw = _read_csv(path, model)
    elif suffix in (".npy", ".npz"):
        raw = _read_array(path, model)
    else:
        raise ConfigError("--data", str(path), DATA_KINDS)
    if len(raw) == 0:
        raise DataError(f"{path} holds no rows to predict")
    return [str(i) for i in range(len(raw))], _shaped(raw, model, path)


def _width(model: _Model) -> int | None:
    """Values per sample, when the sample shape is fixed."""
    if any(d is None for d in model.sample_shape):
        return None
    return int(np.prod(model.sample_shape)) if model.sample_shape else 1


def _read_csv(path: Path, model: _Model) -> np.ndarray:
    from gradwise.data.tabular import _numeric_column
    from gradwise.data.tabular import _read_csv as read

    header, rows = read(path, ",")
    width, names = _width(model), model.feature_names
    if names is not None and width is not None and len(names) != width:
        names = None
    if names and any(n in header for n in names):
        missing = [n for n in names if n not in header]
        if missing:
            raise DataError(
                f"{path}: {len(names) - len(missing)} of the {len(names)} feature columns the "
                f"model was trained on; missing {_preview(missing)} (got columns "
                f"{_preview(header)})"
            )
        columns = list(names)
    else:
        label = [h for h in header if h == model.target or h.lower() in LABEL_COLUMNS]
        columns = [h for h in header if h not in label] if len(label) == 1 else list(header)
        if width is not None and len(columns) != width:
            ignored = f" besides the label column {label[0]!r}" if len(label) == 1 else ""
            expected = f" ({_preview(names)})" if names else ""
            raise DataError(
                f"{path}: expected {width} feature columns{expected}, got {len(columns)}{ignored}"
            )
    return np.stack([_numeric_column(rows, header.index(c), c, path) for c in columns], axis=1)


def _read_array(path: Path, model: _Model) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {path} as a NumPy file (no pickles): {exc}") from None
    if not hasattr(loaded, "files"):
        return loaded
    with loaded as archive:
        keys = [k for k in (model.npz_key, *ARRAY_KEYS) if k and k in archive.files]
        if not keys and len(archive.files) == 1:
            keys = archive.files
        if not keys:
            raise DataError(
                f"{path}: no inputs array; expected one named {' or '.join(ARRAY_KEYS)} (or a "
                f"single array); arrays in the file: {', '.join(archive.files) or 'none'}"
            )
        return archive[keys[0]]


def _read_images(root: Path, model: _Model) -> tuple[list[str], np.ndarray]:
    from gradwise.data.images import IMAGE_SUFFIXES, _read

    pre = model.preprocessing
    if "resize" not in pre or "color" not in pre:
        raise ConfigError(
            "--data", str(root), "a CSV or NumPy file",
            f"{model.name} was not trained on images (its preprocessing has no resize/color)",
        )  # fmt: skip
    files = sorted(
        f for f in root.rglob("*")
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        and not any(p.startswith(".") for p in f.relative_to(root).parts)
    )  # fmt: skip
    if not files:
        raise DataError(
            f"--data: {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); expected "
            "images, directly or in sub-folders"
        )
    size = (int(pre["resize"][0]), int(pre["resize"][1]))
    pixels = np.stack([_read(f, str(pre["color"]), size) for f in files]).astype(np.float32)
    return [f.relative_to(root).as_posix() for f in files], pixels


def _shaped(raw: np.ndarray, model: _Model, path: Path) -> np.ndarray:
    """``raw`` as ``[N, *sample shape]`` (flat rows are reshaped when their width fits)."""
    if raw.dtype.kind not in "biuf":
        raise DataError(f"{path}: inputs must be numbers; got an array of dtype {raw.dtype}")
    want = model.sample_shape
    if raw.ndim == 2 and len(want) > 1 and _width(model) == raw.shape[1]:
        raw = raw.reshape(len(raw), *want)
    fits = raw.ndim == len(want) + 1 and all(
        w is None or w == g for w, g in zip(want, raw.shape[1:], strict=True)
    )
    if not fits:
        text = "[" + ", ".join("any" if d is None else str(d) for d in want) + "]"
        raise DataError(
            f"{path}: expected samples of shape {text}, got {list(raw.shape[1:])} "
            f"({len(raw)} samples)"
        )
    return raw


def _model_inputs(raw: np.ndarray, model: _Model) -> np.ndarray:
    """Raw inputs to model inputs: token ids as int64, else the run's scale and standardisation."""
    from gradwise.deploy.card import preprocess

    if model.input_dtype.startswith("int"):
        if raw.dtype.kind == "f" and not np.all(raw == np.round(raw)):
            raise DataError("the model takes integer token ids; the data holds fractional values")
        return raw.astype(np.int64)
    pre = {k: model.preprocessing[k] for k in ("scale", "standardize") if k in model.preprocessing}
    return preprocess(raw.astype(np.float64), pre).astype(np.float32)


# -- from outputs to predictions ------------------------------------------------------------------


def _interpret(model: _Model, outputs: np.ndarray, index: list[str]) -> Predictions:
    t = model.temperature
    result = Predictions(
        task=model.task, source=model.source, temperature=t or 1.0, calibrated=t is not None,
        index=index, outputs=outputs,
    )  # fmt: skip
    if model.task in ("binary", "multiclass", "multilabel"):
        probs = probabilities(outputs, model.task, result.temperature)
        names = (
            model.class_names
            if model.class_names and len(model.class_names) == probs.shape[1]
            else None
        )
        result.probabilities, result.class_names = (
            probs,
            names or [str(i) for i in range(probs.shape[1])],
        )
        if model.task == "multilabel":
            chosen = probs >= 0.5
            result.predictions = chosen.astype(int).tolist()
            result.labels = [[result.class_names[j] for j in np.flatnonzero(r)] for r in chosen]
        else:
            classes = probs.argmax(1)
            result.predictions = classes.tolist()
            result.labels = [result.class_names[c] for c in classes]
        if t is None:
            result.notes.append(
                f"probabilities are not calibrated (T = 1): {model.name} has no fitted temperature "
                f"({model.temperature_from}); `gradwise evaluate` fits one on validation data"
            )
        else:
            result.notes.append(
                f"probabilities calibrated with temperature {t:.4g} ({model.temperature_from})"
            )
    else:  # regression (and custom): values in the target's units
        values = outputs.reshape(len(outputs), -1)
        target = model.preprocessing.get("target_standardize")
        if target:
            values = values * np.asarray(target["std"]).reshape(1, -1) + np.asarray(
                target["mean"]
            ).reshape(1, -1)
        result.predictions = (values[:, 0] if values.shape[1] == 1 else values).tolist()
    return result


def table(result: Predictions) -> tuple[list[str], list[list[Any]]]:
    """The predictions CSV: a row or file column, the predicted label (class name when known),
    its class index, then one probability column per class (``p_<class>``); regression: values."""
    first = "row" if all(i.isdigit() for i in result.index) else "file"
    rows: list[list[Any]] = []
    if result.probabilities is None:
        values = np.asarray(result.predictions, dtype=np.float64).reshape(len(result.index), -1)
        header = [first] + (
            ["prediction"]
            if values.shape[1] == 1
            else [f"prediction_{j}" for j in range(values.shape[1])]
        )
        for name, row in zip(result.index, values, strict=True):
            rows.append([name, *(format(v, DIGITS) for v in row)])
        return header, rows
    names = result.class_names or []
    header = [first, "label", "class", *(f"p_{n}" for n in names)]
    labels = result.labels or result.predictions
    for name, label, pred, probs in zip(
        result.index, labels, result.predictions, result.probabilities, strict=True
    ):
        if result.task == "multilabel":
            label, pred = ";".join(label), ";".join(str(j) for j, on in enumerate(pred) if on)
        rows.append([name, label, pred, *(format(p, DIGITS) for p in probs)])
    return header, rows


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from gradwise.tracking.files import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buffer.getvalue())


def _preview(names: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(repr(str(x)) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


# -- language models ------------------------------------------------------------------------------


def generate(
    model: _Model, prompt: str | None, max_tokens: int, temperature: float, seed: int
) -> Predictions:
    """``max_tokens`` tokens after ``prompt``, each sampled from ``softmax(logits / temperature)``
    (argmax at temperature 0) with ``numpy.random.default_rng(seed)``; the context is cropped to
    the model's longest (an export's fixed length is padded on the right: a causal model's output
    at the last prompt position does not see the padding)."""
    from scipy.special import softmax

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError("max_tokens", max_tokens, "an integer >= 1")
    if (
        not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ConfigError("temperature", temperature, "a number >= 0 (0: greedy decoding)")
    vocab = model.preprocessing.get("char_vocab")
    ids = _prompt_ids(prompt, vocab)
    if model.vocab_size is not None and not all(0 <= i < model.vocab_size for i in ids):
        raise ConfigError("--prompt", prompt, f"token ids in [0, {model.vocab_size - 1}]")
    notes = [] if prompt else [f"no --prompt: started from token {ids[0]}"]
    rng = np.random.default_rng(seed)
    context = model.context
    new: list[int] = []
    for _ in range(max_tokens):
        window = ids[-context:] if context else ids
        x = np.asarray([window], dtype=np.int64)
        if model.fixed_length and context and len(window) < context:
            x = np.pad(x, ((0, 0), (0, context - len(window))))
        logits = np.asarray(model.run(x), dtype=np.float64)[0, len(window) - 1]
        if temperature == 0:
            token = int(logits.argmax())
        else:
            token = int(rng.choice(len(logits), p=softmax(logits / temperature)))
        ids.append(token)
        new.append(token)
    text = "".join(vocab[i] for i in new) if vocab else " ".join(map(str, new))
    shown_prompt = prompt if prompt else (vocab[ids[0]] if vocab else str(ids[0]))
    return Predictions(
        task="lm", source=model.source, temperature=1.0, calibrated=False, text=text,
        tokens=new, prompt=shown_prompt, notes=notes, separator="" if vocab else " ",
    )  # fmt: skip


def _prompt_ids(prompt: str | None, vocab: str | None) -> list[int]:
    if vocab:
        if not prompt:
            return [vocab.index("\n") if "\n" in vocab else 0]
        missing = sorted(set(prompt) - set(vocab))
        if missing:
            raise ConfigError(
                "--prompt", prompt, "characters of the run's vocabulary",
                f"not in it: {missing[:10]}",
            )  # fmt: skip
        return [vocab.index(c) for c in prompt]
    if not prompt:
        return [0]
    try:
        return [int(t) for t in prompt.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(
            "--prompt",
            prompt,
            "token ids separated by spaces (the run has no character vocabulary)",
        ) from None


callable_as_namesake(__name__)
