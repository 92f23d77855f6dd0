"""Live SIM in the daemon: every group of angles x phases raw frames becomes one SR image.

A real daemon process receives simulated SIM frames (calibration/_sim_simulator.py) plane by
plane and as a whole sequence, one group with a frame that never comes; it writes one SR image
per group at half the camera pixel, publishes it beside the widefield image, and `reprocess`
makes the same images again from the raw dataset.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from daemon_harness import receive_all, send_and_flush, start_daemon, subscriber
from plane_records import ndtiff
from pydantic import ValidationError
from tiny_specs import TINY_SIM

from livedecon.calibration._baseline import upsample_2x
from livedecon.calibration._metrics import psnr
from livedecon.calibration._quality_bench import OPTICS, Scene, fit_to, scored_region
from livedecon.calibration._sim_run import train_sim_bundle
from livedecon.calibration._sim_simulator import SimIllumination, render_sim
from livedecon.daemon._client import DaemonError
from livedecon.daemon._journal import read_acquisition_record
from livedecon.daemon._processing import open_processor
from livedecon.daemon._protocol import Axes, Plan, SimPlan, Topic
from livedecon.daemon._reprocess import reprocess
from livedecon.daemon._sim_processing import SimProcessor
from livedecon.daemon._writer import output_path, read_planes
from livedecon.engines._bundle import ModelBundle
from livedecon.engines._enums import Backend
from livedecon.engines._sim_pattern import SimParameters
from livedecon.engines._sim_training import SimRecorruption, SimTrainingConfig

SCENE = Scene(structure="dense", optics="tirf", peak_photons=100.0, size_px=64, seed=1234)
OPTIC = OPTICS["tirf"]
MISSING = 4  # the frame of the second group that never comes


def sim_plan(**changes) -> Plan:
    sim = SimPlan(
        na=OPTIC.na,
        emission_um=OPTIC.emission_um,
        immersion_ri=OPTIC.immersion_ri,
        camera_offset_adu=SCENE.offset_adu,
        camera_gain_e_per_adu=SCENE.gain_e_per_adu,
    )
    return Plan(**({"mode": "sim", "pixel_size_um": OPTIC.pixel_size_um, "sim": sim} | changes))


@pytest.fixture(scope="module")
def acquisition():
    return render_sim(SCENE)


def test_each_group_becomes_one_sr_image_written_published_and_recoverable(
    tmp_path: Path, acquisition
):
    frames = acquisition.counts  # (9, 64, 64) uint16, angle by angle
    groups = [frames, frames, frames[::-1].copy()]  # the last one: another sequence
    daemon = start_daemon(tmp_path, queues={"stack_timeout_s": 1.0})
    try:
        views = subscriber(daemon, Topic.RESTORED, Topic.RAW)
        with daemon.client() as client:
            client.start("sim", sim_plan())
            for z, frame in enumerate(groups[0]):
                client.send(frame, Axes(time=0, z=z))
            for z, frame in enumerate(groups[1]):
                if z != MISSING:
                    client.send(frame, Axes(time=1, z=z))
            time.sleep(2.0)  # the second group times out
            client.send(groups[2], Axes(time=2))  # a whole sequence in one message
            state = client.end(wait_s=60)
        published = receive_all(views, quiet_ms=1000)
        views.close()
    finally:
        daemon.stop()

    assert (state["restored"], state["incomplete_stacks"], state["written"]) == (18, 1, 3)
    path = output_path(daemon.config.output_dir / "sim", 0, 0)
    planes = {r.time: (r, p) for r, p in read_planes(path)}
    assert sorted(planes) == [0, 1, 2]
    assert [planes[t][0].z for t in range(3)] == [0, 0, 0]
    assert [planes[t][0].incomplete_stack for t in range(3)] == [False, True, False]
    assert [planes[t][0].frame_id for t in range(3)] == [0, 9, 17]  # each group's first frame
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].shape == (3, 128, 128)
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert pixels["PhysicalSizeX"] == pytest.approx(OPTIC.pixel_size_um / 2)

    # the daemon's image is the reconstruction of the frames, and it is super-resolved
    local = SimProcessor(sim_plan().sim, OPTIC.pixel_size_um)
    expected = local.process([frames])[0][0]
    np.testing.assert_allclose(planes[0][1], expected, rtol=1e-5, atol=1e-4 * expected.max())
    reference = scored_region(acquisition.reference)
    widefield = (frames.astype(np.float32).mean(axis=0) - SCENE.offset_adu) * SCENE.gain_e_per_adu
    scores = {
        name: psnr(fit_to(scored_region(image), reference), reference)
        for name, image in (("sim", planes[0][1]), ("widefield", upsample_2x(widefield)))
    }
    assert scores["sim"] > scores["widefield"] + 1.0, scores
    # a missing frame: its angle counts as widefield only, the image stays finite and close
    assert np.isfinite(planes[1][1]).all()
    assert psnr(fit_to(scored_region(planes[1][1]), reference), reference) > scores["widefield"]

    by_topic = {(p.topic, p.axes.time): (p, pixels) for p, pixels in published}
    restored, sr = by_topic[(Topic.RESTORED, 0)]
    np.testing.assert_array_equal(sr, planes[0][1])
    assert restored.pixel_size_um == pytest.approx(OPTIC.pixel_size_um / 2)
    raw, wide = by_topic[(Topic.RAW, 1)]  # the widefield image: mean of the frames that came
    np.testing.assert_allclose(wide, np.delete(frames, MISSING, axis=0).mean(axis=0), rtol=1e-6)
    assert raw.pixel_size_um == pytest.approx(OPTIC.pixel_size_um)

    # the pattern, found once in the first group, is kept beside the output file
    kept = path.with_name("restored_p0_c0.sim.json")
    assert kept.is_file()
    assert SimParameters.model_validate_json(kept.read_text()).modulation[0] > 0.5

    # after a loss, reprocess makes the same images from the raw dataset (and the kept pattern)
    written = {t: planes[t][1] for t in range(3)}
    path.unlink()
    raw_frames = {(t, z): g[z] for t, g in enumerate(groups) if t != 1 for z in range(9)}
    raw_frames |= {(1, z): frames[z] for z in range(9) if z != MISSING}
    report = reprocess(path.parent, ndtiff(tmp_path, raw_frames, ("time", "z")))
    assert (report.acknowledged, report.restored_planes, report.recreated_from_raw) == (26, 3, 3)
    assert report.unrecoverable == []
    again = {r.time: (r, p) for r, p in read_planes(path)}
    for t in range(3):
        np.testing.assert_allclose(again[t][1], written[t], rtol=1e-5, atol=1e-5 * expected.max())
    assert again[1][0].incomplete_stack


def test_sim_plans_that_cannot_work_are_refused(tmp_path: Path):
    with pytest.raises(ValidationError, match="needs its sim settings"):
        Plan(mode="sim", pixel_size_um=0.0626)
    with pytest.raises(ValidationError, match="has 9 frames"):
        sim_plan(z_count=5)
    with pytest.raises(ValidationError, match="must be below immersion_ri"):
        SimPlan(na=1.6, emission_um=0.58)
    daemon = start_daemon(tmp_path)
    try:
        with daemon.client() as client:
            with pytest.raises(DaemonError, match=r"fast2d-sim.* is not a SIM model"):
                client.start("bad-0", sim_plan(model="fast2d-sim"))
            with pytest.raises(DaemonError, match="float32 SR images only"):
                client.start("bad-1", sim_plan(output_dtype="uint16"))
            client.start("small", sim_plan())
            with pytest.raises(DaemonError, match="at least 32 x 32"):
                send_and_flush(client, np.zeros((16, 16), np.uint16), Axes(z=0))
            with pytest.raises(DaemonError, match="outside the plan's 9 frames"):
                send_and_flush(client, np.zeros((32, 32), np.uint16), Axes(z=9))
            client.end(wait_s=30)
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def sim_model(tmp_path_factory, acquisition) -> Path:
    """A tiny ZS-DeconvNet-SIM trained on the acquisition (a few steps: the chain, not its
    quality, is under test here; tests/engines/test_sim.py measures the quality)."""
    config = SimTrainingConfig(
        network=TINY_SIM, recorruption=SimRecorruption(pairs=2), iterations=3, patch_px=32
    )
    bundle = train_sim_bundle(
        acquisition.electrons,
        OPTIC,
        angles=3,
        phases=3,
        read_noise_e=SCENE.read_noise_e,
        network="sim",
        config=config,
        name="tiny-zs-sim",
        data=["simulated"],
    )
    return bundle.save(tmp_path_factory.mktemp("models") / "tiny-zs-sim")


def test_a_sim_model_restores_each_sr_image_live_and_again_in_reprocess(
    tmp_path: Path, acquisition, sim_model: Path
):
    frames = acquisition.counts
    daemon = start_daemon(tmp_path, queues={"stack_timeout_s": 1.0})
    try:
        views = subscriber(daemon, Topic.RESTORED)
        with daemon.client() as client:
            client.start("sim-net", sim_plan(model=str(sim_model)))
            for t in range(2):
                client.send(frames, Axes(time=t))
            state = client.end(wait_s=60)
        published = receive_all(views, quiet_ms=1000)
        views.close()
    finally:
        daemon.stop()

    assert (state["restored"], state["written"]) == (2, 2)  # two whole sequences, two images
    path = output_path(daemon.config.output_dir / "sim-net", 0, 0)
    planes = {r.time: (r, p) for r, p in read_planes(path)}
    bundle = ModelBundle.load(sim_model)
    assert {r.bundle_id for r, _ in planes.values()} == {bundle.bundle_id}
    # the reconstruction with the bundle's own settings, then the network (same engine)
    network = open_processor(sim_model, Backend.ONNXRUNTIME, max_batch=1)
    local = SimProcessor(sim_plan().sim, OPTIC.pixel_size_um, network=network)
    assert local.settings.wiener == bundle.manifest.sim.reconstruction.wiener
    expected = local.process([frames])[0][0]
    assert expected.shape == (128, 128)
    for t in range(2):
        np.testing.assert_allclose(planes[t][1], expected, rtol=1e-4, atol=1e-4 * expected.max())
    wiener = SimProcessor(sim_plan().sim, OPTIC.pixel_size_um).process([frames])[0][0]
    assert np.abs(expected - wiener).mean() > 0.01 * np.abs(wiener).mean()  # the network acts
    restored = [pixels for p, pixels in published if p.topic == Topic.RESTORED]
    np.testing.assert_array_equal(restored[0], planes[0][1])

    record = read_acquisition_record(path.parent)
    assert record.bundle_path == str(sim_model)
    path.unlink()
    raw = {(t, z): frames[z] for t in range(2) for z in range(9)}
    report = reprocess(path.parent, ndtiff(tmp_path, raw, ("time", "z")))
    assert (report.restored_planes, report.recreated_from_raw) == (2, 2)
    again = {r.time: p for r, p in read_planes(path)}
    np.testing.assert_allclose(again[0], planes[0][1], rtol=1e-4, atol=1e-4 * expected.max())


def test_a_sim_model_serves_only_the_raw_frames_it_learned(tmp_path: Path, sim_model: Path):
    daemon = start_daemon(tmp_path)
    try:
        with daemon.client() as client:
            with pytest.raises(DaemonError, match="restores SR-SIM images: start a sim"):
                client.start(
                    "as-2d", Plan(pixel_size_um=OPTIC.pixel_size_um / 2, model=str(sim_model))
                )
            fits = sim_plan(model=str(sim_model))
            other = fits.model_copy(update={"sim": fits.sim.model_copy(update={"na": 1.2})})
            with pytest.raises(
                DaemonError, match=r"learned SIM images of other raw frames: NA 1\.2"
            ):
                client.start("other-na", other)
            with pytest.raises(DaemonError, match=r"camera pixel 0\.1 um \(trained: 0\.0626\)"):
                client.start("other-pixel", sim_plan(model=str(sim_model), pixel_size_um=0.1))
            adapting = sim_plan(model=str(sim_model), adaptation={"mode": "adapt"})
            with pytest.raises(DaemonError, match="cannot adapt its weights"):
                client.start("adapting", adapting)
    finally:
        daemon.stop()


def test_a_stream_follows_its_pattern_as_it_drifts(acquisition):
    """The stream's pattern is estimated once; its phases are measured again in every
    complete group (SimPlan.refresh_phases), so a pattern that drifted a quarter period
    still reconstructs well, where the first pattern's phases alone lose dB."""
    period = 1 / np.hypot(*acquisition.truth_parameters.k[0])
    drifted = render_sim(SCENE, SimIllumination(shift_px=(0.15 * period, 0.2 * period)))
    reference = scored_region(drifted.reference)
    scores = {}
    for refresh in (True, False):
        plan = sim_plan().sim.model_copy(update={"refresh_phases": refresh})
        processor = SimProcessor(plan, OPTIC.pixel_size_um)
        processor.process([acquisition.counts], [(0, 0)])  # the stream's pattern
        image = processor.process([drifted.counts], [(0, 0)])[0][0]
        scores[refresh] = psnr(fit_to(scored_region(image), reference), reference)
    assert scores[True] > scores[False] + 1.5, scores


