"""MallowsPO vs TRL DPO vs a naive MallowsPO vs the bare training floor, side by side.

    .venv/bin/python benchmarks/run.py --out benchmarks/RESULTS.md      # full run (make bench)
    .venv/bin/python benchmarks/run.py --quick --out /tmp/quick.md       # smaller grid, fewer steps
    .venv/bin/python benchmarks/run.py --smoke --out /tmp/smoke.md       # tiny sizes, for tests

Every system trains the same random-init Llama (one set of weights saved to disk) on the
same token data with the same settings. Each measurement runs in a fresh subprocess
(worker.py), so peak memory is per system. Systems are interleaved: in each round every
system is measured once, and the order is reversed from one round to the next, so a slow
patch of the machine hits all systems alike. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import layouts  # noqa: E402
import roofline  # noqa: E402
from common import (  # noqa: E402
    Settings,
    Workload,
    available_cores,
    build_assets,
    fmt,
    median,
    memory_ratio,
    paired_ratio,
    target_row,
)
from profiling import render_groups  # noqa: E402

MAIN_SYSTEMS = (
    "trl_dpo_pre",
    "mpo_none_pre",
    "mpo_theta_pre",
    "mpo_phi_pre",
    "floor",
    "trl_dpo",
    "mpo_none",
    "mpo_theta",
    "mpo_phi",
    "naive",
    "refpass",
)
SCALING_SYSTEMS = ("trl_dpo_pre", "mpo_phi_pre", "naive", "floor", "refpass")
# Measured in both dtypes by default (the run's dtype and the other one, fp32 <-> bf16 autocast).
BOTH_DTYPES_SYSTEMS = ("trl_dpo_pre", "mpo_phi_pre", "floor")
DTYPES = ("fp32", "bf16")

LABELS = {
    "trl_dpo": "TRL DPOTrainer",
    "trl_dpo_pre": "TRL DPOTrainer, precomputed ref",
    "mpo_none": "mallowspo mallows=none",
    "mpo_none_pre": "mallowspo mallows=none, precomputed ref",
    "mpo_theta": "mallowspo mallows=theta",
    "mpo_theta_pre": "mallowspo mallows=theta, precomputed ref",
    "mpo_phi": "mallowspo mallows=phi",
    "mpo_phi_pre": "mallowspo mallows=phi, precomputed ref",
    "naive": "naive MallowsPO-theta (full logits + entropy every step)",
    "floor": "floor: the model's own fwd+bwd (plain CE, all positions) + AdamW step",
}


def dtype_key(system: str, dtype: str, primary: str) -> str:
    """The summary key of ``system`` measured in ``dtype``: the plain name in the run's own dtype,
    ``system@dtype`` in the other one."""
    return system if dtype == primary else f"{system}@{dtype}"


def other_dtype(dtype: str) -> str:
    return "bf16" if dtype == "fp32" else "fp32"


def system_label(key: str) -> str:
    system, _, dtype = key.partition("@")
    return LABELS.get(system, system) + (f" ({dtype})" if dtype else "")


# Presets: the main workload and how it is measured, the scaling grid and its measurement.
PRESETS = {
    "full": dict(
        workload=Workload(),
        # On a GPU the issue asks for a 100M+ model in bf16: GPT-2-small-like widths, 32k vocabulary (~164 M).
        gpu_workload=Workload(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, num_kv_heads=12),
        steps=20,
        warmup=3,
        rounds=2,
        vocab_grid=(8192, 32768, 131072),
        length_grid=(64, 128, 256),
        scaling_steps=8,
        scaling_warmup=2,
        scaling_rounds=1,
        refpass_repeats=5,
        scaling_refpass_repeats=2,
        one_process=False,
        hidden_grid=(1024,),
        hidden_refpass_repeats=2,
    ),
    "quick": dict(
        workload=Workload(),
        steps=8,
        warmup=2,
        rounds=1,
        vocab_grid=(8192, 32768),
        length_grid=(64, 128),
        scaling_steps=4,
        scaling_warmup=1,
        scaling_rounds=1,
        refpass_repeats=2,
        one_process=False,
        hidden_grid=(),
        gemm_min_s=0.05,
    ),
    "smoke": dict(
        workload=Workload(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=2,
            num_kv_heads=2,
            prompt_len=8,
            response_len=8,
            batch_pairs=2,
            n_pairs=8,
        ),
        steps=2,
        warmup=1,
        rounds=1,
        vocab_grid=(256, 512),
        length_grid=(4, 8),
        scaling_steps=2,
        scaling_warmup=1,
        scaling_rounds=1,
        refpass_repeats=1,
        one_process=True,  # one worker process for everything: start-up dominates
        threads=1,
        hidden_grid=(64,),
        gemm_min_s=0.002,
    ),
}


# ----------------------------------------------------------------------------- running jobs


def worker_env(threads: int, tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp / "hf-datasets"),
        MALLOWSPO_CACHE=str(tmp / "mallowspo-cache"),
        TQDM_DISABLE="1",
        PYTHONHASHSEED="0",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
    )
    src = HERE.parent / "src"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH", "")) if p)
    return env


def run_jobs(jobs: list[dict], tmp: Path, threads: int, timeout: float, log) -> list[dict]:
    """Run ``jobs`` in one fresh worker process; return one entry per job (result or error)."""
    tag = jobs[0]["tag"] if len(jobs) == 1 else f"batch-{len(jobs)}"
    jobs_file, results_file = tmp / f"{tag}.jobs.json", tmp / f"{tag}.results.json"
    log_file = tmp / "logs" / f"{tag}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    jobs_file.write_text(json.dumps(jobs))
    results_file.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log_file, "w") as out:
        try:
            proc = subprocess.run(
                [sys.executable, str(HERE / "worker.py"), str(jobs_file), str(results_file)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=worker_env(threads, tmp),
                timeout=timeout,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - start
    entries = json.loads(results_file.read_text()) if results_file.exists() else []
    done = {e["tag"] for e in entries}
    tail = log_file.read_text()[-3000:] if log_file.exists() else ""
    for job in jobs:
        if job["tag"] not in done:
            entries.append(
                {"system": job["system"], "tag": job["tag"], "error": f"worker exit {code}; log tail:\n{tail}"}
            )
    for entry in entries:
        entry["wall_s"] = wall if len(jobs) == 1 else entry.get("job_wall_s", wall / len(jobs))
        result = entry.get("result", {})
        status = (
            "error"
            if "error" in entry
            else (f"{result['median_step_s']:.4f} s/step" if result.get("median_step_s") else "done")
        )
        log(f"  {entry['tag']:<40} {status}  ({entry['wall_s']:.0f} s)")
    return entries


def schedule(systems, rounds: int, make_job) -> list[dict]:
    """Round r measures every system once; odd rounds run in reverse order (ABBA)."""
    jobs = []
    for r in range(rounds):
        order = systems if r % 2 == 0 else tuple(reversed(systems))
        for system in order:
            jobs.append(make_job(system, r))
    return jobs


# ----------------------------------------------------------------------------- aggregation


def by_system(entries: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in sorted(entries, key=lambda e: e.get("round", 0)):
        out.setdefault(e["system"], []).append(e)
    return out


def summarise(entries: list[dict], device: str) -> dict[str, dict]:
    """Per system: pooled median step time, per-round medians, peak memory (median over rounds)."""
    mem_key = "peak_cuda_mib" if device == "cuda" else "peak_rss_mib"
    summary = {}
    for system, runs in by_system(entries).items():
        ok = [r for r in runs if "result" in r]
        info = {"runs": len(runs), "errors": [r["error"] for r in runs if "error" in r]}
        if system == "gemm":
            info["result"] = ok[0]["result"] if ok else None
        elif system == "refpass":
            info.update(summarise_refpass([r["result"] for r in ok]))
        elif system == "refpass_lists":
            info.update(layouts.summarise_refpass_lists(ok))
        else:
            pooled = [t for r in ok for t in r["result"]["step_times"]]
            info["median_step_s"] = median(pooled)
            # by round (None where that round's measurement failed), so ratios pair the same rounds
            info["round_medians"] = [r["result"]["median_step_s"] if "result" in r else None for r in runs]
            info["n_steps"] = len(pooled)
            info["peak_mib"] = median([r["result"][mem_key] for r in ok])
            info["rss_before_train_mib"] = median([r["result"]["rss_before_train_mib"] for r in ok])
            info["batch"] = ok[0]["result"]["batch"] if ok else None
            info["holds_ref_model"] = ok[0]["result"]["holds_ref_model"] if ok else None
        summary[system] = info
    return summary


def summarise_refpass(results: list[dict]) -> dict:
    """The reference-pass figures of ``summarise``: medians over the measurements' results."""

    def pooled(key):
        return median([median(r.get(key) or []) for r in results])

    info = {
        f"{label}_{unit}": median([r.get(f"{label}_{unit}") for r in results])
        for label in ("with_entropy", "without_entropy", "plain_forward")
        for unit in ("pairs_per_s", "tokens_per_s")
    }
    # each with/without pair ran back to back: the ratio of each pair, median per measurement
    info["round_ratio"] = [median(r["round_ratios"]) for r in results]
    info["pair_ratios"] = [x for r in results for x in r["round_ratios"]]
    info["logps_match"] = all(r["logps_match"] for r in results)
    for key in ("with_entropy_over_plain", "without_entropy_over_plain", "cache_write_s", "cache_read_s"):
        info[key] = pooled(key)
    info["with_entropy_s"] = pooled("with_entropy_s")
    info["cache_roundtrip_ok"] = all(r.get("cache_roundtrip_ok", False) for r in results)
    return info


