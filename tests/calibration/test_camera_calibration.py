"""Camera calibration on the forward model, whose camera is known exactly.

Tolerances: gain within 3% and global read noise within 5%. With 50 darks and 8 levels x 20
flats of 128 x 128 pixels the statistical error of the gain is ~0.2% and of the read noise
~0.3%; the margins are for model assumptions (F^2 of an EMCCD, quantisation) and so a real
bias of a few percent still fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from livedecon.calibration._camera import (
    CalibrationWarning,
    CameraCalibration,
    CameraRecord,
    CameraSummary,
    calibrate_camera,
)
from livedecon.calibration._config import Camera, default_microscope
from livedecon.calibration._forward_model import CameraPattern, ForwardModel

EXPOSURE_MS = 50.0
LEVELS_E = (50, 150, 400, 1000, 2500, 6000, 12000, 24000)  # photoelectrons per pixel
SCMOS = dict(
    gain_e_per_adu=0.5,
    read_noise_e=1.6,
    offset_spread_adu=3.0,
    read_noise_spread=0.3,
    gain_spread=0.02,
    hot_pixel_fraction=0.002,
    hot_pixel_e_per_s=2000.0,
)
GAIN_TOL, READ_TOL = 0.03, 0.05


def _model(size: int = 128, **camera) -> ForwardModel:
    scope = default_microscope()
    fields = scope.camera.model_dump() | {"width_px": size, "height_px": size} | camera
    return ForwardModel(scope.model_copy(update={"camera": Camera(**fields)}), noise_seed=1)


def _record(model, darks=50, levels=LEVELS_E, per_level=20):
    dark = np.stack([model.dark(EXPOSURE_MS) for _ in range(darks)])
    flats = [np.stack([model.flat(e, EXPOSURE_MS) for _ in range(per_level)]) for e in levels]
    return dark, flats


def _read_noise_truth_e(camera: Camera) -> float:
    """What darks show: read noise plus quantisation (1/12 ADU^2), in electrons."""
    return math.sqrt(camera.read_noise_e**2 + camera.gain_e_per_adu**2 / 12)


@pytest.fixture(scope="module")
def scmos():
    model = _model(**SCMOS)
    darks, flats = _record(model)
    return model, calibrate_camera(darks, flats, exposure_ms=EXPOSURE_MS)


def test_scmos_global_values(scmos):
    model, _cal = scmos
    camera, s = model.microscope.camera, scmos[1].summary
    gain_error = s.gain_e_per_adu / camera.gain_e_per_adu - 1
    read_error = s.read_noise_e / _read_noise_truth_e(camera) - 1
    print(
        f"\nsCMOS: gain error {gain_error:+.2%} (fit s.e. {s.gain_rel_error:.2%}),"
        f" read noise error {read_error:+.2%}, offset {s.offset_adu:.2f} ADU,"
        f" PTC chi2 {s.ptc_reduced_chi2:.2f}"
    )
    assert abs(gain_error) < GAIN_TOL
    assert abs(read_error) < READ_TOL
    assert s.offset_adu == pytest.approx(camera.offset_adu, abs=0.5)
    assert s.read_noise_rms_e > s.read_noise_e  # log-normal spread: the mean is above the median
    assert all(p.used for p in s.ptc)
    assert s.notes == []
    assert s.ptc_max_rel_residual < 0.02
    # the fixed pattern's size, measured
    assert s.offset_spread_adu == pytest.approx(camera.offset_spread_adu, rel=0.1)
    assert s.read_noise_spread == pytest.approx(camera.read_noise_spread, abs=0.05)
    assert s.relative_gain_spread == pytest.approx(camera.gain_spread, rel=0.1)
    assert s.hot_pixel_e_per_s == pytest.approx(camera.hot_pixel_e_per_s, rel=0.3)


def test_scmos_maps_and_hot_pixels(scmos):
    model, cal = scmos
    pattern, camera = model.camera_pattern, model.microscope.camera
    truth_hot = pattern.hot_pixels
    found = cal.hot_pixels
    precision = (found & truth_hot).sum() / found.sum()
    recall = (found & truth_hot).sum() / truth_hot.sum()
    good = ~truth_hot
    offset_r = np.corrcoef(cal.offset_adu[good], pattern.offset_adu[good])[0, 1]
    # per-pixel read noise (ADU): 50 darks estimate each pixel's std to ~10%
    truth_std = np.sqrt(pattern.read_noise_e**2 / camera.gain_e_per_adu**2 + 1 / 12)[good]
    rel = np.sqrt(cal.read_variance_adu2[good]) / truth_std - 1
    read_r = np.corrcoef(np.sqrt(cal.read_variance_adu2[good]), truth_std)[0, 1]
    gain_r = np.corrcoef(cal.relative_gain[good], pattern.relative_gain[good])[0, 1]
    print(
        f"\nhot pixels {truth_hot.sum()}: precision {precision:.3f} recall {recall:.3f};"
        f" offset map r {offset_r:.3f}; read-noise map r {read_r:.3f}, median |error|"
        f" {np.median(np.abs(rel)):.1%}; relative gain map r {gain_r:.3f}"
    )
    assert truth_hot.sum() > 20
    assert precision >= 0.95
    assert recall >= 0.95
    assert offset_r > 0.95
    assert np.median(np.abs(rel)) < 0.10
    assert read_r > 0.9
    assert gain_r > 0.95
    assert cal.relative_gain[good].mean() == pytest.approx(1.0, abs=1e-3)
    assert cal.read_noise_e_map.dtype == np.float32


def test_ccd_uniform_camera():
    model = _model(64, kind="ccd", gain_e_per_adu=2.0, read_noise_e=6.0)
    darks, flats = _record(model, levels=[4 * e for e in LEVELS_E])
    s = calibrate_camera(darks, flats, kind="ccd").summary
    camera = model.microscope.camera
    print(
        f"\nCCD: gain error {s.gain_e_per_adu / 2 - 1:+.2%},"
        f" read noise error {s.read_noise_e / _read_noise_truth_e(camera) - 1:+.2%}"
    )
    assert s.gain_e_per_adu == pytest.approx(2.0, rel=GAIN_TOL)
    assert s.read_noise_e == pytest.approx(_read_noise_truth_e(camera), rel=READ_TOL)
    assert s.hot_pixels == 0
    assert s.offset_spread_adu < 0.3  # one amplifier: nothing beyond estimation noise


@pytest.mark.parametrize(("em_gain", "told"), [(300.0, None), (10.0, 10.0)])
def test_emccd_gain_accounts_for_excess_noise(em_gain, told):
    """Multiplication doubles the shot variance (F^2 = 2 - 1/g): a fit that ignored it would
    halve the gain."""
    camera = dict(kind="emccd", em_gain=em_gain, gain_e_per_adu=0.05, read_noise_e=0.2)
    model = _model(64, **camera)
    darks, flats = _record(model, levels=(5, 15, 40, 100, 250, 600, 1200, 2400))
    s = calibrate_camera(darks, flats, kind="emccd", em_gain=told).summary
    naive = calibrate_camera(darks, flats, kind="ccd").summary
    print(
        f"\nEMCCD gain {em_gain:g}: gain error {s.gain_e_per_adu / 0.05 - 1:+.2%}"
        f" (F^2 {s.excess_noise_factor_sq:.2f}); without F^2 {naive.gain_e_per_adu / 0.05 - 1:+.0%}"
    )
    assert s.gain_e_per_adu == pytest.approx(0.05, rel=GAIN_TOL)
    assert s.read_noise_e == pytest.approx(
        _read_noise_truth_e(model.microscope.camera), rel=READ_TOL
    )
    assert naive.gain_e_per_adu == pytest.approx(0.05 / s.excess_noise_factor_sq, rel=GAIN_TOL)


def test_saturated_levels_are_left_out_and_said():
    model = _model(64, gain_e_per_adu=0.5)
    darks, flats = _record(model, levels=(200, 1000, 5000, 20000, 32700), per_level=10)
    with pytest.warns(CalibrationWarning, match="level 4.*saturated"):
        s = calibrate_camera(darks, flats).summary
    assert [p.used for p in s.ptc] == [True, True, True, True, False]
    assert "65535" in s.ptc[-1].note
    assert "level 4" in s.notes[0]
    assert s.gain_e_per_adu == pytest.approx(0.5, rel=GAIN_TOL)


def test_pile_up_below_the_dtype_maximum_counts_as_saturation():
    """A 12-bit camera delivers uint16: its flats clip at 4095, not 65535."""
    model = _model(64, bit_depth=12, gain_e_per_adu=2.0, read_noise_e=3.0)
    darks, flats = _record(model, levels=(200, 1000, 3000, 7900), per_level=10)
    assert darks.dtype == np.uint16
    with pytest.warns(CalibrationWarning, match="4095"):
        s = calibrate_camera(darks, flats).summary
    assert [p.used for p in s.ptc] == [True, True, True, False]
    assert s.gain_e_per_adu == pytest.approx(2.0, rel=GAIN_TOL)


def test_levels_past_the_linear_range_are_left_out():
    """Near full well the variance rolls off before the counts clip: squeeze the top level's
    fluctuations by 20% (variance -36%) and it must leave the fit."""
    model = _model(64, gain_e_per_adu=0.5)
    darks, flats = _record(model, levels=(200, 1000, 4000, 12000, 24000), per_level=10)
    top = flats[-1].astype(np.float64)
    mean = top.mean(axis=0)
    flats[-1] = mean + 0.8 * (top - mean)
    with pytest.warns(CalibrationWarning, match="outside the linear range: variance -"):
        s = calibrate_camera(darks, flats).summary
    assert [p.used for p in s.ptc] == [True, True, True, True, False]
    assert s.gain_e_per_adu == pytest.approx(0.5, rel=GAIN_TOL)


@pytest.fixture(scope="module")
def small_inputs():
    model = _model(32, gain_e_per_adu=0.5)
    return _record(model, darks=8, levels=(500, 2000, 8000), per_level=4)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("one-dark", "at least 2 frames, got 1"),
        ("dark-frame-not-stack", r"darks: expected a stack of frames \(N, Y, X\)"),
        ("one-level", "flats at 2 or more light levels, got 1"),
        ("flat-one-frame", "flat level 1: a temporal variance needs at least 2 frames"),
        ("shape-mismatch", r"flat level 0: frames of \(32, 30\), but the darks' frames"),
        ("non-increasing", "increasing order of light: level 1 .* is not brighter than level 0"),
        ("dark-level", "flat level 1: mean signal .* below the read noise"),
        ("all-saturated", "only 1 of 3 flat levels are usable .*saturated"),
        ("nan", "flat level 2: contains NaN"),
        ("complex", "integers or floats, got complex"),
        ("labels", "2 labels for 3 flat levels"),
        ("em-gain-scmos", "em_gain .* applies to kind 'emccd' only"),
        ("kind", "kind must be 'scmos', 'ccd' or 'emccd'"),
    ],
)
def test_bad_inputs_are_clear_errors(small_inputs, case, message):
    darks, flats = small_inputs
    flats = list(flats)
    kwargs: dict = {}
    if case == "one-dark":
        darks = darks[:1]
    elif case == "dark-frame-not-stack":
        darks = darks[0]
    elif case == "one-level":
        flats = flats[:1]
    elif case == "flat-one-frame":
        flats[1] = flats[1][:1]
    elif case == "shape-mismatch":
        flats[0] = flats[0][:, :, :30]
    elif case == "non-increasing":
        flats = flats[::-1]
    elif case == "dark-level":
        flats[1] = darks[:4]
    elif case == "all-saturated":
        flats[1] = np.full_like(flats[1], 65535)
        flats[2] = np.full_like(flats[2], 65535)
    elif case == "nan":
        flats[2] = flats[2].astype(np.float32)
        flats[2][0, 0, 0] = np.nan
    elif case == "complex":
        darks = darks.astype(np.complex64)
    elif case == "labels":
        kwargs["labels"] = ["a", "b"]
    elif case == "em-gain-scmos":
        kwargs["em_gain"] = 100.0
    elif case == "kind":
        kwargs["kind"] = "cmos"
    with pytest.raises(ValueError, match=message):
        calibrate_camera(darks, flats, **kwargs)


def test_write_read_and_as_camera(scmos, tmp_path):
    _, cal = scmos
    record = cal.write(tmp_path / "camera")
    assert sorted(p.name for p in (tmp_path / "camera").iterdir()) == sorted(
        [
            record.files.offset,
            record.files.read_variance,
            record.files.hot_pixels,
            record.files.relative_gain,
        ]
    )
    # the record is what goes into the calibration TOML: no None values, round trip exact
    dumped = record.model_dump(mode="json", exclude_none=True)
    assert "None" not in repr(dumped)
    again = CameraCalibration.read(tmp_path / "camera", CameraRecord.model_validate(dumped))
    assert again.summary == cal.summary
    np.testing.assert_array_equal(again.offset_adu, cal.offset_adu)
    np.testing.assert_array_equal(again.read_variance_adu2, cal.read_variance_adu2)
    np.testing.assert_array_equal(again.hot_pixels, cal.hot_pixels)
    np.testing.assert_array_equal(again.relative_gain, cal.relative_gain)
    assert again.offset_adu.dtype == np.float32
    assert again.hot_pixels.dtype == bool

    base = Camera(kind="ccd", width_px=512, height_px=512)
    camera = cal.as_camera(base)
    assert (camera.offset_adu, camera.gain_e_per_adu, camera.read_noise_e) == (
        cal.summary.offset_adu,
        cal.summary.gain_e_per_adu,
        cal.summary.read_noise_e,
    )
    assert (camera.kind, camera.width_px) == ("scmos", 512)

    (tmp_path / "camera" / record.files.offset).unlink()
    with pytest.raises(FileNotFoundError, match=r"camera_offset_adu\.tif"):
        CameraCalibration.read(tmp_path / "camera", record)


def test_summary_is_strict():
    with pytest.raises(ValueError, match="Extra inputs"):
        CameraSummary.model_validate({"unknown": 1})


def test_progress_reports_every_stack(small_inputs):
    seen = []
    calibrate_camera(*small_inputs, progress=lambda what, done, total: seen.append((done, total)))
    assert seen[0] == (0, 4)
    assert seen[-1] == (4, 4)


# -- the simulated camera itself ----------------------------------------------------------


def test_default_camera_has_no_pattern():
    pattern = CameraPattern.build(Camera(), (32, 32))
    assert np.ndim(pattern.offset_adu) == 0
    assert np.ndim(pattern.read_noise_e) == 0
    assert pattern.relative_gain is None
    assert pattern.dark_e_per_s is None
    assert not pattern.hot_pixels.any()


def test_pattern_is_fixed_and_seeded():
    model = _model(32, **SCMOS)
    a, b = model.dark(EXPOSURE_MS), model.dark(EXPOSURE_MS)
    assert not np.array_equal(a, b)  # noise changes between frames ...
    again = CameraPattern.build(model.microscope.camera, (32, 32))  # ... the pattern does not
    np.testing.assert_array_equal(again.offset_adu, model.camera_pattern.offset_adu)
    other = CameraPattern.build(
        model.microscope.camera.model_copy(update={"pattern_seed": 1}), (32, 32)
    )
    assert not np.allclose(other.offset_adu, model.camera_pattern.offset_adu)
    # switching hot pixels on does not redraw the offsets
    no_hot = model.microscope.camera.model_copy(update={"hot_pixel_fraction": 0.0})
    np.testing.assert_array_equal(
        CameraPattern.build(no_hot, (32, 32)).offset_adu, again.offset_adu
    )


def test_hot_pixels_scale_with_exposure():
    model = _model(64, hot_pixel_fraction=0.01, hot_pixel_e_per_s=5000.0, read_noise_e=1.0)
    hot = model.camera_pattern.hot_pixels
    bias = np.mean([model.dark() for _ in range(10)], axis=0)
    long = np.mean([model.dark(100.0) for _ in range(10)], axis=0)
    excess_e = (long - bias)[hot] * model.microscope.camera.gain_e_per_adu
    expected_e = model.camera_pattern.dark_e_per_s[hot] * 0.1
    assert np.median(excess_e / expected_e) == pytest.approx(1.0, abs=0.05)
    assert abs((long - bias)[~hot].mean()) < 0.1  # other pixels have no dark current


def test_emccd_shot_variance_has_excess_noise():
    model = _model(64, kind="emccd", em_gain=500.0, gain_e_per_adu=0.05, read_noise_e=0.0)
    frames = np.stack([model.flat(200.0, 10.0) for _ in range(20)]).astype(float)
    electrons_var = frames.var(axis=0, ddof=1).mean() * 0.05**2
    assert electrons_var / 200.0 == pytest.approx(2 - 1 / 500, rel=0.03)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"em_gain": 100.0}, "em_gain .* needs kind 'emccd'"),
        ({"kind": "ccd", "offset_spread_adu": 2.0}, "offset_spread_adu apply to kind 'scmos'"),
        ({"kind": "emccd", "em_gain": 50.0, "column_noise_adu": 1.0}, "column_noise_adu"),
        ({"hot_pixel_fraction": 0.01}, "needs hot_pixel_e_per_s > 0"),
        ({"kind": "cmos"}, "kind"),
    ],
)
def test_camera_combinations_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        Camera(**fields)
