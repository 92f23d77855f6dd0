"""The `livedecon` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from livedecon.engines.configfile import ConfigError

app = typer.Typer(
    help="livedecon: real-time restoration of fluorescence microscopy during acquisition.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)


@app.callback()
def main() -> None:
    """livedecon: real-time restoration of fluorescence microscopy during acquisition."""


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("sim_out"),
    config: Annotated[
        Path | None, typer.Option(help="microscope TOML for the 2D series [default: simulated]")
    ] = None,
    config_3d: Annotated[
        Path | None, typer.Option(help="microscope TOML for the 3D stack [default: widefield-3d]")
    ] = None,
    frames: Annotated[int, typer.Option(min=1, help="timepoints in the 2D series")] = 20,
    interval_s: Annotated[float, typer.Option(min=0.0, help="time between frames")] = 5.0,
    exposure_ms: Annotated[float, typer.Option(min=0.01, help="camera exposure")] = 20.0,
) -> None:
    """Write a synthetic 2D time series and a 3D stack, each with its ground truth (OME-TIFF)."""
    from livedecon.calibration.config import load_microscope, shipped_config_path
    from livedecon.calibration.forward_model import sample_planes_um
    from livedecon.calibration.simulation import (
        simulate_stack,
        simulate_time_series,
        write_manifest,
    )

    try:
        scope_2d = load_microscope(config or shipped_config_path("microscope_sim.toml"))
        scope_3d = load_microscope(config_3d or shipped_config_path("microscope_widefield_3d.toml"))
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    for path, scope in ((config, scope_2d), (config_3d, scope_3d)):
        if scope.sample is None:
            raise _fail(f"{path}: has no [sample] section, so there is nothing to simulate")
    if scope_3d.sample.depth_um == 0:
        raise _fail(f"{config_3d}: [sample] depth_um is 0; a 3D stack needs a thick sample")
    n_planes = sample_planes_um(scope_3d.sample.depth_um, scope_3d.optics.z_step_um).size
    with Progress(console=console) as progress:
        task = progress.add_task("rendering", total=frames + n_planes)
        step = lambda n: progress.advance(task, n)  # noqa: E731
        series = simulate_time_series(scope_2d, out, frames, interval_s, exposure_ms, step)
        stack = simulate_stack(scope_3d, out, exposure_ms, step)
    manifest = write_manifest(out, {"series_2d": series, "stack_3d": stack})
    console.print(
        f"wrote {out / series['raw']} ({frames} x {scope_2d.camera.height_px} x "
        f"{scope_2d.camera.width_px}), {out / stack['raw']} ({n_planes} planes), their ground "
        f"truth at 2x sampling, and {manifest}"
    )
