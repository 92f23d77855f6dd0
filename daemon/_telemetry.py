"""Daemon telemetry: latency per stage as percentiles, rates, counters and queue depths.

Each stage is written by one thread (ingest, queue and inference by the worker, write by the
writer, publish by the publisher); a snapshot reads them from another thread. A sample lost to
that race costs nothing; a lock on the frame path would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

STAGES = ("ingest", "queue", "inference", "write", "publish", "end_to_end")
ADAPTATION = ("adaptation_step", "swap", "swap_prepare", "training_delay")


class LatencyWindow:
    """The latest `size` samples in milliseconds, in a ring."""

    def __init__(self, size: int) -> None:
        self._samples = np.zeros(size, dtype=np.float64)
        self._count = 0

    def add(self, milliseconds: float) -> None:
        self._samples[self._count % len(self._samples)] = milliseconds
        self._count += 1

    def summary(self) -> dict[str, float | int]:
        filled = self._samples[: min(self._count, len(self._samples))].copy()
        if not len(filled):
            return {"count": 0}
        p50, p95, p99 = np.percentile(filled, [50, 95, 99])
        return {"count": self._count, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99}


class RateMeter:
    """Events per second over the last `span_s` seconds."""

    def __init__(self, span_s: float = 5.0) -> None:
        self.span_s = span_s
        self._times: list[float] = []

    def tick(self, n: int = 1) -> None:
        now = time.monotonic()
        self._times.extend([now] * n)
        if len(self._times) > 4096 or self._times[0] < now - 2 * self.span_s:
            self._times = [t for t in self._times if t >= now - self.span_s]

    def rate(self) -> float:
        now = time.monotonic()
        recent = [t for t in self._times if t >= now - self.span_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)


class Metrics:
    """The daemon's latency windows per stage, counters, rates and gauges, read as a snapshot."""

    def __init__(self, window: int = 4096) -> None:
        self.latency = {stage: LatencyWindow(window) for stage in STAGES + ADAPTATION}
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "frames_received",
                "frames_restored",
                "planes_written",
                "frames_published",
                "display_dropped",
                "frames_spilled",
                "display_only_dropped",
                "write_failures",
                "errors",
            ),
            0,
        )
        self.restored_rate = RateMeter()
        self.received_rate = RateMeter()
        self.gauges: dict[str, Callable[[], Any]] = {}
        self.started = time.monotonic()

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def observe(self, stage: str, seconds: float) -> None:
        self.latency[stage].add(seconds * 1e3)

    def snapshot(self) -> dict[str, Any]:
        return {
            "uptime_s": time.monotonic() - self.started,
            "frames_per_s": {
                "received": self.received_rate.rate(),
                "restored": self.restored_rate.rate(),
            },
            "latency_ms": {stage: window.summary() for stage, window in self.latency.items()},
            "counters": dict(self.counters),
            "queues": {name: gauge() for name, gauge in self.gauges.items()},
        }

    def log_line(self) -> str:
        snap = self.snapshot()
        lat = snap["latency_ms"]

        def p(stage: str) -> str:
            s = lat[stage]
            return f"{s['p50_ms']:.1f}/{s['p99_ms']:.1f}" if s["count"] else "-"

        c = snap["counters"]
        return (
            f"in {snap['frames_per_s']['received']:.1f}/s restored "
            f"{snap['frames_per_s']['restored']:.1f}/s | p50/p99 ms ingest {p('ingest')} "
            f"queue {p('queue')} infer {p('inference')} write {p('write')} "
            f"publish {p('publish')} | received {c['frames_received']} written "
            f"{c['planes_written']} spilled {c['frames_spilled']} display dropped "
            f"{c['display_dropped']} errors {c['errors']} | queues {snap['queues']}"
        )
