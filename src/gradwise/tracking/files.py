"""Plain files of a run directory: atomic writes, the run's status and its metrics log.

A running run records in status.json which process runs it (pid, host, boot id and the process's
start time) and touches the file every HEARTBEAT_S seconds, so a reader can tell a run whose
process is gone (killed, crashed, out of disk) from one still training: :func:`dead_reason`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from gradwise.errors import ConfigError, GradwiseError

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"

# "running" while training; the others are final
STATES = ("running", "finished", "failed", "interrupted")
_STATUS_KEYS = ("started", "ended", "step", "epoch", "best_metric", "monitor", "message")
MAX_NAME_BYTES = 200  # file systems allow 255; a -N suffix may follow
HEARTBEAT_S = 30.0  # a running run touches its status.json this often
STALE_S = 10 * 60.0  # a run on another host without a heartbeat for this long is dead


def now_iso() -> str:
    """The local time with its UTC offset, e.g. ``2025-01-31T14:02:07.123+01:00``."""
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a part."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The data goes to a temporary file in the same directory, which is fsynced and renamed over
    ``path``; the directory is then fsynced so that the rename survives a crash. If writing fails
    (a full disk), the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open applies the umask, so the file gets the same permissions as one made with open()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise naming(exc, path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def naming(exc: OSError, path: str | Path) -> OSError:
    """``exc`` as an OSError of the same kind about ``path`` (not a temporary file, or nothing)."""
    if exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))


def publish_dir(tmp: Path, final: Path) -> Path:
    """Publish the directory written at ``tmp`` as ``final``, atomically: fsync every file and the
    directory, rename it over ``final`` (an older one there is moved aside, then removed) and fsync
    the parent, so readers see the old directory or the complete new one, never a part."""
    root = final.parent
    for path in sorted(tmp.rglob("*"), reverse=True):  # files, then their directories
        if path.is_dir():
            fsync_dir(path)
        else:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    old = None
    if final.exists():
        old = root / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def atomic_write_json(path: Path, obj: Any) -> None:
    """:func:`atomic_write_text` of ``obj`` as indented JSON (numpy/torch scalars become numbers)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=jsonable) + "\n")


def jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: scalars with ``.item()`` (numpy, torch) become numbers, the rest text."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def fsync_dir(directory: Path) -> None:
    """Make a rename or new file in ``directory`` durable (no-op on Windows)."""
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_fsync_dir = fsync_dir  # old private name, still imported by gradwise.checkpoint


def new_run_dir(root: str | Path, name: str) -> Path:
    """Create and return ``root/name``, or ``name-2``, ``name-3``... if taken.

    An existing directory is never reused, even when empty, so two runs cannot mix their files;
    ``mkdir`` is atomic, so concurrent runs with the same name get distinct directories too.
    """
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("."):
        raise ConfigError("run name", name, "a directory name without '/', '\\' or a leading '.'")
    if len(name.encode("utf-8", "replace")) > MAX_NAME_BYTES:
        raise ConfigError("run name", name, f"a directory name of at most {MAX_NAME_BYTES} bytes")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    candidate, n = name, 1
    while True:
        path = root / candidate
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            candidate = f"{name}-{n}"


def write_status(run_dir: Path, state: str, **fields: Any) -> None:
    """Set the run's state and merge ``fields`` into ``status.json``, atomically.

    Fields not given keep their previous value. ``started`` is filled in on the first write,
    ``ended`` when the state becomes final, and ``updated`` on every write (so a run killed
    without a final write can be told apart by its age).
    """
    if state not in STATES:
        raise ValueError(f"status state must be one of {STATES}, got {state!r}")
    path = Path(run_dir) / STATUS_FILE
    status: dict[str, Any] = dict.fromkeys(_STATUS_KEYS)
    if path.exists():
        status.update(read_status(run_dir))
    status.update(fields, state=state)
    now = now_iso()
    status["updated"] = now
    if status["started"] is None:
        status["started"] = now
    if state == "running":
        status["ended"] = fields.get("ended")
        status.update(process_identity())
    elif "ended" not in fields:
        status["ended"] = now
    atomic_write_json(path, {"state": status.pop("state"), **status})


