"""gradwise serve against a real uvicorn server on loopback, with a real HTTP client (httpx)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from gradwise.deploy.serve import create_app
from gradwise.errors import ConfigError, GradwiseError

from .conftest import free_socket, live_server

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.M)
    return float(found.group(1)) if found else 0.0


def eager_probs(model: torch.nn.Module, raw: np.ndarray, pre: dict[str, Any]) -> np.ndarray:
    std = pre["standardize"]
    x = (raw.astype(np.float64) - np.asarray(std["mean"])) / np.asarray(std["std"])
    with torch.no_grad():
        return torch.softmax(model(torch.as_tensor(x, dtype=torch.float32)), 1).numpy()


@pytest.fixture(scope="module")
def server(tabular):
    """One server for the tests that only read: token on, micro-batching with a 20 ms window."""
    app = create_app(tabular["dir"], token=TOKEN, max_wait_ms=20, max_body_mb=1, threads=1)
    with live_server(app) as (url, _):
        yield url


def test_predictions_equal_onnx_runtime_and_eager_torch(server, tabular) -> None:
    import onnxruntime as ort

    from gradwise.deploy.card import preprocess

    raw = tabular["x"][:40]
    r = httpx.post(f"{server}/v1/predict", json={"instances": raw.tolist()}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    probs = np.asarray(body["probabilities"])
    assert body["model"] == "breast-cancer-mlp"
    session = ort.InferenceSession(str(tabular["dir"] / "model.onnx"))
    logits = session.run(None, {"input": preprocess(raw, tabular["pre"])})[0]
    ort_probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(probs, ort_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs, eager_probs(tabular["model"], raw, tabular["pre"]), atol=1e-5)
    assert body["predictions"] == probs.argmax(1).tolist()
    assert body["labels"] == [["malignant", "benign"][c] for c in body["predictions"]]

    # the same rows as np.save bytes give the same answer
    r2 = httpx.post(
        f"{server}/v1/predict",
        content=npy(raw),
        headers={**AUTH, "Content-Type": "application/x-npy"},
    )
    assert r2.status_code == 200 and r2.json() == body
    # float64 and integer arrays are converted to the model's float32
    r3 = httpx.post(
        f"{server}/v1/predict",
        content=npy(raw.astype(np.float64)),
        headers={**AUTH, "Content-Type": "application/x-npy"},
    )
    assert r3.json()["predictions"] == body["predictions"]


def test_health_model_card_openapi(server, tabular) -> None:
    health = httpx.get(f"{server}/health")  # no token needed
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["threads"] == 1
    card = httpx.get(f"{server}/v1/model", headers=AUTH).json()
    assert card == json.loads((tabular["dir"] / "model.json").read_text())
    schema = httpx.get(f"{server}/openapi.json", headers=AUTH).json()
    content = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "application/x-npy"}
    assert "PredictResponse" in schema["components"]["schemas"]


BAD_JSON = [
    ({"instances": [[1.0] * 29]}, "expected 30 features, got 29"),
    ({"instances": [1.0] * 30}, "wrap a single instance in a list"),
    ({"instances": [[[1.0] * 30]]}, "each instance must have shape [30]"),
    ({"instances": [["a"] * 30]}, "must be numbers; got strings"),
    ({"instances": [[True] * 30]}, "got booleans"),
    ({"instances": [[1.0] * 30, [1.0] * 29]}, "ragged"),
    ({"instances": [[None] * 30]}, "got mixed values or nulls"),
    ({"instances": []}, "at least 1 item"),
    ({"inputs": [[1.0] * 30]}, "instances: field required"),
    ([[1.0] * 30], "the body must be a JSON object"),
]


def test_every_bad_input_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving(
    server, tabular
) -> None:
    good = {"instances": tabular["x"][:2].tolist()}
    with httpx.Client(base_url=server, headers=AUTH) as client:
        before = client.get("/metrics").text
        for body, message in BAD_JSON:
            r = client.post("/v1/predict", json=body)
            assert r.status_code == 422, (body, r.text)
            assert message in r.json()["detail"], (body, r.json())

        raw_bodies = [
            (b'{"instances": [[NaN' + b", 1" * 29 + b"]]}", "application/json", 422, "NaN"),
            (b'{"instances": [[1e39' + b", 1" * 29 + b"]]}", "application/json", 422, "too large"),
            (b'{"instances": [[1, 2', "application/json", 422, "not valid JSON"),
            (b"\x93NUMPY garbage", "application/x-npy", 422, "not a NumPy .npy array"),
            (npy(np.array([{"a": 1}], dtype=object)), "application/x-npy", 422, "not a NumPy"),
            (npy(np.ones((3, 31), np.float32)), "application/x-npy", 422, "expected 30 features"),
            (npy(np.full((2, 30), "x")), "application/x-npy", 422, "got strings"),
            (npy(np.ones((2, 30), np.complex64)), "application/x-npy", 422, "dtype complex64"),
            (json.dumps(good).encode(), "text/plain", 415, "Content-Type must be"),
            (b"instances=1,2", "", 415, "got 'none' (and the body is neither JSON nor .npy)"),
            (b"x" * (2**20 + 10), "application/json", 413, "1 MiB limit"),
        ]
        for content, ctype, status, message in raw_bodies:
            headers = {"Content-Type": ctype} if ctype else {}
            r = client.post("/v1/predict", content=content, headers=headers)
            assert r.status_code == status, (content[:40], r.text)
            assert message in r.json()["detail"], (content[:40], r.json())

        # a chunked body (no Content-Length) is cut off at the limit too
        def chunks():
            for _ in range(20):
                yield b"[" * 100_000

        r = client.post(
            "/v1/predict", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 413

        for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}, {}):
            r = httpx.post(f"{server}/v1/predict", json=good, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{server}/v1/model").status_code == 401
        assert httpx.get(f"{server}/metrics").status_code == 401
        assert client.get("/v1/predict").status_code == 405
        assert client.get("/nowhere").status_code == 404

        r = client.post("/v1/predict", json=good)  # still serving
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2
        after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("gradwise_errors_total", endpoint="/v1/predict", reason="invalid_input") == 18
    assert delta("gradwise_errors_total", endpoint="/v1/predict", reason="too_large") == 2
    assert delta("gradwise_errors_total", endpoint="/v1/predict", reason="unauthorized") == 3
    assert (
        delta("gradwise_errors_total", endpoint="/v1/predict", reason="unsupported_media_type") == 2
    )
    assert delta("gradwise_requests_total", endpoint="/v1/predict", status="200") == 1
    assert delta("gradwise_requests_total", endpoint="other", status="404") == 1


def test_concurrent_requests_are_batched(server, tabular) -> None:
    x = tabular["x"]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, headers=AUTH) as client:
            return await asyncio.gather(
                *[
                    client.post("/v1/predict", json={"instances": x[i : i + 1].tolist()})
                    for i in range(64)
                ]
            )

    before = httpx.get(f"{server}/metrics", headers=AUTH).text
    responses = asyncio.run(burst())
    after = httpx.get(f"{server}/metrics", headers=AUTH).text
    assert all(r.status_code == 200 for r in responses)
    # every request got its own row back, in the right order
    expected = eager_probs(tabular["model"], x[:64], tabular["pre"])
    got = np.asarray([r.json()["probabilities"][0] for r in responses])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    calls = metric(after, "gradwise_batch_size_count") - metric(before, "gradwise_batch_size_count")
    singles = metric(after, "gradwise_batch_size_bucket", le="1.0") - metric(
        before, "gradwise_batch_size_bucket", le="1.0"
    )
    rows = metric(after, "gradwise_batch_size_sum") - metric(before, "gradwise_batch_size_sum")
    assert rows == 64
    assert calls < 64 and singles < calls, (calls, singles)  # batches of more than one row


def test_load_2000_requests_from_32_clients_without_errors(tabular) -> None:
    app = create_app(tabular["dir"], max_wait_ms=2)
    x = tabular["x"]
    n, clients = 2000, 32
    statuses: list[int] = []

    async def client_loop(client: httpx.AsyncClient, worker: int) -> None:
        for i in range(worker, n, clients):
            r = await client.post("/v1/predict", json={"instances": x[i % len(x)][None].tolist()})
            statuses.append(r.status_code)

    async def load() -> None:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            await asyncio.gather(*[client_loop(client, w) for w in range(clients)])

    with live_server(app) as (url, _):
        start = time.perf_counter()
        asyncio.run(load())
        seconds = time.perf_counter() - start
        text = httpx.get(f"{url}/metrics").text
    assert len(statuses) == n and set(statuses) == {200}
    assert seconds < 60
    assert metric(text, "gradwise_requests_total", endpoint="/v1/predict", status="200") == n
    assert metric(text, "gradwise_batch_size_sum") == n
    assert metric(text, "gradwise_batch_size_count") < n  # some requests shared a model call


def test_drift_endpoint_no_drift_then_a_shifted_distribution(tabular) -> None:
    x = tabular["x"]
    app = create_app(tabular["dir"], drift_window=400, drift_min_rows=200)
    with live_server(app) as (url, _), httpx.Client(base_url=url) as client:
        assert client.get("/v1/drift").json()["verdict"] == "insufficient data"
        for i in range(0, 400, 50):
            client.post("/v1/predict", json={"instances": x[i : i + 50].tolist()})
        report = client.get("/v1/drift").json()
        assert report["verdict"] == "no drift", report
        assert report["rows"] == 400 and len(report["features"]) == 30
        assert report["predictions"]["kind"] == "classes"

        shifted = x[:400].copy()
        shifted[:, 0] *= 1.5  # "mean radius" 50% larger
        shifted[:, 3] *= 2.0  # "mean area"
        client.post(
            "/v1/predict", content=npy(shifted), headers={"Content-Type": "application/x-npy"}
        )
        report = client.get("/v1/drift").json()
    assert report["verdict"] == "significant drift"
    assert {"mean radius", "mean area"} <= set(report["drifted"]) or {"f0", "f3"} <= set(
        report["drifted"]
    )
    by_name = {f["name"]: f for f in report["features"]}
    first = by_name.get("f0") or report["features"][0]
    assert first["psi"] > 0.25 and first["ks_pvalue"] < 1e-6


def test_drift_is_404_without_reference(tabular, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tabular["dir"], bare)
    (bare / "reference.json").unlink()
    with live_server(create_app(bare)) as (url, _):
        r = httpx.get(f"{url}/v1/drift")
        assert r.status_code == 404 and "reference.json" in r.json()["detail"]
        assert httpx.get(f"{url}/health").json()["drift"] is False


def test_token_ids_are_checked_against_the_vocabulary(lm) -> None:
    ids = lm["ids"][:3]
    with live_server(create_app(lm["dir"])) as (url, _), httpx.Client(base_url=url) as client:
        r = client.post("/v1/predict", json={"instances": ids.tolist()})
        assert r.status_code == 200, r.text
        with torch.no_grad():
            logits = lm["model"](torch.as_tensor(ids)).numpy()
        assert r.json()["predictions"] == logits[:, -1].argmax(-1).tolist()
        assert r.json()["labels"] == ["abcdefghijklmnopqrst"[i] for i in r.json()["predictions"]]
        # the artifact was exported with a fixed sequence length of 12
        r = client.post("/v1/predict", json={"instances": [[1, 2, 3]]})
        assert r.status_code == 422
        assert "expected 12 token ids, got 3" in r.json()["detail"]
        for bad, message in [
            ([[1] * 11 + [20]], "token id 20 is out of range: ids must be in [0, 19]"),
            ([[-1] * 12], "token id -1 is out of range"),
            ([[1.5] * 12], "must be integer token ids"),
        ]:
            r = client.post("/v1/predict", json={"instances": bad})
            assert r.status_code == 422 and message in r.json()["detail"], r.text
        assert client.post("/v1/predict", json={"instances": ids.tolist()}).status_code == 200


def test_graceful_shutdown_lets_an_in_flight_request_finish(tabular) -> None:
    # a lone request waits max_wait_ms for company: the server is told to stop meanwhile
    app = create_app(tabular["dir"], max_wait_ms=1500)
    result: dict[str, Any] = {}
    with live_server(app) as (url, server):

        def call() -> None:
            result["response"] = httpx.post(
                f"{url}/v1/predict", json={"instances": tabular["x"][:3].tolist()}, timeout=30
            )

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 10
        while app.state.batcher.queued == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.batcher.queued == 1
        server.should_exit = True  # what SIGINT/SIGTERM do
        thread.join(timeout=30)
    response = result["response"]
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 3


def test_batching_off_and_int8(tabular, tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from gradwise.deploy.card import sha256_file

    art = tmp_path / "q"
    shutil.copytree(tabular["dir"], art)
    with pytest.raises(ConfigError, match=r"model\.int8\.onnx"):
        create_app(art, int8=True)
    quantize_dynamic(
        str(art / "model.onnx"), str(art / "model.int8.onnx"), weight_type=QuantType.QInt8
    )
    card = json.loads((art / "model.json").read_text())
    card["quantized"] = {
        "artifact": "model.int8.onnx",
        "sha256": sha256_file(art / "model.int8.onnx"),
    }
    (art / "model.json").write_text(json.dumps(card))
    x = tabular["x"][:100]
    with live_server(create_app(art, int8=True, max_batch_size=1)) as (url, _):
        assert httpx.get(f"{url}/health").json()["artifact"] == "model.int8.onnx"
        got = np.asarray(
            httpx.post(f"{url}/v1/predict", json={"instances": x.tolist()}).json()["probabilities"]
        )
        text = httpx.get(f"{url}/metrics").text
    expected = eager_probs(tabular["model"], x, tabular["pre"])
    assert np.abs(got - expected).max() < 0.05  # int8 weights: close, not equal
    # batching off: no model call sees more than one row, nor gathers requests
    assert metric(text, "gradwise_batch_size_count") == 100
    assert metric(text, "gradwise_batch_size_bucket", le="1.0") == 100


def test_a_bad_artifact_fails_before_serving(tabular, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.json"):
        create_app(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tabular["dir"], broken)
    with open(broken / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(GradwiseError, match="sha256"):
        create_app(broken)
    with pytest.raises(ConfigError, match="max_batch_size"):
        create_app(tabular["dir"], max_batch_size=0)


def test_cli_serves_with_a_token_from_the_environment_and_stops_on_sigint(tabular) -> None:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "GRADWISE_TOKEN": TOKEN, "GRADWISE_DEBUG": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradwise", "serve", str(tabular["dir"]), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        body = {"instances": tabular["x"][:2].tolist()}
        assert httpx.post(f"{url}/v1/predict", json=body).status_code == 401
        assert httpx.post(f"{url}/v1/predict", json=body, headers=AUTH).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "Application shutdown complete" in output


def test_cli_reports_a_missing_artifact_in_one_line(tmp_path: Path) -> None:
    from conftest import gradwise_cli

    result = gradwise_cli("serve", str(tmp_path / "nothing"), "--port", "1")
    assert result.returncode == 2
    assert "artifact" in result.stderr and "model.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert "serving" not in result.stdout  # the banner comes after the checks


def test_cli_reports_a_port_in_use_in_one_line_before_the_banner(tabular) -> None:
    from conftest import gradwise_cli

    taken = free_socket()
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = gradwise_cli("serve", str(tabular["dir"]), "--port", str(port))
    finally:
        taken.close()
    assert result.returncode == 2, result.stderr
    assert f"port: got {port}; expected a free port" in result.stderr
    assert "in use" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "serving" not in result.stdout


def test_the_readme_curl_example_and_curl_d_without_a_content_type(server, tabular) -> None:
    body = json.dumps({"instances": tabular["x"][:1].tolist()})
    # the README's example sends application/json; curl -d alone sends a form content type
    for ctype in ("application/json", "application/x-www-form-urlencoded"):
        r = httpx.post(
            f"{server}/v1/predict", content=body, headers={**AUTH, "Content-Type": ctype}
        )
        assert r.status_code == 200, r.text
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    curl = next(
        line for line in readme.splitlines() if line.startswith("curl") and "predict" in line
    )
    assert "-H 'Content-Type: application/json'" in curl
