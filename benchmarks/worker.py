"""Runs benchmark measurements; started by run.py as a subprocess.

    python benchmarks/worker.py JOBS.json RESULTS.json

JOBS.json is a list of jobs; each is measured in turn and RESULTS.json is rewritten after
each one. run.py normally passes one job per process, so each system's peak memory is its
own; --smoke passes all jobs to one process to save the start-up time.

A job is {"system": name, "workload": Workload, "settings": Settings, "assets": dir,
"profile": path or null}. Systems:

    trl_dpo, trl_dpo_pre        TRL DPOTrainer (sigmoid loss), reference log-probs per step / precomputed
    mpo_{none,theta,phi}[_pre]  MallowsPOTrainer with mallows=none|theta|phi, per step / precomputed
    naive                       MallowsPO-theta the authors' way (baselines.naive_step)
    floor                       policy forward + backward with plain cross-entropy + AdamW (baselines.floor_step)
    refpass                     mallowspo's reference pass over the data, with and without the entropy statistic
    gemm                        this machine's GEMM rates at the shapes of the workload's step (roofline.py)

A system name may end in ``@fp32`` or ``@bf16`` (the same system in the other dtype of a run); the
dtype itself comes from the job's settings. ``settings.extra`` may hold ``padding_free`` (mallowspo
trainers) and ``attn_implementation`` (every model load).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Settings,
    Workload,
    batch_fingerprint,
    configure_threads,
    current_rss_mib,
    median,
    peak_rss_mib,
)

TRAINER_SYSTEMS = {
    "trl_dpo": ("trl", None, False),
    "trl_dpo_pre": ("trl", None, True),
    "mpo_none": ("mallowspo", "none", False),
    "mpo_none_pre": ("mallowspo", "none", True),
    "mpo_theta": ("mallowspo", "theta", False),
    "mpo_theta_pre": ("mallowspo", "theta", True),
    "mpo_phi": ("mallowspo", "phi", False),
    "mpo_phi_pre": ("mallowspo", "phi", True),
}
LOOP_SYSTEMS = ("naive", "floor")
ALL_SYSTEMS = (*TRAINER_SYSTEMS, *LOOP_SYSTEMS, "refpass", "gemm")


def base_system(name: str) -> str:
    """``mpo_phi_pre@bf16`` -> ``mpo_phi_pre``: the system a (possibly dtype-suffixed) name measures."""
    return name.split("@", 1)[0]


# ----------------------------------------------------------------------------- helpers


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _reset_cuda_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _cuda_peak_mib(device: str):
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return None


def _load_model(assets: Path, settings: Settings):
    """The benchmark weights in float32 (bf16 runs use autocast over fp32 master weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = (
        {"attn_implementation": settings.extra["attn_implementation"]}
        if settings.extra.get("attn_implementation")
        else {}
    )
    model = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32, **kwargs)
    return model.to(settings.device)


def _load_tokenizer(assets: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets / "model")


def _text_dataset(assets: Path):
    import datasets

    rows = [json.loads(line) for line in (assets / "data.jsonl").read_text().splitlines() if line.strip()]
    return datasets.Dataset.from_list(rows)


class _Profiler:
    """torch.profiler over a few steps after warm-up: its op table, then the same time grouped by
    kind of work (``profiling.op_groups``), written to ``path``; the grouping is kept in ``groups``."""

    def __init__(self, path: str | None, warmup: int, vocab_size: int, steps: int = 3, active: int = 3):
        self.path, self.prof, self.vocab_size, self.groups = path, None, vocab_size, None
        if path:
            import torch.profiler as tp

            self.prof = tp.profile(
                activities=[tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if _cuda_available() else []),
                schedule=tp.schedule(wait=max(warmup - 1, 0), warmup=1, active=max(1, min(active, steps)), repeat=1),
                record_shapes=True,
            )

    def __enter__(self):
        if self.prof:
            self.prof.__enter__()
        return self

    def step(self):
        if self.prof:
            self.prof.step()

    def __exit__(self, *exc):
        if self.prof:
            self.prof.__exit__(*exc)
            from profiling import op_groups, render_groups

            device = _cuda_available()
            sort = "self_device_time_total" if device else "self_cpu_time_total"
            table = self.prof.key_averages(group_by_input_shape=False).table(sort_by=sort, row_limit=40)
            events = self.prof.events()
            self.groups = {"cpu": op_groups(events, self.vocab_size)}
            if device:
                self.groups["device"] = op_groups(events, self.vocab_size, device_time=True)
            text = [table, ""]
            for clock, breakdown in self.groups.items():
                text += render_groups(f"Grouped ({clock})", breakdown)
            Path(self.path).write_text("\n".join(text))


