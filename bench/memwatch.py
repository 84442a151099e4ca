"""Peak host RSS sampled in a background thread (the OS high-water mark also counts pages never freed)."""
from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """``with PeakRSS() as p: ...``; ``p.peak`` is the largest RSS seen (bytes), sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
