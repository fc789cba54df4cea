"""Everything a lent GPU should tell us, in one call: the CUDA path's correctness, MallowsPO against
TRL's DPOTrainer on a 0.5-1B model, padding_free, and the phi link's small kernels.

    bash benchmarks/gpu_check.sh                                             # install + run, <= 8 min on one H200
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gc   # dry run on CPU, seconds

Sections (each written to the outputs as soon as it is done, so a run cut short keeps what it did):

(a) correctness (``gpu_correctness.py``): TRL's fused Triton LM head, what mallowspo's completion
    head runs on CUDA, against mallowspo's CPU head on the same batch (float32, and bf16 within the
    rounding bound of tests/training/test_bf16.py); one MallowsPO step's loss and gradients on CUDA
    against the CPU, float32.
(b) the GPU preset (``PRESETS["gpu"]``): a 630 M-parameter Llama built from a config (Qwen2.5-0.5B's
    widths, 151,936-token vocabulary, untied head; random init, no downloads), bf16 autocast, sequences
    of 512 and 2048 tokens: seconds per step and peak ``torch.cuda.max_memory_allocated`` of
    MallowsPO-phi and TRL's DPOTrainer (precomputed reference and reference per step), and the
    reference pass's tokens/s with and without the entropy statistic; then padding_free against padded
    rows on a length-skewed batch (flash_attention_2 when installed, else sdpa). The measurements are
    benchmarks/worker.py's, run in this process one after another (peaks reset per measurement).
(c) the phi link's small kernels: one profiled step; the ops, CUDA kernels and float64 work under
    ``mallowspo.links``' cubic-smoothed link (forward and backward), against the whole step's.
(d) outputs in ``--out``: ``gpu_check.md`` (level-3 sections, to paste under a GPU heading of
    benchmarks/RESULTS.md) and ``gpu_check.json`` (every number).

The exit status is 1 when a correctness check fails or a measurement crashes, else 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

QUIET_ENV = dict(
    TOKENIZERS_PARALLELISM="false",
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TQDM_DISABLE="1",
    TRANSFORMERS_VERBOSITY="error",
    PYTHONWARNINGS="ignore",
)

GPU_MODEL = dict(  # Qwen2.5-0.5B's widths as a Llama with an untied head: 630 M parameters
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2
)
TINY_MODEL = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
PRESETS = {
    "gpu": dict(
        model=GPU_MODEL,
        lengths=((128, 384), (512, 1536)),  # (prompt, response): sequences of 512 and 2048 tokens
        batch_pairs=4,
        n_pairs=16,
        steps=8,
        warmup=3,
        refpass_repeats=2,
        systems=("trl_dpo_pre", "mpo_phi_pre", "trl_dpo", "mpo_phi", "refpass"),
        # the correctness model: small enough for the CPU side, with a 32k head
        check=dict(
            vocab_size=32768,
            hidden_size=512,
            intermediate_size=1408,
            num_layers=4,
            num_heads=8,
            num_kv_heads=2,
            prompt_len=64,
            response_len=192,
            batch_pairs=4,
            n_pairs=8,
        ),
        budget_s=330,  # this script's share of the 8 minutes (the install takes the rest)
    ),
    "tiny": dict(
        model=TINY_MODEL,
        lengths=((8, 8),),
        batch_pairs=2,
        n_pairs=4,
        steps=1,
        warmup=1,
        refpass_repeats=1,
        systems=("trl_dpo_pre", "mpo_phi_pre", "refpass"),
        check=dict(TINY_MODEL, prompt_len=8, response_len=8, batch_pairs=2, n_pairs=4),
        budget_s=120,
    ),
}
LINK_FORWARD, LINK_BACKWARD = "mallowspo.links: cubic phi link forward", "mallowspo.links: cubic phi link backward"


# ----------------------------------------------------------------------------- (b) the benchmark


def bench_jobs(preset: dict, device: str, threads: int, root: Path) -> tuple[list[dict], list[dict]]:
    """The preset's measurements: per length every system, then padded vs padding_free (skewed data)."""
    from common import Settings, Workload, build_assets
    from transformers.utils import is_flash_attn_2_available

    def job(system, tag, w, extra=None):
        settings = Settings(
            device=device,
            dtype="bf16",
            threads=threads,
            steps=preset["steps"],
            warmup=preset["warmup"],
            extra={"refpass_repeats": preset["refpass_repeats"], **(extra or {})},
        )
        assets = build_assets(w, root / "assets")
        return dict(
            system=system,
            tag=tag,
            round=0,
            workload=w.to_dict(),
            settings=settings.to_dict(),
            assets=str(assets),
            profile=None,
        )

    base = Workload(**preset["model"], batch_pairs=preset["batch_pairs"], n_pairs=preset["n_pairs"])
    main = []
    for prompt, response in preset["lengths"]:
        w = base.with_(prompt_len=prompt, response_len=response)
        main += [job(s, f"L{w.max_length}-{s}", w) for s in preset["systems"]]
    prompt, response = preset["lengths"][-1]
    skewed = base.with_(prompt_len=prompt, response_len=response, skewed=True)
    attention = "flash_attention_2" if device == "cuda" and is_flash_attn_2_available() else "sdpa"
    packed = [
        job(
            "mpo_phi_pre",
            f"skewed-{layout}",
            skewed,
            {"padding_free": layout == "padding_free", "attn_implementation": attention},
        )
        for layout in ("padded", "padding_free")
    ]
    return main, packed


