"""Forward model of a widefield fluorescence microscope: sample -> PSF -> camera.

The specimen is rendered at twice the camera sampling (the grid restored images live on),
blurred by the PSF, binned 2x2 onto the camera grid, then turned into counts by the camera:
photo-response non-uniformity, hot-pixel dark current, Poisson photon noise, EM multiplication
(EMCCD), Gaussian read noise, gain, offset, and optional sCMOS column stripes; the per-pixel
maps (sCMOS offsets and read noise, photo-response, hot pixels) are the camera's fixed pattern.

Units: photoelectrons (quantum efficiency folded into the emission rates), counts in ADU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from livedecon.calibration._config import Camera, MicroscopeConfig
from livedecon.calibration._psf import theoretical_psf
from livedecon.calibration._sample import SyntheticSample
from livedecon.engines._configfile import StrictModel

UPSAMPLING = 2  # the truth grid is this much finer than the camera grid
BORDER_UM = 2.0  # zero margin around the field so blur does not wrap across edges


class SceneCamera(StrictModel):
    """The square camera of a simulated scene; scene models extend it with their specimen."""

    size_px: int = Field(128, ge=16, le=2048)
    read_noise_e: float = 1.5
    gain_e_per_adu: float = 0.5
    offset_adu: float = 100.0

    def camera(self) -> Camera:
        return Camera(
            offset_adu=self.offset_adu,
            gain_e_per_adu=self.gain_e_per_adu,
            read_noise_e=self.read_noise_e,
            width_px=self.size_px,
            height_px=self.size_px,
        )


@dataclass(frozen=True)
class Observation:
    """One acquisition: what the camera gave and what was really there.

    counts: camera counts, (Y, X) or (Z, Y, X), uint16 (uint8 for 8-bit cameras).
    truth: the specimen on the 2x grid, (2Y, 2X) or (Z, 2Y, 2X) float32, photoelectrons per
        truth pixel for this exposure, without background.
    expected_e: noise-free photoelectrons per camera pixel (blurred specimen + background).
    """

    counts: np.ndarray
    truth: np.ndarray
    expected_e: np.ndarray


@dataclass(frozen=True)
class CameraPattern:
    """A camera's fixed pattern, drawn once from Camera.pattern_seed: the same in every frame.

    Uniform quantities stay scalars (the cheap path, and the only one for a default camera).
    offset_adu: dark level, scalar or (Y, X) map.
    read_noise_e: read noise rms in electrons, scalar or (Y, X) map (log-normal around the
        camera's read_noise_e, which is its median).
    relative_gain: per-pixel photo-response (mean 1), or None.
    dark_e_per_s: dark current, non-zero at hot pixels only, or None.
    """

    shape: tuple[int, int]
    offset_adu: float | np.ndarray
    read_noise_e: float | np.ndarray
    relative_gain: np.ndarray | None
    dark_e_per_s: np.ndarray | None

    @classmethod
    def build(cls, camera: Camera, shape: tuple[int, int]) -> CameraPattern:
        shape = (int(shape[0]), int(shape[1]))

        def stream(i: int) -> np.random.Generator:
            # one stream per map, so switching one map on does not redraw the others
            return np.random.default_rng([camera.pattern_seed, i])

        offset: float | np.ndarray = camera.offset_adu
        if camera.offset_spread_adu > 0:
            noise = stream(0).normal(0.0, camera.offset_spread_adu, shape)
            offset = np.clip(camera.offset_adu + noise, 0, camera.max_count)
        read: float | np.ndarray = camera.read_noise_e
        if camera.read_noise_spread > 0:
            read = camera.read_noise_e * np.exp(
                stream(1).normal(0.0, camera.read_noise_spread, shape)
            )
        gain = None
        if camera.gain_spread > 0:
            gain = np.clip(1.0 + stream(2).normal(0.0, camera.gain_spread, shape), 0.05, None)
            gain /= gain.mean()
        dark = None
        hot = round(camera.hot_pixel_fraction * shape[0] * shape[1])
        if hot > 0:
            rng = stream(3)
            dark = np.zeros(shape)
            where = rng.choice(dark.size, size=hot, replace=False)
            dark.flat[where] = camera.hot_pixel_e_per_s * np.exp(rng.normal(0.0, 0.3, hot))
        return cls(shape, offset, read, gain, dark)

    @property
    def hot_pixels(self) -> np.ndarray:
        """Where the hot pixels are, (Y, X) bool."""
        if self.dark_e_per_s is None:
            return np.zeros(self.shape, dtype=bool)
        return self.dark_e_per_s > 0


def camera_counts(
    electrons_expected: np.ndarray,
    camera: Camera,
    rng: np.random.Generator,
    column_offsets_adu: np.ndarray | None = None,
    *,
    pattern: CameraPattern | None = None,
    exposure_ms: float = 0.0,
) -> np.ndarray:
    """Counts a camera reads out for the given expected photoelectrons per pixel.

    `pattern` is the camera's fixed pattern (built from `camera` when not given);
    `exposure_ms` sets the dark electrons of hot pixels (0: a bias frame).
    """
    if pattern is None:
        pattern = CameraPattern.build(camera, electrons_expected.shape[-2:])
    elif electrons_expected.shape[-2:] != pattern.shape:
        raise ValueError(f"frame {electrons_expected.shape} does not match pattern {pattern.shape}")
    expected = np.clip(electrons_expected, 0, None)
    if pattern.relative_gain is not None:
        expected = expected * pattern.relative_gain
    if pattern.dark_e_per_s is not None and exposure_ms > 0:
        expected = expected + pattern.dark_e_per_s * (exposure_ms / 1000.0)
    electrons = rng.poisson(expected).astype(np.float64)
    if camera.em_gain > 1:
        # Multiplication register, referred to its input: a gamma with mean n and variance
        # n (1 - 1/g), so the total variance is F^2 = 2 - 1/g times the photoelectrons.
        k = camera.em_gain / (camera.em_gain - 1.0)
        electrons = rng.gamma(electrons * k, 1.0 / k)
    if np.ndim(pattern.read_noise_e) == 0:
        if camera.read_noise_e > 0:
            electrons += rng.normal(0.0, camera.read_noise_e, size=electrons.shape)
    else:
        electrons += rng.standard_normal(electrons.shape) * pattern.read_noise_e
    adu = pattern.offset_adu + electrons / camera.gain_e_per_adu
    if camera.column_noise_adu > 0:
        adu += rng.normal(0.0, camera.column_noise_adu, size=electrons.shape[-1])
    if column_offsets_adu is not None:
        adu += column_offsets_adu
    dtype = np.uint8 if camera.bit_depth <= 8 else np.uint16
    return np.clip(np.rint(adu), 0, camera.max_count).astype(dtype)


def counts_to_electrons(counts: np.ndarray, camera: Camera) -> np.ndarray:
    """Invert the camera's linear response: photoelectrons per pixel, float32."""
    return ((counts.astype(np.float32) - camera.offset_adu) * camera.gain_e_per_adu).astype(
        np.float32
    )


def sample_planes_um(depth_um: float, z_step_um: float) -> np.ndarray:
    """z positions of the specimen's planes: one at 0 for a thin sample, else a centred grid."""
    if depth_um == 0:
        return np.zeros(1)
    half = int(np.ceil(depth_um / 2 / z_step_um))
    return np.arange(-half, half + 1) * z_step_um


class ForwardModel:
    """Renders what the configured microscope sees of its synthetic sample at (t, z)."""

    def __init__(self, microscope: MicroscopeConfig, noise_seed: int | None = None) -> None:
        if microscope.sample is None:
            raise ValueError(
                f"microscope config {microscope.name!r} has no [sample] section to simulate"
            )
        self.microscope = microscope
        optics, camera = microscope.optics, microscope.camera
        self.camera_shape = (camera.height_px, camera.width_px)
        self.truth_pixel_um = optics.pixel_size_um / UPSAMPLING
        self.truth_shape = (camera.height_px * UPSAMPLING, camera.width_px * UPSAMPLING)
        field_um = (camera.height_px * optics.pixel_size_um, camera.width_px * optics.pixel_size_um)
        self.sample = SyntheticSample(microscope.sample, field_um)
        self.planes_um = sample_planes_um(microscope.sample.depth_um, optics.z_step_um)

        border = int(np.ceil(BORDER_UM / self.truth_pixel_um))
        self._padded = tuple(n + 2 * border for n in self.truth_shape)
        self._border = border
        self._psf_ft: dict[float, np.ndarray] = {}
        self._sample_cache: OrderedDict[float, tuple[np.ndarray, np.ndarray]] = OrderedDict()

        seed = microscope.sample.seed if noise_seed is None else noise_seed
        self.rng = np.random.default_rng(seed + 1_000_003)
        stripe = microscope.sample.stripe_adu
        fixed = np.random.default_rng(microscope.sample.seed + 7)
        self.column_offsets_adu = (
            fixed.normal(0.0, stripe, size=camera.width_px)[None, :] if stripe > 0 else None
        )
        self.camera_pattern = CameraPattern.build(camera, self.camera_shape)

    # -- pieces ------------------------------------------------------------------------------

    def _psf_spectrum(self, offset_um: float) -> np.ndarray:
        key = round(float(offset_um), 4)
        if key not in self._psf_ft:
            size = max(self._padded)
            psf = theoretical_psf(
                self.microscope.optics, self.truth_pixel_um, size, z_offsets_um=[key]
            )[0]
            centre = psf.shape[0] // 2
            window = psf[
                centre - self._padded[0] // 2 : centre - self._padded[0] // 2 + self._padded[0],
                centre - self._padded[1] // 2 : centre - self._padded[1] // 2 + self._padded[1],
            ]
            # move the emitter to index (0, 0) so the FFT product is a centred convolution
            shifted = np.roll(window, (-(self._padded[0] // 2), -(self._padded[1] // 2)), (0, 1))
            self._psf_ft[key] = np.fft.rfft2(shifted)
        return self._psf_ft[key]

    def _specimen(self, t_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Specimen planes (photons/s per truth pixel) and their spectra, cached per time."""
        key = float(t_s)
        if key in self._sample_cache:
            self._sample_cache.move_to_end(key)
            return self._sample_cache[key]
        planes = self.sample.render(t_s, self.truth_pixel_um, self.truth_shape, self.planes_um)
        b = self._border
        padded = np.zeros((planes.shape[0], *self._padded), dtype=np.float64)
        padded[:, b : b + self.truth_shape[0], b : b + self.truth_shape[1]] = planes
        entry = (planes, np.fft.rfft2(padded))
        self._sample_cache[key] = entry
        if len(self._sample_cache) > 2:
            self._sample_cache.popitem(last=False)
        return entry

    def truth(self, t_s: float, z_um: float) -> np.ndarray:
        """Specimen at focus z on the 2x grid, photons/s per truth pixel (float32)."""
        planes, _ = self._specimen(t_s)
        if planes.shape[0] == 1:
            return planes[0]
        if z_um < self.planes_um[0] - 1e-9 or z_um > self.planes_um[-1] + 1e-9:
            return np.zeros_like(planes[0])  # outside the specimen
        position = np.interp(z_um, self.planes_um, np.arange(self.planes_um.size))
        k0 = int(np.floor(position))
        k1 = min(k0 + 1, planes.shape[0] - 1)
        frac = position - k0
        return ((1 - frac) * planes[k0] + frac * planes[k1]).astype(np.float32)

    def blurred(self, t_s: float, z_um: float) -> np.ndarray:
        """Image of the specimen at focus z on the 2x grid, photons/s per truth pixel."""
        _, spectra = self._specimen(t_s)
        total = np.zeros_like(spectra[0])
        for plane_z, spectrum in zip(self.planes_um, spectra, strict=True):
            total += spectrum * self._psf_spectrum(z_um - plane_z)
        image = np.fft.irfft2(total, s=self._padded)
        b = self._border
        return image[b : b + self.truth_shape[0], b : b + self.truth_shape[1]]

    def expected_electrons(self, t_s: float, z_um: float, exposure_ms: float) -> np.ndarray:
        """Noise-free photoelectrons per camera pixel, background included."""
        exposure_s = exposure_ms / 1000.0
        fine = np.clip(self.blurred(t_s, z_um), 0, None) * exposure_s
        y, x = self.camera_shape
        binned = fine.reshape(y, UPSAMPLING, x, UPSAMPLING).sum(axis=(1, 3))
        sample = self.microscope.sample
        assert sample is not None  # __init__ refuses a microscope without a sample
        return binned + sample.background_photons_px_s * exposure_s

    # -- acquisitions ----------------------------------------------------------------------

    def acquire(self, t_s: float, z_um: float, exposure_ms: float) -> Observation:
        """One camera frame at sample time t and focus z."""
        if exposure_ms <= 0:
            raise ValueError(f"exposure must be positive, got {exposure_ms} ms")
        expected = self.expected_electrons(t_s, z_um, exposure_ms)
        counts = self._counts(expected, exposure_ms)
        truth = self.truth(t_s, z_um) * (exposure_ms / 1000.0)
        return Observation(counts, truth.astype(np.float32), expected.astype(np.float32))

    def _counts(self, electrons: np.ndarray, exposure_ms: float) -> np.ndarray:
        camera = self.microscope.camera
        return camera_counts(
            electrons,
            camera,
            self.rng,
            self.column_offsets_adu,
            pattern=self.camera_pattern,
            exposure_ms=exposure_ms,
        )

    def dark(self, exposure_ms: float = 0.0) -> np.ndarray:
        """A frame with no light reaching the camera: offset, read noise, stripes and the hot
        pixels' dark current over `exposure_ms` (0: a bias frame)."""
        if exposure_ms < 0:
            raise ValueError(f"exposure must not be negative, got {exposure_ms} ms")
        return self._counts(np.zeros(self.camera_shape), exposure_ms)

    def flat(self, electrons_per_px: float, exposure_ms: float) -> np.ndarray:
        """An evenly illuminated frame: `electrons_per_px` expected photoelectrons in every
        pixel, through the whole camera (photo-response, dark current, noise, offset)."""
        if electrons_per_px < 0 or exposure_ms <= 0:
            raise ValueError(
                f"a flat needs electrons_per_px >= 0 and a positive exposure, got"
                f" {electrons_per_px} e- and {exposure_ms} ms"
            )
        return self._counts(np.full(self.camera_shape, float(electrons_per_px)), exposure_ms)

    def acquire_stack(self, t_s: float, z_um: np.ndarray, exposure_ms: float) -> Observation:
        """A z-stack at one sample time: (Z, Y, X) counts and (Z, 2Y, 2X) truth."""
        frames = [self.acquire(t_s, float(z), exposure_ms) for z in np.atleast_1d(z_um)]
        return Observation(
            np.stack([f.counts for f in frames]),
            np.stack([f.truth for f in frames]),
            np.stack([f.expected_e for f in frames]),
        )
