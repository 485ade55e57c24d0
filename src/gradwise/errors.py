"""Errors a user can fix. The CLI prints their message and exits with code 2, without a traceback."""

from __future__ import annotations

import difflib
import reprlib
import warnings
from collections.abc import Iterable
from typing import Any


class GradwiseError(Exception):
    """Base class for problems in the user's input (recipe, data, model, paths)."""


class ConfigError(GradwiseError, ValueError):
    """A setting has a value gradwise cannot use: names the field, the value and what was expected."""

    def __init__(self, field: str, value: Any, expected: str, hint: str | None = None) -> None:
        self.field, self.value, self.expected, self.hint = field, value, expected, hint
        message = f"{field}: got {_short(value)}; expected {expected}"
        if hint:
            message += f". {hint}"
        super().__init__(message)


class DataError(GradwiseError, ValueError):
    """The data cannot be used as given (missing file, bad shape, labels out of range)."""


class GradwiseWarning(UserWarning):
    """Something was wrong and gradwise recovered (a damaged file repaired, a fallback taken)."""


def warn(message: str) -> None:
    """Warn the user about a recovery; the CLI prints it as one ``warning:`` line."""
    warnings.warn(message, GradwiseWarning, stacklevel=3)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A 'did you mean ...?' hint for a misspelt name, or None when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


_REPR = reprlib.Repr()  # bounded: a huge or deeply shared value is never repr()'d in full
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 8, 8, 6, 6
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 80, 40, 80


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` in at most ``limit`` characters, computed in bounded time."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
