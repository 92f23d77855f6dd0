"""`livedecon demo`: the whole path on the simulated microscope, measured against its truth.

A daemon starts as a child process; the simulated microscope (a real MMCore) runs a
pycromanager acquisition (2D time-lapse, z-stacks with `three_d`, or SIM pattern sequences
with `sim`, each reconstructed live into one SR image) that saves the raw data
as NDTiff and streams every frame through the hooks; the daemon restores, publishes and
writes; the demo listens to the display stream for latency (camera to publication) and then
compares raw and restored frames with the simulator's ground truth.

This module composes the parts, so it sits in the command-line layer: it starts a daemon (its
config, launcher and writer), drives the hooks and the simulated microscope, and may open the
viewer; the hooks themselves need only the daemon's client and protocol.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from livedecon.acquisition_hooks._pycromanager_hooks import SIM_AXIS, livedecon_hooks, sim_events
from livedecon.acquisition_hooks._simulated_microscope import (
    FOCUS_KEY,
    SAMPLE_TIME_KEY,
    SIM_EXPOSURE_MS,
    SIM_GROUP,
    SIM_LABEL,
    SimulatedMicroscope,
)
from livedecon.calibration._baseline import upsample_2x
from livedecon.calibration._config import MicroscopeConfig, load_microscope
from livedecon.calibration._forward_model import counts_to_electrons
from livedecon.calibration._metrics import psnr
from livedecon.calibration._quality_bench import Scene, fit_to, scored_region
from livedecon.configs import shipped_config_path
from livedecon.daemon._daemon_config import Endpoints, load_daemon_config
from livedecon.daemon._launcher import free_tcp_endpoint, spawn_daemon
from livedecon.daemon._protocol import Topic, decode_publication
from livedecon.daemon._sim_processing import sim_plan_for
from livedecon.daemon._writer import output_files, read_planes
from livedecon.engines._bundle import ModelBundle, find_bundle
from livedecon.engines._enums import Backend

log = logging.getLogger(__name__)
SIM_SCORING = (
    "SIM: fitted PSNR (a x + b) against the specimen at SIM resolution; raw = each sequence's"
    " widefield mean"
)


@dataclass
class DemoSettings:
    """What the demo acquires and how: frames, mode (2D, 3D or SIM), model, backend, endpoints."""

    out: Path = Path("demo_out")
    frames: int = 20
    interval_s: float = 0.5
    exposure_ms: float = 20.0
    three_d: bool = False
    z_planes: int = 9
    bundle: str | None = None  # None: the shipped model for the mode
    backend: Backend = Backend.AUTO
    microscope: Path | None = None
    endpoints: Endpoints | None = None  # None: free loopback ports
    sim: bool = False  # SIM: pattern sequences reconstructed live (bundle: a SIM model after)
    sim_photons: float = 100.0  # SIM: peak photons per raw frame at the demo's exposure


@dataclass
class DemoSummary:
    """What a demo run measured: stream and daemon counters, latency, PSNR against the truth,
    and the files written."""

    acquisition_id: str
    frames: int
    stream: dict[str, Any]
    daemon: dict[str, Any]
    latency_ms: dict[str, float]
    psnr_raw_db: float
    psnr_restored_db: float
    raw_dataset: str
    restored_files: list[str]
    backend: str
    bundle_id: str
    extra: dict[str, Any] = field(default_factory=dict)


class Latencies(threading.Thread):
    """Camera-to-publication latency of every restored frame the daemon publishes."""

    def __init__(self, endpoint: str, topic: Topic) -> None:
        super().__init__(name="demo-latency", daemon=True)
        self.samples_ms: list[float] = []
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self._socket.connect(endpoint)
        self._socket.subscribe(topic.value.encode())
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            if self._socket.poll(100):
                publication, _ = decode_publication(self._socket.recv_multipart())
                if publication.timestamp_s is not None:
                    self.samples_ms.append(
                        (publication.published_s - publication.timestamp_s) * 1e3
                    )

    def stop(self) -> dict[str, float]:
        self._stopping.set()
        self.join(2)
        self._socket.close(linger=0)
        if not self.samples_ms:
            return {}
        p50, p95 = np.percentile(self.samples_ms, [50, 95])
        return {"p50": float(p50), "p95": float(p95), "count": len(self.samples_ms)}


def _scope_config(settings: DemoSettings) -> MicroscopeConfig:
    default = "microscope_widefield_3d.toml" if settings.three_d else "microscope_sim.toml"
    return load_microscope(settings.microscope or shipped_config_path(default))


def _quality(
    scope: SimulatedMicroscope,
    raw_path: Path,
    restored: list[Path],
    exposure_ms: float,
    flux_share: float = 1.0,
) -> tuple[float, float]:
    """Mean PSNR of raw (interpolated to 2x) and restored planes against the ground truth.
    The uniform background every raw plane records is, to a 3D model, light from the whole
    volume: in its output each plane keeps the bundle's `flux_share` of it."""
    from ndstorage import Dataset

    sample = scope.config.sample
    assert sample is not None  # a SimulatedMicroscope refuses a config without a sample
    background = sample.background_photons_px_s * exposure_ms / 1000
    with contextlib.redirect_stdout(io.StringIO()):  # ndstorage prints its progress
        raw_data = Dataset(str(raw_path))
    raw_scores, restored_scores = [], []
    try:
        for path in restored:
            for record, plane in read_planes(path):
                axes = {"time": record.time}
                if "z" in raw_data.axes:
                    axes["z"] = record.z
                metadata = raw_data.read_metadata(**axes)
                counts = raw_data.read_image(**axes)
                truth = scope.ground_truth(
                    {SAMPLE_TIME_KEY: metadata[SAMPLE_TIME_KEY], FOCUS_KEY: metadata[FOCUS_KEY]},
                    exposure_ms,
                )
                electrons = counts_to_electrons(np.asarray(counts), scope.config.camera)
                # both in photoelectrons per fine pixel, without the uniform background
                raw_2x = np.clip(upsample_2x(electrons) - background / 4, 0, None)
                raw_scores.append(psnr(raw_2x, truth))
                restored_scores.append(psnr(plane - background / 4 * flux_share, truth))
    finally:
        raw_data.close()
    return float(np.mean(raw_scores)), float(np.mean(restored_scores))