def targets(summary: dict) -> list[dict]:
    """The issue's targets, each as a row: what, value, target, PASS/FAIL, spread."""
    rows = []

    def add(what, value, op, bound, spread=(), note=""):
        rows.append(target_row(what, value, op, bound, spread, note))

    for pre, tag in (("_pre", "precomputed ref"), ("", "ref per step")):
        for variant in ("theta", "phi", "none"):
            value, spread = paired_ratio(summary, f"mpo_{variant}{pre}", f"trl_dpo{pre}")
            add(
                f"step time: mallowspo {variant} / TRL DPO ({tag})",
                value,
                "<=",
                1.00,
                spread,
                "plain DPO in mallowspo" if variant == "none" else "",
            )
    for pre, tag in (("_pre", "precomputed ref"), ("", "ref per step")):
        for variant in ("theta", "phi", "none"):
            a, b = summary.get(f"mpo_{variant}{pre}", {}), summary.get(f"trl_dpo{pre}", {})
            diff = (a["peak_mib"] - b["peak_mib"]) if a.get("peak_mib") and b.get("peak_mib") else None
            add(
                f"peak memory: mallowspo {variant} / TRL DPO ({tag})",
                memory_ratio(summary, f"mpo_{variant}{pre}", f"trl_dpo{pre}"),
                "<=",
                1.00,
                note=f"{diff:+.0f} MiB" if diff is not None else "",
            )
    ref = summary.get("refpass", {})
    add(
        "reference pass time: with entropy / without",
        median(ref.get("round_ratio") or []),
        "<=",
        1.05,
        ref.get("pair_ratios") or [],
        "mallowspo.training.reference.compute_reference_columns",
    )
    for pre, tag in (("_pre", "precomputed ref"), ("", "ref per step")):
        for variant in ("theta", "phi"):
            value, spread = paired_ratio(summary, "naive", f"mpo_{variant}{pre}")
            add(f"speed-up over naive: naive / mallowspo {variant} ({tag})", value, ">=", 1.50, spread)
    for system in ("mpo_theta_pre", "mpo_phi_pre", "trl_dpo_pre"):
        value, spread = paired_ratio(summary, system, "floor")
        label = "TRL DPO" if system.startswith("trl") else f"mallowspo {system.split('_')[1]}"
        add(
            f"step time / floor: {label} (precomputed ref)",
            value,
            "<=",
            1.15,
            spread,
            "reference only, not a mallowspo target" if system.startswith("trl") else "",
        )
    return rows


