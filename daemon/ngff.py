"""OME-Zarr (NGFF 0.5) image metadata, built and validated with yaozarrs' models: the one
place the daemon's OME-Zarr outputs (live planes, `livedecon batch`) describe their axes."""

from __future__ import annotations

from typing import Any

from yaozarrs import v05

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