def _cuda_allocated_mib(device: str):
    if device == "cuda":
        import torch

        return torch.cuda.memory_allocated() / 2**20
    return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- trainers


def _common_training_args(w: Workload, s: Settings, output_dir: str, precompute: bool) -> dict:
    """TrainingArguments shared by TRL's and mallowspo's configs: identical for both."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=w.batch_pairs,
        gradient_accumulation_steps=1,
        max_steps=s.warmup + s.steps,
        learning_rate=w.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=s.dtype == "bf16",
        fp16=False,
        use_cpu=s.device == "cpu",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=w.seed,
        data_seed=w.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=s.device == "cuda",
        beta=w.beta,
        max_length=w.max_length,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=w.batch_pairs,
    )


class _RecordingCollator:
    """Wraps the trainer's collator to record the first training batch's shape and checksums."""

    def __init__(self, inner):
        self.inner, self.first = inner, None

    def __call__(self, rows):
        batch = self.inner(rows)
        if self.first is None:
            self.first = batch_fingerprint(batch["input_ids"], batch["completion_mask"])
        return batch


def _make_step_timer(device: str, prof: _Profiler):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time between consecutive optimizer-step ends: everything a step costs
        (batch fetch and collation, forward, backward, clipping, AdamW, callbacks, metrics)."""

        def __init__(self):
            self.times, self.last, self.rss_before = [], None, None

        def on_train_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.rss_before = current_rss_mib()
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            now = time.perf_counter()
            self.times.append(now - self.last)
            prof.step()
            self.last = time.perf_counter()  # the profiler's bookkeeping is not part of the step

    return StepTimer()


def _build_trl(w, s, assets, precompute, output_dir):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_common_training_args(w, s, output_dir, precompute), loss_type=["sigmoid"])
    return DPOTrainer(
        model=_load_model(assets, s),
        args=args,
        train_dataset=_text_dataset(assets),
        processing_class=_load_tokenizer(assets),
    )


def _build_mallowspo(w, s, assets, variant, precompute, output_dir):
    from mallowspo.training.config import MallowsPOConfig
    from mallowspo.training.trainer import MallowsPOTrainer

    args = MallowsPOConfig(
        **_common_training_args(w, s, output_dir, precompute),
        padding_free=bool(s.extra.get("padding_free", False)),
        loss_type="sigmoid",
        mallows=variant,
        dispersion_normalization=w.phi_star,  # fixed phi*, the same constant the naive baseline uses
        max_prompt_length=w.prompt_len,
    )
    return MallowsPOTrainer(
        model=_load_model(assets, s),
        args=args,
        train_dataset=_text_dataset(assets),
        processing_class=_load_tokenizer(assets),
    )


