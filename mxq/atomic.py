"""Writes that readers never see half done: whole files (``write_atomic``, ``write_safetensors_atomic``) and
whole folders (``AtomicFolder``). Every file written is 0644."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then ``os.replace`` it into place.

    Why: a crash or Ctrl-C mid-write must leave either the old file or none, never a truncated one that a
    later run would trust. The temp file sits in the same folder so the rename stays on one filesystem.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should stay readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors_atomic(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` into a temp file beside ``path``, made 0644 and fsynced, then renamed.

    The library creates its file 0600; every file mxq writes is 0644 like the rest of a checkpoint folder.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicFolder:
    """``with AtomicFolder(out) as tmp:`` write into ``tmp``; renamed to ``out`` only on success.

    The temporary folder is hidden beside ``out`` (same filesystem, so the rename is atomic); on an error
    it is removed and ``out`` is untouched. With ``overwrite`` an existing ``out`` is moved aside, the new
    folder renamed in, and the old one deleted: at no moment does ``out`` hold a mix of the two.
    """

    def __init__(self, out_dir: str | Path, overwrite: bool = False):
        self.out = Path(out_dir)
        self.overwrite = overwrite
        self.tmp = self.out.parent / f".{self.out.name}.partial-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out}: already exists (pass overwrite=True to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        os.chmod(self.tmp, 0o755)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
