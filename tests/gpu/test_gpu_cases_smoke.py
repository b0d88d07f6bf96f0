"""The device script runs end to end at tiny sizes on the CPU and writes its JSON to $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_cases_smoke_runs_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_cases.py"), "--quick", "--device", "cpu",
         "--budget-s", "3000",
         "--workdir", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "gpu_cases.json").read_text())
    assert results["smoke"] is True
    assert results["environment"]["device"] == "cpu"
    assert set(results["cases"]) == {"rsa", "lesion", "extract", "dissect", "rsa_stage"}
    for name, case in results["cases"].items():
        assert "error" not in case, (name, case)
        if name != "rsa_stage":  # timings only; its numerics are checked in the rsa case
            assert case["check"]["passed"], (name, case["check"])
    assert results["cases"]["rsa"]["seconds"] > 0
    assert results["cases"]["extract"]["e2e_device_decode"]["images_per_s"] > 0
    assert results["cases"]["dissect"]["images_per_s"] > 0
    extract = results["cases"]["extract"]
    for label in ("e2e_pillow", "e2e_device_decode_cache_fill", "e2e_from_cache"):
        assert extract[label]["images_per_s"] > 0, label
    for label in ("profile_device_decode", "profile_pillow", "profile_from_cache"):
        profile = extract[label]["profile"]
        assert profile["images"] == extract[label]["images"], label
        assert all(profile[f"{stage}_s"] > 0 for stage in ("decode", "forward", "write")), label
    assert extract["profile_device_decode"]["profile"]["read_s"] > 0  # the reading threads
    assert results["cases"]["dissect"]["profile"]["images"] > 0
    assert results["cases"]["rsa_stage"]["contrast_seconds"] > 0
    assert results["skipped"] == []


def test_gpu_cases_budget_guard_skips_work(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_cases.py"), "--smoke", "--device", "cpu",
         "--budget-s", "0", "--json", str(tmp_path / "r.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["cases"] == {}
    assert len(results["skipped"]) == 5
