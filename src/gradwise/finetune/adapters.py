"""Parameter-efficient fine-tuning through Hugging Face peft (recipe ``finetune.peft``).

    model = apply_peft(model, spec, head_names(model))   # a peft.PeftModel: only the adapter trains
    save_adapter(model, "adapters/sst2")                 # peft's layout: adapter_config.json + safetensors
    model = load_adapter(model, "adapters/imdb", "imdb") # a second adapter over the same base
    model.set_adapter("imdb")
    plain = merged(model, sample)                        # adapters folded into the weights, checked

LoRA (Hu et al. 2021) learns a low-rank update ``B A`` of a frozen weight, scaled by ``alpha / r``;
DoRA (Liu et al. 2024) also learns each output's magnitude; (IA)^3 (Liu et al. 2022) learns one
scaling vector per layer; prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021)
learn virtual tokens in front of the input. The base model stays as it was loaded, so a checkpoint
of a PEFT run holds only the adapter, the modules trained in full (``modules_to_save``) and the
buffers, with a fingerprint of the frozen base (gradwise.checkpoint).

peft is imported on first use, with the log lines its import causes (torchao's optional kernels,
torch's pytree deprecation notes) silenced.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import shutil
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwise.errors import ConfigError, DataError, GradwiseError

if TYPE_CHECKING:
    from gradwise.recipe import FinetuneSpec

__all__ = [
    "MERGE_TOLERANCE",
    "MergeError",
    "adapter_keys",
    "adapter_state",
    "apply_peft",
    "base_fingerprint",
    "base_of",
    "is_peft",
    "load_adapter",
    "load_adapter_state",
    "merge_with_report",
    "merged",
    "peft_summary",
    "prepare_for_load",
    "save_adapter",
    "trainable_counts",
]

MERGE_TOLERANCE = 1e-5
"""Largest max-absolute output difference between a model with its adapter and the merged model.
Merging adds ``B A * alpha / r`` into fp32 weights once instead of computing it at every call: only
the rounding of a sum changes (about 1e-7 relative per layer), so 1e-5 leaves ~100x headroom while
a wrong merge (scaling, a missed module, a DoRA norm) shows at 1e-3 and above."""

TUNERS = ("lora", "dora", "ia3")  # methods that wrap layers of any nn.Module
PROMPT_LEARNING = ("prefix", "prompt")  # methods that need a Hugging Face transformers model
_QUIET_LOGGERS = ("torchao", "torch.utils._pytree")  # log on peft's import; nothing for users
_LINEAR_TYPES = ("Linear", "Conv2d", "Conv1D")  # Conv1D: transformers' GPT-2 style Linear
_ATTENTION = re.compile(r"(^|\.|_)(attn|attention|self_attn|q|k|v|qkv|query|key|value)(\.|_|$)")
_TASK_TYPES = (  # transformers class name suffix -> peft task type
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)


class MergeError(GradwiseError):
    """The merged model does not reproduce the model with its adapter within the tolerance."""


def _peft() -> ModuleType:
    """``import peft``, with the log records and warnings its import emits silenced."""
    if "peft" in sys.modules:
        return sys.modules["peft"]
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            import peft
    except ImportError as exc:
        raise ConfigError(
            "finetune.peft", None, "the peft package installed", f"pip install peft ({exc})"
        ) from None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return peft


# -- what a model is --------------------------------------------------------------------------------


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` (or a wrapper around it, such as an EMA's AveragedModel) carries peft
    adapters. Never imports peft: a model cannot carry adapters before peft was imported."""
    if "peft" not in sys.modules or not isinstance(model, nn.Module):
        return False
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, (PeftModel, BaseTunerLayer)) for m in model.modules())


def _peft_model(model: nn.Module, what: str = "model") -> Any:
    """The PeftModel ``model`` is or wraps (an AveragedModel's ``module``); a ConfigError else."""
    if "peft" in sys.modules:
        from peft import PeftModel

        for m in model.modules():
            if isinstance(m, PeftModel):
                return m
    raise ConfigError(
        what,
        type(model).__name__,
        "a peft model (gradwise.finetune.apply_peft, or recipe finetune.peft)",
    )


