"""`livedecon restore sim RAW OUT --microscope scope.toml [--then SIM-MODEL]`: raw SIM frames
to SR images, and `livedecon train --network sim|dps`: a SIM model from a raw SIM file.

The same reconstruction as the daemon's live SIM (daemon/_sim_processing.py): every sequence
of angles x phases frames in the file becomes one SR image at half the camera pixel, restored
by a SIM model (ZS-DeconvNet-SIM or DPS) when one is given.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.progress import Progress

from livedecon.calibration._sim_run import SimNetwork
from livedecon.cli._output import console
from livedecon.cli._output import fail as _fail
from livedecon.daemon._sim_processing import SimProcessor, sim_plan_for
from livedecon.engines._configfile import ConfigError
from livedecon.engines._enums import Backend

if TYPE_CHECKING:
    from livedecon.calibration._config import MicroscopeConfig
    from livedecon.daemon._processing import ModelProcessor

SIM_RECONSTRUCTION = "sim"  # the `restore` model name for the Wiener SIM reconstruction


@dataclass
class SimInput:
    """A raw SIM file read for the reconstruction: its sequences and the microscope."""

    groups: np.ndarray  # (sequences, angles x phases, Y, X) camera counts, as recorded
    processor: SimProcessor  # the reconstruction (and the network after it, if any)
    scope: MicroscopeConfig


def read_sim_input(
    input_tif: Path,
    microscope: Path | None,
    angles: int,
    phases: int,
    order: str,
    network: ModelProcessor | None = None,
) -> SimInput:
    """Read every angles x phases sequence of a raw SIM file with a microscope's optics and
    camera; ValueError (and the like) for what cannot be reconstructed."""
    from livedecon.calibration._config import load_microscope
    from livedecon.engines._raw_input import read_raw_image

    if microscope is None:
        raise ValueError("SIM needs --microscope: the optics (NA, emission) and camera")
    scope = load_microscope(microscope)
    sim = sim_plan_for(scope, angles, phases, order)
    pixel = scope.optics.pixel_size_um
    image = read_raw_image(input_tif, pixel, str(microscope))
    frames = image.data.reshape(-1, *image.data.shape[-2:])
    if len(frames) % sim.frames:
        raise ValueError(
            f"{input_tif}: {len(frames)} frames is not a whole number of sequences of"
            f" {sim.frames} ({angles} angles x {phases} phases)"
        )
    processor = SimProcessor(sim, pixel, network=network)
    return SimInput(frames.reshape(-1, sim.frames, *frames.shape[-2:]), processor, scope)


def _read(input_tif: Path, *args: Any, **kwargs: Any) -> SimInput:
    from pydantic import ValidationError

    from livedecon.engines._configfile import ConfigError

    try:
        return read_sim_input(input_tif, *args, **kwargs)
    except (ValueError, OSError, ConfigError, ValidationError) as exc:
        raise _fail(str(exc)) from None


def _network(then: str | None, backend: Backend) -> ModelProcessor | None:
    """The SIM model to restore the SR images with (`--then`), on its checked engine."""
    if then is None:
        return None
    from livedecon.daemon._daemon_config import NO_CORRECTION
    from livedecon.daemon._processing import open_processor
    from livedecon.engines._backends import AccuracyGateError
    from livedecon.engines._bundle import BundleError

    try:
        return open_processor(then, backend, max_batch=1, correction=NO_CORRECTION)
    except (BundleError, AccuracyGateError, ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from None


def restore_sim_command(
    input_tif: Path,
    output_tif: Path,
    microscope: Path | None,
    angles: int,
    phases: int,
    order: str,
    then: str | None = None,
    backend: Backend = Backend.AUTO,
) -> None:
    """Reconstruct every angles x phases sequence of a raw SIM file into an SR OME-TIFF;
    `then`: a SIM model restores each SR image after the reconstruction it learned behind."""
    from livedecon.engines._ome_tiff import write_ome_tiff

    data = _read(input_tif, microscope, angles, phases, order, _network(then, backend))
    processor = data.processor
    started = time.perf_counter()
    images = []
    with Progress(console=console) as progress:
        task = progress.add_task(f"restoring with {processor.name}", total=len(data.groups))
        for group in data.groups:
            try:
                images.append(processor.process([group])[0][0])
            except ValueError as exc:
                raise _fail(f"{input_tif}: {exc}") from None
            progress.advance(task)
    stack = np.stack(images).astype(np.float32)
    what = "generalised Wiener" + (f", then {processor.bundle_id}" if then else "")
    written = write_ome_tiff(
        output_tif,
        stack if len(stack) > 1 else stack[0],
        "TYX" if len(stack) > 1 else "YX",
        processor.output_pixel_um,
        description=(
            f"SIM reconstruction ({what}) of {input_tif.name}: {angles} angles x"
            f" {phases} phases ({order}), photoelectrons per output pixel"
        ),
    )
    console.print(
        f"wrote {written}: {len(stack)} SR image(s) at {processor.output_pixel_um:.4g} um in"
        f" {time.perf_counter() - started:.1f} s"
    )


def train_sim_command(
    out: Path,
    inputs: list[Path] | None,
    network: SimNetwork,
    microscope: Path | None,
    config: Path | None,
    overrides: Mapping[str, object],
    sim_options: tuple[int, int, str],
    name: str | None,
    overwrite: bool,
) -> None:
    """Train ZS-DeconvNet-SIM (`sim`) or DPS (`dps`) on the first sequence of a raw SIM file
    and bundle it (engines/_sim_bundle.py)."""
    from livedecon.calibration._sim_run import default_sim_config, train_sim_bundle
    from livedecon.engines._bundle import BundleError
    from livedecon.engines._configfile import load_config
    from livedecon.engines._dps import DpsConfig
    from livedecon.engines._sim_training import SimTrainingConfig

    if not inputs or len(inputs) != 1:
        raise _fail(
            f"--network {network} trains on one raw SIM file (angles x phases frames per"
            " sequence) with --microscope; simulate one with livedecon simulate --sim"
        )
    kind = SimTrainingConfig if network == "sim" else DpsConfig
    try:
        base = load_config(config, kind) if config else default_sim_config(network)
        values = {k: v for k, v in overrides.items() if v is not None}
        settings = kind.model_validate(base.model_dump() | values)
    except (ConfigError, ValueError) as exc:
        raise _fail(f"invalid {network} training settings: {exc}") from None
    data = _read(inputs[0], microscope, *sim_options)
    processor = data.processor
    frames_e = processor.electrons(data.groups[0])
    console.print(
        f"{len(data.groups)} sequence(s) of {processor.sim.frames} frames"
        f" {data.groups.shape[-2:]}; training {network} on the first"
    )
    label = "ZS-DeconvNet-SIM" if network == "sim" else "DPS"
    started = time.perf_counter()
    with Progress(console=console) as progress:
        task = progress.add_task(f"training {label}", total=settings.iterations)
        try:
            bundle = train_sim_bundle(
                frames_e,
                data.scope.optics,
                angles=processor.sim.angles,
                phases=processor.sim.phases,
                read_noise_e=data.scope.camera.read_noise_e,
                network=network,
                config=settings,
                name=name or out.name,
                data=[f"{inputs[0]} (first SIM sequence)"],
                on_step=lambda i: progress.update(task, completed=i),
            )
            bundle.save(out, overwrite=overwrite)
        except (ValueError, BundleError) as exc:
            raise _fail(str(exc)) from None
    m = bundle.manifest
    assert m.sim is not None  # train_sim_bundle bundles a SIM model
    console.print(
        f"wrote bundle {bundle.bundle_id} to {out}: {label} ({m.network.kind}),"
        f" {m.training.iterations} iterations in {time.perf_counter() - started:.0f} s, SR"
        f" pixel {m.input_pixel_um:.4g} um, Wiener constant {m.sim.reconstruction.wiener:.3g}"
    )
