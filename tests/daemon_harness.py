"""A real daemon in its own process (`livedecon serve`), on free loopback ports, for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from livedecon.daemon.client import DaemonClient, DaemonUnavailable

SERVE = "from livedecon.daemon.cli import app; app()"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    return repr(value)


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    lines = [f"{k} = {_toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    for name, table in sections.items():
        if isinstance(table, dict):
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class RunningDaemon:
    process: subprocess.Popen
    ingest: str
    publish: str
    output_dir: Path
    log_path: Path
    secure: Callable[[zmq.Socket], None] | None = None

    def client(self, **options: Any) -> DaemonClient:
        return DaemonClient(self.ingest, **{"timeout_s": 10.0, "secure": self.secure, **options})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def kill9(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)


def start_daemon(
    tmp_path: Path,
    bundle: str = "pass-through",
    wait_s: float = 120,
    secure: Callable[[zmq.Socket], None] | None = None,
    **sections: dict[str, Any],
) -> RunningDaemon:
    """Start `livedecon serve` with a config of `sections` over test defaults; returns once it
    answers a status request."""
    ingest = f"tcp://127.0.0.1:{free_port()}"
    publish = f"tcp://127.0.0.1:{free_port()}"
    output_dir = tmp_path / "out"
    config = {
        "output_dir": str(output_dir),
        "endpoints": {"ingest": ingest, "publish": publish, **sections.pop("endpoints", {})},
        "model": {"bundle": bundle, "backend": "onnxruntime", **sections.pop("model", {})},
        "telemetry": {"log_interval_s": 2.0},
        **sections,
    }
    path = write_config(tmp_path / f"daemon-{ingest.rsplit(':', 1)[1]}.toml", config)
    log_path = path.with_suffix(".log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE, "serve", "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )
    daemon = RunningDaemon(process, ingest, publish, output_dir, log_path, secure)
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
                    daemon.kill9()
                    raise RuntimeError(f"the daemon did not answer:\n{daemon.log()}") from None
                probe.reconnect()
    finally:
        probe.close()
