"""``gradwise serve``: an exported model behind HTTP (FastAPI, uvicorn, ONNX Runtime).

Endpoints (every one but ``/health`` behind the bearer token when one is set)::

    POST /v1/predict   {"instances": [[...], ...]} (application/json) or np.save bytes
                       (application/x-npy) -> {"model", "predictions", "probabilities"?, "labels"?}
    GET  /health       liveness and the serving settings (never needs the token)
    GET  /v1/model     the model card: what a client needs to call the model; the whole card
                       (host paths removed) with the token
    GET  /v1/drift     PSI and KS per feature of the recent inputs against reference.json
    GET  /metrics      Prometheus text: requests, latency, batch sizes, errors
    GET  /docs, /openapi.json

Concurrent requests are micro-batched into ONNX Runtime calls of at most ``max_batch_size`` rows
(``batching.MicroBatcher``); a larger request is split, so memory per request is bounded. Every
request is checked against the model card (shape, dtype, finite values, token ids in range, at
most ``max_rows`` instances): a bad one gets a 4xx naming what is wrong, never a 500, and the
server keeps serving. Large bodies are parsed in worker threads, a bounded number of bytes at a
time, so the event loop stays free for ``/health`` and small requests.

No client can sink the server: uvicorn's HTTP protocol is extended (``gradwise.deploy.server``) with
what it lacks: a header size limit (431), a deadline for the request headers and one for the body
(408), and a cap on open connections that closes the connection idle longest to admit a new one.
On SIGINT/SIGTERM the server answers every request it has received before it stops.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import io
import json
import logging
import os
import re
import signal
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from gradwise._lazy import callable_as_namesake
from gradwise.deploy.batching import MicroBatcher, ShuttingDown
from gradwise.deploy.card import INT8, card_temperature, preprocess, sha256_file
from gradwise.deploy.formats import serving_card
from gradwise.errors import ConfigError, GradwiseError, warn

logger = logging.getLogger("gradwise.serve")

JSON_TYPE = "application/json"
NPY_TYPE = "application/x-npy"
FORM_TYPE = "application/x-www-form-urlencoded"  # what curl -d sends
NPY_MAGIC = b"\x93NUMPY"
API_VERSION = "1"
CLASSIFICATION = ("binary", "multiclass", "multilabel")
ENDPOINTS = (
    "/v1/predict",
    "/v1/model",
    "/v1/drift",
    "/health",
    "/metrics",
    "/docs",
    "/openapi.json",
)
LARGE_BODY = 64 * 1024  # bodies above this are parsed in a worker thread, within the byte budget
PUBLIC_CARD = ("name", "format", "task", "inputs", "outputs", "class_labels")
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


# -- request and response types ----------------------------------------------------------------


class PredictRequest(BaseModel):
    """A batch of instances, each shaped like one sample of the model's input."""

    instances: list[Any] = Field(
        min_length=1,
        description="Instances, e.g. rows of features [[0.1, 2.3, ...], ...] or token id lists.",
    )


class PredictResponse(BaseModel):
    """Predictions, one per instance; classification adds probabilities and class labels."""

    model: str
    predictions: list[Any] = Field(
        description="Class index (multiclass, binary), 0/1 per label (multilabel), value(s) "
        "(regression) or the next token id (language model)."
    )
    probabilities: list[Any] | None = Field(
        None, description="Class probabilities (classification)."
    )
    labels: list[Any] | None = Field(
        None, description="Predicted class labels, when the card has them."
    )


class ErrorResponse(BaseModel):
    """Every error: what is wrong, naming the field, the value and what was expected."""

    detail: str


class HealthResponse(BaseModel):
    status: str
    model: str
    task: str
    artifact: str
    threads: int
    max_batch_size: int
    max_wait_ms: float
    max_rows: int
    max_body_mb: float
    drift: bool


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[int | str | None] = Field(description="None (or a name): any size on that axis")
    dtype: str


class ModelCardResponse(BaseModel):
    """What a client needs to call the model; with the token, the whole model card (model.json)
    with host paths reduced to their last component."""

    model_config = ConfigDict(extra="allow")

    name: str
    format: str
    task: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    class_labels: list[Any] | None = None


