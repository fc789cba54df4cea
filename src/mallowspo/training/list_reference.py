"""The reference pass over ranked lists: every response scored once, and the cache.

For each list of K responses it computes, batch by batch (as ``training.reference`` does for pairs,
whose cache key, storage and checks it uses):

    ref_logps     (K,) summed completion log-probs of each response (nats)
    ref_entropy   (K,) mean per-token entropy of the next-token distribution over each completion (nats)
    lengths       (K,) completion tokens of each response
    hbar          Hbar(x), eq. 11 over K responses: the mean over the responses of their per-token
                  mean entropy, divided by log V, in [0, 1],

                      Hbar(x) = 1/K sum_k H_k / (|y_k| log V)

                  with K = 2 exactly eq. 11 (``mallowspo.dispersion.normalized_entropy``). The dispersion
                  path (``training.reference.with_dispersion``) then makes ``neg_log_phi`` from it as for pairs.

Cached as flat arrays (the responses of all lists back to back, and ``list_sizes``) under a key of
the list tokens, the reference weights, the tokenizer and the data settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mallowspo.training.data.binarize import is_list_dataset
from mallowspo.training.data.lists import LIST_TOKEN_COLUMNS
from mallowspo.training.list_collate import ListCollator, scatter_responses
from mallowspo.training.reference import ReferenceResult, load_or_compute_reference_columns, with_columns
from mallowspo.training.reference_cache import (
    cache_entry,
    check_finite_columns,
    invalid_reference_columns,
    reuse_entry,
    store_entry,
    token_fingerprint,
)
from mallowspo.training.scoring import output_vocab_size, score_completions

logger = logging.getLogger(__name__)

LIST_REFERENCE_COLUMNS = ("ref_logps", "ref_entropy", "lengths")  # per response, (K,) per row
STORED_COLUMNS = (*LIST_REFERENCE_COLUMNS, "list_sizes", "hbar")


def list_hbar(mean_entropy: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Hbar(x) over K responses (module docstring): (N, K) mean entropies, (N, K) bool mask -> (N,)."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    total = torch.where(mask, mean_entropy, torch.zeros_like(mean_entropy)).sum(dim=1)
    return (total / mask.sum(dim=1).to(total.dtype) / math.log(vocab_size)).clamp(0.0, 1.0)


@torch.no_grad()
def compute_list_reference_columns(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    collator: ListCollator,
    accelerator: Accelerator,
    batch_size: int,
    vocab_size: int,
    reference_context: Callable[[], AbstractContextManager] = nullcontext,
    desc: str = "reference pass",
) -> dict[str, np.ndarray]:
    """One pass of the reference over tokenized lists; the ``STORED_COLUMNS``: flat (sum K,) float64
    per-response columns in row order, ``list_sizes`` (N,) and ``hbar`` (N,). Batches of
    ``batch_size`` prompts are sharded over processes and gathered back in dataset order."""
    sizes = list_sizes(dataset)
    width = int(sizes.max())  # every batch is padded to the widest list: one shape to gather
    loader = DataLoader(
        dataset.select_columns(list(LIST_TOKEN_COLUMNS)), batch_size=batch_size, shuffle=False, collate_fn=collator
    )
    loader = accelerator.prepare(loader)
    was_training = model.training
    model.eval()
    parts = []
    try:
        for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process):
            with reference_context(), accelerator.autocast():
                scores = score_completions(model, batch, with_entropy=True)
            grids = [scatter_responses(v.double(), batch) for v in (scores.logps, scores.mean_entropy, scores.lengths)]
            stacked = torch.nn.functional.pad(torch.stack(grids, dim=-1), (0, 0, 0, width - grids[0].size(1)))
            parts.append(accelerator.gather_for_metrics(stacked).cpu())
    finally:
        model.train(was_training)
    grid = torch.cat(parts)  # (N, width, 3)
    mask = torch.arange(width)[None, :] < torch.from_numpy(sizes)[:, None]
    columns = {name: grid[..., i][mask].numpy() for i, name in enumerate(LIST_REFERENCE_COLUMNS)}
    columns["list_sizes"] = sizes
    columns["hbar"] = list_hbar(grid[..., 1], mask, vocab_size).numpy()
    return columns


def list_sizes(dataset: datasets.Dataset) -> np.ndarray:
    """(N,) int64: the number of responses of each list (read from arrow, no token copied)."""
    column = dataset.select_columns(["responses_input_ids"]).with_format("arrow")[:].column(0).combine_chunks()
    return np.asarray(column.value_lengths(), dtype=np.int64)


def list_token_fingerprint(dataset: datasets.Dataset, batch_size: int = 4096) -> str:
    """SHA-256 of the list tokens in row order (the prompt and every response, with their lengths)."""
    digest = hashlib.sha256(b"lists")
    view = dataset.select_columns(list(LIST_TOKEN_COLUMNS)).with_format("arrow")
    for start in range(0, len(dataset), batch_size):
        table = view[start : start + batch_size]
        prompts = table.column("prompt_input_ids").combine_chunks()
        responses = table.column("responses_input_ids").combine_chunks()
        for lengths in (prompts.value_lengths(), responses.value_lengths(), responses.flatten().value_lengths()):
            digest.update(np.asarray(lengths, dtype=np.int64).tobytes())
        for ids in (prompts.flatten(), responses.flatten().flatten()):
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def data_fingerprint(dataset: datasets.Dataset) -> str:
    """The token fingerprint of tokenized pairs or lists."""
    return list_token_fingerprint(dataset) if is_list_dataset(dataset) else token_fingerprint(dataset)


def read_list_cache(path: Path, sizes: np.ndarray) -> dict[str, np.ndarray] | None:
    """The cached list columns at ``path`` when complete, valid and for lists of ``sizes``; else None
    (a damaged entry is logged)."""
    if not (path / "meta.json").is_file():
        return None
    try:
        with np.load(path / "columns.npz") as stored:
            columns = {name: stored[name] for name in STORED_COLUMNS}
    except Exception as error:  # noqa: BLE001 - any damage means: recompute
        logger.warning("reference cache entry %s is unreadable (%s); recomputing it", path, error)
        return None
    problem = invalid_reference_columns({n: v for n, v in columns.items() if n != "list_sizes"})
    if problem is None and not np.array_equal(columns["list_sizes"], sizes):
        problem = "its lists have other sizes"
    if problem is None and any(len(columns[n]) != int(sizes.sum()) for n in LIST_REFERENCE_COLUMNS):
        problem = "it does not hold one value per response"
    if problem is not None:
        logger.warning("reference cache entry %s is damaged (%s); recomputing it", path, problem)
        return None
    return columns


def per_row(columns: dict[str, np.ndarray]) -> dict[str, Any]:
    """Stored columns as dataset columns: a list of K values per row, and ``hbar``."""
    ends = np.cumsum(columns["list_sizes"])
    starts = ends - columns["list_sizes"]
    rows = {name: [columns[name][s:e].tolist() for s, e in zip(starts, ends)] for name in LIST_REFERENCE_COLUMNS}
    rows["lengths"] = [[int(v) for v in row] for row in rows["lengths"]]
    return {**rows, "hbar": np.asarray(columns["hbar"])}


def load_or_compute_list_reference_columns(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    collator: ListCollator,
    accelerator: Accelerator,
    *,
    batch_size: int,
    weights: str,
    tokenizer: Any,
    data_settings: dict[str, Any] | Any,
    reference_context: Callable[[], AbstractContextManager] = nullcontext,
    name: str = "train",
) -> ReferenceResult:
    """Reuse the cached list columns for exactly this input, or compute and cache them; the result's
    columns are ``per_row``'s. Arguments as ``training.reference.load_or_compute_reference_columns``."""
    settings = dataclasses.asdict(data_settings) if dataclasses.is_dataclass(data_settings) else data_settings
    path, components = cache_entry(
        list_token_fingerprint(dataset), weights, tokenizer, {**settings, "shape": "lists"}, accelerator
    )
    sizes = list_sizes(dataset)
    columns = reuse_entry(path, lambda p: read_list_cache(p, sizes))
    if columns is not None:
        logger.info("reference pass (%s): reused the cache at %s (%d lists)", name, path, len(dataset))
        return ReferenceResult(per_row(columns), path, reused=True)
    logger.info("reference pass (%s): computing for %d lists (%d responses)", name, len(dataset), int(sizes.sum()))
    columns = compute_list_reference_columns(
        model,
        dataset,
        collator,
        accelerator,
        batch_size,
        output_vocab_size(model),
        reference_context=reference_context,
        desc=f"reference pass ({name})",
    )
    starts = np.cumsum(sizes) - sizes  # a NaN or inf response makes its list's sum non-finite
    by_list = {n: np.add.reduceat(columns[n], starts) for n in LIST_REFERENCE_COLUMNS[:2]}
    check_finite_columns({**by_list, "hbar": columns["hbar"]}, dataset, name)
    store_entry(path, columns, components, accelerator, name)
    return ReferenceResult(per_row(columns), path, reused=False)


def attach_reference_pass(
    model: torch.nn.Module, dataset: datasets.Dataset, collator, accelerator: Accelerator, **options
) -> tuple[datasets.Dataset, ReferenceResult]:
    """The cached reference pass over a split of pairs or lists, and the split with its columns
    (``options``: those of ``load_or_compute_reference_columns``)."""
    if not is_list_dataset(dataset):
        result = load_or_compute_reference_columns(model, dataset, collator, accelerator, **options)
        return with_columns(dataset, result.columns), result
    result = load_or_compute_list_reference_columns(model, dataset, collator, accelerator, **options)
    for column, values in result.columns.items():
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        dataset = dataset.add_column(column, values.tolist() if isinstance(values, np.ndarray) else values)
    return dataset, result
