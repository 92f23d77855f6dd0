from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from livedecon.calibration._forward_model import counts_to_electrons
from livedecon.engines._ome_tiff import read_ome_tiff

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _small_config(tmp_path: Path, source: str, size: int) -> Path:
    text = (CONFIGS / source).read_text()
    text = text.replace("width_px = 256", f"width_px = {size}").replace(
        "height_px = 256", f"height_px = {size}"
    )
    text = text.replace("width_px = 128", f"width_px = {size}").replace(
        "height_px = 128", f"height_px = {size}"
    )
    path = tmp_path / source
    path.write_text(text)
    return path


def _livedecon(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "livedecon"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sim")
    out = tmp / "out"
    result = _livedecon(
        "simulate",
        "--out",
        str(out),
        "--frames",
        "4",
        "--exposure-ms",
        "100",
        "--config",
        str(_small_config(tmp, "microscope_sim.toml", 64)),
        "--config-3d",
        str(_small_config(tmp, "microscope_widefield_3d.toml", 48)),
        "--sim",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_help_lists_simulate():
    result = _livedecon("--help")
    assert result.returncode == 0
    assert "simulate" in result.stdout


def test_series_shapes_dtypes_pixel_sizes(simulated):
    raw = read_ome_tiff(simulated / "sim2d_raw.ome.tif")
    truth = read_ome_tiff(simulated / "sim2d_truth.ome.tif")
    assert (raw.axes, raw.data.shape, raw.data.dtype) == ("TYX", (4, 64, 64), np.uint16)
    assert (truth.axes, truth.data.shape, truth.data.dtype) == ("TYX", (4, 128, 128), np.float32)
    assert raw.pixel_size_um == pytest.approx(0.065)
    assert truth.pixel_size_um == pytest.approx(0.0325)


def test_stack_shapes_and_z_step(simulated):
    raw = read_ome_tiff(simulated / "sim3d_raw.ome.tif")
    truth = read_ome_tiff(simulated / "sim3d_truth.ome.tif")
    manifest = json.loads((simulated / "simulation.json").read_text())["stack_3d"]
    nz = len(manifest["focus_um"])
    assert (raw.axes, raw.data.shape) == ("ZYX", (nz, 48, 48))
    assert (truth.axes, truth.data.shape) == ("ZYX", (nz, 96, 96))
    assert raw.z_step_um == truth.z_step_um == pytest.approx(0.2)
    assert raw.pixel_size_um == pytest.approx(0.0925)
    assert truth.pixel_size_um == pytest.approx(0.04625)


def test_truth_and_noisy_data_align(simulated):
    from livedecon.calibration._config import MicroscopeConfig

    manifest = json.loads((simulated / "simulation.json").read_text())["series_2d"]
    camera = MicroscopeConfig.model_validate(manifest["microscope"]).camera
    raw = read_ome_tiff(simulated / "sim2d_raw.ome.tif").data
    truth = read_ome_tiff(simulated / "sim2d_truth.ome.tif").data
    for frame, gt in zip(raw, truth, strict=True):
        signal = counts_to_electrons(frame, camera)
        binned = gt.reshape(64, 2, 64, 2).sum(axis=(1, 3))
        xcorr = np.fft.ifft2(
            np.fft.fft2(signal - signal.mean()) * np.conj(np.fft.fft2(binned - binned.mean()))
        ).real
        assert np.unravel_index(np.argmax(xcorr), xcorr.shape) == (0, 0)
    # consecutive timepoints differ: the sample moves
    assert not np.allclose(truth[0], truth[-1])


def test_the_sim_acquisition_holds_its_frames_truth_and_pattern(simulated):
    from livedecon.calibration._psf import theoretical_psf
    from livedecon.calibration._quality_bench import OPTICS
    from livedecon.engines._sim import estimate_parameters
    from livedecon.engines._sim_pattern import SimParameters

    manifest = json.loads((simulated / "simulation.json").read_text())["sim_2d"]
    raw = read_ome_tiff(simulated / manifest["raw"])
    truth = read_ome_tiff(simulated / manifest["truth"])
    assert raw.data.shape == (9, 256, 256)
    assert truth.data.shape == (512, 512)
    assert truth.pixel_size_um == pytest.approx(raw.pixel_size_um / 2)
    assert [(f["sim_angle"], f["sim_phase"]) for f in manifest["frames"]][:4] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
    ]
    # what the files say is enough to find the pattern again
    camera = manifest["camera"]
    electrons = (raw.data - camera["offset_adu"]) * camera["gain_e_per_adu"]
    fine_um = truth.pixel_size_um
    psf = theoretical_psf(OPTICS["tirf"], fine_um, 63)[0]
    found = estimate_parameters(electrons, psf, fine_um, manifest["detection_cutoff_per_um"])
    true = SimParameters.model_validate(manifest["pattern"])
    assert np.allclose(found.periods_um(), true.periods_um(), rtol=0.005)


def test_config_error_is_one_clear_message(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optics]\nna = 9\n")
    result = _livedecon("simulate", "--out", str(tmp_path / "o"), "--config", str(bad))
    assert result.returncode == 2
    assert "bad.toml" in result.stdout
    assert "optics.na" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_restore_sim_reconstructs_the_simulated_sim_acquisition(simulated, tmp_path):
    """`livedecon restore sim RAW OUT --microscope`: the daemon's reconstruction, offline,
    sharper than widefield against the truth; a file that is no whole sequence is refused."""
    from livedecon.calibration._metrics import decorrelation_resolution
    from livedecon.configs import shipped_config_path

    manifest = json.loads((simulated / "simulation.json").read_text())["sim_2d"]
    raw = simulated / manifest["raw"]
    scope = shipped_config_path("microscope_tirf_149.toml")
    out = tmp_path / "sr.ome.tif"
    result = _livedecon("restore", "sim", str(raw), str(out), "--microscope", str(scope))
    assert result.returncode == 0, result.stdout + result.stderr
    sr = read_ome_tiff(out)
    frames = read_ome_tiff(raw)
    assert (sr.axes, sr.data.shape) == ("YX", (512, 512))
    assert sr.pixel_size_um == pytest.approx(frames.pixel_size_um / 2)
    widefield = frames.data.astype(np.float32).mean(axis=0)
    finer = decorrelation_resolution(sr.data, sr.pixel_size_um)
    coarse = decorrelation_resolution(widefield, frames.pixel_size_um)
    assert finer < 0.7 * coarse, (finer, coarse)

    eight = tmp_path / "eight.tif"  # a plain TIFF: the pixel size from the microscope
    tifffile.imwrite(eight, frames.data[:8])
    result = _livedecon(
        "restore", "sim", str(eight), str(tmp_path / "x.tif"), "--microscope", str(scope)
    )
    assert result.returncode != 0
    assert "8 frames is not a whole number of sequences of 9" in " ".join(result.stdout.split())


TINY_SIM_TRAINING = """
iterations = 2
patch_px = 32
[network]
kind = "zs-deconvnet-2d-fast"
unet = { levels = 2, convs_per_block = 1, base_width = 4 }
tail_width = 8
upsample = false
[recorruption]
pairs = 2
"""


def test_train_a_sim_model_and_restore_raw_sim_frames_through_it(simulated, tmp_path):
    """`livedecon train --network sim` on the simulated SIM file, then `restore sim --then`:
    one SR image per sequence, restored by the model behind its own reconstruction; the
    model alone restores SR images; what cannot work is refused with the reason."""
    from livedecon.configs import shipped_config_path

    manifest = json.loads((simulated / "simulation.json").read_text())["sim_2d"]
    raw = simulated / manifest["raw"]
    scope = str(shipped_config_path("microscope_tirf_149.toml"))
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_SIM_TRAINING)
    model = tmp_path / "zs-sim"
    args = ("--network", "sim", "--microscope", scope, "--config", str(config))
    result = _livedecon("train", str(model), str(raw), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    said = " ".join(result.stdout.split())
    assert "training sim on the first" in said
    assert "2 iterations" in said
    bundle = json.loads((model / "model.json").read_text())
    assert bundle["sim"]["reconstruction"]["wiener"] > 0

    chained = tmp_path / "chained.ome.tif"
    restore = ("restore", "sim", str(raw), str(chained), "--microscope", scope)
    result = _livedecon(*restore, "--then", str(model))
    assert result.returncode == 0, result.stdout + result.stderr
    sr = read_ome_tiff(chained)
    assert (sr.axes, sr.data.shape) == ("YX", (512, 512))
    assert np.isfinite(sr.data).all()
    wiener = tmp_path / "wiener.ome.tif"
    assert (
        _livedecon("restore", "sim", str(raw), str(wiener), "--microscope", scope).returncode == 0
    )
    alone = tmp_path / "alone.ome.tif"
    result = _livedecon("restore", str(model), str(wiener), str(alone))
    assert result.returncode == 0, result.stdout + result.stderr
    assert read_ome_tiff(alone).data.shape == (512, 512)
    assert read_ome_tiff(alone).pixel_size_um == pytest.approx(sr.pixel_size_um)

    result = _livedecon(*restore, "--then", "fast2d-sim")
    assert result.returncode != 0
    assert "is not a SIM model" in " ".join(result.stdout.split())
    result = _livedecon("train", str(tmp_path / "x"), str(raw), "--network", "dps")
    assert result.returncode != 0
    assert "SIM needs --microscope" in " ".join(result.stdout.split())
