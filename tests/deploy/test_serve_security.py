"""What the server tells whom: the token (never on a command line), the model card without and
with it, and an OpenAPI schema that matches every answer."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gradwise.deploy.serve import PUBLIC_CARD, create_app

from .conftest import live_server
from .test_serve_limits import serving

TOKEN = "tok-3f9a1c"


def descendants(pid: int) -> list[int]:
    """Processes started by ``pid``, and theirs."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_a_token_file_reaches_every_worker_but_no_command_line(tabular, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    body = {"instances": tabular["x"][:1].tolist()}
    args = ("--token-file", str(token_file), "--workers", "2", "--threads", "1")
    env = {"GRADWISE_TOKEN": ""}
    with serving(tabular["dir"], *args, env=env) as served, httpx.Client() as client:
        processes = [served.proc.pid, *descendants(served.proc.pid)]
        command_lines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in processes]
        url = f"{served.url}/v1/predict"
        # the scheme is case-insensitive (RFC 7235); several requests reach both workers
        for scheme in ("Bearer", "bearer", "BEARER", "Bearer", "bearer", "BEARER"):
            r = client.post(url, json=body, headers={"Authorization": f"{scheme} {TOKEN}"})
            assert r.status_code == 200, (scheme, r.text)
        for auth in (f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, ""):
            assert client.post(url, json=body, headers={"Authorization": auth}).status_code == 401
    assert len(processes) >= 3  # the supervisor and two workers
    assert not any(TOKEN.encode() in line for line in command_lines)
    assert "warning" not in served.output


def test_a_token_on_the_command_line_works_and_warns(tabular, tmp_path: Path) -> None:
    body = {"instances": tabular["x"][:1].tolist()}
    with serving(tabular["dir"], "--token", TOKEN, env={"GRADWISE_TOKEN": ""}) as served:
        url = f"{served.url}/v1/predict"
        assert httpx.post(url, json=body).status_code == 401
        r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
    assert "warning: --token on the command line is visible" in served.output
    assert "--token-file" in served.output


HOST_PATHS = {
    "source": {
        "run_dir": "/home/alice/runs/digits-cnn",
        "checkpoint": "/home/alice/runs/digits-cnn/checkpoints/step-6",
        "weights": "model",
    },
    "recipe": {
        "model": {"name": "mlp"},
        "tracking": {"root": "/home/alice/runs", "mlflow": "sqlite:////home/alice/mlflow.db"},
    },
    "versions": {"torch": "2.9.0", "onnxruntime": "1.22.0", "python": "3.11.9"},
}


