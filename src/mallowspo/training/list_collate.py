"""Batching of tokenized ranked lists: B prompts, each with its K_b responses, in one forward.

The training step and the reference pass use this same collator. The S = sum_b K_b sequences
prompt + response are laid out prompt by prompt (b = 0: its responses 0..K_0 - 1, then b = 1, ...),
only the present ones: no padded response is ever computed. Both layouts of ``training.collate``:

    padded         input_ids, attention_mask, completion_mask   (S, T)
    padding-free   input_ids, position_ids, completion_mask, sequence_ids (1, N); cu_seq_lens (S + 1,); max_length

plus, with K = max_b K_b:

    list_mask        (B, K) bool   True where prompt b has a response k
    response_slots   (S,) long     b * K + k of each sequence: where its score goes in a (B, K) grid
    ranks            (B, K) long   0 = best (0 at absent responses; read only through list_mask)
    ref_logps, ref_entropy   (B, K) float32, when the rows have them (0 at absent responses)
    hbar, neg_log_phi, ...   (B,) float32: the per-prompt columns of ``PAIR_FLOAT_COLUMNS`` present

Memory: a batch computes S <= B * max(K) sequences of at most max_length tokens in one forward
(the pairs' 2B); ``max_responses`` caps K. ``per_device_train_batch_size`` counts prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mallowspo.training.collate import PAIR_FLOAT_COLUMNS, packed_batch, padded_batch
from mallowspo.training.packing import check_packed_model

LIST_RESPONSE_FLOAT_COLUMNS = ("ref_logps", "ref_entropy")
LIST_PROMPT_FLOAT_COLUMNS = tuple(name for name in PAIR_FLOAT_COLUMNS if not name.startswith("ref_"))


@dataclass
class ListCollator:
    """Collate rows with ``prompt_input_ids`` and ``responses_input_ids`` (and ``ranks``, absent in the
    reference pass). Arguments as ``training.collate.PreferenceCollator``'s."""

    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        sizes = [len(row["responses_input_ids"]) for row in rows]
        width = max(sizes)
        sequences, completion_masks, slots = [], [], []
        for b, row in enumerate(rows):
            prompt = list(row["prompt_input_ids"])
            for k, completion in enumerate(row["responses_input_ids"]):
                sequences.append(torch.tensor(prompt + list(completion), dtype=torch.long))
                completion_masks.append(torch.tensor([0] * len(prompt) + [1] * len(completion), dtype=torch.long))
                slots.append(b * width + k)
        if self.padding_free:
            batch = packed_batch(sequences, completion_masks)
        else:
            batch = padded_batch(sequences, completion_masks, self.pad_token_id, self.pad_to_multiple_of)
        batch["list_mask"] = torch.arange(width)[None, :] < torch.tensor(sizes)[:, None]
        batch["response_slots"] = torch.tensor(slots, dtype=torch.long)
        if "ranks" in rows[0]:
            batch["ranks"] = _grid([row["ranks"] for row in rows], width, torch.long)
        for name in LIST_RESPONSE_FLOAT_COLUMNS:
            if name in rows[0]:
                batch[name] = _grid([row[name] for row in rows], width, torch.float32)
        for name in LIST_PROMPT_FLOAT_COLUMNS:
            if name in rows[0]:
                batch[name] = torch.tensor([float(row[name]) for row in rows], dtype=torch.float32)
        return batch


def _grid(values: list[list], width: int, dtype: torch.dtype) -> torch.Tensor:
    """Ragged per-response values as a (B, width) tensor, 0 where a row has fewer."""
    grid = torch.zeros(len(values), width, dtype=dtype)
    for b, row in enumerate(values):
        grid[b, : len(row)] = torch.tensor(list(row), dtype=dtype)
    return grid


def is_list_batch(batch: dict[str, Any]) -> bool:
    """Whether ``batch`` comes from a ``ListCollator``."""
    return "list_mask" in batch


def scatter_responses(values: torch.Tensor, batch: dict[str, Any], fill: float = 0.0) -> torch.Tensor:
    """Per-sequence values (S,) of a list batch as a (B, K) grid (``fill`` at absent responses);
    differentiable in ``values``."""
    mask = batch["list_mask"]
    grid = values.new_full((mask.numel(),), fill).scatter(0, batch["response_slots"], values)
    return grid.view(mask.shape)


def list_collator(
    pad_token_id: int, padding_free: bool, *models: torch.nn.Module | None, pad_to_multiple_of: int | None = None
) -> ListCollator:
    """The trainer's collator for lists; padding-free only after ``training.packing.check_packed_model``
    of each of ``models`` (as ``training.packing.preference_collator``)."""
    if padding_free:
        for model in models:
            if model is not None:
                check_packed_model(model)
    return ListCollator(pad_token_id, padding_free=padding_free, pad_to_multiple_of=pad_to_multiple_of)
