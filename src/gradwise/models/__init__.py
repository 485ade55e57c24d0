"""The model zoo: ``MODELS`` registry, :func:`build_model`, and the built-in architectures.

Built-ins: ``mlp``, ``cnn``, ``resnet``, ``transformer``, ``gpt``, ``rnn``. Register your own
with ``@register_model("name", infer=...)`` or pass ``package.module:factory`` as the name.
"""

from gradwise.models import cnn, gpt, mlp, resnet, rnn, transformer  # noqa: F401  (registers)
from gradwise.models.build import (
    MODELS,
    build_model,
    infer_flat,
    infer_generic,
    infer_image,
    infer_lm,
    infer_sequence,
    register_model,
)

__all__ = [
    "MODELS",
    "build_model",
    "infer_flat",
    "infer_generic",
    "infer_image",
    "infer_lm",
    "infer_sequence",
    "register_model",
]
