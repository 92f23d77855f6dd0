"""Line pairs and bead pairs at known separations, and the smallest separation an image resolves.

A target is a grid of cells on the 2x truth grid, one pair per cell, the pair's two members
side by side along x: two vertical lines (a line pair) or two points (a bead pair). Positions
are sub-pixel (area-weighted), so separations need not be whole pixels.

A pair counts as resolved when the profile across it has a maximum within a quarter of the
separation of each true position and the minimum between them lies at most `DIP` of the way
from the background to the lower maximum: a dip of 20%, between Sparrow's limit (no dip) and
Rayleigh's (26%), and when both maxima and the dip stand clear of the image's noise. The
profile averages the middle of a line's length, or three rows through a bead pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

PairKind = Literal["lines", "beads"]
SEPARATIONS_NM = (60, 80, 100, 120, 140, 160, 180, 200, 240, 280)
CELL_PX = 64  # fine pixels per cell: room for the pair and the blur around it
LINE_PX = 32  # a line's length in fine pixels
DIP = 0.8


@dataclass
class PairTarget:
    """A target's specimen on the fine grid and where each pair sits, with its separation."""

    kind: PairKind
    specimen: np.ndarray  # (Y, X) on the fine grid, 1 per member pixel-area
    centres: list[tuple[float, float, float]]  # per pair: (row, left col, right col), fine px
    separations_nm: tuple[float, ...]
    fine_um: float


def _splat_x(row: np.ndarray, x: float, weight: float) -> None:
    """Add `weight` at sub-pixel column x, shared between the two nearest pixels."""
    left = int(np.floor(x))
    frac = x - left
    row[left] += weight * (1 - frac)
    row[left + 1] += weight * frac


def pair_target(
    kind: PairKind, fine_um: float, separations_nm: tuple[float, ...] = SEPARATIONS_NM
) -> PairTarget:
    """A square target holding one pair per separation (cells filled row by row)."""
    per_side = int(np.ceil(np.sqrt(len(separations_nm))))
    size = per_side * CELL_PX
    specimen = np.zeros((size, size))
    centres = []
    for i, separation in enumerate(separations_nm):
        top, left = (i // per_side) * CELL_PX, (i % per_side) * CELL_PX
        row_c = top + CELL_PX / 2
        half = separation / 1000 / fine_um / 2
        cols = (left + CELL_PX / 2 - half, left + CELL_PX / 2 + half)
        rows = (
            range(int(row_c - LINE_PX / 2), int(row_c + LINE_PX / 2))
            if kind == "lines"
            else [int(row_c)]
        )
        for r in rows:
            for c in cols:
                _splat_x(specimen[r], c, 1.0)
        centres.append((float(int(row_c)), cols[0], cols[1]))
    return PairTarget(kind, specimen, centres, tuple(separations_nm), fine_um)


def _profile(image: np.ndarray, target: PairTarget, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(columns, values) across pair `index`, 4 fine pixels beyond each member, finely sampled."""
    row, left, right = target.centres[index]
    rows = LINE_PX // 4 if target.kind == "lines" else 1
    middle, span = (left + right) / 2, right - left + 8
    cols = np.linspace(middle - span / 2, middle + span / 2, 401)
    rr = np.arange(row - rows, row + rows + 1)
    grid_r, grid_c = np.meshgrid(rr, cols, indexing="ij")
    values = ndimage.map_coordinates(image, [grid_r, grid_c], order=1).mean(axis=0)
    return cols, values


def _noise(image: np.ndarray, target: PairTarget) -> float:
    """The image's noise (robust sd) where the target holds nothing within 10 fine pixels."""
    empty = ~ndimage.maximum_filter(target.specimen > 0, size=21)
    values = image[empty]
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def resolved(image: np.ndarray, target: PairTarget, index: int, noise: float | None = None) -> bool:
    """Whether `image` (on the target's fine grid) resolves pair `index`: besides the dip,
    both maxima stand out of the background by 5 noise sd and the dip is 3 sd deep, so noise
    alone never passes for a pair. `noise`: the image's, when already measured."""
    _, left, right = target.centres[index]
    cols, values = _profile(image, target, index)
    quarter = (right - left) / 4
    peaks = []
    for centre in (left, right):
        near = np.abs(cols - centre) <= quarter
        if not near.any():
            return False
        at = np.flatnonzero(near)[np.argmax(values[near])]
        # a maximum at the window's edge is a shoulder of something else, not a peak here
        if at in (np.flatnonzero(near)[0], np.flatnonzero(near)[-1]):
            return False
        peaks.append(values[at])
    between = (cols > left + quarter) & (cols < right - quarter)
    if not between.any():
        between = (cols > left) & (cols < right)
    background = float(np.percentile(values, 5))
    dip = float(values[between].min())
    noise = _noise(image, target) if noise is None else noise
    lower = min(peaks)
    return (
        dip - background <= DIP * (lower - background)
        and lower - background >= 5 * noise
        and lower - dip >= 3 * noise
    )


def smallest_resolved(image: np.ndarray, target: PairTarget) -> float | None:
    """The smallest separation (nm) resolved such that every larger one is resolved too;
    None when the largest is not."""
    best, noise = None, _noise(image, target)
    for index in np.argsort(target.separations_nm)[::-1]:
        if not resolved(image, target, int(index), noise):
            break
        best = float(target.separations_nm[index])
    return best
