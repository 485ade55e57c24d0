"""The Tracker: metrics to ``metrics.jsonl`` on the training hot path, and to TensorBoard, MLflow and
Weights & Biases from a background thread.

``Tracker.log`` only formats one JSON line into a buffered file and queues the values, which costs
microseconds. A background thread flushes the file every second (a killed run loses at most about a
second of metrics), starts the loggers once the run has gone on for ``start_after_secs`` (or when it
ends, whichever is first), writes TensorBoard and W&B, and sends MLflow one ``log_batch`` every few
seconds. Importing MLflow takes seconds of interpreter time: started at once, it would fight a
short run for the GIL and slow both; a run shorter than ``start_after_secs`` pays for it once, at
its end. A logger that fails is a warning, never an error in the run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import netrc
import os
import re
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gradwise.errors import GradwiseError
from gradwise.tracking.files import METRICS_FILE, repair_metrics_tail

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_RESERVED = frozenset({"step", "epoch", "time", "split"})
_MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_TRACK_EXTRA = "pip install 'gradwise[track]'"

# (step, epoch, unix time, split, {metric: value}) as queued for the background thread
Record = tuple[int, int | None, float, str, dict[str, float]]


class Tracker:
    """Logs a run's metrics to ``metrics.jsonl`` and, where enabled, TensorBoard, MLflow and W&B.

    Each of ``tensorboard``, ``mlflow`` and ``wandb`` is ``None`` for "on if installed" (W&B also
    needs a login or ``WANDB_API_KEY`` and ``WANDB_MODE`` not ``disabled``), ``True`` for "required"
    (a GradwiseError if the package is missing) or ``False`` for off. ``params`` (the recipe,
    flattened to dotted keys) is logged as MLflow params, W&B config and a TensorBoard text.
    ``tags`` are added to the MLflow run (e.g. ``mlflow.parentRunId`` makes it a child run, as the
    tuner does for its trials). Use as a context manager, or call :meth:`close` with the run's final state.
    """

    # metrics.jsonl is flushed (and TensorBoard and W&B written) every flush_secs
    flush_secs: float = 1.0
    mlflow_flush_secs: float = 5.0  # MLflow log_batch interval
    start_after_secs: float = 10.0  # the loggers start this long into the run, or at its end

    def __init__(
        self,
        run_dir: Path,
        *,
        params: dict,
        tensorboard: bool | None = None,
        mlflow: bool | None = None,
        wandb: bool | None = None,
        experiment: str = "gradwise",
        mlflow_uri: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.params = flatten_params(params)
        path = self.run_dir / METRICS_FILE
        repair_metrics_tail(path)  # a run killed mid-line must not glue our first line to it
        self._file = open(path, "ab", buffering=1 << 16)  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()  # guards self._file between log() and the flusher
        self._pending: deque[Record] = deque()
        self._closed = False
        self._backends: list[_Backend] = []
        self._failures: list[int] = []  # consecutive errors per logger; -1: switched off
        try:  # a logger that is required but not installed is an error before the run starts
            self._starting: list[tuple[type[_Backend], tuple]] = [
                (cls, args)
                for cls, flag, args in (
                    (_TensorBoard, tensorboard, (self.run_dir, self.params)),
                    (_MLflow, mlflow, (self.run_dir, self.params, experiment, mlflow_uri, tags)),
                    (_Wandb, wandb, (self.run_dir, self.params, experiment)),
                )
                if _enabled(cls, flag)
            ]
        except BaseException:
            self._file.close()
            raise
        self._started = threading.Event()
        self._flush_failing = False
        self._start_now = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="gradwise-tracker", daemon=True)
        self._thread.start()

    @property
    def backends(self) -> list[str]:
        """Names of the running loggers besides metrics.jsonl, e.g. ``["tensorboard", "mlflow"]``
        (starts them now if they have not started yet)."""
        self._start_now.set()
        self._started.wait()
        return [b.name for b in self._backends]

    @property
    def mlflow_run_id(self) -> str | None:
        """The MLflow run's id (starts the loggers now if needed); None without MLflow."""
        self._start_now.set()
        self._started.wait()
        return next((b.run_id for b in self._backends if isinstance(b, _MLflow)), None)

    def log(
        self, step: int, metrics: Mapping[str, float], *, split: str, epoch: int | None = None
    ) -> None:
        """Record ``metrics`` (name -> number) of ``split`` at ``step``. Cheap: no I/O, no waiting."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        values = {name: float(value) for name, value in metrics.items()}
        if not _RESERVED.isdisjoint(values):
            raise ValueError(f"metric names {sorted(_RESERVED)} are reserved, got {sorted(values)}")
        step, epoch = int(step), None if epoch is None else int(epoch)
        t = time.time()
        record = {"step": step, "epoch": epoch, "time": round(t, 3), "split": split, **values}
        line = (json.dumps(record) + "\n").encode()
        with self._lock:
            if self._closed:
                raise RuntimeError("Tracker.log() called after close()")
            self._file.write(line)
        if self._starting:
            self._pending.append((step, epoch, t, split, values))

    def sync(self) -> None:
        """Make every metric logged so far durable in metrics.jsonl (flush and fsync), e.g. before a
        checkpoint, so that a run killed after it still has the metrics it resumes from."""
        with self._lock:
            if not self._closed:
                self._file.flush()
                os.fsync(self._file.fileno())

    def close(self, state: str = "finished") -> None:
        """Flush everything and end the run in every logger with ``state`` (finished, failed or
        interrupted; MLflow gets FINISHED, FAILED or KILLED). Calling it again does nothing."""
        if state not in _MLFLOW_STATUS:
            raise ValueError(f"close state must be one of {tuple(_MLFLOW_STATUS)}, got {state!r}")
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._start_now.set()  # a run shorter than start_after_secs starts its loggers now
        self._stop.set()
        self._thread.join()
        with self._lock:  # metrics.jsonl first: it is the record that must survive
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        self._deliver()
        for i, backend in enumerate(self._backends):
            self._guarded(i, backend.send)
            _try(backend.name, backend.close, state)  # even if switched off: end the run

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close("finished")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted")
        else:
            self.close("failed")

    # -- background thread ---------------------------------------------------------------------

    def _start_backends(self) -> None:
        for cls, args in self._starting:
            try:
                backend = cls(*args)
            except Exception as e:  # installed but broken, or its store refuses: the run goes on
                logger.warning("%s logging is off: %s: %s", cls.name, type(e).__name__, e)
                continue
            self._backends.append(backend)
            self._failures.append(0)

    def _work(self) -> None:
        start_at = time.monotonic() + self.start_after_secs
        while not self._started.is_set():
            self._start_now.wait(min(self.flush_secs, max(start_at - time.monotonic(), 0.0)))
            self._flush_file()
            if self._start_now.is_set() or time.monotonic() >= start_at:
                try:
                    self._start_backends()
                finally:
                    self._started.set()
        last_send = time.monotonic()
        while not self._stop.wait(self.flush_secs):
            self._flush_file()
            self._deliver()
            if time.monotonic() - last_send >= self.mlflow_flush_secs:
                last_send = time.monotonic()
                for i, backend in enumerate(self._backends):
                    self._guarded(i, backend.send)

    def _flush_file(self) -> None:
        """Flush metrics.jsonl; a failure (a full disk) is one warning, not one every second."""
        with self._lock:
            if self._closed:
                return
            try:
                self._file.flush()
            except OSError as e:
                if not self._flush_failing:
                    logger.warning("%s logging failed, retrying: %s", METRICS_FILE, e)
                self._flush_failing = True
                return
            if self._flush_failing:
                logger.warning("%s logging works again", METRICS_FILE)
            self._flush_failing = False

    def _deliver(self) -> None:
        """Hand the queued records to each logger (MLflow only buffers them until ``send``)."""
        records = []
        while self._pending:
            records.append(self._pending.popleft())
        if records:
            for i, backend in enumerate(self._backends):
                self._guarded(i, backend.add, records)

    def _guarded(self, i: int, fn: Any, *args: Any) -> None:
        """Run a logger call; a logger that fails 3 times in a row is switched off, not training."""
        if self._failures[i] < 0:
            return
        name = self._backends[i].name
        if _try(name, fn, *args):
            self._failures[i] = 0
            return
        self._failures[i] += 1
        if self._failures[i] >= 3:
            logger.warning("%s logging switched off after repeated errors", name)
            self._failures[i] = -1


def _try(name: str, fn: Any, *args: Any) -> bool:
    try:
        fn(*args)
        return True
    except Exception as e:
        logger.warning("%s logging failed: %s: %s", name, type(e).__name__, e)
        return False


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``; already flat dicts pass unchanged."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _enabled(cls: type[_Backend], flag: bool | None) -> bool:
    """Resolve a logger's on/off/auto setting; a GradwiseError if required but not installed."""
    if flag is False:
        return False
    try:
        installed = importlib.util.find_spec(cls.package) is not None
    except (ImportError, ValueError):
        installed = False
    if flag is None:
        return installed and cls.configured()
    if not installed:
        raise GradwiseError(cls.missing("is not installed"))
    return True


