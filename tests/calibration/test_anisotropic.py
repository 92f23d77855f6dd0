"""The anisotropic volume simulator's optics: the light-sheet PSF and rendered volumes."""

from __future__ import annotations

import numpy as np
import pytest

from livedecon.calibration._anisotropic import AnisotropicScene, render_anisotropic
from livedecon.calibration._config import Optics
from livedecon.calibration._psf import theoretical_psf


def test_a_light_sheet_lights_only_its_thickness():
    """Widefield detection under a Gaussian sheet: a plane at offset z keeps the widefield
    plane's light times the sheet's profile (half of it at half the FWHM)."""
    z = np.array([0.0, 0.5, 1.0, 2.0])
    widefield = theoretical_psf(Optics(na=0.8, immersion_ri=1.33), 0.1, 31, z)
    sheet = theoretical_psf(Optics(na=0.8, immersion_ri=1.33, modality="light-sheet",
                                   sheet_fwhm_um=1.0), 0.1, 31, z)  # fmt: skip
    ratio = sheet.sum(axis=(1, 2)) / widefield.sum(axis=(1, 2))
    np.testing.assert_allclose(ratio, [1.0, 0.5, 0.5**4, 0.5**16], rtol=1e-6)


def test_light_sheet_volumes_are_sharper_along_z_than_widefield():
    """At a low detection NA (long depth of field) a 1 um sheet sets the axial resolution:
    the rendered volume's axial FWHM shrinks, and its isotropic truth is the same."""
    common = {"na": 0.8, "ratio": 4, "planes": 8, "size_px": 32, "noise": False}
    wide = render_anisotropic(AnisotropicScene(modality="widefield", **common))
    sheet = render_anisotropic(AnisotropicScene(modality="light-sheet", **common))
    assert sheet.axial_fwhm_px < 0.8 * wide.axial_fwhm_px, (sheet.axial_fwhm_px, wide.axial_fwhm_px)
    assert sheet.lateral_fwhm_px == pytest.approx(wide.lateral_fwhm_px)
    np.testing.assert_allclose(
        sheet.truth / sheet.truth.max(), wide.truth / wide.truth.max(), atol=1e-6
    )
