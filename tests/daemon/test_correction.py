"""The daemon's input corrections: chosen by config and calibration, applied before the model."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from livedecon.calibration._calibration_bundle import CalibrationBundle, CalibrationRecord
from livedecon.calibration._camera import calibrate_camera
from livedecon.calibration._forward_model import ForwardModel
from livedecon.daemon._correction import input_correction
from livedecon.daemon._daemon_config import Correction


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """A calibration bundle (camera only) of a 64 x 64 sCMOS with hot pixels and stripes."""
    from livedecon.calibration._config import default_microscope

    scope = default_microscope()
    camera = scope.camera.model_copy(
        update={
            "width_px": 64,
            "height_px": 64,
            "offset_spread_adu": 3.0,
            "hot_pixel_fraction": 0.01,
            "hot_pixel_e_per_s": 5000.0,
        }
    )
    sample = scope.sample.model_copy(update={"stripe_adu": 3.0})
    scope = scope.model_copy(update={"camera": camera, "sample": sample})
    model = ForwardModel(scope, noise_seed=1)
    darks = np.stack([model.dark(20.0) for _ in range(16)])
    flats = [np.stack([model.flat(level, 20.0) for _ in range(4)]) for level in (50, 200, 800)]
    camera_cal = calibrate_camera(darks, flats, exposure_ms=20.0)
    directory = tmp_path_factory.mktemp("calibration")
    record = CalibrationRecord(
        created=CalibrationRecord.now(),
        microscope=scope.model_copy(update={"sample": None}),
        camera=camera_cal.write(directory / "camera"),
    )
    bundle = CalibrationBundle(directory, record, camera_cal)
    bundle.save_record()
    return CalibrationBundle.load(directory), model


def test_offset_gain_follows_the_calibration_and_removes_hot_pixels_and_offsets(calibration):
    bundle, model = calibration
    correct = input_correction(Correction(), bundle)
    assert correct.describe().startswith("offset/gain")
    dark = model.dark(20.0).astype(np.float32)
    corrected = correct(dark)
    hot = bundle.camera.hot_pixels
    assert hot.sum() > 10
    # a dark frame becomes the global offset plus read noise: offsets flattened, hot pixels gone
    assert np.abs(corrected[hot] - 100).max() < 15
    assert np.abs(dark[hot] - 100).max() > 50
    assert corrected.std() < 0.8 * dark[~hot].std()
    assert corrected.mean() == pytest.approx(bundle.camera.summary.offset_adu, abs=0.3)
    # a stack is corrected plane by plane
    stack = np.stack([dark, dark])
    np.testing.assert_array_equal(correct(stack)[1], corrected)
    # the record spells out what applied, so a reprocess applies the same
    settings = correct.settings()
    assert settings.offset_gain is True
    assert settings.stripes is False
    assert settings.calibration == str(bundle.directory)


def test_config_overrides_and_bad_combinations(calibration, caplog):
    bundle, model = calibration
    off = input_correction(Correction(offset_gain=False), bundle)
    assert not off.active
    frame = model.dark(20.0)
    assert off(frame) is frame  # nothing applies: the frame passes untouched
    with pytest.raises(ValueError, match="needs camera maps"):
        input_correction(Correction(offset_gain=True), None)
    stripes_only = input_correction(Correction(stripes=True), None)
    out = stripes_only(frame.astype(np.float32))
    assert out.mean() == pytest.approx(frame.mean(), rel=1e-6)
    # a camera ROI cannot take the full-sensor maps: it passes uncorrected, with one warning
    correct = input_correction(Correction(), bundle)
    roi = frame[:32, :32]
    with caplog.at_level(logging.WARNING):
        assert correct(roi) is roi
        correct(roi)
    assert sum("ROI or binning" in r.message for r in caplog.records) == 1


def test_column_stripes_are_suppressed_in_the_daemon_path(calibration):
    bundle, model = calibration
    correct = input_correction(Correction(stripes=True), bundle)
    dark = model.dark(20.0).astype(np.float32)
    before = dark.mean(axis=0).std()
    after = correct(dark).mean(axis=0).std()
    # fixed stripes go with the offset map; the filter removes what is left along columns
    assert after < 0.5 * before
