"""Checkpoints that survive a kill and never unpickle arbitrary objects.

A checkpoint is a directory ``checkpoints/step-00000120/`` holding

- ``model.safetensors`` (and ``ema.safetensors``): the weights, in safetensors;
- ``state.pt``: optimizer, scheduler, scaler and RNG states and the data position, only tensors and
  plain Python values, so it loads with ``torch.load(weights_only=True)``;
- ``meta.json``: step, epoch and metrics for people;
- ``manifest.json``: the size and SHA-256 of every other file, written last.

It is written into a hidden temporary directory, every file and the directory are fsynced, and the
directory is renamed into place: a reader sees a whole checkpoint or none. ``best.json`` points at the
best one; the last ``keep_last`` are kept besides it.

Disks and copies still damage files, so loading verifies the manifest first (checkpoints from before
manifests are checked for structure only: a complete safetensors file, the state file's zip CRCs).
A damaged latest (or best) checkpoint falls back to the newest good one with a warning that names
it and why; when none is good, one DataError lists what is wrong with each.

A model with peft adapters (gradwise.finetune.adapters) keeps its base as it was loaded, so its
``model.safetensors`` (and ``ema.safetensors``) holds only what changes: the adapters, the modules
trained in full, any other trainable parameter and the buffers (BatchNorm statistics train in a
frozen base too). The file's metadata records the SHA-256 of the frozen base tensors it leaves out
(names, dtypes, shapes, bytes), and loading checks it against the model it loads into: an adapter
never lands silently on another base.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from gradwise.errors import DataError, warn
from gradwise.tracking.files import atomic_write_json, naming, publish_dir

CHECKPOINTS = "checkpoints"
DCP = "dcp"  # FSDP2 checkpoints: torch.distributed.checkpoint's shards, instead of WEIGHTS
WEIGHTS, EMA_WEIGHTS, STATE, META, MANIFEST, BEST = (
    "model.safetensors",
    "ema.safetensors",
    "state.pt",
    "meta.json",
    "manifest.json",
    "best.json",
)
FORMAT = 2  # meta.json's "format": 2 and later have a manifest; 1 (no key) had none
ADAPTER = "gradwise.adapter"  # safetensors metadata key of an adapter-only weights file
DAMAGED = "damaged-"  # prefix of a damaged checkpoint set aside by a resumed run


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module | None,
    state: dict[str, Any],
    ema: nn.Module | None = None,
    meta: dict[str, Any] | None = None,
    sharded: Path | None = None,
) -> Path:
    """Write a checkpoint atomically and return its directory (replacing one of the same step).

    sharded: a torch.distributed.checkpoint directory the ranks wrote (FSDP2: weights and
    optimizer state in shards), moved in as ``dcp/`` in place of the safetensors weights."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if sharded is not None:
            os.replace(sharded, tmp / DCP)
        # the weights (or a peft model's frozen base) are hashed in a thread while the (larger)
        # state file is written and hashed
        with ThreadPoolExecutor(max_workers=1) as pool:
            digests, adapters = {}, {}
            for name, module in ((WEIGHTS, model), (EMA_WEIGHTS, ema)):
                if module is not None and _has_adapters(module):
                    adapters[name] = _AdapterWeights(module, pool)
                elif module is not None:
                    _save_weights(module, tmp / name)
                    digests[name] = pool.submit(_sha256, tmp / name)
            with open(tmp / STATE, "wb") as f:  # a file object: a full disk is an OSError
                hashing = _HashingFile(f)
                torch.save(state, hashing)
            for name, weights in adapters.items():
                weights.save(tmp / name)
            meta = {"step": step, **(meta or {}), "format": FORMAT}
            if adapters:
                meta["weights"] = "adapter"  # for people: the base is not in this checkpoint
            (tmp / META).write_text(json.dumps(meta, indent=2))
            digests = {name: digest.result() for name, digest in digests.items()}
            write_manifest(tmp, {**digests, STATE: hashing.sha256.hexdigest()})
        return publish_dir(tmp, final)
    except BaseException as exc:  # e.g. a full disk: leave no partial checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise naming(exc, final) from exc
        raise


