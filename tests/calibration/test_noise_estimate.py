"""The camera's noise from the frames themselves: gain, black level and noise there."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from livedecon.calibration._config import Camera
from livedecon.calibration._first_model import load_training_tiffs
from livedecon.calibration._forward_model import camera_counts
from livedecon.calibration._noise_estimate import (
    NoiseEstimateError,
    camera_disagreement,
    estimate_noise,
)
from livedecon.calibration._quality_bench import Scene, render


@pytest.fixture(scope="module")
def scene():
    """A TIRF frame of filaments and puncta at 50 photons peak, 2 e- background, true gain
    0.5 e-/ADU, offset 100 ADU, read noise 1.5 e-."""
    return render(Scene(structure="mixed", peak_photons=50, size_px=192, seed=7))


def test_the_gain_of_a_simulated_camera_is_recovered(scene):
    estimate = estimate_noise([scene.counts])
    assert estimate.gain_e_per_adu == pytest.approx(0.5, rel=0.1)
    # the black level holds the offset and the flat background (2 e- = 4 ADU)
    assert estimate.black_level_adu == pytest.approx(104, abs=2)
    # noise there: read noise and the background's shot noise, sqrt(1.5^2 + 2) = 2.06 e-
    assert estimate.noise_at_black_e == pytest.approx(2.06, rel=0.2)


@pytest.mark.parametrize("factor", [0.1, 3.0, 300.0])
def test_frames_scaled_by_an_unknown_factor_give_the_scaled_gain(scene, factor):
    scaled = np.rint((scene.counts.astype(np.float64) - 100) * factor + 500)
    estimate = estimate_noise([scaled])
    assert estimate.gain_e_per_adu == pytest.approx(0.5 / factor, rel=0.15)
    assert estimate.noise_at_black_e == pytest.approx(2.06, rel=0.25)


def test_a_dim_frame_whose_noise_spans_a_few_counts_keeps_its_gain():
    """15 photons peak read at 2.5 e-/ADU: the noise spans 1-2 counts. The median absolute
    deviation of integer residuals moves in whole steps (it read this gain 1.71x too high);
    dithered counts give it within the estimator's spread."""
    dim = render(Scene(structure="dense", peak_photons=15, seed=1070))
    counts = np.rint((dim.counts.astype(np.float64) - 100) * 0.2 + 102)
    estimate = estimate_noise([counts])
    assert estimate.gain_e_per_adu == pytest.approx(2.5, rel=0.3)


def test_emccd_excess_noise_halves_the_effective_gain(scene):
    camera = Camera(kind="emccd", em_gain=100, gain_e_per_adu=0.02, read_noise_e=0.1)
    # any smooth photon image will do: the frame's own blurred, several times brighter
    expected = 5 * ndimage.gaussian_filter(scene.electrons.clip(0), 2.0) + 2.0
    counts = camera_counts(expected, camera, np.random.default_rng(1))
    estimate = estimate_noise([counts])
    # F^2 = 2 - 1/100: photoelectron noise looks twice as large as Poisson
    assert estimate.gain_e_per_adu == pytest.approx(0.02 / 1.99, rel=0.15)


def test_given_camera_values_far_off_the_data_are_flagged(scene):
    estimate = estimate_noise([scene.counts])
    assert camera_disagreement(estimate, Camera(gain_e_per_adu=0.5)) is None
    problem = camera_disagreement(estimate, Camera(gain_e_per_adu=5.0))
    assert problem is not None
    assert "camera gain 5 e-/ADU" in problem


def test_a_frame_without_signal_levels_is_refused():
    flat = np.random.default_rng(0).poisson(100, size=(64, 64))
    with pytest.raises(NoiseEstimateError, match="too few distinct signal levels"):
        estimate_noise([np.full((64, 64), 100.0)])
    with pytest.raises(NoiseEstimateError):
        estimate_noise([flat[:16, :16]])


def test_images_whose_noise_does_not_grow_with_signal_are_refused():
    """A processed image (here: a ramp with constant noise) shows no shot noise."""
    ramp = np.linspace(0, 500, 128 * 128).reshape(128, 128)
    noisy = ramp + np.random.default_rng(1).normal(0, 3, ramp.shape)
    with pytest.raises(NoiseEstimateError, match="no shot noise"):
        estimate_noise([noisy])


def test_training_data_without_camera_values_uses_the_estimate(scene, tmp_path, small_microscope):
    path = tmp_path / "frame.tif"
    scaled = np.rint((scene.counts.astype(np.float64) - 100) * 7 + 300).astype(np.uint16)
    tifffile.imwrite(path, scaled)
    scope = small_microscope.model_copy(
        update={"optics": small_microscope.optics.model_copy(update={"pixel_size_um": 0.0626})}
    )
    given = load_training_tiffs([path], scope, is_3d=False, camera_source="auto")
    assert any("--camera estimate" in w for w in given.warnings)  # 0.5 e-/ADU given, 0.07 true
    estimated = load_training_tiffs([path], scope, is_3d=False, camera_source="estimate")
    assert estimated.camera.gain_e_per_adu == pytest.approx(0.5 / 7, rel=0.15)
    # photoelectrons come out right: the background (2 e-) removed, the signal's scale kept
    frame, truth = estimated.images_e[0], scene.electrons - 2.0
    assert np.median(frame - truth) == pytest.approx(0, abs=0.5)
    assert np.percentile(frame, 99.9) == pytest.approx(np.percentile(truth, 99.9), rel=0.15)


def test_the_real_lamp1_frame_gives_a_plausible_camera(lamp1_path):
    estimate = estimate_noise([tifffile.imread(lamp1_path)])
    assert 0.2 < estimate.gain_e_per_adu < 1.0
    assert 95 < estimate.black_level_adu < 115  # the README's offset of about 100 counts
    assert estimate.fit_residual < 0.2
