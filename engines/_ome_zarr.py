"""OME-Zarr images, read and described in one place: where a store keeps its images, what
their full-resolution array, axes and scale are, whether a plane's chunk was ever written, and
the NGFF 0.5 metadata livedecon's own outputs carry (built with yaozarrs' models).

Readers: `raw_input` (train, restore), `daemon._raw_datasets` (reprocess), `daemon._batch_inputs`.
Writers: `daemon._zarr_output` (the daemon's live copy) and `daemon._batch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yaozarrs import v05


@dataclass(frozen=True)
class NgffImage:
    """One image of a store: its group, the path of its full-resolution array in the group,
    the axis names and that array's scale (None where none is recorded)."""

    group: Any  # a zarr.Group; its attributes are plain JSON
    array_path: str
    axes: list[str]
    scale: list[float] | None

    @property
    def array(self) -> Any:
        return self.group[self.array_path]

    def sampling(self) -> dict[str, float]:
        """Step per axis name, for the axes the scale gives."""
        return dict(zip(self.axes, self.scale, strict=True)) if self.scale else {}


def _ome(group: Any) -> Any:
    """NGFF 0.5 keeps its metadata under `ome`; 0.4 at the top of the attributes."""
    return group.attrs.get("ome", group.attrs)


def is_image(group: Any) -> bool:
    """Whether a zarr group is an OME-Zarr image (has multiscales)."""
    return "multiscales" in _ome(group)


def image_of(group: Any) -> NgffImage:
    """The first multiscale of an image group, at full resolution."""
    multiscale = _ome(group)["multiscales"][0]
    names = [str(a["name"]) if isinstance(a, dict) else str(a) for a in multiscale["axes"]]
    level = multiscale["datasets"][0]
    scale = next(
        (
            [float(v) for v in t["scale"]]
            for t in level.get("coordinateTransformations", [])
            if t.get("type") == "scale"
        ),
        None,
    )
    return NgffImage(group, str(level["path"]), names, scale)


def store_images(root: Any) -> list[tuple[str, NgffImage]]:
    """(group path, image) of each image in a store: the root's own, or one per numbered
    child group (the bioformats2raw layout ome-writers uses for stage positions), in order."""
    if is_image(root):
        return [("", image_of(root))]
    names = sorted((n for n in root.group_keys() if n.isdigit()), key=int)
    return [(n, image_of(root[n])) for n in names if is_image(root[n])]


def chunk_file(store: Path, array_path: str, array: Any, index: tuple[int, ...]) -> Path:
    """The file of the chunk (or shard) holding the plane at `index` (the leading indices) in
    a local store."""
    grid = array.metadata.chunk_grid.chunk_shape  # the stored unit (a shard if sharded)
    full = (*index, *(0,) * (len(grid) - len(index)))
    coords = tuple(i // c for i, c in zip(full, grid, strict=True))
    return Path(store) / array_path / array.metadata.encode_chunk_key(coords)


def chunk_written(store: Path, array_path: str, array: Any, index: tuple[int, ...]) -> bool:
    """Whether the plane at `index` is on disk: a plane never written reads as the fill
    value, which must not pass for data."""
    return chunk_file(store, array_path, array, index).is_file()


_AXES = {"T": ("t", "time"), "C": ("c", "channel"), "Z": ("z", "space")}
_AXES |= {"Y": ("y", "space"), "X": ("x", "space")}


def _axis(letter: str, time_unit: str | None) -> v05.TimeAxis | v05.ChannelAxis | v05.SpaceAxis:
    name, kind = _AXES[letter]
    if kind == "time":
        return v05.TimeAxis(name=name, type="time", unit=time_unit)
    if kind == "channel":
        return v05.ChannelAxis(name=name, type="channel")
    return v05.SpaceAxis(name=name, type="space", unit="micrometer")


def ngff_image(
    name: str, scale: dict[str, float], array: str = "0", time_unit: str | None = None
) -> dict[str, Any]:
    """The `ome` attributes of a one-level image whose axes are `scale`'s keys (letters of
    TCZYX, in that order), each with its step: micrometres in space, `time_unit` in time
    (None: an index, where the interval is not known)."""
    multiscale = v05.Multiscale(
        name=name,
        axes=[_axis(letter, time_unit) for letter in scale],
        datasets=[
            v05.Dataset(
                path=array,
                coordinateTransformations=[v05.ScaleTransformation(scale=list(scale.values()))],
            )
        ],
    )
    image = v05.Image(multiscales=[multiscale])
    return image.model_dump(mode="json", exclude_none=True, by_alias=True)
