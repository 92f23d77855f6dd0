"""A real daemon in its own process (`livedecon serve`) on free loopback ports, for tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from livedecon.daemon._client import DaemonClient
from livedecon.daemon._daemon_config import DaemonConfig
from livedecon.daemon._launcher import DaemonProcess, free_tcp_endpoint, spawn_daemon
from livedecon.daemon._protocol import Axes, Topic, decode_publication


def process_memory_mb(daemon: DaemonProcess, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of the daemon process, in MB."""
    for line in Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc")


def start_daemon(
    tmp_path: Path,
    bundle: str = "pass-through",
    secure: Callable[[zmq.Socket], None] | None = None,
    **sections: dict[str, Any],
) -> DaemonProcess:
    """`livedecon serve` with test defaults overridden by `sections` (config tables)."""
    config = DaemonConfig.model_validate(
        {
            "output_dir": str(tmp_path / "out"),
            "endpoints": {
                "ingest": free_tcp_endpoint(),
                "publish": free_tcp_endpoint(),
                **sections.pop("endpoints", {}),
            },
            "model": {"bundle": bundle, "backend": "onnxruntime", **sections.pop("model", {})},
            "telemetry": {"log_interval_s": 2.0},
            # a small reserve: test machines' disks may be nearly full
            "storage": {"reserve_mb": 16, **sections.pop("storage", {})},
            **sections,
        }
    )
    return spawn_daemon(config, tmp_path, secure=secure)


def subscriber(daemon: DaemonProcess, *topics: Topic) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(daemon.publish)
    for topic in topics:
        socket.subscribe(topic.value.encode())
    time.sleep(0.3)  # let the subscription reach the daemon's XPUB
    return socket


def receive_all(socket: zmq.Socket, quiet_ms: int = 500) -> list:
    received = []
    while socket.poll(quiet_ms):
        received.append(decode_publication(socket.recv_multipart()))
    return received


def send_and_flush(client: DaemonClient, frame: np.ndarray, axes: Axes | None = None) -> None:
    """Send one frame and wait for its reply: a refusal reaches the caller on the send itself
    (the client reads replies as it sends) or on the flush after it."""
    client.send(frame, axes)
    client.flush()