def _is_transformers(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _task_type(model: nn.Module) -> str | None:
    """peft's task type for a transformers model (by its class), None for a plain nn.Module."""
    if not _is_transformers(model):
        return None
    name = type(model).__name__
    for suffix, task in _TASK_TYPES:
        if name.endswith(suffix):
            if task == "SEQ_2_SEQ_LM" and not getattr(model.config, "is_encoder_decoder", False):
                continue
            return task
    return "FEATURE_EXTRACTION"


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), counted as peft's ``get_nb_trainable_parameters``
    counts them (shared parameters once; 4-bit parameters by their unpacked size)."""
    trainable = total = 0
    for _, p in model.named_parameters():
        n = p.numel()
        if n == 0 and hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3 keeps empty placeholders
            n = p.ds_numel
        if type(p).__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte
            if hasattr(p, "element_size"):
                nbytes = p.element_size()
            else:
                nbytes = p.quant_storage.itemsize if hasattr(p, "quant_storage") else 1
            n = n * 2 * nbytes
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def peft_summary(model: nn.Module) -> dict[str, Any]:
    """The method, active adapter, adapter names and parameter counts of a peft model (for logs
    and model cards)."""
    pm = _peft_model(model)
    config = pm.peft_config[pm.active_adapter]
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    method = "dora" if getattr(config, "use_dora", False) else kind.removesuffix("_tuning")
    trainable, total = trainable_counts(pm)
    return {
        "method": method,  # as finetune.peft names it: lora, dora, ia3, prefix, prompt
        "adapter": pm.active_adapter,
        "adapters": list(pm.peft_config),
        "trainable_parameters": trainable,
        "parameters": total,
    }


# -- wrapping a model -------------------------------------------------------------------------------


def _head(model: nn.Module) -> list[str]:
    """The model's head modules (gradwise.finetune.layers.head_names; else its last top-level
    child holding parameters)."""
    try:
        from gradwise.finetune.layers import head_names
    except ImportError:
        children = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
        return children[-1:]
    return head_names(model)


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes if p)


def _tied(model: nn.Module) -> set[str]:
    """Paths of modules whose parameters are shared with another module (a tied LM head)."""
    owners: dict[int, set[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(path)
    return {path for paths in owners.values() if len(paths) > 1 for path in paths}


def _is_type_name(entry: str, model: nn.Module) -> bool:
    """Whether a target_modules entry names a module class (Linear, Conv2d, Embedding...)."""
    if not entry[:1].isupper() or "." in entry:
        return False
    if isinstance(getattr(nn, entry, None), type):
        return True
    return any(c.__name__ == entry for m in _layers(model).values() for c in type(m).__mro__)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules by path, an adapted layer standing for its original layer and nothing
    inside adapted layers or peft's wrappers (the ``lora_A`` Linears are no targets)."""
    wrappers: tuple[type, ...] = ()
    if "peft" in sys.modules:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        wrappers = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    layers: dict[str, nn.Module] = {}
    inside: list[str] = []
    for path, module in model.named_modules():
        if not path or _under(path, inside):
            continue
        if wrappers and isinstance(module, wrappers):
            inside.append(path)
            base = getattr(module, "get_base_layer", None)
            module = base() if base is not None else module.original_module
        layers[path] = module
    return layers


def _of_type(model: nn.Module, names: set[str]) -> list[str]:
    return [
        path
        for path, m in _layers(model).items()
        if any(c.__name__ in names for c in type(m).__mro__)
    ]


def _peft_match(target: list[str] | str, key: str) -> bool:
    """peft's target_modules matching: a string is a regex over the full path; a list holds names
    that match the full path or its last components."""
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    return key in target or any(key.endswith(f".{t}") for t in target)


def _exact(paths: Iterable[str]) -> str:
    """A regex that peft fullmatches against exactly these module paths."""
    return "(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")"


