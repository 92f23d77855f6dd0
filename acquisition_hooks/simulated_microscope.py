"""A simulated microscope built on the real MMCore (pymmcore-plus UniMMCore).

A Python camera renders the forward model of `livedecon.calibration` at the focus stage's
position, the current sample time and the camera's exposure; a Python focus stage moves the
focal plane. The core runs MDA sequences through pymmcore-plus `run_mda`, and, once
`attach_pycromanager()` has been called, pycromanager's Python-backend `Acquisition`.

Every frame carries its sample time and focus position in its metadata (keys SAMPLE_TIME_KEY
and FOCUS_KEY), so the exact ground truth of any frame can be rendered afterwards, and the
wall-clock time it left the camera (CAMERA_TIME_KEY), for end-to-end latency.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import pymmcore
from pymmcore_plus.experimental.unicore import (
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    UniMMCore,
)

from livedecon.calibration.config import MicroscopeConfig, Sample, default_microscope
from livedecon.calibration.forward_model import ForwardModel

SAMPLE_TIME_KEY = "LivedeconSampleTime-s"
FOCUS_KEY = "LivedeconFocus-um"
CAMERA_TIME_KEY = "LivedeconCameraTime-s"  # wall clock when the frame left the camera
CAMERA_LABEL = "SimCamera"
FOCUS_LABEL = "SimZ"
SHUTTER_LABEL = "SimLight"
PIXEL_CONFIG = "SimPixelSize"


class SampleClock:
    """The specimen's time. 'wall': seconds since start, as for a live sample; 'manual': set."""

    def __init__(self, mode: Literal["wall", "manual"] = "wall") -> None:
        self.mode = mode
        self._start = time.monotonic()
        self._manual_s = 0.0

    def now(self) -> float:
        return time.monotonic() - self._start if self.mode == "wall" else self._manual_s

    def set(self, t_s: float) -> None:
        """Fix the sample time (switches the clock to manual)."""
        self.mode = "manual"
        self._manual_s = float(t_s)


class SimulatedFocusStage(StageDevice):
    """A focus drive that moves instantly; its position is the focal plane in um."""

    def __init__(self) -> None:
        super().__init__()
        self._position_um = 0.0

    def set_position_um(self, val: float) -> None:
        self._position_um = float(val)

    def get_position_um(self) -> float:
        return self._position_um

    def home(self) -> None:
        self._position_um = 0.0

    def stop(self) -> None:
        pass

    def set_origin(self) -> None:
        self._position_um = 0.0


class SimulatedShutter(ShutterDevice):
    """The excitation light's shutter: closed, the camera records dark frames."""

    def __init__(self) -> None:
        super().__init__()
        self._open = False

    def get_open(self) -> bool:
        return self._open

    def set_open(self, open: bool) -> None:
        self._open = bool(open)


Specimen = Literal["sample", "beads", "flat"]


class SimulatedCamera(SimpleCameraDevice):
    """A camera whose frames are the forward model at (sample time, focus, exposure).

    What is under the objective can be changed, as a user changes slides for a calibration
    run: the configured sample, a bead slide, or an evenly fluorescent (flat-field) slide.
    """

    def __init__(
        self,
        model: ForwardModel,
        clock: SampleClock,
        focus: SimulatedFocusStage,
        light_on: Callable[[], bool],
    ) -> None:
        super().__init__()
        self._model = model
        self.specimen: Specimen = "sample"
        self.flat_e_per_ms = 10.0  # photoelectrons per pixel and ms of the flat-field slide
        self._light_on = light_on
        self._clock = clock
        self._focus = focus
        self._exposure_ms = 20.0
        self.model_lock = threading.Lock()  # the forward model's caches are not thread-safe
        self.last_metadata: dict[str, float] = {}

    def look_at(self, model: ForwardModel, specimen: Specimen) -> None:
        """Render `model` from the next frame on ("flat": its camera under even light)."""
        with self.model_lock:
            self._model, self.specimen = model, specimen

    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        if exposure <= 0:
            raise ValueError(f"exposure must be positive, got {exposure} ms")
        self._exposure_ms = float(exposure)

    def sensor_shape(self) -> tuple[int, int]:
        return self._model.camera_shape

    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self._model.microscope.camera.bit_depth <= 8 else np.uint16)

    def snap(self, buffer: np.ndarray) -> Mapping:
        t_s, z_um = self._clock.now(), self._focus.get_position_um()
        with self.model_lock:
            if not self._light_on():
                buffer[:] = self._model.dark(self._exposure_ms)
            elif self.specimen == "flat":
                level_e = self.flat_e_per_ms * self._exposure_ms
                buffer[:] = self._model.flat(level_e, self._exposure_ms)
            else:
                buffer[:] = self._model.acquire(t_s, z_um, self._exposure_ms).counts
        self.last_metadata = {SAMPLE_TIME_KEY: t_s, FOCUS_KEY: z_um, CAMERA_TIME_KEY: time.time()}
        return self.last_metadata


class TaggedImage:
    """Pixels plus a tag dictionary, as pycromanager's acquisition engine expects."""

    def __init__(self, tags: dict[str, Any] | None, pix: np.ndarray | None) -> None:
        self.tags = tags
        self.pix = pix


def _camel_to_snake(name: str) -> str:
    s1 = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z0-9])([A-Z])", r"\1_\2", s1).lower()


@functools.cache
def _snake_to_camel(cls: type) -> dict[str, str]:
    return {_camel_to_snake(n): n for n in dir(cls) if not n.startswith("_") and n != n.lower()}


