"""Batching of tokenized preference pairs: one concatenated batch for one forward pass.

The training step and the reference pass use this same collator, so both see the same
tokens. A batch of B pairs becomes 2B right-padded sequences, the B chosen ones first:

    input_ids        (2B, T)  prompt + chosen completion, then prompt + rejected completion
    attention_mask   (2B, T)  1 on real tokens
    completion_mask  (2B, T)  1 on completion tokens (the tokens whose log-prob is scored)

plus, for every per-pair float column present in the rows (``PAIR_FLOAT_COLUMNS``), a
(B,) float tensor under the column's name.
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
    """

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, completion_masks = [], []
        for side in ("chosen_input_ids", "rejected_input_ids"):
            for row in rows:
                prompt, completion = row["prompt_input_ids"], row[side]
                sequences.append(torch.tensor(list(prompt) + list(completion), dtype=torch.long))
                completion_masks.append(torch.tensor([0] * len(prompt) + [1] * len(completion), dtype=torch.long))
        batch = {
            "input_ids": pad(sequences, padding_value=self.pad_token_id),
            "attention_mask": pad([torch.ones_like(s) for s in sequences], padding_value=0),
            "completion_mask": pad(completion_masks, padding_value=0),
        }
        for name in PAIR_FLOAT_COLUMNS:
            if name in rows[0]:
                batch[name] = torch.tensor([float(row[name]) for row in rows], dtype=torch.float32)
        return batch


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) -> the chosen half and the rejected half, each (B, ...)."""
    chosen, rejected = values.chunk(2, dim=0)
    return chosen, rejected
