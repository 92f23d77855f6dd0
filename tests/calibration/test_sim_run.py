"""SIM bundles: ZS-DeconvNet-SIM and DPS trained from one raw SIM sequence
(calibration/_sim_run.py), bundled with the reconstruction they learned behind
(engines/_sim_bundle.py), served by every CPU engine alike, and refused where they do not fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_specs import TINY_2D, TINY_DPS, TINY_SIM

from livedecon.calibration._quality_bench import OPTICS, Scene
from livedecon.calibration._sim_run import train_sim_bundle
from livedecon.calibration._sim_simulator import render_sim
from livedecon.engines._backends import open_runtime
from livedecon.engines._bioimageio_package import export_bioimageio
from livedecon.engines._bundle import BundleError, ModelBundle
from livedecon.engines._dps import DpsConfig
from livedecon.engines._enums import Backend
from livedecon.engines._networks import build_network
from livedecon.engines._sim import SimSettings
from livedecon.engines._sim_bundle import check_sim_chain, sim_bundle
from livedecon.engines._sim_training import SimRecorruption, SimTrainingConfig
from livedecon.engines._training import estimate_background

SCENE = Scene(structure="dense", optics="tirf", peak_photons=100.0, size_px=64, seed=1234)
OPTIC = OPTICS["tirf"]
FEW = SimRecorruption(pairs=2)


def tiny_config(network: str) -> SimTrainingConfig | DpsConfig:
    if network == "sim":
        return SimTrainingConfig(network=TINY_SIM, recorruption=FEW, iterations=3, patch_px=32)
    # DPS leaves the PSF's reach (15 px) out of its SSIM term: patches of 48 keep 18 px
    return DpsConfig(network=TINY_DPS, sim_recorruption=FEW, iterations=3, patch_px=48)


def train(network: str, frames_e: np.ndarray, **changes) -> ModelBundle:
    args = {
        "angles": 3,
        "phases": 3,
        "read_noise_e": SCENE.read_noise_e,
        "network": network,
        "config": tiny_config(network),
        "name": f"tiny-{network}",
        "data": ["simulated: dense SIM"],
    }
    return train_sim_bundle(frames_e, OPTIC, **(args | changes))


@pytest.fixture(scope="module")
def acquisition():
    return render_sim(SCENE)


@pytest.mark.parametrize("network", ["sim", "dps"])
def test_a_sim_bundle_keeps_its_reconstruction_and_serves_alike_on_every_cpu_engine(
    tmp_path: Path, acquisition, network: str
):
    steps: list[int] = []
    bundle = train(network, acquisition.electrons, on_step=steps.append)
    assert steps == [1, 2, 3]  # progress of every step
    m = bundle.manifest
    assert m.is_sim
    assert not m.network.upsample
    assert m.input_pixel_um == pytest.approx(OPTIC.pixel_size_um / 2) == m.output_pixel_um
    assert m.camera_pixel_um == pytest.approx(OPTIC.pixel_size_um)
    assert m.sim is not None
    assert m.sim.reconstruction.wiener is not None
    assert (m.sim.na, m.sim.emission_um) == (OPTIC.na, OPTIC.emission_um)
    # SR images are photoelectrons already; the raw frames' background (2 e-/px, estimated
    # a little higher on this dense scene) is spread over the 4 SR pixels of a camera pixel
    norm = m.normalisation
    assert (norm.camera_offset_adu, norm.camera_gain_e_per_adu) == (0.0, 1.0)
    raw_background = estimate_background([acquisition.electrons.mean(axis=0)])
    assert SCENE.background_e <= raw_background < 1.5 * SCENE.background_e
    assert norm.background_e == pytest.approx(raw_background / 4, rel=0.1)
    assert m.training.config["pattern"]["modulation"][0] > 0.5  # the pattern it found

    path = bundle.save(tmp_path / m.name)
    loaded = ModelBundle.load(path)
    assert loaded.bundle_id == bundle.bundle_id
    assert loaded.manifest.sim == m.sim
    sr = np.random.default_rng(0).gamma(2.0, 5.0, (1, 64, 96)).astype(np.float32)
    outputs = {}
    for backend in (Backend.TORCH, Backend.ONNXRUNTIME):
        runtime, _ = open_runtime(loaded, path, backend, frame_shapes=[(64, 96)], max_batch=1)
        outputs[backend] = runtime.infer(sr[:, None] / norm.scale_e)
    assert outputs[Backend.TORCH].shape == (1, 1, 64, 96)  # no upsampling
    np.testing.assert_allclose(
        outputs[Backend.ONNXRUNTIME], outputs[Backend.TORCH], rtol=1e-3, atol=1e-4
    )


def test_a_dps_bundle_from_before_the_abs_output_keeps_its_softplus(tmp_path: Path, acquisition):
    bundle = train("dps", acquisition.electrons)
    assert bundle.manifest.network.output_activation == "abs"  # what training makes now
    path = bundle.save(tmp_path / bundle.manifest.name)
    manifest = json.loads((path / "model.json").read_text())
    del manifest["network"]["output_activation"]  # as bundles were written before
    (path / "model.json").write_text(json.dumps(manifest))
    old = ModelBundle.load(path)
    assert old.manifest.network.output_activation == "softplus"
    model = build_network(old.manifest.network)
    x = torch.rand(1, 1, 16, 16)
    assert torch.allclose(model.positive(x - 0.5), F.softplus(x - 0.5, beta=10))


def test_the_chain_refuses_raw_frames_the_model_did_not_learn(acquisition):
    bundle = train("sim", acquisition.electrons)
    fits = {
        "camera_pixel_um": OPTIC.pixel_size_um,
        "na": OPTIC.na,
        "emission_um": OPTIC.emission_um,
        "angles": 3,
        "phases": 3,
    }
    assert check_sim_chain(bundle, **fits) == bundle.manifest.sim.reconstruction
    for change, problem in (
        ({"camera_pixel_um": 0.1}, "camera pixel 0.1 um"),
        ({"na": 1.2}, "NA 1.2"),
        ({"emission_um": 0.67}, "emission 0.67 um"),
        ({"angles": 5, "phases": 5}, "5 angles x 5 phases"),
    ):
        with pytest.raises(ValueError, match=problem):
            check_sim_chain(bundle, **(fits | change))


def test_what_cannot_make_or_take_a_sim_bundle_is_refused(tmp_path: Path, acquisition):
    with pytest.raises(ValueError, match="a SIM sequence of 3 x 3 frames"):
        train("sim", acquisition.electrons[:8])
    dark = np.random.default_rng(1).poisson(2.0, acquisition.electrons.shape).astype(float)
    with pytest.raises(ValueError, match="no illumination pattern found"):
        train("sim", dark)
    small = tiny_config("dps").model_copy(update={"patch_px": 32})
    with pytest.raises(ValueError, match="patch_px 32 is too small for the 31-pixel PSF"):
        train("dps", acquisition.electrons, config=small)
    # a network that upsamples does not work on SR images, nor does a free Wiener constant
    bundle = train("sim", acquisition.electrons)
    m = bundle.manifest
    fits = {
        "name": "x",
        "scale_e": 1.0,
        "psf": bundle.psf,
        "reconstruction": m.sim.reconstruction,
        "camera_pixel_um": OPTIC.pixel_size_um,
        "na": OPTIC.na,
        "emission_um": OPTIC.emission_um,
        "sample_ri": 1.33,
        "read_noise_e": 1.5,
        "background_e": 0.0,
        "training": m.training,
    }
    with pytest.raises(BundleError, match="no upsampling"):
        sim_bundle(build_network(TINY_2D), **fits)
    with pytest.raises(ValueError, match="Wiener constant fixed"):
        sim_bundle(bundle.build_model(), **(fits | {"reconstruction": SimSettings()}))
    with pytest.raises(ValueError, match="is a SIM model: it restores SR images"):
        export_bioimageio(bundle, tmp_path / "sim.zip")
