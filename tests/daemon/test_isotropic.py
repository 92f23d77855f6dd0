"""The daemon's Self-Net chain: 3D model, then Self-Net, chosen by the acquisition plan.

A real daemon process restores z-stacks with the shipped `fast3d-sim` and a tiny (untrained)
Self-Net bundle at its output grid, writes isotropic volumes with their voxel size, and
publishes xy, xz and yz projections for display.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from daemon_harness import receive_all, start_daemon, subscriber
from plane_records import zarr_planes
from pydantic import ValidationError
from tiny_specs import TINY_SELFNET

from livedecon.daemon._client import DaemonError
from livedecon.daemon._journal import read_acquisition_record
from livedecon.daemon._processing import open_isotropic, open_processor, source_planes
from livedecon.daemon._protocol import AdaptationPlan, Axes, Plan, Topic
from livedecon.daemon._writer import output_path, read_planes
from livedecon.engines._bundle import ModelBundle, TrainingRecord, find_bundle
from livedecon.engines._selfnet import SelfNetRestorer, upsampled_depth
from livedecon.engines._selfnet_bundle import selfnet_bundle, volume_normalisation

FIRST = ModelBundle.load(find_bundle("fast3d-sim")).manifest
Z_COUNT = 5
RAW_PX = 24


def selfnet_after_fast3d(directory: Path) -> Path:
    """An untrained tiny Self-Net bundle for fast3d-sim's output: its pixel, its z step."""
    torch.manual_seed(0)
    volume = np.random.default_rng(0).gamma(2.0, 10.0, (8, 32, 32)).astype(np.float32)
    bundle = selfnet_bundle(
        SelfNetRestorer(TINY_SELFNET),
        name="sn-test",
        pixel_um=FIRST.output_pixel_um,
        z_step_um=FIRST.z_step_um,
        normalisation=volume_normalisation(volume),
        training=TrainingRecord.now(data=["test"], config={}, iterations=0),
    )
    return bundle.save(directory / "sn")


def plan(selfnet: Path | str, **changes) -> Plan:
    fields = {
        "mode": "3d",
        "z_count": Z_COUNT,
        "z_step_um": FIRST.z_step_um,
        "pixel_size_um": FIRST.input_pixel_um,
        "model": "fast3d-sim",
        "isotropic": str(selfnet),
    }
    return Plan(**(fields | changes))


