"""Preference data to token ids: ``prepare_preference_dataset`` and its settings.

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
    dispersion           float      only when PreferenceDataConfig.dispersion_column is set: the
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
`strict` and otherwise skipped, counted and logged (logger "mallowspo.training.data").

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

import logging
from dataclasses import dataclass

import datasets

from mallowspo.training.data.load import source_of
from mallowspo.training.data.tokenize import (
    leading_special_ids,
    render_pair,
    token_limits,
    tokenize_texts,
    truncate_and_check,
)
from mallowspo.training.data.validate import (
    PROBLEM_KINDS,
    CheckedPair,
    DataValidationError,
    RowProblem,
    ValidationReport,
    check_columns,
    check_row,
)

logger = logging.getLogger("mallowspo.data")


@dataclass
class PreferenceDataConfig:
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
                raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and a completion token), got {self.max_length}")


TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def check_tokenized_dataset(dataset: datasets.Dataset, name: str = "train", batch_size: int = 4096) -> None:
    """Check data that is already tokenized (has ``prompt_input_ids``) before it is used as is.

    Raises DataValidationError when an id column is missing, or when a prompt or a
    completion has no token: such a pair has nothing to score, and its log-prob would be a
    silent 0 rather than an error.
    """
    source = source_of(dataset)
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
    problems = [
        f"{column} is empty in {len(rows)} row{'s' if len(rows) > 1 else ''} (e.g. row {rows[0]})"
        for column, rows in empty.items()
        if rows
    ]
    if problems:
        raise DataValidationError(
            f"Tokenized preference data {where}: " + "; ".join(problems) + ". Every pair needs a non-empty prompt "
            "and non-empty completions; drop these rows or tokenize the raw data with prepare_preference_dataset."
        )


def prepare_preference_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    config: PreferenceDataConfig,
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
        source = source_of(dataset)
    report = ValidationReport(total_rows=len(dataset), kept_rows=0, name=name, source=source)
    if len(dataset) == 0:
        raise DataValidationError(f"Preference data {report.where} has no rows.", report)

    columns = list(dataset.column_names)
    check_columns(columns, config.dispersion_column, report)
    if report.problems:
        raise DataValidationError(report.error_message(), report)

    # Pass 2: raw rows.
    has_prompt = "prompt" in columns
    needed = [c for c in dict.fromkeys(["prompt", "chosen", "rejected", config.dispersion_column]) if c in columns]
    pairs: list[CheckedPair] = []
    formats: dict[bool, list[int]] = {False: [], True: []}
    raw = dataset.select_columns(needed)
    for start in range(0, len(raw), 1000):
        batch = raw[start : start + 1000]
        for offset in range(len(batch[needed[0]])):
            index = start + offset
            try:
                pair = check_row(index, {c: batch[c][offset] for c in needed}, has_prompt, config.dispersion_column)
            except RowProblem as problem:
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
            "PreferenceDataConfig.add_eos is set but the tokenizer has no EOS token; set tokenizer.eos_token or add_eos=False.",
            report,
        )
    rendered: list[tuple[CheckedPair, str, str, str]] = []
    for pair in pairs:
        try:
            rendered.append((pair, *render_pair(pair, tokenizer)))
        except RowProblem as problem:
            report.add(problem.kind, pair.index, problem.detail)
    prompt_limit, completion_limit = token_limits(config)
    prompt_ids, prompt_clipped = tokenize_texts(tokenizer, [r[1] for r in rendered], prompt_limit)
    chosen_ids, _ = tokenize_texts(tokenizer, [r[2] for r in rendered], completion_limit)
    rejected_ids, _ = tokenize_texts(tokenizer, [r[3] for r in rendered], completion_limit)

    leading = [] if conversational else leading_special_ids(tokenizer)
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
            kept = truncate_and_check(p_ids, {"chosen": c_ids, "rejected": r_ids}, config, special_ids)
        except RowProblem as problem:
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
