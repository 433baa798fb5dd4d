"""Wall-clock reads that wait for the GPU: CUDA kernels run asynchronously, so a timer read
without a synchronisation measures how fast work was queued, not how fast it ran."""

from __future__ import annotations

import time

import torch


def now() -> float:
    """`time.perf_counter()` after every CUDA device has finished its queued work.

    A no-op wait when CUDA was never initialised (CPU runs), so it costs nothing there. The
    guard's per-step host timers do not use it on purpose: they report host time, and a wait per
    step would add the very stall the guard avoids.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)
    return time.perf_counter()
