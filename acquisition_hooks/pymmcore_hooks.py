"""pymmcore-plus integration: stream `run_mda` acquisitions through the `mda.events` signals.

    hooks = attach_livedecon(core)          # every later core.mda.run(sequence) streams
    core.mda.run(MDASequence(...))
    hooks.detach()

sequenceStarted sends the plan (from the sequence and the core's pixel size), frameReady sends
each frame (the image itself is untouched: pymmcore-plus writers save it raw as usual), a
timepoint is done when all its images arrived, sequenceFinished ends the acquisition. As with
pycromanager, a missing or slow daemon never stops the acquisition: no call on the MDA thread
waits on it. `end_wait_s` (None by default) makes sequenceFinished wait until the daemon has
written everything (after the last frame, so it holds no frame).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from livedecon.acquisition_hooks.pycromanager_hooks import camera_time, new_acquisition_id
from livedecon.acquisition_hooks.stream import DaemonStream, ended_state
from livedecon.daemon.protocol import Axes, Plan

log = logging.getLogger(__name__)


def plan_from_sequence(
    sequence: Any,
    pixel_size_um: float,
    mode: Literal["auto", "2d", "3d"] = "auto",
    model: str | None = None,
) -> tuple[Plan, dict[int, int]]:
    """The plan of a useq `MDASequence`, and how many images each timepoint has."""
    sizes = {axis: n for axis, n in sequence.sizes.items() if n}
    z_positions = list(sequence.z_plan) if sequence.z_plan else []
    z_count = max(len(z_positions), 1)
    chosen = ("3d" if z_count > 1 else "2d") if mode == "auto" else mode
    z_step = float(np.median(np.diff(sorted(z_positions)))) if z_count > 1 else None
    interval = getattr(sequence.time_plan, "interval", None)
    plan = Plan(
        mode=chosen,
        z_count=z_count if z_count > 1 or chosen == "3d" else None,
        channels=[channel.config for channel in sequence.channels] or ["default"],
        pixel_size_um=pixel_size_um,
        z_step_um=z_step,
        time_interval_s=interval.total_seconds() if interval is not None else None,
        model=model,
    )
    per_image = math.prod(n for axis, n in sizes.items() if axis != "t")
    return plan, dict.fromkeys(range(sizes.get("t", 1)), per_image)


def axes_from_event(event: Any) -> Axes:
    index = event.index
    channel = event.channel.config if event.channel is not None else index.get("c", 0)
    return Axes(
        time=int(index.get("t", 0)),
        z=int(index.get("z", 0)),
        channel=channel,
        position=event.pos_name or int(index.get("p", 0)),
    )


class MDAHooks:
    def __init__(
        self,
        core: Any,
        address: str = "tcp://127.0.0.1:5555",
        mode: Literal["auto", "2d", "3d"] = "auto",
        model: str | None = None,
        acquisition_id: str | None = None,
        timeout_s: float = 1.0,
        retry_s: float = 2.0,
        end_wait_s: float | None = None,
        **stream_options: Any,
    ) -> None:
        self.core, self.address, self.mode, self.model = core, address, mode, model
        self.acquisition_id = acquisition_id
        self.end_wait_s = end_wait_s
        self._options = {"timeout_s": timeout_s, "retry_s": retry_s, **stream_options}
        self.stream: DaemonStream | None = None
        self._final_state: dict[str, Any] = {}

    @property
    def final_state(self) -> dict[str, Any]:
        """The daemon's state of the acquisition once the stream ended it ({} until then, or
        when the daemon was unreachable); `end_wait_s` makes the end wait until it is written."""
        return ended_state(self._final_state, self.stream)

    def attach(self) -> MDAHooks:
        events = self.core.mda.events
        events.sequenceStarted.connect(self._started)
        events.frameReady.connect(self._frame)
        events.sequenceFinished.connect(self._finished)
        return self

    def detach(self) -> None:
        events = self.core.mda.events
        events.sequenceStarted.disconnect(self._started)
        events.frameReady.disconnect(self._frame)
        events.sequenceFinished.disconnect(self._finished)

    def _started(self, sequence: Any, metadata: Mapping[str, Any] | None = None) -> None:
        try:
            plan, per_timepoint = plan_from_sequence(
                sequence, float(self.core.getPixelSizeUm()), self.mode, self.model
            )
            self.stream = DaemonStream(
                self.acquisition_id or new_acquisition_id("mda"),
                plan,
                self.address,
                images_per_timepoint=per_timepoint,
                **self._options,
            )
            self.stream.start()
        except Exception:
            log.exception("livedecon could not start streaming this sequence")

    def _frame(self, image: np.ndarray, event: Any, metadata: Mapping[str, Any]) -> None:
        if self.stream is None:
            return
        try:
            timestamp = camera_time({**metadata.get("camera_metadata", {}), **metadata})
            self.stream.frame(image, axes_from_event(event), timestamp)
        except Exception:
            log.exception("livedecon hook failed on a frame; the frame passes through")

    def _finished(self, sequence: Any) -> None:
        if self.stream is None:
            return
        try:
            self._final_state = self.stream.end(self.end_wait_s)
        except Exception:
            log.exception("livedecon hook failed to end the acquisition")


def attach_livedecon(core: Any, **options: Any) -> MDAHooks:
    """Stream every `core.mda.run(...)` to the daemon from now on (see `MDAHooks`)."""
    return MDAHooks(core, **options).attach()
