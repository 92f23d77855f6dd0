from __future__ import annotations

import numpy as np
import pytest
import torch
from cpu_threads import TEST_THREADS

from livedecon.calibration._config import default_microscope
from livedecon.calibration._forward_model import ForwardModel, counts_to_electrons
from livedecon.calibration._psf import theoretical_psf
from livedecon.engines._adaptation import AdaptationConfig, Adapter, fine_tune
from livedecon.engines._networks import Network2DSpec, UNetSpec
from livedecon.engines._psf_kernel import prepare_psf
from livedecon.engines._training import TrainingConfig, train

TINY = Network2DSpec(unet=UNetSpec(levels=2, convs_per_block=1, base_width=8), tail_width=16)
CONFIG = AdaptationConfig(learning_rate=1e-3, patch_px=32, batch_size=4, validation_batches=2)


def _frames(seed: int, n: int) -> list[np.ndarray]:
    scope = default_microscope()
    camera = scope.camera.model_copy(update={"width_px": 64, "height_px": 64})
    sample = scope.sample.model_copy(update={"seed": seed})
    scope = scope.model_copy(update={"camera": camera, "sample": sample})
    model = ForwardModel(scope, noise_seed=seed)
    return [counts_to_electrons(model.acquire(5.0 * t, 0.0, 20.0).counts, camera) for t in range(n)]


@pytest.fixture(scope="module")
def served():
    """A model briefly trained on one specimen, and frames of a different one."""
    torch.set_num_threads(TEST_THREADS)
    scope = default_microscope()
    pixel = scope.optics.pixel_size_um / 2
    psf = prepare_psf(theoretical_psf(scope.optics, pixel, 41)[0], pixel, pixel, max_size_px=15)
    config = TrainingConfig(
        network=TINY, patch_px=32, batch_size=4, iterations=60, learning_rate=1e-3
    )
    result = train(_frames(0, 3), psf, config, show_progress=False)
    return result, psf, _frames(7, 2)


def test_fine_tuning_on_new_data_lowers_its_validation_loss(served):
    result, psf, new = served
    serving = {k: v.clone() for k, v in result.model.state_dict().items()}
    weights, history = fine_tune(TINY, serving, new, psf, result.scale_e, 40, CONFIG)
    assert len(history) == 40
    adapter = Adapter(TINY, serving, psf, result.scale_e, CONFIG)
    before = adapter.validation_loss(new)
    after = adapter.validation_loss(new, weights)
    assert after < before
    # the serving weights were neither trained nor aliased
    for name, value in result.model.state_dict().items():
        assert torch.equal(serving[name], value)
        assert weights[name].data_ptr() != value.data_ptr()


def test_validation_loss_is_repeatable_and_weights_sensitive(served):
    result, psf, new = served
    adapter = Adapter(TINY, result.model.state_dict(), psf, result.scale_e, CONFIG)
    first = adapter.validation_loss(new)
    assert adapter.validation_loss(new) == first
    zeroed = {k: torch.zeros_like(v) for k, v in adapter.weights().items()}
    assert adapter.validation_loss(new, zeroed) != first


def test_adapter_steps_only_with_data_and_reloads_weights(served):
    result, psf, new = served
    adapter = Adapter(TINY, result.model.state_dict(), psf, result.scale_e, CONFIG)
    with pytest.raises(RuntimeError, match="set_data"):
        adapter.step()
    adapter.set_data(new)
    adapter.step()
    assert adapter.steps_done == 1
    changed = adapter.weights()
    assert any(not torch.equal(changed[k], v) for k, v in result.model.state_dict().items())
    adapter.load_weights(result.model.state_dict())
    assert all(torch.equal(adapter.weights()[k], v) for k, v in result.model.state_dict().items())
    with pytest.raises(ValueError, match="at least 1"):
        fine_tune(TINY, changed, new, psf, result.scale_e, 0, CONFIG)


@pytest.mark.gpu
def test_training_and_adaptation_run_on_the_gpu(served):
    result, psf, new = served
    config = TrainingConfig(
        network=TINY, patch_px=32, batch_size=4, iterations=20, learning_rate=1e-3
    )
    trained = train(new, psf, config, show_progress=False, device="cuda")
    assert next(trained.model.parameters()).is_cuda
    assert np.isfinite([h["total"] for h in trained.history]).all()
    weights, _ = fine_tune(TINY, result.model.state_dict(), new, psf, result.scale_e, 5, CONFIG)
    assert all(not w.is_cuda for w in weights.values())  # handed out on the CPU
