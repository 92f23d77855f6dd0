from __future__ import annotations

import numpy as np
import pytest
import torch
from cpu_threads import TEST_THREADS

from livedecon.calibration._config import load_microscope
from livedecon.calibration._forward_model import ForwardModel, counts_to_electrons
from livedecon.calibration._psf import theoretical_psf
from livedecon.configs import shipped_config_path
from livedecon.engines._networks import Network3DSpec
from livedecon.engines._psf_kernel import prepare_psf
from livedecon.engines._training import TrainingConfig, restore, train

TINY_3D = Network3DSpec(width=8, residual_groups=1, blocks_per_group=1, attention_reduction=4)


@pytest.fixture(scope="module")
def stack_and_psf():
    scope = load_microscope(shipped_config_path("microscope_widefield_3d.toml"))
    camera = scope.camera.model_copy(update={"width_px": 32, "height_px": 32})
    scope = scope.model_copy(update={"camera": camera})
    model = ForwardModel(scope, noise_seed=3)
    stack = counts_to_electrons(model.acquire_stack(0.0, model.planes_um, 50.0).counts, camera)
    dz = scope.optics.z_step_um  # at the acquisition step; the loss takes every other plane
    psf = theoretical_psf(scope.optics, model.truth_pixel_um, 31, np.arange(-4, 5) * dz)
    return stack, prepare_psf(psf, model.truth_pixel_um, model.truth_pixel_um, max_size_px=9)


def test_3d_training_runs_lowers_its_loss_and_restores_a_stack(stack_and_psf):
    torch.set_num_threads(TEST_THREADS)
    stack, psf = stack_and_psf
    config = TrainingConfig(
        network=TINY_3D,
        patch_px=16,
        patch_slices=8,
        batch_size=2,
        iterations=40,
        learning_rate=1e-3,
    )
    result = train([stack], psf, config, show_progress=False)
    totals = [h["total"] for h in result.history]
    assert all(np.isfinite(totals))
    assert np.mean(totals[-10:]) < np.mean(totals[:10])
    restored = restore(result.model, stack, result.scale_e)
    assert restored.shape == (stack.shape[0], 2 * stack.shape[1], 2 * stack.shape[2])
    assert np.isfinite(restored).all()


def test_a_2d_psf_for_a_3d_network_is_refused(stack_and_psf):
    stack, psf = stack_and_psf
    config = TrainingConfig(network=TINY_3D, patch_px=16, patch_slices=8, iterations=1)
    with pytest.raises(ValueError, match="matching PSF"):
        train([stack], psf[psf.shape[0] // 2], config, show_progress=False)


def test_stacks_too_thin_for_a_patch_are_refused(stack_and_psf):
    stack, psf = stack_and_psf
    config = TrainingConfig(network=TINY_3D, patch_px=16, patch_slices=8, iterations=1)
    with pytest.raises(ValueError, match="cannot hold"):
        train([stack[:5]], psf, config, show_progress=False)


def test_recorrupted_3d_training_sees_every_plane_and_trains(stack_and_psf):
    """plane_stride 1: 3D pairs by recorruption instead of odd/even planes; the loss blurs
    with the full PSF at the acquisition step, and the network restores all planes at once."""
    torch.set_num_threads(TEST_THREADS)
    stack, psf = stack_and_psf
    config = TrainingConfig(
        network=TINY_3D.model_copy(update={"plane_stride": 1}),
        patch_px=16,
        patch_slices=8,
        batch_size=2,
        iterations=40,
        learning_rate=1e-3,
    )
    result = train([stack], psf, config, read_noise_e=1.5, show_progress=False)
    totals = [h["total"] for h in result.history]
    assert np.mean(totals[-10:]) < np.mean(totals[:10])
    restored = restore(result.model, stack, result.scale_e)
    assert restored.shape == (stack.shape[0], 2 * stack.shape[1], 2 * stack.shape[2])
