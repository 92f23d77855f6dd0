"""The `livedecon` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from livedecon.cli._bench import bench_app
from livedecon.cli._calibrate import calibrate
from livedecon.cli._output import console
from livedecon.cli._output import fail as _fail
from livedecon.cli._selfnet_commands import (
    SELFNET_NETWORKS,
    open_selfnet_chain,
    restore_selfnet_command,
    staging_path,
    train_selfnet_command,
)
from livedecon.engines._configfile import ConfigError
from livedecon.engines._enums import Backend, Precision

if TYPE_CHECKING:
    from livedecon.cli._demo import DemoSummary
    from livedecon.engines._bundle import ModelBundle

app = typer.Typer(
    help="livedecon: real-time restoration of fluorescence microscopy during acquisition.",
    no_args_is_help=True,
    add_completion=False,
)


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
    sim: Annotated[
        bool, typer.Option("--sim", help="also a 2D SIM acquisition (3 angles x 3 phases)")
    ] = False,
    sim_photons: Annotated[
        float, typer.Option(min=0.1, help="SIM: peak photons per raw frame")
    ] = 100.0,
) -> None:
    """Write a synthetic 2D time series and a 3D stack, each with its ground truth (OME-TIFF);
    with --sim also a SIM acquisition (TIRF, 256 x 256) with its truth and true pattern."""
    from livedecon.calibration._config import load_microscope
    from livedecon.calibration._forward_model import sample_planes_um
    from livedecon.calibration._simulation import (
        simulate_stack,
        simulate_time_series,
        write_manifest,
    )
    from livedecon.configs import shipped_config_path

    try:
        scope_2d = load_microscope(config or shipped_config_path("microscope_sim.toml"))
        scope_3d = load_microscope(config_3d or shipped_config_path("microscope_widefield_3d.toml"))
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    for path, scope in ((config, scope_2d), (config_3d, scope_3d)):
        if scope.sample is None:
            raise _fail(f"{path}: has no [sample] section, so there is nothing to simulate")
    sample_3d = scope_3d.sample
    assert sample_3d is not None  # checked just above
    if sample_3d.depth_um == 0:
        raise _fail(f"{config_3d}: [sample] depth_um is 0; a 3D stack needs a thick sample")
    n_planes = sample_planes_um(sample_3d.depth_um, scope_3d.optics.z_step_um).size
    with Progress(console=console) as progress:
        task = progress.add_task("rendering", total=frames + n_planes)
        step = lambda n: progress.advance(task, n)  # noqa: E731
        series = simulate_time_series(scope_2d, out, frames, interval_s, exposure_ms, step)
        stack = simulate_stack(scope_3d, out, exposure_ms, step)
    entries = {"series_2d": series, "stack_3d": stack}
    if sim:
        from livedecon.calibration._quality_bench import Scene
        from livedecon.calibration._sim_simulator import render_sim, write_sim_acquisition

        with console.status("rendering the SIM acquisition"):
            scene = Scene(structure="mixed", peak_photons=sim_photons, size_px=256, seed=4000)
            entries["sim_2d"] = write_sim_acquisition(render_sim(scene), out)
        console.print(f"wrote {out / 'sim_raw.ome.tif'} (9 x 256 x 256) and its truth")
    manifest = write_manifest(out, entries)
    console.print(
        f"wrote {out / str(series['raw'])} ({frames} x {scope_2d.camera.height_px} x "
        f"{scope_2d.camera.width_px}), {out / str(stack['raw'])} ({n_planes} planes), their ground "
        f"truth at 2x sampling, and {manifest}"
    )


SIM_NETWORKS = ("sim", "dps")  # ZS-DeconvNet-SIM and DPS, behind the SIM reconstruction
NETWORKS = ("fast", "full", "3d", *SELFNET_NETWORKS, *SIM_NETWORKS)


def _has_camera_section(path: Path) -> bool:
    import tomllib

    try:
        return "camera" in tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return True  # let the config loader report the problem


@app.command()
def train(
    out: Annotated[Path, typer.Argument(help="bundle directory to write")],
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="raw camera counts (TIFF, OME-TIFF, an NDTiff or OME-Zarr dataset); none:"
            " simulate with the microscope"
        ),
    ] = None,
    microscope: Annotated[
        Path | None, typer.Option(help="microscope TOML (optics, camera) [default: simulated]")
    ] = None,
    network: Annotated[
        str | None,
        typer.Option(
            help=f"architecture: {', '.join(NETWORKS)} [default: the recipe's: fast on a CPU,"
            " full on a GPU]"
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="TrainingConfig TOML; the options below override it [default: the recipe for"
            " this machine: about 10 minutes on a CPU, the reference schedule on a GPU]"
        ),
    ] = None,
    budget_min: Annotated[
        float | None,
        typer.Option(min=0.1, help="wall-time cap in minutes; the learning rate follows it"),
    ] = None,
    camera: Annotated[
        str,
        typer.Option(
            help="camera values for TIFF inputs: 'auto' (the microscope's [camera] checked"
            " against the frames' own noise; the estimate when the config has none), 'config',"
            " or 'estimate'"
        ),
    ] = "auto",
    iterations: Annotated[
        int | None,
        typer.Option(
            min=1, help="run exactly this many (the recipe's cap on passes over the data is off)"
        ),
    ] = None,
    patch_px: Annotated[int | None, typer.Option(min=16)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    learning_rate: Annotated[float | None, typer.Option(min=0.0)] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    psf: Annotated[
        Path | None, typer.Option(help="measured PSF (OME-TIFF with pixel size)")
    ] = None,
    simulated_frames: Annotated[int, typer.Option(min=1, help="timepoints to simulate")] = 8,
    exposure_ms: Annotated[float, typer.Option(min=0.01, help="simulated exposure")] = 20.0,
    name: Annotated[str | None, typer.Option(help="bundle name [default: OUT's name]")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing bundle")] = False,
    pixel_um: Annotated[
        float | None, typer.Option(min=0.0, help="Self-Net: lateral pixel [default: OME]")
    ] = None,
    z_step_um: Annotated[
        float | None, typer.Option(min=0.0, help="Self-Net: z step [default: OME]")
    ] = None,
    sim_angles: Annotated[int, typer.Option(min=1, max=8, help="sim, dps: pattern angles")] = 3,
    sim_phases: Annotated[int, typer.Option(min=3, max=9, help="sim, dps: phases per angle")] = 3,
    sim_order: Annotated[
        str, typer.Option(help="sim, dps: frame order, angle-phase or phase-angle")
    ] = "angle-phase",
) -> None:
    """Train a ZS-DeconvNet on a microscope's own noisy data and write a model bundle.

    With --network selfnet (or selfnet-fast), train Self-Net on one volume TIFF instead: its
    axial slices learn the lateral resolution (--config takes a SelfNetTrainingConfig TOML).
    With --network sim (ZS-DeconvNet-SIM) or dps (DPS), train on one raw SIM file's first
    sequence of angles x phases frames behind the Wiener SIM reconstruction (--microscope:
    its optics and camera; --config takes a SimTrainingConfig or DpsConfig TOML).

    Checkpoints go next to the bundle (.NAME.training/): run the same command again to resume;
    Ctrl-C stops with the last good weights bundled.
    """
    import shutil
    import time

    from livedecon.calibration._config import load_microscope
    from livedecon.calibration._first_model import (
        CAMERA_SOURCES,
        load_training_tiffs,
        simulated_training_data,
        train_bundle,
        training_psf,
    )
    from livedecon.configs import shipped_config_path
    from livedecon.engines._bundle import BundleError
    from livedecon.engines._configfile import load_config
    from livedecon.engines._networks import count_parameters
    from livedecon.engines._training import TrainingConfig, default_recipe

    if network is not None and network not in NETWORKS:
        raise _fail(f"--network must be one of {', '.join(NETWORKS)}, got {network!r}")
    if camera not in CAMERA_SOURCES:
        raise _fail(f"--camera must be one of {', '.join(CAMERA_SOURCES)}, got {camera!r}")
    if out.exists() and not overwrite:
        raise _fail(f"{out}: already exists (--overwrite to replace it)")
    schedule: dict[str, object] = {  # what every trainer takes from the options
        "iterations": iterations,
        "patch_px": patch_px,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "budget_min": budget_min,
    }
    if network in SIM_NETWORKS:
        from livedecon.cli._sim_commands import train_sim_command

        sim_options = (sim_angles, sim_phases, sim_order)
        return train_sim_command(
            out,
            inputs,
            "sim" if network == "sim" else "dps",
            microscope,
            config,
            schedule,
            sim_options,
            name,
            overwrite,
        )
    if network in SELFNET_NETWORKS:
        return train_selfnet_command(
            out, inputs, network, config, schedule, pixel_um, z_step_um, name, overwrite
        )
    try:
        scope = load_microscope(microscope or shipped_config_path("microscope_sim.toml"))
        base = load_config(config, TrainingConfig) if config else default_recipe(network)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if config is not None and network is not None and (network == "3d") != base.is_3d:
        kind = "3D" if base.is_3d else "2D"
        raise _fail(
            f"--network {network}, but {config} describes a {kind} network: its [network]"
            " decides the architecture; drop --network or use a config of that kind"
        )
    if camera == "auto" and microscope is not None and not _has_camera_section(microscope):
        camera = "estimate"
    # the architecture is the recipe's for --network (default_recipe: on a CPU the small 3D
    # network, residual 2D stages), or the config's
    chosen = {k: v for k, v in schedule.items() if v is not None}
    if iterations is not None:
        chosen["max_passes"] = None  # iterations asked for are run, not capped by the data
    try:
        # the network as an object keeps what it left unset (a 3D spec's serve: the recipe's)
        merged = base.model_dump() | {"network": base.network} | chosen
        settings = TrainingConfig.model_validate(merged)
        if inputs:
            data = load_training_tiffs(inputs, scope, settings.is_3d, camera)
            if data.noise is not None:
                console.print(f"noise of the frames themselves: {data.noise.describe()}")
            for warning in data.warnings:
                console.print(f"[bold red]WARNING[/]: {warning}")
            if camera == "estimate":
                console.print("training with the estimated camera values")
        else:
            console.print(f"simulating {simulated_frames} timepoints of {scope.name!r}")
            data = simulated_training_data(scope, simulated_frames, exposure_ms)
        kernel, record = training_psf(scope, settings.is_3d, psf)
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    started = time.perf_counter()
    work_dir = out.parent / f".{out.name}.training"
    try:
        bundle = train_bundle(data, kernel, record, scope, settings, name or out.name, work_dir)
        bundle.save(out, overwrite=overwrite)
    except (ValueError, BundleError) as exc:
        raise _fail(str(exc)) from None
    if not bundle.manifest.training.interrupted:
        shutil.rmtree(work_dir, ignore_errors=True)  # checkpoints only serve a resume
    m = bundle.manifest
    state = "interrupted, last good weights" if m.training.interrupted else "done"
    console.print(
        f"wrote bundle {bundle.bundle_id} to {out}: {m.network.kind},"
        f" {count_parameters(bundle.build_model()):,} parameters, {m.training.iterations}"
        f" iterations ({state}) in {time.perf_counter() - started:.0f} s,"
        f" scale {m.normalisation.scale_e:.4g} e-/unit, final loss {m.training.final_loss:.4g}"
    )


@app.command()
def restore(
    bundle: Annotated[
        str,
        typer.Argument(
            help="bundle directory, a shipped bundle's name, or a bioimage.io package (.zip)"
            " written by livedecon export --bioimageio"
        ),
    ],
    input_tif: Annotated[
        Path,
        typer.Argument(
            metavar="IN", help="raw camera counts: TIFF, OME-TIFF, NDTiff or OME-Zarr dataset"
        ),
    ],
    output_tif: Annotated[Path, typer.Argument(metavar="OUT.tif", help="OME-TIFF to write")],
    backend: Annotated[
        Backend, typer.Option(help="engine; auto: the fastest one present")
    ] = Backend.AUTO,
    tile_px: Annotated[int, typer.Option(min=16, help="larger frames go in blended tiles")] = 1024,
    then: Annotated[
        str | None,
        typer.Option(
            help="a Self-Net bundle that makes the 3D bundle's output isotropic; after `sim`, a"
            " SIM model (train --network sim|dps) that restores each SR image"
        ),
    ] = None,
    microscope: Annotated[
        Path | None, typer.Option(help="sim: microscope TOML (optics and camera)")
    ] = None,
    sim_angles: Annotated[int, typer.Option(min=1, max=8, help="sim: pattern angles")] = 3,
    sim_phases: Annotated[int, typer.Option(min=3, max=9, help="sim: phases per angle")] = 3,
    sim_order: Annotated[
        str, typer.Option(help="sim: frame order, angle-phase (angle by angle) or phase-angle")
    ] = "angle-phase",
    refine: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=64,
            help="Richardson-Lucy steps after the network: in 2D against each frame, in 3D on"
            " the network's denoised stack (default: the bundle's own; 0: the network alone,"
            " in 3D its deconvolution stage)",
        ),
    ] = None,
) -> None:
    """Restore raw frames (or z-stacks, with a 3D bundle) with a model bundle, or a
    bioimage.io package written by `livedecon export --bioimageio`; a Self-Net bundle makes a
    volume isotropic (z step = lateral pixel), alone or after a 3D bundle (--then). The model
    `sim` reconstructs raw SIM frames (sequences of angles x phases) into SR images, restored
    by a SIM model given with --then; a SIM model alone restores SR images (as `sim` writes
    them)."""
    import tempfile
    import time

    from livedecon.cli._sim_commands import SIM_RECONSTRUCTION, restore_sim_command

    if bundle == SIM_RECONSTRUCTION:
        sim_options = (sim_angles, sim_phases, sim_order)
        return restore_sim_command(input_tif, output_tif, microscope, *sim_options, then, backend)

    from livedecon.engines._backends import AccuracyGateError, open_runtime
    from livedecon.engines._bioimageio_package import bundle_from_package, is_bioimageio_package
    from livedecon.engines._bundle import BundleError, ModelBundle, find_bundle
    from livedecon.engines._offline import restore_file

    try:
        if is_bioimageio_package(bundle):  # the livedecon bundle attached to the package
            unpacked = tempfile.TemporaryDirectory(prefix="livedecon-package-")
            path = bundle_from_package(bundle, unpacked.name)
        else:
            path = find_bundle(bundle)
        loaded = ModelBundle.load(path)
        if refine is not None:
            loaded = loaded.with_refinement(refine)
        # 3D stacks are tiled laterally only; 64 planes is the deepest a TensorRT profile takes
        shape = (64, tile_px, tile_px) if loaded.manifest.is_3d else (tile_px, tile_px)
        runtime, choice = open_runtime(loaded, path, backend, frame_shapes=[shape], max_batch=4)
    except (BundleError, AccuracyGateError, ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"engine: {choice.reason}")
    if loaded.manifest.is_selfnet:
        return restore_selfnet_command(loaded, runtime, input_tif, output_tif, tile_px)
    chain = open_selfnet_chain(then, loaded, backend) if then else None
    final, output_tif = output_tif, staging_path(output_tif) if chain else output_tif
    started = time.perf_counter()
    with Progress(console=console) as progress:
        task = progress.add_task("restoring", total=None)
        step = lambda done, total: progress.update(task, completed=done, total=total)  # noqa: E731
        try:
            written = restore_file(loaded, input_tif, output_tif, step, runtime, tile_px)
        except (ValueError, OSError) as exc:
            raise _fail(str(exc)) from None
    console.print(
        f"wrote {written} with bundle {loaded.bundle_id} in {time.perf_counter() - started:.1f} s"
        f" ({loaded.manifest.output_pixel_um:.4g} um pixels, photoelectrons)"
    )
    if chain:
        try:
            restore_selfnet_command(*chain, written, final, tile_px)
        finally:
            written.unlink(missing_ok=True)


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    try:
        shapes = [tuple(int(n) for n in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        raise _fail(
            f"--shapes {text!r}: expected sizes like 1024x1024,512x512 (or ZxYxX)"
        ) from None
    if not shapes or any(len(s) not in (2, 3) or min(s) < 1 for s in shapes):
        raise _fail(f"--shapes {text!r}: expected sizes like 1024x1024,512x512 (or ZxYxX)")
    return shapes


@app.command()
def export(
    bundle: Annotated[str, typer.Argument(help="bundle directory, or a shipped bundle's name")],
    backend: Annotated[
        Backend, typer.Option(help="engine; auto: the fastest one present")
    ] = Backend.AUTO,
    precision: Annotated[
        Precision | None, typer.Option(help="number format [default: per backend]")
    ] = None,
    shapes: Annotated[str, typer.Option(help="frame shapes the engine must take")] = "1024x1024",
    max_batch: Annotated[int, typer.Option(min=1, help="largest batch of frames")] = 4,
    bioimageio: Annotated[
        Path | None,
        typer.Option(
            metavar="OUT.zip",
            help="write a bioimage.io model package (spec 0.5: ONNX + TorchScript) instead",
        ),
    ] = None,
    sample: Annotated[
        Path | None,
        typer.Option(
            help="with --bioimageio: a raw TIFF (camera counts) for the test tensors and cover"
            " [default: a synthetic specimen]"
        ),
    ] = None,
    author: Annotated[
        list[str] | None, typer.Option(help="with --bioimageio: an author (repeatable)")
    ] = None,
    license_id: Annotated[
        str, typer.Option("--license", help="with --bioimageio: SPDX licence of the weights")
    ] = "BSD-3-Clause",
) -> None:
    """Build (or reuse) the bundle's compiled artifact for a backend and check its accuracy;
    with --bioimageio, write the bundle as a bioimage.io model package instead."""
    from livedecon.engines._backends import AccuracyGateError, open_runtime
    from livedecon.engines._bundle import BundleError, ModelBundle, find_bundle

    try:
        path = find_bundle(bundle)
        loaded = ModelBundle.load(path)
        if bioimageio is not None:
            return _export_bioimageio(loaded, bioimageio, sample, author or [], license_id)
        runtime, choice = open_runtime(
            loaded, path, backend, precision, _parse_shapes(shapes), max_batch
        )
    except (BundleError, AccuracyGateError, ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"{loaded.bundle_id}: {choice.reason}")
    console.print(f"accuracy gate: {choice.gate_db:.1f} dB against torch float32")
    console.print(runtime.describe())


def _export_bioimageio(
    loaded: ModelBundle, out: Path, sample: Path | None, authors: list[str], license_id: str
) -> None:
    from livedecon.engines._bioimageio_package import export_bioimageio
    from livedecon.engines._ome_tiff import read_raw_tiff

    counts = None
    m = loaded.manifest
    if sample is not None:
        if not sample.is_file():
            raise _fail(f"{sample}: no such file")
        image = read_raw_tiff(sample, m.input_pixel_um, f"bundle {loaded.bundle_id}")
        need = 3 if m.is_3d else 2
        if image.data.ndim < need:
            raise _fail(
                f"{sample}: shape {image.data.shape} has no {'Z, ' if need == 3 else ''}Y, X"
            )
        counts = image.data.reshape(-1, *image.data.shape[-need:])[0]
    try:
        with console.status("exporting (ONNX, TorchScript, test tensors)"):
            report = export_bioimageio(
                loaded, out, sample_counts=counts, authors=tuple(authors), license_id=license_id
            )
    except ImportError as exc:  # bioimageio.spec comes with the optional extra
        if not (exc.name or "").startswith("bioimageio"):
            raise
        raise _fail(
            f"--bioimageio needs the bioimageio extra ({exc.name} is missing):"
            ' pip install "livedecon[bioimageio]"'
        ) from None
    console.print(
        f"wrote bioimage.io package {report.path} from {loaded.bundle_id}:"
        f" weights {', '.join(report.weights_formats)}; outputs {', '.join(report.outputs)};"
        f" test input {report.test_input_shape}; check it with: bioimageio test {report.path}"
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("demo_out"),
    frames: Annotated[int, typer.Option(min=1, help="timepoints")] = 20,
    interval_s: Annotated[float, typer.Option(min=0.0, help="time between timepoints")] = 0.5,
    exposure_ms: Annotated[float, typer.Option(min=0.01, help="camera exposure")] = 20.0,
    three_d: Annotated[bool, typer.Option("--3d", help="z-stacks through a 3D model")] = False,
    z_planes: Annotated[int, typer.Option(min=2, help="planes per stack with --3d")] = 9,
    bundle: Annotated[str | None, typer.Option(help="model (default: the shipped one)")] = None,
    backend: Annotated[
        Backend, typer.Option(help="engine; auto: the fastest one present")
    ] = Backend.AUTO,
    microscope: Annotated[Path | None, typer.Option(help="microscope TOML")] = None,
    viewer: Annotated[
        bool | None, typer.Option("--viewer/--headless", help="default: a viewer if possible")
    ] = None,
    sim: Annotated[
        bool,
        typer.Option(
            "--sim",
            help="SIM: 3 x 3 pattern sequences reconstructed live (--bundle: a SIM model after)",
        ),
    ] = False,
    sim_photons: Annotated[
        float, typer.Option(min=1.0, help="SIM: peak photons per raw frame")
    ] = 100.0,
) -> None:
    """The live demo: a daemon, the simulated microscope and a pycromanager acquisition
    streaming through it; prints latency and quality against the simulator's ground truth."""
    from livedecon.cli._demo import DemoSettings, run_demo

    settings = DemoSettings(
        out,
        frames,
        interval_s,
        exposure_ms,
        three_d,
        z_planes,
        bundle,
        backend,
        microscope,
        sim=sim,
        sim_photons=sim_photons,
    )
    from livedecon.acquisition_hooks._display_stream import viewer_unavailable

    # default: the viewer where napari and a display are present; CI (no display) stays headless
    headless = "--headless" if viewer is False else viewer_unavailable()
    if viewer and headless:
        console.print(f"no live viewer ({headless}); running headless")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("demo", total=None)

        def step(what: str, done: int, total: int) -> None:
            progress.update(task, description=what, completed=done, total=total or None)

        def report(summary: DemoSummary) -> None:
            _print_demo(summary, out)
            console.print("close the viewer window to exit")

        try:
            if headless:
                summary = run_demo(settings, step)
            else:
                from livedecon.cli._demo import run_demo_with_viewer

                summary = run_demo_with_viewer(settings, step, report)
        except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as exc:
            raise _fail(str(exc)) from None
    if headless:
        _print_demo(summary, out)


