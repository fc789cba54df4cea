"""Runs benchmark measurements; started by run.py as a subprocess.

    python benchmarks/worker.py JOBS.json RESULTS.json

JOBS.json is a list of jobs; each is measured in turn and RESULTS.json is rewritten after
each one. run.py normally passes one job per process, so each system's peak memory is its
own; --smoke passes all jobs to one process to save the start-up time.

A job is {"system": name, "workload": Workload, "settings": Settings, "assets": dir,
"profile": path or null}. Systems:

    trl_dpo, trl_dpo_pre        TRL DPOTrainer (sigmoid loss), reference log-probs per step / precomputed
    mpo_{none,theta,phi}[_pre]  MallowsPOTrainer with mallows=none|theta|phi, per step / precomputed
    mpo_phi_pre_packed          mpo_phi_pre with padding_free=True (the batch's sequences packed into one row)
    mpo_phi_pre_lists           mpo_phi_pre with objective=all_pairs on the workload's ranked lists (lists.jsonl)
    mpo_theta_pre_pl            mallows=theta, precomputed, objective=plackett_luce on the ranked lists
    naive                       MallowsPO-theta the authors' way (baselines.naive_step)
    floor                       policy forward + backward with plain cross-entropy + AdamW (baselines.floor_step)
    refpass                     mallowspo's reference pass over the data, with and without the entropy statistic,
                                against the model's plain forward over the same batches; and the cache's write/read
    refpass_lists               the list reference pass over the ranked lists against the pair pass over the same
                                prompts' pairs (best against worst): seconds per response sequence
    gemm                        this machine's GEMM rates at the shapes of the workload's step (roofline.py)

A system name may end in ``@fp32`` or ``@bf16`` (the same system in the other dtype of a run); the
dtype itself comes from the job's settings. ``settings.extra`` may hold ``padding_free`` (mallowspo
trainers without a setting of their own in ``TRAINER_OPTIONS``), ``attn_implementation`` (every model
load) and ``refpass_repeats``, ``refpass_batches`` (the reference-pass systems).

Every trainer records its first batch (``_RecordingCollator``): shape and checksums
(``common.batch_fingerprint``; pairs or lists, padded or packed) and layout (``common.batch_layout``:
sequences, real tokens, tokens in the batch tensors).
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
    batch_layout,
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
    "mpo_phi_pre_packed": ("mallowspo", "phi", True),
    "mpo_phi_pre_lists": ("mallowspo", "phi", True),
    "mpo_theta_pre_pl": ("mallowspo", "theta", True),
}
# MallowsPOConfig settings of the systems that differ from their base system only in these.
TRAINER_OPTIONS = {
    "mpo_phi_pre_packed": {"padding_free": True},
    "mpo_phi_pre_lists": {"objective": "all_pairs"},
    "mpo_theta_pre_pl": {"objective": "plackett_luce"},
}
LOOP_SYSTEMS = ("naive", "floor")
ALL_SYSTEMS = (*TRAINER_SYSTEMS, *LOOP_SYSTEMS, "refpass", "refpass_lists", "gemm")


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


def _text_dataset(assets: Path, name: str = "data.jsonl"):
    """The text rows of the assets: the pairs (``data.jsonl``) or the ranked lists (``lists.jsonl``)."""
    import datasets

    rows = [json.loads(line) for line in (assets / name).read_text().splitlines() if line.strip()]
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
    """Wraps the trainer's collator to record the first training batch's shape, checksums and layout
    (``common.batch_layout``); any collator's batch: pairs or lists, padded or packed."""

    def __init__(self, inner):
        self.inner, self.first = inner, None

    def __call__(self, rows):
        batch = self.inner(rows)
        if self.first is None:
            self.first = {**batch_fingerprint(batch["input_ids"], batch.get("completion_mask")), **batch_layout(batch)}
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


