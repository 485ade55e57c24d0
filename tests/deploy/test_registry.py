"""The model registry against a real MLflow SQLite database in a temporary folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from gradwise.deploy.registry import parse_uri, register, resolve, set_alias
from gradwise.deploy.serve import create_app
from gradwise.errors import ConfigError, GradwiseError

from .conftest import live_server

pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory):
    """One MLflow SQLite database for the module (creating its tables takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{(root / 'mlflow.db').as_posix()}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def test_register_versions_aliases_and_resolve(db, tabular, tmp_path: Path) -> None:
    first = register(tabular["dir"], "cancer", alias="champion")
    second_dir = tmp_path / "v2"
    shutil.copytree(tabular["dir"], second_dir)
    card = json.loads((second_dir / "model.json").read_text())
    card["name"] = "cancer-v2"
    (second_dir / "model.json").write_text(json.dumps(card))
    second = register(second_dir, "cancer", alias="challenger")
    assert second == first + 1

    champion = resolve("models:/cancer@champion", tmp_path / "champion")
    assert json.loads((champion / "model.json").read_text())["name"] == "breast-cancer-mlp"
    assert (champion / "model.onnx").read_bytes() == (tabular["dir"] / "model.onnx").read_bytes()
    assert (champion / "reference.json").is_file()
    by_number = resolve(f"models:/cancer/{second}")
    assert json.loads((by_number / "model.json").read_text())["name"] == "cancer-v2"
    latest = resolve("models:/cancer/latest")
    assert json.loads((latest / "model.json").read_text())["name"] == "cancer-v2"

    set_alias("cancer", "champion", second)  # promote
    promoted = resolve("models:/cancer@champion")
    assert json.loads((promoted / "model.json").read_text())["name"] == "cancer-v2"

    from mlflow.tracking import MlflowClient

    version = MlflowClient(db).get_model_version("cancer", str(second))
    assert version.tags["sha256"] == card["sha256"] and version.tags["task"] == "multiclass"
    assert set(version.aliases) == {"champion", "challenger"}


def test_serve_a_registered_model_by_alias(db, tabular) -> None:
    register(tabular["dir"], "served", alias="champion")
    app = create_app("models:/served@champion", max_wait_ms=1)
    with live_server(app) as (url, _):
        r = httpx.post(f"{url}/v1/predict", json={"instances": tabular["x"][:5].tolist()})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 5
        assert httpx.get(f"{url}/v1/model").json()["name"] == "breast-cancer-mlp"


def test_bad_uris_and_unknown_models_are_named(db, tabular, tmp_path: Path) -> None:
    assert parse_uri("models:/m@champion") == ("m", "champion", None)
    assert parse_uri("models:/m/3") == ("m", None, "3")
    for bad in ("runs:/abc/model", "models:/", "models:/a/b/c", "models:/m@"):
        with pytest.raises(ConfigError, match="model URI"):
            parse_uri(bad)
    with pytest.raises(ConfigError, match="registered model"):
        resolve("models:/no-such-model@champion")
    register(tabular["dir"], "known")
    with pytest.raises(ConfigError, match=r"registered models: .*known"):
        resolve("models:/known@missing-alias")
    with pytest.raises(ConfigError, match="version number"):
        resolve("models:/known/first")
    with pytest.raises(ConfigError, match=r"model\.json"):
        register(tmp_path, "empty")
    damaged = tmp_path / "damaged"
    shutil.copytree(tabular["dir"], damaged)
    (damaged / "model.onnx").write_bytes(b"not the exported model")
    with pytest.raises(GradwiseError, match="sha256"):
        register(damaged, "known")


def test_default_registry_is_runs_mlflow_db(tabular, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    version = register(tabular["dir"], "local", alias="champion")
    assert version == 1
    assert Path("runs/mlflow.db").is_file()  # the tests run in their own temporary folder
    assert any(Path("runs/mlartifacts").rglob("model.onnx"))
    assert (resolve("models:/local@champion") / "model.onnx").is_file()
