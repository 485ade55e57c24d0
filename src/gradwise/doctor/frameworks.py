"""Where each rule runs: the frameworks whose integration cannot feed it, and why.

Lightning's and the Hugging Face Trainer's callbacks run the PyTorch Doctor itself, so every rule
applies there. Keras 3 and JAX/Optax are watched from the outside (``doctor.numeric``): the rules
that read the PyTorch model, its hooks or its autograd graph cannot run, and each rule's page says
so. Read without importing torch (``gradwise explain`` shows it).
"""

from __future__ import annotations

_NO_MODULES = "needs the model's modules and hooks, which only PyTorch gives gradwise"
_NO_GRAPH = "reads the loss's autograd graph, which only PyTorch gives gradwise"
_OUTSIDE = {
    "GW202": "compares .grad with each step's fresh gradient; the framework's train step "
    "computes and applies gradients in one piece, so they cannot be left un-zeroed",
    "GW203": _NO_MODULES,
    "GW204": _NO_MODULES,
    "GW206": _NO_MODULES,
    "GW207": "compares the model's parameters with the optimizer's, which only PyTorch exposes",
    "GW208": _NO_MODULES,
    "GW209": _NO_MODULES,
    "GW210": "compares ranks through torch.distributed",
    "GW211": _NO_MODULES,
    "GW212": _NO_MODULES,
    "GW213": _NO_MODULES,
    "GW214": _NO_MODULES,
    "GW215": "has nothing to catch there: Keras losses squeeze or expand (N, 1) predictions "
    "against (N,) targets themselves, so they never broadcast silently",
    "GW216": "needs a hook on each micro-batch's gradient",
    "GW217": _NO_GRAPH,
    "GW403": "needs to run the model on the probe set",
}
NOT_CHECKED: dict[str, dict[str, str]] = {
    "keras": dict(_OUTSIDE),
    # a hand-written JAX loss broadcasts (N, 1) against (N,) as silently as PyTorch's: GW215
    # runs, confirmed from the loss's value
    "jax": {code: why for code, why in _OUTSIDE.items() if code != "GW215"},
}
"""Per framework integration: rule code -> why the rule cannot run there."""


def where_not_checked(code: str) -> dict[str, str]:
    """Framework -> reason, for the frameworks where rule ``code`` does not run."""
    return {fw: codes[code] for fw, codes in NOT_CHECKED.items() if code in codes}
