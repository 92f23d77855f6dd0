"""The wire protocol between acquisition hooks, the daemon and viewers (version 1).

A message is a ZMQ multipart: frame 0 a UTF-8 JSON header (`Header`), frame 1, for image
messages, the raw C-contiguous pixels (or nothing, when a shared-memory slot carries them).
Nothing that crosses a socket is ever unpickled. Every request gets a `Reply`: ok, or an error
code with a sentence a person understands. `decode` turns every malformed input into a
`ProtocolError` with its code, so the daemon answers it and goes on serving.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from livedecon.engines._sim_pattern import SimParameters

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 65_536  # the daemon's default; `Limits.max_header_bytes` sets its own
MAX_JSON_DEPTH = 16  # nesting of objects and arrays in a header (a plan is 3 deep)
DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float32": np.float32}


class Kind(StrEnum):
    """What a message asks for: an acquisition step or a control call."""

    ACQUISITION_START = "acquisition_start"
    FRAME = "frame"
    TIMEPOINT_DONE = "timepoint_done"
    ACQUISITION_END = "acquisition_end"
    STATUS = "status"
    METRICS = "metrics"
    LOAD_MODEL = "load_model"
    ADAPTATION = "adaptation"
    SHUTDOWN = "shutdown"


_KIND_VALUES = frozenset(kind.value for kind in Kind)
IMAGE_KINDS = {Kind.FRAME}
ACQUISITION_KINDS = {
    Kind.ACQUISITION_START,
    Kind.FRAME,
    Kind.TIMEPOINT_DONE,
    Kind.ACQUISITION_END,
}


class ErrorCode(StrEnum):
    """Why the daemon refused a message; sent back in the reply."""

    BAD_JSON = "bad_json"
    BAD_HEADER = "bad_header"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_KIND = "unknown_kind"
    BAD_DTYPE = "bad_dtype"
    MISSING_PAYLOAD = "missing_payload"
    UNEXPECTED_PAYLOAD = "unexpected_payload"
    PAYLOAD_LENGTH = "payload_length"
    TOO_LARGE = "too_large"
    NON_FINITE = "non_finite"
    UNKNOWN_ACQUISITION = "unknown_acquisition"
    DUPLICATE_ACQUISITION = "duplicate_acquisition"
    FRAME_ORDER = "frame_order"
    PLAN_MISMATCH = "plan_mismatch"
    DTYPE_MISMATCH = "dtype_mismatch"
    NAME_COLLISION = "name_collision"
    OUTPUT_CONFLICT = "output_conflict"
    OUTSIDE_ROOT = "outside_root"
    DISK_FULL = "disk_full"
    IO_ERROR = "io_error"
    WRITE_FAILED = "write_failed"
    TOO_MANY_ACQUISITIONS = "too_many_acquisitions"
    MODEL = "model"
    UNSUPPORTED = "unsupported"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A message the daemon refuses, with the code and message sent back to the client."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Axes(_Wire):
    """Where a frame belongs in its acquisition: time point, z plane, channel, position."""

    time: int = Field(0, ge=0)
    z: int = Field(0, ge=0)
    channel: int | str = 0
    position: int | str = 0


class AdaptationPlan(_Wire):
    """Per-acquisition settings (in the acquisition's plan, or set by the control call)."""

    mode: Literal["off", "adapt", "retrain"] = "off"
    steps_per_timepoint: int = Field(50, ge=1, le=10_000)
    retrain_every: int = Field(5, ge=1, description="retrain mode: every K timepoints")
    retrain_steps: int = Field(300, ge=1, le=100_000)
    frames_kept: int = Field(8, ge=1, le=256, description="frames (or stacks) per timepoint")
    timepoints_kept: int = Field(5, ge=1, le=100, description="retrain mode: data window")
    validation_tolerance: float = Field(
        0.02, ge=0, description="candidate loss may exceed the serving loss by this fraction"
    )
    collapse_ratio: float = Field(
        0.5, gt=0, lt=1, description="output mean and contrast must stay within this ratio"
    )
    learning_rate: float = Field(2e-5, gt=0)
    patch_px: int = Field(64, ge=16)
    batch_size: int = Field(4, ge=1)


OutputDtype = Literal["float32", "uint16"]  # how restored planes are stored


class SimPlan(_Wire):
    """A SIM acquisition's pattern sequence, and the optics and camera its reconstruction
    needs. Each raw frame carries its index in the sequence as its z (Axes.z)."""

    angles: int = Field(3, ge=1, le=8)
    phases: int = Field(3, ge=3, le=9)
    order: Literal["angle-phase", "phase-angle"] = Field(
        "angle-phase",
        description="angle-phase: frame a * phases + p is angle a, phase p (angle by angle);"
        " phase-angle: frame p * angles + a",
    )
    na: float = Field(gt=0, le=1.7, description="detection numerical aperture")
    emission_um: float = Field(gt=0.2, lt=2.0)
    immersion_ri: float = Field(1.515, ge=1.0, le=2.0)
    sample_ri: float = Field(1.33, ge=1.0, le=2.0)
    camera_offset_adu: float = Field(100.0, ge=0)
    camera_gain_e_per_adu: float = Field(1.0, gt=0, le=1000, description="photoelectrons/count")
    pattern: SimParameters | None = Field(
        None,
        description="a pattern measured before on this microscope and channel (the"
        " <file>.sim.json beside an earlier acquisition's output, or one of bright beads):"
        " every stream starts with it instead of estimating its own from its first sequence"
        " (0.1-2 s, and not found at all in frames too dim to show it); its phases are still"
        " measured again in every sequence (refresh_phases)",
    )
    refresh_phases: bool = Field(
        True,
        description="measure the pattern's phases again in every complete sequence (a pattern"
        " drifting a quarter period costs 2.4-4.4 dB with stale phases; about 40 ms per"
        " sequence on 2 cores); False: the stream's first pattern throughout",
    )

    @property
    def frames(self) -> int:
        return self.angles * self.phases

    @model_validator(mode="after")
    def _optics(self) -> Self:
        if self.na >= self.immersion_ri:
            raise ValueError(f"na ({self.na}) must be below immersion_ri ({self.immersion_ri})")
        return self

    @model_validator(mode="after")
    def _pattern_fits_the_sequence(self) -> Self:
        pattern = self.pattern
        if pattern is not None and (
            len(pattern.k) != self.angles or any(len(p) != self.phases for p in pattern.phases)
        ):
            found = f"{len(pattern.k)} angles x {[len(p) for p in pattern.phases]} phases"
            raise ValueError(
                f"the pattern holds {found}, the sequence {self.angles} x {self.phases}"
            )
        return self


class Plan(_Wire):
    """What an acquisition will send, from its start message."""

    mode: Literal["2d", "3d", "sim"] = "2d"
    z_count: int | None = Field(
        None, ge=1, description="planes per stack (3D); raw frames per SR image (SIM)"
    )
    channels: list[str] = Field(default_factory=lambda: ["default"])
    pixel_size_um: float = Field(gt=0)
    z_step_um: float | None = Field(None, gt=0)
    time_interval_s: float | None = Field(None, ge=0)
    model: str | None = Field(
        None, description="bundle (or 'pass-through') to use; None: the daemon's default"
    )
    output_dir: str | None = Field(None, description="None: the daemon's output directory")
    save: bool = Field(True, description="False: display only (nothing written, may drop)")
    output_dtype: OutputDtype = Field(
        "float32",
        description="uint16: half the disk and bandwidth of float32; each plane's record keeps"
        " the units of one count (fixed per acquisition by the model's normalisation)",
    )
    adaptation: AdaptationPlan = Field(default_factory=AdaptationPlan)
    sim: SimPlan | None = Field(None, description="sim: the pattern sequence and optics")
    isotropic: str | None = Field(
        None,
        min_length=1,
        description="3d: a Self-Net bundle that makes each restored stack isotropic (the chain"
        " ZS-DeconvNet 3D, then Self-Net); planes are then written at the lateral pixel size",
    )

    @model_validator(mode="before")
    @classmethod
    def _sim_groups(cls, data: Any) -> Any:
        """A sim plan's groups hold angles x phases frames (z_count says so, or is set)."""
        if isinstance(data, dict) and data.get("mode") == "sim" and data.get("sim") is not None:
            sim = data["sim"]
            sim = sim if isinstance(sim, SimPlan) else SimPlan.model_validate(sim)
            if data.get("z_count") not in (None, sim.frames):
                raise ValueError(
                    f"z_count {data['z_count']}: a SIM sequence of {sim.angles} angles x"
                    f" {sim.phases} phases has {sim.frames} frames"
                )
            data = {**data, "z_count": sim.frames}
        return data

    @model_validator(mode="after")
    def _stacks_have_depth(self) -> Self:
        if self.mode == "3d" and (self.z_count is None or self.z_step_um is None):
            raise ValueError("a 3d plan needs z_count and z_step_um")
        if self.isotropic is not None and self.mode != "3d":
            raise ValueError("isotropic (a Self-Net chain) needs a 3d plan")
        if (self.mode == "sim") != (self.sim is not None):
            raise ValueError("a sim plan needs its sim settings, and only a sim plan has them")
        return self


class SharedMemorySlot(_Wire):
    """Where a frame's pixels lie in a segment the client shares; the daemon copies them out
    before it acknowledges, so the client may reuse the slot once acknowledged."""

    segment: str = Field(min_length=1)
    offset: int = Field(ge=0)
    length: int = Field(gt=0)


class Header(_Wire):
    """The JSON header of every message to the daemon; which fields are required depends on the
    kind."""

    version: int
    kind: Kind
    acquisition_id: str | None = Field(None, min_length=1, max_length=200)
    frame_id: int | None = Field(None, ge=0, description="monotonic per acquisition")
    axes: Axes | None = None
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    pixel_size_um: float | None = Field(None, gt=0)
    timestamp_s: float | None = None
    z_stack_size: int | None = Field(None, ge=1)
    shm: SharedMemorySlot | None = None
    plan: Plan | None = None
    request: dict[str, Any] = Field(default_factory=dict, description="control arguments")

    @model_validator(mode="after")
    def _fields_for_kind(self) -> Self:
        needs: dict[Kind, tuple[str, ...]] = {
            Kind.ACQUISITION_START: ("acquisition_id", "plan"),
            Kind.FRAME: ("acquisition_id", "frame_id", "axes", "dtype", "shape"),
            Kind.TIMEPOINT_DONE: ("acquisition_id", "axes"),
            Kind.ACQUISITION_END: ("acquisition_id",),
        }
        missing = [name for name in needs.get(self.kind, ()) if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind} message needs {', '.join(missing)}")
        return self


class Reply(_Wire):
    """The daemon's answer to a message: ok, or an error code and message, and any data."""

    version: int = PROTOCOL_VERSION
    ok: bool
    code: ErrorCode | None = None
    message: str | None = None
    frame_id: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def error(cls, error: ProtocolError, frame_id: int | None = None) -> Reply:
        return cls(ok=False, code=error.code, message=error.message, frame_id=frame_id)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def encode(header: Header, payload: np.ndarray | None = None) -> list[bytes | memoryview]:
    """Multipart frames for `header` and its pixels (sent without a copy)."""
    frames: list[bytes | memoryview] = [header.model_dump_json(exclude_none=True).encode()]
    if payload is not None:
        frames.append(np.ascontiguousarray(payload).data.cast("B"))
    return frames


def frame_header(
    acquisition_id: str,
    frame_id: int,
    image: np.ndarray,
    axes: Axes,
    pixel_size_um: float | None = None,
    timestamp_s: float | None = None,
) -> Header:
    """The header of one image message, its dtype and shape taken from the image."""
    return Header(
        version=PROTOCOL_VERSION,
        kind=Kind.FRAME,
        acquisition_id=acquisition_id,
        frame_id=frame_id,
        axes=axes,
        dtype=str(image.dtype),
        shape=tuple(image.shape),
        pixel_size_um=pixel_size_um,
        timestamp_s=timestamp_s,
    )


def _json_depth(raw: bytes) -> int:
    """The deepest nesting of objects and arrays in `raw`, brackets inside strings ignored."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_header(raw: bytes | memoryview, max_bytes: int = MAX_HEADER_BYTES) -> Header:
    """The header of a message; every way it can be malformed is a `ProtocolError`."""
    raw = bytes(raw)
    if len(raw) > max_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"the header is {len(raw)} bytes; this daemon accepts at most {max_bytes}",
        )
    # Counting brackets is cheap; only a header with many of them is scanned properly.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _json_depth(raw) > MAX_JSON_DEPTH:
        raise ProtocolError(
            ErrorCode.BAD_JSON, f"the header nests deeper than {MAX_JSON_DEPTH} levels"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers of more digits than Python converts
        raise ProtocolError(ErrorCode.BAD_JSON, f"the header is not UTF-8 JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "the header must be a JSON object")
    version = data.get("version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {_short(version)} is not spoken here (this daemon: "
            f"{PROTOCOL_VERSION}); update the client or the daemon",
        )
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in _KIND_VALUES:
        known = ", ".join(k.value for k in Kind)
        raise ProtocolError(
            ErrorCode.UNKNOWN_KIND, f"unknown message kind {_short(kind)}; known: {known}"
        )
    try:
        return Header.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        raise ProtocolError(ErrorCode.BAD_HEADER, f"{_short(where)}: {first['msg']}") from None


def _short(value: object, limit: int = 80) -> str:
    """`value` for an error sentence: a hostile header must not make a huge reply."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode(
    frames: Sequence[bytes | memoryview],
    max_frame_pixels: int,
    max_z: int,
    shared_payload: memoryview | None = None,
    header: Header | None = None,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> tuple[Header, np.ndarray | None]:
    """Check a received multipart and return its header and pixels (a zero-copy view).

    `shared_payload` is the buffer a shared-memory slot resolved to, when the header names one;
    `header`, when the caller already parsed frame 0.
    """
    if not frames:
        raise ProtocolError(ErrorCode.BAD_JSON, "empty message")
    if header is None:
        header = parse_header(frames[0], max_header_bytes)
    extra = list(frames[1:])
    if header.kind not in IMAGE_KINDS:
        if extra:
            raise ProtocolError(
                ErrorCode.UNEXPECTED_PAYLOAD, f"a {header.kind} message carries no pixels"
            )
        return header, None
    if header.dtype not in DTYPES:
        raise ProtocolError(
            ErrorCode.BAD_DTYPE,
            f"dtype {_short(header.dtype)} is not accepted; send one of {', '.join(DTYPES)}",
        )
    shape = header.shape
    assert shape is not None  # a frame header names its shape (Header checks it)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ProtocolError(
            ErrorCode.BAD_HEADER, f"shape {list(shape)} must be (Y, X) or (Z, Y, X), all >= 1"
        )
    if shape[-1] * shape[-2] > max_frame_pixels or (len(shape) == 3 and shape[0] > max_z):
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"shape {list(shape)} is over the limit ({max_frame_pixels} pixels per plane,"
            f" {max_z} planes)",
        )
    if header.shm is not None:
        if extra:
            raise ProtocolError(
                ErrorCode.UNEXPECTED_PAYLOAD, "pixels both inline and in shared memory"
            )
        if shared_payload is None:
            raise ProtocolError(ErrorCode.MISSING_PAYLOAD, "the shared-memory slot is not open")
        buffer = shared_payload
    elif len(extra) != 1:
        raise ProtocolError(
            ErrorCode.MISSING_PAYLOAD if not extra else ErrorCode.UNEXPECTED_PAYLOAD,
            f"a frame message has exactly one pixel part, got {len(extra)}",
        )
    else:
        buffer = memoryview(extra[0])
    dtype = np.dtype(DTYPES[header.dtype])
    expected = int(np.prod(shape)) * dtype.itemsize
    if buffer.nbytes != expected:
        raise ProtocolError(
            ErrorCode.PAYLOAD_LENGTH,
            f"{buffer.nbytes} bytes of pixels, but shape {list(shape)} of {header.dtype}"
            f" needs {expected}",
        )
    pixels = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    if dtype.kind == "f" and not np.isfinite(pixels).all():
        raise ProtocolError(ErrorCode.NON_FINITE, "the pixels hold NaN or infinite values")
    return header, pixels


