"""The live viewer: napari layers showing the daemon's raw and restored streams.

`LivedeconWidget` is a dock widget for any napari viewer (also one that napari-micromanager
drives):

    viewer.window.add_dock_widget(LivedeconWidget(viewer), name="livedecon")

A `DisplayStream` thread drains the daemon's publications and keeps the newest of each stream;
a Qt timer (at most `max_hz`) takes the newest and updates each layer's data in place, so the
display is decimated on the viewer's side and never slows the daemon. Each layer is created
once; its contrast limits are set from the first frame of an acquisition and stay fixed (the
"Auto-contrast" button sets them again, once) so a time-lapse does not flicker. Scales come
from the publications' pixel sizes (see `layer_geometry`): restored pixels are half the raw
ones and the two overlay exactly. A status panel shows the daemon, acquisition, model, weights
version, adaptation state, camera-to-screen latency and frame rates.

`livedecon view` opens a napari window with this widget docked. Needs the `viewer` extra.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from livedecon.acquisition_hooks._display_stream import (
    DEFAULT_TOPICS,
    VIEWER_EXTRA_HINT,
    DaemonState,
    DisplayFrame,
    DisplayStream,
    StatusPoller,
    layer_geometry,
    robust_limits,
    status_lines,
)
from livedecon.daemon._protocol import Publication, Topic

try:
    import napari
    from qtpy.QtCore import Qt, QTimer
    from qtpy.QtWidgets import (
        QCheckBox,
        QFormLayout,
        QGroupBox,
        QLabel,
        QPushButton,
        QVBoxLayout,
        QWidget,
    )
except ImportError as exc:  # the core package works without the viewer extra
    raise ImportError(f"{VIEWER_EXTRA_HINT} ({exc})") from exc

DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"  # the shipped configs/daemon.toml
DEFAULT_CONTROL = "tcp://127.0.0.1:5555"
TOPIC_ORDER = {
    Topic.RAW: 0,
    Topic.RESTORED: 1,
    Topic.MIP: 2,
    Topic.MIP_XZ: 3,
    Topic.MIP_YZ: 4,
    Topic.VOLUME: 5,
}
LAYER_NAMES = {
    Topic.RAW: "raw",
    Topic.RESTORED: "restored",
    Topic.MIP: "restored MIP",
    Topic.MIP_XZ: "restored MIP xz",
    Topic.MIP_YZ: "restored MIP yz",
    Topic.VOLUME: "restored volume",
}
OVERLAY_COLORMAPS = {Topic.RAW: "green"}  # overlaid: raw green, restored magenta
STATUS_ROWS = ("daemon", "acquisition", "model", "adaptation", "latency", "frames/s")


def layer_name(publication: Publication) -> str:
    """One layer per topic and channel; positions share it (the newest is shown)."""
    base = LAYER_NAMES[publication.topic]
    channel = publication.axes.channel
    return base if channel in (0, "default", "") else f"{base} [{channel}]"


class LivedeconWidget(QWidget):
    """Live raw and restored layers in `viewer`, fed by a daemon's publish endpoint."""

    def __init__(
        self,
        viewer: napari.viewer.Viewer,
        publish: str = DEFAULT_PUBLISH,
        control: str | None = DEFAULT_CONTROL,
        max_hz: float = 60.0,
        volume: bool = False,
        secure: Callable[[zmq.Socket[bytes]], None] | None = None,
        parent: QWidget | None = None,
    ) -> None:
        """`publish`/`control`: the daemon's endpoints (control None: no status polling);
        `volume`: also receive whole restored volumes for slice browsing (3D)."""
        super().__init__(parent)
        if max_hz <= 0:
            raise ValueError("max_hz must be > 0")
        self.viewer = viewer
        self.max_hz = max_hz
        topics = set(DEFAULT_TOPICS) | ({Topic.VOLUME} if volume else set())
        self.stream = DisplayStream(publish, topics, secure=secure)
        self.poller = StatusPoller(control, secure=secure) if control else None
        self._layers: dict[str, napari.layers.Image] = {}
        self._contrast_for: dict[str, str] = {}  # layer -> acquisition its limits came from
        self._acquisition: str | None = None
        # wall clock (as the camera's timestamps) of the refreshes that showed new frames
        self.display_times: deque[float] = deque(maxlen=4096)
        self._build(volume)
        self.stream.start()
        if self.poller:
            self.poller.start()
        # Decimation: the GUI renders on this timer only, whatever the publication rate.
        self._timer = QTimer(self)
        self._timer.setTimerType(Qt.TimerType.PreciseTimer)
        self._timer.setInterval(max(1, math.ceil(1000 / max_hz)))
        self._timer.timeout.connect(self.refresh)
        self._timer.start()
        self._status_timer = QTimer(self)
        self._status_timer.setInterval(500)
        self._status_timer.timeout.connect(self.update_status)
        self._status_timer.start()
        stream, poller = self.stream, self.poller
        # Not a method of self: by the time `destroyed` fires the Python wrapper is gone.
        self.destroyed.connect(lambda *_: _stop(stream, poller))

    # -- widgets -----------------------------------------------------------------------------

    def _build(self, volume: bool) -> None:
        layout = QVBoxLayout(self)
        self.auto_contrast_button = QPushButton("Auto-contrast")
        self.auto_contrast_button.setToolTip("Set each layer's contrast from its current frame")
        self.auto_contrast_button.clicked.connect(self.auto_contrast)
        layout.addWidget(self.auto_contrast_button)

        def checkbox(
            text: str, checked: bool, on_toggle: Callable[[], None], tip: str = ""
        ) -> QCheckBox:
            box = QCheckBox(text)
            box.setChecked(checked)
            box.setToolTip(tip)
            box.toggled.connect(on_toggle)
            layout.addWidget(box)
            return box

        self.side_by_side = checkbox("Side by side (else overlaid)", True, self._arrange)
        self.raw_box = checkbox(
            "Raw frames",
            True,
            self._topics_changed,
            "The daemon publishes raw frames only while a viewer asks",
        )
        self.volume_box = checkbox(
            "Whole volumes (3D slice browsing)", volume, self._topics_changed
        )
        group = QGroupBox("status")
        form = QFormLayout(group)
        self.status_labels: dict[str, QLabel] = {}
        for row in STATUS_ROWS:
            label = QLabel("-")
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            form.addRow(f"{row}:", label)
            self.status_labels[row] = label
        layout.addWidget(group)
        layout.addStretch(1)

    def _topics_changed(self) -> None:
        topics = set(DEFAULT_TOPICS)
        if not self.raw_box.isChecked():
            topics.discard(Topic.RAW)
        if self.volume_box.isChecked():
            topics.add(Topic.VOLUME)
        self.stream.set_topics(topics)

    # -- frames ------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Show the newest frame of every stream that has a new one; returns layers updated."""
        fresh = self.stream.take()
        if not fresh:
            return 0
        newest: dict[str, DisplayFrame] = {}
        for frame in sorted(fresh.values(), key=lambda f: f.received_s):
            newest[layer_name(frame.publication)] = frame  # positions: the newest wins
        ordered = sorted(newest.items(), key=lambda item: TOPIC_ORDER[item[1].key[0]])
        for name, frame in ordered:
            self._show(name, frame)
        self.display_times.append(time.time())
        return len(ordered)

    def _show(self, name: str, frame: DisplayFrame) -> None:
        publication, pixels = frame.publication, frame.pixels
        scale, translate = layer_geometry(publication)
        metadata = {
            "acquisition_id": publication.acquisition_id,
            "frame_id": publication.frame_id,
            "axes": publication.axes.model_dump(),
            "bundle_id": publication.bundle_id,
            "weights_version": publication.weights_version,
            "units": publication.units,
            "pixel_size_um": publication.pixel_size_um,
            "z_step_um": publication.z_step_um,
            "timestamp_s": publication.timestamp_s,
            "published_s": publication.published_s,
            "topic": publication.topic.value,
        }
        new_acquisition = publication.acquisition_id != self._acquisition
        self._acquisition = publication.acquisition_id
        layer = self._layers.get(name)
        if layer is not None and (layer not in self.viewer.layers or layer.ndim != pixels.ndim):
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            layer = self.viewer.add_image(
                pixels,
                name=name,
                scale=scale,
                translate=translate,
                contrast_limits=robust_limits(pixels),
                metadata=metadata,
                units=("um" if publication.pixel_size_um else "pixel",) * pixels.ndim,
            )
            self._layers[name] = layer
            self._contrast_for[name] = publication.acquisition_id
            self._arrange()
            if publication.pixel_size_um:
                scale_bar_of(self.viewer).visible = True  # in the layers' units, µm
            if pixels.ndim == 3:  # start slice browsing in the middle of the volume
                self.viewer.dims.set_point(0, (pixels.shape[0] - 1) / 2 * scale[0])
            self.viewer.reset_view()
            return
        layer.data = pixels
        if tuple(layer.scale) != scale:
            layer.scale = scale
        if tuple(layer.translate) != translate:
            layer.translate = translate
        layer.metadata = metadata
        if self._contrast_for.get(name) != publication.acquisition_id:
            # a new acquisition (sample, exposure, model): new fixed limits, once
            layer.contrast_limits = robust_limits(pixels)
            self._contrast_for[name] = publication.acquisition_id
        if new_acquisition:
            self.viewer.reset_view()

    def layers(self) -> dict[str, napari.layers.Image]:
        """The layers this widget feeds, by name."""
        return {n: layer for n, layer in self._layers.items() if layer in self.viewer.layers}

    def auto_contrast(self) -> None:
        """Contrast limits of every layer from its current data, once (they stay fixed)."""
        for layer in self.layers().values():
            layer.contrast_limits = robust_limits(layer.data)

    def _arrange(self) -> None:
        """Side by side (napari grid, one cell per layer) or overlaid (raw green and restored
        magenta, added)."""
        side_by_side = self.side_by_side.isChecked()
        grid_of(self.viewer).enabled = side_by_side and len(self.layers()) > 1
        for layer in self.layers().values():
            topic = Topic(layer.metadata.get("topic", Topic.RESTORED.value))
            if side_by_side:
                layer.colormap, layer.blending = "gray", "translucent"
            else:
                layer.colormap = OVERLAY_COLORMAPS.get(topic, "magenta")
                layer.blending = "additive"

    # -- status ------------------------------------------------------------------------------

    def update_status(self) -> dict[str, str]:
        """Set the panel's rows from the stream and the latest daemon answer."""
        state = self.poller.state if self.poller else DaemonState(False, 1.0, "no control endpoint")
        lines = status_lines(self.stream, state)
        for row, text in lines.items():
            self.status_labels[row].setText(text)
        self.status_labels["daemon"].setToolTip(state.error)
        if self.stream.error is not None:
            self.status_labels["daemon"].setText(f"display stream failed: {self.stream.error}")
        return lines

    def shutdown(self) -> None:
        """Stop the timers and the background threads (also done when the widget is deleted)."""
        with contextlib.suppress(RuntimeError):  # Qt already deleted them with the window
            self._timer.stop()
            self._status_timer.stop()
        _stop(self.stream, self.poller)


