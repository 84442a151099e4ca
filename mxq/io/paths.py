"""Paths named inside a checkpoint's own files, resolved and confined to the checkpoint folder.

A manifest or index lists files by name; a name such as ``../../etc/passwd`` or ``/home/x/secret`` must not
make a loader stat, read or hash anything outside the folder it was given (the same rule transformers
applies to ``weight_map`` entries through its ``cached_file`` path checks). ``confined`` accepts plain
relative names (``model-00001-of-00002.safetensors``, ``original/model.safetensors``) and rejects the rest
with an error naming the listing file and the entry.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from .safetensors_io import CheckpointError


def confined(folder: Path, name: object, listed_in: Path) -> Path:
    """``folder / name`` when ``name`` is a relative path that stays inside ``folder`` (symlinks resolved)."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise CheckpointError(f"{listed_in}: file entry {name!r} is not a plain relative path")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise CheckpointError(f"{listed_in}: file entry {name!r} points outside {folder}; refusing to follow it")
    root = folder.resolve()
    target = (folder / pure).resolve()
    if target != root and root not in target.parents:
        raise CheckpointError(f"{listed_in}: file entry {name!r} resolves to {target}, outside {root}")
    return folder / pure
