"""Loading preference data: local JSON/JSONL/Parquet/CSV files, directories (written by
``save_to_disk`` or holding such files) and Hugging Face hub ids, with one clear error per
unreadable file that names the file and, where it can be found, the line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import weakref
from contextlib import contextmanager
from pathlib import Path

import datasets

from mallowspo.training.data.validate import DataValidationError, short_error

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# CSV cells are read as text: pandas would otherwise turn "None", "N/A", "null" into missing values
# and "42" into a number before validation, which then reports a problem the file does not have.
CSV_AS_TEXT = {"keep_default_na": False, "na_filter": False}


def _builder_options(builder: str, first_file: Path) -> dict:
    """Extra options of the `datasets` builder: for CSV, every column (named by the header of
    ``first_file``) read as text, and no missing-value markers."""
    if builder != "csv":
        return {}
    with open(first_file, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return {**CSV_AS_TEXT, "features": datasets.Features({name: datasets.Value("string") for name in header})}


# Where each dataset returned by load_preference_dataset came from, to name the file in
# error messages. Weak keys: entries vanish with the datasets.
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_preference_dataset(
    source: str | os.PathLike, split: str = "train", config_name: str | None = None
) -> datasets.Dataset:
    """Load preference data as a `datasets.Dataset`, without validating rows.

    source: a local .json/.jsonl/.parquet/.csv file (it has one split, "train"), a local
    directory (written by `save_to_disk`, or holding data files of one type, split by file
    name), or a Hugging Face hub id (`datasets.load_dataset(source, config_name, split=split)`;
    ``config_name`` is TRL's ``dataset_config``, a hub dataset's configuration).

    Raises FileNotFoundError for a path that does not exist, DataValidationError for an
    unsupported extension, a file that cannot be read (naming the file and, where it can be
    found, the line), another split than "train" of a file, or a directory of mixed types.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if config_name is not None and (path.exists() or looks_like_path(text)):
        raise DataValidationError(
            f"dataset_config={config_name!r} names a configuration of a hub dataset, but '{text}' is a local path; "
            "drop dataset_config, or point dataset_name at the configuration's files"
        )
    if path.is_file():
        if split != "train":
            raise DataValidationError(
                f"{path} is a single file, so it holds one split ('train'), not '{split}': evaluating on it would "
                "evaluate on the training rows. Give the evaluation data as its own file (eval_dataset_name), or a "
                "directory with train and test files, or leave dataset_test_split unset."
            )
        dataset = _load_file(path)
    elif path.is_dir():
        dataset = _load_directory(path, split)
    elif looks_like_path(text):
        raise FileNotFoundError(
            f"Preference data not found: there is no file or directory at '{text}' (resolved to {path.resolve()})."
        )
    else:
        dataset = _load_hub(text, split, config_name)
    _SOURCES[dataset] = text
    return dataset


def looks_like_path(text: str) -> bool:
    """A hub id is 'name' or 'owner/name'; anything path-shaped is treated as a (missing) local
    path, never looked up on the hub: absolute or relative paths, more than one '/', a file
    extension, or an 'owner' that is a local directory ('data/prefs' where ./data exists)."""
    path = Path(text).expanduser()
    return (
        text.startswith(("/", ".", "~", "\\"))
        or (len(text) > 1 and text[1] == ":")
        or text.count("/") > 1
        or "\\" in text
        or path.suffix.lower() in DATA_FILE_BUILDERS
        or path.suffix.lower() in {".txt", ".tsv", ".arrow", ".gz", ".zip", ".xlsx", ".yaml", ".yml"}
        or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    )


def _load_file(path: Path) -> datasets.Dataset:
    builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataValidationError(
            f"Cannot load preference data from {path}: unsupported file extension '{path.suffix}'. "
            f"Use one of {', '.join(DATA_FILE_BUILDERS)}, or a directory written by Dataset.save_to_disk."
        )
    if path.stat().st_size == 0:
        raise DataValidationError(f"Cannot load preference data from {path}: the file is empty (no rows).")
    # pyarrow reads invalid UTF-8 in strings and fails later, on access: check first.
    digest = _check_utf8(path) if builder != "parquet" else _file_sha256(path)
    try:
        with _quiet_datasets_errors(), _no_download_counting():
            # `datasets` keys its cache of the parsed file on path, size and mtime, so a file
            # changed in place with both kept (cp -p, rsync -t, an edit within the mtime
            # resolution) would load stale rows; the content hash in the name prevents that.
            return datasets.load_dataset(
                builder,
                name=f"sha256-{digest[:16]}",
                data_files=str(path),
                split="train",
                **_builder_options(builder, path),
            )
    except Exception as error:  # noqa: BLE001 - turned into one clear message below
        raise _diagnose_file(path, error) from None


@contextmanager
def _no_download_counting():
    """Keep ``datasets.load_dataset`` from pinging its download counter (a HEAD request to
    the hub's bucket) while it parses a local file: a local load makes no network request."""
    previous = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = previous


@contextmanager
def _quiet_datasets_errors():
    """Silence `datasets`' own error logs (e.g. "Failed to load JSON from file ..."): each
    failure becomes one DataValidationError that names the file and the line."""
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logger.setLevel(level)


