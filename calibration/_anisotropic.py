"""Anisotropic volumes with an isotropic ground truth, and how isotropic a volume is.

The simulator renders the project's synthetic specimen (filaments and puncta,
calibration/_sample.py) on an isotropic grid (z spacing = lateral pixel), blurs it with the
theoretical 3D PSF of the optics (calibration/_psf.py: widefield, confocal, or light-sheet:
widefield detection under a Gaussian sheet), keeps every
`ratio`-th plane (a z step coarser than the pixel, as microscopes acquire) and puts it through
the camera (calibration/forward_model.camera_counts: Poisson, read noise, gain, offset).

The isotropic truth is what an ideal isotropic microscope of the same lateral resolution would
see: the specimen blurred by a 3D Gaussian of the in-focus PSF's lateral FWHM in every axis,
on the isotropic grid. Self-Net (engines/_selfnet.py) aims at exactly that.

Isotropy (`isotropy_ratio`): decorrelation analysis (calibration/_metrics.py) restricted to one
frequency axis gives a resolution along that axis; the ratio is lateral resolution (along x
and y in xy slices) over axial resolution (along z in xz and yz slices). 1 is isotropic; raw
widefield and confocal volumes sit around 0.3-0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field
from scipy import ndimage, signal

from livedecon.calibration._config import Optics, Sample
from livedecon.calibration._forward_model import SceneCamera, camera_counts
from livedecon.calibration._metrics import _apodize, _decorrelation_curve, _peak, psnr, ssim
from livedecon.calibration._psf import fwhm_px, theoretical_psf
from livedecon.calibration._sample import SyntheticSample

Modality = Literal["widefield", "confocal", "light-sheet"]


class AnisotropicScene(SceneCamera):
    """One simulated anisotropic acquisition."""

    modality: Modality = "widefield"
    na: float = Field(1.4, gt=0, lt=1.5)
    emission_um: float = 0.525
    excitation_um: float = 0.488
    sheet_fwhm_um: float = Field(1.0, gt=0, description="light-sheet thickness (FWHM)")
    pixel_um: float = Field(0.1, gt=0, description="lateral pixel, also the truth's z spacing")
    ratio: int = Field(3, ge=2, le=8, description="z step in lateral pixels")
    size_px: int = Field(64, ge=16, le=1024)
    planes: int = Field(16, ge=4, le=256, description="acquired planes")
    filaments_per_100um2: float = 40.0
    puncta_per_100um2: float = 40.0
    peak_photons: float = Field(60.0, gt=0, description="brightest expected signal, e-")
    background_e: float = Field(2.0, ge=0)
    noise: bool = True
    empty: bool = Field(False, description="no specimen: background and noise only")
    occupied: float = Field(
        1.0, gt=0, le=1, description="fraction of the depth, centred, that holds specimen"
    )
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.modality}-{self.peak_photons:g}ph-x{self.ratio}"

    @property
    def z_step_um(self) -> float:
        return round(self.pixel_um * self.ratio, 9)  # 0.3, not 0.30000000000000004

    @property
    def fine_planes(self) -> int:
        return (self.planes - 1) * self.ratio + 1

    def optics(self) -> Optics:
        extra: dict[str, object] = {}
        if self.modality == "confocal":
            extra = {"modality": "confocal", "excitation_um": self.excitation_um}
        elif self.modality == "light-sheet":
            extra = {"modality": "light-sheet", "sheet_fwhm_um": self.sheet_fwhm_um}
        return Optics(
            na=self.na,
            emission_um=self.emission_um,
            pixel_size_um=self.pixel_um,
            z_step_um=self.z_step_um,
            **extra,
        )


@dataclass(frozen=True)
class AnisotropicVolume:
    """electrons: (Z, Y, X) float32 photoelectrons (camera offset and gain removed, background
    kept) at z step `ratio` pixels; truth: (Z', Y, X) float32 isotropic reference on the
    lateral grid, plane k * ratio of it at acquired plane k; blurred: the noise-free
    anisotropic image on the isotropic grid (Z', Y, X)."""

    scene: AnisotropicScene
    counts: np.ndarray
    electrons: np.ndarray
    truth: np.ndarray
    blurred: np.ndarray
    lateral_fwhm_px: float
    axial_fwhm_px: float


def _specimen(scene: AnisotropicScene) -> np.ndarray:
    field_um = scene.size_px * scene.pixel_um
    depth_um = (scene.fine_planes - 1) * scene.pixel_um
    area = field_um**2 / 100.0
    sample = Sample(
        seed=scene.seed,
        depth_um=depth_um,
        n_filaments=0 if scene.empty else round(scene.filaments_per_100um2 * area),
        n_puncta=0 if scene.empty else round(scene.puncta_per_100um2 * area),
        background_photons_px_s=0.0,
    )
    z = (np.arange(scene.fine_planes) - (scene.fine_planes - 1) / 2) * scene.pixel_um
    specimen = SyntheticSample(sample, (field_um, field_um))
    planes = specimen.render(0.0, scene.pixel_um, (scene.size_px, scene.size_px), z)
    planes[np.abs(z) > scene.occupied * depth_um / 2 + 1e-9] = 0.0
    return planes


def _psf(scene: AnisotropicScene) -> np.ndarray:
    half = scene.fine_planes - 1
    z = np.arange(-half, half + 1) * scene.pixel_um
    size = min(2 * scene.size_px - 1, 63)
    psf = theoretical_psf(scene.optics(), scene.pixel_um, size, z)
    return psf / psf.sum()


def render_anisotropic(scene: AnisotropicScene) -> AnisotropicVolume:
    """Render `scene`: its acquired planes through the camera, and its isotropic truth."""
    specimen = _specimen(scene).astype(np.float64)
    psf = _psf(scene)
    centre = psf.shape[0] // 2
    lateral = fwhm_px(psf[centre, psf.shape[1] // 2])
    axial = fwhm_px(psf[:, psf.shape[1] // 2, psf.shape[2] // 2])
    blurred = np.clip(signal.fftconvolve(specimen, psf, mode="same"), 0, None)
    sigma = lateral / (2 * np.sqrt(2 * np.log(2)))
    truth = ndimage.gaussian_filter(specimen, sigma, mode="constant")
    peak = float(blurred.max())
    scale = scene.peak_photons / peak if peak > 0 else 1.0
    acquired = blurred[:: scene.ratio] * scale + scene.background_e
    if scene.noise:
        rng = np.random.default_rng(scene.seed + 17)
        cam = scene.camera()
        counts = np.stack([camera_counts(p, cam, rng) for p in acquired])
        electrons = (counts.astype(np.float32) - scene.offset_adu) * scene.gain_e_per_adu
    else:
        counts = np.zeros(acquired.shape, np.uint16)
        electrons = acquired.astype(np.float32)
    return AnisotropicVolume(
        scene,
        counts,
        electrons.astype(np.float32),
        (truth * scale).astype(np.float32),
        (blurred * scale).astype(np.float32),
        lateral,
        axial,
    )


# -- isotropy ----------------------------------------------------------------------------------


def directional_resolution(image: np.ndarray, pixel_um: float, axis: int) -> float:
    """Resolution (um) along one axis of a 2D image: decorrelation analysis whose cut-off is
    the frequency along `axis` alone (a slab of the spectrum, not a disc). inf: no signal."""
    image = np.asarray(image, dtype=np.float64)
    ny, nx = image.shape
    f = [np.fft.fftfreq(ny)[:, None] * 2, np.fft.fftfreq(nx)[None, :] * 2]
    radius = np.broadcast_to(np.abs(f[axis]), (ny, nx))
    radii = np.linspace(0.0, 1.0, 101)[1:]
    apodized = _apodize(image, edge_px=max(min(ny, nx) // 16, 2))
    peaks = [_peak(_decorrelation_curve(np.fft.fft2(apodized), radius, radii), radii, 0.05)]
    for sigma in np.exp(np.linspace(np.log(min(ny, nx) / 4), np.log(0.15), 10)):
        high = apodized - ndimage.gaussian_filter(apodized, sigma)
        peaks.append(_peak(_decorrelation_curve(np.fft.fft2(high), radius, radii), radii, 0.05))
    k_c = max(peaks)
    return float("inf") if k_c <= 0 else 2.0 * pixel_um / k_c


def _median_resolution(slices: np.ndarray, pixel_um: float, axis: int) -> float:
    values = [directional_resolution(s, pixel_um, axis) for s in slices]
    finite = [v for v in values if np.isfinite(v)]
    return float(np.median(finite)) if finite else float("inf")


@dataclass(frozen=True)
class Isotropy:
    """Median lateral and axial resolution of a volume, in micrometres."""

    lateral_um: float
    axial_um: float

    @property
    def ratio(self) -> float:
        """Lateral over axial resolution (1: isotropic; 0 when no axial signal is found)."""
        return self.lateral_um / self.axial_um if np.isfinite(self.axial_um) else 0.0


def isotropy(volume: np.ndarray, pixel_um: float, slices: int = 8) -> Isotropy:
    """Isotropy of a volume on an isotropic grid (Z, Y, X), all axes `pixel_um`: median
    resolution along x and y over `slices` xy planes, against the median along z over as many
    xz and yz slices (evenly spread, away from the edges)."""
    volume = np.asarray(volume, dtype=np.float64)
    z, y, x = volume.shape

    def pick(n: int) -> np.ndarray:
        return np.linspace(n // 4, n - 1 - n // 4, min(slices, n)).round().astype(int)

    xy = volume[pick(z)]
    lateral = np.median([_median_resolution(xy, pixel_um, 0), _median_resolution(xy, pixel_um, 1)])
    xz = volume[:, pick(y), :].transpose(1, 0, 2)
    yz = volume[:, :, pick(x)].transpose(2, 0, 1)
    axial = np.median([_median_resolution(xz, pixel_um, 0), _median_resolution(yz, pixel_um, 0)])
    return Isotropy(float(lateral), float(axial))


def _fitted_inner(
    estimate: np.ndarray, truth: np.ndarray, border: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both volumes without `border` planes and pixels at each edge, the estimate fitted
    (least squares a*x+b) onto the truth."""
    inner = (slice(border, -border),) * 3
    e = np.asarray(estimate, dtype=np.float64)[inner]
    t = np.asarray(truth, dtype=np.float64)[inner]
    a, b = np.polyfit(e.ravel(), t.ravel(), 1)
    return a * e + b, t


def axial_psnr(estimate: np.ndarray, truth: np.ndarray, border: int = 4) -> float:
    """Fitted PSNR over the xz and yz slices (the whole volume, seen axially), without
    `border` planes and pixels at each edge where no method has data on both sides."""
    return psnr(*_fitted_inner(estimate, truth, border))


def axial_ssim(estimate: np.ndarray, truth: np.ndarray, border: int = 4) -> float:
    """3D SSIM of the fitted estimate against the truth over the same inner volume."""
    return ssim(*_fitted_inner(estimate, truth, border))