def run_trainer(job: dict) -> dict:
    w, s, assets = Workload.from_dict(job["workload"]), Settings.from_dict(job["settings"]), Path(job["assets"])
    kind, variant, precompute = TRAINER_SYSTEMS[base_system(job["system"])]
    _reset_cuda_peak(s.device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-out-") as output_dir:
        # A fresh, private reference cache: every measurement runs its own reference pass.
        os.environ["MALLOWSPO_CACHE"] = str(Path(output_dir) / "mallowspo-cache")
        if kind == "trl":
            trainer = _build_trl(w, s, assets, precompute, output_dir)
        else:
            trainer = _build_mallowspo(w, s, assets, variant, precompute, output_dir)
        setup_s = time.perf_counter() - t0
        prof = _Profiler(job.get("profile"), s.warmup, w.vocab_size, s.steps)
        timer = _make_step_timer(s.device, prof)
        trainer.add_callback(timer)
        recorder = _RecordingCollator(trainer.data_collator)
        trainer.data_collator = recorder
        with prof:
            output = trainer.train()
    times = timer.times[s.warmup :]
    return {
        "step_times": times,
        "median_step_s": median(times),
        "setup_s": setup_s,
        "rss_before_train_mib": timer.rss_before,
        "batch": recorder.first,
        "train_loss": float(output.training_loss),
        "holds_ref_model": getattr(trainer, "ref_model", None) is not None,
        "profile_groups": prof.groups,
    }


# ----------------------------------------------------------------------------- plain loops


def _pair_rows(assets: Path) -> list[dict]:
    pairs = json.loads((assets / "pairs.json").read_text())
    return [
        {
            "prompt_input_ids": p["prompt_ids"],
            "chosen_input_ids": p["chosen_ids"],
            "rejected_input_ids": p["rejected_ids"],
        }
        for p in pairs
    ]


def run_loop(job: dict) -> dict:
    import torch
    from baselines import autocast_context, floor_step, make_optimizer, naive_step

    from mallowspo.training.collate import PreferenceCollator

    w, s, assets = Workload.from_dict(job["workload"]), Settings.from_dict(job["settings"]), Path(job["assets"])
    system = base_system(job["system"])
    _reset_cuda_peak(s.device)
    t0 = time.perf_counter()
    torch.manual_seed(w.seed)
    policy = _load_model(assets, s)
    policy.train()
    ref = None
    if system == "naive":
        ref = _load_model(assets, s)
        ref.eval()
        ref.requires_grad_(False)
    optimizer = make_optimizer(policy, w.learning_rate)
    rows = _pair_rows(assets)
    collate = PreferenceCollator(pad_token_id=0)
    autocast = autocast_context(s.device, s.dtype)
    setup_s = time.perf_counter() - t0

    times, first, loss = [], None, None
    prof = _Profiler(job.get("profile"), s.warmup, w.vocab_size, s.steps)
    _sync(s.device)
    rss_before = current_rss_mib()
    with prof:
        for step in range(s.warmup + s.steps):
            start = time.perf_counter()
            i = (step * w.batch_pairs) % len(rows)
            chunk = (rows + rows)[i : i + w.batch_pairs]
            batch = {k: v.to(s.device, non_blocking=True) for k, v in collate(chunk).items()}
            if first is None:
                first = batch_fingerprint(batch["input_ids"], batch["completion_mask"])
            if system == "naive":
                loss = naive_step(
                    policy,
                    ref,
                    batch,
                    optimizer,
                    beta=w.beta,
                    phi_star=w.phi_star,
                    vocab_size=w.vocab_size,
                    autocast=autocast,
                )
            else:
                loss = floor_step(policy, batch, optimizer, autocast=autocast)
            _sync(s.device)
            times.append(time.perf_counter() - start)
            prof.step()
    times = times[s.warmup :]
    return {
        "step_times": times,
        "median_step_s": median(times),
        "setup_s": setup_s,
        "rss_before_train_mib": rss_before,
        "batch": first,
        "train_loss": float(loss),
        "holds_ref_model": ref is not None,
        "profile_groups": prof.groups,
    }


# ----------------------------------------------------------------------------- reference pass


def run_refpass(job: dict) -> dict:
    """Throughput of mallowspo's reference pass (``compute_reference_columns``) with the
    entropy statistic (as the trainer runs it) and without it (log-probs only, what TRL's
    reference pass computes), on the first ``refpass_batches`` batches of the data. The two
    are timed alternately (ABBA), in the same process, on the same model."""
    import numpy as np
    from accelerate import Accelerator

    from mallowspo.training.collate import PreferenceCollator
    from mallowspo.training.data import PreferenceDataConfig, prepare_preference_dataset
    from mallowspo.training.head import add_completion_head
    from mallowspo.training.reference import compute_reference_columns

    w, s, assets = Workload.from_dict(job["workload"]), Settings.from_dict(job["settings"]), Path(job["assets"])
    repeats = int(s.extra.get("refpass_repeats", 3))
    n_batches = int(s.extra.get("refpass_batches", 4))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a previous job's precision must not carry over
    accelerator = Accelerator(cpu=s.device == "cpu", mixed_precision="bf16" if s.dtype == "bf16" else "no")
    tokenizer = _load_tokenizer(assets)
    dataset, _ = prepare_preference_dataset(
        _text_dataset(assets), tokenizer, PreferenceDataConfig(max_length=w.max_length, max_prompt_length=w.prompt_len)
    )
    dataset = dataset.select(range(min(len(dataset), n_batches * w.batch_pairs)))
    warmup_set = dataset.select(range(w.batch_pairs))
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    model = _load_model(assets, s)
    add_completion_head(model)

    def one_pass(label, data):
        _sync(s.device)
        start = time.perf_counter()
        columns = compute_reference_columns(
            model,
            data,
            collator,
            accelerator,
            w.batch_pairs,
            w.vocab_size,
            desc=label,
            with_entropy=label == "with_entropy",
        )
        _sync(s.device)
        return time.perf_counter() - start, columns

    one_pass("with_entropy", warmup_set)  # warm-up, one batch each
    one_pass("without_entropy", warmup_set)
    times, columns = {"with_entropy": [], "without_entropy": []}, {}
    for r in range(repeats):
        order = ("with_entropy", "without_entropy") if r % 2 == 0 else ("without_entropy", "with_entropy")
        for label in order:
            seconds, columns[label] = one_pass(label, dataset)
            times[label].append(seconds)
    # The reference log-probs are the same either way; only the first pass has the entropy.
    logps_match = bool(
        np.allclose(columns["with_entropy"]["ref_chosen_logps"], columns["without_entropy"]["ref_chosen_logps"])
        and np.allclose(
            columns["with_entropy"]["ref_rejected_logps"], columns["without_entropy"]["ref_rejected_logps"]
        )
    )
    n = len(dataset)
    return {
        "pairs": n,
        "with_entropy_s": times["with_entropy"],
        "without_entropy_s": times["without_entropy"],
        "with_entropy_pairs_per_s": n / median(times["with_entropy"]),
        "without_entropy_pairs_per_s": n / median(times["without_entropy"]),
        "round_ratios": [a / b for a, b in zip(times["with_entropy"], times["without_entropy"])],
        "logps_match": logps_match,
    }


# ----------------------------------------------------------------------------- entry point


def _release_memory(device: str) -> None:
    """Free what earlier jobs of this process left (cycles, the CUDA cache), so peaks are per job."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def run_job(job: dict) -> dict:
    s = Settings.from_dict(job["settings"])
    configure_threads(s.threads)
    _release_memory(s.device)
    allocated_before = _cuda_allocated_mib(s.device)
    system = base_system(job["system"])
    if system in TRAINER_SYSTEMS:
        result = run_trainer(job)
    elif system in LOOP_SYSTEMS:
        result = run_loop(job)
    elif system == "refpass":
        result = run_refpass(job)
    elif system == "gemm":
        from roofline import run_gemm_job

        result = run_gemm_job(job)
    else:
        raise ValueError(f"unknown system {system!r}; choose one of {ALL_SYSTEMS}")
    result["cuda_allocated_at_start_mib"] = allocated_before
    result["peak_rss_mib"] = peak_rss_mib()
    result["peak_cuda_mib"] = _cuda_peak_mib(s.device)
    result["pid"] = os.getpid()
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    jobs = json.loads(Path(argv[0]).read_text())
    results = []
    failed = False
    for job in jobs:
        entry = {"system": job["system"], "tag": job.get("tag")}
        start = time.perf_counter()
        try:
            entry["result"] = run_job(job)
        except Exception:  # one broken system must not lose the others' numbers
            entry["error"] = traceback.format_exc()
            print(entry["error"], file=sys.stderr)
            failed = True
        entry["job_wall_s"] = time.perf_counter() - start
        results.append(entry)
        Path(argv[1]).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
