"""进度与资源：管线向调用方报告进度的接口（CLI 用 rich 实现它），以及每个阶段的耗时与内存。"""

from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager


class NullProgress:
    """The progress interface, doing nothing: ``start`` a bar, ``step`` says what a layer is doing, ``advance``
    completes one unit, ``update`` reports a training step."""

    def start(self, name: str, total: int, completed: int = 0):
        pass

    def update(self, step: int, loss: float, accuracy: list[float]):
        pass

    def step(self, layer: int, what: str):
        pass

    def advance(self):
        pass


class Stages:
    """Wall time per stage, for the report."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    return current, peak_rss_mib()
