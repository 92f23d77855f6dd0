"""`livedecon demo`, the main job, as a user runs it: a fresh process, headless."""

from __future__ import annotations

import json
import subprocess
import sys

SERVE = "from livedecon.daemon.cli import app; app()"


def test_demo_restores_every_frame_and_beats_raw_against_ground_truth(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SERVE,
            "demo",
            "--out",
            str(out),
            "--frames",
            "6",
            "--interval-s",
            "0.2",
            "--headless",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PSNR restored" in result.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["frames"] == 6
    assert summary["stream"]["missed"] == 0
    assert summary["daemon"]["written"] == 6
    assert summary["latency_ms"]["count"] >= 1
    assert summary["psnr_restored_db"] > summary["psnr_raw_db"] + 0.3


def test_demo_3d_streams_z_stacks_through_the_3d_model(tmp_path):
    out = tmp_path / "demo3d"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SERVE,
            "demo",
            "--3d",
            "--out",
            str(out),
            "--frames",
            "2",
            "--z-planes",
            "5",
            "--interval-s",
            "0.5",
            "--headless",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["bundle_id"].startswith("fast3d-sim@")
    assert summary["frames"] == summary["daemon"]["written"] == 10  # 2 stacks of 5 planes
    assert summary["latency_ms"]["count"] == 2  # one projection per stack
