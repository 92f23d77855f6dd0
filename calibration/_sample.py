"""A synthetic fluorescent specimen: filaments and puncta that move and bend slowly, or a
slide of sub-resolution beads (Sample.kind == "beads") for measuring the PSF.

Everything is a deterministic function of (seed, time): the specimen at time t can be
rendered in any order, so a camera can ask for any timepoint and a test can rebuild the
exact ground truth of a frame from its recorded sample time and focus position.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from livedecon.calibration._config import Sample

FILAMENT_SIGMA_UM = 0.012  # ~25 nm filaments: thinner than any grid we render on
PUNCTUM_SIGMA_UM = 0.045  # ~100 nm vesicles
BEAD_PAIR_MAX_UM = 1.5  # partner distance of a clumped bead: from unresolved to near neighbours


class SyntheticSample:
    """Filaments (cubic Bezier curves) and puncta in a field of `field_um` (y, x)."""

    def __init__(self, sample: Sample, field_um: tuple[float, float]) -> None:
        self.config = sample
        self.field_um = (float(field_um[0]), float(field_um[1]))
        rng = np.random.default_rng(sample.seed)
        fy, fx = self.field_um
        half_depth = sample.depth_um / 2.0
        lo = np.array([-half_depth, 0.1 * fy, 0.1 * fx])
        hi = np.array([half_depth, 0.9 * fy, 0.9 * fx])

        n_f = sample.n_filaments
        start = rng.uniform(lo, hi, size=(n_f, 3))
        end = rng.uniform(lo, hi, size=(n_f, 3))
        bend = rng.normal(0.0, 0.25, size=(n_f, 2, 3)) * np.array([half_depth, fy, fx])
        t_cp = np.array([1 / 3, 2 / 3])[None, :, None]
        middle = start[:, None] + (end - start)[:, None] * t_cp + bend
        self._control = np.concatenate([start[:, None], middle, end[:, None]], axis=1)
        self._cp_amplitude = rng.uniform(0.3, 1.0, size=(n_f, 4, 3)) * self._amplitude_scale()
        self._cp_period = sample.period_s * rng.uniform(0.7, 1.5, size=(n_f, 4, 3))
        self._cp_phase = rng.uniform(0, 2 * np.pi, size=(n_f, 4, 3))
        self._filament_gain = rng.uniform(0.6, 1.4, size=n_f)

        n_p = sample.n_puncta
        self._punctum_pos = rng.uniform(lo, hi, size=(n_p, 3))
        self._p_amplitude = rng.uniform(0.3, 1.0, size=(n_p, 3)) * self._amplitude_scale()
        self._p_period = sample.period_s * rng.uniform(0.5, 1.5, size=(n_p, 3))
        self._p_phase = rng.uniform(0, 2 * np.pi, size=(n_p, 3))
        self._p_gain = rng.uniform(0.5, 1.5, size=n_p)
        self._p_blink_period = sample.period_s * rng.uniform(1.0, 3.0, size=n_p)
        self._p_blink_phase = rng.uniform(0, 2 * np.pi, size=n_p)

        # its own generator, so adding beads leaves the cell specimen of a seed unchanged
        self.bead_positions_um: np.ndarray
        self.bead_photons_s: np.ndarray
        self.bead_positions_um, self.bead_photons_s = (
            _place_beads(sample, self.field_um, np.random.default_rng((sample.seed, 2)))
            if sample.kind == "beads"
            else (np.zeros((0, 3)), np.zeros(0))
        )

    def _amplitude_scale(self) -> np.ndarray:
        motion = self.config.motion_um
        return np.array([min(motion, self.config.depth_um / 4.0), motion, motion])

    # -- geometry at time t -------------------------------------------------------------

    def control_points(self, t_s: float) -> np.ndarray:
        """(n_filaments, 4, 3) Bezier control points (z, y, x) in um at time t."""
        wobble = np.sin(2 * np.pi * t_s / self._cp_period + self._cp_phase)
        return self._control + self._cp_amplitude * wobble

    def filament_points(self, t_s: float, spacing_um: float) -> tuple[np.ndarray, np.ndarray]:
        """Points along every filament at most `spacing_um` apart, with photons/s each."""
        coords, weights = [], []
        rate = self.config.filament_photons_per_um_s
        for cp, gain in zip(self.control_points(t_s), self._filament_gain, strict=True):
            chord = np.linalg.norm(np.diff(cp, axis=0), axis=1).sum()  # >= curve length
            n = max(int(np.ceil(chord / spacing_um)), 2)
            u = (np.arange(n) + 0.5) / n
            basis = np.stack([(1 - u) ** 3, 3 * u * (1 - u) ** 2, 3 * u**2 * (1 - u), u**3], 1)
            points = basis @ cp
            deriv = (
                np.stack(
                    [
                        -3 * (1 - u) ** 2,
                        3 * (1 - u) ** 2 - 6 * u * (1 - u),
                        6 * u * (1 - u) - 3 * u**2,
                        3 * u**2,
                    ],
                    1,
                )
                @ cp
            )
            seg_len = np.linalg.norm(deriv, axis=1) / n
            coords.append(points)
            weights.append(seg_len * rate * gain)
        if not coords:
            return np.zeros((0, 3)), np.zeros(0)
        return np.concatenate(coords), np.concatenate(weights)

    def puncta(self, t_s: float) -> tuple[np.ndarray, np.ndarray]:
        """(n, 3) punctum centres in um and their photons/s at time t (they dim and brighten)."""
        wobble = np.sin(2 * np.pi * t_s / self._p_period + self._p_phase)
        pos = self._punctum_pos + self._p_amplitude * wobble
        blink = 0.55 + 0.45 * np.sin(2 * np.pi * t_s / self._p_blink_period + self._p_blink_phase)
        return pos, self.config.punctum_photons_s * self._p_gain * blink

    # -- rendering ---------------------------------------------------------------------------

    def render(
        self, t_s: float, pixel_um: float, shape_yx: tuple[int, int], z_planes_um: np.ndarray
    ) -> np.ndarray:
        """Emission density on a grid: (len(z_planes), Y, X) float32, photons/s per pixel.

        A thin sample (depth 0) puts everything on the single plane given. For a thick one,
        emitters are shared linearly between the two nearest planes. Beads are points snapped
        to the nearest grid pixel centre (and plane), so each bead's image is exactly the PSF.
        """
        z_planes_um = np.atleast_1d(np.asarray(z_planes_um, dtype=float))
        shape = (z_planes_um.size, *shape_yx)
        if self.config.kind == "beads":
            return self._render_beads(pixel_um, shape, z_planes_um)
        fil_xyz, fil_w = self.filament_points(t_s, spacing_um=pixel_um / 2)
        pun_xyz, pun_w = self.puncta(t_s)
        filaments = _splat(fil_xyz, fil_w, pixel_um, shape, z_planes_um, self.config.depth_um)
        puncta = _splat(pun_xyz, pun_w, pixel_um, shape, z_planes_um, self.config.depth_um)
        sigma_f = FILAMENT_SIGMA_UM / pixel_um
        sigma_p = PUNCTUM_SIGMA_UM / pixel_um
        for k in range(shape[0]):
            filaments[k] = ndimage.gaussian_filter(filaments[k], sigma_f, mode="constant")
            puncta[k] = ndimage.gaussian_filter(puncta[k], sigma_p, mode="constant")
        return (filaments + puncta).astype(np.float32)

    def bead_centres_um(self, pixel_um: float, z_planes_um: np.ndarray | None = None) -> np.ndarray:
        """(n, 3) bead positions (z, y, x) in um as rendered on a grid of `pixel_um`: at the
        nearest pixel centre (and of a thick sample, the nearest of `z_planes_um`)."""
        pos = self.bead_positions_um.copy()
        pos[:, 1:] = (np.floor(pos[:, 1:] / pixel_um) + 0.5) * pixel_um
        if z_planes_um is not None and self.config.depth_um > 0 and len(z_planes_um) > 1:
            planes = np.asarray(z_planes_um, dtype=float)
            pos[:, 0] = planes[np.abs(pos[:, :1] - planes[None, :]).argmin(axis=1)]
        return pos

    def _render_beads(
        self, pixel_um: float, shape: tuple[int, int, int], z_planes_um: np.ndarray
    ) -> np.ndarray:
        pos = self.bead_centres_um(pixel_um, z_planes_um)
        out = _splat(pos, self.bead_photons_s, pixel_um, shape, z_planes_um, self.config.depth_um)
        return out.astype(np.float32)


def _splat(
    xyz: np.ndarray,
    weights: np.ndarray,
    pixel_um: float,
    shape: tuple[int, int, int],
    z_planes_um: np.ndarray,
    depth_um: float,
) -> np.ndarray:
    """Deposit point weights onto the grid bilinearly in (y, x) and linearly in z."""
    out = np.zeros(int(np.prod(shape)), dtype=np.float64)
    if weights.size == 0:
        return out.reshape(shape)
    nz, ny, nx = shape
    y = xyz[:, 1] / pixel_um - 0.5  # pixel centres at (i + 0.5) * pixel
    x = xyz[:, 2] / pixel_um - 0.5
    if depth_um == 0 or nz == 1:
        z_index = np.zeros(len(weights))
        if depth_um > 0:  # thick sample on a single plane: only emitters near it count
            near = np.abs(xyz[:, 0] - z_planes_um[0]) < pixel_um
            weights = np.where(near, weights, 0.0)
    else:
        dz = (z_planes_um[-1] - z_planes_um[0]) / (nz - 1)
        z_index = (xyz[:, 0] - z_planes_um[0]) / dz
    y0, x0, z0 = np.floor(y), np.floor(x), np.floor(z_index)
    fy, fx, fz = y - y0, x - x0, z_index - z0
    for dz_i, wz in ((0, 1 - fz), (1, fz)):
        for dy_i, wy in ((0, 1 - fy), (1, fy)):
            for dx_i, wx in ((0, 1 - fx), (1, fx)):
                zi, yi, xi = z0 + dz_i, y0 + dy_i, x0 + dx_i
                ok = (zi >= 0) & (zi < nz) & (yi >= 0) & (yi < ny) & (xi >= 0) & (xi < nx)
                flat = (zi[ok] * ny + yi[ok]) * nx + xi[ok]
                out += np.bincount(
                    flat.astype(np.int64), weights=(weights * wz * wy * wx)[ok], minlength=out.size
                )
    return out.reshape(shape)


def _place_beads(
    sample: Sample, field_um: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) bead positions (z, y, x) in um and photons/s each.

    Beads keep `bead_min_separation_um` from each other (placed one by one; a field too small
    for all of them holds fewer), except the partners of clumped pairs, which sit 0 to
    BEAD_PAIR_MAX_UM from a bead: unresolved doublets and close neighbours, as on a real slide.
    """
    n_pairs = round(sample.n_beads * sample.bead_pair_fraction / 2)
    n_sites = sample.n_beads - n_pairs
    fy, fx = field_um
    sep2 = sample.bead_min_separation_um**2
    sites: list[np.ndarray] = []
    for _ in range(100 * max(n_sites, 1)):
        if len(sites) == n_sites:
            break
        p = rng.uniform((0.0, 0.0), (fy, fx))
        if not sites or np.min(np.sum((np.asarray(sites) - p) ** 2, axis=1)) >= sep2:
            sites.append(p)
    yx = np.asarray(sites).reshape(-1, 2)
    partners = []
    for anchor in yx[: min(n_pairs, len(yx))]:
        for _ in range(20):  # a partner that would fall off the field is drawn again
            r, phi = rng.uniform(0, BEAD_PAIR_MAX_UM), rng.uniform(0, 2 * np.pi)
            p = anchor + r * np.array([np.sin(phi), np.cos(phi)])
            if 0 <= p[0] < fy and 0 <= p[1] < fx:
                partners.append(p)
                break
    yx = np.concatenate([yx, np.asarray(partners).reshape(-1, 2)])
    half = sample.depth_um / 2
    z = rng.uniform(-half, half, size=len(yx)) if half > 0 else np.zeros(len(yx))
    gain = np.clip(rng.normal(1.0, sample.bead_brightness_sd, size=len(yx)), 0.2, None)
    return np.column_stack([z, yx]), sample.bead_photons_s * gain
