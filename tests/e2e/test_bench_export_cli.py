"""`livedecon export` and `livedecon bench engines` as a user runs them (tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _livedecon(*args: str | Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "livedecon"
    return subprocess.run(
        [str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "160"},  # the whole table, as on a wide terminal
    )


def test_bench_engines_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = _livedecon(
        "bench",
        "engines",
        "--models",
        "fast,3d",
        "--sizes",
        "32",
        "--stack",
        "4x16x16",
        "--backends",
        "onnxruntime,torch",
        "--repeats",
        "2",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "frames/s" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["backend"], r["model"], r["input"]) for r in rows} == {
        (b, m, i)
        for b in ("onnxruntime", "torch")
        for m, i in (("fast", "32x32"), ("3d", "4x16x16"))
    }
    assert all(r["runs"] >= 1 and 0 < r["p50_ms"] <= r["p95_ms"] for r in rows)


def test_export_reports_its_choice_and_gate_and_refuses_bad_input(tmp_path):
    result = _livedecon("export", "fast2d-sim", "--backend", "torch", "--shapes", "64x64")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "requested" in result.stdout
    assert "accuracy gate" in result.stdout
    bad = _livedecon("export", "fast2d-sim", "--shapes", "big")
    assert bad.returncode == 2
    assert "--shapes" in bad.stdout
    from livedecon.engines._backends import available_backends

    why = available_backends()["tensorrt"]
    if why:  # the usual case on CPU machines: asking for TensorRT fails with the reason
        absent = _livedecon("export", "fast2d-sim", "--backend", "tensorrt")
        assert absent.returncode == 2
        assert why in absent.stdout.replace("\n", " ")


def test_bench_quality_scores_raw_below_rl_and_says_which_view_won(tmp_path):
    out = tmp_path / "quality.json"
    result = _livedecon(
        "bench",
        "quality",
        "--structures",
        "puncta",
        "--optics",
        "tirf",
        "--peaks",
        "15",
        "--methods",
        "raw,rl",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "view" in result.stdout
    assert "dim recall" in result.stdout
    assert "iter" in result.stdout
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"raw", "rl"}
    assert rows["rl"]["psnr"] > rows["raw"]["psnr"]
    assert {r["view"] for r in rows.values()} <= {"as-is", "through"}


def test_bench_quality_refuses_an_unknown_budget(tmp_path):
    result = _livedecon("bench", "quality", "--budget", "tpu", "--out", tmp_path / "q.json")
    assert result.returncode != 0
    assert "--budget must be cpu or gpu" in result.stdout + result.stderr


def test_bench_quality_refuses_unknown_structures_and_optics(tmp_path):
    out = tmp_path / "q.json"
    for option, value, known in (
        ("--structures", "mixed,tubes", "anisotropic"),
        ("--optics", "tirf,spinning-disk", "light-sheet"),
    ):
        result = _livedecon("bench", "quality", option, value, "--out", out)
        assert result.returncode != 0
        said = result.stdout + result.stderr
        assert f"{option}: unknown {value.split(',')[1]}" in said
        assert known in said
    assert not out.exists()
