"""Microscope description: optics, camera and (for the simulator) the sample.

Units: lengths in micrometres, intensities in photoelectrons, camera values in ADU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from livedecon.configs import shipped_config_path
from livedecon.engines._configfile import StrictModel, load_config


class Optics(StrictModel):
    """The detection optics: objective, wavelength, refractive indices and sampling."""

    na: float = Field(1.4, gt=0, le=1.7, description="objective numerical aperture")
    emission_um: float = Field(0.525, gt=0.2, lt=2.0, description="emission wavelength")
    immersion_ri: float = Field(1.515, ge=1.0, le=2.0, description="immersion refractive index")
    sample_ri: float = Field(1.33, ge=1.0, le=2.0, description="sample refractive index")
    pixel_size_um: float = Field(0.065, gt=0, lt=10, description="camera pixel at the sample")
    z_step_um: float = Field(0.2, gt=0, lt=50, description="axial step of z-stacks")
    modality: Literal["widefield", "tirf", "confocal", "light-sheet"] = "widefield"
    excitation_um: float | None = Field(None, gt=0.2, lt=2.0, description="confocal only")
    pinhole_au: float = Field(1.0, gt=0, le=10, description="confocal pinhole, Airy units")
    sheet_fwhm_um: float = Field(
        1.5, gt=0, lt=50, description="light-sheet only: thickness (FWHM) at the field's centre"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Optics:
        if self.na >= self.immersion_ri:
            raise ValueError(f"na ({self.na}) must be below immersion_ri ({self.immersion_ri})")
        if self.modality == "confocal" and self.excitation_um is None:
            raise ValueError("modality 'confocal' needs excitation_um")
        return self


def excess_noise_factor_sq(em_gain: float) -> float:
    """F^2 of a multiplication register of mean gain `em_gain` in the many-stage limit:
    2 - 1/em_gain (1 without multiplication, 2 at high gain). Real registers of ~500 stages
    give slightly less (1.97 at gain 100)."""
    return 2.0 - 1.0 / em_gain


class Camera(StrictModel):
    """The camera: global values (what normalisation and training use) and, for the
    simulator, its fixed pattern. For an EMCCD, gain_e_per_adu and read_noise_e are referred
    to the input of the multiplication register: photoelectrons per count with the EM gain
    folded in, and read noise in input photoelectrons."""

    kind: Literal["scmos", "ccd", "emccd"] = Field(
        "scmos", description="sCMOS: an amplifier per pixel; CCD/EMCCD: one output amplifier"
    )
    offset_adu: float = Field(100.0, ge=0, description="mean dark level")
    gain_e_per_adu: float = Field(0.5, gt=0, le=1000, description="photoelectrons per count")
    read_noise_e: float = Field(
        1.6, ge=0, le=1000, description="read noise, rms electrons (sCMOS: the median pixel)"
    )
    bit_depth: int = Field(16, ge=8, le=16)
    width_px: int = Field(256, ge=16, le=16384)
    height_px: int = Field(256, ge=16, le=16384)
    # The fixed pattern: drawn once from pattern_seed, the same in every frame.
    offset_spread_adu: float = Field(0.0, ge=0, le=1000, description="per-pixel offset rms, sCMOS")
    read_noise_spread: float = Field(
        0.0, ge=0, le=2, description="log-normal sigma of per-pixel read noise, sCMOS"
    )
    gain_spread: float = Field(
        0.0, ge=0, le=0.2, description="per-pixel relative gain rms (photo-response non-uniformity)"
    )
    column_noise_adu: float = Field(
        0.0, ge=0, le=1000, description="rms of column offsets that change every frame, sCMOS"
    )
    hot_pixel_fraction: float = Field(0.0, ge=0, le=0.05, description="fraction of hot pixels")
    hot_pixel_e_per_s: float = Field(
        0.0, ge=0, le=1e6, description="typical dark current of a hot pixel, electrons/s"
    )
    em_gain: float = Field(
        1.0, ge=1, le=10000, description="EMCCD multiplication; > 1 adds excess noise (F^2 ~ 2)"
    )
    pattern_seed: int = Field(0, ge=0, description="seed of the fixed per-pixel maps")

    @property
    def max_count(self) -> int:
        return 2**self.bit_depth - 1

    @model_validator(mode="after")
    def _offset_in_range(self) -> Camera:
        if self.offset_adu >= self.max_count:
            raise ValueError(
                f"offset_adu ({self.offset_adu}) must be below the {self.bit_depth}-bit maximum"
            )
        if self.em_gain > 1 and self.kind != "emccd":
            raise ValueError(f"em_gain ({self.em_gain}) > 1 needs kind 'emccd', not {self.kind!r}")
        if self.kind != "scmos":
            per_pixel = {
                name: getattr(self, name)
                for name in ("offset_spread_adu", "read_noise_spread", "column_noise_adu")
                if getattr(self, name) > 0
            }
            if per_pixel:
                raise ValueError(
                    f"a {self.kind} reads out through one amplifier: {', '.join(per_pixel)}"
                    " apply to kind 'scmos' only"
                )
        if self.hot_pixel_fraction > 0 and self.hot_pixel_e_per_s == 0:
            raise ValueError("hot_pixel_fraction > 0 needs hot_pixel_e_per_s > 0")
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
    kind: Literal["cell", "beads"] = Field(
        "cell", description="cell: filaments and puncta; beads: a bead slide for measuring the PSF"
    )
    n_beads: int = Field(20, ge=0, le=100_000, description="beads on the slide (kind 'beads')")
    bead_photons_s: float = Field(200_000.0, ge=0, description="emission of one bead")
    bead_brightness_sd: float = Field(
        0.1, ge=0, le=0.5, description="relative spread of bead brightness"
    )
    bead_min_separation_um: float = Field(
        3.0, ge=0, le=100, description="closest two beads are placed (0: independent positions)"
    )
    bead_pair_fraction: float = Field(
        0.0, ge=0, le=1, description="fraction of beads in close pairs, 0-1.5 um apart (clumps)"
    )


class MicroscopeConfig(StrictModel):
    """A microscope as livedecon models it: optics, camera and (simulated only) sample."""

    name: str = "simulated"
    optics: Optics = Optics()
    camera: Camera = Camera()
    sample: Sample | None = Field(None, description="present only for the simulated microscope")


def load_microscope(path: str | Path) -> MicroscopeConfig:
    """A microscope config from a TOML file, validated (ConfigError names the bad key)."""
    return load_config(path, MicroscopeConfig)


def default_microscope() -> MicroscopeConfig:
    """The simulated microscope used when no hardware and no config is given."""
    return load_microscope(shipped_config_path("microscope_sim.toml"))