def run_measurements(jobs: list[dict], deadline: float, log) -> list[dict]:
    """worker.run_job for each job in turn, in this process; a job that would not fit before
    ``deadline`` (its estimate: the previous one's wall time) is skipped and says so."""
    import worker

    entries, last = [], 0.0
    for job in jobs:
        entry = dict(system=job["system"], tag=job["tag"], round=0)
        if deadline - time.monotonic() < max(10.0, 1.2 * last):
            entry["error"] = "skipped: the time budget (--budget-s) ran out"
            log(f"  {job['tag']:<32} skipped (budget)")
            entries.append(entry)
            continue
        start = time.perf_counter()
        try:
            entry["result"] = worker.run_job(job)
        except Exception:  # one failed measurement must not lose the others
            entry["error"] = traceback.format_exc()
        last = entry["wall_s"] = time.perf_counter() - start
        status = "error" if "error" in entry else f"{entry['result'].get('median_step_s') or 0:.4f} s/step"
        log(f"  {job['tag']:<32} {status} ({last:.0f} s)")
        entries.append(entry)
    return entries


def summarise_bench(main_entries, packed_entries, preset, device) -> dict:
    import run
    from common import Workload

    out = {"lengths": []}
    for prompt, response in preset["lengths"]:
        length = prompt + response
        entries = [e for e in main_entries if e["tag"].startswith(f"L{length}-")]
        summary = run.summarise(entries, device)
        ref = summary.get("refpass", {})
        tokens = 2 * length  # tokens per pair (every sequence full length)
        row = dict(length=length, prompt=prompt, response=response, summary=summary)
        for name in ("with_entropy", "without_entropy"):
            pairs_per_s = ref.get(f"{name}_pairs_per_s")
            row[f"ref_{name}_tokens_per_s"] = pairs_per_s * tokens if pairs_per_s else None
        row["ref_entropy_ratio"] = run.median(ref.get("round_ratio") or [])
        for pre in ("_pre", ""):
            row[f"step_ratio{pre}"] = run.paired_ratio(summary, f"mpo_phi{pre}", f"trl_dpo{pre}")[0]
            row[f"memory_ratio{pre}"] = run.memory_ratio(summary, f"mpo_phi{pre}", f"trl_dpo{pre}")
        out["lengths"].append(row)
    packed = {}
    for e in packed_entries:
        layout = e["tag"].split("-", 1)[1]
        info = dict(error=e.get("error"))
        if "result" in e:
            r = e["result"]
            info.update(
                median_step_s=r["median_step_s"],
                peak_mib=r["peak_cuda_mib"] if device == "cuda" else r["peak_rss_mib"],
                batch=r["batch"],
            )
        packed[layout] = info
    a, b = packed.get("padding_free", {}), packed.get("padded", {})
    out["padding_free"] = dict(
        layouts=packed,
        step_ratio=(a["median_step_s"] / b["median_step_s"])
        if a.get("median_step_s") and b.get("median_step_s")
        else None,
        memory_ratio=(a["peak_mib"] / b["peak_mib"]) if a.get("peak_mib") and b.get("peak_mib") else None,
    )
    w = Workload(**preset["model"])
    out["model"] = dict(parameters=w.parameter_count(), **preset["model"])
    return out


