"""The raw data of a calibration run: darks, flats, a bead z-stack and sample frames.

A live run (acquisition_hooks._calibration_capture) records these and saves them with `save`
as plain camera-count TIFFs (OME-TIFF with pixel size for beads and samples); a run from
files reads the same files back with `load`, so any run can be repeated from its raw data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from pydantic import Field

from livedecon.engines._configfile import StrictModel
from livedecon.engines._ome_tiff import read_raw_tiff, write_ome_tiff

MIN_DARKS = 8
MIN_FLATS_PER_LEVEL = 2
MIN_FLAT_LEVELS = 3


class CaptureSettings(StrictModel):
    """What a live calibration run records (acquisition_hooks._calibration_capture)."""

    darks: int = Field(40, ge=8, description="dark frames")
    flat_exposures_ms: list[float] = Field(
        [2.0, 5.0, 10.0, 20.0, 40.0, 80.0],
        min_length=3,
        description="one flat level per exposure, with constant illumination",
    )
    flats_per_level: int = Field(20, ge=2)
    exposure_ms: float = Field(20.0, gt=0, description="darks and sample frames")
    bead_exposure_ms: float = Field(50.0, gt=0, description="beads: more light, better PSF")
    bead_planes: int = Field(31, ge=1, description="focus series through the beads (1: TIRF)")
    bead_z_step_um: float = Field(0.1, gt=0)
    sample_frames: int = Field(4, ge=0, description="frames of the sample (training data)")


def sha256(path: Path) -> str:
    """A file's SHA-256; for a dataset directory (NDTiff, OME-Zarr), over its files' relative
    names and contents in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass
class CalibrationInputs:
    """Camera counts as recorded, in acquisition order.

    darks: (N, Y, X), light path closed, at the sample exposure.
    flats: one (N, Y, X) stack per illumination level (exposure or light intensity), evenly
        illuminated; levels in any order.
    beads: (Z, Y, X) focus series through sub-resolution beads (or (Y, X) for TIRF), or None.
    samples: frames (Y, X) or stacks (Z, Y, X) of the user's sample: the first model's
        training data, or empty (no model).
    """

    darks: np.ndarray
    flats: list[np.ndarray]
    pixel_size_um: float
    beads: np.ndarray | None = None
    bead_z_step_um: float | None = None
    samples: list[np.ndarray] = field(default_factory=list)
    flat_labels: list[str] = field(default_factory=list)
    dark_exposure_ms: float | None = None  # for hot pixels' dark current
    sources: list[str] = field(default_factory=list)  # where each input came from

    def __post_init__(self) -> None:
        self.darks = np.asarray(self.darks)
        if self.darks.ndim != 3 or self.darks.shape[0] < MIN_DARKS:
            raise ValueError(
                f"darks must be a stack of at least {MIN_DARKS} frames (N, Y, X),"
                f" got shape {self.darks.shape}"
            )
        frame = self.darks.shape[1:]
        if len(self.flats) < MIN_FLAT_LEVELS:
            raise ValueError(
                f"the photon transfer curve needs flats at {MIN_FLAT_LEVELS} or more"
                f" illumination levels, got {len(self.flats)}"
            )
        for i, flat in enumerate(self.flats):
            if flat.ndim != 3 or flat.shape[1:] != frame or flat.shape[0] < MIN_FLATS_PER_LEVEL:
                raise ValueError(
                    f"flat level {i}: expected at least {MIN_FLATS_PER_LEVEL} frames of"
                    f" {frame} like the darks, got shape {flat.shape}"
                )
        if not self.flat_labels:
            self.flat_labels = [f"level {i}" for i in range(len(self.flats))]
        if self.beads is not None:
            if self.beads.ndim not in (2, 3) or self.beads.shape[-2:] != frame:
                raise ValueError(
                    f"the bead images must be (Z, Y, X) or (Y, X) frames of {frame},"
                    f" got shape {self.beads.shape}"
                )
            if self.beads.ndim == 3 and self.beads.shape[0] > 1 and not self.bead_z_step_um:
                raise ValueError("a bead z-stack needs its z step (bead_z_step_um)")
        for i, sample in enumerate(self.samples):
            if sample.ndim not in (2, 3) or sample.shape[-2:] != frame:
                raise ValueError(
                    f"sample {i}: expected frames of {frame} like the darks, got {sample.shape}"
                )

    def save(self, directory: Path) -> list[Path]:
        """Write every input as camera counts under `directory`; returns the files."""
        directory.mkdir(parents=True, exist_ok=True)
        written = [directory / "darks.tif"]
        tifffile.imwrite(written[0], self.darks)
        for i, (flat, label) in enumerate(zip(self.flats, self.flat_labels, strict=True)):
            path = directory / f"flat_{i:02d}.tif"
            tifffile.imwrite(path, flat, description=label)
            written.append(path)
        if self.beads is not None:
            axes = "ZYX" if self.beads.ndim == 3 else "YX"
            written.append(
                write_ome_tiff(
                    directory / "beads.ome.tif",
                    self.beads,
                    axes,
                    self.pixel_size_um,
                    z_step_um=self.bead_z_step_um,
                )
            )
        for i, sample in enumerate(self.samples):
            axes = "ZYX" if sample.ndim == 3 else "YX"
            written.append(
                write_ome_tiff(
                    directory / f"sample_{i:02d}.ome.tif", sample, axes, self.pixel_size_um
                )
            )
        return written

    @classmethod
    def load(
        cls,
        darks: Path,
        flats: Sequence[Path],
        pixel_size_um: float,
        beads: Path | None = None,
        bead_z_step_um: float | None = None,
        samples: Sequence[Path] = (),
    ) -> CalibrationInputs:
        """Inputs from TIFF files of camera counts (one file of darks, one file per flat
        level, an optional bead stack and sample files). The bead stack's z step comes from
        its OME metadata unless given."""
        for path in [darks, *flats, *([beads] if beads else []), *samples]:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no such file")
        where = "this microscope"
        bead_image = read_raw_tiff(beads, pixel_size_um, where) if beads else None
        sample_frames: list[np.ndarray] = []
        for path in samples:
            data = read_raw_tiff(path, pixel_size_um, where).data
            sample_frames.extend(data.reshape(-1, *data.shape[-2:]) if data.ndim > 2 else [data])
        return cls(
            darks=tifffile.imread(darks),
            flats=[tifffile.imread(path) for path in flats],
            pixel_size_um=pixel_size_um,
            beads=bead_image.data if bead_image else None,
            bead_z_step_um=bead_z_step_um or (bead_image.z_step_um if bead_image else None),
            samples=sample_frames,
            flat_labels=[Path(p).name for p in flats],
            sources=[
                f"{Path(p).resolve()} sha256:{sha256(Path(p))}"
                for p in [darks, *flats, *([beads] if beads else []), *samples]
            ],
        )
