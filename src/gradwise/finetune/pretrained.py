"""Load pretrained weights into a model and say exactly what was loaded (``finetune.pretrained``).

Three kinds of source, none of which runs code:

- a gradwise run directory (or one of its checkpoints): the verified best or latest checkpoint's
  ``model.safetensors`` (:func:`gradwise.checkpoint.resolve_checkpoint`: manifest checked, damaged
  checkpoints skipped with a warning);
- a file: ``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` holding a state dict, read
  with ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper (as
  Lightning and many repositories save them) is unwrapped;
- a Hugging Face directory written by ``save_pretrained``: ``model.safetensors``,
  ``pytorch_model.bin``, or shards listed in a ``*.index.json``.

Keys are matched exactly first; when a consistent prefix differs between the checkpoint and the
model (``module.`` from DDP, ``model.`` from Lightning, ``_orig_mod.`` from torch.compile, a Hugging
Face ``base_model_prefix`` such as ``bert.``), the renaming that matches the most tensors is used.
A tensor is loaded only when its name and shape match; the rest of the model is left exactly as it
was, and :class:`KeyReport` names what was loaded, missing, unexpected and shape-mismatched, and the
modules that start fresh (typically a new head for another number of classes).
"""

from __future__ import annotations

import itertools
import json
import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from gradwise.checkpoint import (
    CHECKPOINTS,
    MANIFEST,
    META,
    STATE,
    WEIGHTS,
    adapter_info,
    best_checkpoint,
    resolve_checkpoint,
)
from gradwise.errors import ConfigError, DataError

__all__ = ["KeyReport", "load_pretrained"]

FIELD = "finetune.pretrained"
EXPECTED = (
    "a gradwise run directory, a .safetensors / .pt / .pth / .bin / .ckpt state-dict file, or a "
    "Hugging Face directory written by save_pretrained"
)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Hugging Face weight files, in order of preference (safetensors first)
HF_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# wrappers around a state dict in a torch file, tried in order
WRAPPERS = ("state_dict", "model_state_dict", "model", "module")
COMPILED = "_orig_mod"  # the segment torch.compile inserts into every key of a compiled module
MAX_PREFIX_DEPTH = 2  # renamings strip or add at most this many leading name segments
SHOW = 5  # names shown before "and N more"

Shape = tuple[int, ...]