def _save_weights(module: nn.Module, path: Path) -> None:
    """safetensors' save_model, with its I/O errors (a full disk) as OSError."""
    try:
        save_model(module, str(path))
    except SafetensorError as exc:
        _raise_os_error(exc, path)
        raise


def _raise_os_error(exc: SafetensorError, path: Path) -> None:
    """Raise safetensors' I/O error (a full disk) as the OSError it wraps; return otherwise."""
    code = re.search(r"\(os error (\d+)\)", str(exc))
    if code is not None:
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from exc


def _has_adapters(module: nn.Module) -> bool:
    from gradwise.finetune.adapters import is_peft

    return is_peft(module)


class _AdapterWeights:
    """What an adapter-only weights file holds, taken from a peft model (or its EMA), with the
    fingerprint of the rest (the frozen base) computed in ``pool``."""

    def __init__(self, module: nn.Module, pool: ThreadPoolExecutor) -> None:
        from gradwise.finetune.adapters import adapter_keys, base_fingerprint, peft_summary

        state = module.state_dict(keep_vars=True)
        named = list(module.named_parameters(remove_duplicate=False))
        params = {n for n, _ in named}
        keep = adapter_keys(module) | {n for n, p in named if p.requires_grad}
        keep |= {k for k in state if k not in params}  # buffers
        names_of: dict[int, list[str]] = {}  # tied tensors: one tensor under several names
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                names_of.setdefault(id(value), []).append(key)
        self.tensors: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        base: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        for names in names_of.values():
            if any(n in keep for n in names):
                t = state[names[0]].detach()
                ptr = t.untyped_storage().data_ptr() if t.numel() else None
                self.tensors[names[0]] = t.clone() if ptr in storages else t  # no shared memory
                storages.add(ptr)
                self.aliases.update({n: names[0] for n in names[1:]})
            else:
                base.update({n: state[n] for n in names})
        self.base_count = len(base)
        self.base_bytes = sum(t.numel() * t.element_size() for t in base.values())
        self.fingerprint = pool.submit(base_fingerprint, base)
        self.summary = peft_summary(module)

    def save(self, path: Path) -> None:
        info = {
            "kind": "adapter",
            "base_sha256": self.fingerprint.result(),
            "base_tensors": self.base_count,
            "base_bytes": self.base_bytes,
            "aliases": self.aliases,
            "peft": {k: self.summary[k] for k in ("method", "adapter", "adapters")},
        }
        try:
            save_file(self.tensors, str(path), metadata={ADAPTER: json.dumps(info)})
        except SafetensorError as exc:
            _raise_os_error(exc, path)
            raise


