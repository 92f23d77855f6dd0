"""The quality bench's scenes and measures (the networks' own scores are in test_quality.py)."""

from __future__ import annotations

import numpy as np
import pytest

from livedecon.calibration._anisotropic import AnisotropicScene
from livedecon.calibration._quality_bench import (
    Scene,
    best_richardson_lucy,
    best_view,
    default_scenes,
    dim_recall,
    fit_to,
    plane_alternation,
    raw_estimate,
    recipe_for,
    render,
    run_bench,
    score,
    summarise,
)
from livedecon.calibration._sim_bench import sim_restorer
from livedecon.engines._training import CPU_BUDGET_MIN


@pytest.fixture(scope="module")
def rendered():
    return render(Scene(structure="mixed", optics="tirf", peak_photons=15, size_px=96, seed=5))


def test_a_scene_is_rendered_at_its_peak_signal_with_a_camera(rendered):
    assert rendered.counts.shape == (96, 96)
    assert rendered.reference.shape == (192, 192)
    signal = rendered.electrons - rendered.scene.background_e
    # the noise-free peak is 15 e-: the noisy frame's top stays within shot noise of it
    assert 10 < np.percentile(signal, 99.95) < 40
    assert len(rendered.dim_puncta) > 0
    again = render(rendered.scene)
    np.testing.assert_array_equal(again.counts, rendered.counts)  # seeded: the same frame


def test_the_grid_has_every_structure_optics_and_peak_and_a_volume():
    scenes = default_scenes()
    assert {s.structure for s in scenes} == {"sparse", "dense", "puncta", "mixed", "volume"}
    assert {s.peak_photons for s in scenes if not s.is_3d} == {5, 15, 50, 200}
    assert len({s.name for s in scenes}) == len(scenes)


def test_fitting_undoes_scale_and_offset():
    reference = np.random.default_rng(0).random((32, 32))
    np.testing.assert_allclose(fit_to(3 * reference + 7, reference), reference, atol=1e-9)


def test_the_reference_recalls_its_own_dim_puncta_and_a_blur_does_not(rendered):
    reference = rendered.reference
    assert dim_recall(reference, reference, rendered.dim_puncta) == 1.0
    flat = np.full_like(reference, reference.mean())
    flat += np.random.default_rng(1).normal(0, 0.01, flat.shape)
    assert dim_recall(flat, reference, rendered.dim_puncta) == 0.0


def test_seeing_the_estimate_through_the_reference_psf_is_never_worse(rendered):
    raw = raw_estimate(rendered)
    value, *_ = best_view(raw, rendered)
    assert value >= score("raw", raw, rendered, 0.0).psnr - 1e-9


def test_richardson_lucy_beats_raw(rendered):
    estimate, iterations = best_richardson_lucy(rendered)
    assert iterations >= 2
    assert (
        score("rl", estimate, rendered, 0).psnr
        > score("raw", raw_estimate(rendered), rendered, 0).psnr + 0.5
    )


def test_plane_alternation_measures_an_odd_even_pattern():
    smooth = np.ones((12, 4, 4)) * np.linspace(1, 2, 12)[:, None, None]
    assert plane_alternation(smooth) == pytest.approx(0, abs=1e-9)
    zigzag = smooth * (1 + 0.1 * (-1.0) ** np.arange(12))[:, None, None]
    assert plane_alternation(zigzag) == pytest.approx(0.1, rel=0.15)


def test_the_sim_rows_score_the_same_specimen_lit_by_patterns():
    """bench quality's SIM rows reconstruct the scene's own SIM acquisition (the same
    specimen, the scene's photons per raw frame) and score it against the same reference:
    at 100 photons the Wiener reconstruction beats the widefield frame and RL."""
    scene = Scene(structure="mixed", optics="tirf", peak_photons=100, size_px=128, seed=1070)
    rows = {row["method"]: row for row in run_bench([scene], ("raw", "rl", "sim-wiener"))}
    assert rows["sim-wiener"]["notes"]["angles_found"] == 3
    assert rows["sim-wiener"]["psnr"] > rows["rl"]["psnr"] > rows["raw"]["psnr"]
    with pytest.raises(ValueError, match="unknown SIM method 'sim'"):
        sim_restorer("sim")


def test_the_selfnet_rows_score_an_anisotropic_volume_axially_against_cubic():
    """bench quality's Self-Net rows: the axial view of the network's isotropic volume and of
    cubic interpolation against the isotropic truth; cubic is their baseline in the summary,
    and the isotropy ratio is reported where decorrelation measures it (bright volumes)."""
    volume = AnisotropicScene(modality="confocal", peak_photons=300, size_px=32, seed=7)
    rows = run_bench([], ("raw", "cubic", "selfnet-fast"), budget_min=0.05, volumes=[volume])
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"cubic", "selfnet-fast"}  # raw is a row of the 2D and 3D scenes
    cubic, net = by_method["cubic"], by_method["selfnet-fast"]
    assert cubic["scene"] == net["scene"] == "volume-confocal-300ph-x3"
    assert {cubic["view"], net["view"]} == {"axial"}
    assert 20 < cubic["psnr"] < 60
    assert np.isfinite(net["psnr"])
    # an anisotropic volume: coarser along z than across, so the ratio is well below 1
    assert cubic["resolution_nm"] > cubic["notes"]["lateral_nm"]
    assert 0 < cubic["notes"]["isotropy"] < 0.9
    assert net["notes"]["iterations"] >= 1
    summary = summarise(rows, max_peak=300)["selfnet-fast"]
    assert summary["baseline"] == "cubic"
    assert summary["mean_gain_db"] == pytest.approx(net["psnr"] - cubic["psnr"])
    assert summary["mean_isotropy"] == pytest.approx(net["notes"]["isotropy"])


def test_the_fast_cpu_networks_train_to_their_passes_cap_not_the_clock():
    """So a busy machine does not score a shorter training; a budget given is honoured."""
    for method in ("fast", "3d"):
        recipe = recipe_for(method, "cpu", None)
        assert recipe.max_passes is not None
        assert recipe.budget_min is None
        assert recipe_for(method, "cpu", 2.0).budget_min == 2.0
    assert recipe_for("full", "cpu", None).budget_min == CPU_BUDGET_MIN  # slower: the clock
