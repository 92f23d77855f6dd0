"""`livedecon restore sim RAW OUT --microscope scope.toml`: raw SIM frames to SR images.

The same reconstruction as the daemon's live SIM (daemon/sim_processing.py): every sequence
of angles x phases frames in the file becomes one SR image at half the camera pixel.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.progress import Progress

from livedecon.cli.output import console
from livedecon.cli.output import fail as _fail

SIM_RECONSTRUCTION = "sim"  # the `restore` model name for the Wiener SIM reconstruction


def restore_sim_command(
    input_tif: Path,
    output_tif: Path,
    microscope: Path | None,
    angles: int,
    phases: int,
    order: str,
) -> None:
    """Reconstruct every angles x phases sequence of a raw SIM file into an SR OME-TIFF."""
    from pydantic import ValidationError

    from livedecon.calibration.config import load_microscope
    from livedecon.daemon.protocol import SimPlan
    from livedecon.daemon.sim_processing import SimProcessor
    from livedecon.engines.configfile import ConfigError
    from livedecon.engines.ome_tiff import write_ome_tiff
    from livedecon.engines.raw_input import read_raw_image

    if microscope is None:
        raise _fail("restore sim needs --microscope: the optics (NA, emission) and camera")
    try:
        scope = load_microscope(microscope)
        optics, camera = scope.optics, scope.camera
        sim = SimPlan.model_validate(
            {
                "angles": angles,
                "phases": phases,
                "order": order,
                "na": optics.na,
                "emission_um": optics.emission_um,
                "immersion_ri": optics.immersion_ri,
                "sample_ri": optics.sample_ri,
                "camera_offset_adu": camera.offset_adu,
                "camera_gain_e_per_adu": camera.gain_e_per_adu,
            }
        )
        pixel = optics.pixel_size_um
        image = read_raw_image(input_tif, pixel, str(microscope))
        frames = image.data.reshape(-1, *image.data.shape[-2:])
        if len(frames) % sim.frames:
            raise ValueError(
                f"{input_tif}: {len(frames)} frames is not a whole number of sequences of"
                f" {sim.frames} ({angles} angles x {phases} phases)"
            )
        processor = SimProcessor(sim, pixel)
    except (ValueError, OSError, ConfigError, ValidationError) as exc:
        raise _fail(str(exc)) from None
    groups = frames.reshape(-1, sim.frames, *frames.shape[-2:])
    started = time.perf_counter()
    images = []
    with Progress(console=console) as progress:
        task = progress.add_task("reconstructing SIM", total=len(groups))
        for group in groups:
            try:
                images.append(processor.reconstruct(group))
            except ValueError as exc:
                raise _fail(f"{input_tif}: {exc}") from None
            progress.advance(task)
    stack = np.stack(images).astype(np.float32)
    written = write_ome_tiff(
        output_tif,
        stack if len(stack) > 1 else stack[0],
        "TYX" if len(stack) > 1 else "YX",
        processor.output_pixel_um,
        description=(
            f"SIM reconstruction (generalised Wiener) of {input_tif.name}: {angles} angles x"
            f" {phases} phases ({order}), photoelectrons per output pixel"
        ),
    )
    console.print(
        f"wrote {written}: {len(stack)} SR image(s) at {processor.output_pixel_um:.4g} um in"
        f" {time.perf_counter() - started:.1f} s"
    )
