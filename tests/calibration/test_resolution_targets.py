"""Line and bead pair targets: geometry, and the resolved-separation rule against blurs of
known width (two Gaussians of FWHM w show a 20% dip from about 1.25 w apart)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from livedecon.calibration._resolution_targets import (
    LINE_PX,
    SEPARATIONS_NM,
    pair_target,
    resolved,
    smallest_resolved,
)

FINE_UM = 0.0313


@pytest.mark.parametrize("kind", ["lines", "beads"])
def test_a_target_holds_one_pair_per_separation_at_that_separation(kind):
    target = pair_target(kind, FINE_UM)
    members = LINE_PX if kind == "lines" else 1
    assert target.specimen.sum() == pytest.approx(2 * members * len(SEPARATIONS_NM))
    for (_, left, right), separation in zip(target.centres, SEPARATIONS_NM, strict=True):
        assert (right - left) * FINE_UM * 1000 == pytest.approx(separation)


@pytest.mark.parametrize("kind", ["lines", "beads"])
@pytest.mark.parametrize("fwhm_nm", [80.0, 120.0, 200.0])
def test_the_smallest_resolved_separation_follows_the_blur(kind, fwhm_nm):
    target = pair_target(kind, FINE_UM)
    sigma_px = fwhm_nm / 2.355 / (1000 * FINE_UM)
    image = ndimage.gaussian_filter(target.specimen, sigma_px)
    found = smallest_resolved(image, target)
    assert found is not None
    assert 1.1 * fwhm_nm <= found <= 1.45 * fwhm_nm + 20  # 20 nm: the separations' step


def test_noise_alone_resolves_nothing_and_a_single_blob_is_not_a_pair():
    target = pair_target("beads", FINE_UM)
    flat = np.random.default_rng(0).normal(1.0, 0.01, target.specimen.shape)
    assert smallest_resolved(flat, target) is None
    # a blob centred between the members of the widest pair: one peak, no dip
    wide = int(np.argmax(target.separations_nm))
    row, left, right = target.centres[wide]
    blob = np.zeros_like(target.specimen)
    blob[int(row), round((left + right) / 2)] = 1.0
    assert not resolved(ndimage.gaussian_filter(blob, 3.0), target, wide)
