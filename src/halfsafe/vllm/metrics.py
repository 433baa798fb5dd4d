"""The counter `halfsafe:sanitized_rows` on vLLM's /metrics, across vLLM's processes.

The logits processor runs in the process that samples (engine core or a worker), while /metrics
is served by the API server, a different process. Without PROMETHEUS_MULTIPROC_DIR (vLLM sets
none for a single API server) a prometheus_client counter made in the sampling process would
never reach /metrics. So the sampling process writes its running total into a small file, one per
process, in a directory the plugin chose in the first vLLM process and handed down through the
environment (vLLM spawns the engine core and workers after loading plugins); a collector in the
API server's registry sums the files when /metrics is scraped.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

ENV = "HALFSAFE_VLLM_METRICS_DIR"
NAME = "halfsafe:sanitized_rows"
HELP = ("Rows of logits that halfsafe's logits processor changed: NaN or +inf replaced, or a row with "
        "nothing usable ended with its end token")
_installed = False


def metrics_dir() -> Path:
    """The directory shared by this vLLM process tree; made (and removed at exit) by the first
    process that asks, normally the front end through the plugin."""
    value = os.environ.get(ENV)
    if value:
        return Path(value)
    made = tempfile.mkdtemp(prefix="halfsafe-vllm-metrics-")
    os.environ[ENV] = made
    atexit.register(shutil.rmtree, made, ignore_errors=True)
    return Path(made)


def record(total: int) -> None:
    """This process's running total, written atomically (a reader never sees half a number)."""
    directory = metrics_dir()
    target = directory / f"{os.getpid()}.count"
    temporary = directory / f".{os.getpid()}.count.tmp"
    temporary.write_text(str(int(total)))
    os.replace(temporary, target)


def total() -> int:
    """The sum over the processes of this tree: rows sanitized so far."""
    directory = metrics_dir()
    count = 0
    for path in directory.glob("*.count"):
        try:
            count += int(path.read_text() or 0)
        except (OSError, ValueError):
            continue  # a process's file vanished between listing and reading
    return count


class SanitizedRowsCollector:
    """prometheus_client collector: the counter, read at scrape time."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(NAME, HELP)
        family.add_metric([], total())
        yield family

    def describe(self):
        return []


def install_collector() -> None:
    """Choose the shared directory (before vLLM spawns anything) and add the collector to
    prometheus_client's default registry, which vLLM's /metrics serves in single-server mode."""
    global _installed
    if _installed:
        return
    _installed = True
    metrics_dir()
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return  # vLLM always ships prometheus_client; without it there is no /metrics anyway
    REGISTRY.register(SanitizedRowsCollector())
