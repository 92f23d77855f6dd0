"""Fuzzing a real daemon process with mutated valid messages: every reply is ok or a protocol
error (never `internal`, never a traceback in the log), the daemon keeps serving, nothing is
written outside its output root, and every acknowledged frame is written."""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from daemon_harness import start_daemon

from livedecon.daemon._journal import ACQUISITION_FILE, read_acquisition_record, read_journal
from livedecon.daemon._protocol import PROTOCOL_VERSION, ErrorCode
from livedecon.daemon._reprocess import _acknowledged
from livedecon.daemon._writer import written_keys

MESSAGES = 1500
SHAPE = (16, 16)
VALUES: list[Any] = [
    None,
    True,
    False,
    -1,
    0,
    1,
    3,
    2**63,
    10**30,
    -(2**40),
    1e308,
    -0.0,
    3.5,
    "",
    ".",
    "..",
    "../..",
    "/",
    "/etc/passwd",
    "a/b",
    "a_b",
    "0",
    "%2E",
    "😀",
    "\u0000",
    "x" * 300,
    "uint8",
    "uint16",
    "float32",
    "float64",
    "frame",
    "status",
    "acquisition_end",
    [],
    [16],
    [16, 16],
    [2, 16, 16],
    [1, 16, 16],
    [0, 16],
    [16, -16],
    {},
    {"time": 1},
    {"z": 2, "channel": "c"},
    {"a": {"b": {"c": [1, [2, [3]]]}}},
    ["status"],
]
KINDS = ["acquisition_start", "frame", "timepoint_done", "acquisition_end", "status", "metrics"]
KINDS += ["adaptation", "load_model"]  # never shutdown: the fuzz would stop its own target


def payload_for(header: dict) -> bytes | None:
    """The right number of bytes for the header's dtype and shape, when it has sensible ones."""
    dtype, shape = header.get("dtype"), header.get("shape")
    if dtype not in ("uint8", "uint16", "float32") or not isinstance(shape, list):
        return None
    if not shape or not all(isinstance(n, int) and 0 < n <= 64 for n in shape):
        return None
    return np.ones(shape, dtype).tobytes()


class Fuzzer:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.next_frame: dict[str, int] = {}
        self.acked: dict[str, int] = {}
        self.started: set[str] = set()
        self.counter = 0

    def valid(self, kind: str, acquisition_id: str) -> dict:
        base: dict[str, Any] = {"version": PROTOCOL_VERSION, "kind": kind}
        if kind == "acquisition_start":
            plan = {"pixel_size_um": 0.1, "save": self.rng.random() < 0.9}
            if self.rng.random() < 0.2:
                plan.update(mode="3d", z_count=2, z_step_um=0.2)
            return {**base, "acquisition_id": acquisition_id, "plan": plan}
        if kind == "frame":
            axes = {"time": self.rng.randrange(4), "z": self.rng.randrange(2)}
            axes["channel"] = self.rng.choice([0, "0", "GFP", "gfp", "a/b", "😀"])
            return {
                **base,
                "acquisition_id": acquisition_id,
                "frame_id": self.next_frame.get(acquisition_id, 0),
                "axes": axes,
                "dtype": self.rng.choice(["uint16", "uint16", "uint16", "float32", "uint8"]),
                "shape": list(SHAPE),
                "pixel_size_um": 0.1,
                "timestamp_s": time.time(),
            }
        if kind in ("timepoint_done", "acquisition_end"):
            return {**base, "acquisition_id": acquisition_id, "axes": {"time": 0}}
        if kind == "adaptation":
            action = self.rng.choice(["status", "set", "rollback", "other"])
            return {**base, "acquisition_id": acquisition_id, "request": {"action": action}}
        if kind == "load_model":
            return {**base, "request": {"bundle": "pass-through"}}
        return base

    def mutate(self, header: dict) -> dict:
        header = copy.deepcopy(header)
        for _ in range(self.rng.randint(1, 3)):
            target = header
            nested = [k for k, v in header.items() if isinstance(v, dict)]
            if nested and self.rng.random() < 0.3:
                target = header[self.rng.choice(nested)]
            keys = list(target) or ["x"]
            choice = self.rng.random()
            if choice < 0.15 and target:
                del target[self.rng.choice(keys)]
            elif choice < 0.25:
                target[self.rng.choice(["surprise", "shm", "plan", "request", "z_stack_size"])] = (
                    self.rng.choice(VALUES)
                )
            else:
                target[self.rng.choice(keys)] = self.rng.choice(VALUES)
        return header

    def message(self, ids: list[str]) -> list[bytes]:
        rng = self.rng
        acquisition_id = rng.choice(ids)
        kind = rng.choice(["frame"] * 4 + KINDS)
        header = self.valid(kind, acquisition_id)
        if rng.random() < 0.7:
            header = self.mutate(header)
        if header.get("kind") == "shutdown":
            header["kind"] = "status"
        raw = json.dumps(header).encode()
        if rng.random() < 0.05:  # damaged bytes
            cut = rng.randrange(len(raw))
            raw = raw[:cut] + bytes([rng.randrange(256)]) + raw[cut + 1 :]
        parts = [raw]
        payload = payload_for(header)
        if payload is not None or rng.random() < 0.1:
            payload = payload or b"\0" * rng.choice([0, 1, 511, 512])
            if rng.random() < 0.05:
                payload = payload[:-1]
            parts.append(payload)
        return parts


