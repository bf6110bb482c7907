"""Argument checks with one message style: ``Owner: name must be <what is allowed>, got <value>``.

Every public constructor and function checks its arguments through these helpers, so that a bad
value fails early, names the argument, shows the value and says what is allowed, the same way
from Python and from the CLI. ``bool`` is never accepted where a number is meant (``True == 1``
would otherwise slip through), and a value of the wrong type gets this message, not Python's.
All helpers raise ``ArgumentError``, which is both a ``ValueError`` and a ``TypeError``, so code
that catches either keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "ArgumentError",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_pair",
    "check_shape",
    "check_type",
]


class ArgumentError(ValueError, TypeError):
    """A bad argument: its message names the owner, the argument, what is allowed and the value."""


def fail(owner: str, name: str, allowed: str, value: Any) -> ArgumentError:
    """The library's error for ``value`` of argument ``name`` of ``owner``; raise what it returns."""
    return ArgumentError(f"{owner}: {name} must be {allowed}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(owner: str, name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False) -> int | None:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (``None`` passes when ``allow_none``).

    Integral floats such as ``3.0`` are accepted (YAML and arithmetic produce them); ``bool`` is not.
    """
    if value is None and allow_none:
        return None
    parts = ["an integer"]
    if minimum is not None and maximum is not None:
        parts = [f"an integer in [{minimum}, {maximum}]"]
    elif minimum == 1:
        parts = ["a positive integer"]
    elif minimum is not None:
        parts = [f"an integer >= {minimum}"]
    elif maximum is not None:
        parts = [f"an integer <= {maximum}"]
    allowed = parts[0] + (" or None" if allow_none else "")
    if not _is_number(value) or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise fail(owner, name, allowed, value)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise fail(owner, name, allowed, value)
    return value


def check_float(owner: str, name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                strict: bool = False, allow_none: bool = False) -> float | None:
    """``value`` as a finite ``float`` with ``minimum <= value <= maximum`` (``<`` when ``strict``).

    ``strict=True`` with ``minimum=0`` is "a positive number"; ``None`` passes when ``allow_none``.
    """
    if value is None and allow_none:
        return None
    if minimum == 0 and maximum is None:
        allowed = "a positive finite number" if strict else "a finite number >= 0"
    else:
        op_lo, op_hi = ("<", "<") if strict else ("<=", "<=")
        bounds = []
        if minimum is not None:
            bounds.append(f"{minimum} {op_lo} x")
        if maximum is not None:
            bounds = [f"{bounds[0]} {op_hi} {maximum}"] if bounds else [f"x {op_hi} {maximum}"]
        allowed = "a finite number" + (f" with {bounds[0]}" if bounds else "")
    allowed += " or None" if allow_none else ""
    if not _is_number(value) or not math.isfinite(value):
        raise fail(owner, name, allowed, value)
    value = float(value)
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise fail(owner, name, allowed, value)
    if maximum is not None and (value >= maximum if strict else value > maximum):
        raise fail(owner, name, allowed, value)
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise fail(owner, name, "True or False", value)
    return value


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices`` (listed in the message)."""
    choices = tuple(choices)
    if isinstance(value, bool) or value not in choices:
        err = fail(owner, name, "one of " + ", ".join(repr(c) for c in choices), value)
        if isinstance(value, str):
            import difflib

            close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1, cutoff=0.6)
            if close:
                err = ArgumentError(f"{err} (did you mean {close[0]!r}?)")
        raise err
    return value


def check_shape(owner: str, name: str, value: Any) -> tuple[int, ...]:
    """``value`` as a non-empty tuple of positive integers (a sample shape)."""
    allowed = "a non-empty sequence of positive integers"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise fail(owner, name, allowed, value)
    if not all(_is_number(s) and float(s).is_integer() and s >= 1 for s in value):
        raise fail(owner, name, allowed, value)
    return tuple(int(s) for s in value)


def check_pair(owner: str, name: str, value: Any, *, allow_none: bool = False) -> tuple[float, float] | None:
    """``value`` as a pair of finite numbers ``(low, high)`` with ``low < high``."""
    if value is None and allow_none:
        return None
    allowed = "a pair (low, high) of finite numbers with low < high" + (" or None" if allow_none else "")
    ok = isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 2
    if not ok or not all(_is_number(v) and math.isfinite(v) for v in value) or not value[0] < value[1]:
        raise fail(owner, name, allowed, value)
    return float(value[0]), float(value[1])


def check_type(owner: str, name: str, value: Any, types: type | tuple[type, ...], allowed: str) -> Any:
    """``value`` if it is an instance of ``types``; ``allowed`` says what is expected in words."""
    if not isinstance(value, types):
        raise ArgumentError(f"{owner}: {name} must be {allowed}, got {type(value).__name__} {value!r}"[:400])
    return value
