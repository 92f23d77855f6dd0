"""The wire protocol's checks, one test row per bad-input class (the daemon answers each with
its code and keeps serving; that part is tested across processes with the server)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from livedecon.daemon._protocol import (
    PROTOCOL_VERSION,
    Axes,
    ErrorCode,
    Header,
    Kind,
    Plan,
    ProtocolError,
    Reply,
    SharedMemorySlot,
    decode,
    encode,
    frame_header,
    parse_header,
)

LIMITS = {"max_frame_pixels": 64 * 64, "max_z": 8}


def _frame(image: np.ndarray, **changes) -> list:
    header = frame_header("acq-1", 3, image, Axes(time=2, z=0), 0.065, 12.5)
    data = json.loads(encode(header)[0]) | changes
    return [json.dumps(data).encode(), memoryview(np.ascontiguousarray(image)).cast("B")]


def test_a_frame_round_trips_without_copying_its_pixels():
    image = np.arange(48 * 32, dtype=np.uint16).reshape(48, 32)
    frames = encode(frame_header("acq-1", 3, image, Axes(time=2), 0.065), image)
    header, pixels = decode(frames, **LIMITS)
    assert header.kind is Kind.FRAME
    assert header.frame_id == 3
    assert header.axes.time == 2
    assert np.array_equal(pixels, image)
    assert np.shares_memory(pixels, np.frombuffer(frames[1], np.uint16))


def test_control_and_start_messages_decode():
    plan = Plan(mode="3d", z_count=11, z_step_um=0.2, pixel_size_um=0.0925)
    start = Header(
        version=PROTOCOL_VERSION, kind=Kind.ACQUISITION_START, acquisition_id="a", plan=plan
    )
    header, pixels = decode(encode(start), **LIMITS)
    assert header.plan == plan
    assert pixels is None
    status = Header(version=PROTOCOL_VERSION, kind=Kind.STATUS)
    assert decode(encode(status), **LIMITS)[0].kind is Kind.STATUS


F32 = np.ones((16, 16), np.float32)
U16 = np.ones((16, 16), np.uint16)


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"{not json"], ErrorCode.BAD_JSON),
        ([b"\xff\xfe"], ErrorCode.BAD_JSON),
        ([b"[1, 2]"], ErrorCode.BAD_JSON),
        ([], ErrorCode.BAD_JSON),
        (_frame(U16, version=99), ErrorCode.UNSUPPORTED_VERSION),
        (_frame(U16, kind="teleport"), ErrorCode.UNKNOWN_KIND),
        (_frame(U16, kind=["frame"]), ErrorCode.UNKNOWN_KIND),
        (_frame(U16, kind={"frame": 1}), ErrorCode.UNKNOWN_KIND),
        (_frame(U16, version=True), ErrorCode.UNSUPPORTED_VERSION),
        (_frame(U16, version=[1]), ErrorCode.UNSUPPORTED_VERSION),
        (_frame(U16, request={"x": "y" * 70_000}), ErrorCode.TOO_LARGE),
        (
            [b'{"version": 1, "kind": "status", "request": ' + b"[" * 40 + b"]" * 40 + b"}"],
            ErrorCode.BAD_JSON,
        ),
        ([b'{"version": 1, "kind": "status", "x": 1' + b"0" * 5000 + b"}"], ErrorCode.BAD_JSON),
        (_frame(U16, dtype="float64"), ErrorCode.BAD_DTYPE),
        (_frame(U16, frame_id=-1), ErrorCode.BAD_HEADER),
        (_frame(U16, surprise=1), ErrorCode.BAD_HEADER),
        (_frame(U16, acquisition_id=None), ErrorCode.BAD_HEADER),
        (_frame(U16, shape=[16]), ErrorCode.BAD_HEADER),
        (_frame(U16, shape=[16, 0]), ErrorCode.BAD_HEADER),
        (_frame(U16)[:1], ErrorCode.MISSING_PAYLOAD),
        ([*_frame(U16), b"more"], ErrorCode.UNEXPECTED_PAYLOAD),
        (_frame(U16, shape=[16, 15]), ErrorCode.PAYLOAD_LENGTH),
        (_frame(U16, dtype="uint8"), ErrorCode.PAYLOAD_LENGTH),
        (_frame(np.ones((128, 128), np.uint16)), ErrorCode.TOO_LARGE),
        (_frame(np.ones((9, 8, 8), np.uint16)), ErrorCode.TOO_LARGE),
        (_frame(np.where(np.eye(16) > 0, np.nan, F32).astype(np.float32)), ErrorCode.NON_FINITE),
        (_frame(np.full((16, 16), np.inf, np.float32)), ErrorCode.NON_FINITE),
        (
            [encode(Header(version=PROTOCOL_VERSION, kind=Kind.STATUS))[0], b"pixels"],
            ErrorCode.UNEXPECTED_PAYLOAD,
        ),
        (
            [
                json.dumps(
                    {"version": 1, "kind": "acquisition_start", "acquisition_id": "a"}
                ).encode()
            ],
            ErrorCode.BAD_HEADER,
        ),
    ],
)
def test_every_bad_input_class_has_its_error_code(frames, code):
    with pytest.raises(ProtocolError) as caught:
        decode(frames, **LIMITS)
    assert caught.value.code is code
    assert len(caught.value.message) > 10  # a sentence, not just a code
    reply = Reply.error(caught.value, frame_id=3)
    assert json.loads(reply.to_bytes())["code"] == code.value


def test_shared_memory_frames_take_their_pixels_from_the_slot():
    image = np.arange(256, dtype=np.uint16).reshape(16, 16)
    header = frame_header("acq-1", 0, image, Axes()).model_copy(
        update={"shm": SharedMemorySlot(segment="seg", offset=0, length=image.nbytes)}
    )
    frames = encode(header)
    _, pixels = decode(frames, **LIMITS, shared_payload=memoryview(image).cast("B"))
    assert np.array_equal(pixels, image)
    with pytest.raises(ProtocolError, match="not open"):
        decode(frames, **LIMITS)
    with pytest.raises(ProtocolError, match="both inline and in shared memory"):
        decode([*frames, b"x"], **LIMITS, shared_payload=memoryview(image).cast("B"))


def test_a_3d_plan_needs_its_depth():
    with pytest.raises(ValueError, match="z_count and z_step_um"):
        Plan(mode="3d", pixel_size_um=0.1)


def test_brackets_inside_strings_do_not_count_as_nesting():
    raw = json.dumps({"version": 1, "kind": "status", "request": {"x": "[{" * 100 + '\\"'}})
    header = parse_header(raw.encode())
    assert header.request["x"].startswith("[{")
