"""The benchmark harness (benchmarks/run.py) runs end to end at tiny sizes.

It only checks that the report is complete: every system measured, every ratio and
target present. No timing is asserted (smoke numbers are meaningless).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("mallowspo_benchmarks_run", ROOT / "benchmarks" / "run.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_smoke_run_writes_every_system_and_ratio(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--smoke",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = out.read_text()
    raw = json.loads(out.with_suffix(".json").read_text())

    # Every system of the main table was measured, without error, on the same batch shape.
    assert set(raw["main"]) == set(bench.MAIN_SYSTEMS)
    shapes = set()
    for system, info in raw["main"].items():
        assert not info["errors"], (system, info["errors"])
        if system == "refpass":
            assert info["with_entropy_pairs_per_s"] > 0 and info["without_entropy_pairs_per_s"] > 0
            assert info["logps_match"]
        else:
            assert info["n_steps"] == raw["meta"]["settings"]["steps"]
            assert info["median_step_s"] > 0 and info["peak_mib"] > 0
            shapes.add((tuple(info["batch"]["shape"]), info["batch"]["completion_tokens"]))
        assert bench.LABELS.get(system, "Reference pass") in report or system == "refpass"
    assert len(shapes) == 1 and not raw["meta"]["shape_problems"]

    # Every target has a value and a verdict, and appears in the report.
    assert len(raw["targets"]) == 20
    for row in raw["targets"]:
        assert row["value"] is not None and row["verdict"] in ("PASS", "FAIL"), row
        assert row["what"] in report
    assert "| check | value | target | result |" in report

    # The scaling table has a row per grid point, each with every reduced-set system.
    preset = bench.PRESETS["smoke"]
    points = {(v, preset["workload"].response_len) for v in preset["vocab_grid"]}
    points |= {(preset["workload"].vocab_size, n) for n in preset["length_grid"]}
    assert {(r["vocab_size"], r["response_len"]) for r in raw["scaling"]} == points
    for row in raw["scaling"]:
        assert set(row["summary"]) == set(bench.SCALING_SYSTEMS), row["vocab_size"]
        assert all(not info["errors"] for info in row["summary"].values())
    assert "## Scaling" in report

    # The header names the machine, the date and the versions.
    for needle in ("CPU:", "RAM", "torch ", "transformers ", "trl ", "mallowspo ", " UTC"):
        assert needle in report, needle

    # The hidden-size sweep of the reference pass: the main width, then each grid width.
    assert [r["hidden_size"] for r in raw["hidden"]] == [preset["workload"].hidden_size, *preset["hidden_grid"]]
    for row in raw["hidden"]:
        assert row["refpass"]["with_entropy_pairs_per_s"] > 0 and row["refpass"]["logps_match"], row
    assert "The entropy statistic against hidden size" in report
