"""`livedecon calibrate`: a calibration run, from files or live through pycromanager."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress, TaskID

from livedecon.cli._output import console
from livedecon.cli._output import fail as _fail
from livedecon.engines._configfile import ConfigError
from livedecon.engines._enums import Backend

if TYPE_CHECKING:
    from livedecon.calibration._calibration_bundle import CalibrationBundle
    from livedecon.calibration._config import MicroscopeConfig
    from livedecon.calibration._inputs import CalibrationInputs
    from livedecon.calibration._run import CalibrationSettings


def _progress(step: str, done: int, total: int) -> None:
    """One line per step start and end (long steps draw their own bars)."""
    if done == 0:
        console.print(f"[bold]{step}[/bold] ...")
    elif done >= total:
        console.print(f"[green]done[/green]: {step}")


def _capture_progress() -> tuple[Progress, Callable[[str, int, int], None]]:
    """Progress bars for the capture, one per stage, and the callback that moves them."""
    bars = Progress(console=console)
    tasks: dict[str, TaskID] = {}

    def step(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bars.add_task(label, total=total)
        bars.update(tasks[label], completed=done)

    return bars, step


def calibrate(
    out: Annotated[Path, typer.Argument(help="calibration bundle directory to write")],
    microscope: Annotated[
        Path | None, typer.Option(help="microscope TOML (optics, camera kind) [default: simulated]")
    ] = None,
    darks: Annotated[Path | None, typer.Option(help="TIFF stack of dark frames")] = None,
    flat: Annotated[
        list[Path] | None, typer.Option(help="TIFF stack of flats at one level; repeat per level")
    ] = None,
    beads: Annotated[Path | None, typer.Option(help="bead z-stack (OME-TIFF with z step)")] = None,
    bead_z_step_um: Annotated[
        float | None, typer.Option(min=0.001, help="z step of --beads if not in its metadata")
    ] = None,
    sample: Annotated[
        list[Path] | None, typer.Option(help="TIFF of sample frames (training data); repeat")
    ] = None,
    live: Annotated[
        bool, typer.Option(help="record darks, flats, beads and sample through pycromanager")
    ] = False,
    simulated: Annotated[
        bool, typer.Option(help="with --live: the simulated microscope instead of Micro-Manager")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(help="CalibrationSettings TOML (PSF choice, training, capture, stripes)"),
    ] = None,
    iterations: Annotated[int | None, typer.Option(min=1, help="first model's training")] = None,
    psf: Annotated[str | None, typer.Option(help="auto, measured, theoretical")] = None,
    backend: Annotated[Backend | None, typer.Option(help="engine for the first model")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="live: do not wait for Enter")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing bundle")] = False,
) -> None:
    """Calibrate a microscope: camera (offset, gain, read noise, hot pixels), PSF (beads and
    theory), a first zero-shot model, a calibration bundle the daemon serves, and a report."""
    from livedecon.calibration._config import load_microscope
    from livedecon.calibration._inputs import CalibrationInputs
    from livedecon.calibration._run import CalibrationError, CalibrationSettings, run_calibration
    from livedecon.configs import shipped_config_path
    from livedecon.engines._configfile import load_config

    try:
        scope = load_microscope(microscope or shipped_config_path("microscope_sim.toml"))
        settings = load_config(config, CalibrationSettings) if config else CalibrationSettings()
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    updates = {"psf": psf, "backend": backend}
    settings = settings.model_copy(update={k: v for k, v in updates.items() if v is not None})
    if iterations is not None:
        training = settings.training.model_copy(update={"iterations": iterations})
        settings = settings.model_copy(update={"training": training})
    try:
        settings = CalibrationSettings.model_validate(settings.model_dump())
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise _fail(f"{out}: exists and is not empty (--overwrite to replace it)")

    started = time.perf_counter()
    try:
        if live:
            if darks or flat or beads or sample:
                raise _fail(
                    "--live records its own data: leave out --darks/--flat/--beads/--sample"
                )
            inputs = _record_live(scope, settings, simulated, yes)
            written = inputs.save(out / "raw")
            console.print(f"raw data saved in {out / 'raw'} ({len(written)} files)")
        else:
            if darks is None or not flat:
                raise _fail("give --darks and --flat (one per level), or record with --live")
            inputs = CalibrationInputs.load(
                darks, flat, scope.optics.pixel_size_um, beads, bead_z_step_um, sample or []
            )
        bundle = run_calibration(inputs, scope, out, settings, _progress, overwrite=True)
    except (CalibrationError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    _print_summary(bundle, time.perf_counter() - started)


def _record_live(
    scope_config: MicroscopeConfig, settings: CalibrationSettings, simulated: bool, yes: bool
) -> CalibrationInputs:
    from livedecon.acquisition_hooks._calibration_capture import (
        capture_calibration,
        simulated_prompt,
    )

    bars, step = _capture_progress()
    if simulated:
        from livedecon.acquisition_hooks._simulated_microscope import SimulatedMicroscope

        with SimulatedMicroscope(scope_config, clock="wall") as scope:
            scope.attach_pycromanager()
            with bars:
                return capture_calibration(
                    scope.core, settings.capture, simulated_prompt(scope, console.print), step
                )
    from pycromanager import Core

    def ask(stage: str, instruction: str) -> None:
        console.print(f"[bold]{stage}[/bold]: {instruction}")
        if not yes:
            typer.confirm("Ready?", default=True, abort=True)

    try:
        core = Core()
    except Exception as exc:
        raise _fail(
            f"cannot reach Micro-Manager (is it running, with its server on?): {exc}"
        ) from None
    with bars:
        return capture_calibration(core, settings.capture, ask, step)


def _print_summary(bundle: CalibrationBundle, seconds: float) -> None:
    record = bundle.record
    cam = record.microscope.camera
    console.print(
        f"camera ({cam.kind}): gain {cam.gain_e_per_adu:.4g} e-/ADU, offset"
        f" {cam.offset_adu:.1f} ADU, read noise {cam.read_noise_e:.3g} e-,"
        f" {int(bundle.camera.hot_pixels.sum())} hot pixels"
    )
    if record.psf:
        p = record.psf
        lateral = f"{p.fwhm_um.get('x', float('nan')):.3f}" if p.fwhm_um else "-"
        console.print(
            f"PSF for the model: {p.source}; lateral FWHM measured {lateral} um, theory"
            f" {p.theory_fwhm_um['x']:.3f} um ({p.beads_used} beads)"
        )
    if record.model:
        m = record.model
        console.print(
            f"first model {m.bundle_id}: {m.iterations} iterations in {m.training_s:.0f} s,"
            f" {m.backend} (accuracy gate {m.gate_db or 0:.1f} dB)"
        )
    console.print(
        f"wrote {bundle.directory} in {seconds:.0f} s; report: {bundle.directory / record.report}"
    )
    console.print(
        f'serve it: set model.bundle = "{bundle.directory}" in the daemon config'
        " (the camera corrections come with it)"
    )