def adapter_info(path: str | Path) -> dict[str, Any] | None:
    """What an adapter-only weights file records (the base's fingerprint, the peft method...);
    None for a file of full weights."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise DataError(f"{path} is not a readable safetensors file ({exc})") from None
    if ADAPTER not in metadata:
        return None
    try:
        info = json.loads(metadata[ADAPTER])
    except ValueError:
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("base_sha256"), str):
        raise DataError(f"{path}: its {ADAPTER} metadata is damaged")
    return info


def load_weights(
    module: nn.Module, path: str | Path, device: str = "cpu", *, unwrap: bool = False
) -> None:
    """Load a weights file into ``module``: full weights (every tensor must fit), or adapter-only
    weights over a base whose fingerprint must be the one they were trained over.

    ``unwrap``: the file was written from an EMA (an AveragedModel: ``module.`` prefixes and its
    ``n_averaged`` counter) and ``module`` is the bare model (adapter-only files).
    """
    info = adapter_info(path)
    if info is None:
        load_model(module, str(path), device=device)
        return
    tensors = load_file(str(path), device=device)
    aliases = {str(k): str(v) for k, v in dict(info.get("aliases") or {}).items()}
    if unwrap:
        tensors = {k.removeprefix("module."): v for k, v in tensors.items() if k != "n_averaged"}
        aliases = {k.removeprefix("module."): v.removeprefix("module.") for k, v in aliases.items()}
    peft = info.get("peft") or {}
    what = f"checkpoint {Path(path).parent} holds only a {peft.get('method', 'peft')} adapter"
    state = module.state_dict(keep_vars=True)
    unexpected = [k for k in tensors if k not in state]
    if unexpected:
        raise DataError(
            f"{what}, and the model has no place for {unexpected[:3]}: load it into the same "
            "model wrapped the same way (recipe finetune.peft, or gradwise.finetune.apply_peft)"
        )
    from gradwise.finetune.adapters import base_fingerprint

    base = {
        k: v
        for k, v in state.items()
        if k not in tensors and k not in aliases and isinstance(v, torch.Tensor)
    }
    if base_fingerprint(base) != info["base_sha256"]:
        size = sum(t.numel() * t.element_size() for t in base.values())
        raise DataError(
            f"{what}, trained over another base model: the frozen base weights differ (SHA-256 "
            f"{info['base_sha256'][:12]}... expected; this model's {len(base)} base tensors, "
            f"{size:,} bytes, against {info.get('base_tensors')} tensors, "
            f"{info.get('base_bytes', 0):,} bytes then). Load the same pretrained weights "
            "(finetune.pretrained) before the adapter"
        )
    try:
        with torch.no_grad():
            module.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise DataError(f"{what} that does not fit: {str(exc).splitlines()[-1].strip()}") from None


def write_manifest(directory: Path, digests: dict[str, str] | None = None) -> None:
    """Record the size and SHA-256 of every file in ``directory`` in its manifest.json
    (``digests``: those already computed, by file name)."""
    files = {}
    for file in sorted(directory.rglob("*")):
        name = file.relative_to(directory).as_posix()
        if name != MANIFEST and file.is_file():
            digest = (digests or {}).get(name) or _sha256(file)
            files[name] = {"bytes": file.stat().st_size, "sha256": digest}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=2))


class _HashingFile:
    """A file object that hashes what is written through it, so the file is not read again."""

    def __init__(self, file: Any) -> None:
        self._file, self.sha256 = file, hashlib.sha256()

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def copy_checkpoint(source: str | Path, run_dir: Path) -> Path:
    """Copy the checkpoint directory ``source`` into ``run_dir``, atomically, and return the copy.

    The copy keeps its step name, replacing a checkpoint of the same step; resuming ``run_dir``
    then continues from the copied weights and training state (population-based training's
    exploit step). Written like :func:`save_checkpoint`: temporary directory, fsync, rename.
    """
    source = Path(source)
    if not (source / WEIGHTS).is_file():
        raise DataError(f"{source} is not a checkpoint: it has no {WEIGHTS}")
    damage = verify_checkpoint(source)
    if damage:
        raise DataError(f"checkpoint {source} is damaged: {damage}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / source.name
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    return publish_dir(tmp, final)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are not listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if has_weights(p))


def has_weights(checkpoint: Path) -> bool:
    """Whether a directory holds a checkpoint's weights: safetensors, or FSDP2's shards."""
    return (checkpoint / WEIGHTS).is_file() or (checkpoint / DCP / ".metadata").is_file()


def mark_best(run_dir: Path, checkpoint: Path, metric: str, value: float) -> None:
    atomic_write_json(
        Path(run_dir) / CHECKPOINTS / BEST, {"checkpoint": checkpoint.name, metric: value}
    )


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint best.json points at, if it exists (not verified: see resolve_checkpoint)."""
    name = _best_pointer(run_dir).get("checkpoint")
    path = Path(run_dir) / CHECKPOINTS / name if isinstance(name, str) else None
    return path if path is not None and has_weights(path) else None


