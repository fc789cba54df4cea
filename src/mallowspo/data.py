"""Preference data: load, validate, template and tokenize, before any model work.

Formats are TRL's preference formats (https://huggingface.co/docs/trl/dataset_formats):

    standard, explicit prompt      {"prompt": str, "chosen": str, "rejected": str}
    standard, implicit prompt      {"chosen": str, "rejected": str}   (shared prefix = prompt)
    conversational, explicit       {"prompt": [msg...], "chosen": [msg...], "rejected": [msg...]}
    conversational, implicit       {"chosen": [msg...], "rejected": [msg...]}
    msg = {"role": "system" | "user" | "assistant" | ..., "content": str}
    ({"from", "value"} messages are renamed to {"role", "content"} with TRL's helper.)

`prepare_preference_dataset` turns such a dataset into one row per valid pair:

    prompt_input_ids     list[int]  the prompt, never truncated
    chosen_input_ids     list[int]  the chosen completion only, truncated (keep the start)
    rejected_input_ids   list[int]  the rejected completion only, truncated (keep the start)
    prompt               str        the prompt text after templating (for reports)
    row_index            int        the row's index in the input dataset (0-based)
    dispersion           float      only when DataConfig.dispersion_column is set: the
                                    user's -log phi(x) estimate, finite and > 0

with len(prompt) + len(completion) <= max_length and len(completion) <=
max_completion_length. It checks in three passes and reports each problem under one kind
(the first one found for the row), so the counts add up to the rows dropped:

  1. columns (no rows needed)     missing_columns
  2. raw rows (no tokenizer)      non_string_field, mixed_formats, bad_messages,
                                  empty_field, chosen_equals_rejected, bad_dispersion
  3. template + tokens            bad_messages (template error), prompt_too_long,
                                  completion_empty_after_truncation,
                                  chosen_equals_rejected (after truncation)

`missing_columns` and `mixed_formats` are always errors; the other kinds are errors when
`strict` and otherwise skipped, counted and logged (logger "mallowspo.data").

Tokenization. Prompt and completions are tokenized separately and never re-merged, so the
prompt/completion boundary cannot shift:
  - conversational: prompt and completion texts come from TRL's `apply_chat_template`
    (prompt rendered with the generation prompt; completion = rendered prompt+completion
    minus the rendered prompt); both are tokenized with add_special_tokens=False, since
    the template writes its own special tokens. No EOS is added: the template ends turns.
  - standard: the prompt gets the tokenizer's leading special tokens (e.g. BOS), as
    `tokenizer(prompt)` would, unless the prompt text already starts with them (no double
    BOS); special tokens a tokenizer appends at the end of every text (e.g. an EOS) are
    not added to prompts. Completions use add_special_tokens=False and, when
    `add_eos`, end with the EOS id (added unless already last), as TRL's DPOTrainer does.
  - a very long text (a multi-megabyte completion, say) is tokenized only as far as its
    tokens can matter (the budgets above), from prefixes of it: memory and time stay
    bounded, and the kept tokens are those of the whole text (see _leading_token_ids).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from trl.data_utils import apply_chat_template, maybe_convert_to_chatml, maybe_extract_prompt

logger = logging.getLogger("mallowspo.data")

__all__ = [
    "check_tokenized_dataset",
    "DataConfig",
    "DataValidationError",
    "ValidationReport",
    "PROBLEM_KINDS",
    "load_preference_dataset",
    "prepare_preference_dataset",
]

# Problem kind -> how to fix it (shown in errors). Order = order of the checks.
PROBLEM_KINDS: dict[str, str] = {
    "missing_columns": "name the columns 'chosen' and 'rejected' (and optionally 'prompt')",
    "non_string_field": (
        "prompt/chosen/rejected must each be a string (standard format) or a list of "
        "{'role', 'content'} messages (conversational format)"
    ),
    "mixed_formats": "convert every row to one format, all standard or all conversational",
    "bad_messages": (
        "each message needs a 'role' (system, developer, user, assistant or tool) and a "
        "string 'content'; completions start with an assistant message"
    ),
    "empty_field": "give every pair a non-empty prompt and non-empty completions",
    "chosen_equals_rejected": "drop pairs whose two completions are the same; they carry no preference",
    "bad_dispersion": "dispersion values are -log phi(x) estimates: finite numbers > 0",
    "prompt_too_long": "raise max_prompt_length / max_length, or shorten these prompts",
    "completion_empty_after_truncation": (
        "these completions have no content token left; raise max_length / "
        "max_completion_length or fix the completions"
    ),
}
ALWAYS_FATAL = frozenset({"missing_columns", "mixed_formats"})
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

# Where each dataset returned by load_preference_dataset came from, to name the file in
# error messages. Weak keys: entries vanish with the datasets.
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------
# Public types
# ----------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """How preference rows become token ids.

    max_length: prompt + completion tokens (None: no limit).
    max_prompt_length: prompt budget; a longer prompt is a problem ("prompt_too_long"),
        prompts are never truncated (None: no prompt budget apart from max_length).
    max_completion_length: completion budget; completions keep their start (None: only
        max_length applies).
    strict: True: any problem raises DataValidationError. False: problem rows are skipped,
        counted in the report and logged.
    dispersion_column: optional column of user-given -log phi(x) estimates (finite, > 0),
        returned as the "dispersion" column.
    add_eos: end completions of standard (non-conversational) data with the EOS token.
    """

    max_length: int | None = 512
    max_prompt_length: int | None = 256
    max_completion_length: int | None = None
    strict: bool = True
    dispersion_column: str | None = None
    add_eos: bool = True

    def __post_init__(self) -> None:
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"DataConfig.{name} must be a positive integer or None, got {value!r}.")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(
                f"DataConfig.max_length must be >= 2 (a prompt token and a completion token), got {self.max_length}."
            )


class DataValidationError(ValueError):
    """The preference data cannot be used as it is; the message says what and how to fix it.

    `report` holds the ValidationReport when the error comes from row validation.
    """

    def __init__(self, message: str, report: ValidationReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class ValidationReport:
    """What validation found. Row indices are 0-based positions in the input dataset.

    problems: kind -> indices of the rows skipped for it (each row under one kind, the
        first found); dataset-level problems (missing_columns) have an empty list.
    examples: kind -> description of the first case.
    """

    total_rows: int
    kept_rows: int
    problems: dict[str, list[int]] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    name: str = "train"
    source: str | None = None

    def add(self, kind: str, row: int | None, detail: str) -> None:
        rows = self.problems.setdefault(kind, [])
        if row is not None:
            rows.append(row)
        self.examples.setdefault(kind, detail if row is None else f"row {row}: {detail}")

    @property
    def where(self) -> str:
        return f"'{self.name}'" + (f" ({self.source})" if self.source else "")

    def summary(self) -> str:
        """Human-readable: totals, then per kind the count and the first example."""
        head = f"Preference data {self.where}: {self.total_rows} rows, {self.kept_rows} kept"
        if not self.problems:
            return head + ", no problems found."
        n_bad = len(set().union(*self.problems.values()))
        lines = [head + f", {n_bad} with problems (0-based row indices):"]
        for kind, rows in self.problems.items():
            what = f"{len(rows)} row{'s' if len(rows) != 1 else ''}; e.g. " if rows else ""
            lines.append(f"  {kind}: {what}{self.examples.get(kind, '')}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "total_rows": self.total_rows,
            "kept_rows": self.kept_rows,
            "problems": {kind: list(rows) for kind, rows in self.problems.items()},
            "examples": dict(self.examples),
        }

    def error_message(self, tail: str | None = None) -> str:
        """One paragraph for DataValidationError: each kind, its count, an example, a fix."""
        parts = []
        for kind, rows in self.problems.items():
            what = f"{len(rows)} row{'s' if len(rows) != 1 else ''}; e.g. " if rows else ""
            parts.append(f"{kind} ({what}{self.examples.get(kind, '')}; fix: {PROBLEM_KINDS[kind]})")
        n_bad = len(set().union(*self.problems.values()))
        lead = f"Invalid preference data {self.where}"
        if n_bad:
            lead += f": {n_bad} of {self.total_rows} rows have problems (0-based row indices)"
        message = f"{lead}: " + "; ".join(parts) + "."
        if tail is not None:
            message += " " + tail
        elif ALWAYS_FATAL & self.problems.keys():
            fatal = " and ".join(sorted(ALWAYS_FATAL & self.problems.keys()))
            message += f" {fatal} cannot be skipped with strict=False."
        else:
            message += (
                " Fix these rows, or set strict=False (on the command line: --strict_validation false) to skip "
                "them (they are then counted and logged)."
            )
        return message


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------


def load_preference_dataset(source: str | os.PathLike, split: str = "train") -> datasets.Dataset:
    """Load preference data as a `datasets.Dataset`, without validating rows.

    source: a local .json/.jsonl/.parquet/.csv file (one split: `split` is not used), a
    local directory (written by `save_to_disk`, or holding such data files), or a
    Hugging Face hub id (`datasets.load_dataset(source, split=split)`).

    Raises FileNotFoundError for a path that does not exist, DataValidationError for an
    unsupported extension or a file that cannot be read (naming the file and, where it
    can be found, the line).
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        dataset = _load_file(path)
    elif path.is_dir():
        dataset = _load_directory(path, split)
    elif looks_like_path(text):
        raise FileNotFoundError(
            f"Preference data not found: there is no file or directory at '{text}' (resolved to {path.resolve()})."
        )
    else:
        dataset = _load_hub(text, split)
    _SOURCES[dataset] = text
    return dataset


