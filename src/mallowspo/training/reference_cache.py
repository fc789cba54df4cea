"""The reference pass's on-disk cache: its key, its storage and the checks of what it holds.

Entries are keyed by the tokens themselves (a content hash of the token ids, which covers the
dataset, the tokenizer and the truncation), the reference weights, the tokenizer's vocabulary and
chat template, the data settings (max lengths, truncation, EOS) and the mixed-precision mode
(``reference_cache_key``). Writes are atomic (temp dir + rename): a run killed while writing
leaves no entry (``write_cache_atomically``). A damaged entry (unreadable, or holding values no
pass gives: NaN or inf, Hbar outside [0, 1], a negative entropy, a positive log-prob) reads as
missing (``read_valid_cache``). Used by the pairs' pass (``training.reference``) and the lists'
(``training.list_reference``).

Cache root: ``$MALLOWSPO_CACHE`` or ``~/.cache/mallowspo``; entries live in
``<root>/reference/<key>/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from trl.trainer.utils import hash_module

from mallowspo.training.data import TOKEN_COLUMNS

logger = logging.getLogger("mallowspo.training.reference")

CACHE_FORMAT_VERSION = 1
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_entropy", "ref_rejected_entropy", "hbar")
STALE_TMP_SECONDS = 3600  # a temp dir of a cache write older than this was left by a killed writer


# ---------------------------------------------------------------------------------------
# Cache key
# ---------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$MALLOWSPO_CACHE`` or ``~/.cache/mallowspo``."""
    return Path(os.environ.get("MALLOWSPO_CACHE") or Path.home() / ".cache" / "mallowspo").expanduser()


def token_fingerprint(dataset: datasets.Dataset, batch_size: int = 4096) -> str:
    """SHA-256 of the token columns in row order: the exact tokens both passes see."""
    digest = hashlib.sha256()
    view = dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow")
    for start in range(0, len(dataset), batch_size):
        table = view[start : start + batch_size]
        for name in TOKEN_COLUMNS:
            column = table.column(name).combine_chunks()
            digest.update(name.encode())
            digest.update(np.asarray(column.value_lengths(), dtype=np.int64).tobytes())
            digest.update(np.asarray(column.flatten(), dtype=np.int64).tobytes())
    return digest.hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the reference weights.

    For a PEFT model the reference is the base model with the adapter disabled, so the
    adapter's own tensors (named after the adapter, e.g. ``lora_A.default.weight``) are left out.
    """
    adapters = set(getattr(model, "peft_config", None) or ())
    if not adapters:
        return hash_module(model)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if adapters & set(name.split(".")):
            continue
        tensor = tensor.detach().cpu()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        if tensor.dtype not in (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bool):
            tensor = tensor.float()
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the vocabulary, the special tokens and the chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted(str(t) for t in tokenizer.all_special_tokens),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def reference_cache_key(
    tokens: str, weights: str, tokenizer: str, data_settings: dict[str, Any], precision: str
) -> tuple[str, dict[str, Any]]:
    """The cache key (hex) and the components it hashes (stored next to the entry)."""
    components = {
        "format": CACHE_FORMAT_VERSION,
        "tokens": tokens,
        "weights": weights,
        "tokenizer": tokenizer,
        "data": data_settings,
        "precision": precision,
    }
    key = hashlib.sha256(json.dumps(components, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return key, components


# ---------------------------------------------------------------------------------------
# Cache storage
# ---------------------------------------------------------------------------------------


def cache_dir_for(key: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / "reference" / key


def read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached columns at ``path``, or None when there is no complete, readable entry
    (an unreadable one, e.g. damaged on disk, is logged and treated as missing). Their values
    are checked by ``read_valid_cache``."""
    if not (path / "meta.json").is_file():
        return None
    try:
        rows = json.loads((path / "meta.json").read_text())["rows"]
        with np.load(path / "columns.npz") as stored:
            columns = {name: stored[name] for name in REFERENCE_COLUMNS}
    except Exception as error:  # noqa: BLE001 - any damage (JSON, zip, missing array) means: recompute
        logger.warning(
            "reference cache entry %s is unreadable (%s: %s); recomputing it", path, type(error).__name__, error
        )
        return None
    if any(len(values) != rows for values in columns.values()):
        logger.warning("reference cache entry %s is incomplete (not %d rows per column); recomputing it", path, rows)
        return None
    return columns


def read_valid_cache(path: Path) -> dict[str, np.ndarray] | None:
    """``read_cache``, and None for an entry holding values no reference pass gives
    (``invalid_reference_columns``): logged as damaged, then recomputed and replaced by the caller."""
    columns = read_cache(path)
    if columns is None:
        return None
    problem = invalid_reference_columns(columns)
    if problem is not None:
        logger.warning("reference cache entry %s is damaged (%s); recomputing it", path, problem)
        return None
    return columns


