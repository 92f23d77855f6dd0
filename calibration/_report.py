"""The HTML report of a calibration run: plots (PNG, matplotlib) and the measured values.

The report is one HTML file beside a folder of PNGs, readable offline in any browser. Every
plot is drawn from arrays handed in here; nothing is recomputed, so the report shows exactly
what the calibration bundle holds.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed (and none on acquisition PCs' services)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter


@dataclass
class PTCPlot:
    """The photon-transfer curve: mean and variance per light level and the fitted line."""

    mean_adu: np.ndarray  # signal above offset per level
    variance_adu2: np.ndarray  # temporal variance per level
    used: np.ndarray  # bool: points in the fit
    slope: float  # ADU^2 per ADU (1 / gain in ADU per e-, times the excess noise factor^2)
    intercept: float  # read variance, ADU^2


@dataclass
class PSFPlot:
    """The measured PSF beside the theoretical one, on the same sampling."""

    psf: np.ndarray  # (Z, Y, X) or (1, Y, X), in-focus plane sums to 1
    theory: np.ndarray  # same shape and sampling
    pixel_size_um: float
    z_step_um: float | None


@dataclass
class ReportData:
    """Everything the report shows: the summary, the camera's maps and curves, the PSF, crops and
    metrics."""

    title: str
    summary: list[tuple[str, str]]  # (quantity, value) rows shown first
    ptc: PTCPlot
    offset_map: np.ndarray
    read_noise_map_e: np.ndarray
    hot_pixels: np.ndarray
    psf: PSFPlot | None = None
    stripe_profiles: tuple[np.ndarray, np.ndarray] | None = None  # column means before/after
    crops: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (label, image)
    metrics: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _save(fig: plt.Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _ptc_figure(ptc: PTCPlot, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog(ptc.mean_adu[ptc.used], ptc.variance_adu2[ptc.used], "o", label="levels (fit)")
    if (~ptc.used).any():
        ax.loglog(
            ptc.mean_adu[~ptc.used], ptc.variance_adu2[~ptc.used], "x", label="levels (not fit)"
        )
    positive = ptc.mean_adu[ptc.mean_adu > 0]
    if positive.size:
        x = np.geomspace(positive.min() / 2, positive.max() * 1.5, 100)
        ax.loglog(x, ptc.slope * x + ptc.intercept, "-", label="fit: slope x + read variance")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short decades
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("mean signal above offset (ADU)")
    ax.set_ylabel("temporal variance (ADU²)")
    ax.set_title("Photon transfer curve")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _maps_figure(data: ReportData, path: Path) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, image, label in zip(
        axes[:2],
        (data.offset_map, data.read_noise_map_e),
        ("offset (ADU)", "read noise (e- rms)"),
        strict=True,
    ):
        low, high = np.percentile(image, [0.5, 99.5])
        shown = ax.imshow(image, cmap="magma", vmin=low, vmax=max(high, low + 1e-6))
        fig.colorbar(shown, ax=ax, fraction=0.046)
        ax.set_title(label)
        ax.axis("off")
    axes[2].hist(data.read_noise_map_e.ravel(), bins=100, log=True, color="0.3")
    axes[2].set_xlabel("read noise (e- rms)")
    axes[2].set_ylabel("pixels")
    axes[2].set_title(f"{int(data.hot_pixels.sum())} hot pixels")
    return _save(fig, path)


def _fwhm_profile(ax: plt.Axes, x: np.ndarray, measured: np.ndarray, theory: np.ndarray) -> None:
    ax.plot(x, measured / measured.max(), "o-", ms=3, label="measured")
    ax.plot(x, theory / theory.max(), "-", label="theory")
    ax.axhline(0.5, color="0.7", lw=0.8)
    ax.legend(fontsize=8)


def _psf_figure(psf: PSFPlot, path: Path) -> str:
    z, y, x = psf.psf.shape
    focus = int(np.argmax(psf.psf.max(axis=(1, 2))))
    cy, cx = np.unravel_index(np.argmax(psf.psf[focus]), (y, x))
    columns = 3 if z > 1 else 2
    fig, axes = plt.subplots(2, columns, figsize=(4 * columns, 7.5))
    lateral_um = (np.arange(x) - cx) * psf.pixel_size_um
    for row, (image, label) in enumerate(((psf.psf, "measured"), (psf.theory, "theory"))):
        axes[row, 0].imshow(image[focus], cmap="inferno")
        axes[row, 0].set_title(f"{label}: in focus (XY)")
        axes[row, 0].axis("off")
        if z > 1:
            aspect = (psf.z_step_um or 1.0) / psf.pixel_size_um
            axes[row, 1].imshow(np.sqrt(np.clip(image[:, cy, :], 0, None)), cmap="inferno",
                                aspect=aspect)  # fmt: skip
            axes[row, 1].set_title(f"{label}: XZ (square-root scale)")
            axes[row, 1].axis("off")
    _fwhm_profile(axes[0, -1], lateral_um, psf.psf[focus, cy, :], psf.theory[focus, cy, :])
    axes[0, -1].set_xlabel("x (µm)")
    axes[0, -1].set_title("lateral profile")
    if z > 1:
        axial_um = (np.arange(z) - focus) * (psf.z_step_um or 1.0)
        _fwhm_profile(axes[1, -1], axial_um, psf.psf[:, cy, cx], psf.theory[:, cy, cx])
        axes[1, -1].set_xlabel("z (µm)")
        axes[1, -1].set_title("axial profile")
    else:
        axes[1, -1].axis("off")
    return _save(fig, path)


def _stripes_figure(profiles: tuple[np.ndarray, np.ndarray], path: Path) -> str:
    before, after = profiles
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(before - before.mean(), lw=0.8, label=f"before (rms {before.std():.2f})")
    ax.plot(after - after.mean(), lw=0.8, label=f"after (rms {after.std():.2f})")
    ax.set_xlabel("column")
    ax.set_ylabel("column mean - frame mean")
    ax.set_title("Column stripes in the dark frames")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _crops_figure(crops: list[tuple[str, np.ndarray]], path: Path) -> str:
    fig, axes = plt.subplots(1, len(crops), figsize=(4 * len(crops), 4.2))
    for ax, (label, image) in zip(np.atleast_1d(axes), crops, strict=True):
        low, high = np.percentile(image, [0.5, 99.8])
        ax.imshow(image, cmap="gray", vmin=low, vmax=max(high, low + 1e-6))
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    return _save(fig, path)


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
th { background: #f3f3f3; font-weight: normal; }
img { max-width: 100%; border: 1px solid #eee; }
.note { background: #fff6d8; padding: 0.5em 1em; border-left: 4px solid #e0b000; }
"""