class Topic(StrEnum):
    """What the daemon publishes; a viewer subscribes to the topics it shows. Raw frames and
    whole volumes are sent only while someone subscribes to them."""

    RESTORED = "restored"
    RAW = "raw"
    MIP = "mip"  # maximum-intensity projection of a restored volume along z (an xy image)
    # ... along y, a (Z, X) image with z at the volume's z step, and along x, (Z, Y); ZMQ
    # subscriptions match prefixes, so no topic name starts with another's
    MIP_XZ = "xz-mip"
    MIP_YZ = "yz-mip"
    VOLUME = "volume"


class Publication(_Wire):
    """The header of a published image: frame 0 is the topic, frame 1 this, frame 2 pixels."""

    version: int = PROTOCOL_VERSION
    topic: Topic
    acquisition_id: str
    frame_id: int
    axes: Axes
    dtype: str
    shape: tuple[int, ...]
    pixel_size_um: float | None = Field(description="of these pixels (restored: upsampled)")
    z_step_um: float | None = None
    timestamp_s: float | None = Field(None, description="the camera's time of the frame")
    published_s: float = Field(description="wall clock when the daemon sent it")
    bundle_id: str
    weights_version: int
    units: str


def encode_publication(publication: Publication, pixels: np.ndarray) -> list[bytes | memoryview]:
    """The three parts of a publication: topic, JSON header and pixels (sent without a copy)."""
    return [
        publication.topic.value.encode(),
        publication.model_dump_json(exclude_none=True).encode(),
        np.ascontiguousarray(pixels).data.cast("B"),
    ]


def decode_publication(frames: Sequence[bytes | memoryview]) -> tuple[Publication, np.ndarray]:
    """A received publication and its pixels (a view on the last frame)."""
    if len(frames) != 3:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"a publication has 3 parts, got {len(frames)}")
    try:
        publication = Publication.model_validate_json(bytes(frames[1]))
    except ValidationError as exc:
        raise ProtocolError(
            ErrorCode.BAD_HEADER, f"publication header: {exc.errors()[0]['msg']}"
        ) from None
    dtype = np.dtype(DTYPES.get(publication.dtype, np.float32))
    return publication, np.frombuffer(frames[2], dtype=dtype).reshape(publication.shape)
