"""The reference pass: one pass of the reference model over the preference data, cached.

For each pair it computes, batch by batch (memory bounded: only per-pair numbers are
kept, and ``mallowspo.training.head`` scores completion tokens without building (batch, length,
vocab) logits):

    ref_chosen_logps, ref_rejected_logps      summed completion log-probs (nats)
    ref_chosen_entropy, ref_rejected_entropy  mean per-token entropy of the next-token
                                              distribution over the completion (nats)
    hbar                                      Hbar(x) of eq. 11, in [0, 1]

These are cached on disk (``training.reference_cache``) under a key built from the tokens themselves (a content hash
of the prompt/chosen/rejected token ids, which covers the dataset, the tokenizer and the
truncation), the reference weights, the tokenizer's vocabulary and chat template, the
data settings (max lengths, truncation, EOS) and the mixed-precision mode. Any change
recomputes; an unchanged rerun reuses; the log says which happened. Writes are atomic
(temp dir + rename): a run killed while writing leaves no entry. A damaged entry (unreadable,
or holding values no pass gives: NaN or inf, Hbar outside [0, 1], a negative entropy, a
positive log-prob) is logged, recomputed and replaced. A cache that cannot be written is a
warning, not an error. A pass that gives NaN or inf is an error and is never cached.

Cache root: ``$MALLOWSPO_CACHE`` or ``~/.cache/mallowspo``; entries live in
``<root>/reference/<key>/``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mallowspo.annotators import BetaPrior
from mallowspo.dispersion import (
    DispersionEstimate,
    DispersionSource,
    dispersion_estimate,
    normalized_entropy,
    uninformative_entropy,
)
from mallowspo.training.collate import PreferenceCollator, split_pairs
from mallowspo.training.data import TOKEN_COLUMNS
from mallowspo.training.reference_cache import (
    REFERENCE_COLUMNS,
    cache_entry,
    check_finite_columns,
    read_valid_cache,
    reuse_entry,
    store_entry,
    token_fingerprint,
)
from mallowspo.training.scoring import output_vocab_size, score_completions

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def compute_reference_columns(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    collator: PreferenceCollator,
    accelerator: Accelerator,
    batch_size: int,
    vocab_size: int,
    reference_context: Callable[[], AbstractContextManager] = nullcontext,
    desc: str = "reference pass",
    with_entropy: bool = True,
) -> dict[str, np.ndarray]:
    """One pass of the reference model over ``dataset``; returns the ``REFERENCE_COLUMNS`` (N,) float64
    (only the two log-prob columns when not ``with_entropy``: what a plain DPO pass computes).

    Batches are sharded over processes and gathered back in dataset order. Only (B,)
    numbers per batch are kept. ``reference_context`` wraps each forward (e.g. a PEFT
    model's ``disable_adapter``), so the policy can serve as its own reference.
    """
    loader = DataLoader(
        dataset.select_columns(list(TOKEN_COLUMNS)),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collator,
    )
    loader = accelerator.prepare(loader)
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in REFERENCE_COLUMNS if name != "hbar"}
    try:
        for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process):
            with reference_context(), accelerator.autocast():
                scores = score_completions(model, batch, with_entropy=with_entropy)
            chosen_logps, rejected_logps = split_pairs(scores.logps.double())
            chosen_entropy, rejected_entropy = split_pairs(scores.mean_entropy.double())
            stacked = torch.stack([chosen_logps, rejected_logps, chosen_entropy, rejected_entropy], dim=1)
            stacked = accelerator.gather_for_metrics(stacked).cpu()
            for i, name in enumerate(parts):
                parts[name].append(stacked[:, i])
    finally:
        model.train(was_training)
    columns = {name: torch.cat(values) for name, values in parts.items()}
    if not with_entropy:
        return {name: columns[name].numpy() for name in ("ref_chosen_logps", "ref_rejected_logps")}
    columns["hbar"] = normalized_entropy(columns["ref_chosen_entropy"], columns["ref_rejected_entropy"], vocab_size)
    return {name: values.numpy() for name, values in columns.items()}


@dataclass
class ReferenceResult:
    """The reference columns of one split and where they came from."""

    columns: dict[str, np.ndarray]
    cache_dir: Path
    reused: bool


def _pair_columns_of(path: Path, rows: int) -> dict[str, np.ndarray] | None:
    """A valid entry's columns when it holds ``rows`` pairs, else None."""
    columns = read_valid_cache(path)
    return columns if columns is not None and len(columns["hbar"]) == rows else None


def load_or_compute_reference_columns(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    collator: PreferenceCollator,
    accelerator: Accelerator,
    *,
    batch_size: int,
    weights: str,
    tokenizer: Any,
    data_settings: dict[str, Any] | Any,
    reference_context: Callable[[], AbstractContextManager] = nullcontext,
    name: str = "train",
) -> ReferenceResult:
    """Reuse the cached reference columns for exactly this input, or compute and cache them.

    ``weights`` is ``weights_fingerprint`` of the reference; ``data_settings`` the
    tokenization settings (a dataclass such as ``PreferenceDataConfig``, or a dict). The decision
    is taken on the main process and shared, so all processes agree.
    """
    path, components = cache_entry(token_fingerprint(dataset), weights, tokenizer, data_settings, accelerator)
    columns = reuse_entry(path, lambda p: _pair_columns_of(p, len(dataset)))
    if columns is not None:
        logger.info("reference pass (%s): reused the cache at %s (%d rows)", name, path, len(dataset))
        return ReferenceResult(columns, path, reused=True)
    logger.info(
        "reference pass (%s): computing for %d rows (no %scache entry for key %s)",
        name,
        len(dataset),
        "usable " if path.exists() else "",
        path.name,
    )
    columns = compute_reference_columns(
        model,
        dataset,
        collator,
        accelerator,
        batch_size,
        output_vocab_size(model),
        reference_context=reference_context,
        desc=f"reference pass ({name})",
    )
    check_finite_columns(columns, dataset, name)
    store_entry(path, columns, components, accelerator, name)
    return ReferenceResult(columns, path, reused=False)


# ---------------------------------------------------------------------------------------
# Attaching the results to a split
# ---------------------------------------------------------------------------------------


def with_columns(dataset: datasets.Dataset, columns: dict[str, np.ndarray]) -> datasets.Dataset:
    """``dataset`` with ``columns`` (each (N,)) added, replacing columns of the same names."""
    for name, values in columns.items():
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, np.asarray(values).tolist())
    return dataset


