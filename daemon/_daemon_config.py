"""Daemon configuration: endpoints, limits, queue policies, output location, model choice."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from livedecon.engines._configfile import StrictModel, load_config
from livedecon.engines._enums import Backend, Precision

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Endpoints(StrictModel):
    """Where the daemon takes frames (ingest) and publishes, and how it admits remote clients."""

    ingest: str = "tcp://127.0.0.1:5555"
    publish: str = "tcp://127.0.0.1:5556"
    allow_remote: bool = Field(
        False, description="bind beyond loopback; then CurveZMQ keys are required"
    )
    curve_keys_dir: Path | None = Field(
        None, description="server.key_secret and authorized client public keys (remote use)"
    )

    @field_validator("ingest", "publish")
    @classmethod
    def _zmq_address(cls, value: str) -> str:
        scheme = value.split("://", 1)[0]
        if scheme not in {"tcp", "ipc", "inproc"} or "://" not in value:
            raise ValueError("must be a ZMQ address such as tcp://127.0.0.1:5555 or ipc:///tmp/x")
        if scheme == "tcp" and urlsplit(value).port is None:
            raise ValueError("a tcp endpoint needs a port, e.g. tcp://127.0.0.1:5555")
        return value

    def remote_hosts(self) -> list[str]:
        hosts = []
        for address in (self.ingest, self.publish):
            if address.startswith("tcp://"):
                host = urlsplit(address).hostname or ""
                if not _is_loopback(host):
                    hosts.append(host)
        return hosts

    @model_validator(mode="after")
    def _remote_is_opt_in(self) -> Endpoints:
        remote = self.remote_hosts()
        if remote and not self.allow_remote:
            raise ValueError(
                f"binds to non-loopback host(s) {remote}; set allow_remote = true and "
                "curve_keys_dir to expose the daemon (authenticated with CurveZMQ)"
            )
        if self.allow_remote and self.curve_keys_dir is None:
            raise ValueError("allow_remote = true needs curve_keys_dir for CurveZMQ keys")
        return self


class Limits(StrictModel):
    """The largest frames, stacks, headers and numbers of acquisitions the daemon accepts."""

    max_frame_pixels: int = Field(4096 * 4096, gt=0, description="largest Y*X accepted")
    max_z: int = Field(512, gt=0, description="largest z-stack accepted")
    max_inflight_frames: int = Field(64, gt=0, description="client window of unacked frames")
    max_header_bytes: int = Field(
        65_536, ge=1024, le=16 * 2**20, description="largest JSON header accepted"
    )
    max_active_acquisitions: int = Field(
        32, gt=0, description="acquisitions started and not yet ended, at most"
    )
    idle_close_s: float = Field(
        600.0,
        gt=0,
        description="an acquisition silent this long has its files closed (reopened when it "
        "sends again)",
    )

    @property
    def max_message_part_bytes(self) -> int:
        """The largest part of a valid message: a whole (Z, Y, X) float32 stack, or a header.
        The ROUTER's ZMQ_MAXMSGSIZE: anything larger is dropped before it is read."""
        return max(self.max_header_bytes, self.max_frame_pixels * self.max_z * 4)


class Queues(StrictModel):
    """Memory and disk queues, batching, z-stack assembly and display between ingest and output."""

    memory_queue_mb: float = Field(
        512, gt=0, description="frames held in memory before the queue spills to disk"
    )
    write_queue_planes: int = Field(16, gt=0, description="restored planes waiting for the disk")
    batch_max_frames: int = Field(4, gt=0, le=256)
    batch_deadline_ms: float = Field(
        0.0,
        ge=0,
        description="wait this long for a fuller 2D batch; 0: batch what is already queued "
        "(batches fill from the backlog when the engine falls behind, without adding latency)",
    )
    stack_timeout_s: float = Field(30.0, gt=0, description="give up waiting for a z-stack")
    spill_dir: str = Field("", description="empty: <output_dir>/spill")
    display: Literal["latest"] = Field(
        "latest", description="display frames are latest-wins; saved frames are never dropped"
    )


class Storage(StrictModel):
    """How the daemon keeps its promises on disk (see daemon/_journal.py for the fsync policy)."""

    reserve_mb: float = Field(
        1024.0,
        ge=0,
        description="free space kept on the output and spill file systems: frames to be saved "
        "are refused (disk_full) rather than eat into it",
    )
    free_check_ms: float = Field(
        200.0, ge=0, description="free space is measured at most this often (and every 64 MB)"
    )
    journal_fsync_s: float = Field(
        1.0, ge=0, description="acknowledged lines reach the disk within this; 0: before each ack"
    )
    ome_zarr: bool = Field(
        False,
        description="also write each restored plane to an OME-Zarr (NGFF 0.5) image beside its "
        "OME-TIFF file, for napari, dask and cloud tools (daemon/_zarr_output.py)",
    )


class ModelSelection(StrictModel):
    """The model the daemon serves: bundle, backend, precision and tiling."""

    bundle: str = Field(
        "fast2d-sim",
        description="bundle directory, a shipped bundle name, or 'pass-through' (no processing)",
    )
    backend: Backend = Backend.AUTO
    precision: Precision = Precision.FP32
    tile_px: int = Field(1024, ge=64, description="larger frames are restored in tiles")
    pass_through_delay_ms: float = Field(
        0.0, ge=0, description="pass-through only: a stand-in engine this slow (overload tests)"
    )


class Correction(StrictModel):
    """Optional corrections of the camera counts before the model (daemon/_correction.py)."""

    calibration: str = Field(
        "",
        description="calibration bundle with the camera maps; empty: the one model.bundle "
        "names, when that is a calibration bundle",
    )
    offset_gain: bool | None = Field(
        None, description="per-pixel offset, gain and hot pixels; unset: the calibration's choice"
    )
    stripes: bool | None = Field(
        None, description="Fourier column-stripe suppression; unset: the calibration's choice"
    )


# What a model on SR-SIM images takes: camera corrections belong to raw frames
NO_CORRECTION = Correction(offset_gain=False, stripes=False)


class Telemetry(StrictModel):
    """How often metrics are logged and how many latency samples each percentile covers."""

    log_interval_s: float = Field(10.0, gt=0, description="metrics line in the log this often")
    latency_window: int = Field(4096, ge=16, description="latest samples per percentile")


class DaemonConfig(StrictModel):
    """The daemon's settings: output folder, endpoints, limits, queues, storage, model."""

    output_dir: Path = Path("livedecon_out")
    endpoints: Endpoints = Endpoints()
    limits: Limits = Limits()
    queues: Queues = Queues()
    storage: Storage = Storage()
    model: ModelSelection = ModelSelection()
    correction: Correction = Correction()
    telemetry: Telemetry = Telemetry()

    @property
    def spill_path(self) -> Path:
        return Path(self.queues.spill_dir) if self.queues.spill_dir else self.output_dir / "spill"


def load_daemon_config(path: str | Path) -> DaemonConfig:
    """A daemon config from a TOML file, validated (ConfigError names the bad key)."""
    return load_config(path, DaemonConfig)
