"""The datasets `livedecon batch` reads: TIFF / OME-TIFF, OME-Zarr (or bare zarr) and NDTiff,
each described once (`Source`) and read by the workers region by region, never whole."""

from __future__ import annotations

import glob
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from livedecon.engines._bundle import ModelBundle
from livedecon.engines._configfile import StrictModel
from livedecon.engines._ome_tiff import check_pixel_size, tiff_layout
from livedecon.engines._ome_zarr import image_of, is_image
from livedecon.engines._raw_input import open_ndtiff
from livedecon.engines._selfnet_bundle import check_z_step

ZARR_SUFFIXES = (".ome.zarr", ".zarr")
TIFF_SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff")
NDTIFF_INDEX = "NDTiff.index"
# NDTiff axes in output order (NGFF: time, channel, space); a position is a dataset of its own
NDTIFF_AXES = {"time": "T", "channel": "C", "z": "Z"}

Region = tuple[slice, ...]


class Source(StrictModel):
    """One input dataset, as every worker reads it."""

    path: str
    kind: Literal["zarr", "tiff", "ndtiff"]
    array: str = ""  # the array inside a zarr group ("" for a bare array)
    shape: tuple[int, ...]
    dtype: str
    axes: str
    pixel_size_um: float | None
    z_step_um: float | None
    output: str
    # NDTiff: the values of each leading axis (by index) and the fixed ones (the position)
    axis_values: tuple[tuple[str, tuple[int | str, ...]], ...] = ()
    fixed: tuple[tuple[str, int | str], ...] = ()


