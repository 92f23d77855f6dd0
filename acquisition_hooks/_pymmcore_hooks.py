"""pymmcore-plus integration: a handler with pymmcore-plus's signal names.

    handler = LivedeconHandler(address="tcp://127.0.0.1:5555")
    core.mda.run(sequence, output=["raw.ome.zarr", handler])   # on pymmcore-plus's relay thread
    # or, for every later core.mda.run(...):
    hooks = attach_livedecon(core)                             # connected to core.mda.events
    ...
    hooks.detach()

`sequenceStarted` sends the plan, `frameReady` each frame (the image itself is untouched:
pymmcore-plus's own sinks save it raw as usual), a timepoint is done when all its images
arrived, `sequenceFinished` ends the acquisition. The plan comes from the sequence (axes, z
plan, channels, interval), its summary metadata (SummaryMetaV1: the pixel size of the
camera's image) and options in `sequence.metadata["livedecon"]` (`SequenceOptions`: mode,
model, acquisition id, output directory, save, output dtype, SIM), which override the
handler's own. A SIM sequence (`sim`) has one channel per pattern, presets of the setup's SIM
config group in the order of the pattern sequence; each group of them becomes one SR image.
Frame times come from the camera's metadata, else from FrameMetaV1's `runner_time_ms`.

As with pycromanager, a missing, slow or frozen daemon never holds the acquisition: each call
only hands its item to `DaemonStream`'s bounded queue, whichever thread calls it (the MDA
thread when attached, the relay thread as an `output`). `end_wait_s` (None by default) makes
sequenceFinished wait until the daemon has written everything (after the last frame, so it
holds no frame).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError

from livedecon.acquisition_hooks._pycromanager_hooks import (
    CAMERA_TIME_KEYS,
    camera_time,
    new_acquisition_id,
)
from livedecon.acquisition_hooks._stream import DaemonStream, ended_state
from livedecon.daemon._protocol import Axes, OutputDtype, Plan, SimPlan
from livedecon.engines._configfile import StrictModel

log = logging.getLogger(__name__)
METADATA_KEY = "livedecon"  # the sequence.metadata entry a user fills with SequenceOptions
Mode = Literal["auto", "2d", "3d"]


class SequenceOptions(StrictModel):
    """Per-sequence options, from `MDASequence(metadata={"livedecon": {...}})`."""

    mode: Mode | None = Field(None, description="2d frames or 3d stacks; None: the handler's")
    model: str | None = Field(None, description="bundle to use; None: the handler's/daemon's")
    isotropic: str | None = Field(
        None, description="3d: a Self-Net bundle to chain after the model; None: the handler's"
    )
    acquisition_id: str | None = Field(None, min_length=1, max_length=128)
    output_dir: str | None = Field(None, description="relative to the daemon's output root")
    save: bool | None = Field(None, description="False: display only")
    output_dtype: OutputDtype | None = Field(
        None, description="uint16: half the disk of float32, the scale in each plane's record"
    )
    sim: SimPlan | None = Field(
        None,
        description="a SIM acquisition: the sequence's channels are its patterns (presets of"
        " the SIM config group, angle by angle); None: the handler's",
    )


def sequence_options(sequence: Any) -> SequenceOptions:
    """The sequence's livedecon options; a bad entry is an error naming the field."""
    raw = (getattr(sequence, "metadata", None) or {}).get(METADATA_KEY, {})
    try:
        return SequenceOptions.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"sequence.metadata[{METADATA_KEY!r}] is not valid: {exc}") from exc


def summary_pixel_size_um(summary: Mapping[str, Any] | None) -> float | None:
    """The camera image's pixel size from SummaryMetaV1 (None when it does not say)."""
    for info in (summary or {}).get("image_infos", ()):
        size = info.get("pixel_size_um")
        if size:
            return float(size)
    return None


def plan_from_sequence(
    sequence: Any,
    pixel_size_um: float,
    mode: Literal["auto", "2d", "3d"] = "auto",
    model: str | None = None,
    sim: SimPlan | None = None,
) -> tuple[Plan, dict[int, int]]:
    """The plan of a useq `MDASequence`, and how many images each timepoint has. With
    `sim`, its channels are the patterns of a SIM sequence, one frame each."""
    sizes = {axis: n for axis, n in sequence.sizes.items() if n}
    per_image = math.prod(n for axis, n in sizes.items() if axis != "t")
    per_timepoint = dict.fromkeys(range(sizes.get("t", 1)), per_image)
    interval = getattr(sequence.time_plan, "interval", None)
    interval_s = interval.total_seconds() if interval is not None else None
    if sim is not None:
        if len(sequence.channels) != sim.frames or sequence.z_plan:
            raise ValueError(
                f"a SIM sequence has {sim.frames} channels, one per pattern ({sim.angles} angles"
                f" x {sim.phases} phases), and no z plan; this one has"
                f" {len(sequence.channels)} channels"
            )
        plan = Plan(
            mode="sim",
            sim=sim,
            pixel_size_um=pixel_size_um,
            time_interval_s=interval_s,
            model=model,
        )
        return plan, per_timepoint
    z_positions = list(sequence.z_plan) if sequence.z_plan else []
    z_count = max(len(z_positions), 1)
    chosen = ("3d" if z_count > 1 else "2d") if mode == "auto" else mode
    z_step = float(np.median(np.diff(sorted(z_positions)))) if z_count > 1 else None
    plan = Plan(
        mode=chosen,
        z_count=z_count if z_count > 1 or chosen == "3d" else None,
        channels=[channel.config for channel in sequence.channels] or ["default"],
        pixel_size_um=pixel_size_um,
        z_step_um=z_step,
        time_interval_s=interval_s,
        model=model,
    )
    return plan, per_timepoint


