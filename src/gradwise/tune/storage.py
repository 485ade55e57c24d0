"""Where a study lives: a journal file on this machine by default, a database for many machines.

The default is Optuna's journal storage (an append-only log file, ``runs/tune/<study>.journal``):
several local worker processes can write it at once, where SQLite fails with "database is locked".
Workers on several machines share one database by URL (``postgresql://user:pass@host/db``, Optuna's
RDBStorage, with heartbeats so that the trials of a dead worker are failed and retried). A storage
that cannot be opened is a GradwiseError before any trial starts.

A worker killed while appending to a journal leaves a partial last line. Optuna's reader skips it,
but the next append would be glued onto it and make the whole study unreadable. So the journal is
checked when opened and before every append (under Optuna's own file lock): a partial last line is
cut off (kept in ``<journal>.damaged-<time>``, with a warning); a record already glued onto one is
freed of it; any other damage is refused with one message that says how to cut the file.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from gradwise.errors import ConfigError, GradwiseError, warn
from gradwise.tracking.files import atomic_write_bytes, pid_alive

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
            lock = _RepairingLock(optuna, path)
            bad, tail = _scan(path.read_bytes()) if path.is_file() else ([], b"")
            if bad or tail:
                with lock:  # every writer takes this lock: nothing is appended meanwhile
                    repair_journal(path)
            backend = optuna.storages.journal.JournalFileBackend(str(path), lock_obj=lock)
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


# -- journal repair ---------------------------------------------------------------------------

_RECORD_START = b'{"op_code":'  # Optuna writes every journal record with this key first


class _RepairingLock:
    """Optuna's symlink lock on the journal, repairing the journal each time it is taken.

    Optuna takes the lock for every append, so no record is ever appended onto a partial line
    left by a killed writer. Checking costs one seek and a one-byte read per append.
    """

    def __init__(self, optuna: Any, path: Path) -> None:
        self.path = path
        self._lock = optuna.storages.journal.JournalFileSymlinkLock(str(path))

    def acquire(self) -> bool:
        self._lock.acquire()
        try:
            repair_journal(self.path, full=False)
        except BaseException:
            self._lock.release()
            raise
        return True

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> _RepairingLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def repair_journal(path: Path, *, full: bool = True) -> int:
    """Repair the journal at ``path`` (the caller holds its lock) and return the bytes dropped.

    A partial last line is cut; a record glued onto a partial line is freed of it; empty lines are
    dropped; other damage is a GradwiseError. What is dropped is kept in ``<journal>.damaged-<time>``
    and named in a warning. ``full=False`` only checks that the journal ends with a newline.
    """
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if not full:
            if size == 0:
                return 0
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
        f.seek(0)
        data = f.read()
        bad, tail = _scan(data)
        if not bad and not tail:
            return 0
        kept, dropped, reasons = _repaired(path, data, bad, tail)
        backup = _backup(path, b"\n".join(dropped) + b"\n")
        if bad:  # a line in the middle changes: replace the file, readers see old or new
            atomic_write_bytes(path, kept)
        else:  # only the tail goes: cut it in place
            f.truncate(len(kept))
            f.flush()
            os.fsync(f.fileno())
    warn(
        f"repaired the study journal {path}: dropped {sum(map(len, dropped))} bytes "
        f"({'; '.join(reasons)}); they are kept in {backup}"
    )
    return sum(map(len, dropped))


def _scan(data: bytes) -> tuple[list[tuple[int, int, bytes]], bytes]:
    """The complete lines Optuna cannot read, as (number, offset, line), and the partial last line."""
    *lines, tail = data.split(b"\n")
    bad, offset = [], 0
    for number, line in enumerate(lines, start=1):
        if not _is_record(line):
            bad.append((number, offset, line))
        offset += len(line) + 1
    return bad, tail


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _repaired(
    path: Path, data: bytes, bad: list[tuple[int, int, bytes]], tail: bytes
) -> tuple[bytes, list[bytes], list[str]]:
    """The journal without its damage, the bytes dropped and why; a GradwiseError if it cannot be."""
    kept, dropped, reasons, start = bytearray(), [], [], 0
    for number, offset, line in bad:
        kept += data[start:offset]
        start = offset + len(line) + 1
        glued = line.rfind(_RECORD_START)
        if glued > 0 and _is_record(line[glued:]):
            kept += line[glued:] + b"\n"
            dropped.append(line[:glued])
            reasons.append(f"a partial record glued onto the start of line {number}")
        elif not line.strip():
            dropped.append(line)
            reasons.append(f"the empty line {number}")
        else:
            raise GradwiseError(
                f"the study journal {path} is damaged at line {number} (byte {offset}): it is "
                "not a journal record, and Optuna cannot read past it. Keep a copy and cut the "
                f"journal there (the records after it are lost): cp {path} {path}.bak && "
                f"truncate -s {offset} {path}"
            )
    kept += data[start : len(data) - len(tail)]
    if tail:
        dropped.append(tail)
        number = data.count(b"\n") + 1
        reasons.append(f"the partial last line {number}, left by a writer killed mid-write")
    return bytes(kept), dropped, reasons


def _backup(path: Path, content: bytes) -> Path:
    """Write ``content`` to a new ``<journal>.damaged-<time>`` next to the journal."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for n in range(1, 1000):
        backup = path.with_name(f"{path.name}.damaged-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            with open(backup, "xb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            return backup
        except FileExistsError:
            continue
    raise GradwiseError(f"cannot name a backup of {path}: too many {path.name}.damaged-* files")


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
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))