def test_a_pattern_measured_before_serves_from_the_first_group(acquisition, tmp_path, monkeypatch):
    """SimPlan.pattern: every stream starts with the plan's pattern; none is estimated, it is
    kept beside the output for reprocess, and a pattern of another pixel size or sequence is
    refused before anything runs."""
    from livedecon.daemon import _sim_processing

    truth = acquisition.truth_parameters
    plan = sim_plan().sim.model_copy(update={"pattern": truth})
    estimated = SimProcessor(sim_plan().sim, OPTIC.pixel_size_um).process([acquisition.counts])

    def no_estimate(*_args, **_kwargs):
        raise AssertionError("estimated a pattern the plan gave")

    monkeypatch.setattr(_sim_processing, "estimate_parameters", no_estimate)
    processor = SimProcessor(plan, OPTIC.pixel_size_um, directory=tmp_path)
    image = processor.process([acquisition.counts], [(0, 0)])[0][0]
    saved = processor.pattern_path((0, 0))
    assert saved is not None
    assert SimParameters.model_validate_json(saved.read_text()) == truth
    reference = scored_region(acquisition.reference)
    scores = [
        psnr(fit_to(scored_region(i), reference), reference) for i in (image, estimated[0][0])
    ]
    assert scores[0] > scores[1] - 0.1, scores  # measured: 29.66 against 29.08 dB

    other_pixel = truth.model_copy(update={"output_pixel_um": 1.1 * truth.output_pixel_um})
    with pytest.raises(ValueError, match=r"measured on .* SR pixels"):
        SimProcessor(plan.model_copy(update={"pattern": other_pixel}), OPTIC.pixel_size_um)
    with pytest.raises(ValidationError, match=r"the pattern holds 3 angles x \[3, 3, 3\]"):
        SimPlan.model_validate(plan.model_dump() | {"phases": 5})
    with pytest.raises(ValidationError, match="one modulation per angle"):
        SimParameters.model_validate(truth.model_dump() | {"modulation": [1.0]})