class FeatureDrift(BaseModel):
    name: str
    psi: float
    psi_level: str = Field(description="none (< 0.1), moderate (0.1-0.25) or significant (> 0.25)")
    ks_statistic: float | None
    ks_pvalue: float | None
    ks_drift: bool = Field(
        description="KS rejects at alpha 0.05, Bonferroni-corrected over features"
    )
    mean: float
    reference_mean: float | None


class DriftResponse(BaseModel):
    verdict: str = Field(
        description="no drift, moderate drift, significant drift or insufficient data"
    )
    rows: int = Field(description="Rows in the window now")
    window: int
    min_rows: int
    kind: str = Field(description="features (tabular rows) or summary (per-sample summaries)")
    thresholds: dict[str, float]
    drifted: list[str]
    features: list[FeatureDrift]
    predictions: dict[str, Any] | None


class InputError(ValueError):
    """A request the model cannot take; its message names what is wrong (HTTP ``status``)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


# -- the model ---------------------------------------------------------------------------------


class Model:
    """An exported model: the ONNX Runtime session, input checks from the card, pre- and
    post-processing (standardisation, softmax/sigmoid, class labels)."""

    def __init__(
        self,
        artifact_dir: str | Path,
        *,
        int8: bool = False,
        threads: int | None = None,
        max_rows: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.dir = Path(artifact_dir)
        self.card = serving_card(self.dir)
        self.name: str = self.card.get("name") or self.dir.name
        self.task: str = self.card.get("task") or "multiclass"
        file, expected_sha = self.card["artifact"], self.card.get("sha256")
        if int8:
            quantized = self.card.get("quantized") or {}
            file, expected_sha = quantized.get("artifact", INT8), quantized.get("sha256")
        self.file = self.dir / file
        if not self.file.is_file():
            expected = f"an artifact exported with quantization ({INT8})" if int8 else file
            raise ConfigError("artifact", str(self.file), expected)
        if expected_sha and sha256_file(self.file) != expected_sha:
            raise GradwiseError(
                f"{self.file} does not match the sha256 in its model card: the file was changed "
                "or damaged after export; export again"
            )
        self.max_rows = max_rows
        self.threads = threads or min(4, os.cpu_count() or 1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # threads that spin between calls steal the CPU the event loop needs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.file), options, providers=["CPUExecutionProvider"]
        )
        ort_in, ort_out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        spec = self.card["inputs"][0]
        self.input_name: str = ort_in.name
        self.output_name: str = ort_out.name
        self.dtype = np.dtype(_ORT_DTYPES.get(ort_in.type, spec.get("dtype", "float32")))
        shape = spec.get("shape") or [
            None if isinstance(d, str) or d is None else d for d in ort_in.shape
        ]
        self.sample_shape: list[int | None] = [
            None if d is None or isinstance(d, str) else int(d) for d in shape[1:]
        ]
        self.class_labels: list[Any] | None = self.card.get("class_labels")
        # probabilities are softmax(logits / T) (sigmoid for binary and multilabel) with the
        # temperature the run fitted on validation data; T = 1 without one
        self.temperature = card_temperature(self.card) or 1.0
        pre = self.card.get("preprocessing") or {}
        self.preprocessing = {k: pre[k] for k in ("scale", "standardize") if k in pre}
        self.target_standardize = pre.get("target_standardize")
        self.char_vocab: str | None = pre.get("char_vocab")
        self.vocab_size = _vocab_size(self.card, pre, self.dtype)

    # -- input checks: every failure is an InputError naming what is wrong

    def parse(self, body: bytes, npy: bool) -> np.ndarray:
        """Checked instances from a JSON or ``np.save`` body."""
        return self.parse_npy(body) if npy else self.parse_json(body)

    def parse_json(self, body: bytes) -> np.ndarray:
        """Instances from a JSON body ``{"instances": [...]}``, checked."""
        try:
            request = PredictRequest.model_validate_json(body)
        except ValidationError as e:
            raise InputError(_pydantic_message(e)) from None
        try:
            x = np.asarray(request.instances)
        except (ValueError, TypeError):
            raise InputError(
                f"instances must all have the same shape {_shape_text(self.sample_shape)}; "
                "they are ragged (lists of different lengths)"
            ) from None
        return self.validate(x)

    def parse_npy(self, body: bytes) -> np.ndarray:
        """Instances from ``np.save`` bytes (a ``[N, ...]`` array), checked. The header is checked
        against the body's length first, and the array is a view of the body: nothing is
        allocated for what a header claims."""
        from numpy.lib import format as npy_format

        readers = {
            (1, 0): npy_format.read_array_header_1_0,
            (2, 0): npy_format.read_array_header_2_0,
        }
        f = io.BytesIO(body)
        try:
            version = npy_format.read_magic(f)
            shape, fortran, dtype = readers[version](f)
        except Exception as e:
            reason = f"version {e.args[0]}" if isinstance(e, KeyError) else str(e)
            raise InputError(
                "the body is not a NumPy .npy array (np.save bytes of one array, format 1.0 or "
                f"2.0): {reason}"
            ) from None
        if dtype.hasobject:
            raise InputError(
                "the body is not a NumPy .npy array of numbers: it holds Python objects (pickles "
                "are not accepted)"
            )
        count, data = int(np.prod(shape)), len(body) - f.tell()
        if data != count * dtype.itemsize:
            raise InputError(
                f"the .npy body holds {data} bytes of data; its header (shape {list(shape)}, "
                f"{dtype}) says {count * dtype.itemsize}"
            )
        x = np.frombuffer(body, dtype=dtype, count=count, offset=f.tell())
        return self.validate(x.reshape(shape, order="F" if fortran else "C"))

    def validate(self, x: np.ndarray) -> np.ndarray:
        """``x`` as the model's dtype, after checking dtype, shape, finiteness and token ids."""
        want = _shape_text(self.sample_shape)
        integer = self.dtype.kind in "iu"
        if x.dtype.kind not in ("iu" if integer else "iuf"):
            got = {"U": "strings", "S": "bytes", "O": "mixed values or nulls", "b": "booleans"}.get(
                x.dtype.kind, f"dtype {x.dtype}"
            )
            raise InputError(
                f"instances must be {'integer token ids' if integer else 'numbers'}; got {got}"
            )
        if x.ndim == len(self.sample_shape) and x.ndim > 0:
            raise InputError(
                f"instances must be a list of instances, each of shape {want}; got one array of "
                f"shape {list(x.shape)} (wrap a single instance in a list)"
            )
        if x.ndim != len(self.sample_shape) + 1 or len(x) == 0:
            raise InputError(
                f"each instance must have shape {want}; got instances of shape {list(x.shape[1:])}"
            )
        if self.max_rows is not None and len(x) > self.max_rows:
            raise InputError(
                f"the request has {len(x)} instances; at most {self.max_rows} are allowed per "
                "request (--max-rows): send them in several requests",
                status=413,
            )
        for axis, (got, expected) in enumerate(zip(x.shape[1:], self.sample_shape, strict=True)):
            if expected is not None and got != expected:
                what = f"entries on axis {axis + 1}"
                if len(self.sample_shape) == 1:
                    what = "token ids" if integer else "features"
                raise InputError(
                    f"each instance must have shape {want}: expected {expected} {what}, got {got}"
                )
        if any(d == 0 for d in x.shape[1:]):
            raise InputError(f"instances are empty: shape {list(x.shape[1:])}")
        if integer:
            low, high = int(x.min()), int(x.max())
            if low < 0 or (self.vocab_size is not None and high >= self.vocab_size):
                bad = low if low < 0 else high
                limit = f"[0, {self.vocab_size - 1}]" if self.vocab_size else "non-negative"
                raise InputError(f"token id {bad} is out of range: ids must be in {limit}")
            return x.astype(self.dtype, copy=False)
        with np.errstate(over="ignore"):
            x = x.astype(self.dtype, copy=False)
        finite = np.isfinite(x).reshape(len(x), -1).all(1)
        if not finite.all():
            i = int(np.argmin(finite))
            raise InputError(
                f"instances must be finite numbers: instance {i} holds NaN or infinity "
                f"(or a value too large for {self.dtype})"
            )
        return x

    # -- the model call (in a worker thread) and the answer

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model's raw output (logits or values) for checked, raw instances."""
        if self.preprocessing and x.dtype.kind == "f":
            x = preprocess(x, self.preprocessing).astype(self.dtype, copy=False)
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def respond(self, out: np.ndarray) -> dict[str, Any]:
        """The response body for output rows: predictions, probabilities, labels."""
        out = np.asarray(out, dtype=np.float64)
        finite = np.isfinite(out).reshape(len(out), -1).all(1)
        if not finite.all():
            raise InputError(
                f"the model's output for instance {int(np.argmin(finite))} is not finite: its "
                "inputs are far outside the range the model was trained on"
            )
        body: dict[str, Any] = {"model": self.name}
        labels = self.class_labels
        if self.task in CLASSIFICATION:
            out = out / self.temperature  # never changes a predicted class, only its probability
        if self.task == "multiclass":
            probs = _softmax(out.reshape(len(out), -1))
            classes = probs.argmax(1)
            body.update(predictions=classes.tolist(), probabilities=probs.tolist())
            if labels:
                body["labels"] = [labels[c] for c in classes]
        elif self.task == "binary":
            flat = out.reshape(len(out), -1)
            p1 = _softmax(flat)[:, 1] if flat.shape[1] == 2 else _sigmoid(flat[:, 0])
            classes = (p1 >= 0.5).astype(np.int64)
            body.update(
                predictions=classes.tolist(), probabilities=np.stack([1 - p1, p1], 1).tolist()
            )
            if labels:
                body["labels"] = [labels[c] for c in classes]
        elif self.task == "multilabel":
            probs = _sigmoid(out.reshape(len(out), -1))
            chosen = (probs >= 0.5).astype(np.int64)
            body.update(predictions=chosen.tolist(), probabilities=probs.tolist())
            if labels:
                body["labels"] = [[labels[j] for j in np.flatnonzero(row)] for row in chosen]
        elif self.task == "lm":
            next_ids = out[:, -1].argmax(-1) if out.ndim == 3 else out.argmax(-1)
            body["predictions"] = next_ids.tolist()
            if self.char_vocab:
                body["labels"] = [self.char_vocab[i] for i in next_ids]
        else:  # regression
            body["predictions"] = self._values(out).tolist()
        return body

    def drift_predictions(self, out: np.ndarray) -> np.ndarray | None:
        """What drift monitoring tracks of the outputs: class indices or regression values."""
        if self.task == "multiclass":
            return np.asarray(out).reshape(len(out), -1).argmax(1)
        if self.task == "binary":
            flat = np.asarray(out, dtype=np.float64).reshape(len(out), -1)
            return (flat[:, 1] > flat[:, 0] if flat.shape[1] == 2 else flat[:, 0] >= 0).astype(
                np.int64
            )
        if self.task == "regression":
            return self._values(np.asarray(out, dtype=np.float64))
        return None

    def _values(self, out: np.ndarray) -> np.ndarray:
        """Regression outputs in the target's units (undoing target standardisation)."""
        t = self.target_standardize
        if t:
            out = out * np.asarray(t["std"]) + np.asarray(t["mean"])
        return out.reshape(len(out)) if out.ndim == 2 and out.shape[1] == 1 else out