@pytest.fixture
def card_with_host_paths(tabular, tmp_path: Path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(tabular["dir"], art)
    card = json.loads((art / "model.json").read_text())
    (art / "model.json").write_text(json.dumps({**card, **HOST_PATHS}))
    return art


def test_the_model_card_shows_host_paths_to_no_one_and_versions_only_with_the_token(
    card_with_host_paths,
) -> None:
    with live_server(create_app(card_with_host_paths)) as (url, _):
        public = httpx.get(f"{url}/v1/model")
    assert public.status_code == 200
    assert set(public.json()) == set(PUBLIC_CARD)
    assert public.json()["inputs"][0]["shape"] == [None, 30]
    assert public.json()["class_labels"] == ["malignant", "benign"]
    assert "alice" not in public.text and "versions" not in public.text

    with live_server(create_app(card_with_host_paths, token=TOKEN)) as (url, _):
        assert httpx.get(f"{url}/v1/model").status_code == 401
        full = httpx.get(f"{url}/v1/model", headers={"Authorization": f"bearer {TOKEN}"})
    assert full.status_code == 200
    card = full.json()
    assert card["versions"] == HOST_PATHS["versions"] and card["recipe"]["model"]["name"] == "mlp"
    assert "/home" not in full.text and "alice" not in full.text
    assert card["source"] == {"run_dir": "digits-cnn", "checkpoint": "step-6", "weights": "model"}
    assert card["recipe"]["tracking"] == {"root": "runs", "mlflow": "mlflow.db"}


# -- the OpenAPI schema against real answers ---------------------------------------------------

ANNOTATIONS = {"title", "description", "default", "format", "examples"}


def conform(value: Any, schema: dict[str, Any], spec: dict[str, Any], where: str = "body") -> None:
    """Check ``value`` against a schema of the JSON Schema subset FastAPI writes; an object may
    hold only the properties its schema names unless it allows more (``additionalProperties``)."""
    unknown = set(schema) - ANNOTATIONS - {
        "$ref", "anyOf", "type", "properties", "required", "additionalProperties", "items",
        "minItems",
    }  # fmt: skip
    assert not unknown, f"{where}: schema keywords this check does not know: {unknown}"
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        conform(value, spec["components"]["schemas"][name], spec, where)
        return
    if "anyOf" in schema:
        failures = []
        for option in schema["anyOf"]:
            try:
                conform(value, option, spec, where)
                return
            except AssertionError as e:
                failures.append(str(e))
        raise AssertionError(f"{where}: {value!r} matches no option: {failures}")
    kinds = {
        "object": dict,
        "array": list,
        "string": str,
        "integer": int,
        "number": (int, float),
        "boolean": bool,
        "null": type(None),
    }
    if "type" in schema:
        kind = schema["type"]
        is_bool = isinstance(value, bool) and kind in ("integer", "number")
        assert isinstance(value, kinds[kind]) and not is_bool, f"{where}: {value!r} is not {kind}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: {key!r} is required"
        properties = schema.get("properties", {})
        more = schema.get("additionalProperties", not properties)
        for key, item in value.items():
            if key in properties:
                conform(item, properties[key], spec, f"{where}.{key}")
            else:
                assert more is not False, f"{where}.{key} is not in the schema"
                if isinstance(more, dict):
                    conform(item, more, spec, f"{where}.{key}")
    if isinstance(value, list):
        assert len(value) >= schema.get("minItems", 0), f"{where}: too few items"
        for i, item in enumerate(value):
            conform(item, schema.get("items", {}), spec, f"{where}[{i}]")


def test_the_openapi_schema_matches_every_answer(tabular, tmp_path: Path) -> None:
    x = tabular["x"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    npy = io.BytesIO()
    np.save(npy, x[:3])
    bare = tmp_path / "bare"  # no reference.json: /v1/drift is a 404
    shutil.copytree(tabular["dir"], bare)
    (bare / "reference.json").unlink()
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/health", {}),
        ("GET", "/v1/model", {"headers": auth}),
        ("GET", "/v1/model", {}),
        ("GET", "/v1/drift", {"headers": auth}),
        ("GET", "/metrics", {"headers": auth}),
        ("POST", "/v1/predict", {"headers": auth, "json": {"instances": x[:2].tolist()}}),
        ("POST", "/v1/predict", {"json": {"instances": x[:2].tolist()}}),
        (
            "POST",
            "/v1/predict",
            {
                "headers": {**auth, "Content-Type": "application/x-npy"},
                "content": npy.getvalue(),
            },
        ),
        ("POST", "/v1/predict", {"headers": auth, "json": {"instances": x[:20].tolist()}}),
        ("POST", "/v1/predict", {"headers": auth, "json": {"instances": [[1.0] * 29]}}),
        ("POST", "/v1/predict", {"headers": {**auth, "Content-Type": "text/csv"}, "content": b"1"}),
        ("POST", "/v1/predict", {"headers": auth, "content": b"{" * 2**20}),
    ]
    seen: set[tuple[str, str, int]] = set()
    for artifact, requests in (
        (tabular["dir"], calls),
        (bare, [("GET", "/v1/drift", {"headers": auth})]),
    ):
        app = create_app(artifact, token=TOKEN, max_rows=10, max_body_mb=0.5)
        with live_server(app) as (url, _), httpx.Client(base_url=url) as client:
            spec = client.get("/openapi.json", headers=auth).json()
            for method, path, kwargs in requests:
                r = client.request(method, path, **kwargs)
                documented = spec["paths"][path][method.lower()]["responses"]
                assert str(r.status_code) in documented, (method, path, r.status_code, r.text)
                content = documented[str(r.status_code)]["content"]
                ctype = r.headers["content-type"].split(";")[0]
                assert ctype in content, (method, path, r.status_code, ctype, list(content))
                if ctype == "application/json":
                    conform(
                        r.json(), content[ctype]["schema"], spec, f"{method} {path} {r.status_code}"
                    )
                seen.add((method, path, r.status_code))
    assert {s for _, _, s in seen} == {200, 401, 404, 413, 415, 422}
    assert os.environ.get("GRADWISE_TOKEN") != TOKEN  # nothing leaked into this process


def test_a_token_file_must_hold_a_token_and_should_be_private(tmp_path: Path) -> None:
    from gradwise.deploy.serve import read_token
    from gradwise.errors import ConfigError, GradwiseWarning

    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}  \nsecond line\n")
    path.chmod(0o600)
    assert read_token(path) == TOKEN
    path.chmod(0o644)
    with pytest.warns(GradwiseWarning, match="can be read by other users: chmod 600"):
        assert read_token(path) == TOKEN
    path.write_text("\n")
    with pytest.raises(ConfigError, match="a file holding the token on its first line"):
        read_token(path)
    with pytest.raises(ConfigError, match="a readable file holding the token"):
        read_token(tmp_path / "missing")
