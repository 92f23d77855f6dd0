"""Richardson-Lucy after the network: data-consistency refinement in 2D, deconvolution of the
denoised stack in 3D.

2D: iterations against the camera frame, started from the network's estimate.

The self-supervised network's prior erases dim structure that the frame does hold: on the
quality bench it recalled 31-79% of the dim puncta where Richardson-Lucy recalled 62-100%. A few
RL iterations started from the network's clean estimate pull it back toward what the photons
say; started there rather than from the noisy frame, RL stops long before it amplifies noise.
The frame is compared on the output grid (shared onto it, flux kept) through the bundle's PSF,
with the camera's read noise variance added to both sides (the Poisson-Gaussian shift), so
pixels with almost no photons do not dominate the ratio.

3D: the network's deconvolution stage is the weak one. On the bench's volumes at 10, 30 and 100
photons (CPU recipe, 300 passes), two RL steps on its own denoising stage's output scored 37.3,
40.7 and 41.4 dB, where its deconvolution stage scored 36.9, 38.5 and 36.9 and 3D RL on the raw
stack at its best iteration count 35.8, 40.7 and 39.8 (the recipe's 600 passes now: 37.3, 41.2
and 41.9). So a 3D bundle may serve the denoised stack on the 2x grid (`Network3DSpec.serve`)
and deconvolve it here (`deconvolve_denoised`). RL needs the stack's background in its model
(without it, 0.7-3.4 dB lower): the denoised stack has no noise left, so a low percentile of
it estimates the background.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from scipy import fft, ndimage

MAX_ITERATIONS = 64
# RL's multiplicative update cannot regrow an exact zero: the estimate starts at least at this
# share of the model's constant (read noise variance and background per output pixel), a
# level that depends on the camera, not on the frame, so tiles of one frame refine alike
FLOOR = 0.02
MIN_FLOOR_E = 1e-3
# the denoised stack's background: this percentile of its voxels (0.1-5 scored alike)
BACKGROUND_PERCENTILE = 1.0


def upsample_2x(image: np.ndarray) -> np.ndarray:
    """Linear interpolation onto the 2x grid, flux preserved (each value shared by 4 pixels)."""
    image = np.asarray(image, dtype=np.float64)
    # pixel centres: camera pixel i covers fine pixels 2i and 2i+1
    zoomed = ndimage.zoom(image, 2, order=1, mode="nearest", grid_mode=True)
    return zoomed / 4.0


def upsample_2x_torch(image: torch.Tensor) -> torch.Tensor:
    """`upsample_2x` on the tensor's device (the same values: linear, pixel centres kept,
    edges extended, each value shared by 4 pixels), plane by plane for a stack."""
    planes = image.reshape(-1, 1, *image.shape[-2:])  # a stack: each plane on its own
    zoomed = F.interpolate(planes, scale_factor=2, mode="bilinear", align_corners=False)
    return zoomed.reshape(*image.shape[:-2], *zoomed.shape[-2:]) / 4


def refine(
    estimate: np.ndarray,
    frame_e: np.ndarray,
    psf: np.ndarray,
    iterations: int,
    read_noise_e: float = 0.0,
    background_e: float = 0.0,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """`iterations` Richardson-Lucy steps from `estimate` (Y', X' or Z, Y', X': photoelectrons
    per output pixel) toward the camera frame or stack `frame_e` (photoelectrons), with `psf`
    (2D, or 3D for a stack) on the output grid, which is the frame's or twice as fine
    laterally. `background_e` (per camera pixel): what was subtracted from the frame and is
    absent from the estimate; it is put back into the model, so the ratio weighs each pixel by
    its real photon count. Runs in torch on `device` (default: the GPU where there is one)."""
    if not 0 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"refinement iterations must be 0 to {MAX_ITERATIONS}, got {iterations}")
    if estimate.ndim not in (2, 3) or not estimate.ndim == frame_e.ndim == psf.ndim:
        raise ValueError(
            "refinement works on a 2D frame with a 2D PSF or a 3D stack with a 3D PSF, got"
            f" estimate {estimate.shape}, frame {frame_e.shape}, PSF {psf.shape}"
        )
    upscale = estimate.shape[-1] // frame_e.shape[-1]
    lateral = tuple(n * upscale for n in frame_e.shape[-2:])
    if (
        upscale not in (1, 2)
        or estimate.shape[-2:] != lateral
        or estimate.shape[:-2] != frame_e.shape[:-2]
    ):
        raise ValueError(f"estimate {estimate.shape} is not frame {frame_e.shape} at 1x or 2x")
    if iterations == 0:
        return estimate
    with torch.no_grad():
        refined = _iterate(estimate, frame_e, psf, iterations, read_noise_e, background_e, device)
    return refined.astype(estimate.dtype, copy=False)


def _iterate(
    estimate: np.ndarray,
    frame_e: np.ndarray,
    psf: np.ndarray,
    iterations: int,
    read_noise_e: float,
    background_e: float,
    device: str | torch.device | None,
) -> np.ndarray:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    upscale = estimate.shape[-1] // frame_e.shape[-1]
    frame = torch.as_tensor(np.asarray(frame_e, dtype=np.float32), device=device)
    if upscale == 2:
        frame = upsample_2x_torch(frame)
    shift = (read_noise_e**2 + background_e) / upscale**2  # per output pixel, both sides
    psf = _fitting(psf, estimate.shape)
    pad = _padding(psf.shape, estimate.shape)
    margins = tuple(m for side in reversed(pad) for m in side)  # torch: last axis first

    def padded(image: torch.Tensor) -> torch.Tensor:
        if all(max(side) < n for side, n in zip(pad, image.shape, strict=True)):
            return F.pad(image[None, None], margins, mode="reflect")[0, 0]
        # torch reflects once; numpy folds again and again, which tiny frames need
        return torch.as_tensor(np.pad(image.cpu().numpy(), pad, mode="reflect"), device=device)

    observed = padded(torch.clamp(frame + shift, min=0))
    floor = max(FLOOR * shift, MIN_FLOOR_E)
    current = torch.as_tensor(np.asarray(estimate, dtype=np.float32), device=device)
    current = padded(torch.clamp(current, min=floor))
    size = tuple(current.shape)
    otf = OTF_CACHE.get(psf, size, torch.device(device))

    def blur(image: torch.Tensor, transfer: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfftn(torch.fft.rfftn(image) * transfer, s=size)

    for _ in range(iterations):
        ratio = observed / torch.clamp(blur(current, otf) + shift, min=1e-12)
        current = current * torch.clamp(blur(ratio, otf.conj()), min=0)
    inner = current[tuple(slice(lo, n - hi) for (lo, hi), n in zip(pad, size, strict=True))]
    return inner.cpu().numpy()


def _padding(psf_shape: tuple[int, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Reflected margins: twice the PSF's reach on each side, so what wraps around the FFT's
    edges stays in the margins for the first steps, and then up to a size the FFT is fast
    for, shared between both sides."""
    pad = []
    for k, n in zip(psf_shape, shape, strict=True):
        reach = 2 * (k // 2)
        extra = fft.next_fast_len(n + 2 * reach, real=True) - n - 2 * reach
        pad.append((reach + extra // 2, reach + extra - extra // 2))
    return pad


class OtfCache:
    """Transfer functions kept on their device, by PSF, padded frame shape and device, the
    least recently used dropped beyond `budget_bytes` (an OTF larger than that is not kept).

    A live stream refines every frame of one shape with one PSF; the OTF's FFT (on the CPU)
    would otherwise cost a share of each frame's steps (one FFT beside four per step), and its
    copy to the GPU more. Thread-safe: two threads missing at once compute it twice."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.hits = 0
        self._kept: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, psf: np.ndarray, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0": one card
            device = torch.device("cuda", torch.cuda.current_device())
        psf = np.ascontiguousarray(psf, dtype=np.float32)
        key = (psf.tobytes(), psf.shape, shape, str(device))
        with self._lock:
            if key in self._kept:
                self.hits += 1
                self._kept.move_to_end(key)
                return self._kept[key]
        otf = torch.as_tensor(_otf(psf, shape), device=device)
        with self._lock:
            if _bytes(otf) <= self.budget_bytes:
                self._kept[key] = otf
                while sum(map(_bytes, self._kept.values())) > self.budget_bytes:
                    self._kept.popitem(last=False)
        return otf

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self.hits = 0


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


OTF_CACHE = OtfCache(budget_bytes=256 * 2**20)  # e.g. three 2048^2 frames' OTFs at 2x


def _otf(psf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The PSF's transfer function on a grid of `shape`, centred on the origin, sum 1."""
    kernel = np.zeros(shape, dtype=np.float32)
    kernel[tuple(slice(0, n) for n in psf.shape)] = psf / psf.sum()
    kernel = np.roll(kernel, [-(n // 2) for n in psf.shape], axis=tuple(range(psf.ndim)))
    return fft.rfftn(kernel)


def _fitting(psf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The PSF's centre, cut to an odd size no larger than the image (tiny frames)."""
    cut = []
    for n, size in zip(psf.shape, shape, strict=True):
        keep = min(n, size if size % 2 else size - 1)
        cut.append(slice((n - keep) // 2, (n - keep) // 2 + keep))
    return psf[tuple(cut)]


def deconvolve_denoised(
    denoised: np.ndarray,
    psf: np.ndarray,
    iterations: int,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """`iterations` Richardson-Lucy steps on a network's denoised stack (Z, Y', X', already on
    the output grid of `psf`), from itself, with its background (a low percentile of its
    voxels) in the model. The result carries that background as a flat level, as the
    network's own deconvolved estimate does. No read noise: the noise is gone."""
    if iterations == 0:
        return denoised
    background = max(float(np.percentile(denoised, BACKGROUND_PERCENTILE)), 0.0)
    frame = denoised - background  # refine puts the background back into both sides
    return refine(np.clip(frame, 0, None), frame, psf, iterations, 0.0, background, device) + (
        background
    )


def finish(
    estimate: np.ndarray,
    electrons: np.ndarray,
    psf: np.ndarray,
    iterations: int,
    read_noise_e: float,
    background_e: float,
    serves_denoised: bool,
) -> np.ndarray:
    """What a bundle does after its network: a served denoised stack is deconvolved, any
    other estimate refined against the frame `electrons` (0 iterations: unchanged)."""
    if serves_denoised:
        return deconvolve_denoised(estimate, psf, iterations)
    return refine(estimate, electrons, psf, iterations, read_noise_e, background_e)