def _best_pointer(run_dir: Path) -> dict[str, Any]:
    """best.json's contents; {} when missing or damaged."""
    try:
        pointer = json.loads((Path(run_dir) / CHECKPOINTS / BEST).read_text())
    except (OSError, ValueError):
        return {}
    return pointer if isinstance(pointer, dict) else {}


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and the best one, and stale temporaries."""
    root = Path(run_dir) / CHECKPOINTS
    best = best_checkpoint(run_dir)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".tmp-*"), *root.glob(".*.old-*")]:  # publish_dir names old ones
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def resolve_checkpoint(path: str | Path, which: str = "best", *, set_aside: bool = False) -> Path:
    """A good checkpoint directory from itself or its run directory (``which``: best or latest).

    A checkpoint named directly must be good (a DataError names its damage). From a run directory,
    a damaged latest checkpoint falls back to the newest good one, and a damaged best one to the
    best good one by its recorded metric (or the newest good one), with a warning. ``set_aside``
    (a run about to continue): damaged checkpoints newer than the one chosen are renamed
    ``damaged-step-...`` so that the continued run neither keeps them nor prunes good ones for them.
    """
    path = Path(path)
    if has_weights(path):
        damage = verify_checkpoint(path)
        if damage:
            raise DataError(f"checkpoint {path} is damaged: {damage}")
        return path
    run_dir = path.parent if path.name == CHECKPOINTS else path
    complete = list_checkpoints(run_dir)
    if not complete:
        raise DataError(f"no checkpoint found at {path}: expected a run directory or a checkpoint")
    damaged: dict[Path, str] = {}

    def good(candidate: Path) -> bool:
        if candidate not in damaged:
            damaged[candidate] = verify_checkpoint(candidate)
        return not damaged[candidate]

    best_wanted = which == "best" and (run_dir / CHECKPOINTS / BEST).exists()
    best = best_checkpoint(run_dir) if best_wanted else None
    if best is not None and good(best):
        return best
    found = _best_good(run_dir, [c for c in complete if good(c)]) if best_wanted else None
    found = found or next((c for c in reversed(complete) if good(c)), None)
    if best_wanted:
        why = f"{best.name}: {damaged[best]}" if best else "best.json names no checkpoint"
        instead = f"using {found.name} instead" if found else "no checkpoint is good"
        warn(f"the best checkpoint of {run_dir} cannot be used ({why}); {instead}")
    bad = {c: why for c, why in damaged.items() if why}
    if found is None:
        problems = "; ".join(f"{c.name}: {why}" for c, why in sorted(bad.items(), reverse=True))
        raise DataError(f"no good checkpoint in {run_dir}: {problems}")
    newer = [c for c in sorted(bad, reverse=True) if c.name > found.name]
    if newer:
        where = ", ".join(f"{c.name} ({bad[c]})" for c in newer)
        warn(f"skipped damaged checkpoints of {run_dir}: {where}; using {found.name}")
    if set_aside and newer:
        for c in newer:
            _set_aside(c)
        if _best_pointer(run_dir).get("checkpoint") in {c.name for c in newer}:
            _repoint_best(run_dir, [c for c in complete if c not in newer and good(c)])
    return found


def verify_checkpoint(path: Path) -> str:
    """What is wrong with the checkpoint at ``path``: "" when it is good.

    With a manifest every file must have its recorded size and SHA-256. A checkpoint written before
    manifests (meta.json without ``format``) is checked for structure: complete safetensors files
    and a state file whose zip CRCs match.
    """
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            return f"{MANIFEST} is missing and {META} is missing or damaged"
        if not isinstance(meta, dict) or meta.get("format", 1) >= FORMAT:
            return f"{MANIFEST} is missing"
        return _check_structure(path)
    try:
        files = json.loads(manifest_file.read_text())["files"]
        entries = [(name, int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST} is damaged ({type(exc).__name__})"
    if WEIGHTS not in files and f"{DCP}/.metadata" not in files:
        return f"{MANIFEST} does not list {WEIGHTS}"
    for name, size, digest in entries:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, {size} were written"
        if _sha256(file) != digest:
            return f"{name} does not match its SHA-256 (the file changed after it was written)"
    return ""


def _check_structure(path: Path) -> str:
    """Damage a checkpoint without a manifest shows: truncated or garbage files, bad zip CRCs."""
    for name in (WEIGHTS, EMA_WEIGHTS):
        if name == WEIGHTS or (path / name).exists():
            damage = _safetensors_damage(path / name)
            if damage:
                return f"{name} {damage}"
    state = path / STATE
    if state.exists():
        try:
            with zipfile.ZipFile(state) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
            return f"{STATE} is not a complete torch file ({exc})"
        if bad is not None:
            return f"{STATE}: {bad} does not match its CRC"
    return ""


def _safetensors_damage(file: Path) -> str:
    """Why ``file`` is not a complete safetensors file, or ""."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                return f"is truncated or not safetensors ({size} bytes)"
            header = json.loads(f.read(length))
        end = max(
            (e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0
        )
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError):
        return "is truncated or not safetensors"
    if size != 8 + length + end:
        return f"has {size} bytes, its header describes {8 + length + end}"
    return ""


