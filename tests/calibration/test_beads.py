"""The PSF measured from simulated bead slides against the PSF the simulator blurred with.

The simulator renders each bead as a point on its 2x grid and blurs it with the theoretical
PSF, so the truth is known exactly: the theoretical PSF integrated over a camera pixel
(computed here independently of calibration._beads, on an 8x finer grid with trapezoid
weights). Tolerances: lateral FWHM 5 %, axial 10 %. With 65 nm pixels the lateral FWHM is
only 3.5 pixels, so a registration error of a tenth of a pixel broadens it by about 1 %, and
leaving out the pixel integration would be 2 %; 5 % is a few times the spread seen over
noise seeds while still catching a wrong centre or a missing background. Axially the z step
is 0.2 um for a 0.5-0.9 um FWHM, and defocused planes carry the haze of the other beads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from livedecon.calibration import _beads as beads_module
from livedecon.calibration._beads import (
    MeasuredPSF,
    measure_psf,
    pixel_integrated_psf,
    psf_fwhm_um,
    write_measured_psf,
)
from livedecon.calibration._config import (
    MicroscopeConfig,
    Optics,
    Sample,
    default_microscope,
    load_microscope,
)
from livedecon.calibration._first_model import training_psf
from livedecon.calibration._forward_model import ForwardModel, counts_to_electrons
from livedecon.calibration._psf import theoretical_psf
from livedecon.calibration._sample import SyntheticSample
from livedecon.configs import shipped_config_path

LATERAL_TOLERANCE = 0.05
AXIAL_TOLERANCE = 0.10


@dataclass
class Slide:
    scope: MicroscopeConfig
    electrons: np.ndarray  # (Z, Y, X) or (Y, X), offset removed
    z_step_um: float | None
    focus_index: int  # plane where the focus is at the beads
    true_yx_px: np.ndarray  # (n, 2) bead centres on the camera grid
    measured: MeasuredPSF


def _bead_slide(
    scope: MicroscopeConfig, size_px: int, planes: int, exposure_ms: float, **sample: object
) -> Slide:
    camera = scope.camera.model_copy(update={"width_px": size_px, "height_px": size_px})
    settings = dict(kind="beads", depth_um=0.0, n_beads=30, background_photons_px_s=200.0)
    scope = scope.model_copy(update={"camera": camera, "sample": Sample(**settings | sample)})
    model = ForwardModel(scope, noise_seed=11)
    dz = scope.optics.z_step_um
    z_um = (np.arange(planes) - planes // 2) * dz
    counts = model.acquire_stack(0.0, z_um, exposure_ms).counts
    electrons = counts_to_electrons(counts, scope.camera)
    if planes == 1:
        electrons, dz = electrons[0], None
    centres = model.sample.bead_centres_um(model.truth_pixel_um)
    true_yx = centres[:, 1:] / scope.optics.pixel_size_um - 0.5
    measured = measure_psf(electrons, scope.optics.pixel_size_um, dz, optics=scope.optics)
    return Slide(scope, electrons, dz, planes // 2, true_yx, measured)


@pytest.fixture(scope="module")
def widefield() -> Slide:
    """1.4 NA oil widefield (the default simulated microscope), a focus series +-2 um,
    with clumped pairs on the slide."""
    return _bead_slide(
        default_microscope(), 256, 21, 50.0, n_beads=36, bead_pair_fraction=0.3, seed=3
    )


@pytest.fixture(scope="module")
def widefield_water() -> Slide:
    """1.2 NA water widefield, 92.5 nm pixels (configs/microscope_widefield_3d.toml)."""
    scope = load_microscope(shipped_config_path("microscope_widefield_3d.toml"))
    return _bead_slide(scope, 128, 33, 50.0, n_beads=24, seed=1)


@pytest.fixture(scope="module")
def tirf() -> Slide:
    """1.49 NA TIRF, one in-focus frame (configs/microscope_tirf_149.toml)."""
    scope = load_microscope(shipped_config_path("microscope_tirf_149.toml"))
    return _bead_slide(scope, 256, 1, 30.0, n_beads=30, bead_min_separation_um=2.5, seed=2)


def _true_psf(optics: Optics, pixel_um: float, size_px: int, z_offsets: np.ndarray) -> np.ndarray:
    """The simulator's PSF integrated over a camera pixel centred on the emitter: an 8x
    finer grid, trapezoid weights over the pixel's width, sampled at the pixel pitch."""
    k = 8
    n = size_px * k + 1
    fine = theoretical_psf(optics, pixel_um / k, n, z_offsets)
    weights = np.ones(k + 1)
    weights[[0, -1]] = 0.5
    weights /= k
    for axis in (1, 2):
        fine = np.apply_along_axis(np.convolve, axis, fine, weights, mode="same")
    c = n // 2
    picks = c + (np.arange(size_px) - size_px // 2) * k
    return fine[:, picks][:, :, picks]


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _check_against_truth(slide: Slide, name: str) -> None:
    m = slide.measured
    optics, pixel = slide.scope.optics, slide.scope.optics.pixel_size_um
    size = m.psf.shape[-1]
    if m.psf.ndim == 3:
        hz = m.psf.shape[0] // 2
        truth = _true_psf(optics, pixel, size, (np.arange(2 * hz + 1) - hz) * slide.z_step_um)
    else:
        truth = _true_psf(optics, pixel, size, [0.0])[0]
    true_fwhm = psf_fwhm_um(truth, pixel, slide.z_step_um)
    ncc = _ncc(m.psf, truth)
    print(f"\n{name}: {m.summary()}")
    for axis, got, want, theory in zip("xyz", m.fwhm_um, true_fwhm, m.theory_fwhm_um, strict=True):
        if got is not None:
            print(
                f"  {axis}: measured {got * 1000:.1f} nm, truth {want * 1000:.1f} nm"
                f" ({got / want - 1:+.2%}), reported theory {theory * 1000:.1f} nm"
            )
    print(f"  normalised cross-correlation with the truth: {ncc:.4f}")
    for got, want, theory in zip(m.fwhm_um[:2], true_fwhm[:2], m.theory_fwhm_um[:2], strict=True):
        assert got == pytest.approx(want, rel=LATERAL_TOLERANCE)
        assert theory == pytest.approx(want, rel=0.01)  # the reported theory is the truth
    if m.psf.ndim == 3:
        assert m.fwhm_um[2] == pytest.approx(true_fwhm[2], rel=AXIAL_TOLERANCE)
        assert m.theory_fwhm_um[2] == pytest.approx(true_fwhm[2], rel=0.01)
        assert m.psf[m.psf.shape[0] // 2].sum() == pytest.approx(1.0)
    else:
        assert m.fwhm_um[2] is None
        assert m.psf.sum() == pytest.approx(1.0)
    assert m.psf.min() >= 0
    assert ncc > 0.98


def _check_beads(slide: Slide, centre_tolerance_px: float) -> None:
    """Used beads sit where beads were placed, are isolated, and every isolated bead well
    inside the frame was used."""
    m = slide.measured
    used = m.centres_px
    true = slide.true_yx_px
    dist = np.hypot(*(true[:, None, :] - true[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(dist, np.inf)
    pixel = slide.scope.optics.pixel_size_um
    for centre in used:
        error = np.hypot(*(true - centre[-2:]).T)
        k = int(np.argmin(error))
        assert error[k] < centre_tolerance_px, f"bead at {centre} is not where one was placed"
        assert dist[k].min() * pixel > 2.0, "a bead with a close neighbour was used"
        if used.shape[1] == 3:  # focus found at the plane where the beads are
            assert abs(centre[0] - slide.focus_index) < 0.25
    half = m.psf.shape[-1] // 2 + 3
    size = slide.electrons.shape[-1]
    inside = np.all((true >= half) & (true < size - half - 1), axis=1)
    isolated = dist.min(axis=1) > m.psf.shape[-1] + 1  # the default min separation, + 1 px
    expected = np.flatnonzero(inside & isolated)
    assert len(expected) >= 5
    for k in expected:
        assert np.hypot(*(used[:, -2:] - true[k]).T).min() < 0.5, f"isolated bead {k} unused"


def test_widefield_psf_from_beads_matches_the_true_psf(widefield):
    _check_against_truth(widefield, "1.4 NA widefield, 65 nm pixels, 0.2 um steps")
    _check_beads(widefield, centre_tolerance_px=0.1)


def test_close_pairs_are_rejected(widefield):
    m = widefield.measured
    true = widefield.true_yx_px
    dist = np.hypot(*(true[:, None, :] - true[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(dist, np.inf)
    pixel = widefield.scope.optics.pixel_size_um
    close = dist.min(axis=1) * pixel < 1.5
    print(f"\n{close.sum()} of {len(true)} placed beads have a neighbour within 1.5 um")
    print(f"candidates {len(m.beads)}, used {m.beads_used}, rejected {m.rejected}")
    assert close.sum() >= 6  # the fixture's slide has clumps to reject
    assert m.rejected.get(beads_module.NEIGHBOUR, 0) >= 4
    assert m.rejected.get(beads_module.EDGE, 0) >= 1


def test_an_unresolved_doublet_is_rejected(widefield):
    """Put a second bead 130 nm (2 pixels) beside a used one: twice as bright, a little
    wider, and not resolved into two peaks."""
    m = widefield.measured
    _z, y, x = np.round(m.centres_px[0]).astype(int)
    stack = widefield.electrons.copy()
    h = 12
    bead = stack[:, y - h : y + h + 1, x - h : x + h + 1] - m.background
    stack[:, y - h : y + h + 1, x - h + 2 : x + h + 3] += bead
    doublet = measure_psf(stack, 0.065, widefield.z_step_um, optics=widefield.scope.optics)
    status = {b.centre_px[1:]: b.status for b in doublet.beads}
    near = [s for (by, bx), s in status.items() if abs(by - y) < 2 and abs(bx - x - 1) < 2]
    assert near == [beads_module.BRIGHT]
    assert doublet.beads_used == m.beads_used - 1


def test_water_objective_stack_matches_the_true_psf(widefield_water):
    _check_against_truth(widefield_water, "1.2 NA water widefield, 92.5 nm pixels")
    _check_beads(widefield_water, centre_tolerance_px=0.1)


def test_tirf_frame_gives_a_lateral_psf(tirf):
    _check_against_truth(tirf, "1.49 NA TIRF, one frame, 62.6 nm pixels")
    _check_beads(tirf, centre_tolerance_px=0.15)  # one frame: fewer photons per bead


def test_without_optics_the_sizes_come_from_the_beads(widefield):
    m = measure_psf(widefield.electrons, 0.065, widefield.z_step_um, average="median")
    assert m.theory_fwhm_um is None
    assert m.theory_psf is None
    assert m.beads_used == widefield.measured.beads_used
    for got, want in zip(m.fwhm_um, widefield.measured.fwhm_um, strict=True):
        assert got == pytest.approx(want, rel=0.03)


def test_the_written_psf_trains_a_model_2d_and_3d(widefield, tirf, tmp_path):
    scope_3d = widefield.scope
    path_3d = write_measured_psf(tmp_path / "psf3d.ome.tif", widefield.measured)
    psf_3d, record = training_psf(scope_3d, is_3d=True, psf_path=path_3d)
    assert record.source == "file"
    assert record.z_step_um == pytest.approx(0.2)
    assert psf_3d.ndim == 3
    assert psf_3d.sum() == pytest.approx(1.0, abs=1e-4)
    # the in-focus plane of the stack serves a 2D model too
    psf_2d, _ = training_psf(scope_3d, is_3d=False, psf_path=path_3d)
    theory_2d, _ = training_psf(scope_3d, is_3d=False)
    assert psf_2d.shape == theory_2d.shape
    print(f"\nprepared measured vs theoretical 2D training PSF: NCC {_ncc(psf_2d, theory_2d):.4f}")
    assert _ncc(psf_2d, theory_2d) > 0.95
    path_2d = write_measured_psf(tmp_path / "psf2d.ome.tif", tirf.measured)
    psf_tirf, record = training_psf(tirf.scope, is_3d=False, psf_path=path_2d)
    assert psf_tirf.ndim == 2
    assert record.pixel_size_um == pytest.approx(0.0313)


def test_psf_fwhm_um_of_a_gaussian_is_exact_to_a_percent():
    sigma_px = 1.3  # 3.06 pixels FWHM: as coarse as a camera samples a PSF
    z, y, x = np.mgrid[-10:11, -15:16, -15:16].astype(float)
    psf = np.exp(-(x**2 + y**2) / (2 * sigma_px**2) - z**2 / (2 * 2.2**2))
    fx, fy, fz = psf_fwhm_um(psf, 0.1, 0.2)
    assert fx == pytest.approx(2.3548 * sigma_px * 0.1, rel=0.01)
    assert fy == pytest.approx(fx)
    assert fz == pytest.approx(2.3548 * 2.2 * 0.2, rel=0.01)
    assert psf_fwhm_um(psf[10], 0.1)[2] is None
    assert psf_fwhm_um(psf[10:11], 0.1)[2] is None  # a one-plane stack is 2D
    with pytest.raises(ValueError, match="z step"):
        psf_fwhm_um(psf, 0.1)
    with pytest.raises(ValueError, match="does not fall below half"):
        psf_fwhm_um(psf[8:13], 0.1, 0.2)


def test_pixel_integration_widens_the_theory_slightly():
    optics = default_microscope().optics
    point = theoretical_psf(optics, 0.065 / 9, 41 * 9)[0]  # finely sampled, not integrated
    integrated = pixel_integrated_psf(optics, 0.065, 41)[0]
    assert integrated.sum() == pytest.approx(1.0, rel=1e-6)
    wide = psf_fwhm_um(integrated, 0.065)[0]
    narrow = psf_fwhm_um(point, 0.065 / 9)[0]
    assert 1.005 < wide / narrow < 1.04


def test_bead_slide_is_points_and_the_cell_sample_is_unchanged():
    sample = Sample(kind="beads", n_beads=12, bead_pair_fraction=0.5, seed=4)
    slide = SyntheticSample(sample, (10.0, 10.0))
    assert len(slide.bead_positions_um) == 12
    image = slide.render(0.0, 0.05, (200, 200), np.zeros(1))[0]
    assert np.count_nonzero(image > 1e-3) == 12  # each bead one grid point
    assert image.sum() == pytest.approx(slide.bead_photons_s.sum(), rel=1e-5)
    centres = slide.bead_centres_um(0.05)
    rows, cols = (centres[:, 1] / 0.05).astype(int), (centres[:, 2] / 0.05).astype(int)
    assert np.allclose(image[rows, cols], slide.bead_photons_s, rtol=1e-5)
    assert np.all(slide.render(50.0, 0.05, (200, 200), np.zeros(1))[0] == image)  # static
    cell = default_microscope().sample
    assert cell.kind == "cell"
    assert len(SyntheticSample(cell, (10.0, 10.0)).bead_positions_um) == 0


# -- bad input -----------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(widefield):
    stack, dz = widefield.electrons, widefield.z_step_um
    optics = widefield.scope.optics
    with pytest.raises(ValueError, match=r"\(Z, Y, X\) focus series or a \(Y, X\) frame"):
        measure_psf(stack[None, None], 0.065, dz)
    with pytest.raises(ValueError, match=r"\(Z, Y, X\) focus series or a \(Y, X\) frame"):
        measure_psf(stack[0, 0], 0.065, dz)
    with pytest.raises(ValueError, match="needs its z step"):
        measure_psf(stack, 0.065, None)
    with pytest.raises(ValueError, match="too short to hold the axial profile"):
        measure_psf(stack[8:12], 0.065, dz)
    with pytest.raises(ValueError, match="too short to hold the axial profile"):
        measure_psf(stack[8:13], 0.065, dz, optics=optics)  # +-0.4 um for a 0.5 um FWHM
    with pytest.raises(ValueError, match="NaN"):
        measure_psf(np.where(stack == stack.max(), np.nan, stack), 0.065, dz)
    with pytest.raises(ValueError, match="pixel_size_um must be positive"):
        measure_psf(stack, 0.0, dz)


def test_no_beads_and_too_few_beads(widefield):
    rng = np.random.default_rng(0)
    noise = rng.poisson(10.0, size=(9, 64, 64)).astype(float)
    with pytest.raises(ValueError, match="no beads found"):
        measure_psf(noise, 0.065, 0.2)
    with pytest.raises(ValueError, match="no beads found"):
        measure_psf(noise, 0.065, 0.2, optics=widefield.scope.optics)
    with pytest.raises(ValueError, match="no beads found"):
        measure_psf(noise[4], 0.065, optics=widefield.scope.optics)
    with pytest.raises(ValueError, match=r"no beads found: .* faint spots"):
        measure_psf(widefield.electrons, 0.065, 0.2, optics=widefield.scope.optics, min_snr=1e5)
    corner = widefield.electrons[:, :70, :70]
    with pytest.raises(ValueError, match=r"too few isolated beads: \d+ usable of \d+ found"):
        measure_psf(corner, 0.065, 0.2, optics=widefield.scope.optics)


def test_dim_and_saturated_beads_are_rejected_with_reasons(widefield):
    stack, dz, optics = widefield.electrons, widefield.z_step_um, widefield.scope.optics
    m = widefield.measured
    snr = sorted(b.snr for b in m.beads if b.status == "used")
    dim = measure_psf(stack, 0.065, dz, optics=optics, min_snr=snr[2] + 1e-6, min_beads=3)
    assert dim.rejected[beads_module.DIM] == 3
    assert dim.beads_used == m.beads_used - 3
    with pytest.raises(ValueError, match=r"too few isolated beads.*too dim"):
        measure_psf(stack, 0.065, dz, optics=optics, min_snr=snr[-3] + 1e-6)
    # clip the three brightest beads, as a camera at full scale would
    peaks = sorted(stack.max(axis=0)[tuple(np.round(c[1:]).astype(int))] for c in m.centres_px)
    level = 0.5 * (peaks[-3] + peaks[-4])
    clipped = measure_psf(np.minimum(stack, level), 0.065, dz, optics=optics)
    assert clipped.rejected[beads_module.SATURATED] == 3
    assert clipped.beads_used == m.beads_used - 3
    given = measure_psf(stack, 0.065, dz, optics=optics, saturation=level)
    assert given.rejected[beads_module.SATURATED] == 3