def looks_like_path(text: str) -> bool:
    """A hub id is 'name' or 'owner/name'; anything path-shaped is treated as a missing path."""
    suffix = Path(text).suffix.lower()
    return (
        text.startswith(("/", ".", "~", "\\"))
        or (len(text) > 1 and text[1] == ":")
        or text.count("/") > 1
        or "\\" in text
        or suffix in DATA_FILE_BUILDERS
        or suffix in {".txt", ".tsv", ".arrow", ".gz", ".zip", ".xlsx", ".yaml", ".yml"}
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
            return datasets.load_dataset(builder, name=f"sha256-{digest[:16]}", data_files=str(path), split="train")
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
            raise DataValidationError(f"Cannot load the saved dataset at {path}: {_short(error)}") from None
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
    try:
        with _quiet_datasets_errors(), _no_download_counting():
            return datasets.load_dataset(str(path), split=split)
    except Exception as error:  # noqa: BLE001
        for file in files:  # find the file to blame, if one cannot be read
            if file.stat().st_size == 0:
                raise DataValidationError(
                    f"Cannot load preference data from {file}: the file is empty (no rows)."
                ) from None
            diagnosis = _diagnose_file(file, error, fallback=False)
            if diagnosis is not None:
                raise diagnosis from None
        raise DataValidationError(f"Cannot load split '{split}' from directory {path}: {_short(error)}") from None


def _load_hub(source: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as error:  # noqa: BLE001
        raise DataValidationError(
            f"Cannot load preference data '{source}': it is not a local file or directory, and loading it as a "
            f"Hugging Face hub dataset (split '{split}') failed: {_short(error)}"
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
    return DataValidationError(f"Cannot load preference data from {path}: {_short(error)}")


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


def _short(error: BaseException) -> str:
    """`Type: first line` of an error and of its cause, without the traceback."""
    parts = []
    while error is not None and len(parts) < 2:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        parts.append(f"{type(error).__name__}: {message}" if message else type(error).__name__)
        error = error.__cause__ or error.__context__
    return " (caused by ".join(parts) + ")" * (len(parts) - 1)


# ----------------------------------------------------------------------------------------
# Pass 1 + 2: columns and raw rows
# ----------------------------------------------------------------------------------------


@dataclass
class _Pair:
    """A row that passed the raw checks, with its prompt made explicit."""

    index: int
    prompt: Any  # str or list of messages
    chosen: Any
    rejected: Any
    conversational: bool
    dispersion: float | None = None


class _RowProblem(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def _check_columns(columns: list[str], config: DataConfig, report: ValidationReport) -> None:
    required = ["chosen", "rejected"] + ([config.dispersion_column] if config.dispersion_column else [])
    missing = [name for name in required if name not in columns]
    if not missing:
        return
    hints = []
    for name in missing:
        close = [c for c in columns if name in c.lower()] or difflib.get_close_matches(name, columns, n=2, cutoff=0.5)
        hints.append(f"'{name}'" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
    report.add("missing_columns", None, f"no column {', '.join(hints)}; the columns are {columns}")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value!r})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, list):
        inner = sorted({type(v).__name__ for v in value})
        return f"a list of {'/'.join(inner)}" if value else "an empty list"
    return f"a {type(value).__name__}"


def _field_format(name: str, value: Any) -> str:
    """'text' for a string, 'messages' for a list of dicts (or an empty list)."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return "messages"
    raise _RowProblem(
        "non_string_field",
        f"'{name}' is {_describe(value)}, expected a string or a list of {{'role', 'content'}} messages",
    )


def _check_messages(name: str, messages: list[dict]) -> None:
    if not messages:
        raise _RowProblem("bad_messages", f"'{name}' is an empty message list")
    for position, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in MESSAGE_ROLES:
            hint = " (rename ShareGPT roles human/gpt to user/assistant)" if role in ("human", "gpt") else ""
            raise _RowProblem(
                "bad_messages", f"message {position} of '{name}' has role {role!r}, not one of {MESSAGE_ROLES}{hint}"
            )
        if not isinstance(content, str):
            raise _RowProblem(
                "bad_messages", f"message {position} of '{name}' has content {_describe(content)}, expected a string"
            )


def _text_of(value: Any) -> str:
    """The text a field carries: the string itself, or the messages' contents."""
    return value if isinstance(value, str) else "".join(m["content"] for m in value)


def _parse_dispersion(value: Any) -> float:
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise _RowProblem("bad_dispersion", f"dispersion is {_describe(value)}, expected a number")
    if not math.isfinite(number) or number <= 0:
        raise _RowProblem("bad_dispersion", f"dispersion is {number!r}, expected a finite number > 0")
    return number


def _check_row(index: int, row: dict, has_prompt: bool, config: DataConfig) -> _Pair:
    """Raw checks of one row (no tokenizer); returns it with an explicit prompt."""
    names = ["prompt", "chosen", "rejected"] if has_prompt else ["chosen", "rejected"]
    formats = {name: _field_format(name, row[name]) for name in names}
    if formats["chosen"] != formats["rejected"]:
        raise _RowProblem(
            "mixed_formats", f"'chosen' is {_describe(row['chosen'])} but 'rejected' is {_describe(row['rejected'])}"
        )
    conversational = formats["chosen"] == "messages"
    if has_prompt and formats["prompt"] == "messages" and not conversational:
        raise _RowProblem("mixed_formats", "'prompt' is a list of messages but 'chosen'/'rejected' are strings")

    example = {name: row[name] for name in names}
    if conversational:
        example = {n: [dict(m) for m in v] if isinstance(v, list) else v for n, v in example.items()}  # copies
        example = maybe_convert_to_chatml(example)  # {"from", "value"} -> {"role", "content"}
        for name in names:
            if formats[name] == "messages":
                _check_messages(name, example[name])

    if _same(example["chosen"], example["rejected"]):
        raise _RowProblem("chosen_equals_rejected", "'chosen' and 'rejected' are identical")

    if not conversational and not has_prompt and example["chosen"][:1] != example["rejected"][:1]:
        example = {"prompt": "", **example}  # no shared prefix (TRL's extract_prompt mis-handles this case)
    else:  # explicit prompt kept; implicit one (or a text prompt next to conversations) extracted
        example = maybe_extract_prompt(example)
    for name in ("chosen", "rejected"):
        if not _text_of(example[name]).strip():
            raise _RowProblem("empty_field", f"the '{name}' completion is empty or whitespace only")
    if not example["prompt"] or not _text_of(example["prompt"]).strip():
        where = "'prompt' is empty or whitespace only" if has_prompt else "'chosen' and 'rejected' share no prompt"
        raise _RowProblem("empty_field", where)
    if conversational:
        for name in ("chosen", "rejected"):
            if example[name][0]["role"] != "assistant":
                first = example[name][0]["role"]
                detail = f"the '{name}' completion starts with a {first!r} message, not 'assistant'"
                raise _RowProblem("bad_messages", detail)
        if example["prompt"][-1]["role"] not in ("user", "tool", "assistant"):
            raise _RowProblem("bad_messages", f"the prompt ends with a {example['prompt'][-1]['role']!r} message")

    dispersion = _parse_dispersion(row[config.dispersion_column]) if config.dispersion_column else None
    return _Pair(index, example["prompt"], example["chosen"], example["rejected"], conversational, dispersion)


def _same(a: Any, b: Any) -> bool:
    """Same completion up to surrounding whitespace (of the text, or of each message)."""
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    key = lambda messages: [(m.get("role"), (m.get("content") or "").strip()) for m in messages]  # noqa: E731
    return key(a) == key(b)


# ----------------------------------------------------------------------------------------
# Pass 3: template, tokens, truncation
# ----------------------------------------------------------------------------------------


def _render(pair: _Pair, tokenizer) -> tuple[str, str, str]:
    """Prompt and completion texts; conversations go through TRL's apply_chat_template."""
    if not pair.conversational:
        return pair.prompt, pair.chosen, pair.rejected
    try:
        out = apply_chat_template({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}, tokenizer)
    except Exception as error:  # noqa: BLE001 - a template may raise anything (jinja2 errors)
        raise _RowProblem("bad_messages", f"the chat template failed on it: {_short(error)}") from None
    return out["prompt"], out["chosen"], out["rejected"]


def _leading_special_ids(tokenizer) -> list[int]:
    """Tokens `tokenizer(text)` puts before every text (e.g. [BOS]); [] if none."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


# A text longer than max(LONG_TEXT_MIN_CHARS, LONG_TEXT_CHARS_PER_TOKEN * limit) characters,
# where `limit` is the most tokens of it that can matter, is tokenized by prefixes only: the
# tokens past the budget would be dropped anyway, and a multi-megabyte completion would
# otherwise cost seconds and gigabytes to tokenize.
LONG_TEXT_MIN_CHARS = 1 << 16
LONG_TEXT_CHARS_PER_TOKEN = 64
PREFIX_MARGIN_TOKENS = 8  # tokens next to a cut may change with it: agree on this many more


def _token_limits(config: DataConfig) -> tuple[int | None, int | None]:
    """How many leading tokens of a prompt and of a completion can matter (None: all of them).

    A prompt is never truncated, but one token over its budget is enough to know it is too
    long; a completion keeps at most min(max_completion_length, max_length) tokens.
    """
    prompt = [b for b in (config.max_prompt_length, config.max_length) if b is not None]
    completion = [b for b in (config.max_completion_length, config.max_length) if b is not None]
    return (min(prompt) + 1 if prompt else None), (min(completion) if completion else None)


def _leading_token_ids(tokenizer, text: str, count: int) -> tuple[list[int], bool]:
    """The first count + PREFIX_MARGIN_TOKENS token ids of `text`, from prefixes of it, and
    False; or all its ids and True when the whole text had to be read.

    The ids of a prefix are accepted once they agree with those of a prefix twice as long
    (cutting a text changes only the tokens next to the cut).
    """
    need = count + PREFIX_MARGIN_TOKENS
    size = max(1024, 16 * need)  # characters; doubled until the leading ids are stable
    ids = tokenizer(text[:size], add_special_tokens=False)["input_ids"]
    while size < len(text):
        size *= 2
        longer = tokenizer(text[:size], add_special_tokens=False)["input_ids"]
        if len(ids) >= need and ids[:need] == longer[:need]:
            return list(longer[:need]), False
        ids = longer
    return list(ids), True


def _tokenize_texts(
    tokenizer, texts: list[str], limit: int | None = None, batch_size: int = 512
) -> tuple[list[list[int]], set[int]]:
    """Token ids of each text (no special tokens added), and the positions of the texts that
    were only tokenized as far as `limit` tokens can matter (see LONG_TEXT_MIN_CHARS)."""
    threshold = None if limit is None else max(LONG_TEXT_MIN_CHARS, LONG_TEXT_CHARS_PER_TOKEN * limit)
    ids: list[list[int]] = []
    clipped: set[int] = set()
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        long = [threshold is not None and len(text) > threshold for text in chunk]
        encoded = tokenizer([("" if is_long else t) for t, is_long in zip(chunk, long)], add_special_tokens=False)
        for offset, (text, row, is_long) in enumerate(zip(chunk, encoded["input_ids"], long)):
            if is_long:
                leading_ids, complete = _leading_token_ids(tokenizer, text, limit)
                ids.append(leading_ids)
                if not complete:
                    clipped.add(start + offset)
            else:
                ids.append(list(row))
    return ids, clipped


def _truncate_and_check(
    prompt_ids: list[int], completions: dict[str, list[int]], config: DataConfig, special_ids: set[int]
) -> dict[str, list[int]]:
    n_prompt = len(prompt_ids)
    if config.max_prompt_length is not None and n_prompt > config.max_prompt_length:
        raise _RowProblem(
            "prompt_too_long", f"the prompt has {n_prompt} tokens > max_prompt_length={config.max_prompt_length}"
        )
    if config.max_length is not None and n_prompt >= config.max_length:
        raise _RowProblem(
            "prompt_too_long",
            f"the prompt has {n_prompt} tokens, leaving no room for a completion within max_length={config.max_length}",
        )
    budget = min(
        config.max_completion_length if config.max_completion_length is not None else math.inf,
        config.max_length - n_prompt if config.max_length is not None else math.inf,
    )
    out = {}
    for name, ids in completions.items():
        kept = ids if budget >= len(ids) else ids[: int(budget)]
        if special_ids.issuperset(kept):
            if len(kept) == len(ids):
                detail = f"'{name}' has no content token after tokenization (token ids {ids})"
            else:
                detail = f"'{name}' keeps only special tokens after truncation to {len(kept)} of {len(ids)} tokens"
            raise _RowProblem("completion_empty_after_truncation", detail)
        out[name] = kept
    if out["chosen"] == out["rejected"]:
        raise _RowProblem(
            "chosen_equals_rejected",
            f"'chosen' and 'rejected' have the same {len(out['chosen'])} tokens after truncation",
        )
    return out


# ----------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------

TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def check_tokenized_dataset(dataset: datasets.Dataset, name: str = "train", batch_size: int = 4096) -> None:
    """Check data that is already tokenized (has ``prompt_input_ids``) before it is used as is.

    Raises DataValidationError when an id column is missing, or when a prompt or a
    completion has no token: such a pair has nothing to score, and its log-prob would be a
    silent 0 rather than an error.
    """
    source = _SOURCES.get(dataset)
    where = f"'{name}'" + (f" ({source})" if source else "")
    missing = [column for column in TOKEN_COLUMNS if column not in dataset.column_names]
    if missing:
        raise DataValidationError(
            f"Tokenized preference data {where} has no column {', '.join(map(repr, missing))}; tokenized data needs "
            f"{', '.join(TOKEN_COLUMNS)} (as prepare_preference_dataset writes them), or give raw text columns."
        )
    view = dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow")
    empty: dict[str, list[int]] = {}
    for start in range(0, len(dataset), batch_size):
        table = view[start : start + batch_size]
        for column in TOKEN_COLUMNS:
            lengths = table.column(column).combine_chunks().value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
            empty.setdefault(column, []).extend(int(i) + start for i in (lengths == 0).nonzero()[0])
    problems = [f"{column} is empty in {len(rows)} row{'s' if len(rows) > 1 else ''} (e.g. row {rows[0]})"
                for column, rows in empty.items() if rows]
    if problems:
        raise DataValidationError(
            f"Tokenized preference data {where}: " + "; ".join(problems) + ". Every pair needs a non-empty prompt "
            "and non-empty completions; drop these rows or tokenize the raw data with prepare_preference_dataset."
        )


def prepare_preference_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    config: DataConfig,
    name: str = "train",
    *,
    source: str | None = None,
) -> tuple[datasets.Dataset, ValidationReport]:
    """Validate, template and tokenize preference rows (see the module docstring).

    dataset: a `datasets.Dataset` in one of TRL's preference formats.
    tokenizer: a transformers tokenizer (with a chat template for conversational data,
        an EOS token when config.add_eos and the data are standard).
    name: what the data is called in messages ("train", "eval").
    source: the file it came from, for messages (default: known for datasets returned
        by load_preference_dataset).

    Returns the tokenized dataset (columns prompt_input_ids, chosen_input_ids,
    rejected_input_ids, prompt, row_index[, dispersion]) and the ValidationReport, whose
    summary is also logged. Raises DataValidationError on any problem when
    config.strict, and otherwise for missing_columns, mixed_formats, an empty dataset, no
    row left, or conversational data with a tokenizer that has no chat template.
    """
    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError(
            f"Expected one split, got a DatasetDict with splits {sorted(dataset)}; pass e.g. dataset['{name}']."
        )
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"Expected a datasets.Dataset (streaming datasets are not supported), got {type(dataset).__name__}."
        )
    if source is None:
        source = _SOURCES.get(dataset)
    report = ValidationReport(total_rows=len(dataset), kept_rows=0, name=name, source=source)
    if len(dataset) == 0:
        raise DataValidationError(f"Preference data {report.where} has no rows.", report)

    columns = list(dataset.column_names)
    _check_columns(columns, config, report)
    if report.problems:
        raise DataValidationError(report.error_message(), report)

    # Pass 2: raw rows.
    has_prompt = "prompt" in columns
    needed = [c for c in dict.fromkeys(["prompt", "chosen", "rejected", config.dispersion_column]) if c in columns]
    pairs: list[_Pair] = []
    formats: dict[bool, list[int]] = {False: [], True: []}
    raw = dataset.select_columns(needed)
    for start in range(0, len(raw), 1000):
        batch = raw[start : start + 1000]
        for offset in range(len(batch[needed[0]])):
            index = start + offset
            try:
                pair = _check_row(index, {c: batch[c][offset] for c in needed}, has_prompt, config)
            except _RowProblem as problem:
                report.add(problem.kind, index, problem.detail)
                continue
            formats[pair.conversational].append(index)
            pairs.append(pair)
    if formats[False] and formats[True]:
        minority = min(formats[False], formats[True], key=len)
        kind, other = ("conversational", "standard") if minority is formats[True] else ("standard", "conversational")
        n_other = len(formats[False]) + len(formats[True]) - len(minority)
        for index in minority:
            report.add("mixed_formats", index, f"it is {kind}, while {n_other} other rows are {other}")
    if "mixed_formats" in report.problems:
        raise DataValidationError(report.error_message(), report)

    # Pass 3: template, tokens, truncation.
    conversational = bool(formats[True])
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise DataValidationError(
            f"Preference data {report.where} is conversational (lists of messages), but the tokenizer has no chat "
            "template. Use a tokenizer that has one (e.g. an instruct model's), set tokenizer.chat_template, or "
            "give the data as plain strings (standard format).",
            report,
        )
    if not conversational and config.add_eos and tokenizer.eos_token_id is None:
        raise DataValidationError(
            "DataConfig.add_eos is set but the tokenizer has no EOS token; set tokenizer.eos_token or add_eos=False.",
            report,
        )
    rendered: list[tuple[_Pair, str, str, str]] = []
    for pair in pairs:
        try:
            rendered.append((pair, *_render(pair, tokenizer)))
        except _RowProblem as problem:
            report.add(problem.kind, pair.index, problem.detail)
    prompt_limit, completion_limit = _token_limits(config)
    prompt_ids, prompt_clipped = _tokenize_texts(tokenizer, [r[1] for r in rendered], prompt_limit)
    chosen_ids, _ = _tokenize_texts(tokenizer, [r[2] for r in rendered], completion_limit)
    rejected_ids, _ = _tokenize_texts(tokenizer, [r[3] for r in rendered], completion_limit)

    leading = [] if conversational else _leading_special_ids(tokenizer)
    eos = tokenizer.eos_token_id if (config.add_eos and not conversational) else None
    special_ids = set(tokenizer.all_special_ids)
    names_out = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "prompt", "row_index"]
    columns_out: dict[str, list] = {name: [] for name in names_out}
    if config.dispersion_column:
        columns_out["dispersion"] = []
    for position, ((pair, prompt_text, _, _), p_ids, c_ids, r_ids) in enumerate(
        zip(rendered, prompt_ids, chosen_ids, rejected_ids)
    ):
        if position in prompt_clipped:  # only its first tokens were read: more than any budget
            detail = f"the prompt has more than {prompt_limit - 1} tokens ({len(prompt_text)} characters)"
            report.add("prompt_too_long", pair.index, detail)
            continue
        if leading and p_ids[: len(leading)] != leading:
            p_ids = leading + p_ids
        if eos is not None:
            c_ids = c_ids if c_ids[-1:] == [eos] else c_ids + [eos]
            r_ids = r_ids if r_ids[-1:] == [eos] else r_ids + [eos]
        try:
            kept = _truncate_and_check(p_ids, {"chosen": c_ids, "rejected": r_ids}, config, special_ids)
        except _RowProblem as problem:
            report.add(problem.kind, pair.index, problem.detail)
            continue
        columns_out["prompt_input_ids"].append(p_ids)
        columns_out["chosen_input_ids"].append(kept["chosen"])
        columns_out["rejected_input_ids"].append(kept["rejected"])
        columns_out["prompt"].append(prompt_text)
        columns_out["row_index"].append(pair.index)
        if config.dispersion_column:
            columns_out["dispersion"].append(pair.dispersion)

    report.kept_rows = len(columns_out["row_index"])
    order = list(PROBLEM_KINDS)
    report.problems = {kind: sorted(report.problems[kind]) for kind in sorted(report.problems, key=order.index)}
    if report.problems and config.strict:
        raise DataValidationError(report.error_message(), report)
    if report.kept_rows == 0:
        tail = "No usable row is left (strict=False skipped them all)."
        raise DataValidationError(report.error_message(tail=tail), report)
    (logger.warning if report.problems else logger.info)(report.summary())

    # Arrow infers list<int64>, string, int64, float64 (faster than encoding declared features).
    return datasets.Dataset.from_dict(columns_out), report
