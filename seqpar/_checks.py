"""Argument checks shared by every part of seqpar.

Each raises an error whose message names the argument, what was expected and what came
(``"{name}: expected {expected}, got {got}"``), so a bad call fails before any work and
never gives a silent wrong answer. ``error`` picks the exception class: ``ValueError``
for the library, a subclass of it where a program reports configuration errors its own
way (``seqpar.train.ConfigError``).
"""
from __future__ import annotations

from typing import NoReturn


def fail(name: str, expected: str, got, error: type[Exception] = ValueError) -> NoReturn:
    """Raise ``error("{name}: expected {expected}, got {got}")``."""
    raise error(f"{name}: expected {expected}, got {got}")


def check_positive_int(name: str, value, minimum: int = 1,
                       error: type[Exception] = ValueError) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        fail(name, f"an int >= {minimum}", repr(value), error)
    return value


def check_positive(name: str, value, kinds: tuple[type, ...] = (int,),
                   error: type[Exception] = ValueError):
    """``value`` if it is an instance of ``kinds`` (not a bool) and > 0."""
    if not isinstance(value, kinds) or isinstance(value, bool) or not value > 0:
        fail(name, "a positive " + " or ".join(k.__name__ for k in kinds), repr(value), error)
    return value
