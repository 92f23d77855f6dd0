"""Training recipes: the time budget, the cosine schedule, weight averaging, machine defaults."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from cpu_threads import TEST_THREADS

from livedecon.engines._networks import Network2DSpec, UNetSpec
from livedecon.engines._training import (
    CPU_BUDGET_MIN,
    TrainingConfig,
    capped_by_passes,
    default_recipe,
    estimate_background,
    learning_rate_factor,
    train,
)

TINY = Network2DSpec(unet=UNetSpec(levels=2, convs_per_block=1, base_width=4), tail_width=8)


@pytest.fixture(scope="module")
def frame_and_psf():
    rng = np.random.default_rng(0)
    frame = rng.poisson(5 + 20 * (rng.random((64, 64)) > 0.97)).astype(np.float32)
    yy, xx = np.mgrid[-3:4, -3:4]
    psf = np.exp(-(yy**2 + xx**2) / 4.0)
    return frame, (psf / psf.sum()).astype(np.float32)


def test_a_time_budget_stops_training_and_keeps_the_weights(frame_and_psf):
    torch.set_num_threads(TEST_THREADS)
    frame, psf = frame_and_psf
    config = TrainingConfig(
        network=TINY,
        patch_px=32,
        batch_size=2,
        iterations=1_000_000,
        budget_min=0.05,
        schedule="cosine",
    )
    started = time.perf_counter()
    result = train([frame], psf, config, show_progress=False)
    assert time.perf_counter() - started < 3 * 60 * 0.05 + 10
    assert 0 < result.iterations_done < 1_000_000
    assert all(math.isfinite(h["total"]) for h in result.history)


def test_max_passes_ends_training_on_little_data_early(frame_and_psf):
    """Passes are patch pixels drawn over pixels given: twice the data, twice the steps."""
    frame, psf = frame_and_psf
    config = TrainingConfig(
        network=TINY, patch_px=32, batch_size=2, iterations=1000, max_passes=3, schedule="cosine"
    )
    one = train([frame], psf, config, show_progress=False)
    assert one.iterations_done == len(one.history) == 6  # 3 x 64 x 64 / (2 x 32 x 32)
    assert one.config is not None
    assert one.config.iterations == 6  # the schedule ends with the cap
    two = capped_by_passes(config, [frame, frame])
    assert two.iterations == 12
    assert capped_by_passes(config.model_copy(update={"max_passes": 1000}), [frame]) == (
        config.model_copy(update={"max_passes": 1000})
    )


def test_the_cosine_schedule_follows_progress_and_the_step_schedule_the_reference():
    cosine = TrainingConfig(schedule="cosine", learning_rate=1e-3)
    assert learning_rate_factor(cosine, 0, 0.0) == pytest.approx(1.0)
    assert learning_rate_factor(cosine, 0, 0.5) == pytest.approx(0.505)
    assert learning_rate_factor(cosine, 0, 1.0) == pytest.approx(0.01)
    step = TrainingConfig(lr_decay_every=100, lr_decay_factor=0.5)
    assert learning_rate_factor(step, 99, 0.9) == 1.0
    assert learning_rate_factor(step, 250, 0.0) == 0.25


def test_weight_averaging_bundles_the_average_not_the_last_step(frame_and_psf):
    torch.set_num_threads(TEST_THREADS)
    frame, psf = frame_and_psf
    plain = TrainingConfig(network=TINY, patch_px=32, batch_size=2, iterations=30)
    averaged = plain.model_copy(update={"ema_decay": 0.9})
    last = train([frame], psf, plain, show_progress=False).model.state_dict()
    mean = train([frame], psf, averaged, show_progress=False).model.state_dict()
    # same seed, same steps: only the averaging differs
    assert any(not torch.equal(last[k], mean[k]) for k in last)


def test_the_default_recipe_fits_the_machine():
    cpu = default_recipe(device="cpu")
    assert cpu.network.kind == "zs-deconvnet-2d-fast"
    assert cpu.budget_min == CPU_BUDGET_MIN
    assert cpu.schedule == "cosine"
    # measured best (README, fourth round): residual deconvolution stage, OTF-preconditioned
    # deconvolution residual with eps from the data
    assert cpu.network.residual
    assert cpu.loss.precondition == "auto"
    # small datasets stop early: long training on little data loses quality (README)
    assert cpu.max_passes == 1500
    assert default_recipe("3d", device="cpu").max_passes == 600
    assert default_recipe("full", device="cpu").network.residual
    gpu = default_recipe(device="cuda")
    assert gpu.network.kind == "zs-deconvnet-2d"
    assert (gpu.iterations, gpu.patch_px, gpu.learning_rate) == (50_000, 128, 5e-5)
    assert gpu.budget_min is None
    assert gpu.max_passes is None
    assert default_recipe("3d", device="cpu").is_3d


def test_the_background_estimate_finds_the_cell_free_level():
    """Sparse puncta on 3 e- of background with shot and read noise: the estimate sits within
    half a photoelectron of the truth, and never below zero on a dark frame."""
    rng = np.random.default_rng(4)
    expected = np.full((128, 128), 3.0)
    expected[rng.random((128, 128)) > 0.98] += 40
    frame = rng.poisson(expected) + rng.normal(0, 1.5, expected.shape)
    assert estimate_background([frame]) == pytest.approx(3.0, abs=0.5)
    assert estimate_background([rng.normal(0, 1.5, (64, 64))]) >= 0.0