def _sim_quality(
    scope: SimulatedMicroscope, raw_path: Path, restored: list[Path]
) -> tuple[float, float]:
    """Mean fitted PSNR (a x + b onto the truth, as `bench sim` scores) of each sequence's
    widefield image (the mean of its frames, interpolated to 2x) and of its SR image, against
    the specimen at SIM resolution."""
    from ndstorage import Dataset

    lit = scope.sim
    assert lit is not None  # a SIM demo's microscope
    reference = scored_region(lit.reference)
    with contextlib.redirect_stdout(io.StringIO()):  # ndstorage prints its progress
        raw_data = Dataset(str(raw_path))
    raw_scores, restored_scores = [], []
    try:
        for path in restored:
            for record, image in read_planes(path):
                frames = [
                    raw_data.read_image(time=record.time, **{SIM_AXIS: i})
                    for i in range(len(lit.frame_metadata))
                ]
                wide = counts_to_electrons(np.mean(frames, axis=0), scope.config.camera)
                raw_scores.append(
                    psnr(fit_to(scored_region(upsample_2x(wide)), reference), reference)
                )
                restored_scores.append(psnr(fit_to(scored_region(image), reference), reference))
    finally:
        raw_data.close()
    return float(np.mean(raw_scores)), float(np.mean(restored_scores))


def _sim_scope(settings: DemoSettings) -> SimulatedMicroscope:
    """The SIM microscope: the bench's mixed TIRF scene, `sim_photons` at the exposure."""
    photons = settings.sim_photons * SIM_EXPOSURE_MS / settings.exposure_ms
    scene = Scene(structure="mixed", optics="tirf", peak_photons=photons, size_px=128, seed=4000)
    return SimulatedMicroscope(sim=scene, clock="wall", noise_seed=0)