# -- loggers -----------------------------------------------------------------------------------


class _Backend:
    """A logger fed from the background thread: ``add`` records, ``send`` what is buffered."""

    name = ""
    package = ""
    install = _TRACK_EXTRA

    @classmethod
    def configured(cls) -> bool:
        return True

    @classmethod
    def missing(cls, problem: str) -> str:
        return (
            f"{cls.name} logging was requested, but the '{cls.package}' package {problem}; "
            f"install it with: {cls.install} (or turn {cls.name} logging off)"
        )

    def add(self, records: list[Record]) -> None:
        raise NotImplementedError

    def send(self) -> None:
        pass

    def close(self, state: str) -> None:
        pass


class _TensorBoard(_Backend):
    name, package = "tensorboard", "tensorboard"

    def __init__(self, run_dir: Path, params: dict[str, Any]) -> None:
        _tensorboard_without_tensorflow()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), flush_secs=10)
        if params:
            rows = [f"| {_cell(k)} | {_cell(_param_text(v, 500))} |" for k, v in params.items()]
            self.writer.add_text("params", "\n".join(["| param | value |", "|---|---|", *rows]))

    def add(self, records: list[Record]) -> None:
        for step, _epoch, t, split, values in records:
            for name, value in values.items():
                self.writer.add_scalar(f"{split}/{name}", value, step, walltime=t)

    def send(self) -> None:
        self.writer.flush()

    def close(self, state: str) -> None:
        self.writer.close()


