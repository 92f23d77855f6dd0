"""`livedecon train --network selfnet` and `livedecon restore` with a Self-Net bundle.

Kept out of cli/_main.py: the commands there only parse options and call these.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress

from livedecon.cli._output import console
from livedecon.cli._output import fail as _fail
from livedecon.engines._configfile import ConfigError

if TYPE_CHECKING:
    from livedecon.engines._bundle import ModelBundle
    from livedecon.engines._enums import Backend
    from livedecon.engines._runtime import Runtime
    from livedecon.engines._selfnet_training import SelfNetTrainingConfig

SELFNET_NETWORKS = ("selfnet", "selfnet-fast")


def selfnet_settings(
    network: str, config: Path | None, overrides: Mapping[str, object]
) -> SelfNetTrainingConfig:
    """The training config: `config` (TOML), or the recipe that fits this machine for the
    network named (`default_selfnet_recipe`), then the overrides."""
    from livedecon.engines._configfile import load_config
    from livedecon.engines._selfnet_training import SelfNetTrainingConfig, default_selfnet_recipe

    try:
        if config:
            base = load_config(config, SelfNetTrainingConfig)
        else:
            base = default_selfnet_recipe(network)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return SelfNetTrainingConfig.model_validate(base.model_dump() | values)
    except ValueError as exc:
        raise _fail(f"invalid Self-Net settings: {exc}") from None


def train_selfnet_command(
    out: Path,
    inputs: list[Path] | None,
    network: str,
    config: Path | None,
    overrides: Mapping[str, object],
    pixel_um: float | None,
    z_step_um: float | None,
    name: str | None,
    overwrite: bool,
) -> None:
    """Train Self-Net on one volume TIFF (or a simulated confocal volume) and bundle it."""
    from livedecon.calibration._anisotropic import AnisotropicScene
    from livedecon.calibration._selfnet_run import (
        read_volume,
        simulated_volume,
        train_selfnet_bundle,
    )
    from livedecon.engines._bundle import BundleError
    from livedecon.engines._selfnet import SelfNetSpec, parameter_count

    settings = selfnet_settings(network, config, overrides)
    if inputs and len(inputs) != 1:
        raise _fail(f"Self-Net trains on one volume; got {len(inputs)} files")
    try:
        if inputs:
            volume = read_volume(inputs[0], pixel_um, z_step_um)
        else:
            console.print("simulating a confocal volume (z step 3x the pixel)")
            volume = simulated_volume(AnisotropicScene(modality="confocal", peak_photons=300))
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"volume {volume.data.shape}, pixel {volume.pixel_um} um, z step {volume.z_step_um} um"
    )
    started = time.perf_counter()
    with Progress(console=console) as progress:
        task = progress.add_task("training Self-Net", total=settings.iterations)
        try:
            bundle = train_selfnet_bundle(
                volume,
                settings,
                name or out.name,
                lambda i, _losses: progress.update(task, completed=i),
            )
            bundle.save(out, overwrite=overwrite)
        except (ValueError, BundleError) as exc:
            raise _fail(str(exc)) from None
    m = bundle.manifest
    assert isinstance(m.network, SelfNetSpec)  # train_selfnet_bundle bundles a Self-Net
    console.print(
        f"wrote bundle {bundle.bundle_id} to {out}: {m.network.kind},"
        f" {parameter_count(m.network):,} parameters, {m.training.iterations} iterations in"
        f" {time.perf_counter() - started:.0f} s, final restorer loss"
        f" {m.training.final_loss:.4g}"
    )


def staging_path(output: Path) -> Path:
    """Where the first stage of a chain writes (beside the output, hidden)."""
    return output.with_name(f".{output.name}.stage1.ome.tif")


def open_selfnet_chain(
    then: str, first: ModelBundle, backend: Backend
) -> tuple[ModelBundle, Runtime]:
    """The Self-Net bundle and its checked runtime for the output of bundle `first` (a 3D
    bundle): refused before anything runs when the grids do not meet."""
    from livedecon.engines._backends import AccuracyGateError, open_runtime
    from livedecon.engines._bundle import BundleError, ModelBundle, find_bundle
    from livedecon.engines._selfnet_bundle import check_chain

    try:
        path = find_bundle(then)
        selfnet = ModelBundle.load(path)
        check_chain(first, selfnet)
        runtime, _choice = open_runtime(selfnet, path, backend, max_batch=8)
    except (BundleError, AccuracyGateError, ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    return selfnet, runtime


def restore_selfnet_command(
    bundle: ModelBundle, runtime: Runtime, input_tif: Path, output_tif: Path, tile_px: int
) -> None:
    """Restore a volume TIFF with a loaded Self-Net bundle and a checked runtime."""
    from livedecon.calibration._selfnet_run import restore_volume_file

    started = time.perf_counter()
    try:
        written = restore_volume_file(bundle, runtime.infer, input_tif, output_tif, None, tile_px)
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    m = bundle.manifest
    console.print(
        f"wrote {written} with bundle {bundle.bundle_id} in {time.perf_counter() - started:.1f}"
        f" s (isotropic {m.output_pixel_um:.4g} um voxels)"
    )


def bench_selfnet_command(
    modalities: Annotated[
        str, typer.Option(help="comma list of widefield, confocal, light-sheet")
    ] = ("widefield,confocal"),
    methods: Annotated[str, typer.Option(help="comma list of selfnet-fast, selfnet")] = (
        "selfnet-fast,selfnet"
    ),
    iterations: Annotated[int, typer.Option(min=1, help="training iterations per model")] = 400,
    size_px: Annotated[int, typer.Option(min=32)] = 64,
    planes: Annotated[int, typer.Option(min=8)] = 16,
    ratio: Annotated[int, typer.Option(min=2, max=8, help="z step in lateral pixels")] = 3,
    peak_photons: Annotated[float, typer.Option(min=1.0)] = 300.0,
    threads: Annotated[int, typer.Option(min=1, help="torch threads")] = 1,
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("bench_selfnet.json"),
) -> None:
    """Self-Net against cubic interpolation on simulated anisotropic volumes: axial PSNR
    against the isotropic truth, isotropy ratio, training time and speed, fast vs full."""
    import json

    import torch

    from livedecon.calibration._anisotropic import AnisotropicScene
    from livedecon.calibration._selfnet_bench import SPECS, bench_scene, format_rows
    from livedecon.engines._selfnet_training import SelfNetTrainingConfig

    chosen = [m for m in methods.split(",") if m]
    unknown = [m for m in chosen if m not in SPECS]
    if unknown:
        raise _fail(f"unknown methods {unknown}; one of {', '.join(SPECS)}")
    torch.set_num_threads(threads)
    cfg = SelfNetTrainingConfig(
        iterations=iterations,
        steps_per_epoch=max(iterations // 4, 1),
        patch_px=32,
        discriminator_width=32,
        learning_rate=1e-3,
    )
    rows = []
    try:
        for modality in [m for m in modalities.split(",") if m]:
            scene = AnisotropicScene(
                modality=modality,
                ratio=ratio,
                planes=planes,
                size_px=size_px,
                peak_photons=peak_photons,
            )
            with console.status(f"bench selfnet: {modality}"):
                rows += bench_scene(scene, chosen, cfg)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    console.print(format_rows(rows))
    settings = cfg.model_dump(mode="json") | {"threads": threads}
    out.write_text(
        json.dumps({"settings": settings, "rows": [r.as_dict() for r in rows]}, indent=2)
    )
    console.print(f"wrote {out}")
