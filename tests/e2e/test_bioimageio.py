"""bioimage.io model packages (`livedecon export --bioimageio`): the exported shipped bundle
passes bioimageio.core's own test, describes the normalisation and the 2x grid, and
`livedecon restore` with the package gives what the bundle gives."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from cli_harness import run_livedecon

from livedecon.engines._bundle import ModelBundle, TrainingRecord, shipped_bundle_path

pytest.importorskip("bioimageio.core", reason="needs the bioimageio extra")


@pytest.fixture(scope="module")
def package_2d(tmp_path_factory) -> Path:
    """The shipped 2D bundle exported as a user does."""
    out = tmp_path_factory.mktemp("bioimageio") / "fast2d-sim.zip"
    result = run_livedecon(
        "export", "fast2d-sim", "--bioimageio", out, "--author", "Test Author", columns=200
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wrote bioimage.io package" in result.stdout
    return out


def _rdf(package: Path) -> dict:
    with zipfile.ZipFile(package) as archive:
        return yaml.safe_load(archive.read("rdf.yaml"))


def _test_passes(package: Path) -> None:
    from bioimageio.core import test_model

    summary = test_model(package)
    failed = [d for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", "\n".join(
        f"{d.name}: {[e.msg for e in d.errors]}" for d in failed
    )


def test_exported_shipped_2d_bundle_passes_bioimageio_test(package_2d):
    """bioimageio.core runs both weight formats with the described pre- and post-processing
    and reproduces the test outputs (livedecon's own torch float32 result), then infers at
    the parameterised sizes."""
    _test_passes(package_2d)


def test_package_describes_normalisation_grid_and_provenance(package_2d):
    rdf = _rdf(package_2d)
    norm = ModelBundle.load(shipped_bundle_path("fast2d-sim")).manifest.normalisation
    assert rdf["format_version"].startswith("0.5")
    assert set(rdf["weights"]) == {"onnx", "torchscript"}
    assert rdf["cite"][0]["doi"] == "10.1038/s41467-024-48575-9"
    (raw,) = rdf["inputs"]
    linear = next(p for p in raw["preprocessing"] if p["id"] == "scale_linear")["kwargs"]
    counts = np.array([100.0, 146.0, 1000.0])
    np.testing.assert_allclose(
        counts * linear["gain"] + linear["offset"], norm.electrons(counts) / norm.scale_e
    )
    outputs = {t["id"]: t for t in rdf["outputs"]}
    assert set(outputs) == {"denoised", "deconvolved"}
    scale = {a["id"]: a.get("scale") for a in raw["axes"] if a["type"] == "space"}
    out_scale = {a["id"]: a.get("scale") for a in outputs["deconvolved"]["axes"] if "id" in a}
    assert scale["x"] == 65.0  # nanometres
    assert out_scale["x"] == 32.5  # the 2x grid
    post = outputs["deconvolved"]["postprocessing"][0]["kwargs"]
    assert post["gain"] == pytest.approx(norm.scale_e / 4)  # photoelectrons per output pixel
    with zipfile.ZipFile(package_2d) as archive:
        names = set(archive.namelist())
        readme = archive.read("README.md").decode()
        assert archive.read("cover.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"model.json", "weights.safetensors", "psf.tif", "test_input.npy"} <= names
    assert "NA 1.4" in readme  # the PSF
    assert "simulated: microscope" in readme  # the training data
    assert "## Validation" in readme


def _restore(*args: str | Path):
    """`livedecon restore` in this process (the subprocess start-up is paid by the export)."""
    from typer.testing import CliRunner

    from livedecon.cli import app

    return CliRunner().invoke(app, ["restore", *map(str, args)], env={"COLUMNS": "200"})


def test_restore_with_the_package_matches_the_bundle(package_2d, tmp_path):
    rng = np.random.default_rng(3)
    raw = (100 + rng.poisson(30, (2, 72, 88))).astype(np.uint16)  # not a multiple of 8
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    outputs = {}
    for label, model in (("bundle", "fast2d-sim"), ("package", package_2d)):
        out = tmp_path / f"{label}.ome.tif"
        result = _restore(model, tmp_path / "raw.tif", out)
        assert result.exit_code == 0, result.output
        outputs[label] = tifffile.imread(out)
    assert outputs["package"].shape == (2, 144, 176)
    np.testing.assert_allclose(outputs["package"], outputs["bundle"], rtol=1e-5, atol=1e-5)


def test_restore_refuses_a_package_without_a_livedecon_bundle(package_2d, tmp_path):
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(package_2d) as src, zipfile.ZipFile(foreign, "w") as dst:
        for name in src.namelist():
            if name not in ("model.json", "weights.safetensors", "psf.tif"):
                dst.writestr(name, src.read(name))
    tifffile.imwrite(tmp_path / "raw.tif", np.full((32, 32), 120, np.uint16))
    result = _restore(foreign, tmp_path / "raw.tif", tmp_path / "o.tif")
    assert result.exit_code != 0
    assert "without a livedecon bundle attached" in " ".join(result.output.split())


def test_selfnet_bundles_are_refused_clearly(tmp_path):
    from livedecon.engines._bioimageio_package import export_bioimageio
    from livedecon.engines._selfnet import SelfNetRestorer, SelfNetSpec
    from livedecon.engines._selfnet_bundle import selfnet_bundle, volume_normalisation

    volume = np.random.default_rng(0).uniform(1, 10, (8, 32, 32)).astype(np.float32)
    bundle = selfnet_bundle(
        SelfNetRestorer(SelfNetSpec(width=4, blocks=0)),
        name="sn",
        pixel_um=0.1,
        z_step_um=0.4,
        normalisation=volume_normalisation(volume),
        training=TrainingRecord.now(data=["test"], config={}, iterations=0),
    )
    with pytest.raises(ValueError, match="Self-Net"):
        export_bioimageio(bundle, tmp_path / "sn.zip")
    assert not (tmp_path / "sn.zip").exists()


def test_a_3d_bundle_serving_its_denoised_stack_packages_its_deconvolution_stage():
    """The package holds the network alone (RL after it is livedecon's), as in 2D."""
    shipped = ModelBundle.load(shipped_bundle_path("fast3d-sim"))
    alone = shipped.network_alone()
    assert shipped.manifest.serves_denoised
    assert not alone.manifest.serves_denoised
    assert alone.manifest.refine_iterations == 0
    assert alone.manifest.weights_sha256 == shipped.manifest.weights_sha256
    stack = np.random.default_rng(0).random((1, 1, 4, 16, 16), dtype=np.float32)
    with torch.no_grad():
        served = shipped.build_model()(torch.from_numpy(stack))[1]
        packaged = alone.build_model()(torch.from_numpy(stack))[1]
        deconvolved = shipped.build_model().train()(torch.from_numpy(stack))[1]
    torch.testing.assert_close(packaged, deconvolved)
    assert not torch.allclose(packaged, served)


@pytest.mark.slow
def test_exported_shipped_3d_bundle_passes_bioimageio_test(tmp_path):
    from livedecon.engines._bioimageio_package import export_bioimageio

    bundle = ModelBundle.load(shipped_bundle_path("fast3d-sim"))
    report = export_bioimageio(bundle, tmp_path / "fast3d-sim.zip")
    assert report.test_input_shape == (1, 1, 8, 32, 32)
    _test_passes(report.path)
    rdf = _rdf(report.path)
    z = next(a for a in rdf["inputs"][0]["axes"] if a.get("id") == "z")
    assert z["scale"] == 200.0
    assert json.loads(json.dumps(rdf["config"]["livedecon"]))["bundle_id"] == bundle.bundle_id