def flops_per_token(w: Workload) -> float:
    """Matmul FLOPs per token of a forward (weights only): the layers plus the LM head."""
    layer = 2 * w.hidden_size * w.hidden_size * (1 + 2 * w.num_kv_heads / w.num_heads + 1)
    layer += 3 * w.hidden_size * w.intermediate_size
    return 2 * (w.num_layers * layer + w.hidden_size * w.vocab_size)


def cost_factor(w: Workload, main: Workload) -> float:
    """How much a step at ``w`` costs relative to ``main`` (tokens x FLOPs per token)."""
    return (w.max_length * flops_per_token(w)) / (main.max_length * flops_per_token(main))


def fit_scaling_steps(main_entries, main: Workload, main_warmup, points, steps, warmup, rounds, seconds_left):
    """The most timed steps (<= ``steps``, >= 3) whose estimated scaling time fits in
    ``seconds_left``, from the main table's per-system step times and fixed overheads."""
    step_s, overhead = {}, {}
    for e in main_entries:
        if "result" not in e or e["system"] not in SCALING_SYSTEMS:
            continue
        r = e["result"]
        if e["system"] == "refpass":
            overhead["refpass"] = e["wall_s"]
            continue
        n = len(r["step_times"]) + main_warmup
        step_s[e["system"]] = r["median_step_s"]
        overhead[e["system"]] = max(e["wall_s"] - n * r["median_step_s"], 0.0)

    def estimate(n_steps):
        total = 0.0
        for w in points:
            factor = cost_factor(w, main)
            for system in SCALING_SYSTEMS:
                if system == "refpass":
                    total += overhead.get("refpass", 0.0) * max(factor, 1.0)
                elif system in step_s:
                    total += overhead[system] * max(factor, 1.0) + (warmup + n_steps) * step_s[system] * factor
        return total * rounds

    lowest = min(3, steps)
    for n in range(steps, lowest - 1, -1):
        if estimate(n) <= seconds_left:
            return n, estimate(n)
    return lowest, estimate(lowest)


# ----------------------------------------------------------------------------- report


def machine_info(device: str) -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "available_cores": available_cores(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "accelerate", "datasets", "mallowspo"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=HERE.parent, capture_output=True, text=True
        )
        if rev.returncode == 0:
            out["mallowspo"] += f" (git {rev.stdout.strip()}{', src modified' if dirty.stdout.strip() else ''})"
    except OSError:
        pass
    return out