# ----------------------------------------------------------------------------- (c) the phi link's kernels


def link_kernels(trainer, batch, device: str) -> dict:
    """Profile one bf16-autocast training step (compute_loss + backward) of ``trainer``; count what runs
    under the cubic phi link's forward and backward (labelled here by wrapping them) and in the step."""
    import torch
    import torch.profiler as tp
    from profiling import NO_KERNEL_OPS, count_kernels_in
    from torch.autograd import DeviceType

    import mallowspo.links as links

    link = links._LogCubicSmoothedPhiLink  # the default smoothing's autograd Function
    forward, backward = link.forward, link.backward

    def labelled_forward(ctx, *args):
        with tp.record_function(LINK_FORWARD):
            return forward(ctx, *args)

    def labelled_backward(ctx, *args):
        with tp.record_function(LINK_BACKWARD):
            return backward(ctx, *args)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    model = trainer.model
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        sync()

    activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if device == "cuda" else [])
    link.forward, link.backward = staticmethod(labelled_forward), staticmethod(labelled_backward)
    try:
        step()  # warm-up
        start = time.perf_counter()
        step()
        step_s = time.perf_counter() - start
        with tp.profile(activities=activities, record_shapes=True) as prof:
            step()
    finally:
        link.forward, link.backward = staticmethod(forward), staticmethod(backward)
    events = prof.events()
    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    step_kernels = [k for e in cpu_events for k in (e.kernels or [])]
    leaves = [
        e
        for e in cpu_events
        if e.name.startswith("aten::") and not any(c.name.startswith("aten::") for c in e.cpu_children)
    ]
    return dict(
        forward=count_kernels_in(events, LINK_FORWARD),
        backward=count_kernels_in(events, LINK_BACKWARD),
        step=dict(
            ops=len(leaves),
            compute_ops=sum(e.name not in NO_KERNEL_OPS for e in leaves),
            kernels=len(step_kernels),
            kernel_ms=sum(k.duration for k in step_kernels) / 1e3,
            wall_s=step_s,
        ),
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU dry run; numbers meaningless)")
    p.add_argument(
        "--out", default=str(HERE.parent / "runs" / "gpu_check"), help="directory for gpu_check.md and .json"
    )
    p.add_argument("--budget-s", type=float, help="seconds for the measurements; later ones are skipped past it")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: correctness,bench,kernels")
    return p.parse_args(argv)


