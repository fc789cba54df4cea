"""What a run writes to its output directory, besides the model and the Trainer's own files:

    mallowspo_config.yaml   every setting of the run (CONFIG_FILE)
    README.md               the model card (``mallowspo.training.card``)
    dispersion.jsonl        the per-example dispersion (DISPERSION_FILE)

and the check, before any work, that the output directory can take them.

A save that runs out of disk space (``disk_full_save``) removes what it wrote and raises
OSError(ENOSPC or EDQUOT) naming the directory, whichever writer hit the full disk
(safetensors, torch.save, plain file writes).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import yaml

from mallowspo.training.models import is_peft_model

CONFIG_FILE = "mallowspo_config.yaml"


DISPERSION_FILE = "dispersion.jsonl"


def summary_statistics(values: np.ndarray) -> dict[str, float]:
    """Count, mean, standard deviation, range and quantiles of per-example values (e.g. -log phi(x))."""
    values = np.asarray(values, dtype=np.float64)
    quantiles = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        **{f"q{int(q * 100):02d}": float(v) for q, v in zip((0.05, 0.25, 0.5, 0.75, 0.95), quantiles)},
    }


def write_resolved_config(path: str | Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write ``sections`` (e.g. model, data, training) as YAML; values YAML cannot hold become strings."""
    path = Path(path)

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return str(value)

    path.write_text(yaml.safe_dump(plain(sections), sort_keys=False))
    return path


# ref_entropy: lists' (one mean entropy per response)
DISPERSION_RECORD_FIELDS = (
    "row_index",
    "prompt",
    "hbar",
    "neg_log_phi",
    "ref_chosen_entropy",
    "ref_rejected_entropy",
    "ref_entropy",
)


def dispersion_records(dataset: datasets.Dataset) -> list[dict[str, Any]]:
    """One record per pair with the fields of ``DISPERSION_RECORD_FIELDS`` that the dataset has."""
    present = [name for name in DISPERSION_RECORD_FIELDS if name in dataset.column_names]
    table = dataset.select_columns(present).to_dict()
    return [{name: table[name][i] for name in present} for i in range(len(dataset))]


def write_dispersion_jsonl(path: str | Path, dataset: datasets.Dataset) -> Path:
    """Write ``dispersion_records(dataset)`` as JSON lines; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in dispersion_records(dataset):
            f.write(json.dumps(record) + "\n")
    return path


def output_bytes_needed(model: torch.nn.Module, args: Any) -> int:
    """A lower bound on the disk space the run writes to ``output_dir``: the saved weights
    (only the trainable ones for an adapter), twice with checkpoints (one checkpoint, then
    the final model). Optimizer states and logs come on top."""
    params = list(model.parameters())
    saved = [p for p in params if p.requires_grad] if is_peft_model(model) else params
    weights = sum(p.numel() * p.element_size() for p in saved)
    return weights * (1 if args.save_strategy == "no" else 2)


def check_output_dir(output_dir: str | Path, needed_bytes: int = 0) -> None:
    """Fail before any work when ``output_dir`` cannot be created or written, or when its disk
    has less than ``needed_bytes`` free. Raises NotADirectoryError, PermissionError or OSError
    with a message that names the directory and what to do."""
    path = Path(output_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise NotADirectoryError(
            f"output_dir {path} cannot be created: {blocker} is a file, not a directory. Choose another --output_dir."
        ) from None
    except OSError as error:
        message = f"output_dir {path} cannot be created ({error.strerror}); choose another --output_dir"
        raise OSError(error.errno, message) from None
    probe = path / f".mallowspo-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"0")
    except OSError as error:
        message = f"output_dir {path} is not writable ({error.strerror}); fix its permissions or choose another "
        message += "--output_dir"
        raise PermissionError(error.errno, message) from None
    finally:
        probe.unlink(missing_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise OSError(
            errno.ENOSPC,
            f"not enough free disk space for output_dir {path}: {free / 2**20:.1f} MiB free, the run writes at least "
            f"{needed_bytes / 2**20:.1f} MiB (the saved model, and a checkpoint). Free some space or choose another "
            "--output_dir",
        )


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch.save's C++ writer reports a failed write without its errno; it is taken for a full disk
# when the directory's disk has less than this left right after the failure.


TORCH_WRITE_FULL_BYTES = 1 << 20


def disk_full_errno(error: BaseException, directory: str | Path) -> int | None:
    """ENOSPC or EDQUOT when ``error`` (or what caused it) is a write that found the disk full, else None.

    Recognises an OSError with that errno, safetensors' SafetensorError ("... No space left on
    device (os error 28)", the errno of Rust's I/O error) and torch.save's RuntimeError (no
    errno: a full disk is recognised by the free space left in ``directory``)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return error.errno
        text = str(error)
        match = re.search(r"\(os error (\d+)\)", text)
        if match and int(match.group(1)) in DISK_FULL_ERRNOS:
            return int(match.group(1))
        if isinstance(error, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
            if _free_bytes(directory) < TORCH_WRITE_FULL_BYTES:
                return errno.ENOSPC
        error = error.__cause__ or error.__context__
    return None


def _free_bytes(directory: str | Path) -> int:
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62  # unknown: not taken for full


def _files(directory: Path) -> dict[str, tuple[int, int, int]]:
    """The plain files directly in ``directory``: name -> (inode, size, mtime_ns)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return {}
    files = {}
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                stat = entry.stat(follow_symlinks=False)
                files[entry.name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except OSError:
            continue
    return files


@contextmanager
def disk_full_save(
    directory: str | Path, what: str, *, whole_directory: bool = False, clean: bool = True
) -> Iterator[None]:
    """Run a save into ``directory``; if it runs out of disk space, remove what it wrote and
    raise OSError(ENOSPC or EDQUOT) with one line naming ``what`` and ``directory``.

    What it wrote: with ``whole_directory`` (a checkpoint, which is only whole or useless) the
    directory itself; else the plain files in ``directory`` that the save created or changed
    (an earlier file the save overwrote was lost anyway), so no half-written model is left that
    looks complete. ``clean``: whether this process removes them (the main process).
    Other errors pass through unchanged."""
    directory = Path(directory)
    before = _files(directory) if clean and not whole_directory else {}
    try:
        yield
    except Exception as error:
        code = disk_full_errno(error, directory)
        if code is None:
            raise
        removed = ""
        if clean and whole_directory:
            shutil.rmtree(directory, ignore_errors=True)
            removed = ": the partial checkpoint was removed, so no half-written model is left"
        elif clean:
            for name, identity in _files(directory).items():
                if before.get(name) != identity:
                    (directory / name).unlink(missing_ok=True)
            removed = ": the files it had written there were removed, so no half-written model is left"
        message = (
            f"not enough disk space to save {what} to {directory} ({os.strerror(code)}){removed}. "
            "Free some space or choose another --output_dir"
        )
        raise OSError(code, message) from error
