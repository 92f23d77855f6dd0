"""pycromanager integration: one call gives what `Acquisition(...)` needs.

    hooks = livedecon_hooks(core, events)
    with Acquisition(directory, name, show_display=False, **hooks.acquisition_kwargs) as acq:
        acq.acquire(events)
    hooks.finish()            # also happens by itself when the data sink finishes

Two ways to see the frames (`source`):

- "processor" (default): an image processor hands every frame to the daemon and returns the
  image and metadata unchanged (same object, dtype and shape), so Micro-Manager saves the raw
  data as usual. With the Java backend every frame crosses the Java-Python bridge, which
  carries about 100 MB/s (some 25 full 2048 x 2048 16-bit frames a second): fine for most
  runs, a limit for fast cameras.
- "saved": `image_saved_fn` reads each frame back from the NDTiff dataset once it is on disk,
  on pycromanager's storage-monitor thread. No pixels cross the bridge, and the acquisition
  never waits on livedecon; a frame reaches the daemon a few milliseconds later. Needs a
  saving acquisition (a directory and a name).
 The plan (z count, channels, pixel size, z step,
interval) comes from the core and the events; a timepoint is done when all its events' images
were seen (or a later timepoint began); the acquisition ends when pycromanager's data sink
finishes. A missing or slow daemon never stops the acquisition (see `DaemonStream`): no call
on the acquisition thread waits on it. `end_wait_s` (None by default) makes `finish` wait until
the daemon has written everything, which holds the thread that finishes, not the frames.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from livedecon.acquisition_hooks._stream import DaemonStream, ended_state
from livedecon.daemon._protocol import Axes, Plan, SimPlan

log = logging.getLogger(__name__)

# Where the camera's wall-clock time of a frame may be found (the simulated camera's key first).
CAMERA_TIME_KEYS = ("LivedeconCameraTime-s",)
DATA_SINK_FINISHED = "data_sink_finished"
IMAGE_SAVED = "image_saved"
FrameSource = Literal["processor", "saved"]
SIM_AXIS = "sim"  # a SIM frame's index in its pattern sequence


def new_acquisition_id(prefix: str = "acq") -> str:
    """A fresh acquisition id: the prefix, the local time and a random suffix."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def axes_from(values: Mapping[str, Any]) -> Axes:
    """pycromanager's axes ({'time': 0, 'z': 3, 'channel': 'GFP', ...}) as protocol axes; a
    SIM frame's index in its pattern sequence (axis SIM_AXIS) travels as its z."""
    return Axes(
        time=int(values.get("time", 0)),
        z=int(values.get(SIM_AXIS, values.get("z", 0))),
        channel=values.get("channel", 0),
        position=values.get("position", 0),
    )


def camera_time(metadata: Mapping[str, Any]) -> float:
    """When the camera took a frame, from its metadata; when the hook saw it if none is recorded."""
    for key in CAMERA_TIME_KEYS:
        if key in metadata:
            return float(metadata[key])
    return time.time()  # when the hook saw it: the closest the metadata allows


def _spacing(values: Iterable[float]) -> float | None:
    ordered = sorted(set(values))
    steps = np.diff(ordered)
    return float(np.median(steps)) if len(steps) else None


def sim_events(
    num_time_points: int,
    presets: Sequence[str],
    time_interval_s: float = 0.0,
    group: str = "SIM",
) -> list[Mapping[str, Any]]:
    """pycromanager events of a SIM time-lapse: at each time point, one frame per pattern,
    each set by its preset of the config group `group` (`presets` in the order of the pattern
    sequence, angle by angle as the plan's SimPlan says), on the axis SIM_AXIS.

    Presets, not bare property values: pycromanager merges events that change only other
    properties into one camera burst (it does not check those for sequencing), so the pattern
    would not change between frames; a preset change it checks, and a pattern device that
    cannot sequence gets each frame on its own."""
    if not presets:
        raise ValueError("a SIM sequence needs its patterns' presets")
    return [
        {
            "axes": {"time": t, SIM_AXIS: i},
            "min_start_time": t * time_interval_s,
            "config_group": [group, preset],
        }
        for t in range(num_time_points)
        for i, preset in enumerate(presets)
    ]