def _targets(
    model: nn.Module, spec: FinetuneSpec, skip: list[str]
) -> tuple[list[str] | str, list[str]]:
    """``(target_modules for peft, the module paths it selects)``.

    None: every Linear and Conv2d layer (transformers' Conv1D counts as a Linear), except the head
    and modules trained in full (``skip``), layers whose weight is tied to another module (a tied LM
    head: an adapter there would also change the embedding when merged) and the output projection
    of ``nn.MultiheadAttention`` (which reads its weight directly, so an adapter would be skipped).
    """
    given = spec.target_modules
    modules = _layers(model)
    mha_out = {f"{p}.out_proj" for p, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    if given is None:
        tied = _tied(model)
        chosen = [
            p
            for p in _of_type(model, set(_LINEAR_TYPES))
            if not _under(p, skip) and p not in tied and p not in mha_out
        ]
        target: list[str] | str = _exact(chosen) if chosen else []
    elif isinstance(given, str):
        try:
            re.compile(given)
        except re.error as exc:
            raise ConfigError("finetune.target_modules", given, "a valid regex", str(exc)) from None
        target = given
        chosen = [p for p in modules if p and _peft_match(given, p) and not _under(p, skip)]
    else:
        types = {e for e in given if _is_type_name(e, model)}
        names = [e for e in given if e not in types]
        chosen = [p for p in modules if p and names and _peft_match(names, p)]
        chosen += [p for p in _of_type(model, types) if not _under(p, skip)]
        chosen = sorted({p for p in chosen if not _under(p, skip)})
        target = names if not types else (_exact(chosen) if chosen else [])
    if not chosen:
        linear = _of_type(model, set(_LINEAR_TYPES))
        raise ConfigError(
            "finetune.target_modules",
            given,
            "names, a regex or module types that select layers outside the head",
            f"the model's Linear/Conv layers are {linear[:8] or 'none'}"
            + (f"; the head {skip} trains in full" if skip else ""),
        )
    return target, chosen


def _modules_to_save(model: nn.Module, spec: FinetuneSpec, head: list[str]) -> list[str]:
    """The modules trained in full: ``spec.modules_to_save``, else the head, but not a language
    model's vocabulary projection (tied to the embedding, or as large): training it in full would
    copy the vocabulary into every checkpoint."""
    if spec.modules_to_save is not None:
        return list(spec.modules_to_save)
    skip = _tied(model)
    if _task_type(model) in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):  # the vocabulary projection
        output = model.get_output_embeddings()
        skip |= {p for p, m in model.named_modules() if output is not None and m is output}
    modules = dict(model.named_modules())
    for name in head:
        if name not in modules:
            raise ConfigError("head", name, f"module paths of the model, e.g. {list(modules)[-3:]}")
    return [name for name in head if name and name not in skip]


def _config(model: nn.Module, spec: FinetuneSpec, head: list[str]) -> Any:
    peft = _peft()
    method = spec.peft
    if method is None:
        raise ConfigError("finetune.peft", None, f"one of {', '.join(TUNERS + PROMPT_LEARNING)}")
    if method not in TUNERS + PROMPT_LEARNING:
        raise ConfigError("finetune.peft", method, f"one of {', '.join(TUNERS + PROMPT_LEARNING)}")
    task = _task_type(model)
    save = _modules_to_save(model, spec, head)
    _check_saved(model, save)
    if method in PROMPT_LEARNING:
        if task is None:
            raise ConfigError(
                "finetune.peft",
                method,
                "lora, dora or ia3 for this model",
                f"{method} tuning adds virtual tokens to a Hugging Face transformers model's input; "
                f"{type(model).__name__} is a plain torch module",
            )
        if spec.target_modules is not None:
            raise ConfigError(
                "finetune.target_modules",
                spec.target_modules,
                f"unset with finetune.peft: {method}",
                "prefix and prompt tuning add virtual tokens, not per-layer adapters",
            )
        kwargs = {"task_type": task, "num_virtual_tokens": spec.virtual_tokens}
        if save:
            kwargs["modules_to_save"] = save
        if method == "prefix":
            return peft.PrefixTuningConfig(**kwargs)
        return peft.PromptTuningConfig(**kwargs, prompt_tuning_init="RANDOM")
    target, chosen = _targets(model, spec, save)
    common = {"target_modules": target, "modules_to_save": save or None, "task_type": task}
    if method == "ia3":
        feedforward = [p for p in chosen if not _ATTENTION.search(p)]
        return peft.IA3Config(
            **common, feedforward_modules=_exact(feedforward) if feedforward else []
        )
    alpha = spec.lora_alpha if spec.lora_alpha is not None else 2 * spec.lora_r
    return peft.LoraConfig(
        **common,
        r=spec.lora_r,
        lora_alpha=alpha,
        lora_dropout=spec.lora_dropout,
        use_dora=method == "dora",
    )


