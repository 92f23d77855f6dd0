"""Real data without ground truth: ZS-DeconvNet trained on the lamp1 TIRF frame itself.

Judged as the data README asks: resolution by decorrelation analysis before and after, and
ringing around bright puncta (dark and bright rings relative to the punctum's amplitude).
The raw frame's resolution is measured on its own grid (interpolating it onto the 2x grid
fools decorrelation analysis with interpolation artefacts); the restoration's both on the 2x
grid and binned back to the camera grid, so the gain does not come from the finer sampling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from livedecon.calibration._baseline import upsample_2x
from livedecon.calibration._config import load_microscope
from livedecon.calibration._first_model import load_training_tiffs, training_psf
from livedecon.calibration._metrics import decorrelation_resolution, find_puncta, ringing
from livedecon.configs import shipped_config_path
from livedecon.engines._networks import Network2DSpec, UNetSpec, fast_2d_spec
from livedecon.engines._training import TrainingConfig, restore, train

# Ringing bound: neither a dark halo nor a bright ring around puncta deeper than 2% of their
# amplitude (median over the 20 brightest isolated puncta). For scale, on this frame: raw 0,
# Richardson-Lucy at 80 iterations 0.047, a Wiener filter (regularisation 0.1) 0.037.
RINGING_BOUND = 0.02


def _train_and_judge(path: Path, spec: Network2DSpec, iterations: int) -> dict[str, float]:
    # Two threads, as measured: another count sums in another order and trains along another
    # path, and a 300-iteration run's background offset moves with it (one thread: flux
    # ratio 1.17 against 1.11, December 2026)
    torch.set_num_threads(2)
    scope = load_microscope(shipped_config_path("microscope_tirf_149.toml"))
    frame = load_training_tiffs([path], scope, is_3d=False).images_e[0]
    psf, _ = training_psf(scope, is_3d=False)
    config = TrainingConfig(
        network=spec, patch_px=64, batch_size=4, iterations=iterations, learning_rate=1e-3
    )
    result = train(
        [frame], psf, config, read_noise_e=scope.camera.read_noise_e, show_progress=False
    )
    restored = restore(result.model, frame, result.scale_e)
    pixel = scope.optics.pixel_size_um
    fwhm_fine_px = 0.51 * scope.optics.emission_um / scope.optics.na / (pixel / 2)
    raw = upsample_2x(frame)
    puncta = find_puncta(raw, fwhm_fine_px, count=20, isolation=5.0)
    binned = restored.reshape(frame.shape[0], 2, frame.shape[1], 2).sum(axis=(1, 3))
    return {
        "raw_um": decorrelation_resolution(frame, pixel),
        "restored_um": decorrelation_resolution(restored, pixel / 2),
        "restored_binned_um": decorrelation_resolution(binned, pixel),
        **{f"raw_{k}": v for k, v in ringing(raw, puncta, fwhm_fine_px).items()},
        **ringing(restored, puncta, fwhm_fine_px, reference=raw),
        "wiener_undershoot": ringing(_wiener(raw, psf), puncta, fwhm_fine_px, raw)["undershoot"],
        "flux_ratio": float(restored.sum() / frame.sum()),
    }


def _wiener(image: np.ndarray, psf: np.ndarray, regularisation: float = 0.01) -> np.ndarray:
    """A deliberately under-regularised deconvolution: it rings, so the measure must see it."""
    kernel = np.zeros_like(image)
    k = psf.shape[0]
    kernel[:k, :k] = psf
    otf = np.fft.fft2(np.roll(kernel, (-(k // 2), -(k // 2)), axis=(0, 1)))
    spectrum = np.fft.fft2(image) * np.conj(otf) / (np.abs(otf) ** 2 + regularisation)
    return np.fft.ifft2(spectrum).real


def _check(figures: dict[str, float]) -> None:
    print(figures)
    assert figures["wiener_undershoot"] > 2 * RINGING_BOUND  # the measure sees real ringing
    assert figures["restored_um"] < 0.8 * figures["raw_um"]
    assert figures["restored_binned_um"] < 0.8 * figures["raw_um"]
    assert figures["undershoot"] <= RINGING_BOUND
    assert figures["overshoot"] <= RINGING_BOUND
    # Photons are moved, not made or lost. 300 iterations of a tiny network measured 1.114 on
    # a 2-core machine in December 2026 (the 3000-iteration fast model 1.005): a short run
    # leaves the dark background a little high; the bound holds that to 15%.
    assert 0.85 < figures["flux_ratio"] < 1.15


def test_short_training_on_lamp1_sharpens_without_ringing(lamp1_path):
    tiny = Network2DSpec(unet=UNetSpec(levels=2, convs_per_block=2, base_width=8), tail_width=32)
    _check(_train_and_judge(lamp1_path, tiny, iterations=300))


@pytest.mark.slow
def test_fast_model_on_lamp1_sharpens_without_ringing(lamp1_path):
    _check(_train_and_judge(lamp1_path, fast_2d_spec(), iterations=3000))