def plan_from_events(
    events: list[Mapping[str, Any]],
    pixel_size_um: float,
    mode: Literal["auto", "2d", "3d"] = "auto",
    model: str | None = None,
    sim: SimPlan | None = None,
) -> tuple[Plan, dict[int, int]]:
    """The plan of an acquisition of `events`, and how many images each timepoint has.
    Events on the SIM_AXIS make a SIM acquisition, whose optics and camera `sim` gives."""
    axes = [event.get("axes", {}) for event in events]
    z_indices = {a["z"] for a in axes if "z" in a}
    channels = list(dict.fromkeys(str(a["channel"]) for a in axes if "channel" in a))
    z_step = _spacing(event["z"] for event in events if "z" in event)
    interval = _spacing(e["min_start_time"] for e in events if "min_start_time" in e)
    per_timepoint = Counter(int(a.get("time", 0)) for a in axes)
    if any(SIM_AXIS in a for a in axes) or sim is not None:
        if sim is None or z_indices:
            raise ValueError(
                f"events on the {SIM_AXIS!r} axis are a 2D SIM acquisition: pass sim=SimPlan(...)"
                " (its optics and camera), and no z axis"
            )
        plan = Plan(
            mode="sim",
            sim=sim,
            channels=channels or ["default"],
            pixel_size_um=pixel_size_um,
            time_interval_s=interval,
            model=model,
        )
        return plan, dict(per_timepoint)
    z_count = max(len(z_indices), 1)
    chosen = ("3d" if z_count > 1 else "2d") if mode == "auto" else mode
    plan = Plan(
        mode=chosen,
        z_count=z_count if chosen == "3d" or z_count > 1 else None,
        channels=channels or ["default"],
        pixel_size_um=pixel_size_um,
        z_step_um=z_step if z_step else None,
        time_interval_s=interval,
        model=model,
    )
    return plan, dict(per_timepoint)


