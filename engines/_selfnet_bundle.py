"""Self-Net model bundles: the restoration network with its grids and fixed normalisation.

A Self-Net bundle follows the bundle rules (engines/_bundle.py): manifest, hashed weights,
provenance. Its grids: lateral pixel in and out unchanged, z step in the acquired one, z step
out the lateral pixel (isotropic). It needs no PSF: psf.tif holds a single-voxel delta and the
record says `source = "none"`. The normalisation is fixed from the training volume (an offset
and a scale), never per volume, so a time series keeps its photometry.
"""

from __future__ import annotations

import math

import numpy as np

from livedecon.engines._bundle import ModelBundle, Normalisation, PSFRecord, TrainingRecord
from livedecon.engines._selfnet import (
    Infer,
    SelfNetRestorer,
    axial_ratio,
    check_volume,
    restore_volume,
)

Z_STEP_TOLERANCE = 0.05  # a volume's z step this far from the trained one is refused


def volume_normalisation(volume: np.ndarray) -> Normalisation:
    """Offset (0.1th percentile, at least 0) and scale (99.9th percentile above it) of a
    training volume, in its own intensity units (gain 1): model units then span about 0-1."""
    volume = check_volume(volume, "training volume")
    low, high = np.percentile(volume, [0.1, 99.9])
    offset = max(float(low), 0.0)
    scale = float(high) - offset
    if not scale > 0:
        raise ValueError("training volume is flat (no signal above its 0.1th percentile)")
    return Normalisation(
        scale_e=scale, camera_offset_adu=offset, camera_gain_e_per_adu=1.0, read_noise_e=None
    )


def delta_psf() -> np.ndarray:
    """The one-voxel PSF a Self-Net bundle carries: it deconvolves nothing."""
    return np.ones((1, 1, 1), np.float32)


def selfnet_bundle(
    restorer: SelfNetRestorer,
    *,
    name: str,
    pixel_um: float,
    z_step_um: float,
    normalisation: Normalisation,
    training: TrainingRecord,
) -> ModelBundle:
    """Bundle a trained Self-Net restorer for volumes of `pixel_um` x `z_step_um` voxels."""
    axial_ratio(pixel_um, z_step_um)  # refuses an already isotropic sampling
    record = PSFRecord(
        source="none",
        description="Self-Net learns the axial degradation from the volume itself",
        pixel_size_um=pixel_um,
    )
    return ModelBundle.from_model(
        restorer,
        name=name,
        input_pixel_um=pixel_um,
        z_step_um=z_step_um,
        normalisation=normalisation,
        psf=delta_psf(),
        psf_record=record,
        training=training,
    )


def check_z_step(bundle: ModelBundle, z_step_um: float | None) -> float:
    """The volume's z step, checked against the one the bundle learned (the degradation it
    undoes depends on it); a volume without one takes the bundle's."""
    trained = bundle.manifest.z_step_um
    assert trained is not None  # the manifest guarantees it for Self-Net
    if z_step_um is None:
        return trained
    if not math.isclose(z_step_um, trained, rel_tol=Z_STEP_TOLERANCE):
        raise ValueError(
            f"volume z step {z_step_um} um, but bundle {bundle.bundle_id} was trained at"
            f" {trained} um: train Self-Net on data of this z step"
        )
    return z_step_um


def check_chain(first: ModelBundle, selfnet: ModelBundle) -> None:
    """Refuse a chain whose grids do not meet: Self-Net after a 3D bundle must have learned
    from volumes at that bundle's output pixel size (ValueError saying what to do)."""
    m, f = selfnet.manifest, first.manifest
    if not m.is_selfnet:
        raise ValueError(f"{selfnet.bundle_id} is not a Self-Net bundle ({m.network.kind})")
    if not f.is_3d:
        raise ValueError(f"a Self-Net chain needs a 3D bundle first; {first.bundle_id} is 2D")
    if not math.isclose(m.input_pixel_um, f.output_pixel_um, rel_tol=0.02):
        raise ValueError(
            f"Self-Net bundle {selfnet.bundle_id} takes {m.input_pixel_um} um pixels, but"
            f" {first.bundle_id} writes {f.output_pixel_um} um: train Self-Net on that"
            " bundle's output"
        )


def restore_isotropic(
    bundle: ModelBundle,
    infer: Infer,
    volume: np.ndarray,
    z_step_um: float | None = None,
    slice_batch: int = 8,
    tile_px: int | None = None,
) -> np.ndarray:
    """A (Z, Y, X) volume in its own intensity units -> the isotropic volume (Z', Y, X) on the
    lateral pixel grid, in the same units above the bundle's offset."""
    if not bundle.manifest.is_selfnet:
        raise ValueError(f"bundle {bundle.bundle_id} is not a Self-Net model")
    volume = check_volume(volume)
    m = bundle.manifest
    ratio = axial_ratio(m.input_pixel_um, check_z_step(bundle, z_step_um))
    norm = m.normalisation
    units = norm.electrons(volume) / norm.scale_e
    restored = restore_volume(infer, units, ratio, slice_batch, tile_px)
    restored *= norm.scale_e  # in place: the result is the largest array here
    return restored
