"""The model registry: exported artifacts as versioned MLflow models with aliases.

``register`` logs an export directory as the artifacts of an MLflow run (experiment
``gradwise-models``) and makes it a new version of a registered model, optionally moving an alias
(``champion``) to it. ``resolve`` turns ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or
``models:/NAME/latest`` back into a local export directory (downloaded, sha256 checked), which is
what ``gradwise serve models:/NAME@champion`` serves.

The registry lives in the same tracking database as the runs: ``MLFLOW_TRACKING_URI`` when set,
else ``sqlite:///runs/mlflow.db`` with artifacts under ``runs/mlartifacts`` (as ``Tracker``).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from gradwise.deploy.formats import serving_card
from gradwise.errors import ConfigError, GradwiseError
from gradwise.tracking.tracker import quiet_loggers

EXPERIMENT = "gradwise-models"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")


def tracking_uri(uri: str | None = None, root: str | Path = "runs") -> tuple[str, str | None]:
    """The tracking/registry URI and, for the default local database, its artifact location."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'mlflow.db').as_posix()}", (root / "mlartifacts").as_uri()


def register(
    artifact_dir: str | Path,
    name: str,
    alias: str | None = None,
    *,
    uri: str | None = None,
    description: str | None = None,
) -> int:
    """Register an export directory as a new version of model ``name``; returns the version.

    With ``alias`` (e.g. ``champion``) the alias is moved to the new version.
    """
    from mlflow.exceptions import MlflowException

    artifact_dir = Path(artifact_dir)
    card = serving_card(artifact_dir)
    links = sorted(
        str(p.relative_to(artifact_dir)) for p in artifact_dir.rglob("*") if p.is_symlink()
    )
    if links:
        raise ConfigError(
            "artifact_dir",
            str(artifact_dir),
            "an export directory of plain files",
            f"registering would upload what its symbolic links point to: {', '.join(links)}",
        )
    client, artifact_location = _client(uri)
    try:
        experiment_id = _experiment(client, artifact_location)
        tags = {
            "gradwise.artifact_dir": str(artifact_dir.resolve()),
            "gradwise.model": str(card.get("name", "")),
            "gradwise.task": str(card.get("task", "")),
            "gradwise.sha256": str(card.get("sha256", "")),
        }
        run = client.create_run(experiment_id, run_name=f"register-{name}", tags=tags)
        run_id = run.info.run_id
        client.log_artifacts(run_id, str(artifact_dir), artifact_path="model")
        metrics = _numbers(card.get("metrics") or {})
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id)
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/model",
            run_id=run_id,
            tags={k.removeprefix("gradwise."): v for k, v in tags.items()},
            description=description,
        )
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as e:
        raise GradwiseError(f"registering {artifact_dir} as {name!r} failed: {e.message}") from e
    return int(version.version)


def set_alias(name: str, alias: str, version: int, *, uri: str | None = None) -> None:
    """Point ``alias`` of model ``name`` at ``version`` (promote a model)."""
    from mlflow.exceptions import MlflowException

    client, _ = _client(uri)
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as e:
        raise GradwiseError(f"setting alias {alias!r} of {name!r} failed: {e.message}") from e


def parse_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/3`` -> (NAME, None, "3")."""
    m = _URI.match(model_uri)
    if m is None:
        raise ConfigError(
            "model URI",
            model_uri,
            "models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest",
        )
    return m["name"], m["alias"], m["version"]


def resolve(model_uri: str, dst: str | Path | None = None, *, uri: str | None = None) -> Path:
    """The local export directory of a registered model version (downloaded into ``dst``, by
    default a new temporary directory), its artifact's sha256 checked against its card."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_uri(model_uri)
    client, _ = _client(uri)
    try:
        if alias is not None:
            found = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ConfigError("model URI", model_uri, "a registered model with versions")
            found = max(versions, key=lambda v: int(v.version))
        elif version is not None and version.isdigit():
            found = client.get_model_version(name, version)
        else:
            raise ConfigError("model URI", model_uri, "a version number, 'latest' or @ALIAS")
        source = client.get_model_version_download_uri(name, found.version)
    except MlflowException as e:
        known = ", ".join(m.name for m in client.search_registered_models()) or "none"
        raise ConfigError(
            "model URI", model_uri, f"a registered model version (registered models: {known})"
        ) from e
    target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix=f"gradwise-{name}-"))
    target.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(download_artifacts(artifact_uri=source, dst_path=str(target)))
    except MlflowException as e:
        raise GradwiseError(f"downloading {model_uri} from {source} failed: {e.message}") from e
    serving_card(local)
    return local


# -- helpers -----------------------------------------------------------------------------------


def _client(uri: str | None) -> tuple[Any, str | None]:
    from mlflow.tracking import MlflowClient

    resolved, artifact_location = tracking_uri(uri)
    with quiet_loggers("mlflow.store.db.utils", "alembic"):  # the first use creates the tables
        client = MlflowClient(tracking_uri=resolved, registry_uri=resolved)
        client.search_experiments(max_results=1)
    return client, artifact_location


def _experiment(client: Any, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        try:
            return client.create_experiment(EXPERIMENT, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) metrics dict, with dotted keys."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[re.sub(r"[^\w\-. /]", "_", f"{prefix}{key}")[:250]] = float(value)
    return flat