def _vocab_size(card: dict[str, Any], pre: dict[str, Any], dtype: np.dtype) -> int | None:
    if dtype.kind not in "iu":
        return None
    if pre.get("vocab_size"):
        return int(pre["vocab_size"])
    if pre.get("char_vocab"):
        return len(pre["char_vocab"])
    if card.get("task") == "lm":
        last = (card["outputs"][0].get("shape") or [None])[-1]
        return int(last) if isinstance(last, int) else None
    return None


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _shape_text(sample_shape: list[int | None]) -> str:
    return "[" + ", ".join("any" if d is None else str(d) for d in sample_shape) + "]"


def _pydantic_message(e: ValidationError) -> str:
    parts = []
    for error in e.errors():
        where = ".".join(str(p) for p in error["loc"]) or "body"
        if error["type"] == "model_type":
            parts.append('the body must be a JSON object: {"instances": [[...], ...]}')
        elif error["type"] == "json_invalid":
            parts.append(f"the body is not valid JSON ({error['msg']})")
        elif error["type"] == "missing":
            parts.append(f'{where}: field required (send {{"instances": [[...], ...]}})')
        else:
            parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


# -- metrics -----------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics of one app, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gradwise_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "gradwise_errors",
            "Requests answered with an error, by endpoint and reason",
            ["endpoint", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "gradwise_request_duration_seconds",
            "Time from request to response, by endpoint",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batch_size = Histogram(
            "gradwise_batch_size",
            "Rows per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
            registry=r,
        )
        self.batch_requests = Histogram(
            "gradwise_batch_requests",
            "Requests per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.inference = Histogram(
            "gradwise_inference_duration_seconds",
            "Time of one model call",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.rows = Counter("gradwise_predicted_rows", "Instances predicted", registry=r)
        self.queue = Gauge(
            "gradwise_queue_depth", "Requests waiting for or in a model call", registry=r
        )

    def on_batch(self, rows: int, requests: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.batch_requests.observe(requests)
        self.inference.observe(seconds)
        self.rows.inc(rows)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, _REASONS.get(status, f"http_{status}")).inc()

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_REASONS = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    499: "client_closed",
    500: "internal",
    503: "unavailable",
}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _Gate:
    """ASGI middleware: bearer-token check (all but /health) and request metrics. A request that
    carries the right token is marked ``scope["state"]["authenticated"]``."""

    def __init__(self, app: Any, metrics: Metrics, token: str | None) -> None:
        self.app, self.metrics = app, metrics
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        start, status = time.perf_counter(), 500

        async def send_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            authenticated = self._authorized(scope)
            scope.setdefault("state", {})["authenticated"] = authenticated
            if self.token is not None and path != "/health" and not authenticated:
                response = JSONResponse(
                    {
                        "detail": "missing or wrong bearer token (send 'Authorization: Bearer <token>')"
                    },
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(endpoint, status, time.perf_counter() - start)

    def _authorized(self, scope: Scope) -> bool:
        if self.token is None:
            return False
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, credentials = value.strip().partition(b" ")
                # the scheme is case-insensitive (RFC 7235); the token is compared in constant time
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    credentials.strip(), self.token
                )
        return False


_HOST_PATH = re.compile(r"^(?:~|/|\\\\|[A-Za-z]:[\\/]|file:|sqlite:)")


def public_card(card: dict[str, Any], model: Model) -> dict[str, Any]:
    """What a client needs to call the model: name, format, task, inputs, outputs, labels."""
    public = {k: card.get(k) for k in PUBLIC_CARD}
    return {**public, "name": model.name, "format": card.get("format", "onnx"), "task": model.task}


def without_host_paths(value: Any) -> Any:
    """``value`` with every absolute path (and file/sqlite URI) reduced to its last component."""
    if isinstance(value, dict):
        return {k: without_host_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_host_paths(v) for v in value]
    if isinstance(value, str) and _HOST_PATH.match(value):
        return PurePath(value.replace("\\", "/").rstrip("/")).name
    return value


class _ByteBudget:
    """Bytes of large request bodies being read, parsed and predicted at once. A request waits
    until its size fits; one larger than the whole budget waits until it is alone."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(
                lambda: self.used == 0 or self.used + size <= self.capacity
            )
            self.used += size
        try:
            yield
        finally:
            async with self._changed:
                self.used -= size
                self._changed.notify_all()


# -- the app -----------------------------------------------------------------------------------


def create_app(
    artifact: str | Path,
    *,
    token: str | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_body_mb: float = 16.0,
    max_rows: int = 10_000,
    int8: bool = False,
    threads: int | None = None,
    drift_window: int = 1000,
    drift_min_rows: int = 200,
) -> FastAPI:
    """The FastAPI app serving an exported artifact directory (or a ``models:/NAME@alias`` /
    ``models:/NAME/VERSION`` registry URI). The model is loaded here, so a bad artifact fails
    before any server starts. ``max_batch_size=1`` turns micro-batching off.

    Memory per request is bounded: at most ``max_rows`` instances (413 above), model calls of at
    most ``max_batch_size`` rows, and bodies above 64 KiB are read, parsed and predicted at most
    ``2 * max_body_mb`` MiB at a time (others wait their turn) in worker threads."""
    if str(artifact).startswith("models:/"):
        from gradwise.deploy.registry import resolve

        artifact = resolve(str(artifact))
    if max_body_mb <= 0:
        raise ConfigError("max_body_mb", max_body_mb, "a positive number of MiB")
    if max_batch_size < 1:
        raise ConfigError(
            "max_batch_size", max_batch_size, "an integer >= 1 (1 turns batching off)"
        )
    if max_wait_ms < 0:
        raise ConfigError("max_wait_ms", max_wait_ms, "a number of milliseconds >= 0")
    if max_rows < 1:
        raise ConfigError("max_rows", max_rows, "an integer >= 1 (instances per request)")
    model = Model(artifact, int8=int8, threads=threads, max_rows=max_rows)
    monitor = _drift_monitor(model, drift_window, drift_min_rows)
    metrics = Metrics()
    batcher = MicroBatcher(model.run, max_batch_size, max_wait_ms, on_batch=metrics.on_batch)
    metrics.queue.set_function(lambda: batcher.queued)
    limit = int(max_body_mb * 2**20)
    budget = _ByteBudget(2 * limit)
    logger.info(
        "serving %s (%s, %s) with %d ONNX Runtime threads, micro-batching %s",
        model.name, model.task, model.file.name, model.threads,
        f"up to {max_batch_size} rows / {max_wait_ms:g} ms" if batcher.enabled else "off",
    )  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.close()  # the server has answered every request; drain the queue

    app = FastAPI(
        title=f"gradwise: {model.name}",
        version=API_VERSION,
        description=f"Predictions of the exported {model.task} model {model.name!r}.",
        lifespan=lifespan,
    )
    app.state.model, app.state.batcher, app.state.metrics, app.state.monitor = (
        model,
        batcher,
        metrics,
        monitor,
    )

    @app.exception_handler(InputError)
    async def _invalid(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody reads it; the metrics count it

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return JSONResponse(
            {"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500
        )

    request_schema = PredictRequest.model_json_schema()
    predict_body = {
        "requestBody": {
            "required": True,
            "content": {
                JSON_TYPE: {"schema": request_schema},
                NPY_TYPE: {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": "np.save bytes of an [N, ...] array",
                    }
                },
            },
        }
    }

    def errors(described: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
        """OpenAPI entries of a route's error responses (401 when a token is set)."""
        codes = {401: "Missing or wrong bearer token"} if token else {}
        codes |= described or {}
        return {code: {"model": ErrorResponse, "description": d} for code, d in codes.items()}

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=errors(
            {
                413: "Body larger than --max-body-mb, or more instances than --max-rows",
                415: "Content-Type is neither application/json nor application/x-npy (a body "
                "without one, or sent as a form by curl -d, is read as JSON or .npy when it is "
                "one)",
                422: "Instances the model cannot take (shape, dtype, NaN, token ids)",
                503: "The server is shutting down",
            }
        ),
        openapi_extra=predict_body,
    )
    async def predict(request: Request) -> Response:
        """Predict a batch of instances (JSON) or an array (np.save bytes, application/x-npy)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in (JSON_TYPE, NPY_TYPE, FORM_TYPE, ""):
            raise HTTPException(415, _media_type_message(ctype))
        length = request.headers.get("content-length", "")
        size = int(length) if length.isdigit() else limit
        if size > limit:
            raise HTTPException(413, _too_large(max_body_mb))
        if size <= LARGE_BODY:  # microseconds of parsing: on the event loop
            body = await _read_body(request, limit, max_body_mb)
            out = await _predict(model.parse(body, _is_npy(body, ctype)))
            return Response(_render(model, out), media_type=JSON_TYPE)
        async with budget.reserve(size):
            body = await _read_body(request, limit, max_body_mb)
            x = await asyncio.to_thread(model.parse, body, _is_npy(body, ctype))
            out = await _predict(x)
            content = await asyncio.to_thread(_render, model, out)
        return Response(content, media_type=JSON_TYPE)

    async def _predict(x: np.ndarray) -> np.ndarray:
        try:
            out = await batcher.submit(x)
        except ShuttingDown:
            raise HTTPException(503, "the server is shutting down") from None
        if monitor is not None:
            monitor.add(x, model.drift_predictions(out))
        return out

    @app.get("/health", response_model=HealthResponse)
    async def health() -> dict[str, Any]:
        """Liveness and serving settings; needs no token."""
        return {
            "status": "ok",
            "model": model.name,
            "task": model.task,
            "artifact": model.file.name,
            "threads": model.threads,
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "max_rows": max_rows,
            "max_body_mb": max_body_mb,
            "drift": monitor is not None,
        }

    @app.get("/v1/model", response_model=ModelCardResponse, responses=errors())
    async def card(request: Request) -> JSONResponse:
        """The model card: what a client needs (inputs, outputs, labels, task); the whole card
        with the bearer token, host paths reduced to file names."""
        full = getattr(request.state, "authenticated", False)
        body = without_host_paths(model.card) if full else {}
        return JSONResponse({**body, **public_card(model.card, model)})

    @app.get(
        "/v1/drift",
        response_model=DriftResponse,
        responses=errors({404: "No usable reference.json: drift monitoring is off"}),
    )
    async def drift() -> dict[str, Any]:
        """Drift of the recent inputs (the last ``drift_window`` rows) against the training data."""
        if monitor is None:
            raise HTTPException(
                404, "drift monitoring is off: the artifact has no usable reference.json"
            )
        return await asyncio.to_thread(monitor.report)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}}, **errors()},
    )
    async def prometheus() -> Response:
        """Prometheus metrics (text format)."""
        data, content_type = metrics.text()
        return Response(data, media_type=content_type)

    app.add_middleware(_Gate, metrics=metrics, token=token)
    return app


def _media_type_message(ctype: str) -> str:
    return f"Content-Type must be {JSON_TYPE} or {NPY_TYPE}; got {ctype or 'none'!r}"


def _is_npy(body: bytes, ctype: str) -> bool:
    """Whether the body is .npy: by its Content-Type, or, without one (or as curl -d's form
    type), by its first bytes; a body that is neither JSON nor .npy is a 415."""
    if ctype in (JSON_TYPE, NPY_TYPE):
        return ctype == NPY_TYPE
    if body.startswith(NPY_MAGIC):
        return True
    if body.lstrip()[:1] in (b"{", b"["):
        return False
    raise HTTPException(
        415, _media_type_message(ctype) + " (and the body is neither JSON nor .npy)"
    )


def _render(model: Model, out: np.ndarray) -> bytes:
    """The JSON response body for the model's output rows."""
    return json.dumps(model.respond(out), separators=(",", ":")).encode()


