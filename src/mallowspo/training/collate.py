"""Batching of tokenized preference pairs: one concatenated batch for one forward pass.

The training step and the reference pass use this same collator, so both see the same
tokens. A batch of B pairs holds 2B sequences, prompt + chosen completion for each pair
and then prompt + rejected completion (the B chosen ones first), in one of two layouts.

Padded (the default): 2B right-padded rows,

    input_ids        (2B, T)  the sequences, padded with ``pad_token_id``
    attention_mask   (2B, T)  1 on real tokens
    completion_mask  (2B, T)  1 on completion tokens (the tokens whose log-prob is scored)

Padding-free (``padding_free=True``): the 2B sequences back to back in one row of
N = sum of their lengths tokens, no padding token anywhere,

    input_ids        (1, N)   the sequences, concatenated
    position_ids     (1, N)   0, 1, ... restarting at each sequence (the model reads the boundaries here)
    completion_mask  (1, N)   1 on completion tokens
    sequence_ids     (1, N)   which of the 2B sequences each token belongs to (0 .. 2B - 1)
    cu_seq_lens      (2B + 1,) int32 offsets of the sequences: 0, len_0, len_0 + len_1, ..., N
    max_length       int      the longest sequence (with ``cu_seq_lens``: flash attention's varlen arguments)

In both layouts, every per-pair float column present in the rows (``PAIR_FLOAT_COLUMNS``)
comes as a (B,) float tensor under the column's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import pad

# Per-pair columns the trainer reads, added by the reference pass or by the data.
PAIR_FLOAT_COLUMNS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_chosen_entropy",
    "ref_rejected_entropy",
    "hbar",
    "neg_log_phi",
)


@dataclass
class PreferenceCollator:
    """Collate rows with ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``.

    Args:
        pad_token_id: id written at padded positions (masked out by ``attention_mask``).
        padding_free: the padding-free layout (see the module docstring) instead of padded rows;
            build it with ``training.packing.preference_collator``, which checks that the model
            keeps packed sequences apart.
        pad_to_multiple_of: pad the padded layout's length T to a multiple of this (TRL's key; None: no).
    """

    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, completion_masks = [], []
        for side in ("chosen_input_ids", "rejected_input_ids"):
            for row in rows:
                prompt, completion = row["prompt_input_ids"], row[side]
                sequences.append(torch.tensor(list(prompt) + list(completion), dtype=torch.long))
                completion_masks.append(torch.tensor([0] * len(prompt) + [1] * len(completion), dtype=torch.long))
        if self.padding_free:
            batch = packed_batch(sequences, completion_masks)
        else:
            batch = padded_batch(sequences, completion_masks, self.pad_token_id, self.pad_to_multiple_of)
        for name in PAIR_FLOAT_COLUMNS:
            if name in rows[0]:
                batch[name] = torch.tensor([float(row[name]) for row in rows], dtype=torch.float32)
        return batch


def padded_batch(
    sequences: list[torch.Tensor],
    completion_masks: list[torch.Tensor],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """The padded layout: ``input_ids``, ``attention_mask``, ``completion_mask``, each (2B, T)."""
    multiple = dict(pad_to_multiple_of=pad_to_multiple_of)
    return {
        "input_ids": pad(sequences, padding_value=pad_token_id, **multiple),
        "attention_mask": pad([torch.ones_like(s) for s in sequences], padding_value=0, **multiple),
        "completion_mask": pad(completion_masks, padding_value=0, **multiple),
    }


def packed_batch(sequences: list[torch.Tensor], completion_masks: list[torch.Tensor]) -> dict[str, Any]:
    """The padding-free layout of the module docstring: one (1, N) row, N = sum of the lengths."""
    lengths = torch.tensor([len(s) for s in sequences])
    starts = lengths.cumsum(0) - lengths  # offset of each sequence in the row
    sequence_ids = torch.repeat_interleave(torch.arange(len(sequences)), lengths)
    position_ids = torch.arange(int(lengths.sum())) - starts[sequence_ids]
    cu_seq_lens = torch.cat([starts, lengths.sum().reshape(1)]).to(torch.int32)
    return {
        "input_ids": torch.cat(sequences)[None],
        "position_ids": position_ids[None],
        "completion_mask": torch.cat(completion_masks)[None],
        "sequence_ids": sequence_ids[None],
        "cu_seq_lens": cu_seq_lens,
        "max_length": int(lengths.max()),
    }


def is_packed(batch: dict[str, Any]) -> bool:
    """Whether ``batch`` has the padding-free layout."""
    return "sequence_ids" in batch


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) -> the chosen half and the rejected half, each (B, ...)."""
    chosen, rejected = values.chunk(2, dim=0)
    return chosen, rejected