def _print_demo(summary: DemoSummary, out: Path) -> None:
    from dataclasses import asdict

    from rich.table import Table

    table = Table(title=f"livedecon demo: {summary.acquisition_id}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    stream, daemon = summary.stream, summary.daemon
    latency = summary.latency_ms
    rows = [
        ("model", f"{summary.bundle_id} on {summary.backend}"),
        ("frames acquired", str(summary.frames)),
        ("frames sent / missed", f"{stream['sent']} / {stream['missed']}"),
        ("restored / written", f"{daemon.get('restored', 0)} / {daemon.get('written', 0)}"),
        ("inference p50", f"{daemon.get('inference_p50_ms') or float('nan'):.1f} ms"),
        (
            "camera -> published p50 / p95",
            f"{latency.get('p50', float('nan')):.1f} / {latency.get('p95', float('nan')):.1f} ms"
            f" ({latency.get('count', 0)} frames)",
        ),
        ("PSNR raw (2x interpolated)", f"{summary.psnr_raw_db:.2f} dB"),
        ("PSNR restored", f"{summary.psnr_restored_db:.2f} dB"),
    ]
    if "scoring" in summary.extra:
        rows.append(("scored as", summary.extra["scoring"]))
    for name, value in rows:
        table.add_row(name, value)
    (console if console.is_terminal else Console(width=100)).print(table)
    if summary.psnr_restored_db <= summary.psnr_raw_db:
        console.print(
            "[yellow]warning:[/yellow] this model does not beat the raw data here; "
            "do not trust its output for this sample"
        )
    console.print(f"raw data: {summary.raw_dataset}")
    for path in summary.restored_files:
        console.print(f"restored: {path}")
    summary_path = out / "demo_summary.json"
    summary_path.write_text(json.dumps(asdict(summary), indent=2, default=str))
    console.print(f"summary: {summary_path}")


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option(help="daemon TOML [default: the shipped configs/daemon.toml]")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run the daemon: ingest and control on a ROUTER socket, results on a PUB socket.

    Stops on a shutdown request, SIGTERM or Ctrl-C after finishing every queued frame."""
    import logging

    from rich.logging import RichHandler

    from livedecon.configs import shipped_config_path
    from livedecon.daemon._daemon_config import load_daemon_config
    from livedecon.daemon._server import Daemon

    logging.basicConfig(
        level=log_level.upper(),
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    try:
        settings = load_daemon_config(config or shipped_config_path("daemon.toml"))
        daemon = Daemon(settings)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:  # a model that cannot load: say which, and why
        raise _fail(f"the daemon cannot start: {exc}") from None
    try:
        daemon.serve()
    except Exception as exc:
        raise _fail(f"the daemon stopped: {exc}") from None


@app.command()
def view(
    config: Annotated[
        Path | None,
        typer.Option(help="daemon TOML whose endpoints to use [default: the shipped one]"),
    ] = None,
    publish: Annotated[
        str | None, typer.Option(help="the daemon's publish endpoint (overrides --config)")
    ] = None,
    control: Annotated[
        str | None, typer.Option(help="the daemon's ingest/control endpoint (overrides --config)")
    ] = None,
    max_hz: Annotated[float, typer.Option(min=1, max=60, help="display refresh limit")] = 60.0,
    volume: Annotated[
        bool, typer.Option("--volume", help="also receive whole volumes (3D slice browsing)")
    ] = False,
    client_key: Annotated[
        Path | None,
        typer.Option(
            help="CurveZMQ client secret key [default: <curve_keys_dir>/client.key_secret]"
        ),
    ] = None,
) -> None:
    """Live napari view of a running daemon: raw and restored side by side (newest frame, at
    most 60 Hz), maximum projections of 3D stacks, and a status panel (latency, frames/s,
    model and weights version, adaptation). Start it before or after the daemon and the
    acquisition; it reconnects when the daemon restarts. Needs the `viewer` extra."""
    from livedecon.acquisition_hooks._display_stream import viewer_unavailable
    from livedecon.configs import shipped_config_path
    from livedecon.daemon._daemon_config import load_daemon_config

    reason = viewer_unavailable()
    if reason is not None:
        raise _fail(f"cannot open the live viewer: {reason}")
    try:
        settings = load_daemon_config(config or shipped_config_path("daemon.toml"))
    except (ConfigError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    secure = None
    keys = settings.endpoints.curve_keys_dir
    if keys is not None:  # a remote daemon admits only authorised CurveZMQ clients
        from livedecon.daemon._security import client_security

        try:
            secure = client_security(keys / "server.key", client_key or keys / "client.key_secret")
        except (OSError, ValueError) as exc:
            raise _fail(f"CurveZMQ keys: {exc}") from None
    try:
        from livedecon.acquisition_hooks._viewer import run_viewer
    except ImportError as exc:
        raise _fail(str(exc)) from None
    run_viewer(
        publish or settings.endpoints.publish,
        control or settings.endpoints.ingest,
        max_hz,
        volume,
        secure,
    )


@app.command()
def keys(
    directory: Annotated[Path, typer.Argument(help="where to write the keys")],
    client: Annotated[str, typer.Option(help="name of the client key pair")] = "client",
) -> None:
    """Create CurveZMQ keys for a daemon reachable beyond this host: a server pair and an
    authorised client pair (give the client its secret key and the server's public key)."""
    from livedecon.daemon._security import make_keys

    for role, path in make_keys(directory, client).items():
        console.print(f"{role:14} {path}")
    console.print(f"set endpoints.curve_keys_dir = {str(directory)!r} in the daemon config")


@app.command("reprocess")
def reprocess_command(
    acq_dir: Annotated[
        Path, typer.Argument(metavar="ACQ_DIR", help="an acquisition's output directory")
    ],
    raw: Annotated[
        Path | None,
        typer.Option(help="the raw dataset: NDTiff (Micro-Manager, pycro-manager) or OME-Zarr"),
    ] = None,
    spill_dir: Annotated[
        Path | None,
        typer.Option(
            help="the daemon's spill directory (default: the one the acquisition record names)"
        ),
    ] = None,
    backend: Annotated[
        Backend, typer.Option(help="engine; auto: the fastest one present")
    ] = Backend.AUTO,
) -> None:
    """After a crash: recreate every acknowledged plane that is not on disk (from the spill
    store, else the raw dataset) and finalise the output files. Exit code 1: some planes could
    not be recovered."""
    from livedecon.daemon._reprocess import ReprocessError, reprocess
    from livedecon.engines._backends import AccuracyGateError
    from livedecon.engines._bundle import BundleError

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("reprocessing", total=None)
        step = lambda done, total: progress.update(task, completed=done, total=total)  # noqa: E731
        try:
            report = reprocess(acq_dir, raw, spill_dir, progress=step, backend=backend)
        except (ReprocessError, BundleError, AccuracyGateError, ValueError, OSError) as exc:
            raise _fail(str(exc)) from None
    console.print(
        f"acknowledged {report.acknowledged} planes"
        + (
            f" ({report.restored_planes} restored planes, resampled along z by Self-Net)"
            if report.restored_planes != report.acknowledged
            else ""
        )
        + f": {report.already_written} already on disk,"
        f" {report.recreated_from_spill} recreated from the spill store,"
        f" {report.recreated_from_raw} from the raw dataset,"
        f" {len(report.unrecoverable)} unrecoverable"
    )
    for path in report.files:
        console.print(f"rewrote {path}" if path.exists() else f"removed {path}")
    for note in report.notes:
        console.print(f"note: {note}")
    if report.unrecoverable:
        console.print("[red]not every acknowledged plane could be recovered[/red]")
        raise typer.Exit(code=1)
    console.print("every acknowledged plane is on disk")


@app.command()
def batch(
    bundle: Annotated[str, typer.Argument(help="bundle directory, or a shipped bundle's name")],
    inputs: Annotated[
        list[str],
        typer.Argument(help="TIFF / OME-TIFF files, OME-Zarr, NDTiff, folders of them, globs"),
    ],
    out: Annotated[
        Path, typer.Option(help="OME-Zarr (one input, NAME.zarr) or folder of NAME.ome.zarr")
    ],
    scheduler: Annotated[
        str | None, typer.Option(help="address of a running dask scheduler [default: local]")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="local cluster size [default: cores, or GPUs]")
    ] = None,
    backend: Annotated[
        Backend, typer.Option(help="each worker's engine (auto: as restore)")
    ] = Backend.AUTO,
    chunk_px: Annotated[int, typer.Option(min=8, help="lateral chunk, input pixels")] = 256,
    halo_px: Annotated[int, typer.Option(min=0, help="tiles overlap by twice this")] = 24,
    frames_per_chunk: Annotated[int, typer.Option(min=1, help="2D frames per chunk")] = 8,
    z_chunk: Annotated[
        int | None, typer.Option(min=2, help="3D planes per chunk [default: all]")
    ] = None,
    z_halo: Annotated[int, typer.Option(min=0, help="3D planes of overlap per side")] = 4,
    engine_threads: Annotated[int, typer.Option(min=1, help="CPU threads per engine")] = 1,
    overwrite: Annotated[bool, typer.Option(help="replace outputs of another model")] = False,
    dashboard_address: Annotated[str, typer.Option(help="local cluster's dashboard")] = ":8787",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the summary")] = None,
) -> None:
    """Restore many files or one large dataset chunk by chunk on a dask cluster, into OME-Zarr;
    a rerun resumes where the last one stopped."""
    from livedecon.daemon._batch import BatchOptions, connect, run_batch
    from livedecon.daemon._batch_report import print_summary, progress_printer
    from livedecon.engines._bundle import BundleError, find_bundle

    try:
        path = find_bundle(bundle)
        options = BatchOptions(
            backend=backend,
            chunk_px=chunk_px,
            halo_px=halo_px,
            frames_per_chunk=frames_per_chunk,
            z_chunk=z_chunk,
            z_halo=z_halo,
            engine_threads=engine_threads,
            overwrite=overwrite,
        )
        with connect(scheduler, workers, dashboard_address, backend) as client:
            console.print(f"dask dashboard: {client.dashboard_link}")
            with progress_printer(console) as progress:
                summary = run_batch(client, path, inputs, out, options, progress)
    except (BundleError, ValueError, OSError, RuntimeError) as exc:  # RuntimeError: the gate
        raise _fail(str(exc)) from None
    print_summary(console, summary)
    if json_out:
        json_out.write_text(summary.model_dump_json(indent=2))
    if summary.failures:
        raise typer.Exit(1)


app.command()(calibrate)


app.add_typer(bench_app, name="bench")