def _outside(tmp_path: Path, root: Path) -> list[Path]:
    return [
        p
        for p in tmp_path.rglob("*")
        if not p.is_relative_to(root) and p.parent != tmp_path and not p.is_dir()
    ]


def test_fuzzed_messages_get_protocol_errors_and_every_ack_is_written(tmp_path):
    daemon = start_daemon(
        tmp_path,
        limits={"max_frame_pixels": 4096, "max_z": 4, "max_header_bytes": 8192},
        queues={"stack_timeout_s": 1.0},
    )
    root = daemon.config.output_dir
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(daemon.ingest)
    fuzzer = Fuzzer(random.Random(16))
    ids = ["f0", "f1", "..", "a/b", "0"]
    codes: dict[str, int] = {}
    started = time.monotonic()
    try:
        for i in range(MESSAGES):
            if i % 200 == 0:  # (re)start the base acquisitions, so frames have a target
                for name in ids:
                    socket.send(
                        json.dumps(fuzzer.valid("acquisition_start", f"{name}~{i}")).encode()
                    )
                    assert socket.poll(10_000)
                    if json.loads(socket.recv())["ok"]:
                        fuzzer.started.add(f"{name}~{i}")
                live = [f"{name}~{i}" for name in ids]
            parts = fuzzer.message(live)
            socket.send_multipart(parts)
            assert socket.poll(10_000), f"no reply to {parts[0][:200]!r}"
            reply = json.loads(socket.recv())
            code = "ok" if reply["ok"] else reply["code"]
            codes[code] = codes.get(code, 0) + 1
            assert code != ErrorCode.INTERNAL.value, (parts[0][:300], reply)
            assert code == "ok" or code in {c.value for c in ErrorCode}
            if not reply["ok"]:
                continue
            sent = json.loads(parts[0])  # what the daemon accepted (damaged bytes included)
            name, kind = sent.get("acquisition_id"), sent.get("kind")
            if kind == "frame":
                fuzzer.acked[name] = fuzzer.acked.get(name, 0) + 1
                fuzzer.next_frame[name] = sent["frame_id"] + 1
            elif kind == "acquisition_start":
                fuzzer.started.add(name)
                fuzzer.acked[name] = fuzzer.next_frame[name] = 0
        elapsed = time.monotonic() - started
        for name in sorted(fuzzer.started):  # end whatever is still running
            end = {"version": 1, "kind": "acquisition_end", "acquisition_id": name}
            socket.send(json.dumps(end).encode())
            assert socket.poll(10_000)
            socket.recv()
        socket.send(json.dumps({"version": 1, "kind": "status"}).encode())
        assert socket.poll(10_000)
        assert json.loads(socket.recv())["ok"]
    finally:
        socket.close()
        assert daemon.stop() == 0  # finishes everything acknowledged
    print(f"{MESSAGES} fuzzed messages in {elapsed:.1f} s: {codes}")
    assert codes.get("ok", 0) > 100
    assert len(codes) > 8  # many kinds of refusal were exercised
    log = daemon.log()
    assert "Traceback" not in log
    assert _outside(tmp_path, root) == []
    checked = 0
    for path in root.rglob(ACQUISITION_FILE):
        directory = path.parent
        entries = read_journal(directory)
        name = read_acquisition_record(directory).acquisition_id
        assert len(entries) == fuzzer.acked.get(name, 0), name  # journalled == acknowledged
        acknowledged = set(_acknowledged(entries))
        assert written_keys(directory) == acknowledged, name  # and every plane is on disk
        checked += len(entries)
    assert checked > 50
