"""A simulated microscope built on the real MMCore (pymmcore-plus UniMMCore).

A Python camera renders the forward model of `livedecon.calibration` at the focus stage's
position, the current sample time and the camera's exposure; a Python focus stage moves the
focal plane. The core runs MDA sequences through pymmcore-plus `run_mda`, and, once
`attach_pycromanager()` has been called, pycromanager's Python-backend `Acquisition`.

Every frame carries its sample time and focus position in its metadata (keys SAMPLE_TIME_KEY
and FOCUS_KEY), so the exact ground truth of any frame can be rendered afterwards, and the
wall-clock time it left the camera (CAMERA_TIME_KEY), for end-to-end latency.

A SIM microscope (`SimulatedMicroscope(sim=scene)`) has a pattern device (SIM_LABEL, a state
device as an SLM's driver is) in front of the light, and a config group (SIM_GROUP) with a
preset per pattern: each frame shows the scene lit by the pattern the device is set to, and
says which in its metadata (SIM_PATTERN_KEY).
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import pymmcore
from pymmcore_plus.experimental.unicore import (
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    UniMMCore,
)

from livedecon.calibration._config import MicroscopeConfig, Sample, default_microscope
from livedecon.calibration._forward_model import ForwardModel
from livedecon.calibration._quality_bench import Scene
from livedecon.calibration._sim_simulator import SimScene, light_scene

SAMPLE_TIME_KEY = "LivedeconSampleTime-s"
FOCUS_KEY = "LivedeconFocus-um"
CAMERA_TIME_KEY = "LivedeconCameraTime-s"  # wall clock when the frame left the camera
SIM_PATTERN_KEY = "LivedeconSimPattern"  # the pattern's index in the sequence (-1: even light)
SIM_EXPOSURE_MS = 100.0  # a SIM scene gives its peak photons per frame at this exposure
SIM_LABEL = "SimPattern"
SIM_GROUP = "SIM"  # config group: a preset per pattern ("angle A phase P") and "widefield"
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


class SimulatedPatternDevice(StateDevice):
    """The SIM illumination (an SLM or a grating): state 0 lights the field evenly, state
    1 + i projects the i-th pattern of the sequence (angle by angle, phases within)."""

    def __init__(self, metadata: list[dict[str, int]]) -> None:
        labels = {0: "widefield"}
        for i, frame in enumerate(metadata):
            labels[i + 1] = f"angle {frame['sim_angle']} phase {frame['sim_phase']}"
        super().__init__(labels)
        self._state = 0

    def get_state(self) -> int:
        return self._state

    def set_state(self, position: int) -> None:
        self._state = int(position)


@dataclass
class SimLight:
    """A SIM specimen under the pattern device: each frame is the scene lit by the pattern
    the device shows, read out with fresh camera noise. The specimen holds still."""

    lit: SimScene
    device: SimulatedPatternDevice
    rng: np.random.Generator

    def frame(self, exposure_ms: float) -> tuple[np.ndarray, int]:
        """Camera counts at `exposure_ms` (the scene's peak photons at SIM_EXPOSURE_MS), and
        the pattern's index in the sequence (-1: even light)."""
        state = self.device.get_state()
        lit = self.lit.expected_e
        # even light (state 0): the mean of the patterns, whose phases cancel
        shown = lit.mean(axis=0, keepdims=True) if state == 0 else lit[state - 1 : state]
        one = replace(self.lit, expected_e=shown)
        return one.read_out(self.rng, exposure_ms / SIM_EXPOSURE_MS)[0], state - 1


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
        self.sim: SimLight | None = None  # a SIM specimen: the sample is lit by its patterns

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

    def snap(self, buffer: np.ndarray) -> Mapping[str, Any]:
        t_s, z_um = self._clock.now(), self._focus.get_position_um()
        tags: dict[str, float] = {}
        with self.model_lock:
            if not self._light_on():
                buffer[:] = self._model.dark(self._exposure_ms)
            elif self.specimen == "flat":
                level_e = self.flat_e_per_ms * self._exposure_ms
                buffer[:] = self._model.flat(level_e, self._exposure_ms)
            elif self.sim is not None:
                buffer[:], pattern = self.sim.frame(self._exposure_ms)
                tags[SIM_PATTERN_KEY] = pattern
            else:
                buffer[:] = self._model.acquire(t_s, z_um, self._exposure_ms).counts
        self.last_metadata = {**tags, SAMPLE_TIME_KEY: t_s, FOCUS_KEY: z_um}
        self.last_metadata[CAMERA_TIME_KEY] = time.time()
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
        if SIM_PATTERN_KEY in tags:
            tags[SIM_PATTERN_KEY] = int(float(tags[SIM_PATTERN_KEY]))
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
        sim: Scene | None = None,
    ) -> None:
        """`sim`: a SIM microscope looking at this 2D scene (its optics and camera replace
        `config`'s), with a pattern device (SIM_LABEL) in front of the light."""
        lit = light_scene(sim) if sim is not None else None
        self.config = lit.scope if lit is not None else config or default_microscope()
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
        self.sim = lit
        if lit is not None:
            pattern = SimulatedPatternDevice(lit.frame_metadata)
            self.core.loadPyDevice(SIM_LABEL, pattern)
            self.camera.sim = SimLight(lit, pattern, np.random.default_rng(noise_seed))
        self.core.initializeAllDevices()
        if lit is not None:  # one preset per pattern, as a SIM setup's config group has
            for label in self.core.getStateLabels(SIM_LABEL):
                self.core.defineConfig(SIM_GROUP, label, SIM_LABEL, "Label", label)
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
