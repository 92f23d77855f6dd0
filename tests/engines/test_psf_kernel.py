from __future__ import annotations

import numpy as np
import pytest

from livedecon.calibration._psf import fwhm_px, theoretical_psf
from livedecon.engines._psf_kernel import PSFError, prepare_psf

TARGET_UM = 0.0325  # the 2x output grid of the default 65 nm camera


@pytest.fixture(scope="module")
def optics():
    from livedecon.calibration._config import default_microscope

    return default_microscope().optics


def test_prepared_psf_is_odd_centred_normalised(optics):
    kernel = prepare_psf(theoretical_psf(optics, TARGET_UM, 101)[0], TARGET_UM, TARGET_UM)
    assert kernel.ndim == 2
    assert kernel.shape[0] % 2 == 1
    assert kernel.shape[0] == kernel.shape[1]
    assert kernel.sum() == pytest.approx(1.0, abs=1e-5)
    assert kernel.min() >= 0
    assert np.unravel_index(np.argmax(kernel), kernel.shape) == (kernel.shape[0] // 2,) * 2


def test_resampling_keeps_the_physical_width(optics):
    fine = prepare_psf(theoretical_psf(optics, TARGET_UM / 2, 201)[0], TARGET_UM / 2, TARGET_UM)
    native = prepare_psf(theoretical_psf(optics, TARGET_UM, 101)[0], TARGET_UM, TARGET_UM)
    c = native.shape[0] // 2
    assert fwhm_px(fine[c]) == pytest.approx(fwhm_px(native[c]), rel=0.02)
    assert np.abs(fine - native).max() < 0.05 * native.max()


def test_3d_psf_resampled_laterally_only(optics):
    stack = theoretical_psf(optics, TARGET_UM / 2, 101, z_offsets_um=[-0.4, 0.0, 0.4])
    kernel = prepare_psf(stack, TARGET_UM / 2, TARGET_UM, max_size_px=25)
    assert kernel.shape == (3, 25, 25)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-5)


def test_off_centre_psf_is_recentred(optics):
    psf = np.roll(theoretical_psf(optics, TARGET_UM, 101)[0], (7, -5), axis=(0, 1))
    kernel = prepare_psf(psf, TARGET_UM, TARGET_UM)
    assert np.unravel_index(np.argmax(kernel), kernel.shape) == (kernel.shape[0] // 2,) * 2


@pytest.mark.parametrize(
    ("psf", "pixel", "message"),
    [
        (np.ones((15, 15)), None, "pixel size is unknown"),
        (np.ones((15, 15)), 1.0, "inconsistent"),
        (np.full((15, 15), np.nan), TARGET_UM, "no positive finite"),
        (np.ones(15), TARGET_UM, "2D or 3D"),
    ],
    ids=["unknown-pixel", "inconsistent-pixel", "nan", "1d"],
)
def test_unusable_psfs_are_refused(psf, pixel, message):
    with pytest.raises(PSFError, match=message):
        prepare_psf(psf, pixel, TARGET_UM)
