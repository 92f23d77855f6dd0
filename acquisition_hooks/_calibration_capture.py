"""Record a calibration run's raw data live, through pycromanager, on any Micro-Manager core.

Four stages, each one pycromanager acquisition, with a prompt to the user before each (change
the slide, close the light path): darks with the shutter closed, flats at several exposures
of an evenly fluorescent slide (the photon transfer curve), a focus series through a bead
slide, and a few frames of the sample. The core is driven through MMCore's snake_case API,
so it is pycromanager's Java bridge to a running Micro-Manager or the simulated microscope.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from livedecon.calibration._inputs import CalibrationInputs, CaptureSettings

Stage = Literal["darks", "flats", "beads", "sample"]
Prompt = Callable[[Stage, str], None]  # shows the instruction; returns when the user is ready
Progress = Callable[[str, int, int], None]

INSTRUCTIONS: dict[Stage, str] = {
    "darks": "Block the light path to the camera (the shutter will be closed as well).",
    "flats": "Place an evenly fluorescent slide (dye solution or fluorescent plastic) and"
    " focus into it; set the light so the longest exposure stays below saturation.",
    "beads": "Place a slide of sub-resolution fluorescent beads (100 nm or smaller) and focus"
    " on them.",
    "sample": "Place your sample and focus on it.",
}


def _acquire(events: list[dict[str, Any]], label: str, progress: Progress) -> np.ndarray:
    """Run one pycromanager acquisition (no display, nothing written) and return its frames."""
    from pycromanager import Acquisition

    frames: list[np.ndarray] = []

    def keep(image: np.ndarray, metadata: dict[str, Any]) -> None:
        frames.append(np.array(image, copy=True))
        progress(label, len(frames), len(events))
        # nothing is returned: the frames are saved by the calibration run, not pycromanager

    with Acquisition(directory=None, show_display=False, image_process_fn=keep) as acq:
        acq.acquire(events)
    if len(frames) != len(events):
        raise RuntimeError(f"{label}: expected {len(events)} frames, the camera gave {len(frames)}")
    return np.stack(frames)


def capture_calibration(
    core: Any,
    settings: CaptureSettings,
    prompt: Prompt,
    progress: Progress = lambda *_: None,
) -> CalibrationInputs:
    """Record darks, flats, beads and sample frames from `core` (MMCore, snake_case API)."""
    pixel_size_um = float(core.get_pixel_size_um())
    if pixel_size_um <= 0:
        raise ValueError("the core has no pixel size calibration: set one in Micro-Manager first")
    auto_shutter = core.get_auto_shutter()
    try:
        prompt("darks", INSTRUCTIONS["darks"])
        core.set_auto_shutter(False)
        core.set_shutter_open(False)
        darks = _acquire(
            [
                {"axes": {"time": i}, "exposure": settings.exposure_ms}
                for i in range(settings.darks)
            ],
            "darks",
            progress,
        )
        core.set_auto_shutter(True)

        prompt("flats", INSTRUCTIONS["flats"])
        flats = []
        for exposure in settings.flat_exposures_ms:
            events = [
                {"axes": {"time": i}, "exposure": exposure} for i in range(settings.flats_per_level)
            ]
            flats.append(_acquire(events, f"flats at {exposure:g} ms", progress))

        beads = None
        if settings.bead_planes:
            prompt("beads", INSTRUCTIONS["beads"])
            focus = float(core.get_position())
            offsets = (np.arange(settings.bead_planes) - settings.bead_planes // 2) * (
                settings.bead_z_step_um
            )
            events = [
                {"axes": {"z": i}, "z": focus + float(dz), "exposure": settings.bead_exposure_ms}
                for i, dz in enumerate(offsets)
            ]
            beads = _acquire(events, "bead focus series", progress)
            core.set_position(focus)

        samples: list[np.ndarray] = []
        if settings.sample_frames:
            prompt("sample", INSTRUCTIONS["sample"])
            events = [
                {"axes": {"time": i}, "exposure": settings.exposure_ms}
                for i in range(settings.sample_frames)
            ]
            samples = list(_acquire(events, "sample frames", progress))
    finally:
        core.set_auto_shutter(auto_shutter)
    return CalibrationInputs(
        darks=darks,
        flats=flats,
        pixel_size_um=pixel_size_um,
        beads=beads if beads is None or beads.shape[0] > 1 else beads[0],
        bead_z_step_um=settings.bead_z_step_um if beads is not None else None,
        samples=samples,
        flat_labels=[f"exposure {e:g} ms" for e in settings.flat_exposures_ms],
        dark_exposure_ms=settings.exposure_ms,
        sources=[f"live: {core.get_camera_device()} via pycromanager"],
    )


def simulated_prompt(scope: Any, echo: Callable[[str], None] = print) -> Prompt:
    """A prompt for the simulated microscope (a SimulatedMicroscope): shows the instruction
    and does what it asks, changing the slide under the objective."""
    slides = {"darks": "sample", "flats": "flat", "beads": "beads", "sample": "sample"}

    def act(stage: Stage, instruction: str) -> None:
        echo(f"[{stage}] {instruction} (simulated: done)")
        scope.load_specimen(slides[stage])

    return act
