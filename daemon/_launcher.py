"""Running `livedecon serve` as a child process (the demo, benchmarks, tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from livedecon.daemon._client import DaemonClient, DaemonUnavailable
from livedecon.daemon._daemon_config import DaemonConfig

# The `livedecon` program as a child process (by module, so it needs no PATH entry): the
# launcher runs its `serve` command, it imports nothing of the command-line layer.
LIVEDECON = (sys.executable, "-m", "livedecon.cli")


@dataclass
class DaemonProcess:
    """A daemon running as a child process: its config, log and a client factory."""

    process: subprocess.Popen[bytes]
    config: DaemonConfig
    log_path: Path
    secure: Callable[[zmq.Socket[bytes]], None] | None = None

    @property
    def ingest(self) -> str:
        return self.config.endpoints.ingest

    @property
    def publish(self) -> str:
        return self.config.endpoints.publish

    def client(self, **options: Any) -> DaemonClient:
        return DaemonClient(self.ingest, **{"timeout_s": 10.0, "secure": self.secure, **options})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM (the daemon finishes what it acknowledged), then SIGKILL after `timeout_s`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode


def spawn_daemon(
    config: DaemonConfig,
    work_dir: Path,
    wait_s: float = 120,
    secure: Callable[[zmq.Socket[bytes]], None] | None = None,
    log_level: str = "info",
) -> DaemonProcess:
    """Start a daemon with `config` (written to `work_dir`); returns once it answers."""
    work_dir.mkdir(parents=True, exist_ok=True)
    port = config.endpoints.ingest.rsplit(":", 1)[-1].replace("/", "_")
    config_path = work_dir / f"daemon-{port}.json"
    config_path.write_text(config.model_dump_json(indent=2))
    log_path = config_path.with_suffix(".log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                *LIVEDECON,
                "serve",
                "--config",
                str(config_path),
                "--log-level",
                log_level,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )
    daemon = DaemonProcess(process, config, log_path, secure)
    deadline = time.monotonic() + wait_s
    probe = daemon.client(timeout_s=1.0)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the daemon exited ({process.returncode}):\n{daemon.log()}")
            try:
                probe.status()
                return daemon
            except DaemonUnavailable:
                if time.monotonic() > deadline:
                    daemon.kill()
                    raise RuntimeError(f"the daemon did not answer:\n{daemon.log()}") from None
                probe.reconnect()
    finally:
        probe.close()


def free_tcp_endpoint() -> str:
    """A loopback endpoint on a port free right now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"