def write_report(directory: Path, data: ReportData) -> Path:
    """Write `report.html` and its plots (report/*.png) into `directory`; returns the HTML."""
    plots = directory / "report"
    plots.mkdir(parents=True, exist_ok=True)
    sections = [f"<h1>{html.escape(data.title)}</h1>", _table(data.summary)]
    sections += [f'<p class="note">{html.escape(note)}</p>' for note in data.notes]
    sections.append("<h2>Camera</h2>")
    sections.append(f'<img src="report/{_ptc_figure(data.ptc, plots / "ptc.png")}" alt="PTC">')
    sections.append(
        f'<img src="report/{_maps_figure(data, plots / "camera_maps.png")}" alt="noise maps">'
    )
    if data.stripe_profiles is not None:
        name = _stripes_figure(data.stripe_profiles, plots / "stripes.png")
        sections.append(f'<img src="report/{name}" alt="stripes">')
    if data.psf is not None:
        sections.append("<h2>Point-spread function</h2>")
        sections.append(f'<img src="report/{_psf_figure(data.psf, plots / "psf.png")}" alt="PSF">')
    if data.crops:
        sections.append("<h2>First model</h2>")
        name = _crops_figure(data.crops, plots / "restoration.png")
        sections.append(f'<img src="report/{name}" alt="raw and restored">')
    if data.metrics:
        sections.append("<h2>Metrics</h2>" + _table(data.metrics))
    page = (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(data.title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>"
    )
    path = directory / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