def stem(path: Path) -> str:
    """The file or store name without its TIFF or zarr suffix."""
    name = path.name
    for suffix in (*ZARR_SUFFIXES, *TIFF_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_zarr(path: Path) -> bool:
    """Whether `path` is a zarr store (v2 or v3 metadata at its top)."""
    return path.is_dir() and any((path / f).is_file() for f in ("zarr.json", ".zattrs", ".zarray"))


def is_ndtiff(path: Path) -> bool:
    """Whether `path` is an NDTiff dataset (a directory with its index file)."""
    return path.is_dir() and (path / NDTIFF_INDEX).is_file()


def _is_dataset(path: Path) -> bool:
    """A TIFF file, a zarr store or an NDTiff dataset inside a folder given as input."""
    name = path.name.lower()
    if path.is_file():
        return name.endswith(TIFF_SUFFIXES)
    return (name.endswith(ZARR_SUFFIXES) and is_zarr(path)) or is_ndtiff(path)


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, folders of datasets, zarr stores, NDTiff datasets and glob patterns, as a list."""
    found: list[Path] = []
    for item in map(str, inputs):
        paths = [Path(p) for p in sorted(glob.glob(item))] if glob.has_magic(item) else [Path(item)]
        for path in paths:
            if is_zarr(path) or is_ndtiff(path) or path.is_file():
                found.append(path)
            elif path.is_dir():
                found += sorted(p for p in path.iterdir() if _is_dataset(p))
            else:
                raise FileNotFoundError(f"{path}: no such file, folder or dataset")
    if not found:
        raise FileNotFoundError(f"no input datasets in {', '.join(map(str, inputs))}")
    return found


def _zarr_fields(path: Path) -> dict[str, Any]:
    """A zarr array, or the full-resolution level of an OME-Zarr (NGFF 0.4 or 0.5) image."""
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        letters = {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TCZYX"}.get(node.ndim, "")
        return dict(array="", shape=node.shape, dtype=str(node.dtype), axes=letters,
                    pixel_size_um=None, z_step_um=None)  # fmt: skip
    if not is_image(node):
        raise ValueError(f"{path}: a zarr group without OME-Zarr multiscales metadata")
    image = image_of(node)
    names = image.axes
    sampling = image.sampling()
    array = node[image.array_path]
    if not isinstance(array, zarr.Array):
        raise ValueError(f"{path}: {image.array_path!r} of its multiscales is not an array")
    return dict(
        array=image.array_path,
        shape=array.shape,
        dtype=str(array.dtype),
        axes="".join(n.upper() for n in names),
        pixel_size_um=sampling.get("x"),
        z_step_um=sampling.get("z"),
    )


def _ndtiff_sources(path: Path, output: Path) -> list[Source]:
    """One source per stage position: time, channel and z lead (those present), then Y, X."""
    data = open_ndtiff(path)
    try:
        axes = {name: tuple(values) for name, values in data.axes.items()}
        unknown = set(axes) - set(NDTIFF_AXES) - {"position"}
        if unknown:
            raise ValueError(f"{path}: NDTiff axes {sorted(unknown)} are not time/channel/z")
        lead = tuple((name, axes[name]) for name in NDTIFF_AXES if name in axes)
        first = dict(data.get_image_coordinates_list()[0])
        pixel = data.read_metadata(**first).get("PixelSizeUm") or None
        summary = data.summary_metadata or {}
        shape = (*(len(v) for _, v in lead), data.image_height, data.image_width)
        dtype = str(np.dtype(data.dtype))
    finally:
        data.close()
    positions = axes.get("position", (None,))
    sources = []
    for position in positions:
        suffix = f"_p{position}" if len(positions) > 1 else ""
        target = output.with_name(output.name.replace(".ome.zarr", f"{suffix}.ome.zarr"))
        sources.append(
            Source(
                path=str(path),
                kind="ndtiff",
                shape=shape,
                dtype=dtype,
                axes="".join(NDTIFF_AXES[name] for name, _ in lead) + "YX",
                pixel_size_um=float(pixel) if pixel else None,
                z_step_um=summary.get("z-step_um"),
                output=str(target),
                axis_values=lead,
                fixed=() if position is None else (("position", position),),
            )
        )
    return sources


def open_sources(path: Path, output: Path) -> list[Source]:
    """The dataset(s) at `path`: one, or one per stage position of an NDTiff dataset."""
    if is_ndtiff(path):
        return _ndtiff_sources(path, output)
    if is_zarr(path):
        return [Source(path=str(path), kind="zarr", output=str(output), **_zarr_fields(path))]
    layout = tiff_layout(path)
    return [
        Source(
            path=str(path),
            kind="tiff",
            shape=layout.shape,
            dtype=layout.dtype,
            axes=layout.axes,
            pixel_size_um=layout.pixel_size_um,
            z_step_um=layout.z_step_um,
            output=str(output),
        )
    ]


def plan_sources(inputs: Sequence[str | Path], out: Path, bundle: ModelBundle) -> list[Source]:
    """Each input with its output: `out` itself for one dataset and an `out` ending in .zarr,
    else `out/<name>.ome.zarr`. Refuses inputs the bundle cannot restore."""
    paths = expand_inputs(inputs)
    single = len(paths) == 1 and str(out).endswith(".zarr")
    outputs = [out if single else out / f"{stem(p)}.ome.zarr" for p in paths]
    if len(set(outputs)) != len(outputs):
        raise ValueError("two inputs have the same name: their outputs would collide")
    manifest = bundle.manifest
    need = 3 if manifest.takes_volumes else 2
    sources = []
    for path, output in zip(paths, outputs, strict=True):
        if output.resolve() == path.resolve():
            raise ValueError(f"{output}: would overwrite the raw input")
        for source in open_sources(path, output):
            if len(source.shape) < need:
                raise ValueError(f"{path}: shape {source.shape} has no {'Z, ' * (need == 3)}Y, X")
            if source.pixel_size_um is not None:
                check_pixel_size(
                    path,
                    source.pixel_size_um,
                    manifest.input_pixel_um,
                    f"bundle {bundle.bundle_id}",
                )
            if manifest.is_selfnet:  # the axial blur it undoes is that of one z step
                try:
                    check_z_step(bundle, source.z_step_um)
                except ValueError as exc:
                    raise ValueError(f"{path}: {exc}") from None
            sources.append(source)
    return sources


_READERS: dict[str, Any] = {}  # per worker process: open TIFF stores and NDTiff datasets


def _reader(source: Source) -> Any:
    reader = _READERS.get(source.path)
    if reader is None:
        if source.kind == "ndtiff":
            reader = open_ndtiff(Path(source.path))
        else:
            import tifffile
            import zarr

            store = tifffile.imread(source.path, aszarr=True, series=0, level=0)
            reader = zarr.open_array(store, mode="r")
        _READERS[source.path] = reader
    return reader


def _read_ndtiff(source: Source, region: Region) -> np.ndarray:
    """The region plane by plane; a plane the dataset lacks is an error (a missing chunk)."""
    data = _reader(source)
    lead, (ys, xs) = region[:-2], region[-2:]
    names = [name for name, _ in source.axis_values]
    values = [v[s] for (_, v), s in zip(source.axis_values, lead, strict=True)]
    planes = []
    for combination in itertools.product(*values):
        coordinates = dict(source.fixed) | dict(zip(names, combination, strict=True))
        if not data.has_image(**coordinates):
            raise KeyError(f"no image at {coordinates}")
        planes.append(np.asarray(data.read_image(**coordinates))[ys, xs])
    return np.stack(planes).reshape(*(len(v) for v in values), *planes[0].shape)


def read_region(source: Source, region: Region) -> np.ndarray:
    """The pixels of `region` of a source, read from its zarr array, NDTiff dataset or TIFF."""
    if source.kind == "zarr":
        import zarr

        return np.asarray(zarr.open_array(source.path, path=source.array, mode="r")[region])
    if source.kind == "ndtiff":
        return _read_ndtiff(source, region)
    return np.asarray(_reader(source)[region])
