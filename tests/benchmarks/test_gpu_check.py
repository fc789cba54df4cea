"""The GPU check (benchmarks/gpu_check.sh and gpu_check.py) without a GPU: its CPU dry run at tiny
sizes writes every section, and the shell script is valid bash. No value is asserted beyond the
correctness verdicts (CPU against CPU here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = (
    "### GPU check: machine and software",
    "### Correctness: TRL's fused LM head on the device against mallowspo's CPU head",
    "### Correctness: one MallowsPO-phi step on the device against the CPU (float32)",
    "### MallowsPO against TRL DPOTrainer (bf16 autocast)",
    "#### Reference pass throughput",
    "#### padding_free on a length-skewed batch",
    "### The phi link's small kernels",
    "### Verdict",
)


def test_cpu_dry_run_writes_every_section(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--device",
            "cpu",
            "--tiny",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MALLOWSPO_CACHE": str(tmp_path / "cache"),
            "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
        },
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = (tmp_path / "gpu_check.md").read_text()
    positions = [report.find(section) for section in SECTIONS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), list(zip(SECTIONS, positions))
    assert "Not run" not in report and "All checks passed." in report
    raw = json.loads((tmp_path / "gpu_check.json").read_text())
    assert raw["head"]["ok"] and raw["step"]["ok"] and not raw["problems"]
    assert raw["kernels"]["forward"]["calls"] == 1 and raw["kernels"]["forward"]["float64_ops"] > 0
    assert raw["kernels"]["backward"]["calls"] == 1
    systems = set(raw["bench"]["lengths"][0]["summary"])
    assert {"trl_dpo_pre", "mpo_phi_pre", "refpass"} <= systems
    layouts = raw["bench"]["padding_free"]["layouts"]
    assert layouts["padded"]["batch"]["completion_tokens"] == layouts["padding_free"]["batch"]["completion_tokens"]
    assert layouts["padding_free"]["batch"]["shape"][0] == 1  # one packed row


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_shell_script_is_valid_bash_and_runs_the_cuda_check():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "pip install --quiet -r requirements-dev.txt" in text and "--no-deps -e ." in text
    assert "benchmarks/gpu_check.py --device cuda" in text
