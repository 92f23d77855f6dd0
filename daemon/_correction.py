"""The daemon's optional input corrections, applied to camera counts before the model.

- offset/gain: the camera maps of a calibration bundle (per-pixel offset, relative gain, hot
  pixels) turn each frame into the counts of an ideal camera with the global offset and gain,
  so the model's normalisation still applies;
- stripes: Fourier suppression of column stripes (the DC term, the mean, is never touched).

Both work per plane (a 3D stack plane by plane). A frame whose size is not the
calibrated sensor's (a camera ROI or binning) cannot take the per-pixel maps: it passes
uncorrected, with one warning per size, rather than being refused mid-acquisition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from livedecon.calibration._calibration_bundle import CalibrationBundle
from livedecon.calibration._fixed_pattern import OffsetGainCorrection, StripeFilter
from livedecon.daemon._daemon_config import Correction

log = logging.getLogger(__name__)


@dataclass
class InputCorrection:
    """The corrections applied to camera counts before the model: called on each frame."""

    offset_gain: OffsetGainCorrection | None = None
    stripes: bool = False
    source: str = ""  # the calibration bundle, for status and records
    _filters: dict[tuple[int, int], StripeFilter] = field(default_factory=dict)
    _warned: set[tuple[int, int]] = field(default_factory=set)

    @property
    def active(self) -> bool:
        return self.offset_gain is not None or self.stripes

    def describe(self) -> str:
        steps = [
            s for s, on in (("offset/gain", self.offset_gain), ("stripes", self.stripes)) if on
        ]
        return ", ".join(steps) + (f" from {self.source}" if self.source else "") or "none"

    def settings(self) -> Correction:
        """What is applied, spelled out (for records: a reprocess applies the same)."""
        return Correction(
            calibration=self.source, offset_gain=self.offset_gain is not None, stripes=self.stripes
        )

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """A frame (Y, X) or stack (Z, Y, X) of counts, corrected (float32), or unchanged
        when nothing applies."""
        shape = counts.shape[-2:]
        out = counts
        if self.offset_gain is not None:
            if shape == self.offset_gain.shape:
                out = self.offset_gain(out)
            elif shape not in self._warned:
                self._warned.add(shape)
                log.warning(
                    "frames of %s are not the calibrated sensor's %s (ROI or binning?): they"
                    " pass without the per-pixel offset/gain correction",
                    shape,
                    self.offset_gain.shape,
                )
        if self.stripes:
            if shape not in self._filters:
                self._filters[shape] = StripeFilter(shape)
            out = self._filters[shape](out)
        return out


def input_correction(
    settings: Correction, calibration: CalibrationBundle | None
) -> InputCorrection:
    """The corrections `settings` asks for; unset choices follow the calibration's defaults."""
    if settings.calibration and calibration is None:
        calibration = CalibrationBundle.load(Path(settings.calibration))
    defaults = calibration.record.correction if calibration else None
    offset_gain = settings.offset_gain
    if offset_gain is None:
        offset_gain = defaults.offset_gain if defaults else False
    if offset_gain and calibration is None:
        raise ValueError(
            "correction.offset_gain needs camera maps: set correction.calibration or serve a"
            " calibration bundle (model.bundle = its directory)"
        )
    stripes = settings.stripes
    if stripes is None:
        stripes = defaults.stripes if defaults else False
    return InputCorrection(
        offset_gain=OffsetGainCorrection(calibration.camera)
        if offset_gain and calibration
        else None,
        stripes=stripes,
        source=str(calibration.directory) if calibration else "",
    )
