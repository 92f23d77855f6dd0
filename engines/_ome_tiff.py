"""OME-TIFF files with physical sizes: the one place images are written and read back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile


@dataclass(frozen=True)
class OmeImage:
    """An image's pixels, axes and physical sampling."""

    data: np.ndarray
    axes: str
    pixel_size_um: float
    z_step_um: float | None


def write_ome_tiff(
    path: str | Path,
    data: np.ndarray,
    axes: str,
    pixel_size_um: float,
    z_step_um: float | None = None,
    time_increment_s: float | None = None,
    description: str | None = None,
) -> Path:
    """Write `data` (axes such as 'TYX', 'ZYX') with its physical sampling in the OME-XML."""
    if data.ndim != len(axes):
        raise ValueError(f"data has {data.ndim} dimensions but axes is {axes!r}")
    metadata: dict[str, object] = {
        "axes": axes,
        "PhysicalSizeX": pixel_size_um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": pixel_size_um,
        "PhysicalSizeYUnit": "µm",
    }
    if z_step_um is not None:
        metadata.update(PhysicalSizeZ=z_step_um, PhysicalSizeZUnit="µm")
    if time_increment_s is not None:
        metadata.update(TimeIncrement=time_increment_s, TimeIncrementUnit="s")
    if description:
        metadata["Description"] = description
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(
        path,
        data,
        ome=True,
        bigtiff=data.nbytes > 2**31,
        photometric="minisblack",  # one channel per plane: never read a short axis as RGB
        metadata=metadata,
    )
    return path


# micrometres per unit of an OME length (the units a pixel size is given in, in practice)
UM_PER_UNIT = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_sampling(tif: tifffile.TiffFile, path: str | Path) -> tuple[float, float | None]:
    """Pixel size and z step (um) recorded in an OME-TIFF's metadata, read through ome-types
    and converted from whatever length unit it states."""
    from ome_types import from_xml

    xml = tif.ome_metadata
    if xml is None:
        raise ValueError(f"{path}: not an OME-TIFF (no OME metadata)")
    try:
        images = from_xml(xml).images
    except Exception as exc:  # ome-types raises XML and validation errors of several kinds
        first = " ".join(str(exc).split())[:200]  # one line: validation errors run long
        raise ValueError(f"{path}: its OME metadata cannot be read ({first})") from None
    if not images:
        raise ValueError(f"{path}: OME metadata describes no image")
    pixels = images[0].pixels
    if pixels.physical_size_x is None:
        raise ValueError(f"{path}: OME metadata has no PhysicalSizeX")
    x = _micrometres(pixels.physical_size_x, pixels.physical_size_x_unit.value, path)
    if pixels.physical_size_z is None:
        return x, None
    return x, _micrometres(pixels.physical_size_z, pixels.physical_size_z_unit.value, path)


def _micrometres(value: float, unit: str, path: str | Path) -> float:
    if unit not in UM_PER_UNIT:
        raise ValueError(f"{path}: a pixel size in {unit!r}, a unit this reader does not convert")
    return float(value) * UM_PER_UNIT[unit]


def read_ome_tiff(path: str | Path) -> OmeImage:
    """Pixels, axes and physical sizes of an OME-TIFF written by `write_ome_tiff` (or others)."""
    with tifffile.TiffFile(path) as tif:
        if not tif.is_ome:
            raise ValueError(f"{path}: not an OME-TIFF")
        series = tif.series[0]
        data = series.asarray()
        pixel_um, z_step = _ome_sampling(tif, path)
    return OmeImage(data=data, axes=series.axes, pixel_size_um=pixel_um, z_step_um=z_step)


@dataclass(frozen=True)
class TiffLayout:
    """What a TIFF holds, without reading its pixels (batch restoration reads them in parts)."""

    shape: tuple[int, ...]
    dtype: str
    axes: str
    pixel_size_um: float | None  # None: a plain TIFF records none
    z_step_um: float | None


def tiff_layout(path: str | Path) -> TiffLayout:
    """Shape, dtype, axes and sampling of a TIFF's first series, without reading its pixels."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        pixel_um, z_step = _ome_sampling(tif, path) if tif.is_ome else (None, None)
        return TiffLayout(tuple(series.shape), str(series.dtype), series.axes, pixel_um, z_step)


def check_pixel_size(path: str | Path, found_um: float, expected_um: float, for_: str) -> None:
    """Refuse data whose pixel size is not the one `for_` (a bundle) was made for."""
    if abs(found_um / expected_um - 1) > PIXEL_SIZE_TOLERANCE:
        raise ValueError(
            f"{path}: pixel size {found_um} um, but {for_} has {expected_um} um pixels"
        )


# Data whose recorded pixel size is this far off the expected one would be deconvolved with a
# PSF of the wrong width.
PIXEL_SIZE_TOLERANCE = 0.02


def read_raw_tiff(path: str | Path, expected_pixel_um: float, expected_for: str) -> OmeImage:
    """Raw data from any TIFF. An OME-TIFF's recorded pixel size must match
    `expected_pixel_um` (what `expected_for` needs, for the error message); a plain TIFF has
    none, and takes the expected one."""
    with tifffile.TiffFile(path) as tif:
        if not tif.is_ome:
            series = tif.series[0]
            return OmeImage(series.asarray(), series.axes, expected_pixel_um, None)
    image = read_ome_tiff(path)
    check_pixel_size(path, image.pixel_size_um, expected_pixel_um, expected_for)
    return image