def _best_good(run_dir: Path, good: list[Path]) -> Path | None:
    """The good checkpoint with the best metric that best.json names, recorded at its own step."""
    monitor = _monitor(run_dir)
    if monitor is None:
        return None
    from gradwise.errors import ConfigError
    from gradwise.tasks import monitor_mode

    try:
        sign = 1 if monitor_mode(monitor, "auto") == "max" else -1
    except ConfigError:
        return None
    scored = []
    for c in good:
        try:
            meta = json.loads((c / META).read_text())
        except (OSError, ValueError):
            continue
        value = meta.get(monitor) if isinstance(meta, dict) else None
        evaluated_here = meta.get("step") == int(c.name.removeprefix("step-"))
        if evaluated_here and isinstance(value, (int, float)) and math.isfinite(value):
            scored.append((sign * value, c.name, c))
    return max(scored)[2] if scored else None


def _monitor(run_dir: Path) -> str | None:
    return next((k for k in _best_pointer(run_dir) if k != "checkpoint"), None)


def _repoint_best(run_dir: Path, good: list[Path]) -> None:
    """Point best.json at the best good checkpoint, or remove it when none has the metric."""
    pointer = Path(run_dir) / CHECKPOINTS / BEST
    best, monitor = _best_good(run_dir, good), _monitor(run_dir)
    if best is None or monitor is None:
        pointer.unlink(missing_ok=True)
        warn(f"removed {pointer}: no good checkpoint records its metric")
        return
    mark_best(run_dir, best, monitor, json.loads((best / META).read_text())[monitor])
    warn(f"{pointer} now points at {best.name}")


def _set_aside(checkpoint: Path) -> None:
    """Rename a damaged checkpoint to ``damaged-<name>`` (kept for a look; never loaded)."""
    target = checkpoint.with_name(DAMAGED + checkpoint.name)
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"{DAMAGED}{checkpoint.name}-{n}")
    os.rename(checkpoint, target)
    warn(f"moved the damaged checkpoint {checkpoint} to {target.name}")


def load_checkpoint(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    ema: nn.Module | None = None,
    which: str = "best",
    map_location: str | torch.device = "cpu",
    set_aside: bool = False,
) -> dict[str, Any]:
    """Load weights into ``model`` (and ``ema``) and return the training state.

    ``path`` is a checkpoint directory or a run directory (then its best checkpoint, or the latest
    with ``which="latest"``), verified and with fallbacks as in :func:`resolve_checkpoint`. The
    state file is read with ``weights_only=True``. An adapter-only checkpoint needs ``model``
    wrapped as it was trained (its base fingerprint is checked: see :func:`load_weights`).
    """
    ckpt = resolve_checkpoint(path, which, set_aside=set_aside)
    device = str(map_location)
    if model is not None and (ckpt / DCP).is_dir():  # FSDP2's shards, on any number of ranks
        from gradwise.distributed import load_sharded

        load_sharded(ckpt / DCP, model)
    elif model is not None:
        load_weights(model, ckpt / WEIGHTS, device)
    if ema is not None:
        load_weights(ema, ckpt / EMA_WEIGHTS, device)
    state_file = ckpt / STATE
    state = (
        torch.load(state_file, map_location=map_location, weights_only=True)
        if state_file.is_file()
        else {}
    )
    state["path"] = str(ckpt)
    return state


# -- random number generators -----------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`get_rng_state`'s state; its tensors may have been loaded onto the GPU."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