def with_dispersion(
    dataset: datasets.Dataset,
    source: DispersionSource,
    phi_star: float | None = None,
    name: str | None = None,
    prior: BetaPrior | None = None,
) -> tuple[datasets.Dataset, DispersionEstimate]:
    """``dataset`` with its ``neg_log_phi`` column from ``source`` (``mallowspo.dispersion.dispersion_estimate``:
    ``hbar`` from the reference pass, the data's ``dispersion`` column, or its annotation columns), and the
    estimate.

    ``phi_star`` and ``prior``: the phi* and the annotators' Beta prior fitted on the train split, for
    the other splits. The split that sets phi* (``phi_star`` None) is checked once for an entropy
    estimate that carries no information (``mallowspo.dispersion.uninformative_entropy``: a warning,
    naming the split ``name`` if given)."""
    columns = dataset.column_names
    hbar = np.asarray(dataset["hbar"]) if "hbar" in columns else None
    with warnings.catch_warnings(record=True) as caught:  # the annotator estimate's warnings, logged with the split
        warnings.simplefilter("always")
        estimate = dispersion_estimate(
            source,
            size=len(dataset),
            hbar=hbar,
            column=np.asarray(dataset["dispersion"]) if source.source == "column" else None,
            annotations=annotation_values(dataset, source, name),
            phi_star=phi_star,
            prior=prior,
            rows=dataset["row_index"] if "row_index" in columns else None,
        )
    for warning in caught:
        logger.warning("dispersion%s: %s", f" ({name})" if name else "", warning.message)
    if source.source == "entropy" and phi_star is None:
        problem = uninformative_entropy(hbar, estimate.neg_log_phi.numpy())
        if problem is not None:
            logger.warning("dispersion%s: %s", f" ({name})" if name else "", problem)
    return with_columns(dataset, {"neg_log_phi": estimate.neg_log_phi.numpy()}), estimate


def annotation_values(
    dataset: datasets.Dataset, source: DispersionSource, name: str | None = None
) -> dict[str, list] | None:
    """The values of ``source.annotation_columns`` in ``dataset`` (None when it reads none); a missing
    column is a one-line ValueError (data tokenized before the columns were carried, for example)."""
    if not source.annotation_columns:
        return None
    missing = [column for column in source.annotation_columns if column not in dataset.column_names]
    if missing:
        split = f"split {name!r}" if name else "the data"
        raise ValueError(
            f"dispersion_source='annotators' reads {source.annotators.where()}, and {split} has no column "
            f"{', '.join(map(repr, missing))}: give raw rows with it (it is carried through tokenization)"
        )
    return {column: dataset[column] for column in source.annotation_columns}
