"""What a run prints: mxq's own lines, one progress line per stage, and nothing from other libraries unless
``verbose=true``.

lm-eval, datasets and transformers log at INFO and draw tqdm bars of their own; around a one-minute run on
the embedded model they bury mxq's output. ``quiet_libraries`` turns their loggers to WARNING and their bars
off for the duration of a run, through each library's own switch where it has one:
- datasets: ``datasets.utils.logging.disable_progress_bar`` / ``enable_progress_bar``;
- transformers: ``transformers.utils.logging.disable_progress_bar``;
- lm-eval 0.4 has no switch for the bars it draws while building requests (``lm_eval/api/task.py``
  ``build_all_requests``, ``lm_eval/api/model.py`` ``CachingLM``), so its module-level ``tqdm`` name is
  replaced by a disabled one; and ``simple_evaluate`` shells out to ``git describe`` in the current folder
  for its results' ``git_hash`` (``lm_eval/loggers/utils.py``), which prints "fatal: not a git repository"
  outside a checkout. mxq records its own revision in run_meta.json, so that call is skipped.
Errors and warnings always get through.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

LIBRARY_LOGGERS = ("lm_eval", "datasets", "transformers", "huggingface_hub", "urllib3", "filelock", "fsspec",
                   "matplotlib", "PIL", "numexpr", "torch.distributed", "accelerate")



def _disabled_bar(orig: Callable[..., Any]) -> Callable[..., Any]:
    """``tqdm`` that never draws, whatever ``disable=`` the caller passes (a partial would let it override)."""
    @functools.wraps(orig)
    def bar(*args: Any, **kwargs: Any) -> Any:
        return orig(*args, **{**kwargs, "disable": True})

    return bar


# (module, attribute, replacement factory): names inside other libraries that mxq switches off when quiet
_PATCHES: tuple[tuple[str, str, Callable[[Any], Any]], ...] = (
    ("lm_eval.api.task", "tqdm", _disabled_bar),
    ("lm_eval.api.model", "tqdm", _disabled_bar),
    ("lm_eval.evaluator", "get_git_commit_hash", lambda orig: (lambda: None)),
)


_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("mxq_quiet_libraries", default=False)


def quiet() -> bool:
    """True inside ``quiet_libraries``: mxq's own inner progress bars (per batch) stay off too."""
    return _QUIET.get()


@contextlib.contextmanager
def _library_bars_off() -> Iterator[None]:
    toggles = []
    for mod, off, on in (("datasets.utils.logging", "disable_progress_bar", "enable_progress_bar"),
                         ("transformers.utils.logging", "disable_progress_bar", "enable_progress_bar")):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        getattr(m, off)()
        toggles.append(getattr(m, on))
    try:
        yield
    finally:
        for on in toggles:
            on()


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Within the block, other libraries log warnings and errors only and draw no progress bars."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    token = _QUIET.set(True)
    try:
        with _library_bars_off():
            yield
    finally:
        _QUIET.reset(token)
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


@contextlib.contextmanager
def lm_eval_quiet() -> Iterator[None]:
    """Around an lm-eval call: its bars and its ``git describe`` off, when inside ``quiet_libraries``.

    Separate from ``quiet_libraries`` because importing lm-eval takes seconds, and runs that evaluate
    nothing with it should not pay for that.
    """
    if not _QUIET.get():
        yield
        return
    with contextlib.ExitStack() as stack:
        for mod, name, make in _PATCHES:
            m = importlib.import_module(mod)
            stack.enter_context(mock.patch.object(m, name, make(getattr(m, name))))
        yield


class StageDisplay:
    """One line per pipeline stage on stderr: a spinner while it runs (on a terminal), then its time."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)

    def skipped(self, name: str) -> None:
        """A stage the recipe or config turns off."""
        self.console.print(f"[dim]- {name:<9} off[/dim]")

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        import time

        t0 = time.perf_counter()
        try:
            with self.console.status(f"{name} ...", spinner="dots"):
                yield
        except BaseException:
            self.console.print(f"[red]x[/red] {name:<9} failed after {time.perf_counter() - t0:.1f} s")
            raise
        self.console.print(f"[green]✓[/green] {name:<9} {time.perf_counter() - t0:7.1f} s")