def _load_directory(path: Path, split: str) -> datasets.Dataset:
    if any((path / marker).is_file() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as error:  # noqa: BLE001
            raise DataValidationError(f"Cannot load the saved dataset at {path}: {short_error(error)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataValidationError(
                    f"The saved dataset at {path} has no split '{split}'; its splits are {sorted(loaded)}."
                )
            return loaded[split]
        return loaded
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_FILE_BUILDERS)
    if not files:
        raise DataValidationError(
            f"Cannot load preference data from directory {path}: it was not written by save_to_disk and holds "
            f"no {', '.join(DATA_FILE_BUILDERS)} files."
        )
    suffixes = sorted({p.suffix.lower() for p in files})
    builders = {DATA_FILE_BUILDERS[suffix] for suffix in suffixes}
    if len(builders) > 1:
        counts = ", ".join(f"{sum(p.suffix.lower() == s for p in files)} {s}" for s in suffixes)
        raise DataValidationError(
            f"Cannot load preference data from directory {path}: it holds files of several types ({counts}), and "
            "only one type would be read. Keep one type of data file in the directory, or name one file."
        )
    try:
        with _quiet_datasets_errors(), _no_download_counting():
            return datasets.load_dataset(str(path), split=split, **_builder_options(builders.pop(), files[0]))
    except Exception as error:  # noqa: BLE001
        for file in files:  # find the file to blame, if one cannot be read
            if file.stat().st_size == 0:
                raise DataValidationError(
                    f"Cannot load preference data from {file}: the file is empty (no rows)."
                ) from None
            diagnosis = _diagnose_file(file, error, fallback=False)
            if diagnosis is not None:
                raise diagnosis from None
        raise DataValidationError(f"Cannot load split '{split}' from directory {path}: {short_error(error)}") from None


def _load_hub(source: str, split: str, config_name: str | None = None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source, name=config_name, split=split)
    except Exception as error:  # noqa: BLE001
        raise DataValidationError(
            f"Cannot load preference data '{source}': it is not a local file or directory, and loading it as a "
            f"Hugging Face hub dataset (split '{split}') failed: {short_error(error)}"
        ) from None


def _check_utf8(path: Path, chunk_size: int = 1 << 20) -> str:
    """Raise DataValidationError naming the line of the first byte that is not UTF-8;
    return the file's SHA-256 (hex), computed in the same read."""
    buffer, offset, line = b"", 0, 1
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while True:
            chunk = file.read(chunk_size)
            digest.update(chunk)
            data = buffer + chunk
            try:
                data.decode("utf-8")
                consumed = len(data)
            except UnicodeDecodeError as bad:
                if chunk and bad.reason == "unexpected end of data":  # a character split by the chunk
                    consumed = bad.start
                else:
                    where = line + data.count(b"\n", 0, bad.start)
                    raise DataValidationError(
                        f"Cannot load preference data from {path}: it is not valid UTF-8 text (byte "
                        f"0x{data[bad.start]:02x} on line {where}, byte offset "
                        f"{offset + bad.start}). Re-save the file with UTF-8 encoding."
                    ) from None
            line += data.count(b"\n", 0, consumed)
            offset += consumed
            buffer = data[consumed:]
            if not chunk:
                return digest.hexdigest()


def _file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _diagnose_file(path: Path, error: Exception, fallback: bool = True) -> DataValidationError | None:
    """Explain why `datasets` could not read `path`: encoding, then JSON syntax, line by line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        line = raw.count(b"\n", 0, bad.start) + 1
        return DataValidationError(
            f"Cannot load preference data from {path}: it is not valid UTF-8 text (byte 0x{raw[bad.start]:02x} "
            f"on line {line}, byte offset {bad.start}). Re-save the file with UTF-8 encoding."
        )
    if path.suffix.lower() in (".json", ".jsonl"):
        problem = _json_problem(text, path.suffix.lower())
        if problem:
            return DataValidationError(f"Cannot load preference data from {path}: {problem}")
    if not fallback:
        return None
    return DataValidationError(f"Cannot load preference data from {path}: {short_error(error)}")


def _json_problem(text: str, suffix: str) -> str | None:
    if suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as bad:
            first = text.lstrip().splitlines()[0] if text.strip() else ""
            if not _is_json_object(first):  # a JSON document, not JSON Lines
                return f"invalid JSON at line {bad.lineno}, column {bad.colno}: {bad.msg}."
        else:
            if isinstance(document, list) and not document:
                return "the file holds an empty JSON array (no rows)."
            if not (isinstance(document, list) and all(isinstance(row, dict) for row in document)):
                return "expected a JSON array of objects (one per row) or JSON Lines (one object per line)."
            return None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as bad:
            return (
                f"line {lineno} is not valid JSON ({bad.msg} at column {bad.colno}); the line may be truncated "
                "or two records may share a line. Each line must hold one JSON object."
            )
        if not isinstance(row, dict):
            kind = type(row).__name__
            return f"line {lineno} holds a JSON {kind}, not an object; each line must hold one JSON object."
    if not text.strip():
        return "the file has no rows."
    return None


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def source_of(dataset: datasets.Dataset) -> str | None:
    """The file or hub id ``dataset`` was loaded from by ``load_preference_dataset`` (None if unknown)."""
    return _SOURCES.get(dataset)
