"""Checks of preference data before any model work: the problem kinds, the report, and the
raw-row checks (passes 1 and 2 of ``prepare_preference_dataset``; no tokenizer needed).

Each problem found is reported under one kind (the first one found for the row), so the
counts add up to the rows dropped. ``missing_columns`` and ``mixed_formats`` are always
errors; the other kinds are errors when ``strict`` and otherwise skipped, counted and logged.
"""

from __future__ import annotations

import difflib
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trl.data_utils import maybe_convert_to_chatml, maybe_extract_prompt

from mallowspo.training.data.tools import (
    first_tool_use,
    message_text,
    parse_template_kwargs,
    parse_tools,
    tool_calls_of,
)

# Arguments of tokenizer.apply_chat_template that mallowspo sets itself: a row's
# chat_template_kwargs cannot override them.
RESERVED_TEMPLATE_KWARGS = ("tools", "add_generation_prompt", "continue_final_message", "tokenize", "return_dict")
# Problem kind -> how to fix it (shown in errors). Order = order of the checks.
PROBLEM_KINDS: dict[str, str] = {
    "missing_columns": (
        "name the columns 'chosen' and 'rejected' (and optionally 'prompt'); lists: 'prompt', 'responses' and "
        "'ranking' or 'scores' (or set list_format, responses_column, ranking_column, scores_column)"
    ),
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
    # The kinds of lists (training.data.lists: LIST_PROBLEM_KINDS).
    "bad_responses": "give each list's responses as a list of at least 2 completions (strings or message lists)",
    "responses_identical": (
        "a response cannot be ranked both above and below itself: drop or fix the copies (tied copies are merged)"
    ),
    "bad_ranking": (
        "give the ranking as a permutation of the response indices 0..K-1, best first (for ties, give scores)"
    ),
    "bad_scores": "give one finite number per response, higher is better (equal numbers are ties)",
    "no_preference": "a list needs responses of at least two different ranks (scores not all equal); drop it",
    "bad_tools": "give 'tools' as a list of JSON-schema objects (one per tool), or as the JSON text of such a list",
    "bad_chat_template_kwargs": (
        "give 'chat_template_kwargs' as an object of extra template variables (or its JSON text), without the "
        f"names mallowspo passes itself ({', '.join(RESERVED_TEMPLATE_KWARGS)})"
    ),
    "missing_tools": (
        "give the tool schemas of these rows in a 'tools' column (a list of JSON schemas, or its JSON text): the chat "
        "template renders them into the prompt, and the model cannot learn tool calls without them"
    ),
    "bad_dispersion": "dispersion values are -log phi(x) estimates: finite numbers > 0",
    "prompt_too_long": (
        "raise max_prompt_length / max_length, shorten these prompts, or set truncation_mode='keep_end' to cut "
        "their start"
    ),
    "completion_too_long": (
        "with truncation_mode='keep_end' only prompts are cut: raise max_length, set max_completion_length, or use "
        "truncation_mode='keep_start'"
    ),
    "completion_empty_after_truncation": (
        "these completions have no content token left; raise max_length / max_completion_length or fix the completions"
    ),
}
ALWAYS_FATAL = frozenset({"missing_columns", "mixed_formats", "missing_tools"})
# Note kind -> what happened to a row that was kept (not a problem: counted and reported only).
NOTE_KINDS: dict[str, str] = {
    "truncated": "cut to the token budgets as truncation_mode says",
    "prompt_boundary_moved": (
        "tokenized together, prompt and completion merge tokens across their boundary: the completion starts where "
        "the tokens of the prompt alone and of prompt + completion diverge (as in TRL), so the prompt's last tokens "
        "are left out of the training sequence"
    ),
    "duplicates_merged": "a list held copies of one response at the same rank (tied scores): each is kept once",
}
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


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
    examples: kind -> description of the first case (problems and notes).
    notes: kind (NOTE_KINDS) -> indices of kept rows that were changed, e.g. truncated.
    """

    total_rows: int
    kept_rows: int
    problems: dict[str, list[int]] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    name: str = "train"
    source: str | None = None
    notes: dict[str, list[int]] = field(default_factory=dict)

    def add(self, kind: str, row: int | None, detail: str) -> None:
        rows = self.problems.setdefault(kind, [])
        if row is not None:
            rows.append(row)
        self.examples.setdefault(kind, detail if row is None else f"row {row}: {detail}")

    def note(self, kind: str, row: int, detail: str) -> None:
        """Count a kept row under a note kind (NOTE_KINDS), e.g. "truncated"."""
        self.notes.setdefault(kind, []).append(row)
        self.examples.setdefault(kind, f"row {row}: {detail}")

    @property
    def where(self) -> str:
        return f"'{self.name}'" + (f" ({self.source})" if self.source else "")

    def summary(self) -> str:
        """Human-readable: totals, then per kind the count and the first example."""
        head = f"Preference data {self.where}: {self.total_rows} rows, {self.kept_rows} kept"
        if self.notes:
            head += " (" + ", ".join(f"{len(rows)} {kind}" for kind, rows in self.notes.items()) + ")"
        notes = [
            f"  {kind} (kept): {len(rows)} row{'s' if len(rows) != 1 else ''}, {NOTE_KINDS[kind]}; e.g. "
            f"{self.examples.get(kind, '')}"
            for kind, rows in self.notes.items()
        ]
        if not self.problems:
            return "\n".join([head + ", no problems found.", *notes])
        n_bad = len(set().union(*self.problems.values()))
        lines = [head + f", {n_bad} with problems (0-based row indices):"]
        for kind, rows in self.problems.items():
            what = f"{len(rows)} row{'s' if len(rows) != 1 else ''}; e.g. " if rows else ""
            lines.append(f"  {kind}: {what}{self.examples.get(kind, '')}")
        return "\n".join(lines + notes)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "total_rows": self.total_rows,
            "kept_rows": self.kept_rows,
            "problems": {kind: list(rows) for kind, rows in self.problems.items()},
            "notes": {kind: list(rows) for kind, rows in self.notes.items()},
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


def short_error(error: BaseException) -> str:
    """`Type: first line` of an error and of its cause, without the traceback."""
    parts = []
    while error is not None and len(parts) < 2:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        parts.append(f"{type(error).__name__}: {message}" if message else type(error).__name__)
        error = error.__cause__ or error.__context__
    return " (caused by ".join(parts) + ")" * (len(parts) - 1)


@dataclass
class CheckedPair:
    """A row that passed the raw checks, with its prompt made explicit."""

    index: int
    prompt: Any  # str or list of messages
    chosen: Any
    rejected: Any
    conversational: bool
    dispersion: float | None = None
    tools: list[dict] | None = None  # the row's tool schemas (conversational rows)
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # its extra chat-template variables
    annotations: dict[str, Any] = field(default_factory=dict)  # its annotation columns, as they are (dispersion)


class RowProblem(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def check_columns(
    columns: list[str], dispersion_column: str | None, report: ValidationReport, annotation_columns: Sequence[str] = ()
) -> None:
    required = ["chosen", "rejected"] + ([dispersion_column] if dispersion_column else []) + list(annotation_columns)
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
    raise RowProblem(
        "non_string_field",
        f"'{name}' is {_describe(value)}, expected a string or a list of {{'role', 'content'}} messages",
    )


def _check_messages(name: str, messages: list[dict]) -> None:
    if not messages:
        raise RowProblem("bad_messages", f"'{name}' is an empty message list")
    for position, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in MESSAGE_ROLES:
            hint = " (rename ShareGPT roles human/gpt to user/assistant)" if role in ("human", "gpt") else ""
            raise RowProblem(
                "bad_messages", f"message {position} of '{name}' has role {role!r}, not one of {MESSAGE_ROLES}{hint}"
            )
        try:
            calls = tool_calls_of(message)
        except ValueError as bad:
            raise RowProblem("bad_messages", f"message {position} of '{name}' {bad}") from None
        if not isinstance(content, str) and not (calls and content is None):
            raise RowProblem(
                "bad_messages", f"message {position} of '{name}' has content {_describe(content)}, expected a string"
            )


def _text_of(value: Any) -> str:
    """The text a field carries: the string itself, or the messages' contents and tool calls."""
    return value if isinstance(value, str) else "".join(message_text(m) for m in value)