@dataclass
class KeyReport:
    """What :func:`load_pretrained` loaded into a model, and what it did not.

    ``loaded``, ``missing`` and ``mismatched`` use the model's key names, ``unexpected`` the
    checkpoint's; ``mismatched`` rows are ``(key, model_shape, checkpoint_shape)``.
    """

    source: str
    kind: Literal["run", "file", "huggingface"]
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    new_modules: list[str] = field(default_factory=list)
    """Module paths whose parameters all start fresh (missing or shape-mismatched)."""
    total: int = 0
    """The number of tensors (parameters and persistent buffers) in the model's state dict."""
    detail: str = ""
    """Which weights exactly, e.g. "best checkpoint step 120" or "Hugging Face BertModel"."""
    renamed: str = ""
    """How key names were adapted, e.g. "checkpoint keys without 'model.'"; "" when exact."""
    heads: list[str] = field(default_factory=list)
    """The model's head modules (gradwise.finetune.layers.head_names), to name a new head."""

    def lines(self) -> list[str]:
        """A short summary for people: what was loaded from where, new modules, leftovers."""
        where = f"{self.source} ({self.detail})" if self.detail else self.source
        out = [f"loaded {len(self.loaded)}/{self.total} tensors from {where}"]
        if self.renamed:
            out.append(f"key names: {self.renamed}")
        shapes = {key: (mine, theirs) for key, mine, theirs in self.mismatched}
        for module in self.new_modules:
            inside = [k for k in shapes if k.startswith(module + ".")]
            head = _within(module, self.heads)
            weight = shapes.get(f"{module}.weight")
            if head and weight and weight[0][:1] != weight[1][:1]:
                why = f"{weight[1][0]} -> {weight[0][0]} outputs"
            elif weight:
                why = f"{_shape(weight[1])} in the checkpoint, {_shape(weight[0])} here"
            elif inside:
                why = "other shapes than in the checkpoint"
            else:
                why = "not in the checkpoint"
            what = "new head" if head else "new module"
            out.append(f"{what}: {module} ({why}; its weights start fresh)")
        fresh = [m + "." for m in self.new_modules]
        rest = [(k, *shapes[k]) for k in shapes if not k.startswith(tuple(fresh))]
        if rest:
            shown = [f"{k} {_shape(m)} vs checkpoint {_shape(c)}" for k, m, c in rest]
            out.append(f"shape mismatch (not loaded): {_abbreviate(shown)}")
        missing = [k for k in self.missing if not k.startswith(tuple(fresh))]
        if missing:
            out.append(f"missing (start fresh): {_abbreviate(missing)}")
        if self.unexpected:
            out.append(f"unexpected (ignored): {_abbreviate(self.unexpected)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (shapes as lists)."""
        data = asdict(self)
        data["mismatched"] = [[k, list(m), list(c)] for k, m, c in self.mismatched]
        return data


def load_pretrained(
    model: nn.Module,
    source: str | Path,
    *,
    which: str = "best",
    strict: bool = False,
) -> KeyReport:
    """Load the weights at ``source`` into ``model`` in place and report what was loaded.

    ``source``: a gradwise run directory or checkpoint (``which``: its ``best`` or ``last``
    checkpoint), a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` file, or a Hugging
    Face ``save_pretrained`` directory. Only tensors whose names (after a consistent prefix
    renaming) and shapes match are loaded; every other tensor of the model keeps its value.
    ``strict``: any missing, unexpected or shape-mismatched key raises a ConfigError before the model
    is touched. A source that matches nothing raises either way.
    """
    if which not in ("best", "last", "latest"):
        raise ConfigError("finetune.which", which, "best or last")
    if not isinstance(model, nn.Module):
        raise ConfigError("model", type(model).__name__, "a torch.nn.Module to load weights into")
    weights, kind, detail = _open(source, which)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    match, renamed = _match(model_shapes, weights.shapes)

    by_mine = {mine: theirs for theirs, mine in match.items()}
    loaded, mismatched, missing = [], [], []
    for mine, shape in model_shapes.items():  # the model's order
        theirs = by_mine.get(mine)
        if theirs is None:
            missing.append(mine)
        elif weights.shapes[theirs] == shape:
            loaded.append(mine)
        else:
            mismatched.append((mine, shape, weights.shapes[theirs]))
    unexpected = [k for k in weights.shapes if k not in match]
    # a tensor tied to a loaded one (shared embeddings) gets its values too: safetensors and
    # save_pretrained store a tied tensor once
    tied = _tied_to(model, set(loaded))
    missing = [k for k in missing if k not in tied]
    if strict and (missing or unexpected or mismatched):
        raise ConfigError(
            FIELD,
            str(source),
            "weights whose every key matches the model (strict)",
            _strict_hint(missing, unexpected, mismatched),
        )
    if not loaded:
        raise ConfigError(
            FIELD,
            str(source),
            "weights whose tensor names and shapes match the model's",
            _nothing_hint(model_shapes, weights.shapes, mismatched),
        )

    state = {key: weights.get(by_mine[key]) for key in loaded}
    with torch.no_grad():
        result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # cannot happen: every key came from model.state_dict()
        raise RuntimeError(f"load_state_dict did not take {result.unexpected_keys}")

    fresh = set(missing) | {k for k, _, _ in mismatched}
    done = set(loaded)
    return KeyReport(
        source=str(source),
        kind=kind,
        loaded=[k for k in model_shapes if k in done or k in tied],
        missing=missing,
        unexpected=unexpected,
        mismatched=mismatched,
        new_modules=_new_modules(model, fresh),
        total=len(model_shapes),
        detail=detail,
        renamed=renamed,
        heads=_heads(model),
    )


# -- reading the source -----------------------------------------------------------------------


class _Weights:
    """Tensor names and shapes of a source, and the tensors themselves on demand."""

    def __init__(self, shapes: dict[str, Shape], get: Callable[[str], torch.Tensor]) -> None:
        self.shapes, self.get = shapes, get


def _open(
    source: str | Path, which: str
) -> tuple[_Weights, Literal["run", "file", "huggingface"], str]:
    """The weights at ``source``, its kind and a detail for the report."""
    if not isinstance(source, (str, Path)) or not str(source):
        raise ConfigError(FIELD, source, EXPECTED)
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(FIELD, str(source), EXPECTED, "the path does not exist")
    if path.is_file():
        return _read_file(path), "file", _file_kind(path)
    if _is_gradwise(path):
        checkpoint = _checkpoint(path, which)
        detail = _run_detail(path, checkpoint, which)
        return _read_safetensors([checkpoint / WEIGHTS], path), "run", detail
    found = [name for name in HF_FILES if (path / name).is_file()]
    if found:
        return _read_huggingface(path, found[0]), "huggingface", _hf_detail(path, found[0])
    hint = "a directory without checkpoints/ nor Hugging Face weights"
    runs = sorted(p.name for p in path.iterdir() if (p / CHECKPOINTS).is_dir())
    if runs:
        hint = f"a directory of runs: name one of them, e.g. {path / runs[-1]}"
    if (path / "adapter_model.safetensors").is_file() or (path / "adapter_config.json").is_file():
        hint = "this is a PEFT adapter directory: load it with gradwise.finetune.load_adapter"
    raise ConfigError(FIELD, str(source), EXPECTED, hint)


def _is_gradwise(path: Path) -> bool:
    """A run directory, its checkpoints/ directory, or one checkpoint of it."""
    if (path / CHECKPOINTS).is_dir() or path.name == CHECKPOINTS:
        return True
    return (path / WEIGHTS).is_file() and any(
        (path / name).is_file() for name in (MANIFEST, META, STATE)
    )


def _checkpoint(path: Path, which: str) -> Path:
    """The verified checkpoint (resolve_checkpoint: damaged ones skipped with a warning)."""
    try:
        checkpoint = resolve_checkpoint(path, "best" if which == "best" else "latest")
    except DataError as exc:
        raise DataError(f"{FIELD}: {exc}") from exc
    if adapter_info(checkpoint / WEIGHTS) is not None:
        raise ConfigError(
            FIELD, str(path), "a run that trained full weights",
            "this run trained an adapter (its checkpoints hold the adapter only): start from its "
            "base (that run's finetune.pretrained) and load the adapter with "
            "gradwise.finetune.adapters.load_adapter",
        )  # fmt: skip
    return checkpoint


def _run_detail(path: Path, checkpoint: Path, which: str) -> str:
    """ "best checkpoint step 120", "latest checkpoint step 120", or the checkpoint's name."""
    if (path / WEIGHTS).is_file():  # a checkpoint named directly
        return f"checkpoint {checkpoint.name}"
    step = checkpoint.name.removeprefix("step-").lstrip("0") or "0"
    if which != "best":
        return f"latest checkpoint step {step}"
    if best_checkpoint(checkpoint.parent.parent) == checkpoint:
        return f"best checkpoint step {step}"
    return f"checkpoint step {step}, not the best (no usable best one is recorded)"


def _file_kind(path: Path) -> str:
    return "safetensors file" if path.suffix == ".safetensors" else "state-dict file"


def _hf_detail(path: Path, weights: str) -> str:
    """ "Hugging Face BertModel, model.safetensors": the architecture config.json names."""
    try:
        config = json.loads((path / "config.json").read_text())
        arch = config.get("architectures") or []
        name = arch[0] if arch and isinstance(arch[0], str) else config.get("model_type", "")
    except (OSError, ValueError, AttributeError):
        name = ""
    return f"Hugging Face {name}, {weights}" if name else f"Hugging Face {weights}"


def _cannot_read(path: Path, why: str) -> DataError:
    return DataError(f"{FIELD}: cannot read {path}: {why}; expected {EXPECTED}")


def _read_file(path: Path) -> _Weights:
    if path.suffix == ".safetensors":
        return _read_safetensors([path], path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch([path], path)
    raise ConfigError(
        FIELD,
        str(path),
        EXPECTED,
        f"{path.suffix or 'no'} suffix is not one of .safetensors, " + ", ".join(TORCH_SUFFIXES),
    )


def _read_safetensors(files: list[Path], source: Path) -> _Weights:
    """Shapes from the headers; tensors read when asked for (a large file is not read whole)."""
    shapes: dict[str, Shape] = {}
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    shapes[key] = tuple(f.get_slice(key).get_shape())
                    where[key] = file
        except (SafetensorError, OSError, ValueError) as exc:
            raise _cannot_read(file, f"not a complete safetensors file ({exc})") from exc

    def get(key: str) -> torch.Tensor:
        try:
            with safe_open(str(where[key]), framework="pt", device="cpu") as f:
                return f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as exc:
            raise _cannot_read(where[key], f"tensor {key!r} is damaged ({exc})") from exc

    if not shapes:
        raise _cannot_read(source, "it holds no tensors")
    return _Weights(shapes, get)


def _read_torch(files: list[Path], source: Path) -> _Weights:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(_torch_state_dict(file))
    if not tensors:
        raise _cannot_read(source, "it holds no tensors")
    return _Weights({k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__)


def _torch_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The state dict in a torch file (weights_only), unwrapped from Lightning-style wrappers."""
    try:
        if zipfile.is_zipfile(file):  # torch.load does not check the archive's CRCs itself
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise _cannot_read(file, f"{bad} does not match its CRC (the file is damaged)")
        try:
            data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            data = torch.load(file, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found:
            why = (
                f"it holds Python objects ({found[1]}) besides tensors, and gradwise never "
                "unpickles them; save model.state_dict() (or use safetensors)"
            )
            raise _cannot_read(file, why) from exc
        raise _cannot_read(file, "not a torch file") from exc
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        why = f"not a complete torch file ({type(exc).__name__}: {exc})"
        raise _cannot_read(file, why) from exc
    if not isinstance(data, Mapping):
        raise _cannot_read(file, f"it holds a {type(data).__name__}, not a state dict")
    for wrapper in WRAPPERS:
        inner = data.get(wrapper)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            data = inner
            break
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(data)[:SHOW]))
        raise _cannot_read(file, f"it holds no state dict (its keys: {keys or 'none'})")
    return tensors


def _read_huggingface(path: Path, weights: str) -> _Weights:
    if not weights.endswith(".index.json"):
        read = _read_safetensors if weights.endswith(".safetensors") else _read_torch
        return read([path / weights], path)
    index = path / weights
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _cannot_read(index, f"not a shard index ({type(exc).__name__})") from exc
    files = []
    for shard in shards:
        file = path / str(shard)
        # a shard must be a plain file of this directory: an index never sends the reader elsewhere
        if Path(str(shard)).name != shard or not file.is_file():
            raise _cannot_read(index, f"shard {shard!r} is not a file of {path}")
        files.append(file)
    read = _read_safetensors if weights.startswith("model.safetensors") else _read_torch
    return read(files, path)


# -- matching keys ------------------------------------------------------------------------------


def _match(
    model_shapes: dict[str, Shape], their_shapes: dict[str, Shape]
) -> tuple[dict[str, str], str]:
    """Checkpoint key -> model key, and how names were renamed ("" when exactly).

    torch.compile's ``_orig_mod`` segments are ignored on both sides; then each renaming that
    strips a leading prefix from the checkpoint's keys and/or from the model's keys is scored by
    the tensors it matches by name and shape (then by name), and the best one wins; on a tie the
    shorter renaming, so the exact match wins whenever no renaming matches more. A renaming that
    would map two keys onto one is never used.
    """
    mine = _normalised(model_shapes)
    theirs = _normalised(their_shapes)
    best: tuple[tuple[int, int, int], dict[str, str], str, str] | None = None
    for strip_theirs, strip_mine in itertools.product(_prefixes(theirs), _prefixes(mine)):
        a, b = _stripped(theirs, strip_theirs), _stripped(mine, strip_mine)
        if a is None or b is None:
            continue
        common = a.keys() & b.keys()
        same = sum(their_shapes[a[k]] == model_shapes[b[k]] for k in common)
        # names alone never justify a renaming: with no shape in common it is a coincidence
        score = (same, len(common) if same else 0, -len(strip_theirs) - len(strip_mine))
        if best is None or score > best[0]:
            best = (score, {a[k]: b[k] for k in common}, strip_theirs, strip_mine)
        if same == min(len(mine), len(theirs)):  # nothing can match more
            break
    assert best is not None  # the exact renaming ("", "") is always scored
    _, match, strip_theirs, strip_mine = best
    renamed = []
    if strip_theirs:
        renamed.append(f"{strip_theirs!r} removed from the checkpoint's keys")
    if strip_mine:
        renamed.append(f"{strip_mine!r} added to the checkpoint's keys")
    if not renamed and any(k != v for k, v in match.items()):
        renamed.append(f"torch.compile's {COMPILED!r} ignored")
    return match, "; ".join(renamed)


def _normalised(shapes: dict[str, Shape]) -> dict[str, str]:
    """Normalised name -> original name, without torch.compile's ``_orig_mod`` segments."""
    out: dict[str, str] = {}
    for key in shapes:
        name = ".".join(part for part in key.split(".") if part != COMPILED)
        if name in out:  # two keys collapse: keep names as they are
            return {k: k for k in shapes}
        out[name] = key
    return out


def _prefixes(names: Iterable[str]) -> list[str]:
    """ "" and every leading prefix of at most MAX_PREFIX_DEPTH segments, e.g. "model.", "bert."."""
    found: Counter[str] = Counter()
    for name in names:
        parts = name.split(".")
        for depth in range(1, min(MAX_PREFIX_DEPTH, len(parts) - 1) + 1):
            found[".".join(parts[:depth]) + "."] += 1
    return ["", *(p for p, _ in found.most_common(32))]


def _stripped(names: dict[str, str], prefix: str) -> dict[str, str] | None:
    """Names with ``prefix`` removed where they have it; None when two names would collide."""
    if not prefix:
        return names
    out: dict[str, str] = {}
    for name, original in names.items():
        short = name.removeprefix(prefix)
        if short in out:
            return None
        out[short] = original
    return out


def _tied_to(model: nn.Module, loaded: set[str]) -> dict[str, str]:
    """State-dict keys not in ``loaded`` that share their storage with a loaded one -> that key."""
    by_storage: dict[tuple, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() == 0 or tensor.device.type == "meta":
            continue
        ident = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        by_storage.setdefault(ident, []).append(key)
    tied: dict[str, str] = {}
    for keys in by_storage.values():
        source = next((k for k in keys if k in loaded), None)
        if source is not None:
            tied.update({k: source for k in keys if k not in loaded})
    return tied


def _new_modules(model: nn.Module, fresh: set[str]) -> list[str]:
    """The outermost modules (not the model itself) all of whose parameters are in ``fresh``."""
    params = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    out: list[str] = []
    for path, _ in model.named_modules():
        if not path or any(path.startswith(done + ".") for done in out):
            continue
        own = [p for p in params if p.startswith(path + ".")]
        if own and all(p in fresh for p in own):
            out.append(path)
    return out


def _heads(model: nn.Module) -> list[str]:
    """The model's head modules (the top layer group), to call a new head a head."""
    from gradwise.finetune.layers import head_names  # lazily: the package imports this module

    return head_names(model)


def _within(module: str, heads: list[str]) -> bool:
    return any(
        module == h or module.startswith(h + ".") or h.startswith(module + ".") for h in heads
    )


# -- messages -----------------------------------------------------------------------------------


def _abbreviate(items: list[str], show: int = SHOW) -> str:
    if len(items) <= show:
        return ", ".join(items)
    return ", ".join(items[:show]) + f" and {len(items) - show} more"


def _shape(shape: Shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _strict_hint(
    missing: list[str], unexpected: list[str], mismatched: list[tuple[str, Shape, Shape]]
) -> str:
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {_abbreviate(missing, 3)}")
    if unexpected:
        parts.append(f"not in the model: {_abbreviate(unexpected, 3)}")
    if mismatched:
        rows = [f"{k} {_shape(m)} vs {_shape(c)}" for k, m, c in mismatched]
        parts.append(f"other shapes: {_abbreviate(rows, 3)}")
    return "; ".join(parts) + ". Set finetune.strict: false to load the tensors that match"


def _nothing_hint(
    model_shapes: dict[str, Shape],
    their_shapes: dict[str, Shape],
    mismatched: list[tuple[str, Shape, Shape]],
) -> str:
    if mismatched:
        rows = [f"{k} {_shape(m)} vs {_shape(c)}" for k, m, c in mismatched]
        return f"every tensor with a matching name has another shape: {_abbreviate(rows, 3)}"
    return (
        f"none of its {len(their_shapes)} tensors matches one of the model's "
        f"{len(model_shapes)}: the checkpoint has {_abbreviate(list(their_shapes), 3)}; "
        f"the model has {_abbreviate(list(model_shapes), 3)}"
    )
