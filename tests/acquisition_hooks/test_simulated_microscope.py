from __future__ import annotations

import time

import numpy as np
import pytest

from livedecon.acquisition_hooks._simulated_microscope import (
    CAMERA_TIME_KEY,
    FOCUS_KEY,
    SAMPLE_TIME_KEY,
    SimulatedMicroscope,
)
from livedecon.calibration._forward_model import counts_to_electrons


@pytest.fixture
def scope(small_microscope):
    with SimulatedMicroscope(small_microscope, clock="wall") as microscope:
        yield microscope


def test_snap_renders_forward_model_with_exposure(scope):
    core = scope.core
    assert core.getPixelSizeUm() == pytest.approx(0.065)
    core.setExposure(10)
    short = counts_to_electrons(core.snap(), scope.config.camera).mean()
    core.setExposure(80)
    long = counts_to_electrons(core.snap(), scope.config.camera).mean()
    assert core.getImageWidth() == 64
    assert core.getImageHeight() == 64
    assert long / short == pytest.approx(8, rel=0.1)  # exposure scales the photons


def test_ground_truth_from_frame_metadata(scope):
    scope.clock.set(40.0)
    scope.core.setPosition(0.0)
    scope.core.setExposure(1000)
    frame = scope.core.snap()
    tags = scope.camera.last_metadata
    assert {k: tags[k] for k in (SAMPLE_TIME_KEY, FOCUS_KEY)} == {
        SAMPLE_TIME_KEY: 40.0,
        FOCUS_KEY: 0.0,
    }
    assert abs(tags[CAMERA_TIME_KEY] - time.time()) < 5
    signal = counts_to_electrons(frame, scope.config.camera).ravel()

    def match(truth):
        return np.corrcoef(truth.reshape(64, 2, 64, 2).sum(axis=(1, 3)).ravel(), signal)[0, 1]

    truth = scope.ground_truth(tags, exposure_ms=1000)
    assert truth.shape == (128, 128)
    wrong_time = scope.ground_truth({SAMPLE_TIME_KEY: 100.0, FOCUS_KEY: 0.0}, exposure_ms=1000)
    assert match(truth) > 0.5
    assert match(truth) > match(wrong_time) + 0.1


def test_closed_shutter_gives_dark_frames(scope):
    scope.core.setExposure(100)
    scope.core.setAutoShutter(False)
    scope.core.setShutterOpen(False)
    dark = counts_to_electrons(scope.core.snap(), scope.config.camera)
    scope.core.setShutterOpen(True)
    lit = counts_to_electrons(scope.core.snap(), scope.config.camera)
    assert abs(dark.mean()) < 0.2 < 0.5 * lit.mean()


def test_pycromanager_acquisition_sees_every_image_once(scope):
    from pycromanager import Acquisition, multi_d_acquisition_events

    scope.attach_pycromanager()
    seen, images = [], []

    def process(image, metadata):
        seen.append((metadata["Axes"]["time"], metadata["Axes"]["z"], metadata[FOCUS_KEY]))
        images.append((image.shape, image.dtype))
        return image, metadata

    events = multi_d_acquisition_events(num_time_points=3, z_start=-0.2, z_end=0.2, z_step=0.2)
    focus_of = {(e["axes"]["time"], e["axes"]["z"]): e["z"] for e in events}
    assert len(focus_of) >= 9
    with Acquisition(image_process_fn=process, show_display=False) as acq:
        acq.acquire(events)
    assert sorted((t, z) for t, z, _ in seen) == sorted(focus_of)  # each image exactly once
    assert set(images) == {((64, 64), np.dtype(np.uint16))}
    for t, z_index, focus in seen:
        assert focus == pytest.approx(focus_of[(t, z_index)])


def test_pymmcore_plus_run_mda(scope):
    from useq import MDASequence

    frames = []
    scope.core.mda.events.frameReady.connect(lambda img, event, meta: frames.append((img, event)))
    sequence = MDASequence(
        time_plan={"interval": 0, "loops": 2},
        z_plan={"range": 0.4, "step": 0.2},
        axis_order="tz",
    )
    scope.core.mda.run(sequence)
    indices = sorted((e.index["t"], e.index["z"]) for _, e in frames)
    assert indices == [(t, z) for t in range(2) for z in range(3)]
    assert all(img.shape == (64, 64) for img, _ in frames)
