"""Cost metrics: MACs actually executed, wall time, peak memory.

MACs are FLOPs / 2 from ``torch.utils.flop_counter.FlopCounterMode``, counted inside
``sdpa_kernel(SDPBackend.MATH)`` because the counter misses the fused CPU attention kernel.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable

import torch


def count_macs(fn: Callable[[], object]) -> tuple[int, object]:
    """Run ``fn`` once under the FLOP counter; returns (MACs executed, fn's result)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops() // 2, result


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096  # resident pages


class PeakMemory:
    """Peak memory above the starting level while the block runs.

    On CUDA: ``torch.cuda.max_memory_allocated``. On CPU: the process's resident set, polled every 5 ms
    by a thread (torch's CPU allocator has no peak counter); a short spike between polls can be missed.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = _rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(0.005):
                self._peak = max(self._peak, _rss_bytes())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, _rss_bytes()) - self._start
        return False


@contextmanager
def wall_timer(device: torch.device | str = "cpu"):
    """Yields a dict whose ``seconds`` is filled in when the block ends."""
    device = torch.device(device)
    box = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield box
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    box["seconds"] = time.perf_counter() - start
