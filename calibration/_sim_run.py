"""Training a SIM bundle on one raw SIM acquisition: what `livedecon train --network sim|dps`
runs.

The frames' constant background is estimated and taken off, the pattern is estimated from the
frames themselves (engines/_sim.py), and the network learns from recorrupted SR pairs behind
the generalised Wiener reconstruction: ZS-DeconvNet-SIM (engines/_sim_training.py) or DPS
(engines/_dps.py). The bundle (engines/_sim_bundle.py) keeps the reconstruction settings, so
the daemon and `restore sim --then` feed the network the SR images it learned from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from livedecon.calibration._config import Optics
from livedecon.calibration._psf import theoretical_psf
from livedecon.engines._bundle import ModelBundle, TrainingRecord
from livedecon.engines._dps import DpsConfig, train_dps_sim
from livedecon.engines._networks import DpsSpec, Network
from livedecon.engines._sim import (
    UPSCALE,
    SimParameters,
    SimSettings,
    detection_cutoff_per_um,
    estimate_parameters,
    reconstruct,
)
from livedecon.engines._sim_bundle import sim_bundle
from livedecon.engines._sim_training import SimTrainingConfig, train_zs_sim
from livedecon.engines._training import estimate_background

SimNetwork = Literal["sim", "dps"]  # ZS-DeconvNet-SIM, DPS
DETECTION_PSF_PX = 63  # the detection PSF on the SR grid


def detection_psf_2x(optics: Optics) -> np.ndarray:
    """The widefield detection PSF on the SR grid (half the camera pixel), summing to 1."""
    psf = theoretical_psf(optics, optics.pixel_size_um / UPSCALE, DETECTION_PSF_PX)[0]
    return psf / psf.sum()


def default_sim_config(network: SimNetwork) -> SimTrainingConfig | DpsConfig:
    """The CPU defaults: ZS-DeconvNet-SIM 1,500 iterations, DPS 1,200 (measured in the README
    on the bench's four SIM scenes, over Wiener: ZS-DeconvNet-SIM +0.74 dB at 600 iterations,
    +1.35 at 1,000, +1.89 at 1,500, +2.30 with the preconditioned loss; DPS with its |.|
    output +1.24 at 300, +2.15 at 1,200, +2.76 preconditioned)."""
    if network == "sim":
        return SimTrainingConfig(iterations=1500)
    return DpsConfig(network=DpsSpec(upsample=False), iterations=1200)


def _sr_background(
    background_e: float,
    shape: tuple[int, ...],
    psf_2x: np.ndarray,
    pixel_um: float,
    cutoff: float,
    settings: SimSettings,
    parameters: SimParameters,
) -> float:
    """What a constant raw background becomes in an SR image (per SR pixel, centre mean)."""
    flat = np.full(shape, background_e)
    image = reconstruct(flat, psf_2x, pixel_um, cutoff, settings, parameters).image
    ny, nx = image.shape
    return float(image[ny // 4 : 3 * ny // 4, nx // 4 : 3 * nx // 4].mean())


def train_sim_bundle(
    frames_e: np.ndarray,
    optics: Optics,
    *,
    angles: int,
    phases: int,
    read_noise_e: float,
    network: SimNetwork,
    config: SimTrainingConfig | DpsConfig,
    name: str,
    data: Sequence[str],
    on_step: Callable[[int], None] | None = None,
) -> ModelBundle:
    """Train `network` on one sequence of raw SIM frames (angles x phases, angle by angle,
    photoelectrons, background included) and bundle it; ValueError when no pattern shows."""
    frames_e = np.asarray(frames_e, dtype=np.float64)
    if frames_e.ndim != 3 or len(frames_e) != angles * phases:
        raise ValueError(
            f"a SIM sequence of {angles} x {phases} frames (F, Y, X) is needed; got shape"
            f" {frames_e.shape}"
        )
    background = estimate_background([frames_e.mean(axis=0)])
    frames = frames_e - background
    psf_2x = detection_psf_2x(optics)
    pixel = optics.pixel_size_um / UPSCALE
    cutoff = detection_cutoff_per_um(optics.na, optics.sample_ri, optics.emission_um)
    settings = SimSettings(angles=angles, phases=phases)
    parameters = estimate_parameters(frames, psf_2x, pixel, cutoff, settings)
    if not any(parameters.modulation):
        raise ValueError(
            "no illumination pattern found in the frames (too dim, not SIM frames, or another"
            " angle, phase or order): a network behind the reconstruction needs one"
        )
    model: Network
    if network == "sim":
        assert isinstance(config, SimTrainingConfig)
        zs = train_zs_sim(frames, psf_2x, parameters, cutoff, read_noise_e, config, on_step)
        model, psf, scale, losses, used = zs.model, zs.sim_psf, zs.scale_e, zs.losses, zs.settings
    else:
        assert isinstance(config, DpsConfig)
        dps = train_dps_sim(frames, psf_2x, parameters, cutoff, read_noise_e, config, on_step)
        assert dps.sim_settings is not None  # SIM training records its reconstruction
        model, scale, losses, used = dps.model, dps.scale_e, dps.losses, dps.sim_settings
        psf = dps.model.psf.numpy()
    sr_background = _sr_background(
        background, frames.shape, psf_2x, pixel, cutoff, used, parameters
    )
    training = TrainingRecord.now(
        data=data,
        config={**config.model_dump(mode="json"), "pattern": parameters.model_dump(mode="json")},
        iterations=len(losses),
        final_loss=float(losses[-1]) if losses else None,
    )
    return sim_bundle(
        model,
        name=name,
        scale_e=scale,
        psf=psf,
        reconstruction=used,
        camera_pixel_um=optics.pixel_size_um,
        na=optics.na,
        emission_um=optics.emission_um,
        sample_ri=optics.sample_ri,
        read_noise_e=read_noise_e,
        background_e=sr_background,
        training=training,
    )
