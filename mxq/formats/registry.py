"""Format registry: ``@register_format("name")`` and ``get_format(name)`` instead of if/elif chains."""
from __future__ import annotations

from typing import Callable, TypeVar

from .base import Format, FormatError

_FORMATS: dict[str, Format] = {}
F = TypeVar("F", bound=type)


def register_format(name: str, **params) -> Callable[[F], F]:
    """Register ``cls(**params)`` under ``name``; one class may be registered under several names."""

    def deco(cls: F) -> F:
        if name in _FORMATS:
            raise FormatError(f"format {name!r} is registered twice")
        inst = cls(**params)
        object.__setattr__(inst, "name", name)
        _FORMATS[name] = inst
        return cls

    return deco


def get_format(name: str) -> Format:
    try:
        return _FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; known formats: {', '.join(sorted(_FORMATS))}") from None


def list_formats() -> list[str]:
    return sorted(_FORMATS)