def with_hidden(w: Workload, hidden: int) -> Workload:
    """The workload at another hidden size: MLP and heads scaled alike (head dim 64)."""
    return w.with_(
        hidden_size=hidden,
        intermediate_size=hidden * w.intermediate_size // w.hidden_size,
        num_heads=max(1, hidden // 64),
        num_kv_heads=max(1, hidden // 64),
    )


def dtype_comparisons(main: dict, primary: str) -> list[dict]:
    """bf16 against fp32 and mallowspo against TRL within bf16: step-time (paired by round) and memory ratios."""
    pairs = [
        ("mpo_phi_pre", "bf16", "trl_dpo_pre", "bf16", "mallowspo phi bf16 / TRL DPO bf16 (precomputed ref)"),
        ("mpo_phi_pre", "bf16", "mpo_phi_pre", "fp32", "mallowspo phi bf16 / mallowspo phi fp32 (precomputed ref)"),
        ("trl_dpo_pre", "bf16", "trl_dpo_pre", "fp32", "TRL DPO bf16 / TRL DPO fp32 (precomputed ref)"),
        ("floor", "bf16", "floor", "fp32", "floor bf16 / floor fp32"),
        ("mpo_phi_pre", "bf16", "floor", "bf16", "mallowspo phi bf16 / floor bf16 (precomputed ref)"),
    ]
    out = []
    for a, da, b, db, what in pairs:
        ka, kb = dtype_key(a, da, primary), dtype_key(b, db, primary)
        if ka not in main or kb not in main:
            continue
        value, spread = paired_ratio(main, ka, kb)
        pa, pb = main[ka].get("peak_mib"), main[kb].get("peak_mib")
        out.append(
            dict(
                what=what,
                a=ka,
                b=kb,
                step_ratio=value,
                spread=spread,
                memory_ratio=memory_ratio(main, ka, kb),
                memory_diff_mib=(pa - pb) if pa and pb else None,
            )
        )
    return out


def render(
    meta: dict,
    main: dict,
    rows: list[dict],
    scaling: list[dict],
    hidden: list[dict] = (),
    roof: list[dict] = (),
    profiles: list[dict] = (),
    layout: dict | None = None,
) -> str:
    device, mem_name = (
        meta["settings"]["device"],
        ("peak CUDA allocated" if meta["settings"]["device"] == "cuda" else "peak RSS"),
    )
    L = []
    L.append("# Benchmarks: MallowsPO vs TRL DPO, naive MallowsPO and the training floor\n")
    L.append(
        f"Generated by `benchmarks/run.py{meta['argv']}` on {meta['date']} in {meta['total_s'] / 60:.1f} min. "
        "How it is measured: `benchmarks/README.md`.\n"
    )
    if meta["preset"] != "full":
        L.append(f"> **{meta['preset']} run**: reduced sizes/steps; not the reference numbers.\n")
    load = meta["loadavg"]
    if load and max(load["start"][0], load["end"][0]) > meta["settings"]["threads"] + 0.5:
        L.append(
            f"> **Warning: the machine was busy** (1-min load average {load['start'][0]:.1f} at start, "
            f"{load['end'][0]:.1f} at end, for {meta['settings']['threads']} benchmark threads): "
            "absolute times are inflated and ratios are noisier than usual.\n"
        )
    m, v, s = meta["machine"], meta["versions"], meta["settings"]
    L.append("## Machine and software\n")
    L.append(
        f"- CPU: {m['cpu']}, {m['available_cores']} cores available ({m['logical_cpus']} logical), RAM {m['ram_gib']} GiB"
    )
    L.append(f"- GPU: {m.get('gpu', 'none')}" + (f" ({m['gpu_mem_gib']} GiB)" if "gpu" in m else ""))
    L.append(f"- {m['platform']}, Python {m['python']}")
    L.append("- " + ", ".join(f"{k} {val}" for k, val in v.items()))
    L.append(
        f"- device {device}, {'bf16 autocast (fp32 master weights)' if s['dtype'] == 'bf16' else 'fp32'}, "
        f"torch threads {s['threads']}; load average at start {fmt(load['start'][0], 2) if load else 'n/a'}, "
        f"at end {fmt(load['end'][0], 2) if load else 'n/a'}\n"
    )
    w = meta["workload"]
    L.append("## Workload\n")
    L.append(f"- {Workload.from_dict(w).describe()}; {w['n_pairs']} distinct pairs, cycled")
    L.append(
        f"- AdamW lr {w['learning_rate']}, constant schedule, no weight decay, grad-norm clip 1.0, no gradient "
        f"checkpointing, beta {w['beta']}, sigmoid (DPO) base loss; dispersion phi* fixed at {w['phi_star']} "
        "for mallowspo and the naive baseline alike"
    )
    L.append(
        f"- main table: median seconds per optimizer step over {s['steps']} steps after {s['warmup']} warm-up "
        f"steps, in each of {meta['rounds']} round(s) (ABBA order), pooled; every measurement in a fresh process\n"
    )

    L.append("## Targets\n")
    L.append("| check | value | target | result | per-round values | note |")
    L.append("| --- | ---: | ---: | :---: | --- | --- |")
    for r in rows:
        L.append(
            f"| {r['what']} | {fmt(r['value'], 3)} | {r['target']} | **{r['verdict']}** | "
            f"{', '.join(f'{x:.3f}' for x in r['spread'])} | {r['note']} |"
        )
    L.append("")

    L.append("## Step time and memory (main workload)\n")
    L.append(
        f"| system | s/step (median) | per-round medians | steps | {mem_name} (MiB) | RSS at train start (MiB) | ref model in memory | / floor | / TRL (same ref setting) |"
    )
    L.append("| --- | ---: | --- | ---: | ---: | ---: | :---: | ---: | ---: |")
    primary = s["dtype"]
    other_keys = [k for k in main if "@" in k and not k.startswith("gemm")]
    for system in [*MAIN_SYSTEMS, *other_keys]:
        info = main.get(system)
        base, _, dtype = system.partition("@")
        if base in ("refpass", "gemm") or info is None:
            continue
        if info.get("errors") and not info.get("n_steps"):
            L.append(f"| {system_label(system)} | error | | | | | | | |")
            continue
        dtype = dtype or primary
        floor_ratio, _ = paired_ratio(main, system, dtype_key("floor", dtype, primary))
        trl = dtype_key("trl_dpo_pre" if base.endswith("_pre") else "trl_dpo", dtype, primary)
        trl_ratio = paired_ratio(main, system, trl)[0] if base.startswith("mpo") else None
        L.append(
            f"| {system_label(system)} | {fmt(info['median_step_s'], 4)} | {', '.join(fmt(x, 4) for x in info['round_medians'])} | "
            f"{info['n_steps']} | {fmt(info['peak_mib'], 0)} | {fmt(info['rss_before_train_mib'], 0)} | "
            f"{'yes' if info['holds_ref_model'] else 'no'} | {fmt(floor_ratio, 2)} | {fmt(trl_ratio, 3)} |"
        )
    L.append("")
    if other_keys:
        L.append(
            f"Rows marked ({other_dtype(primary)}) ran in the other dtype; their / floor and / TRL columns "
            "compare with the same dtype.\n"
        )
    comparisons = dtype_comparisons(main, primary)
    if comparisons:
        L.append("## bf16 against fp32 (main workload)\n")
        L.append(
            "bf16 is autocast over float32 master weights (`bf16=True`; on CPU with `use_cpu=True`, where the "
            "matrix products run in bf16 on AMX/AVX-512-BF16 units when the CPU has them). Step-time ratios "
            "are paired by round as above.\n"
        )
        L.append(f"| comparison | step-time ratio | per-round values | {mem_name} ratio | {mem_name} difference |")
        L.append("| --- | ---: | --- | ---: | ---: |")
        for c in comparisons:
            diff = f"{c['memory_diff_mib']:+.0f} MiB" if c["memory_diff_mib"] is not None else "n/a"
            L.append(
                f"| {c['what']} | {fmt(c['step_ratio'], 3)} | {', '.join(f'{x:.3f}' for x in c['spread'])} | "
                f"{fmt(c['memory_ratio'], 3)} | {diff} |"
            )
        L.append("")
    L += roofline.render(main.get("gemm", {}).get("result"), list(roof), {k: system_label(k) for k in LABELS}, fmt)
    if profiles:
        L.append("## Profile breakdown\n")
        L.append(
            "torch.profiler over a few steps of each `--profile` system, in an extra measurement after the timed "
            "rounds (the profiler slows the steps it records; no table above includes them). Every op's self time "
            "goes to one group (`benchmarks/profiling.py`). Op "
            "tables: next to the report, `<report>.profile-<system>.txt`.\n"
        )
        for p in profiles:
            for clock, breakdown in p["groups"].items():
                L += render_groups(f"{system_label(p['system'])}: {clock}", breakdown)
    ref = main.get("refpass")
    if ref:
        L.append("## Reference pass throughput (main workload)\n")
        L.append(
            "`mallowspo.training.reference.compute_reference_columns` over the data set, batch "
            f"{w['batch_pairs']} pairs, with and without the entropy, and the model's plain forward over the same "
            "batches: the three run in turn in one process on the same model, their order rotated from one repeat "
            "to the next.\n"
        )
        L.append("| variant | pairs/s | tokens/s | time ratio to without | time ratio to plain forward |")
        L.append("| --- | ---: | ---: | ---: | ---: |")
        L.append(
            f"| the model's plain forward (full logits, nothing else) | {fmt(ref.get('plain_forward_pairs_per_s'), 1)} | "
            f"{fmt(ref.get('plain_forward_tokens_per_s'), 0)} | | 1.000 |"
        )
        L.append(
            f"| log-probs only (what TRL's reference pass computes) | {fmt(ref.get('without_entropy_pairs_per_s'), 1)} | "
            f"{fmt(ref.get('without_entropy_tokens_per_s'), 0)} | 1.000 | {fmt(ref.get('without_entropy_over_plain'), 3)} |"
        )
        L.append(
            f"| log-probs + entropy statistic (mallowspo) | {fmt(ref.get('with_entropy_pairs_per_s'), 1)} | "
            f"{fmt(ref.get('with_entropy_tokens_per_s'), 0)} | {fmt(median(ref.get('round_ratio') or []), 3)} | "
            f"{fmt(ref.get('with_entropy_over_plain'), 3)} |"
        )
        L.append(
            "\nTokens: the batches' non-padding tokens (attention mask). The plain forward runs over the same "
            "loader under `torch.no_grad()` and the same autocast; its head projects every position, the "
            "passes' only the completion positions."
        )
        L.append(
            f"Cache of the columns (a temp dir): written with `write_cache_atomically` in "
            f"{fmt(ref.get('cache_write_s'), 4)} s, read back with `read_valid_cache` in {fmt(ref.get('cache_read_s'), 4)} s "
            f"(identical: {ref.get('cache_roundtrip_ok')}), against {fmt(ref.get('with_entropy_s'), 4)} s for the "
            "pass with the entropy."
        )
        L.append(f"\nReference log-probs identical with and without the entropy: {ref.get('logps_match')}.\n")
    if len(hidden) > 1:
        L.append("### The entropy statistic against hidden size\n")
        L.append(
            "The same reference pass on models that differ only in width (MLP and heads scaled alike; "
            "vocabulary and lengths as the main workload). The entropy adds element-wise passes over "
            "(tokens, vocab); the projection grows with the hidden size, so the entropy's share shrinks.\n"
        )
        L.append(
            "| hidden | parameters | pairs/s without | pairs/s with | time ratio with / without | per-pair ratios |"
        )
        L.append("| ---: | ---: | ---: | ---: | ---: | --- |")
        for row in hidden:
            r = row["refpass"]
            L.append(
                f"| {row['hidden_size']} | {row['params'] / 1e6:.1f} M | {fmt(r.get('without_entropy_pairs_per_s'), 1)} | "
                f"{fmt(r.get('with_entropy_pairs_per_s'), 1)} | {fmt(median(r.get('round_ratio') or []), 3)} | "
                f"{', '.join(f'{x:.2f}' for x in r.get('pair_ratios') or [])} |"
            )
        L.append("")

    L += layouts.render(layout or {}, mem_name)
    if scaling:
        L.append("## Scaling (reduced set of systems, precomputed reference)\n")
        L.append(f"{meta['scaling_desc']}\n")
        L.append(
            f"| vocab | response tokens | TRL DPO s/step | mallowspo phi s/step | naive s/step | floor s/step | "
            f"phi / TRL | naive / phi | phi / floor | {mem_name} TRL / phi / naive / floor (MiB) | phi / TRL memory | ref pass +entropy / without |"
        )
        L.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
        for row in scaling:
            sm = row["summary"]

            def st(name, sm=sm):
                return fmt(sm.get(name, {}).get("median_step_s"), 4)

            mems = " / ".join(
                fmt(sm.get(n, {}).get("peak_mib"), 0) for n in ("trl_dpo_pre", "mpo_phi_pre", "naive", "floor")
            )
            L.append(
                f"| {row['vocab_size']} | {row['response_len']} | {st('trl_dpo_pre')} | {st('mpo_phi_pre')} | {st('naive')} | "
                f"{st('floor')} | {fmt(paired_ratio(sm, 'mpo_phi_pre', 'trl_dpo_pre')[0], 3)} | "
                f"{fmt(paired_ratio(sm, 'naive', 'mpo_phi_pre')[0], 2)} | {fmt(paired_ratio(sm, 'mpo_phi_pre', 'floor')[0], 2)} | "
                f"{mems} | {fmt(memory_ratio(sm, 'mpo_phi_pre', 'trl_dpo_pre'), 3)} | "
                f"{fmt(median(sm.get('refpass', {}).get('round_ratio') or []), 3)} |"
            )
        L.append("")

    errors = [(e["tag"], e["error"]) for e in meta["entries"] if "error" in e]
    if errors:
        L.append("## Errors\n")
        for tag, err in errors:
            L.append(f"### {tag}\n\n```\n{err[-2000:]}\n```\n")
    L.append("## Budget\n")
    L.append(
        f"Total {meta['total_s'] / 60:.1f} min; per measurement (process start, setup, warm-up and timed steps):\n"
    )
    L.append("| measurement | wall s |")
    L.append("| --- | ---: |")
    for e in meta["entries"]:
        L.append(f"| {e['tag']} | {e['wall_s']:.0f} |")
    L.append("")
    return "\n".join(L)


# ----------------------------------------------------------------------------- main


def resolve_device(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default=str(HERE / "RESULTS.md"), help="Markdown report (raw results go next to it as .json)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer steps, one round, smaller scaling grid")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; for tests (numbers meaningless)")
    p.add_argument("--steps", type=int, help="timed steps per measurement (main table)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps per measurement (main table)")
    p.add_argument("--rounds", type=int, help="interleaved rounds of the main table")
    p.add_argument("--scaling-steps", type=int, help="timed steps per scaling measurement")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="auto: fp32 on CPU, bf16 autocast on GPU"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads in every worker (default: available cores)"
    )
    p.add_argument("--systems", help="comma-separated subset of the main systems (development)")
    p.add_argument(
        "--both-dtypes",
        help="comma-separated main systems also measured in the other dtype (fp32 <-> bf16), interleaved in the "
        f"same rounds; 'none' for none (default: those of {','.join(BOTH_DTYPES_SYSTEMS)} that are measured)",
    )
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    p.add_argument(
        "--no-layouts",
        action="store_true",
        help="skip the layout groups (padding_free on length-skewed data, listwise K = 4 against pairwise)",
    )
    p.add_argument(
        "--profile",
        default="",
        help="comma-separated systems to profile, a name@dtype for the other dtype's run (e.g. mpo_phi_pre@bf16): "
        "torch.profiler op tables and their grouping by kind of work, written next to --out as "
        "<out>.profile-<system>.txt and added to the report",
    )
    p.add_argument("--workdir", help="keep assets and worker logs here (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    p.add_argument(
        "--isolate", action="store_true", help="with --smoke: one process per measurement as in full runs (slower)"
    )
    p.add_argument(
        "--budget-min",
        type=float,
        default=50.0,
        help="total minutes to aim for: the scaling steps are lowered (not below 3) to fit what the main "
        "table left; --scaling-steps overrides",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    preset_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    preset = PRESETS[preset_name]
    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    threads = args.threads or preset.get("threads") or available_cores()
    steps = args.steps or preset["steps"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    rounds = args.rounds or preset["rounds"]
    scaling_steps = args.scaling_steps or preset["scaling_steps"]
    workload: Workload = preset.get("gpu_workload", preset["workload"]) if device == "cuda" else preset["workload"]
    main_systems = tuple(args.systems.split(",")) if args.systems else MAIN_SYSTEMS
    unknown = set(main_systems) - set(MAIN_SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {MAIN_SYSTEMS}")
    if args.both_dtypes is None:
        both = tuple(x for x in BOTH_DTYPES_SYSTEMS if x in main_systems)
    else:
        both = () if args.both_dtypes in ("", "none") else tuple(x for x in args.both_dtypes.split(",") if x)
    unknown = set(both) - set(main_systems)
    if unknown:
        raise SystemExit(f"--both-dtypes: {sorted(unknown)} are not among the main systems {main_systems}")
    other = other_dtype(dtype)
    measured_systems = (*main_systems, *(f"{x}@{other}" for x in both))
    profile = {s for s in args.profile.split(",") if s}
    unknown = profile - set(measured_systems)
    if unknown:
        raise SystemExit(f"--profile: {sorted(unknown)} are not measured in this run; choose from {measured_systems}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mallowspo-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    t_start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    settings = Settings(
        device=device,
        dtype=dtype,
        threads=threads,
        steps=steps,
        warmup=warmup,
        extra={"refpass_repeats": preset["refpass_repeats"]},
    )
    gemm_settings = dataclasses.replace(
        settings, extra={"dtypes": [dtype, other] if both else [dtype], "gemm_min_s": preset.get("gemm_min_s", 0.1)}
    )
    scaling_settings = Settings(
        device=device,
        dtype=dtype,
        threads=threads,
        steps=scaling_steps,
        warmup=preset["scaling_warmup"],
        extra={"refpass_repeats": preset.get("scaling_refpass_repeats", preset["refpass_repeats"])},
    )

    # Workloads: the main one and the scaling grid (vocab sweep at the main response length,
    # response-length sweep at the main vocabulary).
    scaling_points = []
    if not args.no_scaling:
        for vocab in preset["vocab_grid"]:
            scaling_points.append(workload.with_(vocab_size=vocab))
        for length in preset["length_grid"]:
            point = workload.with_(response_len=length)
            if point not in scaling_points:
                scaling_points.append(point)

    # Reference pass only, at larger hidden sizes: how the entropy statistic's share shrinks.
    hidden_points = [] if args.no_scaling else [with_hidden(workload, h) for h in preset["hidden_grid"]]
    # Batches of other layouts: packed rows on length-skewed data, ranked lists (benchmarks/layouts.py).
    layout_points = [] if args.no_layouts else layouts.workloads(workload)

    log(f"[bench] {preset_name}: device {device}, {dtype}, {threads} threads; work dir {tmp}")
    assets = {}
    for w in [workload, *scaling_points, *hidden_points, *layout_points]:
        if w not in assets:
            assets[w] = str(build_assets(w, tmp / "assets"))

    def job_maker(w: Workload, s: Settings, prefix: str):
        def make(system, r):
            tag = f"{prefix}{system.replace('@', '-')}-r{r}"
            prof = (
                str(out.with_name(f"{out.stem}.profile-{system.replace('@', '-')}.txt"))
                if prefix == "profile-"
                else None
            )
            job_settings = dataclasses.replace(s, dtype=system.partition("@")[2] or s.dtype)
            return {
                "system": system,
                "tag": tag,
                "round": r,
                "workload": w.to_dict(),
                "settings": job_settings.to_dict(),
                "assets": assets[w],
                "profile": prof,
            }

        return make

    def scaling_groups(s: Settings):
        groups = []
        for w in scaling_points:
            if w == workload:
                continue  # the main table already has this point
            prefix = f"scale-v{w.vocab_size}-r{w.response_len}-"
            groups.append((prefix, w, schedule(SCALING_SYSTEMS, preset["scaling_rounds"], job_maker(w, s, prefix))))
        for w in hidden_points:
            prefix = f"hidden-h{w.hidden_size}-"
            repeats = preset.get("hidden_refpass_repeats", preset["refpass_repeats"])
            hidden_settings = dataclasses.replace(settings, extra={**settings.extra, "refpass_repeats": repeats})
            groups.append((prefix, w, schedule(("refpass",), 1, job_maker(w, hidden_settings, prefix))))
        return groups

    def layout_groups():
        if args.no_layouts:
            return []

        def jobs(systems, w, prefix, n_rounds):
            return schedule(systems, n_rounds, job_maker(w, settings, prefix))

        return layouts.groups(workload, rounds, jobs)

    # The GEMM rates for the roofline first (a fresh process, nothing else running), then the rounds.
    main_jobs = [job_maker(workload, gemm_settings, "main-")("gemm", 0)]
    main_jobs += schedule(measured_systems, rounds, job_maker(workload, settings, "main-"))
    # Profiled measurements are extra ones, after the timed rounds: the profiler slows the steps it records.
    profile_jobs = [job_maker(workload, settings, "profile-")(system, 0) for system in sorted(profile)]
    entries_by_group: dict[str, list[dict]] = {}
    budget_note = ""
    if preset["one_process"] and not args.isolate:
        groups = [("main", workload, main_jobs), *layout_groups(), *scaling_groups(scaling_settings)]
        groups += [("profile", workload, profile_jobs)] if profile_jobs else []
        all_jobs = [j for _, _, jobs in groups for j in jobs]
        log(f"[bench] {len(all_jobs)} measurements in one worker process")
        entries = run_jobs(all_jobs, tmp, threads, args.timeout, log)
        by_tag = {e["tag"]: e for e in entries}
        for label, _, jobs in groups:
            entries_by_group[label] = [dict(by_tag[j["tag"]], round=j["round"]) for j in jobs]
    else:

        def run_group(label, jobs):
            log(f"[bench] {label}: {len(jobs)} measurements, one process each")
            entries_by_group[label] = []
            for job in jobs:
                entry = run_jobs([job], tmp, threads, args.timeout, log)[0]
                entries_by_group[label].append(dict(entry, round=job["round"]))

        run_group("main", main_jobs)
        if profile_jobs:
            run_group("profile", profile_jobs)
        for label, _, jobs in layout_groups():
            run_group(label, jobs)
        if scaling_points and not args.scaling_steps:
            # Fit the scaling grid into what is left of the time budget, from the main table's costs.
            left = args.budget_min * 60 - (time.perf_counter() - t_start)
            fitted, estimate = fit_scaling_steps(
                entries_by_group["main"],
                workload,
                warmup,
                [w for w in scaling_points if w != workload],
                preset["scaling_steps"],
                preset["scaling_warmup"],
                preset["scaling_rounds"],
                left,
            )
            if fitted < preset["scaling_steps"]:
                budget_note = (
                    f"Scaling steps reduced from {preset['scaling_steps']} to {fitted} to fit the "
                    f"{args.budget_min:.0f}-min budget (estimated {estimate / 60:.1f} min left to run)."
                )
                log(f"[bench] {budget_note}")
            scaling_steps = fitted
            scaling_settings = dataclasses.replace(scaling_settings, steps=fitted)
        for label, _, jobs in scaling_groups(scaling_settings):
            run_group(label, jobs)

    main_summary = summarise(entries_by_group["main"], device)
    rows = targets(main_summary)
    gemm_result = main_summary.get("gemm", {}).get("result")
    roof_rows = (
        roofline.roofline_rows(
            gemm_result,
            {
                (system, d): main_summary.get(dtype_key(system, d, dtype), {}).get("median_step_s")
                for system in roofline.ROOFLINE_SYSTEMS
                for d in DTYPES
            },
        )
        if gemm_result
        else []
    )
    profiles = [
        {"system": e["system"], "groups": e["result"]["profile_groups"]}
        for e in entries_by_group.get("profile", [])
        if e.get("result", {}).get("profile_groups")
    ]
    for p in profiles:
        for clock, breakdown in p["groups"].items():
            log("\n".join(render_groups(f"profile {p['system']}: {clock}", breakdown)))
    scaling_rows = []
    for w in scaling_points:
        label = "main" if w == workload else f"scale-v{w.vocab_size}-r{w.response_len}-"
        if label not in entries_by_group:
            continue
        sm = summarise(entries_by_group[label], device)
        if label == "main":
            sm = {k: v for k, v in sm.items() if k in SCALING_SYSTEMS}
        scaling_rows.append({"vocab_size": w.vocab_size, "response_len": w.response_len, "summary": sm})
    scaling_rows.sort(
        key=lambda row: (row["response_len"] != workload.response_len, row["vocab_size"], row["response_len"])
    )
    hidden_rows = (
        [
            {
                "hidden_size": workload.hidden_size,
                "params": workload.parameter_count(),
                "refpass": main_summary.get("refpass", {}),
            }
        ]
        if "refpass" in main_summary
        else []
    )
    for w in hidden_points:
        label = f"hidden-h{w.hidden_size}-"
        if label in entries_by_group:
            hidden_rows.append(
                {
                    "hidden_size": w.hidden_size,
                    "params": w.parameter_count(),
                    "refpass": summarise(entries_by_group[label], device).get("refpass", {}),
                }
            )

    layout_figs = layouts.figures(
        {label: summarise(entries_by_group[label], device) for label, _, _ in layout_groups()}, workload
    )
    rows += layouts.targets(layout_figs)

    # Same batch shape and completion-token count for every system of a workload (the layout groups'
    # systems see other shapes by design: their own checks).
    shape_problems = layouts.shape_problems(entries_by_group)
    for label, entries in entries_by_group.items():
        if label.startswith("layout-"):
            continue
        seen = {}
        for e in entries:
            batch = e.get("result", {}).get("batch")
            if batch:
                seen.setdefault((tuple(batch["shape"]), batch["completion_tokens"]), []).append(e["system"])
        if len(seen) > 1:
            shape_problems.append(f"{label}: systems saw different batches: {seen}")
    for problem in shape_problems:
        log(f"[bench] WARNING {problem}")

    all_entries = [e for entries in entries_by_group.values() for e in entries]
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta = {
        "argv": (" " + " ".join(sys.argv[1:])) if sys.argv[1:] and argv is None else "",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "preset": preset_name,
        "machine": machine_info(device),
        "versions": versions(),
        "settings": settings.to_dict(),
        "both_dtypes": list(both),
        "rounds": rounds,
        "workload": workload.to_dict(),
        "loadavg": {"start": load_start, "end": load_end} if load_start else None,
        "scaling_desc": (
            f"Vocabulary sweep at {workload.response_len} response tokens and response-length sweep at vocabulary "
            f"{workload.vocab_size}; other settings as the main workload. {scaling_steps} timed steps after "
            f"{preset['scaling_warmup']} warm-up, {preset['scaling_rounds']} round(s); the main-workload row reuses "
            "the main table's measurements." + (" " + budget_note if budget_note else "")
        ),
        "entries": all_entries,
        "total_s": time.perf_counter() - t_start,
        "shape_problems": shape_problems,
    }
    report = render(meta, main_summary, rows, scaling_rows, hidden_rows, roof_rows, profiles, layout_figs)
    if shape_problems:
        report += "\n## Workload mismatch\n\n" + "\n".join(f"- {p}" for p in shape_problems) + "\n"
    out.write_text(report)
    raw = {
        "meta": {k: v for k, v in meta.items() if k != "entries"},
        "main": main_summary,
        "targets": rows,
        "scaling": scaling_rows,
        "hidden": hidden_rows,
        "dtype_comparisons": dtype_comparisons(main_summary, dtype),
        "roofline": {"gemm": gemm_result, "rows": roof_rows},
        "layouts": layout_figs,
        "profiles": profiles,
        "entries": all_entries,
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    log(f"[bench] wrote {out} and {out.with_suffix('.json')} in {meta['total_s'] / 60:.1f} min")
    for r in rows:
        log(f"  {r['verdict']:<5} {r['what']}: {fmt(r['value'])} (target {r['target']})")
    if not args.workdir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any("error" in e for e in all_entries) or shape_problems else 0


if __name__ == "__main__":
    sys.exit(main())