def _build_mallowspo(w, s, assets, variant, precompute, output_dir, options=None):
    """MallowsPOTrainer of ``mallows=variant``; ``options`` (``TRAINER_OPTIONS``): padding_free (else
    ``settings.extra``'s) and a listwise objective, which trains on the ranked lists (``lists.jsonl``)."""
    from mallowspo.training.config import MallowsPOConfig
    from mallowspo.training.trainer import MallowsPOTrainer

    options = options or {}
    objective = options.get("objective", "pairwise")
    args = MallowsPOConfig(
        **_common_training_args(w, s, output_dir, precompute),
        padding_free=bool(options.get("padding_free", s.extra.get("padding_free", False))),
        objective=objective,
        loss_type="sigmoid",
        mallows=variant,
        dispersion_normalization=w.phi_star,  # fixed phi*, the same constant the naive baseline uses
        max_prompt_length=w.prompt_len,
    )
    return MallowsPOTrainer(
        model=_load_model(assets, s),
        args=args,
        train_dataset=_text_dataset(assets, "data.jsonl" if objective == "pairwise" else "lists.jsonl"),
        processing_class=_load_tokenizer(assets),
    )


def run_trainer(job: dict) -> dict:
    w, s, assets = Workload.from_dict(job["workload"]), Settings.from_dict(job["settings"]), Path(job["assets"])
    system = base_system(job["system"])
    kind, variant, precompute = TRAINER_SYSTEMS[system]
    _reset_cuda_peak(s.device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-out-") as output_dir:
        # A fresh, private reference cache: every measurement runs its own reference pass.
        os.environ["MALLOWSPO_CACHE"] = str(Path(output_dir) / "mallowspo-cache")
        if kind == "trl":
            trainer = _build_trl(w, s, assets, precompute, output_dir)
        else:
            trainer = _build_mallowspo(w, s, assets, variant, precompute, output_dir, TRAINER_OPTIONS.get(system))
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


def _reference_accelerator(s: Settings):
    """A fresh Accelerator in the run's device and precision (a previous job's must not carry over)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=s.device == "cpu", mixed_precision="bf16" if s.dtype == "bf16" else "no")


def _pair_dataset(assets: Path, tokenizer, w: Workload):
    """The workload's pairs, tokenized as the trainer does (``prepare_preference_dataset``)."""
    from mallowspo.training.data import PreferenceDataConfig, prepare_preference_dataset

    config = PreferenceDataConfig(max_length=w.max_length, max_prompt_length=w.prompt_len)
    return prepare_preference_dataset(_text_dataset(assets), tokenizer, config)[0]


def _reference_model(assets: Path, s: Settings):
    from mallowspo.training.head import add_completion_head

    model = _load_model(assets, s)
    add_completion_head(model)
    return model


def _timed(device: str, fn):
    """(seconds, fn()) with the device synchronised on both sides."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _plain_forward(model, dataset, collator, accelerator, batch_size: int) -> None:
    """The model's own forward (full logits at every position, nothing else) over the reference pass's
    batches: same loader, no_grad and autocast, so only what the pass computes differs."""
    import torch
    from torch.utils.data import DataLoader

    from mallowspo.training.data import TOKEN_COLUMNS

    loader = DataLoader(
        dataset.select_columns(list(TOKEN_COLUMNS)), batch_size=batch_size, shuffle=False, collate_fn=collator
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in accelerator.prepare(loader):
                with accelerator.autocast():  # the output holds the (rows, length, vocab) logits
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        model.train(was_training)


def _real_tokens(dataset, collator, batch_size: int) -> int:
    """The non-padding tokens of the reference pass's batches (their attention masks' sum)."""
    from mallowspo.training.data import TOKEN_COLUMNS

    rows = dataset.select_columns(list(TOKEN_COLUMNS))
    total = 0
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        total += int(batch["attention_mask"].sum())
    return total


def _time_cache(columns: dict, repeats: int) -> dict:
    """Seconds to write the reference columns to a cache entry (``write_cache_atomically``) and read them
    back (``read_valid_cache``, from the page cache), each repeat a new entry in a temp dir."""
    import numpy as np

    from mallowspo.training.reference_cache import read_valid_cache, write_cache_atomically

    write_s, read_s, same = [], [], True
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as root:
        for r in range(repeats):
            path = Path(root) / f"entry-{r}"
            start = time.perf_counter()
            write_cache_atomically(path, columns, {"benchmark": "refpass", "entry": r})
            write_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            read = read_valid_cache(path)
            read_s.append(time.perf_counter() - start)
            same = same and read is not None and all(np.array_equal(read[k], columns[k]) for k in columns)
    return {"cache_write_s": write_s, "cache_read_s": read_s, "cache_roundtrip_ok": bool(same)}


REFPASS_VARIANTS = ("with_entropy", "without_entropy", "plain_forward")


def run_refpass(job: dict) -> dict:
    """Throughput of mallowspo's reference pass (``compute_reference_columns``) with the
    entropy statistic (as the trainer runs it) and without it (log-probs only, what TRL's
    reference pass computes), and of the model's plain forward over the same batches, on the
    first ``refpass_batches`` batches of the data. The three are timed in turn in the same process,
    on the same model, their order rotated from one repeat to the next. Then the cache's write and
    read of the columns."""
    import numpy as np

    from mallowspo.training.collate import PreferenceCollator
    from mallowspo.training.reference import compute_reference_columns

    w, s, assets = Workload.from_dict(job["workload"]), Settings.from_dict(job["settings"]), Path(job["assets"])
    repeats = int(s.extra.get("refpass_repeats", 3))
    n_batches = int(s.extra.get("refpass_batches", 4))
    accelerator = _reference_accelerator(s)
    tokenizer = _load_tokenizer(assets)
    dataset = _pair_dataset(assets, tokenizer, w)
    dataset = dataset.select(range(min(len(dataset), n_batches * w.batch_pairs)))
    warmup_set = dataset.select(range(w.batch_pairs))
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    model = _reference_model(assets, s)

    def one_pass(label, data):
        if label == "plain_forward":
            return _timed(s.device, lambda: _plain_forward(model, data, collator, accelerator, w.batch_pairs))
        return _timed(
            s.device,
            lambda: compute_reference_columns(
                model,
                data,
                collator,
                accelerator,
                w.batch_pairs,
                w.vocab_size,
                desc=label,
                with_entropy=label == "with_entropy",
            ),
        )

    for label in REFPASS_VARIANTS:  # warm-up, one batch each
        one_pass(label, warmup_set)
    times, columns = {label: [] for label in REFPASS_VARIANTS}, {}
    for r in range(repeats):
        shift = r % len(REFPASS_VARIANTS)
        for label in REFPASS_VARIANTS[shift:] + REFPASS_VARIANTS[:shift]:
            seconds, columns[label] = one_pass(label, dataset)
            times[label].append(seconds)
    # The reference log-probs are the same either way; only the first pass has the entropy.
    logps_match = bool(
        np.allclose(columns["with_entropy"]["ref_chosen_logps"], columns["without_entropy"]["ref_chosen_logps"])
        and np.allclose(
            columns["with_entropy"]["ref_rejected_logps"], columns["without_entropy"]["ref_rejected_logps"]
        )
    )
    n, tokens = len(dataset), _real_tokens(dataset, collator, w.batch_pairs)
    plain = times["plain_forward"]
    return {
        "pairs": n,
        "tokens": tokens,
        "with_entropy_s": times["with_entropy"],
        "without_entropy_s": times["without_entropy"],
        "plain_forward_s": plain,
        **{f"{label}_pairs_per_s": n / median(times[label]) for label in REFPASS_VARIANTS},
        **{f"{label}_tokens_per_s": tokens / median(times[label]) for label in REFPASS_VARIANTS},
        "round_ratios": [a / b for a, b in zip(times["with_entropy"], times["without_entropy"])],
        "with_entropy_over_plain": [a / b for a, b in zip(times["with_entropy"], plain)],
        "without_entropy_over_plain": [a / b for a, b in zip(times["without_entropy"], plain)],
        "logps_match": logps_match,
        **_time_cache(columns["with_entropy"], repeats),
    }


def _list_dataset(assets: Path, tokenizer, w: Workload):
    """The workload's ranked lists, tokenized as the listwise trainer does (``prepare_list_dataset``)."""
    from mallowspo.training.data import ListDataConfig, PreferenceDataConfig, prepare_list_dataset

    config = PreferenceDataConfig(max_length=w.max_length, max_prompt_length=w.prompt_len)
    return prepare_list_dataset(_text_dataset(assets, "lists.jsonl"), tokenizer, config, ListDataConfig())[0]


