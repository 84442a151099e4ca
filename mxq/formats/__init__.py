"""Numeric formats for expert weights, selected by name through a registry."""
from .base import Format, FormatError, Packed
from .registry import get_format, list_formats, register_format
from . import mxfp4  # noqa: F401  (registers "mxfp4")

__all__ = ["Format", "FormatError", "Packed", "get_format", "list_formats", "register_format"]