def grid_of(viewer: napari.components.ViewerModel) -> napari.components.grid.GridCanvas:
    """The viewer's grid settings (`viewer.canvas.grid` since napari 0.9, `viewer.grid` before)."""
    canvas = getattr(viewer, "canvas", None)
    if canvas is not None and hasattr(canvas, "grid"):
        return canvas.grid
    return viewer.grid


def scale_bar_of(viewer: napari.components.ViewerModel) -> Any:
    """The scale bar overlay (`viewer.canvas.overlays` since napari 0.9, `viewer.scale_bar`)."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    if overlays is not None and hasattr(overlays, "scale_bar"):
        return overlays.scale_bar
    return viewer.scale_bar


def _stop(stream: DisplayStream, poller: StatusPoller | None) -> None:
    stream.stop()
    if poller is not None:
        poller.stop()


def open_viewer(
    publish: str = DEFAULT_PUBLISH,
    control: str | None = DEFAULT_CONTROL,
    max_hz: float = 60.0,
    volume: bool = False,
    secure: Callable[[zmq.Socket[bytes]], None] | None = None,
    title: str = "livedecon live view",
) -> tuple[napari.Viewer, LivedeconWidget]:
    """A napari window with the widget docked (the caller runs the Qt event loop)."""
    viewer = napari.Viewer(title=title)
    widget = LivedeconWidget(viewer, publish, control, max_hz, volume, secure)
    viewer.window.add_dock_widget(widget, name="livedecon", area="right")
    return viewer, widget


def run_viewer(
    publish: str = DEFAULT_PUBLISH,
    control: str | None = DEFAULT_CONTROL,
    max_hz: float = 60.0,
    volume: bool = False,
    secure: Callable[[zmq.Socket[bytes]], None] | None = None,
) -> None:
    """`livedecon view`: the window, until the user closes it."""
    _, widget = open_viewer(publish, control, max_hz, volume, secure)
    try:
        napari.run()
    finally:
        widget.shutdown()
