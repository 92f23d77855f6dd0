"""Richardson-Lucy after the network. 2D: steps from the network's estimate bring back dim
structure the estimate lost, keep the frame's photons, run wherever a bundle restores (offline,
the daemon's processor), and refuse what they cannot do. 3D: a network that serves its denoised
stack has it deconvolved, background kept out of the model's blur."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from pydantic import ValidationError
from scipy import signal
from tiny_specs import TINY_2D, TINY_3D, TINY_3D_DENOISED

from livedecon.daemon._processing import open_processor
from livedecon.engines import _refinement
from livedecon.engines._bundle import (
    BundleError,
    ModelBundle,
    Normalisation,
    PSFRecord,
    TrainingRecord,
)
from livedecon.engines._enums import Backend
from livedecon.engines._networks import build_network
from livedecon.engines._offline import restore_file
from livedecon.engines._ome_tiff import read_ome_tiff, write_ome_tiff
from livedecon.engines._refinement import (
    deconvolve_denoised,
    refine,
    upsample_2x,
    upsample_2x_torch,
)
from livedecon.engines._training import (
    REFINE_ITERATIONS_2D,
    REFINE_ITERATIONS_3D,
    TrainingConfig,
    restore,
)

FINE = 96  # 2x grid of a 48 x 48 frame
BRIGHT, DIM = (30, 30), (62, 66)
BACKGROUND_E, READ_NOISE_E = 3.0, 1.5


def gaussian_psf(size: int = 15, sigma: float = 2.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - size // 2
    psf = np.exp(-(yy**2 + xx**2) / (2 * sigma**2))
    return (psf / psf.sum()).astype(np.float32)


def specimen(dim: bool = True) -> np.ndarray:
    """e- per fine pixel: a bright punctum, a dim one (a quarter as bright), a filament."""
    truth = np.zeros((FINE, FINE))
    truth[BRIGHT] = 400.0
    if dim:
        truth[DIM] = 100.0
    truth[20:80, 75] = 15.0
    return truth


def camera_frame(seed: int = 0) -> np.ndarray:
    """The specimen through the PSF, binned 2x2 onto the camera grid, background and
    Poisson-Gaussian noise: photoelectrons with the background removed."""
    rng = np.random.default_rng(seed)
    blurred = signal.fftconvolve(specimen(), gaussian_psf(), mode="same")
    binned = blurred.reshape(FINE // 2, 2, FINE // 2, 2).sum(axis=(1, 3))
    noisy = rng.poisson(np.clip(binned, 0, None) + BACKGROUND_E)
    return noisy + rng.normal(0, READ_NOISE_E, noisy.shape) - BACKGROUND_E


def contrast(image: np.ndarray, at: tuple[int, int]) -> float:
    """The 3x3 peak at `at` above the median of a ring 6 to 9 pixels out."""
    r, c = at
    patch = image[r - 9 : r + 10, c - 9 : c + 10]
    yy, xx = np.mgrid[-9:10, -9:10]
    ring = (np.hypot(yy, xx) >= 6) & (np.hypot(yy, xx) <= 9)
    return float(patch[8:11, 8:11].max() - np.median(patch[ring]))


def network_like_estimate() -> np.ndarray:
    """What an over-confident network gives: clean, sharp, and without the dim punctum."""
    return signal.fftconvolve(specimen(dim=False), gaussian_psf(9, 1.0), mode="same") + 0.05


def test_refinement_brings_back_a_dim_punctum_the_estimate_lost():
    """As much of it as Richardson-Lucy from a flat start finds in as many steps, while the
    bright punctum keeps the network's sharpness instead of RL's blur."""
    frame, estimate = camera_frame(), network_like_estimate()
    refined = refine(estimate, frame, gaussian_psf(), 8, READ_NOISE_E, BACKGROUND_E)
    flat = np.full_like(estimate, frame.mean() / 4)
    classical = refine(flat, frame, gaussian_psf(), 8, READ_NOISE_E, BACKGROUND_E)
    assert contrast(estimate, DIM) < 0.1
    assert contrast(refined, DIM) > 0.8 * contrast(classical, DIM) > 1.0
    assert contrast(refined, BRIGHT) > 0.8 * contrast(estimate, BRIGHT)
    assert contrast(refined, BRIGHT) > 2 * contrast(classical, BRIGHT)


def test_refinement_keeps_the_frames_photons():
    """Up to RL's own bias: a non-negative estimate cannot follow the noise below zero, so
    the level rises, by less than 5% of the background over the frame."""
    frame = camera_frame()
    estimate = network_like_estimate() - 0.05
    for iterations in (1, REFINE_ITERATIONS_2D):
        refined = refine(estimate, frame, gaussian_psf(), iterations, READ_NOISE_E, BACKGROUND_E)
        rise = (refined.sum() - frame.sum()) / frame.size  # e- per camera pixel
        assert abs(rise) < 0.05 * BACKGROUND_E
        assert refined.min() >= 0


def test_the_frame_is_shared_onto_the_fine_grid_as_richardson_lucy_shares_it():
    frame = camera_frame()[:7, :9].astype(np.float32)  # odd sizes: edges on both sides
    on_device = upsample_2x_torch(torch.from_numpy(frame)).numpy()
    np.testing.assert_allclose(on_device, upsample_2x(frame), atol=1e-5)


def test_a_stream_of_frames_reuses_the_psfs_transfer_function_and_not_a_stale_one():
    """One OTF per PSF and frame shape, kept on its device; another PSF gets its own."""
    frame, estimate, psf = camera_frame(), network_like_estimate(), gaussian_psf()
    _refinement.OTF_CACHE.clear()
    first = refine(estimate, frame, psf, 2, READ_NOISE_E, BACKGROUND_E)
    again = refine(estimate, frame, psf, 2, READ_NOISE_E, BACKGROUND_E)
    assert _refinement.OTF_CACHE.hits == 1
    np.testing.assert_array_equal(again, first)
    wider = gaussian_psf(sigma=2.5)
    other = refine(estimate, frame, wider, 2, READ_NOISE_E, BACKGROUND_E)
    _refinement.OTF_CACHE.clear()
    assert np.array_equal(refine(estimate, frame, wider, 2, READ_NOISE_E, BACKGROUND_E), other)
    assert not np.allclose(other, first)


def test_the_otf_cache_keeps_within_its_budget():
    """Least recently used first out; an OTF larger than the whole budget is not kept."""
    cache = _refinement.OtfCache(budget_bytes=2 * 68 * 33 * 8)  # two OTFs of <= 68 x 64 (c64)
    psf, cpu = gaussian_psf(), torch.device("cpu")
    for size in (64, 64, 66, 64, 68, 200):
        cache.get(psf, (size, 64), cpu)
    assert cache.hits == 2
    kept = [key[2] for key in cache._kept]
    assert kept == [(64, 64), (68, 64)]


def test_zero_iterations_is_the_estimate_itself():
    estimate = network_like_estimate()
    assert refine(estimate, camera_frame(), gaussian_psf(), 0) is estimate


def test_a_psf_larger_than_the_frame_is_cut_to_fit():
    frame = camera_frame()[:6, :6]
    refined = refine(np.ones((12, 12)), frame, gaussian_psf(31, 3.0), 4)
    assert refined.shape == (12, 12)
    assert np.isfinite(refined).all()


@pytest.mark.parametrize(
    ("estimate", "frame", "psf", "iterations", "message"),
    [
        (np.ones((8, 8)), np.ones((4, 4)), np.ones((3, 3)), -1, "0 to 64"),
        (np.ones((8, 8)), np.ones((4, 4)), np.ones((3, 3)), 65, "0 to 64"),
        (np.ones((12, 12)), np.ones((4, 4)), np.ones((3, 3)), 2, "at 1x or 2x"),
        (np.ones((8, 9)), np.ones((4, 4)), np.ones((3, 3)), 2, "at 1x or 2x"),
        (np.ones((2, 8, 8)), np.ones((2, 4, 4)), np.ones((3, 3)), 2, "3D stack with a 3D PSF"),
        (np.ones((8, 8)), np.ones((4, 4)), np.ones((3, 3, 3)), 2, "2D frame with a 2D PSF"),
        (np.ones((2, 8, 8)), np.ones((3, 4, 4)), np.ones((3, 3, 3)), 2, "at 1x or 2x"),
        (np.ones((1, 2, 8, 8)), np.ones((1, 2, 4, 4)), np.ones((1, 3, 3, 3)), 2, "2D frame"),
    ],
)
def test_what_refinement_cannot_do_is_refused(estimate, frame, psf, iterations, message):
    with pytest.raises(ValueError, match=message):
        refine(estimate, frame, psf, iterations)


def test_recipes_refine_in_2d_and_deconvolve_the_denoised_stack_in_3d():
    assert TrainingConfig().refinement == REFINE_ITERATIONS_2D
    assert TrainingConfig(refine_iterations=0).refinement == 0  # the reference method
    assert not TrainingConfig().serves_denoised
    in_3d = TrainingConfig(network=TINY_3D, patch_slices=4)
    assert in_3d.refinement == REFINE_ITERATIONS_3D
    assert in_3d.serves_denoised
    assert in_3d.served_network.serve == "denoised"
    reference = TrainingConfig(network=TINY_3D, patch_slices=4, refine_iterations=0)
    assert not reference.serves_denoised  # the deconvolution stage serves
    assert reference.served_network.serve == "deconvolved"
    for serve, steps in (("deconvolved", None), ("denoised", 0)):  # as a config file names it
        told = type(TINY_3D)(**{**TINY_3D.model_dump(), "serve": serve})
        with pytest.raises(ValidationError, match="exactly when"):
            TrainingConfig(network=told, patch_slices=4, refine_iterations=steps)
    with pytest.raises(ValidationError, match="background 'off'"):
        TrainingConfig(background="estimate", refine_iterations=2)


def _bundle(refine_iterations: int, spec=TINY_2D) -> ModelBundle:
    torch.manual_seed(0)
    is_3d = spec in (TINY_3D, TINY_3D_DENOISED)
    return ModelBundle.from_model(
        build_network(spec),
        name="refining",
        input_pixel_um=0.1,
        z_step_um=0.2 if is_3d else None,
        normalisation=Normalisation(
            scale_e=50.0, camera_offset_adu=100.0, camera_gain_e_per_adu=1.0, read_noise_e=1.5
        ),
        psf=gaussian_psf(5, 1.0)[None].repeat(3, 0) / 3 if is_3d else gaussian_psf(5, 1.0),
        psf_record=PSFRecord(
            source="theoretical",
            description="test",
            pixel_size_um=0.05,
            z_step_um=0.2 if is_3d else None,
        ),
        training=TrainingRecord.now(data=["random weights"], config={}, iterations=0),
        refine_iterations=refine_iterations,
    )


def test_a_3d_bundles_refinement_decides_what_its_network_serves():
    """The same weights hold both stages: refining serves the denoised stack for RL to
    deconvolve, 0 steps the deconvolution stage; a manifest that mixes them is refused."""
    with pytest.raises(BundleError, match="exactly when"):
        _bundle(2, TINY_3D)
    with pytest.raises(BundleError, match="exactly when"):
        _bundle(0, TINY_3D_DENOISED)
    reference = _bundle(0, TINY_3D)
    refining = reference.with_refinement(1)
    assert refining.manifest.serves_denoised
    assert refining.manifest.refine_iterations == 1
    assert refining.manifest.weights_sha256 == reference.manifest.weights_sha256
    alone = refining.with_refinement(0)
    assert not alone.manifest.serves_denoised
    assert alone.manifest == refining.network_alone().manifest == reference.manifest


def test_a_bundles_refinement_can_be_changed_and_is_saved(tmp_path: Path):
    bundle = _bundle(0).with_refinement(6)
    assert ModelBundle.load(bundle.save(tmp_path / "b")).manifest.refine_iterations == 6
    assert bundle.with_refinement(0).manifest.refine_iterations == 0
    with pytest.raises(BundleError, match="refine_iterations"):
        bundle.with_refinement(65)


def test_offline_restore_and_the_daemons_processor_refine_alike(tmp_path: Path):
    counts = (np.clip(camera_frame(), 0, None) + 100).astype(np.uint16)
    raw = write_ome_tiff(tmp_path / "raw.ome.tif", counts, "YX", 0.1)
    outputs = {}
    for iterations in (0, 4):
        bundle = _bundle(iterations)
        directory = bundle.save(tmp_path / f"b{iterations}")
        offline = read_ome_tiff(restore_file(bundle, raw, tmp_path / f"{iterations}.ome.tif"))
        processor = open_processor(directory, Backend.TORCH, frame_shapes=(counts.shape,))
        live = processor.process([counts])[0]
        np.testing.assert_allclose(live, offline.data, rtol=1e-4, atol=1e-3)
        outputs[iterations] = offline.data
    network = outputs[0]
    electrons = counts.astype(np.float32) - 100
    expected = refine(network, electrons, _bundle(4).psf, 4, 1.5)
    np.testing.assert_allclose(outputs[4], expected, rtol=1e-4, atol=1e-3)
    assert np.abs(outputs[4] - network).mean() > 0.1 * np.abs(network).mean()


def blurred_points_3d(background: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, noise-free widefield stack, 3D PSF) on one grid: two points 5 pixels apart."""
    truth = np.zeros((9, 40, 40))
    truth[4, 20, 17] = truth[4, 20, 22] = 500.0
    z, y, x = np.mgrid[-3:4, -7:8, -7:8]
    sigma = 1.5 + 0.8 * np.abs(z)  # wider out of focus
    psf = np.exp(-(y**2 + x**2) / (2 * sigma**2)) / sigma**2
    psf /= psf.sum()
    stack = signal.fftconvolve(truth, psf, mode="same") + background
    return truth, np.clip(stack, 0, None).astype(np.float32), psf.astype(np.float32)


