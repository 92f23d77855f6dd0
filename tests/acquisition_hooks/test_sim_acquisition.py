"""SIM on the simulated microscope: pycromanager's acquisition engine steps the pattern device
through every sequence, the hooks stream each frame to a real daemon process, and the daemon
writes and publishes one super-resolved image per sequence."""

from __future__ import annotations

import numpy as np
import pytest
from daemon_harness import receive_all, start_daemon, subscriber

from livedecon.acquisition_hooks._pycromanager_hooks import (
    SIM_AXIS,
    livedecon_hooks,
    plan_from_events,
    sim_events,
)
from livedecon.acquisition_hooks._pymmcore_hooks import LivedeconHandler
from livedecon.acquisition_hooks._simulated_microscope import (
    SIM_EXPOSURE_MS,
    SIM_GROUP,
    SIM_LABEL,
    SIM_PATTERN_KEY,
    SimulatedMicroscope,
)
from livedecon.calibration._baseline import upsample_2x
from livedecon.calibration._metrics import psnr
from livedecon.calibration._quality_bench import Scene, fit_to, scored_region
from livedecon.daemon._protocol import SimPlan, Topic
from livedecon.daemon._sim_processing import SimProcessor, sim_plan_for
from livedecon.daemon._writer import output_path, read_planes

SCENE = Scene(structure="dense", optics="tirf", peak_photons=100.0, size_px=64, seed=1234)
SCENE_PIXEL_UM = 0.0626  # the TIRF scenes' camera pixel


def test_pycromanager_steps_the_patterns_and_the_daemon_reconstructs_each_sequence(tmp_path):
    from pycromanager import Acquisition

    with SimulatedMicroscope(sim=SCENE, noise_seed=5) as scope:
        assert scope.sim is not None
        events = sim_events(2, scope.core.getStateLabels(SIM_LABEL)[1:], group=SIM_GROUP)
        scope.core.setExposure(SIM_EXPOSURE_MS)  # the scene's peak photons per frame
        scope.attach_pycromanager()
        daemon = start_daemon(tmp_path, queues={"stack_timeout_s": 60.0})  # a loaded CI machine
        sim = sim_plan_for(scope.config)
        hooks = livedecon_hooks(
            scope.core,
            events,
            "sim-live",
            daemon.ingest,
            sim=sim,
            end_wait_s=60,
        )
        assert hooks.stream.plan.mode == "sim"
        process = hooks.acquisition_kwargs["image_process_fn"]
        shown: list[tuple[int, int]] = []  # (the event's sim index, the pattern in the frame)

        def record(image, metadata):
            shown.append((metadata["Axes"][SIM_AXIS], metadata[SIM_PATTERN_KEY]))
            return process(image, metadata)

        try:
            views = subscriber(daemon, Topic.RESTORED)
            kwargs = {**hooks.acquisition_kwargs, "image_process_fn": record}
            with Acquisition(str(tmp_path / "raw"), "run", show_display=False, **kwargs) as acq:
                acq.acquire(events)
            state = hooks.final_state
            published = receive_all(views, quiet_ms=1000)
            views.close()
        finally:
            daemon.stop()
        reference = scored_region(scope.sim.reference)
        lit = scope.sim.expected_e.mean(axis=0)

    # the engine set the device to each pattern before its frame
    assert shown == [(i, i) for _ in range(2) for i in range(9)]
    assert state["written"] == 2
    assert hooks.stream.counters.summary()["missed"] == 0
    planes = read_planes(output_path(daemon.config.output_dir / "sim-live", 0, 0))
    assert [(r.time, r.z, p.shape) for r, p in planes] == [(0, 0, (128, 128)), (1, 0, (128, 128))]
    assert len([p for p, _ in published if p.topic == Topic.RESTORED]) == 2
    # the widefield image, noise-free even, is the bar to clear
    widefield = psnr(fit_to(scored_region(upsample_2x(lit)), reference), reference)
    for _, image in planes:
        assert psnr(fit_to(scored_region(image), reference), reference) > widefield + 1.0


def test_pymmcore_plus_runs_the_sim_presets_and_the_daemon_reconstructs_each_sequence(tmp_path):
    """A useq sequence whose channels are the SIM config group's presets, the plan's SIM
    settings in its metadata: each SR image is the reconstruction of its own raw frames."""
    from useq import MDASequence

    with SimulatedMicroscope(sim=SCENE, noise_seed=6) as scope:
        scope.core.setExposure(SIM_EXPOSURE_MS)
        patterns = scope.core.getStateLabels(SIM_LABEL)[1:]  # after "widefield"
        sim = sim_plan_for(scope.config)
        sequence = MDASequence(
            channels=[{"group": SIM_GROUP, "config": label} for label in patterns],
            time_plan={"interval": 0, "loops": 2},
            axis_order="tc",
            metadata={"livedecon": {"sim": sim.model_dump(), "acquisition_id": "mda-sim"}},
        )
        raw: dict[tuple[int, int], np.ndarray] = {}

        def keep(image, event, meta):  # by the pattern the device showed (pymmcore-plus says)
            (shown,) = (p["val"] for p in meta["property_values"] if p["dev"] == SIM_LABEL)
            raw[(event.index["t"], patterns.index(shown))] = image.copy()

        scope.core.mda.events.frameReady.connect(keep)
        daemon = start_daemon(tmp_path, queues={"stack_timeout_s": 60.0})  # a loaded CI machine
        handler = LivedeconHandler(address=daemon.ingest, end_wait_s=60)
        try:
            scope.core.mda.run(sequence, output=[handler])
        finally:
            daemon.stop()
    assert sorted(raw) == [(t, i) for t in range(2) for i in range(9)]  # each preset, in order
    assert handler.final_state["written"] == 2
    planes = sorted(
        read_planes(output_path(daemon.config.output_dir / "mda-sim", 0, 0)),
        key=lambda plane: plane[0].time,
    )
    assert not any(record.incomplete_stack for record, _ in planes)
    local = SimProcessor(sim, SCENE_PIXEL_UM)  # its stream's pattern: from the first sequence
    for record, image in planes:
        frames = np.stack([raw[(record.time, i)] for i in range(9)])
        expected = local.process([frames], [(0, 0)])[0][0]
        np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-4 * expected.max())


def test_sim_events_and_plans_say_what_is_wrong():
    events = sim_events(1, list("abcdefghi"), group="SLM")
    assert events[4]["config_group"] == ["SLM", "e"]
    assert [e["axes"] for e in events[:2]] == [{"time": 0, SIM_AXIS: 0}, {"time": 0, SIM_AXIS: 1}]
    with pytest.raises(ValueError, match="needs its patterns' presets"):
        sim_events(1, [])
    with pytest.raises(ValueError, match="pass sim=SimPlan"):
        plan_from_events(events, 0.0626)
    plan, per_timepoint = plan_from_events(events, 0.0626, sim=SimPlan(na=1.49, emission_um=0.58))
    assert (plan.mode, plan.z_count, per_timepoint) == ("sim", 9, {0: 9})
    with SimulatedMicroscope(sim=SCENE) as scope:
        labels = scope.core.getStateLabels(SIM_LABEL)
        assert labels[0] == "widefield"
        assert labels[5] == "angle 1 phase 1"
        assert np.isclose(scope.config.optics.na, 1.49)
