"""Resuming: which checkpoint directory is complete, and which one to resume from."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
# The Trainer also pickles its arguments (torch.save) into every save; loading that file back
# needs full pickle, which can run code from an untrusted checkpoint, and nothing reads it on
# resume. It is removed: the settings are saved as YAML (CONFIG_FILE) instead.
TRAINING_ARGS_PICKLE = "training_args.bin"


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint directory was fully written: the Trainer writes trainer_state.json
    last, so a run killed while saving leaves a directory without a readable one."""
    state = Path(path) / STATE_FILE
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    return True


def resolve_checkpoint(checkpoint: str | bool, output_dir: str | Path) -> str:
    """The checkpoint directory to resume from.

    ``True``: the newest complete ``checkpoint-N`` in ``output_dir``; incomplete ones (left
    by a run killed while saving) are skipped with a warning. A path: checked to be a
    complete checkpoint. Raises FileNotFoundError or ValueError naming what is wrong.
    """
    if checkpoint is True:
        root = Path(output_dir)
        numbered = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        skipped = []
        for path in sorted(numbered, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
            if is_complete_checkpoint(path):
                if skipped:
                    logger.warning(
                        "skipping incomplete checkpoints (a run stopped while saving them): %s",
                        ", ".join(str(p) for p in skipped),
                    )
                return str(path)
            skipped.append(path)
        found = f" ({len(skipped)} incomplete: {', '.join(p.name for p in skipped)})" if skipped else ""
        raise FileNotFoundError(
            f"no complete checkpoint to resume from in {root}{found}; pass a checkpoint directory, or leave out "
            "--resume_from_checkpoint to start over"
        )
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint to resume from not found: there is no directory at {path}")
    if not is_complete_checkpoint(path):
        raise ValueError(
            f"{path} is not a complete checkpoint (no readable {STATE_FILE}): the run was probably stopped while "
            "saving it. Resume from an earlier checkpoint (--resume_from_checkpoint last skips incomplete ones)."
        )
    return str(path)