def apply_peft(model: nn.Module, spec: FinetuneSpec, head: list[str] | None = None) -> nn.Module:
    """Wrap ``model`` with the adapter ``spec.peft`` names and return the peft model.

    lora / dora / ia3 work on any nn.Module (gradwise's zoo, your own, transformers); prefix and
    prompt tuning need a Hugging Face transformers model (a ConfigError on ``finetune.peft``
    otherwise). ``head``: the model's head module paths (default
    ``gradwise.finetune.layers.head_names``); they train in full unless ``spec.modules_to_save``
    names other modules.

    ``spec.target_modules``: None = every Linear and Conv2d layer outside the head (transformers'
    Conv1D included; layers tied to another module and MultiheadAttention's out_proj excluded); a
    list of names (peft: the full path or its last components, e.g. ``["qkv", "fc"]``); a regex
    string (peft: fullmatched against the full path); module type names (``["Linear",
    "Embedding"]``), resolved to every such module outside the modules trained in full. (IA)^3
    scales the input of feed-forward layers (the selected layers whose path names no attention
    part: attn, query, key, value, q/k/v, qkv) and the output of the others, as in the paper.
    A model that already carries adapters gets another one, named ``spec.adapter``, made active.
    The base weights are frozen; only the adapter and the modules trained in full train.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError("model", type(model).__name__, "a torch.nn.Module")
    peft = _peft()
    name = spec.adapter
    if isinstance(model, peft.PeftModel):
        if name in model.peft_config:
            raise ConfigError(
                "finetune.adapter", name, f"a new adapter name (taken: {list(model.peft_config)})"
            )
        base = model.get_base_model()
        if head is None:  # the modules the first adapter trains in full
            head = list(model.peft_config[model.active_adapter].modules_to_save or [])
        config = _config(base, spec, head)
        model.add_adapter(name, config)
        model.set_adapter(name)
        return model
    if is_peft(model):
        raise ConfigError("model", type(model).__name__, "a model without injected peft layers")
    head = _head(model) if head is None else list(head)
    config = _config(model, spec, head)
    with warnings.catch_warnings():  # notes for peft's and transformers' developers, not users
        warnings.filterwarnings("ignore", message=r".*fan_in_fan_out.*")  # a Conv1D is handled
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
        try:
            wrapped = peft.get_peft_model(model, config, adapter_name=name)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(
                f"finetune.peft: {spec.peft}",
                spec.target_modules,
                "layers peft can adapt",
                str(exc),
            ) from None
    return wrapped


def _check_saved(model: nn.Module, names: list[str]) -> None:
    """peft picks modules_to_save by a bare suffix ("2" also picks "12"): refuse names that
    would pick more modules than their full path or last components name, before wrapping."""
    paths = [p for p, _ in model.named_modules() if p]
    extra = [p for p in paths if any(p.endswith(n) for n in names) and not _peft_match(names, p)]
    if extra:
        raise ConfigError(
            "finetune.modules_to_save",
            names,
            "names that select only the modules to train in full",
            f"peft picks modules by a bare suffix, so these names would also train {extra[:4]} "
            "in full",
        )


def prepare_for_load(
    model: nn.Module, spec: FinetuneSpec, head: list[str] | None = None
) -> nn.Module:
    """The model as a run with ``spec`` trained it, ready for its adapter checkpoint: the base
    wrapped by :func:`apply_peft` with the same settings (a model without ``spec.peft`` is
    returned as it is)."""
    if spec.peft is None or is_peft(model):
        return model
    return apply_peft(model, spec, head)


# -- adapter state and peft's directory layout -----------------------------------------------------


def adapter_state(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors and those of the modules trained in full, as peft names them
    (``get_peft_model_state_dict``: the adapter name left out). ``name``: default the active one."""
    pm = _peft_model(model)
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(pm, adapter_name=name or pm.active_adapter)


