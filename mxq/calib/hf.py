"""Calibration text from a Hugging Face dataset, failing fast and clearly when the hub is unreachable.

Why the care: ``datasets.load_dataset`` retries and waits on connection timeouts, so a GPU job on a
machine without network can sit for minutes before failing with a message about a missing file.
mxq checks first: a local dataset folder is read directly; with ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``
set, only the local cache is tried; otherwise the hub endpoint is probed with a short timeout and the
dataset is streamed (only the rows needed are read, so ``allenai/c4`` is not downloaded whole).
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .config import CalibConfig, CalibError

PROBE_TIMEOUT_S = 5.0
CHARS_PER_TOKEN_READ = 16  # default text read per domain: 16 characters for every token the windows need


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline_mode() -> bool:
    """True when the user asked for no network (either flag the HF libraries read)."""
    return _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE")


def hub_endpoint() -> str:
    """The endpoint the HF libraries will really use (read by huggingface_hub at import time)."""
    from huggingface_hub import constants   # imported here: it reads HF_ENDPOINT at import time

    return str(constants.ENDPOINT).rstrip("/")


@contextmanager
def libraries_offline() -> Iterator[None]:
    """Make huggingface_hub and datasets really offline for one call.

    Both read HF_HUB_OFFLINE once, at import; transformers imports them before the user's code can set
    the variable, and then every request is retried with backoff (about 25 s) before failing. Setting
    their module flags for the duration of the call makes offline mean offline.
    """
    import datasets.config
    from huggingface_hub import constants

    saved = [(m, n, getattr(m, n)) for m, n in ((constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                                                (datasets.config, "HF_DATASETS_OFFLINE")) if hasattr(m, n)]
    for m, n, _ in saved:
        setattr(m, n, True)
    try:
        yield
    finally:
        for m, n, v in saved:
            setattr(m, n, v)


def probe_hub(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers within ``timeout`` seconds, else the reason it did not."""
    req = urllib.request.Request(hub_endpoint() + "/api/datasets?limit=1", method="HEAD")
    try:
        urllib.request.urlopen(req, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered (any HTTP status means it is reachable)
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    return None


def domain_name(cfg: CalibConfig) -> str:
    name = Path(str(cfg.dataset)).name or str(cfg.dataset)
    return f"{name}-{cfg.subset}" if cfg.subset else name


def _load(cfg: CalibConfig, streaming: bool):
    import datasets

    return datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split, streaming=streaming)


def hf_texts(cfg: CalibConfig) -> dict[str, str]:
    """``{dataset name: text}``: rows' ``text_field`` joined by blank lines, up to ``max_chars`` characters."""
    local = Path(str(cfg.dataset)).expanduser().exists()
    if local:
        rows = _load(cfg, streaming=True)
    elif offline_mode():
        try:
            with libraries_offline():
                rows = _load(cfg, streaming=False)
        except Exception as e:  # datasets raises several types for "not cached"; all mean the same here
            raise CalibError(
                f"the Hugging Face hub cannot be reached (offline mode: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is "
                f"set) and dataset {cfg.dataset!r} (subset {cfg.subset!r}, split {cfg.split!r}) is not in the "
                f"local cache ({type(e).__name__}: {e}). Use calib.source=files for local text.") from e
    else:
        reason = probe_hub()
        if reason is not None:
            raise CalibError(
                f"the Hugging Face hub cannot be reached at {hub_endpoint()} ({reason}) to load dataset "
                f"{cfg.dataset!r}. Set HF_HUB_OFFLINE=1 to use a copy in the local cache, or use "
                f"calib.source=files for local text.")
        try:
            rows = _load(cfg, streaming=True)
        except (ConnectionError, TimeoutError, OSError) as e:
            raise CalibError(f"the Hugging Face hub cannot be reached while loading {cfg.dataset!r}: {e}") from e
    budget = cfg.max_chars or CHARS_PER_TOKEN_READ * cfg.num_sequences * cfg.seq_len
    docs, n = [], 0
    for row in rows:
        if cfg.text_field not in row:
            raise CalibError(f"dataset {cfg.dataset!r} has no field {cfg.text_field!r} (calib.text_field); "
                             f"fields: {sorted(row)}")
        text = str(row[cfg.text_field])
        if text.strip():
            docs.append(text)
            n += len(text)
        if n >= budget:
            break
    return {domain_name(cfg): "\n\n".join(docs)}
