"""The raw datasets acquisition software writes beside a live run, read plane by plane for
crash recovery (`livedecon reprocess`), addressed by the daemon's own axes:

- NDTiff: Micro-Manager 2 and pycro-manager (`ndstorage`);
- OME-Zarr (NGFF 0.5, zarr v3): pymmcore-plus's `run(..., output="raw.ome.zarr")` through
  ome-writers; one image group, or one per stage position (the bioformats2raw layout).

A plane the writer never got to (its chunk file absent) is reported as absent, never as the
array's fill value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from livedecon.engines._ome_zarr import chunk_written, store_images

PlaneKey = tuple[int, int, int | str, int | str]  # (time, z, channel, position)


class RawDatasetError(Exception):
    """The path is not a raw dataset this module reads."""


class RawDataset(Protocol):
    """A raw dataset read plane by plane, by the daemon's axes."""

    def has(self, key: PlaneKey) -> bool:
        """Whether the plane was written."""

    def read(self, key: PlaneKey) -> np.ndarray:
        """The plane's pixels (call `has` first)."""

    def close(self) -> None:
        """Release file handles."""


def open_raw_dataset(path: Path, channels: list[str]) -> RawDataset:
    """The dataset at `path`: an NDTiff directory or an OME-Zarr store. `channels` are the
    plan's channel names, in acquisition order (how a zarr's channel index is named)."""
    path = Path(path)
    if (path / "zarr.json").is_file() or (path / ".zattrs").is_file():
        return OmeZarrRaw(path, channels)
    if path.is_dir():
        return NDTiffRaw(path, channels)
    raise RawDatasetError(f"{path}: no raw dataset (an NDTiff or OME-Zarr directory) there")


def _channel_value(values: Any, value: int | str, channels: list[str]) -> Any:
    """`value` among a dataset's channel `values` (names or indices): as it is, or an index
    the plan names, or the one channel of a single-channel dataset."""
    if value in values:
        return value
    if isinstance(value, int):
        named = channels[value] if value < len(channels) else None
        if named in values:
            return named
        if value == 0 and len(values) == 1:
            return next(iter(values))
    return None


class NDTiffRaw:
    """Single planes of an NDTiff dataset."""

    def __init__(self, path: Path, channels: list[str]) -> None:
        from livedecon.engines._raw_input import open_ndtiff

        self.path, self._channels = path, channels
        try:
            self._data = open_ndtiff(path)
        except ValueError as exc:
            raise RawDatasetError(f"{exc} (Micro-Manager / pycro-manager)") from None
        self.axes: dict[str, Any] = dict(self._data.axes)

    def _coordinates(self, key: PlaneKey) -> dict[str, int | str] | None:
        time, z, channel, position = key
        wanted = {"time": time, "z": z, "channel": channel, "position": position}
        # Axes the dataset does not have were not varied (e.g. no "position" for one field).
        coordinates = {}
        for name, value in wanted.items():
            if name not in self.axes:
                continue
            values = self.axes[name]
            found = (
                _channel_value(values, value, self._channels)
                if name == "channel"
                else (value if value in values else None)
            )
            if found is None:
                return None
            coordinates[name] = found
        return coordinates

    def has(self, key: PlaneKey) -> bool:
        coordinates = self._coordinates(key)
        return coordinates is not None and bool(self._data.has_image(**coordinates))

    def read(self, key: PlaneKey) -> np.ndarray:
        coordinates = self._coordinates(key)
        if coordinates is None:
            raise KeyError(key)
        return np.array(self._data.read_image(**coordinates))

    def close(self) -> None:
        self._data.close()


class OmeZarrRaw:
    """Single planes of an OME-Zarr store as ome-writers writes an MDA: an image group per
    stage position (or the root for one), each holding its full-resolution array with
    dimension names among t, p, c, z, y, x."""

    def __init__(self, path: Path, channels: list[str]) -> None:
        import zarr

        self.path, self._channels = path, channels
        try:
            root = zarr.open_group(str(path), mode="r")
        except Exception as exc:
            raise RawDatasetError(f"{path}: not a readable zarr store: {exc}") from None
        # (array path in the store, array) per position
        self._positions: list[tuple[str, Any]] = [
            (f"{name}/{image.array_path}".strip("/"), image.array)
            for name, image in store_images(root)
        ]
        if not self._positions:
            raise RawDatasetError(f"{path}: an OME-Zarr store without images")
        self._position_names = self._stage_position_names(root)

    def _stage_position_names(self, root: Any) -> list[str | None]:
        """Names of the stage positions, from the sequence pymmcore-plus stored (in the root
        or in the first image group)."""
        groups = [root] + ([root["0"]] if "0" in root.group_keys() else [])
        for group in groups:
            summary = group.attrs.get("pymmcore_plus", {}).get("summary_metadata", {})
            positions = summary.get("mda_sequence", {}).get("stage_positions")
            if positions:
                return [p.get("name") for p in positions]
        return []

    def _index(self, key: PlaneKey) -> tuple[Any, tuple[int, ...]] | None:
        time, z, channel, position = key
        if isinstance(position, str):
            if position not in self._position_names:
                return None
            position = self._position_names.index(position)
        if not 0 <= position < len(self._positions):
            return None
        array_path, array = self._positions[position]
        names = list(array.metadata.dimension_names)
        channel_index = self._channel_index(channel)
        if channel_index is None or ("c" not in names and channel_index != 0):
            return None
        wanted = {"t": time, "z": z, "c": channel_index, "p": 0}
        index = []
        for name, size in zip(names[:-2], array.shape[:-2], strict=True):
            value = wanted.get(name, 0)
            if not 0 <= value < size:
                return None
            index.append(value)
        return (array_path, array), tuple(index)

    def _channel_index(self, channel: int | str) -> int | None:
        """A channel's index in the store: the plan names channels in acquisition order."""
        if isinstance(channel, str):
            return self._channels.index(channel) if channel in self._channels else None
        return channel if channel >= 0 else None

    def has(self, key: PlaneKey) -> bool:
        found = self._index(key)
        return found is not None and self._chunk_written(*found)

    def _chunk_written(self, where: tuple[str, Any], index: tuple[int, ...]) -> bool:
        """Whether this plane is on disk: one never written reads as the fill value, which
        must not pass for camera pixels."""
        array_path, array = where
        return chunk_written(self.path, array_path, array, index)

    def read(self, key: PlaneKey) -> np.ndarray:
        found = self._index(key)
        if found is None:
            raise KeyError(key)
        (_, array), index = found
        return np.asarray(array[index])

    def close(self) -> None:
        pass