def load_adapter_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], name: str | None = None
) -> None:
    """Load :func:`adapter_state`'s tensors into the adapter ``name`` (default: the active one).
    Tensors the model has no place for, or adapter tensors left out, raise a DataError."""
    pm = _peft_model(model)
    from peft import set_peft_model_state_dict

    name = name or pm.active_adapter
    try:
        result = set_peft_model_state_dict(pm, dict(state), adapter_name=name)
    except RuntimeError as exc:
        raise DataError(
            f"the adapter state does not fit adapter {name!r}: {str(exc).splitlines()[-1]}"
        ) from None
    wanted = set(_keys_of_adapter(pm, name))
    missing = sorted(k for k in result.missing_keys if k in wanted)
    if result.unexpected_keys or missing:
        raise DataError(
            f"the adapter state does not fit adapter {name!r}: unexpected "
            f"{sorted(result.unexpected_keys)[:3]}, missing {missing[:3]}"
        )


def _keys_of_adapter(pm: Any, name: str) -> list[str]:
    """The model's state_dict keys that hold adapter ``name``'s tensors."""
    inside = adapter_keys(pm)
    part = f".{name}."
    return [k for k in inside if part in f".{k}." or k.endswith(f".{name}")]


def save_adapter(model: nn.Module, directory: str | Path, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) to ``directory`` in peft's own layout
    (adapter_config.json, adapter_model.safetensors, README.md), readable by
    ``peft.PeftModel.from_pretrained(base, directory)``; replaces the directory atomically."""
    pm = _peft_model(model)
    name = name or pm.active_adapter
    if name not in pm.peft_config:
        raise ConfigError("name", name, f"one of the model's adapters {list(pm.peft_config)}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = directory.with_name(f".{directory.name}.tmp-peft")
    shutil.rmtree(work, ignore_errors=True)
    try:
        pm.save_pretrained(str(work), selected_adapters=[name], safe_serialization=True)
        written = work if name == "default" else work / name  # peft nests other names
        readme = work / "README.md"
        if written != work and readme.is_file():
            readme.rename(written / readme.name)
        from gradwise.tracking.files import publish_dir

        return publish_dir(written, directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_adapter(
    model: nn.Module, directory: str | Path, name: str, *, trainable: bool = False
) -> nn.Module:
    """Add the adapter saved at ``directory`` (peft's layout) to ``model`` under ``name`` and
    return the peft model; ``model.set_adapter(name)`` makes it the active one. A plain model is
    wrapped (``peft.PeftModel.from_pretrained``). Only safetensors weights are read."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise DataError(
            f"{directory} is not a peft adapter directory: it has no adapter_config.json"
        )
    if not (directory / "adapter_model.safetensors").is_file():
        raise DataError(
            f"{directory} has no adapter_model.safetensors (gradwise reads adapters only from "
            "safetensors, which cannot run code)"
        )
    peft = _peft()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        if isinstance(model, peft.PeftModel):
            if name in model.peft_config:
                raise ConfigError(
                    "name", name, f"a new adapter name (taken: {list(model.peft_config)})"
                )
            model.load_adapter(str(directory), adapter_name=name, is_trainable=trainable,
                               torch_device=str(device))  # fmt: skip
            return model
        if is_peft(model):
            raise ConfigError("model", type(model).__name__, "a peft model or a plain base model")
        return peft.PeftModel.from_pretrained(
            model, str(directory), adapter_name=name, is_trainable=trainable,
            torch_device=str(device),
        )  # fmt: skip
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        if isinstance(exc, GradwiseError):
            raise
        raise DataError(f"the adapter at {directory} does not fit the model: {exc}") from None


# -- merging ------------------------------------------------------------------------------------------


def _call(model: nn.Module, sample: Any) -> torch.Tensor:
    from gradwise.batch import outputs_of

    if isinstance(sample, Mapping):
        out = model(**sample)
    elif isinstance(sample, tuple):
        out = model(*sample)
    else:
        out = model(sample)
    return outputs_of(out)[0]


