"""``gradwise serve``: an exported model behind HTTP (FastAPI, uvicorn, ONNX Runtime).

Endpoints (every one but ``/health`` behind the bearer token when one is set)::

    POST /v1/predict   {"instances": [[...], ...]} (application/json) or np.save bytes
                       (application/x-npy) -> {"model", "predictions", "probabilities"?, "labels"?}
    GET  /health       liveness and the serving settings (never needs the token)
    GET  /v1/model     the model card (model.json)
    GET  /v1/drift     PSI and KS per feature of the recent inputs against reference.json
    GET  /metrics      Prometheus text: requests, latency, batch sizes, errors
    GET  /docs, /openapi.json

Concurrent requests are micro-batched into one ONNX Runtime call (``batching.MicroBatcher``).
Every request is checked against the model card (shape, dtype, finite values, token ids in
range): a bad one gets a 4xx naming what is wrong, never a 500, and the server keeps serving.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from gradwise import __version__
from gradwise._lazy import callable_as_namesake
from gradwise.deploy.batching import MicroBatcher, ShuttingDown
from gradwise.deploy.card import load_card, preprocess, sha256_file
from gradwise.errors import ConfigError, GradwiseError

logger = logging.getLogger("gradwise.serve")

JSON_TYPE = "application/json"
NPY_TYPE = "application/x-npy"
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


class HealthResponse(BaseModel):
    status: str
    model: str
    task: str
    artifact: str
    threads: int
    max_batch_size: int
    max_wait_ms: float
    drift: bool


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
    """A request the model cannot take; its message names what is wrong (HTTP 422)."""


# -- the model ---------------------------------------------------------------------------------


def serving_card(artifact_dir: str | Path) -> dict[str, Any]:
    """The model card of an exported artifact directory, checked for serving."""
    card = load_card(artifact_dir)
    path = Path(artifact_dir) / "model.json"
    if card.get("format", "onnx") != "onnx":
        raise ConfigError(f"{path}: format", card.get("format"), "'onnx'")
    if not card.get("inputs") or not card.get("outputs"):
        raise ConfigError(
            f"{path}: inputs/outputs", card.get("inputs"), "a non-empty list of tensors"
        )
    return card


class Model:
    """An exported model: the ONNX Runtime session, input checks from the card, pre- and
    post-processing (standardisation, softmax/sigmoid, class labels)."""

    def __init__(
        self, artifact_dir: str | Path, *, int8: bool = False, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        self.dir = Path(artifact_dir)
        self.card = serving_card(self.dir)
        self.name: str = self.card.get("name") or self.dir.name
        self.task: str = self.card.get("task") or "multiclass"
        file, expected_sha = self.card.get("artifact") or "model.onnx", self.card.get("sha256")
        if int8:
            quantized = self.card.get("quantized") or {}
            file, expected_sha = (
                quantized.get("artifact", "model.int8.onnx"),
                quantized.get("sha256"),
            )
        self.file = self.dir / file
        if not self.file.is_file():
            expected = (
                "an artifact exported with quantization (model.int8.onnx)" if int8 else "model.onnx"
            )
            raise ConfigError("artifact", str(self.file), expected)
        if expected_sha and sha256_file(self.file) != expected_sha:
            raise GradwiseError(
                f"{self.file} does not match the sha256 in its model card: the file was changed "
                "or damaged after export; export again"
            )
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
        pre = self.card.get("preprocessing") or {}
        self.preprocessing = {k: pre[k] for k in ("scale", "standardize") if k in pre}
        self.target_standardize = pre.get("target_standardize")
        self.char_vocab: str | None = pre.get("char_vocab")
        self.vocab_size = _vocab_size(self.card, pre, self.dtype)

    # -- input checks: every failure is an InputError naming what is wrong

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
        """Instances from ``np.save`` bytes (a ``[N, ...]`` array), checked."""
        try:
            x = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception as e:
            raise InputError(
                f"the body is not a NumPy .npy array (np.save bytes, no pickles): {e}"
            ) from None
        if not isinstance(x, np.ndarray):
            raise InputError("the body must hold one array (np.save), not an .npz archive")
        return self.validate(x)

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
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    500: "internal",
    503: "unavailable",
}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _Gate:
    """ASGI middleware: bearer-token check (all but /health) and request metrics."""

    def __init__(self, app: Any, metrics: Metrics, token: str | None) -> None:
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {token}".encode() if token else None

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
            if self.expected is not None and path != "/health" and not self._authorized(scope):
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
        for key, value in scope["headers"]:
            if key == b"authorization":
                return hmac.compare_digest(value, self.expected or b"")
        return False


# -- the app -----------------------------------------------------------------------------------


def create_app(
    artifact: str | Path,
    *,
    token: str | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_body_mb: float = 16.0,
    int8: bool = False,
    threads: int | None = None,
    drift_window: int = 1000,
    drift_min_rows: int = 200,
) -> FastAPI:
    """The FastAPI app serving an exported artifact directory (or a ``models:/NAME@alias`` /
    ``models:/NAME/VERSION`` registry URI). The model is loaded here, so a bad artifact fails
    before any server starts. ``max_batch_size=1`` turns micro-batching off."""
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
    model = Model(artifact, int8=int8, threads=threads)
    monitor = _drift_monitor(model, drift_window, drift_min_rows)
    metrics = Metrics()
    batcher = MicroBatcher(model.run, max_batch_size, max_wait_ms, on_batch=metrics.on_batch)
    metrics.queue.set_function(lambda: batcher.queued)
    limit = int(max_body_mb * 2**20)
    logger.info(
        "serving %s (%s, %s) with %d ONNX Runtime threads, micro-batching %s",
        model.name, model.task, model.file.name, model.threads,
        f"up to {max_batch_size} rows / {max_wait_ms:g} ms" if batcher.enabled else "off",
    )  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.close()  # uvicorn has let in-flight requests finish; drain the queue

    app = FastAPI(
        title=f"gradwise: {model.name}",
        version=str((model.card.get("versions") or {}).get("gradwise") or __version__),
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
        return JSONResponse({"detail": str(exc)}, status_code=422)

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
    errors = {
        401: {"description": "Missing or wrong bearer token"},
        413: {"description": "Body larger than --max-body-mb"},
        415: {"description": "Content-Type is neither application/json nor application/x-npy"},
        422: {"description": "Instances the model cannot take (shape, dtype, NaN, token ids)"},
    }

    @app.post(
        "/v1/predict", response_model=PredictResponse, responses=errors, openapi_extra=predict_body
    )
    async def predict(request: Request) -> Response:
        """Predict a batch of instances (JSON) or an array (np.save bytes, application/x-npy)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in (JSON_TYPE, NPY_TYPE):
            raise HTTPException(
                415, f"Content-Type must be {JSON_TYPE} or {NPY_TYPE}; got {ctype or 'none'!r}"
            )
        body = await _read_body(request, limit, max_body_mb)
        x = model.parse_npy(body) if ctype == NPY_TYPE else model.parse_json(body)
        try:
            out = await batcher.submit(x)
        except ShuttingDown:
            raise HTTPException(503, "the server is shutting down") from None
        result = model.respond(out)
        if monitor is not None:
            monitor.add(x, model.drift_predictions(out))
        return JSONResponse(result)

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
            "drift": monitor is not None,
        }

    @app.get("/v1/model", response_model=dict[str, Any])
    async def card() -> dict[str, Any]:
        """The model card (model.json)."""
        return model.card

    @app.get(
        "/v1/drift",
        response_model=DriftResponse,
        responses={404: {"description": "No reference.json"}},
    )
    async def drift() -> dict[str, Any]:
        """Drift of the recent inputs (the last ``drift_window`` rows) against the training data."""
        if monitor is None:
            raise HTTPException(
                404, "drift monitoring is off: the artifact has no usable reference.json"
            )
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(monitor.report)

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus metrics (text format)."""
        data, content_type = metrics.text()
        return Response(data, media_type=content_type)

    app.add_middleware(_Gate, metrics=metrics, token=token)
    return app


async def _read_body(request: Request, limit: int, limit_mb: float) -> bytes:
    """The request body, refused with 413 as soon as it is longer than ``limit`` bytes."""
    too_large = f"the request body is larger than the {limit_mb:g} MiB limit (--max-body-mb)"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise HTTPException(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def _drift_monitor(model: Model, window: int, min_rows: int) -> Any:
    from gradwise.deploy.drift import DriftMonitor, drift_features

    path = model.dir / "reference.json"
    if not path.is_file():
        return None
    try:
        reference = json.loads(path.read_text(encoding="utf-8"))
        monitor = DriftMonitor(reference, window=window, min_rows=min_rows)
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
    int8: bool = False,
    threads: int | None = None,
    log_level: str = "info",
    graceful_timeout: float = 30.0,
) -> None:
    """Serve an artifact with uvicorn until Ctrl-C/SIGTERM, then finish in-flight requests."""
    import uvicorn

    if str(artifact).startswith("models:/"):  # download once, not once per worker
        from gradwise.deploy.registry import resolve

        artifact = resolve(str(artifact))
    options = {
        "artifact": str(artifact),
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "max_body_mb": max_body_mb,
        "int8": int8,
        "threads": threads or max(1, (os.cpu_count() or 1) // max(workers, 1)),
    }
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without a token: anyone who can reach it can use it", host)
    config = {
        "host": host,
        "port": port,
        "log_level": log_level,
        "timeout_graceful_shutdown": graceful_timeout,
    }
    if workers > 1:  # each worker process builds its own app (and its own metrics and window)
        os.environ[_OPTIONS_ENV] = json.dumps(options)
        if token:
            os.environ["GRADWISE_TOKEN"] = token
        uvicorn.run(f"{__name__}:app_from_env", factory=True, workers=workers, **config)
    else:
        uvicorn.run(create_app(token=token, **options), **config)


_OPTIONS_ENV = "GRADWISE_SERVE_OPTIONS"


def app_from_env() -> FastAPI:
    """The app of a worker process (``serve(workers=N)``): options from the environment."""
    options = json.loads(os.environ[_OPTIONS_ENV])
    return create_app(token=os.environ.get("GRADWISE_TOKEN") or None, **options)


callable_as_namesake(__name__)
