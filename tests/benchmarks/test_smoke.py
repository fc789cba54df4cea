"""The benchmark harness (benchmarks/run.py) runs end to end at tiny sizes.

It only checks that the report is complete: every system measured (the both-dtypes systems in
bf16 too), every ratio and target present, the roofline, the profile breakdown and the layout
groups (padding_free on length-skewed data, listwise K = 4 against pairwise) there. No timing is
asserted (smoke numbers are meaningless).
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
            "--profile",
            "mpo_phi_pre@bf16",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = out.read_text()
    raw = json.loads(out.with_suffix(".json").read_text())

    # Every system of the main table was measured, without error, on the same batch shape; the
    # both-dtypes systems in bf16 too (the smoke run's own dtype is fp32); and the GEMM rates.
    bf16_keys = {f"{s}@bf16" for s in bench.BOTH_DTYPES_SYSTEMS}
    assert raw["meta"]["settings"]["dtype"] == "fp32"
    assert set(raw["main"]) == set(bench.MAIN_SYSTEMS) | bf16_keys | {"gemm"}
    shapes = set()
    for system, info in raw["main"].items():
        assert not info["errors"], (system, info["errors"])
        if system == "gemm":
            continue
        if system == "refpass":
            assert info["with_entropy_pairs_per_s"] > 0 and info["without_entropy_pairs_per_s"] > 0
            assert info["logps_match"]
            # against the plain forward, in tokens/s, and the cache's write and read
            for variant in ("with_entropy", "without_entropy", "plain_forward"):
                assert info[f"{variant}_tokens_per_s"] > 0, variant
            assert info["with_entropy_over_plain"] > 0 and info["without_entropy_over_plain"] > 0
            assert info["cache_write_s"] > 0 and info["cache_read_s"] > 0 and info["cache_roundtrip_ok"]
        else:
            assert info["n_steps"] == raw["meta"]["settings"]["steps"]
            assert info["median_step_s"] > 0 and info["peak_mib"] > 0
            shapes.add((tuple(info["batch"]["shape"]), info["batch"]["completion_tokens"]))
        assert f"| {bench.system_label(system)} |" in report or system == "refpass"
    assert len(shapes) == 1 and not raw["meta"]["shape_problems"]

    # bf16 against fp32: mallowspo bf16 / TRL bf16 and mallowspo bf16 / mallowspo fp32, time and memory.
    assert "## bf16 against fp32 (main workload)" in report
    comparisons = {c["what"]: c for c in raw["dtype_comparisons"]}
    for what in (
        "mallowspo phi bf16 / TRL DPO bf16 (precomputed ref)",
        "mallowspo phi bf16 / mallowspo phi fp32 (precomputed ref)",
    ):
        assert comparisons[what]["step_ratio"] > 0 and comparisons[what]["memory_ratio"] > 0, what
        assert f"| {what} |" in report

    # The roofline: GEMM rates at the step's shapes in both dtypes, a row per system and dtype.
    gemm = raw["roofline"]["gemm"]
    w = bench.PRESETS["smoke"]["workload"]
    head = next(g for g in gemm["gemms"] if g["name"] == "LM head fwd")
    scored = 2 * w.batch_pairs * w.response_len
    assert (head["m"], head["k"], head["n"]) == (scored, w.hidden_size, w.vocab_size)
    assert set(gemm["rates"]) == {"fp32", "bf16"} and all(r > 0 for rates in gemm["rates"].values() for r in rates)
    rows = {(r["system"], r["dtype"]): r for r in raw["roofline"]["rows"]}
    assert set(rows) == {(s, d) for s in ("trl_dpo_pre", "mpo_phi_pre", "floor") for d in ("fp32", "bf16")}
    assert all(r["fraction"] > 0 and r["achieved_gflops"] > 0 for r in rows.values())
    assert "## Roofline: measured step time against the GEMM-bound time" in report
    assert "| LM head fwd |" in report and "| attention scores (QK^T, AV) |" in report

    # The profile breakdown of the bf16 mallowspo step: groups in the report and in the op-table file.
    assert [p["system"] for p in raw["profiles"]] == ["mpo_phi_pre@bf16"]
    groups = raw["profiles"][0]["groups"]["cpu"]["groups"]
    assert {"matmul", "dtype conversions", "attention", "other ops"} <= set(groups)
    assert "## Profile breakdown" in report and "| dtype conversions |" in report
    assert "| matmul |" in (tmp_path / "RESULTS.profile-mpo_phi_pre-bf16.txt").read_text()

    # Every target has a value and a verdict, and appears in the report (4 of them the layout groups').
    assert len(raw["targets"]) == 24
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

    # The reference pass against the plain forward and the cache, in the throughput section.
    assert "| the model's plain forward (full logits, nothing else) |" in report
    assert "time ratio to plain forward" in report and "`read_valid_cache`" in report

    # padding_free on length-skewed data: both layouts, on the same completion tokens, one packed row.
    assert "## padding_free on length-skewed data" in report
    packed = raw["layouts"]["packed"]
    real, padded = bench.layouts.token_counts(bench.layouts.packed_workload(w))
    assert packed["real_token_fraction"] == real / padded == packed["measured_real_token_fraction"]
    layouts = {key: packed[key] for key in ("padded", "packed")}
    for row in layouts.values():
        assert not row["errors"] and row["median_step_s"] > 0 and row["peak_mib"] > 0
    assert layouts["padded"]["batch"]["completion_tokens"] == layouts["packed"]["batch"]["completion_tokens"]
    assert layouts["packed"]["batch"]["shape"][0] == 1 and layouts["packed"]["batch"]["sequences"] == 2 * w.batch_pairs
    assert packed["packed"]["ratio"] > 0 and packed["packed_over_bound"] > 0 and packed["speedup"] > 0

    # Listwise K = 4 against pairwise: K sequences per prompt, ratios paired by round; the list reference pass.
    assert "## Listwise K = 4 against pairwise" in report and "### The reference pass per response" in report
    lists = raw["layouts"]["lists"]
    assert lists["list_size"] == 4 and not lists["pairwise"]["errors"]
    assert {row["objective"] for row in lists["listwise"]} == {"all_pairs", "plackett_luce"}
    for row in lists["listwise"]:
        assert not row["errors"] and row["ratio"] > 0 and row["memory_ratio"] > 0, row
        assert row["batch"]["sequences"] == 2 * lists["pairwise"]["batch"]["sequences"] == 4 * w.batch_pairs
    ref = lists["refpass"]
    assert not ref["errors"] and ref["logps_match"] and ref["ratio"] > 0
    assert ref["responses"] == {"lists": 4 * w.n_pairs, "pairs": 2 * w.n_pairs}
    assert ref["lists_s_per_response"] > 0 and ref["pairs_s_per_response"] > 0
