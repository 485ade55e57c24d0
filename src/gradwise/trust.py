"""The trust model: code named by a directory runs only when the user says so.

Run directories (``recipe.yaml``), export directories (``model.json``) and registered models are
data that anyone may hand you. Loading one never imports the ``module:attr`` import paths it names
(model, data, loss) and never unpickles a ``.pt2`` or TorchScript artifact that gradwise did not
write, unless the caller trusts it: ``--trust`` on the command line, ``trust=True`` in Python
(like transformers' ``trust_remote_code``). Registry names (zoo models, built-in data sets) are
always allowed, and recipes the user gives directly (``gradwise train recipe.yaml``,
``Trainer(recipe=...)``) are trusted.

Import paths are refused in :func:`gradwise.registry.import_path`, the one place they resolve.
Pickled artifacts are recognised by the **ledger**: the SHA-256 of every artifact gradwise writes,
appended to ``artifacts.jsonl`` in :func:`home` (``$GRADWISE_HOME``, else
``$XDG_DATA_HOME/gradwise``, else ``~/.local/share/gradwise``). It lives outside every export
directory because a hostile directory controls its own ``model.json``.
"""

from __future__ import annotations

import json
import os
import warnings
from datetime import datetime
from pathlib import Path

from gradwise.errors import ConfigError

LEDGER = "artifacts.jsonl"
HOW_TO_TRUST = "pass --trust (trust=True in Python) if you trust where the directory came from"


class UntrustedError(ConfigError):
    """Loading would run code named by a directory the user has not trusted."""


def refuse_import(path: str, field: str) -> UntrustedError:
    """The error for an import path that an untrusted directory names in ``field``."""
    return UntrustedError(
        field,
        path,
        "a registry name (the import paths that a run, export or registry directory names are "
        "imported only when you trust it)",
        f"importing it runs its code; {HOW_TO_TRUST}",
    )


def home() -> Path:
    """The per-user gradwise data directory that holds the ledger."""
    if os.environ.get("GRADWISE_HOME"):
        return Path(os.environ["GRADWISE_HOME"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "gradwise"


def ledger_path() -> Path:
    return home() / LEDGER


def record_artifact(path: str | Path) -> str:
    """Append ``path``'s SHA-256 to the ledger (fsynced); returns the digest.

    One ``write`` of one short line on a file opened for appending, so concurrent exports never
    interleave; a line left without its newline by a crash is ended first. A ledger that cannot
    be written only warns: the export itself stays valid.
    """
    from gradwise.deploy.card import sha256_file

    digest = sha256_file(path)
    line = json.dumps(
        {
            "sha256": digest,
            "artifact": Path(path).name,
            "written": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
    )
    file = ledger_path()
    try:
        file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            torn = end > 0 and os.pread(fd, 1, end - 1) != b"\n"
            os.write(fd, ("\n" * torn + line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        warnings.warn(
            f"could not record {Path(path).name} in the artifact ledger {file} ({exc}); "
            "loading it later will need --trust",
            stacklevel=2,
        )
    return digest


def recorded(digest: str) -> bool:
    """Whether gradwise wrote an artifact with this SHA-256 for this user."""
    try:
        lines = ledger_path().read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return False
    for line in lines:
        try:
            if json.loads(line).get("sha256") == digest:
                return True
        except (json.JSONDecodeError, AttributeError):
            continue  # a line torn by a crash, or not ours
    return False


def require_recorded(path: str | Path, trusted: bool) -> None:
    """Refuse to unpickle ``path`` unless it is ``trusted`` or its SHA-256 is in the ledger."""
    from gradwise.deploy.card import sha256_file

    if trusted or recorded(sha256_file(path)):
        return
    raise UntrustedError(
        "artifact",
        str(path),
        f"an artifact gradwise exported for you (its sha256 is not in the ledger {ledger_path()})",
        f"loading a {Path(path).suffix} file unpickles it, which can run any code; {HOW_TO_TRUST}",
    )
