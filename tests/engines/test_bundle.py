from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import tifffile
import torch

from livedecon.engines import _bundle as bundle_module
from livedecon.engines._bundle import (
    BUNDLE_FORMAT,
    BundleError,
    ModelBundle,
    Normalisation,
    PSFRecord,
    TrainingRecord,
    shipped_bundle_path,
    weights_sha256,
)
from livedecon.engines._networks import Network2DSpec, Network3DSpec, UNetSpec, build_network

SPEC_2D = Network2DSpec(unet=UNetSpec(levels=2, convs_per_block=1, base_width=4), tail_width=8)
SPEC_3D = Network3DSpec(width=8, residual_groups=1, blocks_per_group=1, attention_reduction=4)


def gaussian_psf(shape: tuple[int, ...]) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")
    psf = np.exp(-sum(g.astype(np.float64) ** 2 for g in grids) / 4)
    return (psf / psf.sum()).astype(np.float32)


def make_bundle(
    dims: int = 2, name: str = "tiny", model: torch.nn.Module | None = None
) -> ModelBundle:
    torch.manual_seed(dims)
    spec = SPEC_3D if dims == 3 else SPEC_2D
    z_step = 0.3 if dims == 3 else None
    return ModelBundle.from_model(
        model or build_network(spec),
        name=name,
        input_pixel_um=0.1,
        z_step_um=z_step,
        normalisation=Normalisation(
            scale_e=250.0, camera_offset_adu=100.0, camera_gain_e_per_adu=0.5, read_noise_e=1.6
        ),
        psf=gaussian_psf((5, 7, 7) if dims == 3 else (9, 9)),
        psf_record=PSFRecord(
            source="theoretical", description="NA 1.4, 520 nm", pixel_size_um=0.05, z_step_um=z_step
        ),
        training=TrainingRecord.now(
            data=["simulated: 3 filaments"], config={"iterations": 3}, iterations=3, final_loss=0.5
        ),
    )


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return make_bundle().save(tmp_path / "tiny")


@pytest.mark.parametrize(("dims", "shape"), [(2, (1, 1, 16, 16)), (3, (1, 1, 4, 8, 8))])
def test_round_trip_is_bit_exact(tmp_path: Path, dims: int, shape: tuple[int, ...]) -> None:
    original = make_bundle(dims)
    directory = original.save(tmp_path / "tiny")
    loaded = ModelBundle.load(directory)

    assert loaded.manifest == original.manifest
    assert loaded.bundle_id == original.bundle_id == f"tiny@{original.manifest.weights_sha256[:12]}"
    assert loaded.state_dict.keys() == original.state_dict.keys()
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in original.state_dict.items())
    assert np.array_equal(loaded.psf, original.psf)
    assert loaded.psf.dtype == np.float32
    assert sorted(p.name for p in directory.iterdir()) == [
        "cache",
        "model.json",
        "psf.tif",
        "weights.safetensors",
    ]
    assert not any((directory / "cache").iterdir())
    assert (directory / "model.json").read_text().startswith('{\n  "format": 1,')
    with tifffile.TiffFile(directory / "psf.tif") as tif:
        assert 'PhysicalSizeX="0.05"' in tif.ome_metadata

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = original.build_model()(x), loaded.build_model()(x)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_saved_files_are_readable_by_everyone(saved: Path) -> None:
    # A shipped or shared bundle is read by other users and by the daemon's service account.
    for name in ("model.json", "weights.safetensors", "psf.tif"):
        assert (saved / name).stat().st_mode & 0o044 == 0o044, name


def test_bundle_does_not_follow_the_live_model() -> None:
    # Training or adaptation may go on after bundling; the bundle must keep what it hashed.
    model = build_network(SPEC_2D)
    bundle = make_bundle(model=model)
    with torch.no_grad():
        next(model.parameters()).add_(1)
    assert bundle.manifest.weights_sha256 == weights_sha256(bundle.state_dict)


def test_existing_target_needs_overwrite(tmp_path: Path, saved: Path) -> None:
    newer = ModelBundle.load(saved).with_weights(build_network(SPEC_2D).state_dict())
    with pytest.raises(BundleError, match="already exists"):
        newer.save(saved)
    assert ModelBundle.load(saved).manifest.weights_version == 1
    newer.save(saved, overwrite=True)
    assert ModelBundle.load(saved).bundle_id == newer.bundle_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging left over

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "image.tif").write_bytes(b"precious")
    with pytest.raises(BundleError, match="not a bundle"):
        newer.save(tmp_path / "data", overwrite=True)
    assert (tmp_path / "data" / "image.tif").exists()


def _edit_manifest(**changes: object) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / "model.json"
        data = json.loads(path.read_text())
        for dotted, value in changes.items():
            *parents, key = dotted.split("__")
            target = data
            for part in parents:
                target = target[part]
            target[key] = value
        path.write_text(json.dumps(data))

    return edit


def _flip_last_weights_byte(directory: Path) -> None:
    path = directory / "weights.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def _other_architecture(directory: Path) -> None:
    # Correctly hashed weights, but of a wider network than model.json describes.
    other = build_network(SPEC_2D.model_copy(update={"tail_width": 16})).state_dict()
    safetensors.torch.save_file(other, directory / "weights.safetensors")
    _edit_manifest(weights_sha256=weights_sha256(other))(directory)


def _write_psf(psf: np.ndarray) -> Callable[[Path], None]:
    return lambda directory: tifffile.imwrite(directory / "psf.tif", psf.astype(np.float32))