def test_a_denoised_stack_is_deconvolved_and_keeps_its_background_level():
    """Two steps separate two points its blur merges, in the focal plane; the background is
    the stack's flat floor before and after; the photons stay."""
    truth, stack, psf = blurred_points_3d(background=2.0)
    out = deconvolve_denoised(stack, psf, REFINE_ITERATIONS_3D)
    assert out.shape == stack.shape

    def dip(image: np.ndarray) -> float:  # the midpoint against the two peaks
        row = image[4, 20]
        return float(row[19:21].mean() / min(row[17], row[22]))

    assert dip(out) < dip(stack) - 0.02  # 0.67 -> 0.64 in two steps
    assert np.median(out[:, :4, :4]) == pytest.approx(2.0, abs=0.05)
    assert out.sum() == pytest.approx(stack.sum(), rel=0.02)
    assert (
        np.corrcoef(out.ravel(), truth.ravel())[0, 1]
        > np.corrcoef(stack.ravel(), truth.ravel())[0, 1]
    )
    assert deconvolve_denoised(stack, psf, 0) is stack


def test_a_3d_network_serves_its_denoised_stack_on_the_output_grid_at_inference_only():
    torch.manual_seed(0)
    model = build_network(TINY_3D_DENOISED)
    x = torch.rand(1, 1, 5, 8, 8)
    model.train()
    _, trained_output = model(x)
    model.eval()
    with torch.no_grad():
        denoised, served = model(x)
        deconvolved = model.deconvolver(denoised)
    assert served.shape == deconvolved.shape == (1, 1, 5, 16, 16)
    assert not torch.allclose(served, deconvolved)
    on_camera_grid = denoised[0, 0].numpy()
    # the shared-onto-the-grid stack, before restoring divides each value among 4 pixels
    expected = np.stack([upsample_2x(plane) * 4 for plane in on_camera_grid])
    np.testing.assert_allclose(served[0, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert trained_output.shape == served.shape  # training still sees the deconvolver


def test_restoring_with_a_denoised_serving_3d_bundle_deconvolves_its_stack(tmp_path: Path):
    """restore_file, the daemon's processor, and the torch model then deconvolve_denoised."""
    bundle = _bundle(2, TINY_3D_DENOISED)
    directory = bundle.save(tmp_path / "b")
    counts = np.random.default_rng(1).poisson(20, (5, 16, 16)).astype(np.uint16) + 100
    raw = write_ome_tiff(tmp_path / "raw.ome.tif", counts, "ZYX", 0.1, z_step_um=0.2)
    written = restore_file(bundle, raw, tmp_path / "out.ome.tif")
    offline = read_ome_tiff(written).data
    with tifffile.TiffFile(written) as tif:  # the provenance says what ran after the network
        assert "then 2 Richardson-Lucy steps on its denoised stack" in (tif.ome_metadata or "")
    processor = open_processor(directory, Backend.TORCH, frame_shapes=(counts.shape[1:],))
    live = processor.process([counts])[0]
    np.testing.assert_allclose(live, offline, rtol=1e-4, atol=1e-4)
    norm = bundle.manifest.normalisation
    served = restore(bundle.build_model(), norm.electrons(counts), norm.scale_e)
    expected = deconvolve_denoised(served * bundle.flux_share, bundle.psf, 2)
    np.testing.assert_allclose(offline, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(offline - served * bundle.flux_share).mean() > 0.01 * np.abs(expected).mean()
