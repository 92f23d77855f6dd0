"""`livedecon bench ...`: the benchmarks' commands; each prints a table and writes JSON.

The measuring lives with what it measures (engines/_runtime_bench.py, calibration/_quality_bench.py,
daemon/_transport_bench.py, daemon/_batch.py); these commands parse options, call it and print.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from livedecon.cli._output import console, print_table
from livedecon.cli._output import fail as _fail
from livedecon.cli._selfnet_commands import bench_selfnet_command

bench_app = typer.Typer(help="Benchmarks: print a table and write JSON.", no_args_is_help=True)
bench_app.command("selfnet")(bench_selfnet_command)


@bench_app.command("engines")
def bench_engines_command(
    models: Annotated[
        str,
        typer.Option(
            help="comma list of full, fast, 3d, selfnet, selfnet-fast, sim, dps (SIM models: the"
            " size is the SR image's, twice the camera frame's)"
        ),
    ] = "full,fast,3d",
    sizes: Annotated[str, typer.Option(help="square 2D input sizes")] = "256,512,1024",
    stack: Annotated[str, typer.Option(help="3D input ZxYxX")] = "16x256x256",
    backends: Annotated[str | None, typer.Option(help="comma list [default: all present]")] = None,
    repeats: Annotated[int, typer.Option(min=1)] = 20,
    budget_s: Annotated[float, typer.Option(min=0.0, help="time limit per row")] = 20.0,
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("bench_engines.json"),
) -> None:
    """Latency p50/p95 per frame and frames/s of every backend present, per model and size."""
    import json

    from livedecon.engines._runtime_bench import MODELS, bench_engines

    chosen = [m for m in models.split(",") if m]
    unknown = set(chosen) - set(MODELS)
    if unknown:
        raise _fail(f"--models: unknown {sorted(unknown)}; known: {', '.join(MODELS)}")
    try:
        side = [int(s) for s in sizes.split(",") if s]
        z, y, x = (int(n) for n in stack.split("x"))
    except ValueError:
        raise _fail("--sizes takes integers (256,512) and --stack ZxYxX (16x256x256)") from None
    with console.status("benchmarking") as status:
        rows = bench_engines(
            chosen,
            side,
            (z, y, x),
            backends.split(",") if backends else None,
            repeats,
            budget_s,
            progress=lambda what: status.update(f"benchmarking {what}"),
        )
    print_table(
        "livedecon bench engines (one frame per call)",
        ("backend", "precision", "model", "input", "runs", "p50 ms", "p95 ms", "frames/s"),
        (
            (
                *(str(r[key]) for key in ("backend", "precision", "model", "input", "runs")),
                f"{r['p50_ms']:.1f}",
                f"{r['p95_ms']:.1f}",
                f"{r['frames_per_s']:.2f}",
            )
            for r in rows
        ),
        left=("backend", "precision", "model", "input"),
    )
    out.write_text(json.dumps({"device": _device(), "rows": rows}, indent=2))
    console.print(f"wrote {out}")


def _cell(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, float) else str(value)


def _device() -> str:
    import platform

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}"


@bench_app.command("quality")
def bench_quality_command(
    budget: Annotated[
        str,
        typer.Option(
            help="training budget: cpu (the 2-core recipe: fast and 3d end at their passes cap,"
            " fast 2-3 min, 3d about 5 on quiet cores, full at 10 min), gpu (reference)"
        ),
    ] = "cpu",
    budget_min: Annotated[
        float | None,
        typer.Option(min=0.1, help="a per-model wall-time cap (minutes), for every network"),
    ] = None,
    methods: Annotated[
        str,
        typer.Option(
            help="comma list of raw, rl, fast, full, 3d, dps; the SIM rows sim-wiener,"
            " zs-sim, dps-sim (the same specimen's SIM acquisition, its peak photons per raw"
            " frame); the Self-Net rows cubic, selfnet-fast, selfnet (anisotropic volumes)"
        ),
    ] = "raw,rl,fast,full,3d,cubic,selfnet-fast,selfnet",
    structures: Annotated[
        str,
        typer.Option(
            help="comma list of sparse, dense, puncta, mixed, volume, and anisotropic (Self-Net's"
            " volumes, z step 3x the pixel)"
        ),
    ] = "sparse,dense,puncta,mixed,volume,anisotropic",
    optics: Annotated[
        str,
        typer.Option(
            help="comma list of tirf, widefield (2D scenes), widefield, confocal, light-sheet"
            " (anisotropic volumes)"
        ),
    ] = "tirf,widefield,confocal",
    peaks: Annotated[str, typer.Option(help="peak signals in photons")] = "5,15,50,200",
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("bench_quality.json"),
) -> None:
    """Restoration quality against ground truth on simulated scenes: fitted PSNR against a
    2x-resolution reference, SSIM, resolution, ringing, dim-puncta recall, 3D alternation."""
    import torch

    from livedecon.calibration._quality_bench import (
        METHODS_2D,
        METHODS_3D,
        SELFNET_METHODS,
        STRUCTURES,
        default_scenes,
        run_bench,
        summarise,
    )
    from livedecon.calibration._selfnet_bench import SELFNET_MODALITIES, anisotropic_scenes

    if budget not in ("cpu", "gpu"):
        raise _fail(f"--budget must be cpu or gpu, got {budget!r}")
    if budget == "gpu" and not torch.cuda.is_available():
        raise _fail("--budget gpu needs a CUDA GPU, and torch sees none")
    try:
        peak_values = tuple(float(p) for p in peaks.split(",") if p)
    except ValueError:
        raise _fail("--peaks takes numbers: 5,15,50") from None
    wanted = {k: set(v.split(",")) - {""} for k, v in (("s", structures), ("o", optics))}
    for option, given, known_values in (
        ("--structures", wanted["s"], (*STRUCTURES, "anisotropic")),
        ("--optics", wanted["o"], ("tirf", *SELFNET_MODALITIES)),
    ):
        if stray := sorted(given - set(known_values)):
            raise _fail(f"{option}: unknown {', '.join(stray)}; known: {', '.join(known_values)}")
    scenes = [
        s
        for s in default_scenes(peak_values)
        if s.structure in wanted["s"] and (s.is_3d or s.optics in wanted["o"])
    ]
    modalities = tuple(m for m in SELFNET_MODALITIES if m in wanted["o"])
    volumes = anisotropic_scenes(modalities, peak_values) if "anisotropic" in wanted["s"] else []
    chosen = tuple(m for m in methods.split(",") if m)
    known = dict.fromkeys((*METHODS_2D, *METHODS_3D, *SELFNET_METHODS))
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise _fail(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    if not (scenes or volumes) or not chosen:
        raise _fail("no scene or no method selected")
    with console.status("bench quality") as status:
        rows = run_bench(
            scenes,
            chosen,
            budget,
            budget_min,
            lambda what: status.update(f"bench quality: {what}"),
            volumes,
        )
    # iter: RL's best iteration count, or a network's training iterations (a busy machine
    # reaches the time cap with fewer: the figure says how far a run got)
    columns = (
        "scene", "method", "PSNR dB", "view", "SSIM", "res nm", "ringing", "dim recall", "iter",
        "s",
    )  # fmt: skip

    def fmt(value: object, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    cells = (
        (
            str(r["scene"]),
            str(r["method"]),
            fmt(r["psnr"], ".2f"),
            str(r["view"]),
            fmt(r["ssim"], ".3f"),
            fmt(r["resolution_nm"], ".0f"),
            fmt(r["ringing"], ".3f"),
            fmt(r["dim_recall"], ".2f"),
            fmt(notes.get("iterations") if isinstance(notes := r["notes"], dict) else None, ""),
            fmt(r["seconds"], ".0f"),
        )
        for r in rows
    )
    print_table(
        f"livedecon bench quality (budget {budget})",
        columns,
        cells,
        left=("scene", "method", "view"),
        width=140,
        no_wrap=False,
    )
    summary = summarise(rows)
    for method, figures in summary.items():
        baseline = {"rl": "RL", "cubic": "cubic interpolation"}[str(figures["baseline"])]
        line = (
            f"{method}: {figures['mean_gain_db']:+.2f} dB over {baseline} on average (worst"
            f" {figures['worst_gain_db']:+.2f}) over {figures['scenes']} scenes at <= 50 photons"
        )
        if "mean_isotropy" in figures:
            line += f"; isotropy ratio {figures['mean_isotropy']:.2f} on average"
        else:
            line += f"; dim recall below {baseline}'s on"
            line += f" {figures['scenes_recall_below_baseline']} scenes"
        console.print(line)
    for r in rows:
        if r["alternation"] is not None:
            console.print(
                f"{r['scene']} {r['method']}: in-focus plane {r['psnr_focus']:.2f} dB,"
                f" plane alternation {r['alternation']:.1%}"
            )
        elif r["view"] == "axial":  # Self-Net rows: the table's resolution is the axial one
            notes = r["notes"] if isinstance(r["notes"], dict) else {}
            measured = "isotropy" in notes
            console.print(
                f"{r['scene']} {r['method']}: isotropy ratio"
                + (
                    f" {notes['isotropy']:.2f} (lateral {notes['lateral_nm']} nm)"
                    if measured
                    else " not measured (noise-limited xy slices)"
                )
            )
    out.write_text(
        json.dumps(
            {"device": _device(), "budget": budget, "rows": rows, "summary": summary},
            indent=2,
            default=float,
        )
    )
    console.print(f"wrote {out}")


@bench_app.command("daemon")
def bench_daemon_command(
    size: Annotated[int, typer.Option(min=64, help="square uint16 frames")] = 2048,
    frames: Annotated[int, typer.Option(min=10, help="frames per transport run")] = 300,
    rate_hz: Annotated[float, typer.Option(min=1.0, help="camera rate of the paced runs")] = 100.0,
    model_frames: Annotated[int, typer.Option(min=0, help="frames through the model; 0 skips")] = 4,
    model: Annotated[str, typer.Option(help="bundle for the model run")] = "fast2d-sim",
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("bench_daemon.json"),
) -> None:
    """Frames from this process through a daemon process and out of its publisher: pass-through
    (display only, shared memory, with writing) and the model, beside a bare pyzmq relay."""
    from livedecon.daemon._transport_bench import bench_daemon

    with console.status("benchmarking") as status:
        rows = bench_daemon(
            size,
            frames,
            rate_hz,
            model_frames,
            model,
            progress=lambda what: status.update(f"benchmarking {what}"),
        )
    columns = {
        "scenario": "scenario",
        "throughput_sent_per_s": "acked/s",
        "throughput_displayed_per_s": "displayed/s",
        "throughput_processed_per_s": "processed/s",
        "paced_hz": "paced Hz",
        "latency_p50_ms": "p50 ms",
        "latency_p95_ms": "p95 ms",
        "latency_p99_ms": "p99 ms",
        "added_p50_ms": "added p50 ms",
        "vs_bare_throughput": "x bare",
        "spilled": "spilled",
        "written_mb_per_s": "written MB/s",
    }
    print_table(
        f"livedecon bench daemon ({size}x{size} uint16, paced at {rate_hz:g} Hz)",
        list(columns.values()),
        ([_cell(row.get(key, ""), ".2f") for key in columns] for row in rows),
        left=("scenario",),
        width=170,
    )
    console.print(
        "targets (display only, pass-through): >= 100 frames/s of 2048x2048, added p50 <= 2 ms, "
        "within 2x of bare pyzmq"
    )
    out.write_text(json.dumps({"device": _device(), "rows": rows}, indent=2))
    console.print(f"wrote {out}")


@bench_app.command("batch")
def bench_batch_command(
    workers: Annotated[str, typer.Option(help="comma list of local cluster sizes")] = "1,2",
    model: Annotated[str, typer.Option(help="bundle to restore with")] = "fast2d-sim",
    frames: Annotated[int, typer.Option(min=1, help="frames of the synthetic series")] = 16,
    size: Annotated[int, typer.Option(min=64, help="square frames, input pixels")] = 512,
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("bench_batch.json"),
) -> None:
    """`livedecon batch` throughput (input voxels/s) on local clusters of 1 and 2 workers."""
    from livedecon.daemon._batch import bench_batch

    try:
        sizes = [int(n) for n in workers.split(",") if n]
    except ValueError:
        raise _fail("--workers takes integers (1,2)") from None
    with console.status("benchmarking") as status:
        rows = bench_batch(
            sizes, model, frames, size, progress=lambda what: status.update(f"batch: {what}")
        )
    columns = {
        "scenario": "scenario",
        "chunks": "chunks",
        "seconds": "s",
        "voxels_per_s": "voxels/s",
        "speedup": "x 1st",
        "failures": "failed",
    }
    print_table(
        f"livedecon bench batch ({frames}x{size}x{size} uint16, {model})",
        list(columns.values()),
        ([_cell(row[key], ",.2f") for key in columns] for row in rows),
        left=("scenario",),
    )
    out.write_text(json.dumps({"device": _device(), "rows": rows}, indent=2))
    console.print(f"wrote {out}")


@bench_app.command("sim")
def bench_sim_command(
    structures: Annotated[str, typer.Option(help="comma list of sparse, dense, puncta, mixed")] = (
        "sparse,dense,puncta,mixed"
    ),
    peaks: Annotated[str, typer.Option(help="peak signals per raw frame, photons")] = "15,30,100",
    size: Annotated[int, typer.Option(min=64, help="raw frame size (camera pixels)")] = 128,
    speed_size: Annotated[int, typer.Option(min=64, help="frame size for the speed row")] = 512,
    targets: Annotated[
        bool, typer.Option(help="also the line and bead pairs: smallest separation resolved")
    ] = False,
    target_peak: Annotated[float, typer.Option(min=1.0, help="targets: photons per frame")] = 100,
    iterations: Annotated[
        int, typer.Option(min=1, help="targets: training iterations of each network")
    ] = 300,
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("bench_sim.json"),
) -> None:
    """2D SIM (3 angles x 3 phases) on simulated TIRF scenes: pattern found against the true
    one, widefield against SIM reconstruction (fitted PSNR at SIM resolution, decorrelation
    resolution), and reconstruction speed. With --targets, the smallest separation of line
    and bead pairs that widefield, Wiener SIM, ZS-DeconvNet-SIM and DPS each resolve."""
    from livedecon.calibration._sim_bench import run_sim_bench, sim_scenes

    try:
        peak_values = tuple(float(p) for p in peaks.split(",") if p)
    except ValueError:
        raise _fail("--peaks takes numbers: 15,30,100") from None
    scenes = sim_scenes(tuple(s for s in structures.split(",") if s), peak_values, size)
    if not scenes:
        raise _fail("no scene selected")
    with console.status("bench sim") as status:
        results = run_sim_bench(scenes, speed_size, lambda w: status.update(f"bench sim: {w}"))
    columns = (
        "scene",
        "WF dB",
        "SIM dB",
        "WF nm",
        "SIM nm",
        "angles",
        "angle err",
        "period err",
        "phase err",
        "m",
    )

    def cells(r: dict[str, Any]) -> tuple[str, ...]:
        found = r["angles_found"]
        return (
            str(r["scene"]),
            f"{r['widefield_psnr']:.2f}",
            f"{r['sim_psnr']:.2f}",
            f"{r['widefield_resolution_nm']:.0f}",
            f"{r['sim_resolution_nm']:.0f}",
            f"{found}/3",
            f"{r['angle_error_deg']:.2f} deg" if found else "-",
            f"{r['period_error']:.2%}" if found else "-",
            f"{r['phase_error_rad']:.2f} rad" if found else "-",
            f"{r['modulation']:.2f}" if found else "-",
        )

    print_table(
        "livedecon bench sim (Wiener SIM, parameters from the data)",
        columns,
        map(cells, results["rows"]),
        left=("scene",),
        width=150,
        no_wrap=False,
    )
    speed = results["speed"]
    console.print(
        f"reconstruction of 9 x {speed['size_px']}^2 with known parameters:"
        f" {speed['median_s']:.2f} s ({speed['sr_frames_per_s']:.2f} SR frames/s) on {_device()}"
    )
    report: dict[str, object] = dict(results)
    if targets:
        report["targets"] = _pair_targets_table(target_peak, iterations)
    out.write_text(json.dumps({"device": _device(), **report}, indent=2, default=float))
    console.print(f"wrote {out}")


def _pair_targets_table(peak: float, iterations: int) -> dict[str, dict[str, float | None]]:
    from livedecon.calibration._sim_bench import TARGET_METHODS, run_pair_targets

    found = {}
    with console.status("bench sim: pair targets") as status:
        for kind in ("lines", "beads"):
            found[kind] = run_pair_targets(
                kind, peak, iterations, lambda w: status.update(f"bench sim: {w}")
            )
    print_table(
        f"smallest separation resolved (nm), {peak:g} photons per raw frame",
        ("pairs", *TARGET_METHODS),
        (
            (kind, *("-" if row[m] is None else f"{row[m]:.0f}" for m in TARGET_METHODS))
            for kind, row in found.items()
        ),
        left=("pairs",),
        no_wrap=False,
    )
    return found
