"""SIM model bundles: a network (ZS-DeconvNet-SIM, DPS) behind the Wiener SIM reconstruction.

A SIM bundle follows the bundle rules (engines/_bundle.py). Its network restores SR-SIM
images, float32 photoelectrons per output pixel at half the camera pixel, onto the same grid:
the normalisation has offset 0 and gain 1 (the reconstruction already turned counts into
photoelectrons), psf.tif holds the SIM PSF (the reconstruction of a point), and the manifest's
`sim` record keeps the reconstruction settings with the Wiener constant fixed. The daemon and
`livedecon restore sim --then` reconstruct with those settings, so the network sees the noise
and resolution it learned.
"""

from __future__ import annotations

import math

import numpy as np

from livedecon.engines._bundle import (
    ModelBundle,
    Normalisation,
    PSFRecord,
    SimRecord,
    TrainingRecord,
)
from livedecon.engines._networks import Network
from livedecon.engines._sim import UPSCALE, SimSettings

NA_TOLERANCE = 0.02  # absolute: the SIM PSF and the pattern's reach depend on the NA
EMISSION_TOLERANCE = 0.03  # relative
PIXEL_TOLERANCE = 0.02  # relative, as the daemon's check of a plan's pixel size


def sim_bundle(
    model: Network,
    *,
    name: str,
    scale_e: float,
    psf: np.ndarray,
    reconstruction: SimSettings,
    camera_pixel_um: float,
    na: float,
    emission_um: float,
    sample_ri: float,
    read_noise_e: float,
    background_e: float,
    training: TrainingRecord,
) -> ModelBundle:
    """Bundle a network trained on SR images of `camera_pixel_um` raw frames reconstructed
    with `reconstruction` (Wiener constant fixed); `psf`: the SIM PSF on the SR grid;
    `background_e`: what the raw frames' constant background becomes in an SR image
    (photoelectrons per SR pixel), taken off before the network as in training."""
    sim = SimRecord(  # first: it refuses a reconstruction without its Wiener constant
        reconstruction=reconstruction, na=na, emission_um=emission_um, sample_ri=sample_ri
    )
    output_pixel = camera_pixel_um / UPSCALE
    record = PSFRecord(
        source="theoretical",
        description=(
            f"SIM PSF: a point reconstructed (generalised Wiener, w = {reconstruction.wiener:.3g})"
            f" behind NA {na}, emission {emission_um} um"
        ),
        pixel_size_um=output_pixel,
    )
    norm = Normalisation(
        scale_e=scale_e,
        background_e=max(background_e, 0.0),
        camera_offset_adu=0.0,
        camera_gain_e_per_adu=1.0,
        read_noise_e=read_noise_e,
    )
    return ModelBundle.from_model(
        model,
        name=name,
        input_pixel_um=output_pixel,
        normalisation=norm,
        psf=np.asarray(psf, np.float32) / float(np.sum(psf)),
        psf_record=record,
        training=training,
        sim=sim,
    )


def check_sim_chain(
    bundle: ModelBundle,
    *,
    camera_pixel_um: float,
    na: float,
    emission_um: float,
    angles: int,
    phases: int,
) -> SimSettings:
    """The reconstruction to feed `bundle` with, for raw frames of this detection and pattern
    sequence; ValueError when the bundle is no SIM model or learned other optics."""
    m = bundle.manifest
    if m.sim is None:
        raise ValueError(
            f"{bundle.bundle_id} is not a SIM model (train one with livedecon train --network"
            " sim or dps on a raw SIM acquisition)"
        )
    problems = []
    if not math.isclose(m.camera_pixel_um, camera_pixel_um, rel_tol=PIXEL_TOLERANCE):
        problems.append(f"camera pixel {camera_pixel_um} um (trained: {m.camera_pixel_um:.4g})")
    if abs(m.sim.na - na) > NA_TOLERANCE:
        problems.append(f"NA {na} (trained: {m.sim.na})")
    if not math.isclose(m.sim.emission_um, emission_um, rel_tol=EMISSION_TOLERANCE):
        problems.append(f"emission {emission_um} um (trained: {m.sim.emission_um})")
    settings = m.sim.reconstruction
    if (settings.angles, settings.phases) != (angles, phases):
        problems.append(
            f"{angles} angles x {phases} phases (trained: {settings.angles} x {settings.phases})"
        )
    if problems:
        raise ValueError(
            f"{bundle.bundle_id} learned SIM images of other raw frames: {'; '.join(problems)}"
        )
    return settings