def main(argv=None) -> int:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    args = parse_args(argv)
    t0, started = time.perf_counter(), time.monotonic()
    preset_name = "tiny" if args.tiny else "gpu"
    preset = PRESETS[preset_name]
    budget = args.budget_s or preset["budget_s"]
    deadline = started + budget
    skip = {s for s in args.skip.split(",") if s}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"

    def log(msg):
        print(msg, flush=True)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        log("[gpu-check] --device cuda but torch sees no CUDA device; use --device cpu --tiny for the dry run")
        return 2
    import run
    from common import Workload, available_cores, build_assets

    from mallowspo.training.head import _triton_device

    threads = 1 if args.tiny else available_cores()
    torch.set_num_threads(threads)
    results = dict(
        meta=dict(
            argv=" ".join(sys.argv[1:]) if argv is None else " ".join(argv),
            date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            device=args.device,
            preset=dict(preset, model=dict(preset["model"])),
            machine=run.machine_info(args.device),
            versions=run.versions(),
            extra_versions=f"triton available: {_triton_device(torch.device('cuda')) if args.device == 'cuda' else 'n/a'}; "
            f"CUDA {torch.version.cuda}; cuDNN {torch.backends.cudnn.version() if args.device == 'cuda' else 'n/a'}",
            budget_s=budget,
        ),
        problems=[],
    )

    from gpu_report import render

    def write():
        results["meta"]["total_s"] = time.perf_counter() - t0
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "gpu_check.md").write_text(render(results))

    def section(name, fn):
        log(f"[gpu-check] {name} ...")
        start = time.perf_counter()
        try:
            value = fn()
        except Exception:
            value = {"error": traceback.format_exc()}
            results["problems"].append(f"{name}: crashed ({value['error'].strip().splitlines()[-1]})")
            log(value["error"])
        log(f"[gpu-check] {name}: {time.perf_counter() - start:.0f} s")
        return value

    check_w = Workload(**preset["check"])
    assets = build_assets(check_w, work / "assets")
    trainer_batch = {}
    if "correctness" not in skip:
        from gpu_correctness import head_check, step_check

        results["head"] = section("head check", lambda: head_check(assets, args.device, check_w.batch_pairs))
        if results["head"].get("ok") is False:
            results["problems"].append("head check failed")
        write()

        def steps():
            result, trainer, batch = step_check(assets, check_w, args.device)
            trainer_batch.update(trainer=trainer, batch=batch)
            return result

        results["step"] = section("step check", steps)
        if results["step"].get("ok") is False:
            results["problems"].append("step check failed")
        write()
    if "kernels" not in skip:
        if not trainer_batch:
            from gpu_correctness import _trainer

            trainer = _trainer(assets, check_w, args.device, str(work / "kernels"))
            batch = next(iter(trainer.get_train_dataloader()))
            trainer_batch.update(trainer=trainer, batch={k: v.to(trainer.args.device) for k, v in batch.items()})
        results["kernels"] = section(
            "phi link kernels", lambda: link_kernels(trainer_batch["trainer"], trainer_batch["batch"], args.device)
        )
        trainer_batch.clear()
        write()
    if "bench" not in skip:
        main_jobs, packed_jobs = bench_jobs(preset, args.device, threads, work)
        results["meta"]["attention"] = packed_jobs[0]["settings"]["extra"]["attn_implementation"]

        def bench():
            # Most wanted first, in case the budget runs out: precomputed-reference systems and the
            # reference pass at every length, padding_free, then the reference-per-step systems.
            per_step = [j for j in main_jobs if j["system"] in ("trl_dpo", "mpo_phi")]
            first = [j for j in main_jobs if j not in per_step]
            entries = run_measurements(first + packed_jobs + per_step, deadline, log)
            results["bench_entries"] = entries
            for e in entries:
                if "error" in e:
                    results["problems"].append(f"{e['tag']}: {e['error'].strip().splitlines()[-1]}")
            main_entries = [e for e in entries if e["tag"].startswith("L")]
            packed_entries = [e for e in entries if e["tag"].startswith("skewed-")]
            return summarise_bench(main_entries, packed_entries, preset, args.device)

        results["bench"] = section("benchmark", bench)
        if "error" in results["bench"]:
            results["bench"] = None
    write()
    log(
        f"[gpu-check] wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'} in {(time.perf_counter() - t0) / 60:.1f} min"
    )
    for problem in results["problems"]:
        log(f"  PROBLEM {problem}")
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