def _too_large(limit_mb: float) -> str:
    return f"the request body is larger than the {limit_mb:g} MiB limit (--max-body-mb)"


async def _read_body(request: Request, limit: int, limit_mb: float) -> bytes:
    """The request body, refused with 413 as soon as it is longer than ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, _too_large(limit_mb))
        chunks.append(chunk)
    return b"".join(chunks)


def _drift_monitor(model: Model, window: int, min_rows: int) -> Any:
    from gradwise.deploy.drift import DriftMonitor, drift_features

    path = model.dir / "reference.json"
    if not path.is_file():
        return None
    try:
        reference = json.loads(path.read_text(encoding="utf-8"))
        monitor = DriftMonitor(
            reference, window=window, min_rows=min_rows, preprocessing=model.preprocessing
        )
        probe = np.zeros((1, *[d or 1 for d in model.sample_shape]))
        width = drift_features(probe, monitor.kind).shape[1]
        if width != monitor.n_features:
            raise ValueError(
                f"the inputs give {width} drift features, the reference has {monitor.n_features}"
            )
    except (ValueError, KeyError, TypeError) as e:
        logger.warning("drift monitoring is off: %s does not fit the model (%s)", path, e)
        return None
    return monitor


def serve(
    artifact: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    token: str | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_body_mb: float = 16.0,
    max_rows: int = 10_000,
    int8: bool = False,
    threads: int | None = None,
    log_level: str = "info",
    access_log: bool = True,
    graceful_timeout: float = 30.0,
    header_timeout: float = 10.0,
    body_timeout: float = 30.0,
    max_connections: int = 1000,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve an artifact with uvicorn until SIGINT/SIGTERM, then answer every request received.

    The artifact (its model card, and with one worker the whole model) and the port are checked
    first, raising :class:`ConfigError`; then ``announce(url)`` is called (the CLI's banner).
    With ``workers > 1`` each worker process builds its own app; the token reaches them through
    the environment, never the command line.
    """
    import uvicorn

    try:
        from gradwise.deploy.server import (
            GracefulServer,
            LimitedProtocol,
            ServerLimits,
            bind,
            within_file_limit,
        )
    except ImportError as e:
        raise ConfigError(
            "uvicorn and httptools", str(e), "installed", "pip install 'gradwise[deploy]'"
        ) from None
    if str(artifact).startswith("models:/"):  # download once, not once per worker
        from gradwise.deploy.registry import resolve

        artifact = resolve(str(artifact))
    serving_card(artifact)
    limits = within_file_limit(
        ServerLimits(
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            max_connections=max_connections,
        )
    )
    options = {
        "artifact": str(artifact),
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "max_body_mb": max_body_mb,
        "max_rows": max_rows,
        "int8": int8,
        "threads": threads or max(1, (os.cpu_count() or 1) // max(workers, 1)),
    }
    sock = bind(host, port)
    app: Any = f"{__name__}:app_from_env"
    if workers == 1:
        try:
            app = create_app(token=token, **options)
        except BaseException:
            sock.close()
            raise
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without a token: anyone who can reach it can use it", host)
    config = uvicorn.Config(
        app,
        factory=workers > 1,
        workers=workers,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=graceful_timeout,
        http=functools.partial(LimitedProtocol, limits=limits),  # type: ignore[arg-type]
        ws="none",
        server_header=False,
        lifespan="on",
    )
    if announce is not None:
        name = f"[{host}]" if ":" in host else host
        announce(f"http://{name}:{sock.getsockname()[1]}")
    if workers > 1:  # each worker process builds its own app (and its own metrics and window)
        from uvicorn.supervisors import Multiprocess

        os.environ[_OPTIONS_ENV] = json.dumps(options)
        if token:
            os.environ[_TOKEN_ENV] = token
        Multiprocess(config, sockets=[sock]).run()
    else:
        # uvicorn raises the signal again once it has shut down, which would make a graceful
        # stop exit with 130 or 143: the handlers it restores then do nothing instead
        quiet = {
            sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            GracefulServer(config).run(sockets=[sock])
        finally:
            for sig, handler in quiet.items():
                signal.signal(sig, handler)


_OPTIONS_ENV = "GRADWISE_SERVE_OPTIONS"
_TOKEN_ENV = "GRADWISE_TOKEN"


def app_from_env() -> FastAPI:
    """The app of a worker process (``serve(workers=N)``): options from the environment."""
    options = json.loads(os.environ[_OPTIONS_ENV])
    return create_app(token=os.environ.get(_TOKEN_ENV) or None, **options)


def read_token(path: str | Path) -> str:
    """The bearer token in a file (its first line); warns when others may read the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            "token_file", str(path), "a readable file holding the token", str(e.strerror)
        ) from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ConfigError("token_file", str(path), "a file holding the token on its first line")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warn(f"{path} can be read by other users: chmod 600 {path}")
    return token


callable_as_namesake(__name__)