def run_demo(
    settings: DemoSettings, progress: Callable[[str, int, int], None] = lambda *_: None
) -> DemoSummary:
    """Start a daemon, acquire on the simulated microscope through the hooks, and measure
    latency and the PSNR of raw and restored frames against the simulator's truth."""
    from pycromanager import Acquisition, multi_d_acquisition_events

    if settings.sim and settings.three_d:
        raise ValueError("the demo runs SIM in 2D: --sim or --3d, not both")
    out = settings.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    scope_config = _scope_config(settings)
    bundle = settings.bundle or ("fast3d-sim" if settings.three_d else "fast2d-sim")
    shipped = load_daemon_config(shipped_config_path("daemon.toml"))
    daemon_config = shipped.model_copy(
        update={
            "output_dir": out / "restored",
            "endpoints": settings.endpoints
            or Endpoints(ingest=free_tcp_endpoint(), publish=free_tcp_endpoint()),
            "model": shipped.model.model_copy(
                update={"bundle": bundle, "backend": Backend(settings.backend)}
            ),
        }
    )
    progress("starting the daemon (first run: exports and checks the engine)", 0, 0)
    daemon = spawn_daemon(daemon_config, out / "daemon", wait_s=600)
    topic = Topic.MIP if settings.three_d else Topic.RESTORED
    latencies = Latencies(daemon_config.endpoints.publish, topic)
    latencies.start()
    try:
        microscope = (
            _sim_scope(settings)
            if settings.sim
            else SimulatedMicroscope(scope_config, clock="wall", noise_seed=0)
        )
        with microscope as scope:
            scope.attach_pycromanager()
            scope.core.setExposure(settings.exposure_ms)
            z_options = {}
            if settings.three_d:
                half = (settings.z_planes - 1) / 2 * scope_config.optics.z_step_um
                z_options = {
                    "z_start": -half,
                    "z_end": half,
                    "z_step": scope_config.optics.z_step_um,
                }
            if settings.sim:  # each time point: the SIM group's presets, pattern by pattern
                presets = scope.core.getStateLabels(SIM_LABEL)[1:]
                events = sim_events(settings.frames, presets, settings.interval_s, SIM_GROUP)
            else:
                events = multi_d_acquisition_events(
                    num_time_points=settings.frames,
                    time_interval_s=settings.interval_s,
                    **z_options,
                )
            acquisition_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
            hooks = livedecon_hooks(
                scope.core,
                events,
                acquisition_id,
                daemon_config.endpoints.ingest,
                mode="3d" if settings.three_d else "2d",
                model=settings.bundle if settings.sim else None,
                end_wait_s=300,
                sim=sim_plan_for(scope.config) if settings.sim else None,
            )
            process = hooks.acquisition_kwargs["image_process_fn"]
            seen = [0]

            def counted(
                image: np.ndarray, metadata: dict[str, Any]
            ) -> tuple[np.ndarray, dict[str, Any]]:
                seen[0] += 1
                progress("acquiring", seen[0], len(events))
                return process(image, metadata)

            kwargs = {**hooks.acquisition_kwargs, "image_process_fn": counted}
            time.sleep(0.3)  # the latency listener's subscription reaches the daemon
            with Acquisition(str(out / "raw"), "demo", show_display=False, **kwargs) as acq:
                acq.acquire(events)
            state = hooks.finish()
            raw_path = Path(acq.get_dataset().path)
            time.sleep(0.5)  # the last publications arrive
            latency = latencies.stop()
            with daemon.client() as client:
                metrics = client.metrics()
            progress("comparing with the ground truth", 0, 0)
            restored = output_files(daemon_config.output_dir / acquisition_id)
            if settings.sim:
                psnr_raw, psnr_restored = _sim_quality(scope, raw_path, restored)
            else:
                share = ModelBundle.load(find_bundle(bundle)).flux_share
                psnr_raw, psnr_restored = _quality(
                    scope, raw_path, restored, settings.exposure_ms, share
                )
    finally:
        if latencies.is_alive():
            latencies.stop()
        daemon.stop()
    return DemoSummary(
        acquisition_id=acquisition_id,
        frames=len(events),
        stream=hooks.stream.counters.summary(),
        daemon={**state, "inference_p50_ms": metrics["latency_ms"]["inference"].get("p50_ms")},
        latency_ms=latency,
        psnr_raw_db=psnr_raw,
        psnr_restored_db=psnr_restored,
        raw_dataset=str(raw_path),
        restored_files=[str(p) for p in restored],
        backend=hooks.stream.started_reply.get("backend", "?"),
        bundle_id=hooks.stream.started_reply.get("bundle_id", "?"),
        extra={"scoring": SIM_SCORING} if settings.sim else {},
    )


def run_demo_with_viewer(
    settings: DemoSettings,
    progress: Callable[[str, int, int], None] = lambda *_: None,
    report: Callable[[DemoSummary], None] = lambda _: None,
) -> DemoSummary:
    """The demo with the live viewer. The window opens first, on the endpoints the daemon will
    bind (it shows the daemon as soon as it is up); the demo runs in a thread, since Qt owns
    the main thread, and `report` gets its summary when it ends. The window stays open until
    the user closes it; closed early, the demo still finishes (and stops its daemon)."""
    try:
        import napari

        from livedecon.acquisition_hooks._viewer import open_viewer
    except ImportError as exc:
        raise RuntimeError(str(exc)) from None
    endpoints = settings.endpoints or Endpoints(
        ingest=free_tcp_endpoint(), publish=free_tcp_endpoint()
    )
    settings = dataclasses.replace(settings, endpoints=endpoints)
    _, widget = open_viewer(
        endpoints.publish, endpoints.ingest, volume=settings.three_d, title="livedecon demo"
    )
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["summary"] = run_demo(settings, progress)
            report(outcome["summary"])
        except BaseException as exc:  # raised again in the caller's thread
            outcome["error"] = exc
            progress(f"the demo failed ({exc}); close the viewer to exit", 0, 0)

    thread = threading.Thread(target=work, name="livedecon-demo", daemon=True)
    thread.start()
    try:
        napari.run()
    finally:
        widget.shutdown()
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["summary"]