def _is_blank(text: str) -> bool:
    """No visible character: only white space and invisible format characters (zero-width
    spaces and joiners, byte-order marks, direction marks: Unicode category Cf)."""
    return not any(not c.isspace() and unicodedata.category(c) != "Cf" for c in text)


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
        raise RowProblem("bad_dispersion", f"dispersion is {_describe(value)}, expected a number")
    if not math.isfinite(number) or number <= 0:
        raise RowProblem("bad_dispersion", f"dispersion is {number!r}, expected a finite number > 0")
    return number


def check_row(
    index: int, row: dict, has_prompt: bool, dispersion_column: str | None, annotation_columns: Sequence[str] = ()
) -> CheckedPair:
    """Raw checks of one row (no tokenizer); returns it with an explicit prompt. The values of
    ``annotation_columns`` are carried as they are (the dispersion path reads and checks them)."""
    names = ["prompt", "chosen", "rejected"] if has_prompt else ["chosen", "rejected"]
    formats = {name: _field_format(name, row[name]) for name in names}
    if formats["chosen"] != formats["rejected"]:
        raise RowProblem(
            "mixed_formats", f"'chosen' is {_describe(row['chosen'])} but 'rejected' is {_describe(row['rejected'])}"
        )
    conversational = formats["chosen"] == "messages"
    if has_prompt and formats["prompt"] == "messages" and not conversational:
        raise RowProblem("mixed_formats", "'prompt' is a list of messages but 'chosen'/'rejected' are strings")
    if has_prompt and formats["prompt"] == "text" and conversational:
        raise RowProblem(
            "mixed_formats",
            "'prompt' is a string but 'chosen'/'rejected' are lists of messages; give the prompt as messages too, "
            "e.g. [{'role': 'user', 'content': '...'}]",
        )

    example = {name: row[name] for name in names}
    if conversational:
        example = {n: [dict(m) for m in v] if isinstance(v, list) else v for n, v in example.items()}  # copies
        example = maybe_convert_to_chatml(example)  # {"from", "value"} -> {"role", "content"}
        for name in names:
            if formats[name] == "messages":
                _check_messages(name, example[name])

    if _same(example["chosen"], example["rejected"]):
        raise RowProblem("chosen_equals_rejected", "'chosen' and 'rejected' are identical")

    if not conversational and not has_prompt and example["chosen"][:1] != example["rejected"][:1]:
        example = {"prompt": "", **example}  # no shared prefix (TRL's extract_prompt mis-handles this case)
    else:  # explicit prompt kept; implicit one (or a text prompt next to conversations) extracted
        example = maybe_extract_prompt(example)
    for name in ("chosen", "rejected"):
        if _is_blank(_text_of(example[name])):
            raise RowProblem(
                "empty_field", f"the '{name}' completion is empty or whitespace only (or invisible characters)"
            )
    if not example["prompt"] or _is_blank(_text_of(example["prompt"])):
        where = "'prompt' is empty or whitespace only" if has_prompt else "'chosen' and 'rejected' share no prompt"
        raise RowProblem("empty_field", where)
    if conversational:
        for name in ("chosen", "rejected"):
            if example[name][0]["role"] != "assistant":
                first = example[name][0]["role"]
                detail = f"the '{name}' completion starts with a {first!r} message, not 'assistant'"
                raise RowProblem("bad_messages", detail)
        if example["prompt"][-1]["role"] not in ("user", "tool", "assistant"):
            raise RowProblem("bad_messages", f"the prompt ends with a {example['prompt'][-1]['role']!r} message")

    tools, template_kwargs = _template_inputs(row, example) if conversational else (None, {})
    dispersion = _parse_dispersion(row[dispersion_column]) if dispersion_column else None
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    annotations = {column: row[column] for column in annotation_columns}
    return CheckedPair(
        index, prompt, chosen, rejected, conversational, dispersion, tools, template_kwargs, annotations
    )


def _template_inputs(row: dict, conversation: dict[str, list[dict]]) -> tuple[list[dict] | None, dict[str, Any]]:
    """The row's tool schemas and extra template variables; a conversation that uses tools needs
    the schemas (the template renders them into the prompt: without them the model learns to
    call tools it was never shown)."""
    try:
        tools = parse_tools(row.get("tools"))
    except ValueError as bad:
        raise RowProblem("bad_tools", str(bad)) from None
    try:
        template_kwargs = parse_template_kwargs(row.get("chat_template_kwargs"), RESERVED_TEMPLATE_KWARGS)
    except ValueError as bad:
        raise RowProblem("bad_chat_template_kwargs", str(bad)) from None
    use = first_tool_use(conversation)
    if use is not None and tools is None:
        given = "has no 'tools' column" if "tools" not in row else "has no value in its 'tools' column"
        raise RowProblem("missing_tools", f"{use}, but the row {given}")
    return tools, template_kwargs


def _same(a: Any, b: Any) -> bool:
    """Same completion up to surrounding whitespace (of the text, or of each message)."""
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    key = lambda messages: [(m.get("role"), message_text(m).strip()) for m in messages]  # noqa: E731
    return key(a) == key(b)