def _tensorboard_without_tensorflow() -> None:
    """Let TensorBoard write event files without importing TensorFlow.

    TensorBoard imports TensorFlow whenever it is installed (seconds of start-up and its log lines
    on stderr), though writing scalars needs none of it. ``tensorboard.compat.notf`` is TensorBoard's
    own switch to its TensorFlow stub; set only when this process has not imported TensorFlow.
    """
    if "tensorflow" in sys.modules or "tensorboard.compat.notf" in sys.modules:
        return
    sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")


class _MLflow(_Backend):
    name, package = "mlflow", "mlflow"

    def __init__(
        self,
        run_dir: Path,
        params: dict[str, Any],
        experiment: str,
        uri: str | None,
        extra_tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as max_len
        except ImportError:
            max_len = 500

        self.run_dir = run_dir.resolve()
        root = self.run_dir.parent
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifact_location = None
        if not uri:  # a local database shared by all runs under the runs root
            uri = f"sqlite:///{(root / 'mlflow.db').as_posix()}"
            artifact_location = (root / "mlartifacts").as_uri()
        # the first use of a database creates its tables: slow (seconds) and chatty
        with quiet_loggers("mlflow.store.db.utils", "alembic"):
            self.client = MlflowClient(tracking_uri=uri)
            experiment_id = self._experiment_id(experiment, artifact_location)
        tags = {"gradwise.run_dir": str(self.run_dir)}
        commit = _git_commit(run_dir)
        if commit:
            tags["mlflow.source.git.commit"] = commit
        tags.update({str(k): str(v) for k, v in (extra_tags or {}).items()})
        run = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
        self.run_id: str = run.info.run_id
        entries = [Param(k[:250], _param_text(v, max_len)) for k, v in params.items()]
        for i in range(0, len(entries), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=entries[i : i + 100])
        self.pending: list[Any] = []
        self.keys: dict[str, str] = {}

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:  # another run created it meanwhile
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise GradwiseError(
                f"MLflow experiment {name!r} was deleted; restore it (mlflow experiments restore) "
                "or log to another experiment name"
            )
        return experiment.experiment_id

    def add(self, records: list[Record]) -> None:
        from mlflow.entities import Metric

        for step, _epoch, t, split, values in records:
            ms = int(t * 1000)
            for name, value in values.items():
                key = self.keys.get(f"{split}/{name}") or self._key(split, name)
                self.pending.append(Metric(key, value, ms, step))

    def _key(self, split: str, name: str) -> str:
        # MLflow rejects a whole batch over one bad name: keep letters, digits, _ - . space /
        key = re.sub(r"[^\w\-. /]", "_", f"{split}/{name}")[:250]
        self.keys[f"{split}/{name}"] = key
        return key

    def send(self) -> None:
        while self.pending:  # what fails stays pending for the next try
            self.client.log_batch(self.run_id, metrics=self.pending[:1000])
            del self.pending[:1000]

    def close(self, state: str) -> None:
        for name in ("recipe.yaml", "environment.json"):
            if (self.run_dir / name).is_file():
                _try(self.name, self.client.log_artifact, self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, _MLFLOW_STATUS[state])


class _Wandb(_Backend):
    name, package, install = "wandb", "wandb", "pip install wandb"

    @classmethod
    def configured(cls) -> bool:
        """Logged in or offline, and not disabled: auto mode must never prompt for a login."""
        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true"):
            return False
        if mode in ("offline", "dryrun") or os.environ.get("WANDB_API_KEY"):
            return True
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        try:
            return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
        except (OSError, netrc.NetrcParseError):
            return False

    def __init__(self, run_dir: Path, params: dict[str, Any], experiment: str) -> None:
        import wandb

        self.run = wandb.init(
            project=experiment, name=run_dir.name, dir=str(run_dir), config=params
        )

    def add(self, records: list[Record]) -> None:
        for step, epoch, _t, split, values in records:
            data: dict[str, Any] = {f"{split}/{name}": value for name, value in values.items()}
            if epoch is not None:
                data["epoch"] = epoch
            self.run.log(data, step=step)

    def close(self, state: str) -> None:
        self.run.finish(exit_code=0 if state == "finished" else 1)


def _param_text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _git_commit(run_dir: Path) -> str | None:
    try:
        env = json.loads((run_dir / "environment.json").read_text(encoding="utf-8"))
        return (env.get("git") or {}).get("commit")
    except (OSError, ValueError, AttributeError):
        return None


@contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Silence INFO messages of the named loggers for the duration."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