class PycromanagerHooks:
    """The hook functions of one pycromanager Acquisition (build them with
    `livedecon_hooks`): each camera frame, or each frame saved to NDTiff, goes to the daemon."""

    def __init__(
        self,
        stream: DaemonStream,
        end_wait_s: float | None = None,
        source: FrameSource = "processor",
        drain_timeout_s: float = 30.0,
    ) -> None:
        if source not in ("processor", "saved"):
            raise ValueError(f"source must be 'processor' or 'saved', got {source!r}")
        self.stream, self.end_wait_s, self.source = stream, end_wait_s, source
        self.drain_timeout_s = drain_timeout_s
        self._started = self._finished = False
        self._final_state: dict[str, Any] = {}
        # "saved": images announced saved vs read back; the end waits until they agree
        self._saved = threading.Condition()
        self._announced = self._read_back = 0

    @property
    def final_state(self) -> dict[str, Any]:
        """The daemon's state of the acquisition once the stream ended it ({} until then, or
        when the daemon was unreachable); `end_wait_s` makes the end wait until it is written."""
        return ended_state(self._final_state, self.stream)

    @property
    def acquisition_kwargs(self) -> dict[str, Any]:
        if self.source == "saved":
            return {"image_saved_fn": self.saved, "notification_callback_fn": self.notify}
        return {"image_process_fn": self.process, "notification_callback_fn": self.notify}

    def process(
        self, image: np.ndarray, metadata: dict[str, Any]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        try:
            if not self._started:
                self._start()
            self.stream.frame(image, axes_from(metadata.get("Axes", {})), camera_time(metadata))
        except Exception:  # whatever happens here, the acquisition keeps its image
            log.exception("livedecon hook failed on a frame; the frame passes through")
        return image, metadata

    def saved(self, axes: dict[str, Any], dataset: Any) -> None:
        """pycromanager's `image_saved_fn`: the frame at `axes`, read back from the dataset."""
        try:
            image = dataset.read_image(**axes)
            metadata = dataset.read_metadata(**axes)
            self.process(np.asarray(image), {**metadata, "Axes": axes})
        except Exception:
            log.exception("livedecon could not read a saved frame back (%s)", axes)
        finally:
            with self._saved:
                self._read_back += 1
                self._saved.notify_all()

    def notify(self, notification: Any) -> None:
        milestone = getattr(notification, "milestone", None)
        if milestone == IMAGE_SAVED:
            with self._saved:
                self._announced += 1
        elif milestone == DATA_SINK_FINISHED:
            if self.source == "saved":
                self._wait_for_read_back()
            self.finish()

    def _wait_for_read_back(self) -> None:
        """The storage-monitor thread reads frames back on its own: the end waits (bounded)
        until it has read every frame announced as saved, so none arrives after the end."""
        with self._saved:
            done = self._saved.wait_for(
                lambda: self._read_back >= self._announced, self.drain_timeout_s
            )
        if not done:
            log.warning(
                "livedecon: %d of %d saved frames were not read back within %.0f s",
                self._announced - self._read_back,
                self._announced,
                self.drain_timeout_s,
            )

    def _start(self) -> None:
        self._started = True
        self.stream.start()

    def finish(self) -> dict[str, Any]:
        """End the acquisition on the daemon (idempotent)."""
        if self._finished or not self._started:
            self._finished = True
            return self._final_state
        self._finished = True
        try:
            self._final_state = self.stream.end(self.end_wait_s)
        except Exception:
            log.exception("livedecon hook failed to end the acquisition")
        return self._final_state

    def __enter__(self) -> PycromanagerHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def livedecon_hooks(
    core: Any,
    events: list[Mapping[str, Any]],
    acquisition_id: str | None = None,
    address: str = "tcp://127.0.0.1:5555",
    mode: Literal["auto", "2d", "3d"] = "auto",
    model: str | None = None,
    timeout_s: float = 1.0,
    retry_s: float = 2.0,
    end_wait_s: float | None = None,
    source: FrameSource = "processor",
    isotropic: str | None = None,
    sim: SimPlan | None = None,
    **stream_options: Any,
) -> PycromanagerHooks:
    """Hooks for a pycromanager `Acquisition` of `events` on `core` (an MMCore, Java or
    Python), streaming to the daemon at `address`. `mode` 'auto': 3D when the events have
    z-stacks (the daemon then needs a 3D model); '2d' restores every plane on its own.
    `source` "saved" reads frames back from the saved dataset instead of the image processor
    (see the module's docstring). `isotropic`: a Self-Net bundle the daemon chains after the
    3D model, writing isotropic volumes. `sim`: a SIM acquisition (events from `sim_events`):
    the daemon reconstructs every pattern sequence, then restores it with `model` if given (a
    SIM model)."""
    if not isinstance(events, list):
        raise TypeError("pass the events as a list (e.g. from multi_d_acquisition_events)")
    pixel_size = float(
        core.get_pixel_size_um() if hasattr(core, "get_pixel_size_um") else core.getPixelSizeUm()
    )
    if pixel_size <= 0:
        raise ValueError("the core has no pixel size calibration; set one in Micro-Manager")
    plan, per_timepoint = plan_from_events(events, pixel_size, mode, model, sim)
    if isotropic is not None:
        plan = Plan.model_validate(plan.model_dump() | {"isotropic": isotropic})
    stream = DaemonStream(
        acquisition_id or new_acquisition_id(),
        plan,
        address,
        timeout_s=timeout_s,
        retry_s=retry_s,
        images_per_timepoint=per_timepoint,
        **stream_options,
    )
    return PycromanagerHooks(stream, end_wait_s, source)