def test_stacks_become_isotropic_volumes_written_and_projected(tmp_path: Path):
    selfnet = selfnet_after_fast3d(tmp_path)
    rng = np.random.default_rng(1)
    stacks = rng.integers(100, 400, (2, Z_COUNT, RAW_PX, RAW_PX)).astype(np.uint16)
    daemon = start_daemon(tmp_path, queues={"stack_timeout_s": 1.0}, storage={"ome_zarr": True})
    try:
        views = subscriber(daemon, Topic.MIP, Topic.MIP_XZ, Topic.MIP_YZ)
        with daemon.client() as client:
            client.start("iso", plan(selfnet))
            for z in range(Z_COUNT):
                client.send(stacks[0, z], Axes(time=0, z=z))
            for z in (0, 1, 3, 4):  # plane 2 of the second stack never comes
                client.send(stacks[1, z], Axes(time=1, z=z))
            time.sleep(2.0)  # the second stack times out
            state = client.end(wait_s=60)
        published = receive_all(views, quiet_ms=1000)
        views.close()
    finally:
        daemon.stop()

    depth = upsampled_depth(Z_COUNT, FIRST.z_step_um / FIRST.output_pixel_um)
    assert depth == 18
    assert state["restored"] == 2 * Z_COUNT - 1
    assert state["incomplete_stacks"] == 1
    assert state["written"] == 2 * depth
    path = output_path(daemon.config.output_dir / "iso", 0, 0)
    planes = {(r.time, r.z): (r, p) for r, p in read_planes(path)}
    assert sorted(planes) == [(t, z) for t in range(2) for z in range(depth)]
    assert all(planes[(1, z)][0].incomplete_stack for z in range(depth))
    assert not any(planes[(0, z)][0].incomplete_stack for z in range(depth))
    # each written plane carries the frame id of the acquired plane nearest to it
    nearest = source_planes(Z_COUNT, depth, [0, 1, 3, 4])
    assert [planes[(1, z)][0].frame_id for z in range(depth)] == [
        Z_COUNT + [0, 1, 3, 4].index(n) for n in nearest
    ]
    assert planes[(0, 0)][0].bundle_id.startswith("fast3d-sim@")
    assert "+sn-test@" in planes[(0, 0)][0].bundle_id
    # the bundle id names the weights only: the record says what ran after the network
    record = read_acquisition_record(daemon.config.output_dir / "iso")
    assert record.finishing == "2 Richardson-Lucy steps on its denoised stack"
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].shape == (2, depth, 2 * RAW_PX, 2 * RAW_PX)
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert pixels["PhysicalSizeZ"] == pytest.approx(FIRST.output_pixel_um)
    assert pixels["PhysicalSizeX"] == pytest.approx(FIRST.output_pixel_um)
    assert zarr_planes(path).shape == (2, depth, 2 * RAW_PX, 2 * RAW_PX)

    # the daemon's volume is the chain's, run here on the same engine
    first = open_processor("fast3d-sim", "onnxruntime", frame_shapes=((Z_COUNT, 24, 24),))
    chain = open_isotropic(first, selfnet, FIRST.z_step_um, "onnxruntime")
    expected = chain.process([stacks[0]])[0]
    written = np.stack([planes[(0, z)][1] for z in range(depth)])
    np.testing.assert_allclose(written, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

    by_topic = {p.topic: (p, pixels) for p, pixels in published if p.axes.time == 0}
    assert set(by_topic) == {Topic.MIP, Topic.MIP_XZ, Topic.MIP_YZ}
    for topic, axis in ((Topic.MIP, 0), (Topic.MIP_XZ, 1), (Topic.MIP_YZ, 2)):
        publication, pixels = by_topic[topic]
        np.testing.assert_allclose(pixels, written.max(axis=axis), rtol=1e-6)
        assert publication.z_step_um == pytest.approx(FIRST.output_pixel_um)
        assert publication.pixel_size_um == pytest.approx(FIRST.output_pixel_um)
    assert by_topic[Topic.MIP_XZ][1].shape == (depth, 2 * RAW_PX)


def test_chains_that_cannot_work_are_refused_at_the_start(tmp_path: Path):
    selfnet = selfnet_after_fast3d(tmp_path)
    with pytest.raises(ValidationError, match="needs a 3d plan"):
        Plan(pixel_size_um=0.1, isotropic=str(selfnet))
    daemon = start_daemon(tmp_path)
    try:
        with daemon.client() as client:
            refusals = {
                "2d model": (plan(selfnet, model="fast2d-sim"), "follows a 3D model"),
                "z step": (plan(selfnet, z_step_um=0.3), r"trained at 0\.2"),
                "few planes": (plan(selfnet, z_count=3), "at least 4 planes"),
                "not Self-Net": (plan("fast3d-sim"), "not a Self-Net bundle"),
                "missing": (plan(tmp_path / "nowhere"), "nowhere"),
                "adapting": (
                    plan(selfnet, adaptation=AdaptationPlan(mode="adapt")),
                    "cannot adapt its weights",
                ),
            }
            for i, (what, (bad, message)) in enumerate(refusals.items()):
                with pytest.raises(DaemonError, match=message):
                    client.start(f"bad-{i}", bad)
                assert not (daemon.config.output_dir / f"bad-{i}").exists(), what
            client.start("good", plan(selfnet))  # the daemon serves on
            client.end(wait_s=30)
    finally:
        daemon.stop()
