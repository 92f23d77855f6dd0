"""`livedecon calibrate` end to end: live on the simulated microscope through pycromanager,
then the calibration bundle served by a real daemon; and a run from the saved files."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from daemon_harness import start_daemon

from livedecon.calibration._calibration_bundle import CalibrationBundle
from livedecon.calibration._config import default_microscope
from livedecon.calibration._forward_model import ForwardModel
from livedecon.daemon._launcher import LIVEDECON
from livedecon.daemon._protocol import Axes, Plan
from livedecon.daemon._writer import output_path, read_planes

GAIN, READ_NOISE = 0.8, 2.0  # the simulated camera's truth, away from the default guesses


def _scope():
    scope = default_microscope()
    camera = scope.camera.model_copy(
        update={
            "width_px": 192,
            "height_px": 192,
            "gain_e_per_adu": GAIN,
            "read_noise_e": READ_NOISE,
            "offset_spread_adu": 2.0,
            "hot_pixel_fraction": 0.002,
            "hot_pixel_e_per_s": 2000.0,
        }
    )
    return scope.model_copy(update={"name": "calibration-test", "camera": camera})


SETTINGS = {
    "name": "first-model",
    "backend": "onnxruntime",
    "capture": {
        "darks": 16,
        "flat_exposures_ms": [2.0, 5.0, 10.0, 20.0, 40.0],
        "flats_per_level": 8,
        "bead_planes": 21,
        "bead_z_step_um": 0.15,
        "sample_frames": 2,
    },
    "training": {
        "iterations": 20,
        "patch_px": 32,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "network": {
            "kind": "zs-deconvnet-2d-fast",
            "tail_width": 8,
            "unet": {"levels": 2, "convs_per_block": 1, "base_width": 4},
        },
    },
}


@pytest.fixture(scope="module")
def live_run(tmp_path_factory) -> tuple[Path, str]:
    """One live calibration run in a fresh process, as a user runs it."""
    work = tmp_path_factory.mktemp("calibrate")
    scope_path, settings_path = work / "scope.toml", work / "settings.toml"
    scope_path.write_text(tomli_w.dumps(_scope().model_dump(mode="json", exclude_none=True)))
    settings_path.write_text(tomli_w.dumps(SETTINGS))
    out = work / "bundle"
    command = [
        *LIVEDECON, "calibrate", str(out), "--live",
        "--simulated", "--microscope", str(scope_path), "--config", str(settings_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


def test_live_calibration_recovers_the_camera_and_writes_bundle_and_report(live_run):
    out, stdout = live_run
    bundle = CalibrationBundle.load(out)
    camera = bundle.record.microscope.camera
    assert camera.gain_e_per_adu == pytest.approx(GAIN, rel=0.05)
    assert camera.read_noise_e == pytest.approx(READ_NOISE, rel=0.1)
    assert camera.offset_adu == pytest.approx(100.0, abs=1.0)
    assert bundle.camera.hot_pixels.sum() > 0
    # the PSF from the simulated beads is the model's, beside the theory
    psf = bundle.record.psf
    assert psf is not None
    assert psf.source == "measured"
    assert psf.beads_used >= 3
    assert psf.fwhm_um["x"] == pytest.approx(psf.theory_fwhm_um["x"], rel=0.15)
    assert (out / psf.measured_file).is_file()
    # the raw data is kept, and a run from those files is possible
    raw = sorted(p.name for p in (out / "raw").iterdir())
    assert raw[:2] == ["beads.ome.tif", "darks.tif"]
    assert len(raw) == 2 + 5 + 2
    # the report's plots exist and the page shows the measured values
    page = (out / "report.html").read_text()
    for plot in ("ptc.png", "camera_maps.png", "psf.png", "restoration.png"):
        assert (out / "report" / plot).stat().st_size > 10_000, plot
        assert f"report/{plot}" in page
    assert f"{camera.gain_e_per_adu:.4g} e-/ADU" in page
    assert f"{psf.fwhm_um['x']:.3f} um" in page
    assert re.search(r"first model \w+", stdout)


def test_the_daemon_serves_a_calibration_bundle_with_its_corrections(live_run, tmp_path):
    out, _ = live_run
    bundle = CalibrationBundle.load(out)
    scope = _scope().model_copy(update={"sample": default_microscope().sample})
    frames = [ForwardModel(scope, noise_seed=5).acquire(t, 0.0, 20.0).counts for t in (0, 5)]
    daemon = start_daemon(tmp_path, bundle=str(out))
    try:
        with daemon.client() as client:
            assert "offset/gain" in client.status()["model"]["correction"]
            client.start("calibrated", Plan(pixel_size_um=scope.optics.pixel_size_um))
            for i, frame in enumerate(frames):
                client.send(frame, Axes(time=i))
            client.flush()
            state = client.end(wait_s=60)
    finally:
        assert daemon.stop() == 0
    assert state["written"] == 2
    planes = read_planes(output_path(daemon.config.output_dir / "calibrated", 0, 0))
    assert [r.bundle_id for r, _ in planes] == [bundle.record.model.bundle_id] * 2
    # the served output is the model on the corrected frame (hot pixels gone)
    from livedecon.daemon._processing import open_processor

    local = open_processor(out, "onnxruntime", frame_shapes=((192, 192),))
    for (_, plane), frame in zip(planes, frames, strict=True):
        expected = local.process([frame])[0]
        assert np.abs(plane - expected).max() <= 1e-3 * np.abs(expected).max()
        uncorrected = local.bundle.manifest.normalisation.electrons(frame)
        assert not np.allclose(local.electrons(frame), uncorrected)


def test_a_calibration_runs_again_from_its_saved_raw_files(live_run, tmp_path):
    out, _ = live_run
    raw = out / "raw"
    command = [
        *LIVEDECON, "calibrate", str(tmp_path / "again"),
        "--microscope", str(out.parent / "scope.toml"), "--darks", str(raw / "darks.tif"),
        *[a for i in range(5) for a in ("--flat", str(raw / f"flat_{i:02d}.tif"))],
        "--beads", str(raw / "beads.ome.tif"), "--psf", "measured",
        "--config", str(out.parent / "settings.toml"), "--iterations", "2",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    again = CalibrationBundle.load(tmp_path / "again")
    first = CalibrationBundle.load(out)
    # the same raw data gives the same camera; no sample frames: no model, and it says so
    assert again.record.microscope.camera == first.record.microscope.camera
    assert again.record.model is None
    assert "no model" in (tmp_path / "again" / "report.html").read_text()


def test_calibrate_refuses_missing_inputs_with_a_sentence(tmp_path):
    command = [*LIVEDECON, "calibrate", str(tmp_path / "x")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--darks" in result.stdout
