from __future__ import annotations

import numpy as np
import pytest
import tifffile

from livedecon.calibration._config import default_microscope
from livedecon.calibration._first_model import load_training_tiffs, training_psf
from livedecon.calibration._psf import theoretical_psf
from livedecon.engines._ome_tiff import write_ome_tiff
from livedecon.engines._psf_kernel import PSFError


def test_a_measured_psf_is_resampled_to_the_output_grid(tmp_path):
    scope = default_microscope()
    measured = theoretical_psf(scope.optics, 0.065, 41)[0]  # sampled at the camera pixel
    path = write_ome_tiff(tmp_path / "psf.ome.tif", measured.astype(np.float32), "YX", 0.065)
    psf, record = training_psf(scope, is_3d=False, psf_path=path)
    theory, _ = training_psf(scope, is_3d=False)
    assert record.source == "file"
    assert record.pixel_size_um == pytest.approx(0.0325)
    assert len(record.source_sha256) == 64
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)
    assert psf.max() == pytest.approx(theory.max(), rel=0.1)  # same width on the 2x grid


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p, a: tifffile.imwrite(p, a), "pixel size is unknown"),
        (lambda p, a: write_ome_tiff(p, a, "YX", 2.0), "inconsistent"),
    ],
)
def test_a_psf_without_a_usable_pixel_size_is_refused(tmp_path, write, message):
    path = tmp_path / "psf.tif"
    write(path, np.pad(np.ones((3, 3), np.float32), 10))
    with pytest.raises(PSFError, match=message):
        training_psf(default_microscope(), is_3d=False, psf_path=path)


def test_training_tiffs_become_photoelectrons_and_mismatches_are_refused(tmp_path):
    scope = default_microscope()
    counts = np.full((2, 32, 32), 110, np.uint16)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, counts)
    data = load_training_tiffs([plain], scope, is_3d=False)
    assert len(data.images_e) == 2
    expected = (110 - scope.camera.offset_adu) * scope.camera.gain_e_per_adu
    assert np.allclose(data.images_e[0], expected)
    assert "sha256:" in data.descriptions[0]
    other_pixel = write_ome_tiff(tmp_path / "other.ome.tif", counts, "TYX", 0.1)
    with pytest.raises(ValueError, match=r"pixel size 0\.1 um, but microscope"):
        load_training_tiffs([other_pixel], scope, is_3d=False)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, counts[0])
    with pytest.raises(ValueError, match="is not a z-stack"):
        load_training_tiffs([flat], scope, is_3d=True)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_training_tiffs([tmp_path / "missing.tif"], scope, is_3d=False)