class SimulatedCore(UniMMCore):
    """UniMMCore that also answers to the snake_case MMCore API pycromanager's engine calls.

    pycromanager's Python backend calls e.g. `core.get_image_width()` and needs
    `TaggedImage`, `get_tagged_image` and `pop_next_tagged_image` (without TaggedImage the
    acquisition never finishes). Snake-case names resolve to this core's camelCase methods,
    so UniMMCore's Python-device overrides are the ones called.
    """

    TaggedImage: TypeAlias = TaggedImage  # pycromanager's engine makes them as core.TaggedImage

    def __getattr__(self, name: str) -> Any:
        # As a plain `type`: mypy checks a class object against Hashable (the cache's key) with
        # the unbound __hash__ of its instances, and refuses it.
        cls: type = type(self)
        camel = _snake_to_camel(cls).get(name)
        if camel is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self, camel)

    def _camera_tags(self) -> dict[str, Any]:
        camera = self._py_camera()
        return dict(getattr(camera, "last_metadata", {}))

    def get_tagged_image(
        self, cam_index: int, camera: str, height: int, width: int, *_: Any, **__: Any
    ) -> TaggedImage:
        pix = self.getImage()
        tags = {
            "Camera": camera,
            "Height": height,
            "Width": width,
            "CameraChannelIndex": cam_index,
            **self._camera_tags(),
        }
        return TaggedImage(tags, pix)

    def pop_next_tagged_image(self) -> TaggedImage:
        metadata = pymmcore.Metadata()
        pix = self.popNextImageMD(metadata)
        tags: dict[str, str | float] = {
            key: metadata.GetSingleTag(key).GetValue() for key in metadata.GetKeys()
        }
        for key in (SAMPLE_TIME_KEY, FOCUS_KEY, CAMERA_TIME_KEY):
            if key in tags:
                tags[key] = float(tags[key])
        return TaggedImage(tags, pix)


class SimulatedMicroscope:
    """A real MMCore with a simulated camera and focus stage looking at a synthetic sample.

    Use as a context manager. `core` is the MMCore (run_mda works on it directly);
    `attach_pycromanager()` makes pycromanager's `Acquisition` run on it.
    """

    def __init__(
        self,
        config: MicroscopeConfig | None = None,
        clock: Literal["wall", "manual"] = "wall",
        noise_seed: int | None = None,
    ) -> None:
        self.config = config or default_microscope()
        self.model = ForwardModel(self.config, noise_seed=noise_seed)
        self._noise_seed = noise_seed
        self.clock = SampleClock(clock)
        self.focus = SimulatedFocusStage()
        self.shutter = SimulatedShutter()
        self.camera = SimulatedCamera(self.model, self.clock, self.focus, self._light_on)
        # Python devices only: no Micro-Manager install (and its C++ adapters) is needed
        self.core = SimulatedCore(mm_path=str(Path(__file__).parent))
        self.core.loadPyDevice(FOCUS_LABEL, self.focus)
        self.core.loadPyDevice(CAMERA_LABEL, self.camera)
        self.core.loadPyDevice(SHUTTER_LABEL, self.shutter)
        self.core.initializeAllDevices()
        self.core.setShutterDevice(SHUTTER_LABEL)
        self.core.setFocusDevice(FOCUS_LABEL)
        self.core.setCameraDevice(CAMERA_LABEL)
        self.core.definePixelSizeConfig(PIXEL_CONFIG)
        self.core.setPixelSizeUm(PIXEL_CONFIG, self.config.optics.pixel_size_um)
        self.core.setPixelSizeConfig(PIXEL_CONFIG)

    def load_specimen(self, specimen: Specimen, beads: Sample | None = None) -> None:
        """Put another slide under the objective: the configured sample, a bead slide
        (`beads`, default: a bead slide sized to the field) or an evenly fluorescent slide."""
        model = self.model
        if specimen == "beads":
            config = self.config.model_copy(update={"sample": beads or self._bead_slide()})
            model = ForwardModel(config, noise_seed=self._noise_seed)
        self.camera.look_at(model, specimen)

    def _bead_slide(self) -> Sample:
        """Beads about 3.5 um apart on average over the camera's field, at least 3 um."""
        optics, camera = self.config.optics, self.config.camera
        area_um2 = camera.width_px * camera.height_px * optics.pixel_size_um**2
        n_beads = max(int(area_um2 / 3.5**2), 5)
        return Sample(kind="beads", n_beads=n_beads, bead_min_separation_um=3.0)

    def _light_on(self) -> bool:
        # UniMMCore does not cycle a Python shutter around snaps of a Python camera, so
        # auto-shutter mode counts as open, as it would be during a real exposure.
        return self.shutter.get_open() or self.core.getAutoShutter()

    def ground_truth(self, metadata: Mapping[str, Any], exposure_ms: float) -> np.ndarray:
        """The specimen (2x grid, photoelectrons per pixel) behind a frame, from its tags."""
        t_s, z_um = float(metadata[SAMPLE_TIME_KEY]), float(metadata[FOCUS_KEY])
        with self.camera.model_lock:
            return self.model.truth(t_s, z_um) * (exposure_ms / 1000.0)

    def attach_pycromanager(self) -> None:
        """Make pycromanager's Python-backend acquisition engine drive this core."""
        from mmpycorex import launcher
        from pycromanager.acquisition.acq_eng_py.internal.engine import Engine

        engine = Engine.get_instance()
        if engine is None:
            Engine(self.core)
        else:  # the engine is a process-wide singleton: point it at this microscope
            engine.core = self.core
        # pycromanager.Acquisition picks its Python backend when mmpycorex lists a core
        if self.core not in launcher._PYMMCORES:
            launcher._PYMMCORES.append(self.core)

    def close(self) -> None:
        from mmpycorex import launcher

        if self.core in launcher._PYMMCORES:
            launcher._PYMMCORES.remove(self.core)
        self.core.unloadAllDevices()

    def __enter__(self) -> SimulatedMicroscope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
