"""Which existing folders mxq may replace: only checkpoint folders made of files mxq itself writes.

``--overwrite`` (``mxq.synth``, ``mxq.dequantize``, exports) deletes the old folder once the new one is
complete. A mistyped path must never take a user's files with it, so a folder is replaced only when every
entry in it is a name mxq writes into a checkpoint (shards, index, configs, manifest, tokenizer files, the
``original/`` subfolder with the same rule, training logs) and it holds a ``config.json``, or when it is
empty. Anything else is refused with the first foreign entry named.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path

# Names mxq writes into a checkpoint folder (writer, mxq layout, tokenizer, mxq.train's logs).
CHECKPOINT_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "mxq_manifest.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "training_log.json", "loss.png", "README.md", "mxq_synthetic.json",
)
CHECKPOINT_SUBDIRS = ("original",)


class NotOwnedError(FileExistsError):
    """An existing folder that mxq cannot prove is a checkpoint it wrote; it is left untouched."""


def foreign_entries(folder: Path, subdirs: tuple[str, ...] = CHECKPOINT_SUBDIRS) -> list[Path]:
    """Entries of ``folder`` (recursively into the allowed subfolders) that mxq does not write."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            out.append(p)
        elif p.is_dir():
            out.extend(foreign_entries(p, ()) if p.name in subdirs else [p])
        elif not any(fnmatch.fnmatchcase(p.name, pat) for pat in CHECKPOINT_PATTERNS):
            out.append(p)
    return out


def check_replaceable(folder: str | Path) -> None:
    """Raise ``NotOwnedError`` unless ``folder`` is absent, empty, or a checkpoint made only of mxq's files."""
    folder = Path(folder)
    if not folder.exists():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise NotOwnedError(f"{folder}: exists and is not a folder; refusing to replace it")
    if not any(folder.iterdir()):
        return
    foreign = foreign_entries(folder)
    if foreign:
        raise NotOwnedError(f"{folder}: refusing to overwrite: {foreign[0]} is not a file mxq writes into a "
                            f"checkpoint ({len(foreign)} such entr{'y' if len(foreign) == 1 else 'ies'}); "
                            "remove the folder yourself or choose another output path")
    if not (folder / "config.json").is_file():
        raise NotOwnedError(f"{folder}: refusing to overwrite: no config.json, so it is not a checkpoint")
