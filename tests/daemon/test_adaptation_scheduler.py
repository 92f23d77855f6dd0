"""Test-time adaptation in the daemon: candidate checks, versions, rollback, and a stream that
keeps flowing across weight swaps."""

from __future__ import annotations

import time
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from daemon_harness import start_daemon

from livedecon.daemon._adaptation_scheduler import (
    TimepointReport,
    adaptation_for,
    check_candidate,
)
from livedecon.daemon._pipeline import Worker
from livedecon.daemon._processing import open_processor
from livedecon.daemon._protocol import AdaptationPlan, Axes, Plan
from livedecon.daemon._telemetry import Metrics
from livedecon.daemon._writer import output_path, read_planes

PLAN = AdaptationPlan(mode="adapt", steps_per_timepoint=3, patch_px=32, batch_size=2)


@pytest.fixture(scope="module")
def processor():
    return open_processor("fast2d-sim", backend="torch")


@pytest.fixture
def frames():
    rng = np.random.default_rng(0)
    return [rng.poisson(20, (96, 96)).astype(np.float32) for _ in range(3)]


def _adaptation(processor, tmp_path, plan=PLAN):
    acquisition = SimpleNamespace(
        record=SimpleNamespace(plan=SimpleNamespace(save=True)), directory=tmp_path
    )
    adaptation = adaptation_for(processor, plan, acquisition)
    assert adaptation.wait_ready()
    return adaptation


def _run_timepoint(adaptation, frames, time_index=0):
    for frame in frames:
        adaptation.observe(time_index, frame)
    adaptation.timepoint_done(time_index)
    while adaptation.busy:
        adaptation.step()


def test_poisoned_updates_are_rejected_and_the_serving_weights_stay(processor, frames, tmp_path):
    # a lenient loss check, so that the finiteness and collapse checks are the ones tested
    adaptation = _adaptation(
        processor, tmp_path, PLAN.model_copy(update={"validation_tolerance": 100})
    )
    serving = {k: v.clone() for k, v in processor.bundle.state_dict.items()}
    poisons = {
        "non-finite weights": lambda w: {k: torch.full_like(v, float("nan")) for k, v in w.items()},
        "collapse": lambda w: {k: torch.zeros_like(v) for k, v in w.items()},
    }
    for expected, poison in poisons.items():
        _run_timepoint(adaptation, frames)
        adaptation._adapter.load_weights(poison(adaptation._adapter.weights()))
        report, weights = adaptation.conclude()
        assert weights is None
        assert not report.accepted
        assert expected.split()[0] in report.reason, report.reason
    assert adaptation.serving_version == 1
    assert sorted(adaptation.versions) == [1]
    assert all(torch.equal(serving[k], v) for k, v in processor.bundle.state_dict.items())
    assert not list(tmp_path.glob("weights/*"))  # nothing rejected is kept


def test_an_honest_update_passes_is_versioned_saved_and_can_be_rolled_back(
    processor, frames, tmp_path
):
    adaptation = _adaptation(
        processor, tmp_path, PLAN.model_copy(update={"validation_tolerance": 1.0})
    )
    _run_timepoint(adaptation, frames)
    report, _weights = adaptation.conclude()
    assert report.accepted, report.reason
    assert report.steps == 3
    assert np.isfinite(report.candidate_loss)
    assert report.version == 2
    assert (tmp_path / "weights" / "weights-v2.safetensors").is_file()
    adaptation.serving_version = 2  # as the worker does once it swapped
    assert adaptation.rollback(None) == 1  # default: the version before the serving one
    assert torch.equal(
        adaptation._adapter.weights()["tail.0.weight"], adaptation.versions[1]["tail.0.weight"]
    )
    with pytest.raises(KeyError):
        adaptation.rollback(7)


def test_check_candidate_names_each_failure():
    plan = AdaptationPlan(mode="adapt")
    good = {"w": torch.ones(2)}
    image = np.random.default_rng(1).random((8, 8)) + 1
    assert check_candidate(good, 1.0, 1.0, image, image, plan).accepted
    assert "worse" in check_candidate(good, 1.0, 1.5, image, image, plan).reason
    assert "collapse" in check_candidate(good, 1.0, 1.0, image, image * 0.1, plan).reason
    flat = np.full_like(image, image.mean())
    assert "collapse" in check_candidate(good, 1.0, 1.0, image, flat, plan).reason
    assert (
        "non-finite output" in check_candidate(good, 1.0, 1.0, image, image * np.nan, plan).reason
    )


