"""The calibration bundle: everything a calibration run measured, in one directory.

    calibration.toml     what was measured (camera, PSF, model, metrics), where it came from,
                         and the corrections the daemon applies by default
    camera/              per-pixel maps (TIFF): offset, read-noise variance, gain, hot pixels
    psf_measured.ome.tif the bead PSF (when beads were recorded)
    psf_theoretical.ome.tif
    model/               the first model bundle (a normal engines bundle)
    raw/                 a live run's raw data (the same files a run from files reads)
    report.html, report/ the report and its plots

The daemon serves a calibration bundle like a model bundle (model.bundle = its directory):
it restores with model/ and applies the camera corrections before the model.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from pydantic import Field

from livedecon.calibration._camera import CameraCalibration, CameraRecord
from livedecon.calibration._config import MicroscopeConfig
from livedecon.engines._configfile import StrictModel, load_config

CALIBRATION_FILE = "calibration.toml"
FORMAT_VERSION = 1


class PSFSummary(StrictModel):
    """The PSF a calibration used: where it came from, its files, the beads and the FWHMs."""

    source: str = Field(description="measured (beads) or theoretical: the PSF the model used")
    measured_file: str | None = None
    theoretical_file: str
    beads_used: int = 0
    beads_rejected: dict[str, int] = Field(default_factory=dict)
    fwhm_um: dict[str, float] = Field({}, description="measured x, y, z")
    theory_fwhm_um: dict[str, float] = Field({}, description="theory x, y, z, pixel-integrated")


class ModelSummary(StrictModel):
    """The model a calibration trained: its directory in the bundle, id, network, training and
    backend."""

    directory: str = "model"
    bundle_id: str
    network: str
    iterations: int
    training_s: float
    backend: str
    gate_db: float | None = None


class CorrectionDefaults(StrictModel):
    """The input corrections the daemon applies by default when serving this calibration."""

    offset_gain: bool = Field(True, description="per-pixel offset, gain and hot-pixel correction")
    stripes: bool = Field(False, description="Fourier suppression of column stripes")


class CalibrationRecord(StrictModel):
    """calibration.toml: what a calibration run measured, from which inputs, and its defaults."""

    format_version: int = FORMAT_VERSION
    created: str
    microscope: MicroscopeConfig = Field(description="optics, and the camera as measured")
    camera: CameraRecord
    psf: PSFSummary | None = None
    model: ModelSummary | None = None
    correction: CorrectionDefaults = CorrectionDefaults()
    metrics: dict[str, float] = Field(default_factory=dict)
    inputs: list[str] = Field(default_factory=list)
    report: str = "report.html"

    @staticmethod
    def now() -> str:
        return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def is_calibration_bundle(path: str | Path) -> bool:
    """Whether `path` is a directory holding calibration.toml."""
    return (Path(path) / CALIBRATION_FILE).is_file()


@dataclass
class CalibrationBundle:
    """A calibration bundle on disk: its directory, its record and its camera maps."""

    directory: Path
    record: CalibrationRecord
    camera: CameraCalibration

    @property
    def model_dir(self) -> Path:
        if self.record.model is None:
            raise ValueError(f"{self.directory}: this calibration has no model (no sample frames)")
        return self.directory / self.record.model.directory

    def save_record(self) -> Path:
        path = self.directory / CALIBRATION_FILE
        data = self.record.model_dump(mode="json", exclude_none=True)
        path.write_text(tomli_w.dumps(data), encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> CalibrationBundle:
        directory = Path(directory)
        if not is_calibration_bundle(directory):
            raise FileNotFoundError(
                f"{directory}: not a calibration bundle (no {CALIBRATION_FILE})"
            )
        record = load_config(directory / CALIBRATION_FILE, CalibrationRecord)
        if record.format_version > FORMAT_VERSION:
            raise ValueError(
                f"{directory}: calibration format {record.format_version} is newer than this"
                f" livedecon reads ({FORMAT_VERSION}); update livedecon"
            )
        camera = CameraCalibration.read(directory / "camera", record.camera)
        return cls(directory, record, camera)