def merge_with_report(
    model: nn.Module, sample: Any, tolerance: float = MERGE_TOLERANCE
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`merged`, and what it measured: ``{"max_abs", "tolerance", "method", "adapter"}``."""
    pm = _peft_model(model)
    config = pm.peft_config[pm.active_adapter]
    summary = peft_summary(pm)
    if config.is_prompt_learning:
        raise ConfigError(
            "finetune.peft",
            summary["method"],
            "lora, dora or ia3 to merge into the weights",
            "prefix and prompt tuning add virtual tokens, which no weight can hold: keep the "
            "adapter next to the base (export merge=False, --no-merge)",
        )
    training = pm.training
    pm.eval()
    try:
        with torch.no_grad():
            reference = _call(pm, sample)
            copied = copy.deepcopy(pm)
            plain = copied.merge_and_unload()
            plain.eval()
            result = _call(plain, sample)
    finally:
        pm.train(training)
    if result.shape != reference.shape:
        raise MergeError(
            f"the merged model's output has shape {tuple(result.shape)}, the model with its "
            f"adapter {tuple(reference.shape)}"
        )
    diff = (result.double() - reference.double()).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if not (max_abs <= tolerance):  # also NaN
        raise MergeError(
            f"merging the {summary['method']} adapter {summary['adapter']!r} changes the outputs: "
            f"max abs difference {max_abs:.3g} > tolerance {tolerance:g} on "
            f"{len(reference)} samples"
        )
    plain.train(training)
    report = {**summary, "max_abs": max_abs, "tolerance": tolerance, "samples": len(reference)}
    return plain, report


def merged(model: nn.Module, sample: Any, tolerance: float = MERGE_TOLERANCE) -> nn.Module:
    """A plain model with the active adapter folded into its weights (``merge_and_unload`` on a
    deep copy; ``model`` is left as it is), checked on ``sample`` (a tensor, a tuple of inputs or
    a mapping of keyword inputs): a max-absolute output difference above ``tolerance`` raises
    :class:`MergeError` naming it."""
    return merge_with_report(model, sample, tolerance)[0]


def base_of(model: nn.Module) -> nn.Module:
    """A deep copy of the base model without any adapter: every adapted layer replaced by its
    original layer and every module trained in full by its original (untrained) module."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    pm = _peft_model(model)
    base = copy.deepcopy(pm.get_base_model())
    done: list[str] = []
    for path, module in list(base.named_modules()):
        if _under(path, done):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            original = module.original_module
        elif isinstance(module, BaseTunerLayer):
            original = module.get_base_layer()
        else:
            continue
        parent, _, child = path.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, child, original)
        done.append(path)
    if hasattr(base, "peft_config"):
        del base.peft_config
    return base


# -- adapter-only checkpoints: what is saved, what is fingerprinted ---------------------------------


def adapter_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of ``model`` (a peft model or a wrapper around one) that an adapter-only
    checkpoint stores besides the trainable parameters and the buffers: every adapter's tensors
    (active or not), the virtual tokens of prefix/prompt tuning, and both copies of each module
    trained in full (its original too: a head sized afresh for this task is no part of the
    pretrained base, so it cannot be rebuilt from it)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    within: set[str] = set()  # "path." prefixes
    exact: set[str] = set()
    for path, module in model.named_modules(remove_duplicate=False):
        dot = f"{path}." if path else ""
        if isinstance(module, AuxiliaryTrainingWrapper):
            within.add(dot)
        elif isinstance(module, BaseTunerLayer):
            within |= {f"{dot}{n}." for n, _ in module.named_children() if n != "base_layer"}
            exact |= {f"{dot}{n}" for n, _ in module.named_parameters(recurse=False)}
            exact |= {f"{dot}{n}" for n, _ in module.named_buffers(recurse=False)}
        elif isinstance(module, PeftModel):
            within.add(f"{dot}prompt_encoder.")

    def kept(key: str) -> bool:
        if key in exact or "" in within:
            return True
        parts = key.split(".")
        return any(".".join(parts[:i]) + "." in within for i in range(1, len(parts)))

    return {k for k in model.state_dict(keep_vars=True) if kept(k)}


def base_fingerprint(base: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the frozen base tensors: each one's name (a leading ``module.``, an EMA
    wrapper's, left out), dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(base, key=lambda k: k.removeprefix("module.")):
        t = base[name].detach()
        digest.update(f"{name.removeprefix('module.')}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            data = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
            digest.update(memoryview(data.numpy()))
    return digest.hexdigest()
