"""`livedecon demo`, the main job, as a user runs it: a fresh process, headless."""

from __future__ import annotations

import json
import subprocess

from livedecon.daemon._launcher import LIVEDECON


def run_demo(out, *options: str) -> dict:
    """`livedecon demo` in a fresh process, headless; its summary."""
    result = subprocess.run(
        [*LIVEDECON, "demo", "--out", str(out), "--headless", *options],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PSNR restored" in result.stdout
    return json.loads((out / "demo_summary.json").read_text())


def test_demo_restores_every_frame_and_beats_raw_against_ground_truth(tmp_path):
    summary = run_demo(tmp_path / "demo", "--frames", "6", "--interval-s", "0.2")
    assert summary["frames"] == 6
    assert summary["stream"]["missed"] == 0
    assert summary["daemon"]["written"] == 6
    assert summary["latency_ms"]["count"] >= 1
    assert summary["psnr_restored_db"] > summary["psnr_raw_db"] + 0.3


def test_demo_3d_streams_z_stacks_through_the_3d_model(tmp_path):
    summary = run_demo(
        tmp_path / "demo3d", "--3d", "--frames", "2", "--z-planes", "5", "--interval-s", "0.5"
    )
    assert summary["bundle_id"].startswith("fast3d-sim@")
    assert summary["frames"] == summary["daemon"]["written"] == 10  # 2 stacks of 5 planes
    assert summary["latency_ms"]["count"] == 2  # one projection per stack


def test_demo_sim_reconstructs_every_pattern_sequence_live(tmp_path):
    """`livedecon demo --sim`: pycromanager steps the SIM presets, the daemon reconstructs
    each sequence of 9 frames into one SR image, sharper than the widefield image against
    the truth (fitted PSNR, as bench sim scores)."""
    summary = run_demo(tmp_path / "demosim", "--sim", "--frames", "2", "--interval-s", "0.2")
    assert summary["frames"] == 18  # 2 sequences of 3 angles x 3 phases
    assert summary["stream"]["missed"] == 0
    assert summary["daemon"]["written"] == 2  # one SR image per sequence
    assert summary["bundle_id"] == "sim-wiener"
    assert summary["latency_ms"]["count"] == 2
    assert summary["psnr_restored_db"] > summary["psnr_raw_db"] + 1.0
    assert "SIM" in summary["extra"]["scoring"]
