"""Microscope description: optics, camera and (for the simulator) the sample.

Units: lengths in micrometres, intensities in photoelectrons, camera values in ADU.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from livedecon.engines.configfile import StrictModel, load_config


class Optics(StrictModel):
    na: float = Field(1.4, gt=0, le=1.7, description="objective numerical aperture")
    emission_um: float = Field(0.525, gt=0.2, lt=2.0, description="emission wavelength")
    immersion_ri: float = Field(1.515, ge=1.0, le=2.0, description="immersion refractive index")
    sample_ri: float = Field(1.33, ge=1.0, le=2.0, description="sample refractive index")
    pixel_size_um: float = Field(0.065, gt=0, lt=10, description="camera pixel at the sample")
    z_step_um: float = Field(0.2, gt=0, lt=50, description="axial step of z-stacks")
    modality: Literal["widefield", "tirf", "confocal"] = "widefield"
    excitation_um: float | None = Field(None, gt=0.2, lt=2.0, description="confocal only")
    pinhole_au: float = Field(1.0, gt=0, le=10, description="confocal pinhole, Airy units")

    @model_validator(mode="after")
    def _consistent(self) -> Optics:
        if self.na >= self.immersion_ri:
            raise ValueError(f"na ({self.na}) must be below immersion_ri ({self.immersion_ri})")
        if self.modality == "confocal" and self.excitation_um is None:
            raise ValueError("modality 'confocal' needs excitation_um")
        return self


class Camera(StrictModel):
    offset_adu: float = Field(100.0, ge=0, description="mean dark level")
    gain_e_per_adu: float = Field(0.5, gt=0, le=1000, description="photoelectrons per count")
    read_noise_e: float = Field(1.6, ge=0, le=1000, description="read noise, rms electrons")
    bit_depth: int = Field(16, ge=8, le=16)
    width_px: int = Field(256, ge=16, le=16384)
    height_px: int = Field(256, ge=16, le=16384)

    @property
    def max_count(self) -> int:
        return 2**self.bit_depth - 1

    @model_validator(mode="after")
    def _offset_in_range(self) -> Camera:
        if self.offset_adu >= self.max_count:
            raise ValueError(
                f"offset_adu ({self.offset_adu}) must be below the {self.bit_depth}-bit maximum"
            )
        return self


class Sample(StrictModel):
    """The synthetic specimen the simulated microscope looks at."""

    seed: int = 0
    depth_um: float = Field(0.0, ge=0, le=50, description="0 for a thin (2D) sample")
    n_filaments: int = Field(12, ge=0, le=10_000)
    n_puncta: int = Field(40, ge=0, le=100_000)
    filament_photons_per_um_s: float = Field(
        25000.0, ge=0, description="emission of a filament per um of length, photons/s"
    )
    punctum_photons_s: float = Field(20000.0, ge=0, description="emission of one punctum")
    background_photons_px_s: float = Field(
        200.0, ge=0, description="out-of-focus/autofluorescence per camera pixel"
    )
    motion_um: float = Field(0.4, ge=0, le=100, description="amplitude of slow motion")
    period_s: float = Field(120.0, gt=0, description="time scale of motion and shape change")
    stripe_adu: float = Field(0.0, ge=0, description="sCMOS column-stripe rms, 0 = off")


class MicroscopeConfig(StrictModel):
    name: str = "simulated"
    optics: Optics = Optics()
    camera: Camera = Camera()
    sample: Sample | None = Field(None, description="present only for the simulated microscope")


def load_microscope(path: str | Path) -> MicroscopeConfig:
    return load_config(path, MicroscopeConfig)


def shipped_config_path(name: str) -> Path:
    """Path of one of the example configs installed with the package (configs/)."""
    path = Path(str(resources.files("livedecon.configs") / name))
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config named {name!r}")
    return path


def default_microscope() -> MicroscopeConfig:
    """The simulated microscope used when no hardware and no config is given."""
    return load_microscope(shipped_config_path("microscope_sim.toml"))