NAN_PSF = gaussian_psf((9, 9))
NAN_PSF[0, 0] = np.nan


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (shutil.rmtree, "bundle directory not found"),
        (lambda d: (d / "model.json").unlink(), "missing model.json"),
        (lambda d: (d / "weights.safetensors").unlink(), "missing weights.safetensors"),
        (lambda d: (d / "psf.tif").unlink(), "missing psf.tif"),
        (lambda d: (d / "model.json").write_text('{"format": 1,'), "not valid JSON"),
        (_edit_manifest(format=BUNDLE_FORMAT + 1), "format 2 is not supported"),
        (_edit_manifest(normalisation__scale_e=-1), "normalisation.scale_e"),
        (_edit_manifest(unknown=1), "unknown: Extra inputs"),
        (_edit_manifest(output_pixel_um=0.1), "output_pixel_um 0.1 must be"),
        (_flip_last_weights_byte, "weights corrupted or edited"),
        (lambda d: (d / "weights.safetensors").write_bytes(b"junk"), "cannot read weights"),
        (_other_architecture, r"do not fit the zs-deconvnet-2d architecture.*shape: tail"),
        (_write_psf(NAN_PSF), "NaN"),
        (_write_psf(gaussian_psf((8, 8))), "must be odd"),
        (_write_psf(2 * gaussian_psf((9, 9))), "sums to 2"),
        (_write_psf(gaussian_psf((5, 9, 9))), "PSF has 3 dimensions"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_load_errors_name_directory_and_problem(
    saved: Path, damage: Callable[[Path], None], message: str
) -> None:
    damage(saved)
    with pytest.raises(BundleError, match=message) as caught:
        ModelBundle.load(saved)
    assert str(caught.value).startswith(str(saved))


def test_with_weights_bumps_version_and_records_parent() -> None:
    original = make_bundle()
    record = TrainingRecord.now(data=["frame 7"], config={}, iterations=20)
    tuned = original.with_weights(build_network(SPEC_2D).state_dict(), record)
    assert tuned.manifest.weights_version == 2
    assert tuned.bundle_id != original.bundle_id
    assert tuned.manifest.training.parent == original.bundle_id
    assert original.manifest.weights_version == 1
    assert tuned.with_weights(tuned.state_dict).manifest.weights_version == 3
    with pytest.raises(BundleError, match="do not fit"):
        original.with_weights(build_network(SPEC_3D).state_dict())


def test_inconsistent_manifest_is_refused() -> None:
    good = make_bundle()
    with pytest.raises(BundleError, match=r"psf\.pixel_size_um 0\.1 must equal"):
        ModelBundle.from_model(
            build_network(SPEC_2D),
            name="tiny",
            input_pixel_um=0.1,
            normalisation=good.manifest.normalisation,
            psf=good.psf,
            psf_record=good.manifest.psf.model_copy(update={"pixel_size_um": 0.1}),
            training=good.manifest.training,
        )
    with pytest.raises(BundleError, match="name"):
        ModelBundle.from_model(
            build_network(SPEC_2D),
            name="../escape",
            input_pixel_um=0.1,
            normalisation=good.manifest.normalisation,
            psf=good.psf,
            psf_record=good.manifest.psf,
            training=good.manifest.training,
        )


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_save_leaves_no_half_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    target = tmp_path / "tiny"
    if overwrite:
        make_bundle().save(target)
    before = ModelBundle.load(target).bundle_id if overwrite else None

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module.safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        make_bundle(name="tiny").with_weights(build_network(SPEC_2D).state_dict()).save(
            target, overwrite=True
        )
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == (["tiny"] if overwrite else [])
    if overwrite:
        assert ModelBundle.load(target).bundle_id == before


def test_training_record_now_stamps_versions() -> None:
    record = TrainingRecord.now(data=["x"], config=SPEC_2D, iterations=1)
    assert record.torch_version == torch.__version__
    assert record.created_utc.endswith("+00:00")
    assert record.config["kind"] == "zs-deconvnet-2d"


def test_weights_hash_ignores_order_and_sees_every_value() -> None:
    state = make_bundle().state_dict
    reordered = dict(reversed(state.items()))
    assert weights_sha256(reordered) == weights_sha256(state)
    changed = {k: v.clone() for k, v in state.items()}
    next(iter(changed.values())).view(-1)[0] += 1e-6
    assert weights_sha256(changed) != weights_sha256(state)


def test_shipped_bundle_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle_module, "_shipped_root", lambda: tmp_path)
    make_bundle(name="fast-2d").save(tmp_path / "fast-2d")
    assert shipped_bundle_path("fast-2d") == tmp_path / "fast-2d"
    assert ModelBundle.load(shipped_bundle_path("fast-2d")).manifest.name == "fast-2d"
    with pytest.raises(BundleError, match="no shipped bundle named 'nope'; available: fast-2d"):
        shipped_bundle_path("nope")


def test_a_bundle_is_on_disk_whole_before_it_takes_its_name(tmp_path, monkeypatch):
    seen = []

    def record(staging):
        seen.append(({p.name for p in staging.iterdir()}, (tmp_path / "b").exists()))

    monkeypatch.setattr(bundle_module, "fsync_tree", record)
    make_bundle().save(tmp_path / "b")
    ((staged, target_existed),) = seen
    assert {"model.json", "weights.safetensors"} <= staged
    assert not target_existed
