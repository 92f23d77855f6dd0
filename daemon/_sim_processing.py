"""Live SIM: each group of raw frames (angles x phases) becomes one super-resolved image.

`SimProcessor` is the daemon's processor for a `sim` plan. The plan says the pattern
sequence (angles, phases, frame order) and what the reconstruction needs to know of the
microscope (detection NA, emission, camera offset and gain); the reconstruction is
engines/_sim.py's generalised Wiener filter. A plan that names a SIM model (ZS-DeconvNet-SIM or
DPS, engines/_sim_bundle.py) has each SR image restored by it, reconstructed with the settings
(the Wiener constant above all) the model was trained behind.

The pattern is estimated once per stream (position, channel: each has its own wavelength),
from its first complete group in which a pattern is found, and reused: estimation costs
about 15 times the reconstruction. A plan may carry a pattern measured before
(`SimPlan.pattern`); every stream then starts with it and none is estimated. The pattern is
saved beside the stream's output file (`<file>.sim.json`) before any image made with it is
written, so `reprocess` reconstructs with the same pattern and makes the same images. Until
a pattern is found (dim first frames), each group is reconstructed with what it shows
itself. The pattern's phases are measured again in every complete group
(`SimPlan.refresh_phases`): a pattern drifts sideways over hours, and stale phases cost dB.
A group with frames missing (timed out) gives each angle that lacks a frame a widefield
contribution only: its present frames are averaged, its modulation is set to 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from livedecon.calibration._config import MicroscopeConfig, Optics
from livedecon.calibration._sim_run import detection_psf_2x
from livedecon.daemon._processing import PHOTOELECTRONS, ModelProcessor, Stream
from livedecon.daemon._protocol import SimPlan
from livedecon.daemon._writer import FILE_SUFFIX, output_path
from livedecon.engines._atomic_write import write_atomically
from livedecon.engines._ome_tiff import PIXEL_SIZE_TOLERANCE
from livedecon.engines._sim import (
    UPSCALE,
    SimSettings,
    detection_cutoff_per_um,
    estimate_parameters,
    reconstruct,
    refresh_phases,
)
from livedecon.engines._sim_bundle import check_sim_chain
from livedecon.engines._sim_pattern import SimParameters

MIN_SIM_PX = 32  # the reconstruction's smallest frame


def sim_plan_for(
    scope: MicroscopeConfig, angles: int = 3, phases: int = 3, order: str = "angle-phase"
) -> SimPlan:
    """The SIM settings of a microscope (its detection optics and camera) for a pattern
    sequence of `angles` x `phases` frames in `order`; a ValidationError names a bad value."""
    optics, camera = scope.optics, scope.camera
    return SimPlan.model_validate(
        {
            "angles": angles,
            "phases": phases,
            "order": order,
            "na": optics.na,
            "emission_um": optics.emission_um,
            "immersion_ri": optics.immersion_ri,
            "sample_ri": optics.sample_ri,
            "camera_offset_adu": camera.offset_adu,
            "camera_gain_e_per_adu": camera.gain_e_per_adu,
        }
    )


WIENER_ID = "sim-wiener"  # the bundle id recorded for the reconstruction alone


@dataclass
class SimProcessor:
    """Raw SIM frames (camera counts, NaN where a frame never came) -> the SR image, float32
    photoelectrons per output pixel on the 2x grid, as a one-plane stack; with `network` (a
    SIM model: ZS-DeconvNet-SIM or DPS), that network's restoration of the SR image, which is
    reconstructed with the settings the network learned behind."""

    sim: SimPlan
    pixel_um: float  # the camera pixel at the sample
    directory: Path | None = None  # the acquisition's output: where found patterns are kept
    network: ModelProcessor | None = None
    upscale: int = UPSCALE
    is_3d: bool | None = None
    units: str = PHOTOELECTRONS
    settings: SimSettings = field(init=False)
    psf_2x: np.ndarray = field(init=False, repr=False)
    cutoff_per_um: float = field(init=False)
    _patterns: dict[Stream, SimParameters] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        """Refuses (ValueError) a network that is no SIM model or learned other raw frames."""
        sim = self.sim
        self.settings = SimSettings(angles=sim.angles, phases=sim.phases)
        if self.network is not None:
            self.settings = check_sim_chain(
                self.network.bundle,
                camera_pixel_um=self.pixel_um,
                na=sim.na,
                emission_um=sim.emission_um,
                angles=sim.angles,
                phases=sim.phases,
            )
        optics = Optics(
            na=sim.na,
            emission_um=sim.emission_um,
            immersion_ri=sim.immersion_ri,
            sample_ri=sim.sample_ri,
            pixel_size_um=self.pixel_um,
        )
        self.psf_2x = detection_psf_2x(optics)
        self.cutoff_per_um = detection_cutoff_per_um(sim.na, sim.sample_ri, sim.emission_um)
        given = sim.pattern
        tolerance = PIXEL_SIZE_TOLERANCE
        if given is not None and abs(given.output_pixel_um / self.output_pixel_um - 1) > tolerance:
            raise ValueError(
                f"the plan's SIM pattern was measured on {given.output_pixel_um:.4g} um SR"
                f" pixels, this acquisition's are {self.output_pixel_um:.4g} um (camera pixel"
                f" {self.pixel_um:.4g} um): measure the pattern at this pixel size"
            )

    @property
    def name(self) -> str:
        return "SIM reconstruction" + (" + " + self.network.bundle_id if self.network else "")

    @property
    def bundle_id(self) -> str:
        return self.network.bundle_id if self.network is not None else WIENER_ID

    @property
    def weights_version(self) -> int:
        return self.network.weights_version if self.network is not None else 0

    @property
    def finishing(self) -> str:
        return self.network.finishing if self.network is not None else ""

    @property
    def bundle_dir(self) -> Path | None:
        return self.network.bundle_dir if self.network is not None else None

    @property
    def correction(self) -> None:
        return None  # camera corrections act on raw frames; none are applied to SIM frames

    @property
    def trained_pixel_um(self) -> float | None:
        """The camera pixel the network learned (None: the reconstruction takes any)."""
        return self.network.bundle.manifest.camera_pixel_um if self.network else None

    @property
    def bright_level(self) -> float:
        return 1.0  # unused: SIM output is float32 only

    @property
    def output_pixel_um(self) -> float:
        return self.pixel_um / UPSCALE

    @property
    def backend(self) -> str:
        return self.network.backend if self.network is not None else "numpy"

    def output_depth(self, depth: int) -> int:
        return 1

    def angle_by_angle(self, frames: np.ndarray) -> np.ndarray:
        """The frames in the reconstruction's order: angle by angle, phases within."""
        if self.sim.order == "angle-phase":
            return frames
        a, p = self.sim.angles, self.sim.phases
        return frames.reshape(p, a, *frames.shape[1:]).swapaxes(0, 1).reshape(frames.shape)

    def electrons(self, frames: np.ndarray) -> np.ndarray:
        sim = self.sim
        counts = self.angle_by_angle(np.asarray(frames, dtype=np.float64))
        return (counts - sim.camera_offset_adu) * sim.camera_gain_e_per_adu

    def pattern_path(self, stream: Stream) -> Path | None:
        """Where the pattern of a stream is kept (None: nothing is written)."""
        if self.directory is None:
            return None
        tiff = output_path(self.directory, *stream)
        return tiff.with_name(tiff.name.removesuffix(FILE_SUFFIX) + ".sim.json")

    def _pattern(
        self, electrons: np.ndarray, complete: bool, stream: Stream | None
    ) -> SimParameters:
        """The stream's pattern: kept, saved, or found in this group (kept when complete and
        a pattern is seen); a group of no stream is estimated on its own."""
        if stream is not None and stream in self._patterns:
            return self._patterns[stream]
        path = self.pattern_path(stream) if stream is not None else None
        if path is not None and path.is_file():
            found = SimParameters.model_validate_json(path.read_text())
        elif self.sim.pattern is not None:  # measured before: no estimate, no dim-start gap
            found = self.sim.pattern
            if path is not None:
                write_atomically(path, found.model_dump_json(indent=2))
        else:
            args = (self.psf_2x, self.output_pixel_um, self.cutoff_per_um, self.settings)
            found = estimate_parameters(electrons, *args)
            if stream is None or not complete or not any(found.modulation):
                return found
            if path is not None:
                write_atomically(path, found.model_dump_json(indent=2))
        if stream is not None:
            self._patterns[stream] = found
        return found

    def reconstruct(self, frames: np.ndarray, stream: Stream | None = None) -> np.ndarray:
        """One group of raw frames of `stream` -> the SR image (photoelectrons per output
        pixel)."""
        electrons = self.electrons(frames)
        came = np.isfinite(electrons).all(axis=(1, 2))
        if not came.any():
            raise ValueError("a SIM group without a single frame")
        phases = self.sim.phases
        partial = []
        for a in range(self.sim.angles):
            angle = slice(a * phases, (a + 1) * phases)
            block, present = electrons[angle], came[angle]
            if present.all():
                continue
            partial.append(a)
            source = block[present] if present.any() else electrons[came]
            block[~present] = source.mean(axis=0)
        found = self._pattern(electrons, not partial, stream)
        args = (self.psf_2x, self.output_pixel_um, self.cutoff_per_um)
        if partial:
            modulation = [0.0 if a in partial else m for a, m in enumerate(found.modulation)]
            found = found.model_copy(update={"modulation": modulation})
        elif self.sim.refresh_phases and any(found.modulation):
            found = refresh_phases(electrons, *args, found, self.settings)
        return reconstruct(electrons, *args, self.settings, found).image

    def process(
        self, items: list[np.ndarray], streams: list[Stream] | None = None
    ) -> list[np.ndarray]:
        """Groups in, one-plane SR stacks out; `streams` (position, channel) of each group
        reuse its stream's pattern."""
        keys: list[Stream | None] = list(streams) if streams else [None] * len(items)
        images = [self.reconstruct(item, key) for item, key in zip(items, keys, strict=True)]
        if self.network is not None:
            images = self.network.process(images)
        return [image[None] for image in images]