# Rounding slack for the signs of the cached values: a summed log-prob is <= 0 and a mean entropy >= 0
# exactly; a value beyond this slack on the wrong side is damage, not rounding.
SIGN_TOLERANCE = 1e-3


def invalid_reference_columns(columns: dict[str, np.ndarray]) -> str | None:
    """What is wrong with reference columns that no reference pass could have produced, or None:
    NaN or inf anywhere, Hbar outside [0, 1], a negative mean entropy, a positive summed log-prob."""
    problems = []
    for name, values in columns.items():
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            problems.append(f"{name} holds NaN or inf in {int((~finite).sum())} of {values.size} rows")
            continue
        if name == "hbar":
            bad, rule = (values < 0) | (values > 1), "outside [0, 1]"
        elif name.endswith("_entropy"):
            bad, rule = values < -SIGN_TOLERANCE, "negative"
        elif name.endswith("_logps"):
            bad, rule = values > SIGN_TOLERANCE, "positive"
        else:
            continue
        if bad.any():
            problems.append(f"{name} is {rule} in {int(bad.sum())} of {values.size} rows")
    return "; ".join(problems) or None


def check_finite_columns(columns: dict[str, np.ndarray], dataset: datasets.Dataset, name: str) -> None:
    """Raise FloatingPointError naming the rows when the reference pass gave NaN or inf.

    Such values would make the loss NaN (or silently meaningless) for those pairs; they are
    never cached.
    """
    bad = np.zeros(len(dataset), dtype=bool)
    for values in columns.values():
        bad |= ~np.isfinite(values)
    if not bad.any():
        return
    which = [column for column, values in columns.items() if not np.isfinite(values).all()]
    positions = np.flatnonzero(bad)
    rows = dataset["row_index"] if "row_index" in dataset.column_names else list(range(len(dataset)))
    examples = ", ".join(str(rows[int(i)]) for i in positions[:5])
    raise FloatingPointError(
        f"the reference pass ({name}) gave NaN or inf {'/'.join(which)} for {len(positions)} of {len(dataset)} "
        f"pairs (data rows {examples}{', ...' if len(positions) > 5 else ''}); nothing was cached. Usual cause: "
        "the reference model overflows in float16; load it in bfloat16 or float32 (--dtype bfloat16), or check "
        "its weights."
    )


def write_cache_atomically(path: Path, columns: dict[str, np.ndarray], components: dict[str, Any]) -> None:
    """Write the entry into a temp dir, then rename it into place; an entry written
    meanwhile by another process wins. A killed writer leaves only a ``.tmp-*`` dir, which
    a later write of the same key removes once it is STALE_TMP_SECONDS old."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".tmp-{path.name}-*"):
        try:
            if time.time() - stale.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:  # removed meanwhile by another writer
            continue
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        np.savez(tmp / "columns.npz", **columns)
        meta = {"rows": int(len(columns["hbar"])), "components": components}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))  # written last: marks completeness
        os.rename(tmp, path)
    except OSError:
        if not (path / "meta.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# One entry's life, shared by the pairs' and the lists' pass
# ---------------------------------------------------------------------------------------


def cache_entry(
    fingerprint: str, weights: str, tokenizer: Any, data_settings: dict[str, Any] | Any, accelerator: Accelerator
) -> tuple[Path, dict[str, Any]]:
    """The entry's directory and key components for this input (``data_settings``: a dataclass such as
    ``PreferenceDataConfig``, or a dict), decided on the main process and shared, so all processes agree."""
    if dataclasses.is_dataclass(data_settings):
        data_settings = dataclasses.asdict(data_settings)
    shared = list(
        reference_cache_key(
            fingerprint, weights, tokenizer_fingerprint(tokenizer), data_settings, str(accelerator.mixed_precision)
        )
    )
    broadcast_object_list(shared, from_process=0)
    key, components = shared
    return cache_dir_for(key), components


def reuse_entry(path: Path, read: Callable[[Path], dict[str, np.ndarray] | None]) -> dict[str, np.ndarray] | None:
    """The entry's columns by ``read`` (None when missing or unusable), with the main process's verdict
    shared, so that either every process reuses the entry or every one recomputes."""
    columns = read(path)  # once per process: every process needs the columns, the main one's verdict decides
    decision = [columns is not None]
    broadcast_object_list(decision, from_process=0)
    return columns if decision[0] else None


def store_entry(
    path: Path, columns: dict[str, np.ndarray], components: dict[str, Any], accelerator: Accelerator, name: str
) -> None:
    """Write the computed columns (the main process, replacing an unusable entry); a cache that cannot
    be written is a warning: it only saves time. Every process waits for the write."""
    if accelerator.is_main_process:
        try:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
            write_cache_atomically(path, columns, components)
            logger.info("reference pass (%s): cached at %s", name, path)
        except OSError as error:
            logger.warning(
                "reference pass (%s): could not cache the results at %s (%s); continuing without the "
                "cache (set MALLOWSPO_CACHE to a writable directory)",
                name,
                path,
                error,
            )
    accelerator.wait_for_everyone()