def run_refpass_lists(job: dict) -> dict:
    """The reference pass per response: ``compute_list_reference_columns`` over the ranked lists against
    ``compute_reference_columns`` over the same prompts' pairs (best against worst), alternated (ABBA) in
    one process on the same model, ``batch_pairs`` prompts per batch; seconds per response sequence."""
    import numpy as np

    from mallowspo.training.collate import PreferenceCollator
    from mallowspo.training.list_collate import ListCollator
    from mallowspo.training.list_reference import compute_list_reference_columns
    from mallowspo.training.reference import compute_reference_columns

    w, s, assets = Workload.from_dict(job["workload"]), Settings.from_dict(job["settings"]), Path(job["assets"])
    repeats = int(s.extra.get("refpass_repeats", 3))
    accelerator = _reference_accelerator(s)
    tokenizer = _load_tokenizer(assets)
    data = {"lists": _list_dataset(assets, tokenizer, w), "pairs": _pair_dataset(assets, tokenizer, w)}
    collators = {"lists": ListCollator(tokenizer.pad_token_id), "pairs": PreferenceCollator(tokenizer.pad_token_id)}
    passes = {"lists": compute_list_reference_columns, "pairs": compute_reference_columns}
    model = _reference_model(assets, s)

    def one_pass(kind, dataset):
        args = (model, dataset, collators[kind], accelerator, w.batch_pairs, w.vocab_size)
        return _timed(s.device, lambda: passes[kind](*args, desc=f"reference pass ({kind})"))

    for kind in data:  # warm-up, one batch each
        one_pass(kind, data[kind].select(range(w.batch_pairs)))
    times, columns = {"lists": [], "pairs": []}, {}
    for r in range(repeats):
        for kind in ("lists", "pairs") if r % 2 == 0 else ("pairs", "lists"):
            seconds, columns[kind] = one_pass(kind, data[kind])
            times[kind].append(seconds)
    responses = {"lists": int(columns["lists"]["list_sizes"].sum()), "pairs": 2 * len(data["pairs"])}
    per_response = {kind: [t / responses[kind] for t in times[kind]] for kind in times}
    # Each list's first and last responses are its pair's chosen and rejected: the same log-probs.
    ends = np.cumsum(columns["lists"]["list_sizes"])
    logps = columns["lists"]["ref_logps"]
    logps_match = bool(
        np.allclose(logps[ends - columns["lists"]["list_sizes"]], columns["pairs"]["ref_chosen_logps"], rtol=1e-4)
        and np.allclose(logps[ends - 1], columns["pairs"]["ref_rejected_logps"], rtol=1e-4)
    )
    return {
        "lists": len(data["lists"]),
        "responses": responses,
        "lists_s": times["lists"],
        "pairs_s": times["pairs"],
        "lists_s_per_response": median(per_response["lists"]),
        "pairs_s_per_response": median(per_response["pairs"]),
        "round_ratios": [a / b for a, b in zip(per_response["lists"], per_response["pairs"])],
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
    elif system == "refpass_lists":
        result = run_refpass_lists(job)
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