def try_write_status(run_dir: Path, state: str, **fields: Any) -> bool:
    """:func:`write_status`, best effort (a full disk): False when it could not be written.

    A run whose final state cannot be written stays "running" in status.json; its process being
    gone then shows it as dead (:func:`dead_reason`).
    """
    try:
        write_status(run_dir, state, **fields)
    except OSError:
        return False
    return True


# -- is a running run alive? --------------------------------------------------------------------


def process_identity() -> dict[str, Any]:
    """What tells this process apart, even from a later one with the same pid."""
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "process_start": _process_start(pid),
        "heartbeat_s": HEARTBEAT_S,
    }


def dead_reason(status: dict[str, Any], heartbeat_age_s: float | None) -> str | None:
    """Why a run whose status says "running" is in fact dead, or None if it may be alive.

    On this host: its process is gone, or the pid now belongs to another process, or the machine
    restarted. On another host: no heartbeat (status.json untouched) for STALE_S seconds.
    Runs written before process identities were recorded are taken at their word.
    """
    pid, host = status.get("pid"), status.get("host")
    if status.get("state") != "running" or not isinstance(pid, int) or not host:
        return None
    if host == socket.gethostname():
        boot = _boot_id()
        if boot and status.get("boot_id") and boot != status["boot_id"]:
            return f"{host} has restarted since it ran"
        if not pid_alive(pid):
            return f"its process {pid} on {host} is gone"
        start = status.get("process_start")
        if start is not None and _process_start(pid) not in (None, start):
            return f"its process {pid} on {host} is gone (the pid is another process's now)"
        return None
    stale = max(STALE_S, 10 * float(status.get("heartbeat_s") or HEARTBEAT_S))
    if heartbeat_age_s is not None and heartbeat_age_s > stale:
        return f"no heartbeat from {host} for {heartbeat_age_s / 60:.0f} minutes"
    return None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (True where that cannot be told)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])  # field 22; the name may hold spaces


class Heartbeat:
    """Touches ``status.json`` every ``interval`` seconds from a daemon thread while a run trains.

    A touch is one ``utime`` call: no write, no fsync, nothing on the training thread.
    """

    def __init__(self, run_dir: Path, interval: float = HEARTBEAT_S) -> None:
        self.path = Path(run_dir) / STATUS_FILE
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="gradwise-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            # replaced at that very moment, or the disk is gone: the next beat tries again
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def heartbeat_age(run_dir: Path) -> float | None:
    """Seconds since the run's status.json was last written or touched."""
    try:
        return time.time() - (Path(run_dir) / STATUS_FILE).stat().st_mtime
    except OSError:
        return None


def read_status(run_dir: Path) -> dict[str, Any]:
    """The contents of ``status.json``; a GradwiseError if ``run_dir`` has none (not a run)."""
    path = Path(run_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GradwiseError(
            f"{run_dir} is not a gradwise run directory: it has no {STATUS_FILE}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GradwiseError(f"{path} is not valid JSON ({e}); the file was damaged") from None


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl`` in order, optionally only those of one ``split``.

    A truncated last line (left by a run killed while writing) is skipped silently; a damaged
    line elsewhere is skipped with a warning. A run with no metrics file yet gives ``[]``.
    """
    path = Path(run_dir) / METRICS_FILE
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    records, last = [], len(lines) - 1
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i != last:
                warnings.warn(f"{path}:{i + 1}: skipped a damaged line", stacklevel=2)
            continue
        if split is None or record.get("split") == split:
            records.append(record)
    return records


def repair_metrics_tail(path: Path) -> None:
    """Cut a partial last line from ``path`` so that appending to it starts on a fresh line."""
    try:
        f = open(path, "r+b")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # read backwards in blocks to find the last newline
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut != -1:
                f.truncate(start + cut + 1)
                return
            end = start
        f.truncate(0)
