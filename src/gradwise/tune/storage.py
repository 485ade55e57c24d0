"""Where a study lives: a journal file on this machine by default, a database for many machines.

The default is Optuna's journal storage (an append-only log file, ``runs/tune/<study>.journal``):
several local worker processes can write it at once, where SQLite fails with "database is locked".
Workers on several machines share one database by URL (``postgresql://user:pass@host/db``, Optuna's
RDBStorage, with heartbeats so that the trials of a dead worker are failed and retried). A storage
that cannot be opened is a GradwiseError before any trial starts.
"""

from __future__ import annotations

import os
import random
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from gradwise.errors import ConfigError, GradwiseError

JOURNAL_SUFFIX = ".journal"
HEARTBEAT_S, GRACE_S = 60, 180  # RDB: a trial without a heartbeat for GRACE_S seconds is failed
CONNECT_TIMEOUT_S = 10
SCHEMA_ATTEMPTS = 5  # workers opening an empty database at once race to create its tables


def journal_path(root: str | Path, study: str) -> Path:
    """The default storage of ``study``: a journal file under the runs root."""
    return Path(root) / "tune" / f"{study}{JOURNAL_SUFFIX}"


def is_url(location: str) -> bool:
    return "://" in location


def is_sqlite(location: str) -> bool:
    return location.split("://", 1)[0].split("+", 1)[0] == "sqlite"


def describe(location: str) -> str:
    """The location for messages: a database URL without its password."""
    if not is_url(location):
        return location
    try:
        from sqlalchemy.engine import make_url

        return make_url(location).render_as_string(hide_password=True)
    except Exception:
        return location.split("@")[-1]


def open_storage(location: str) -> Any:
    """An Optuna storage: a journal file path, or a database URL (RDBStorage).

    Raises a GradwiseError naming the storage and the reason when it cannot be opened (an
    unreachable server, a missing driver, a bad URL), so that nothing starts against it.
    """
    import optuna

    if not is_url(location):
        path = Path(location)
        if path.suffix != JOURNAL_SUFFIX:
            raise ConfigError(
                "--storage",
                location,
                f"a journal file ending in {JOURNAL_SUFFIX} or a database URL such as "
                "postgresql://user:password@host/db",
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            return optuna.storages.JournalStorage(backend)
        except OSError as exc:
            raise GradwiseError(f"cannot open the study journal {path}: {exc}") from None
    url = _with_driver(location)
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme == "sqlite":  # a new database file in a folder that does not exist yet
        _make_parent(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if scheme in ("postgresql", "mysql"):
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        return _rdb_storage(optuna, url, engine_kwargs)
    except Exception as exc:  # sqlalchemy's errors, a missing driver, a malformed URL
        cause = exc.__cause__ if isinstance(exc, ImportError) and exc.__cause__ else exc
        reason = str(getattr(cause, "orig", None) or cause).strip().splitlines()
        hint = reason[0] if reason else type(exc).__name__
        if isinstance(exc, ImportError) or "No module named" in hint:
            hint += (
                " (install the database driver; PostgreSQL's is in pip install 'gradwise[tune]')"
            )
        raise GradwiseError(f"cannot open the study storage {describe(location)}: {hint}") from None


def _rdb_storage(optuna: Any, url: str, engine_kwargs: dict[str, Any]) -> Any:
    """Optuna's RDBStorage, which creates its tables in an empty database.

    Workers started at once on several machines all find the database empty and create the
    tables together; all but one fail ("duplicate key value violates unique constraint",
    "relation ... already exists"). The tables exist once the winner has committed, so a loser
    tries again after a short, random pause.
    """
    from sqlalchemy import exc as sql_errors

    def attempt() -> Any:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
            )

    for tries in range(1, SCHEMA_ATTEMPTS):
        try:
            return attempt()
        except (sql_errors.IntegrityError, sql_errors.ProgrammingError) as exc:
            if isinstance(exc, sql_errors.ProgrammingError) and "already exists" not in str(exc):
                raise  # a real error (permissions, a bad database)
            time.sleep(random.uniform(0.1, 0.5) * tries)
    return attempt()


def _make_parent(url: str) -> None:
    from sqlalchemy.engine import make_url

    try:
        database = make_url(url).database
    except Exception:
        return  # the RDBStorage below reports a malformed URL
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _with_driver(url: str) -> str:
    """postgresql:// with the psycopg2 driver when psycopg 3 (SQLAlchemy 2.1's default) is absent."""
    import importlib.util

    if (
        url.startswith("postgresql://")
        and importlib.util.find_spec("psycopg") is None
        and importlib.util.find_spec("psycopg2") is not None
    ):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def worker_id() -> str:
    """host:pid of this process, recorded on each trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def is_gone(worker: str) -> bool:
    """Whether the worker ``host:pid`` ran on this machine and its process no longer exists."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or os.name == "nt":
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