def test_a_stream_across_weight_swaps_loses_and_repeats_nothing(tmp_path):
    daemon = start_daemon(tmp_path, bundle="fast2d-sim")
    rng = np.random.default_rng(5)
    per_timepoint, sent = 8, 0
    adaptation = PLAN.model_copy(update={"validation_tolerance": 1.0, "steps_per_timepoint": 4})
    try:
        with daemon.client() as client:
            client.start("adapting", Plan(pixel_size_um=0.065))  # off at first ...
            client.adaptation("set", plan=adaptation.model_dump())  # ... then switched on
            while not client.adaptation().get("ready"):  # the adapter warms up beside the stream
                time.sleep(0.1)
            swapped_at = None
            # a camera at 25 Hz: the steps run between frames. The loop ends two timepoints
            # after the first swap (about 5 here); the margin is for a CPU shared with other
            # jobs, where a swap took more than 12 timepoints.
            for t in range(40):
                for _ in range(per_timepoint):
                    image = rng.poisson(40, (64, 64)).astype(np.uint16) + 100
                    client.send(image, Axes(time=t), timestamp_s=float(sent))
                    sent += 1
                    time.sleep(0.04)
                client.timepoint_done(Axes(time=t))
                if swapped_at is None and client.adaptation()["serving_version"] > 1:
                    swapped_at = t
                elif swapped_at is not None and t >= swapped_at + 2:
                    break  # frames were served by new weights, and swaps kept coming
            deadline = time.monotonic() + 60
            while client.adaptation()["pending_steps"] and time.monotonic() < deadline:
                time.sleep(0.1)
            state = client.adaptation()
            metrics = client.metrics()["latency_ms"]
            client.adaptation("rollback")  # back to the version before the serving one
            client.send(rng.poisson(40, (64, 64)).astype(np.uint16) + 100, Axes(time=99))
            sent += 1
            final = client.end(wait_s=60)["adaptation"]
    finally:
        daemon.stop()
    planes = read_planes(output_path(daemon.config.output_dir / "adapting", 0, 0))
    ids = [r.frame_id for r, _ in planes]
    assert sorted(ids) == list(range(sent))  # each frame exactly once
    versions = [r.weights_version for r, _ in sorted(planes, key=lambda p: p[0].frame_id)]
    rolled_back = versions.pop()  # the frame after the rollback: an earlier version again
    assert rolled_back == final["serving_version"]
    assert rolled_back < max(final["versions"])
    assert versions == sorted(versions)  # a swap happens between frames, never undone here
    assert max(versions) > 1, state  # swaps served frames
    assert len({r.bundle_id for r, _ in planes}) == len(set(versions))  # the id follows them
    assert (daemon.config.output_dir / "adapting" / "weights" / "weights-v2.safetensors").is_file()
    step, delay, swap = (metrics[k] for k in ("adaptation_step", "training_delay", "swap"))
    for name in ("adaptation_step", "training_delay", "swap_prepare", "swap"):
        print(name, {k: round(v, 1) for k, v in metrics[name].items()})
    assert step["count"] >= 4
    assert delay["count"] > 0  # frames did arrive while a step ran ...
    # ... and waited for about one step, not for the timepoint's four: the bound sits between
    # the two, with room for a CPU shared with another test worker (a frame's own processing
    # slows too: 246 ms against steps of 110 ms at p99 once, December 2026)
    assert delay["p99_ms"] <= step["p99_ms"] * 2.5 + 20
    # the swap on the serving path is a reference change between batches (the new engine was
    # built beside the stream): far below a training step
    assert swap["p99_ms"] < step["p50_ms"]


def test_retraining_runs_longer_on_the_frames_of_several_timepoints(processor, frames, tmp_path):
    plan = PLAN.model_copy(
        update={
            "mode": "retrain",
            "retrain_every": 2,
            "retrain_steps": 5,
            "validation_tolerance": 1,
        }
    )
    adaptation = _adaptation(processor, tmp_path, plan)
    _run_timepoint(adaptation, frames, 0)
    first, _ = adaptation.conclude()
    _run_timepoint(adaptation, frames, 1)
    second, _ = adaptation.conclude()
    assert (first.kind, first.steps) == ("adapt", 3)
    assert (second.kind, second.steps) == ("retrain", 5)
    # trained on both timepoints' kept frames (2 each; one per timepoint held out)
    assert len(adaptation._adapter.trainer.sampler.images) == 4


def test_a_weight_swap_that_fails_is_counted_and_the_worker_goes_on():
    """A commit that raises (a TensorRT refit, say) must not end the worker thread, which
    holds acknowledged frames: the old weights keep serving and the next swap lands."""
    metrics = Metrics()
    worker = Worker(None, None, None, metrics, 1, 0.01, 1.0)  # type: ignore[arg-type]
    acquisition = SimpleNamespace(id="acq", adaptation=SimpleNamespace(serving_version=1))

    def failing() -> None:
        raise RuntimeError("refit failed")

    for version, commit in ((2, failing), (3, lambda: None)):
        ready: Future = Future()
        ready.set_result(commit)
        report = TimepointReport(timepoint=version, kind="adapt", version=version)
        worker._swaps.append((ready, acquisition, report, time.perf_counter()))  # type: ignore[arg-type]
    worker._commit_ready_swaps()
    assert metrics.counters["errors"] == 1
    assert acquisition.adaptation.serving_version == 3