def axes_from_event(event: Any, sim: bool = False) -> Axes:
    """A useq event's axes; `sim`: its channel index is the frame's place in the pattern
    sequence (sent as z), all frames the plan's one channel (0)."""
    index = event.index
    channel = event.channel.config if event.channel is not None else index.get("c", 0)
    if sim:
        channel = 0
    return Axes(
        time=int(index.get("t", 0)),
        z=int(index.get("c" if sim else "z", 0)),
        channel=channel,
        position=event.pos_name or int(index.get("p", 0)),
    )


class LivedeconHandler:
    """A pymmcore-plus output handler streaming each sequence to the daemon.

    Usable as `core.mda.run(sequence, output=[..., handler])`, through
    `mda_listeners_connected(handler)`, or connected to a core's signals (`attach`). `core` is
    needed only where the summary metadata carries no pixel size.
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        core: Any = None,
        mode: Mode = "auto",
        model: str | None = None,
        acquisition_id: str | None = None,
        timeout_s: float = 1.0,
        retry_s: float = 2.0,
        end_wait_s: float | None = None,
        isotropic: str | None = None,
        sim: SimPlan | None = None,
        **stream_options: Any,
    ) -> None:
        self.core, self.address, self.mode, self.model = core, address, mode, model
        self.isotropic = isotropic  # a Self-Net bundle chained after a 3D model
        self.sim = sim  # sequences are SIM acquisitions (their channels: the patterns)
        self.acquisition_id = acquisition_id
        self.end_wait_s = end_wait_s
        self._options = {"timeout_s": timeout_s, "retry_s": retry_s, **stream_options}
        self.stream: DaemonStream | None = None
        self._final_state: dict[str, Any] = {}
        self._started_at = time.time()

    @property
    def final_state(self) -> dict[str, Any]:
        """The daemon's state of the acquisition once the stream ended it ({} until then, or
        when the daemon was unreachable); `end_wait_s` makes the end wait until it is written."""
        return ended_state(self._final_state, self.stream)

    def attach(self, core: Any = None) -> LivedeconHandler:
        """Connect to `core.mda.events` (the handler's own core by default)."""
        self.core = core or self.core
        events = self.core.mda.events
        events.sequenceStarted.connect(self.sequenceStarted)
        events.frameReady.connect(self.frameReady)
        events.sequenceFinished.connect(self.sequenceFinished)
        return self

    def detach(self) -> None:
        events = self.core.mda.events
        events.sequenceStarted.disconnect(self.sequenceStarted)
        events.frameReady.disconnect(self.frameReady)
        events.sequenceFinished.disconnect(self.sequenceFinished)

    def plan(
        self,
        sequence: Any,
        summary: Mapping[str, Any] | None = None,
        options: SequenceOptions | None = None,
    ) -> tuple[Plan, dict[int, int]]:
        """The plan of `sequence` with its options, and the images per timepoint."""
        options = options or sequence_options(sequence)
        pixel_size = summary_pixel_size_um(summary)
        if pixel_size is None and self.core is not None:
            pixel_size = float(self.core.getPixelSizeUm())
        if not pixel_size:
            raise ValueError(
                "no pixel size: the summary metadata has none and no core was given (set a"
                " pixel size configuration in Micro-Manager)"
            )
        plan, per_timepoint = plan_from_sequence(
            sequence,
            pixel_size,
            options.mode or self.mode,
            options.model or self.model,
            options.sim or self.sim,
        )
        updates = {
            "output_dir": options.output_dir,
            "save": options.save,
            "output_dtype": options.output_dtype,
            "isotropic": options.isotropic or self.isotropic,
        }
        plan = plan.model_copy(update={k: v for k, v in updates.items() if v is not None})
        return plan, per_timepoint

    def sequenceStarted(self, sequence: Any, metadata: Mapping[str, Any] | None = None) -> None:  # noqa: N802
        self._started_at = time.time()
        try:
            options = sequence_options(sequence)
            plan, per_timepoint = self.plan(sequence, metadata, options)
            chosen = options.acquisition_id or self.acquisition_id
            self.stream = DaemonStream(
                chosen or new_acquisition_id("mda"),
                plan,
                self.address,
                images_per_timepoint=per_timepoint,
                **self._options,
            )
            self.stream.start()
        except Exception:
            self.stream = None
            log.exception("livedecon could not start streaming this sequence")

    def frameReady(  # noqa: N802
        self, image: np.ndarray, event: Any, metadata: Mapping[str, Any] | None = None
    ) -> None:
        if self.stream is None:
            return
        try:
            axes = axes_from_event(event, self.stream.plan.mode == "sim")
            self.stream.frame(image, axes, self._frame_time(metadata or {}))
        except Exception:
            log.exception("livedecon hook failed on a frame; the frame passes through")

    def sequenceFinished(self, sequence: Any) -> None:  # noqa: N802
        if self.stream is None:
            return
        try:
            self._final_state = self.stream.end(self.end_wait_s)
        except Exception:
            log.exception("livedecon hook failed to end the acquisition")

    def _frame_time(self, metadata: Mapping[str, Any]) -> float:
        camera = {**metadata.get("camera_metadata", {}), **metadata}
        if "runner_time_ms" in metadata and not any(k in camera for k in CAMERA_TIME_KEYS):
            return self._started_at + float(metadata["runner_time_ms"]) / 1000.0
        return camera_time(camera)


def attach_livedecon(core: Any, **options: Any) -> LivedeconHandler:
    """Stream every `core.mda.run(...)` to the daemon from now on (see `LivedeconHandler`)."""
    return LivedeconHandler(core=core, **options).attach()
